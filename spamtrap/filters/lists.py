"""Stage "lists": discard lists.

Named rules discard a message when their regexp is found in a header field
(top header block) or a metadata field: for trap addresses that started to
get real mail, and for ham that keeps arriving. Rules come from the config
(``filters.lists.rules``) and from YAML files (``filters.lists.files``),
each a list of the same mappings::

    - name: retired-2025
      meta: rcpt
      regex: '<old-trap@trap\\.example>'
    - name: newsletter-ham
      header: List-Id
      regex: 'news\\.example\\.org'

Every regexp is checked at load for shapes that backtrack catastrophically
(spamtrap.regex_safety), and searches at most :data:`MAX_VALUE_CHARS` of a
value, so a rule costs milliseconds on any message.

Operators edit the files often, so they reload without a restart: on
SIGHUP (spamtrap.service.startup's one SIGHUP handler calls
``reload_soon``), and when a file changes (checked every
``reload_interval``). A file
that fails to load (YAML error, bad regexp, unknown key) keeps its previous
rules, and the error is logged with its file and line and counted.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from spamtrap.config import Config, ConfigError, ListRule, parse_list_rules
from spamtrap.filters import Discard
from spamtrap.interfaces import (
    ReactorFromThreads,
    ReactorTime,
    as_reactor_from_threads,
    as_reactor_time,
    pick_clock,
)
from spamtrap.message import Envelope
from spamtrap.regex_safety import MAX_VALUE_CHARS
from spamtrap.work.collate import message_headers

log = Logger()


class WatchReactor(ReactorTime, ReactorFromThreads, Protocol):
    """What watching the files needs: timers, and a thread pool to read in."""

    def getThreadPool(self) -> ThreadPool: ...


# (path, line or None, message)
Problem = tuple[str, int | None, str]


class RuleFileError(Exception):
    """A rule file that cannot be used; ``problems`` lists every error."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(format_problem(p) for p in problems))


def format_problem(problem: Problem) -> str:
    path, line, message = problem
    return f"{path}:{line}: {message}" if line is not None else f"{path}: {message}"


def load_rule_file(path: str) -> list[ListRule]:
    """The rules in a file. Raises RuleFileError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RuleFileError([(path, None, f"cannot read: {e.strerror or e}")])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RuleFileError([(path, data.count(b"\n", 0, e.start) + 1, "not UTF-8 text")])
    return parse_rules(text, path)


def parse_rules(text: str, path: str = "<string>") -> list[ListRule]:
    """Rules from YAML text, checked by the config's own declarations of a
    rule (spamtrap.config.parse_list_rules). Raises RuleFileError."""
    try:
        return parse_list_rules(text, path)
    except ConfigError as e:
        raise RuleFileError(
            [(path, i.line, f"{i.path}: {i.message}" if i.path else i.message) for i in e.errors]
        )


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ListsStage:
    """The stage; also the owner of its rule files and their reloading.

    Worker threads read ``rules`` once per message; a reload builds a new
    tuple and assigns it, so a message sees the old rules or the new ones,
    never a mix.
    """

    name = "lists"

    def __init__(self, rules: Sequence[ListRule], files: Sequence[str]) -> None:
        self.static = list(rules)
        self.files = list(files)
        self.rules: tuple[ListRule, ...] = tuple(self.static)
        self.rules_loaded = len(self.rules)  # rules in effect now (a gauge)
        self.reloads = 0  # files (re)loaded successfully
        self.reload_errors = 0  # failed loads of a file
        self._file_rules: dict[str, list[ListRule]] = {}
        self._stamps: dict[str, tuple[int, int, int] | None] = {}
        self._lock = threading.Lock()  # one reload at a time (SIGHUP vs the loop)
        self._loop: task.LoopingCall | None = None
        self._run_in_thread: Callable[[Callable[[], bool]], defer.Deferred[bool]] | None = None

    def __call__(self, env: Envelope) -> Discard | None:
        headers: dict[str, list[str]] | None = None
        for rule in self.rules:
            if rule.header is not None:
                if headers is None:
                    headers = message_headers(env.data)
                values = headers.get(rule.header.lower(), [])
            else:
                values = env.values(rule.meta or "")
            if any(rule.regex.search(v[:MAX_VALUE_CHARS]) for v in values):
                return Discard(f"list:{rule.name}")
        return None

    # -- loading (blocking file I/O: in a thread once the reactor runs) -------

    def reload(self) -> bool:
        """Re-read every file. True if all loaded."""
        return self._refresh(force=True)

    def check(self) -> bool:
        """Re-read the files that changed since they were last read."""
        return self._refresh(force=False)

    def _refresh(self, force: bool) -> bool:
        with self._lock:
            ok = True
            changed = False
            for path in self.files:
                stamp = _stamp(path)
                if not force and path in self._stamps and self._stamps[path] == stamp:
                    continue
                # Remember the stamp of a bad version too: it is reported
                # once, not at every check, and retried when it changes.
                self._stamps[path] = stamp
                try:
                    rules = load_rule_file(path)
                except RuleFileError as e:
                    ok = False
                    self.reload_errors += 1
                    for problem in e.problems:
                        log.error(
                            "discard list {problem}; keeping its previous rules",
                            problem=format_problem(problem),
                        )
                    continue
                self._file_rules[path] = rules
                self.reloads += 1
                changed = True
            if changed or force:
                new = [*self.static, *(r for p in self.files for r in self._file_rules.get(p, []))]
                self.rules = tuple(new)  # one assignment: atomic for the workers
                self.rules_loaded = len(new)
            return ok

    # -- watching: a periodic check, and reloads asked for (SIGHUP) -----------

    def watch(
        self,
        reactor: WatchReactor,
        interval: float,
        clock: ReactorTime | None = None,
        run_in_thread: Callable[[Callable[[], bool]], defer.Deferred[bool]] | None = None,
    ) -> None:
        """Check the files every ``interval`` seconds, and read them on
        ``reload_soon``, until ``unwatch``.

        Call in the reactor thread once it runs. The file reading runs
        through ``run_in_thread`` (default: the reactor's thread pool).
        """
        if run_in_thread is None:
            pool = reactor.getThreadPool()

            def run_in_thread(f: Callable[[], bool]) -> defer.Deferred[bool]:
                return deferToThreadPool(as_reactor_from_threads(reactor), pool, f)

        self._run_in_thread = run_in_thread
        self._loop = task.LoopingCall(self._poll)
        self._loop.clock = as_reactor_time(pick_clock(clock, reactor))
        self._loop.start(interval, now=False)

    def reload_soon(self) -> None:
        """Re-read every file, unchanged-looking ones too, in a thread (what
        SIGHUP does; spamtrap.service.startup.SighupHandler calls it). A
        no-op when not watching."""
        if self._run_in_thread is not None:
            self._poll(force=True)

    def _poll(self, force: bool = False) -> defer.Deferred[bool | None]:
        assert self._run_in_thread is not None
        d = self._run_in_thread(self.reload if force else self.check)
        # A LoopingCall stops for good when its call fails.
        return d.addErrback(_reload_failed)

    def unwatch(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._run_in_thread = None


def _reload_failed(failure: Failure) -> None:
    log.failure("reloading discard lists failed", failure)


def make(cfg: Config, reactor: object) -> ListsStage | None:
    """The stage with the config's own rules; its files are read by whoever
    runs it: the daemon's ListsReloader at start (then on change and on
    SIGHUP), a one-shot command with ``reload()``."""
    lists = cfg.filters.lists
    if not lists.rules and not lists.files:
        return None
    return ListsStage(lists.rules, lists.files)


def find(stages: Iterable[tuple[str, object]]) -> ListsStage | None:
    """The discard-list stage among built ``stages``, if there is one."""
    return next((s for _, s in stages if isinstance(s, ListsStage)), None)
