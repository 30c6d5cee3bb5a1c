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
SIGHUP, and when a file changes (checked every ``reload_interval``). A file
that fails to load (YAML error, bad regexp, unknown key) keeps its previous
rules, and the error is logged with its file and line and counted.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from spamtrap.config import Config, ListRule, forged_header_problem
from spamtrap.filters import Discard
from spamtrap.message import META_FIELDS, Envelope
from spamtrap.regex_safety import MAX_VALUE_CHARS, compile_safe
from spamtrap.work.collate import message_headers

log = Logger()

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # as config's names
_HEADER_RE = re.compile(r"[!-9;-~]+")  # RFC 5322 2.2: printable ASCII, no colon
_OWN_META_RE = re.compile(r"x_[a-z0-9_]+")  # metadata added by stages
_KEYS = ("name", "regex", "header", "meta")
_STR = "tag:yaml.org,2002:str"

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
    """Rules from YAML text, checked strictly. Raises RuleFileError."""
    problems: list[Problem] = []
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise RuleFileError([(path, line, f"YAML syntax error: {e.problem or e.context}")])
    except yaml.YAMLError as e:
        raise RuleFileError([(path, None, f"YAML error: {e}")])
    except RecursionError:
        raise RuleFileError([(path, None, "the YAML is nested too deeply")])
    if root is None or (isinstance(root, yaml.ScalarNode) and root.value == ""):
        return []  # an empty file: no rules
    if not isinstance(root, yaml.SequenceNode):
        line = root.start_mark.line + 1
        raise RuleFileError([(path, line, "expected a list of rules ({name, regex, header|meta})")])
    rules = []
    names: dict[str, int] = {}
    for item in root.value:
        rule = _rule(item, path, problems)
        if rule is None:
            continue
        line = item.start_mark.line + 1
        if rule.name in names:
            problems.append(
                (path, line, f"duplicate rule name {rule.name!r} (line {names[rule.name]})")
            )
            continue
        names[rule.name] = line
        rules.append(rule)
    if problems:
        raise RuleFileError(problems)
    return rules


def _rule(node: yaml.Node, path: str, problems: list[Problem]) -> ListRule | None:
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode):
        problems.append((path, line, "a rule must be a mapping {name, regex, header|meta}"))
        return None
    values: dict[str, str] = {}
    ok = True
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        at = key_node.start_mark.line + 1
        if key not in _KEYS:
            problems.append((path, at, f"unknown key {key!r} (known: {', '.join(_KEYS)})"))
            ok = False
        elif key in values:
            problems.append((path, at, f"duplicate key {key!r}"))
            ok = False
        elif not isinstance(value_node, yaml.ScalarNode) or value_node.tag != _STR:
            shown = value_node.value if isinstance(value_node, yaml.ScalarNode) else "a collection"
            problems.append((path, at, f"{key}: expected a string, got {shown!r}"))
            ok = False
        else:
            values[key] = value_node.value
    for key in ("name", "regex"):
        if key not in values and ok:
            problems.append((path, line, f"missing required key {key!r}"))
            ok = False
    if not ok:
        return None
    error = _check(values)
    if error:
        problems.append((path, line, error))
        return None
    try:
        regex = compile_safe(values["regex"], re.IGNORECASE)
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        problems.append((path, line, f"rule {values['name']!r}: bad regular expression: {e}"))
        return None
    return ListRule(values["name"], regex, values.get("header"), values.get("meta"))


def _check(values: dict[str, str]) -> str | None:
    name = values["name"]
    if not _NAME_RE.fullmatch(name):
        return f"bad rule name {name!r}: use letters, digits, '_', '.', '-' (not first)"
    header, meta = values.get("header"), values.get("meta")
    if (header is None) == (meta is None):
        which = "both are given" if header else "neither is given"
        return f"rule {name!r} needs exactly one of 'header' or 'meta' ({which})"
    if header is not None and not _HEADER_RE.fullmatch(header):
        return f"rule {name!r}: not a header field name: {header!r}"
    if header is not None and (forged := forged_header_problem(header)):
        return f"rule {name!r}: {forged}"
    if meta is not None and meta not in META_FIELDS and not _OWN_META_RE.fullmatch(meta):
        known = ", ".join(META_FIELDS)
        return f"rule {name!r}: unknown metadata field {meta!r} (known: {known}, or x_...)"
    return None


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
        self._hup_handler: Any = None
        self._previous_hup: Any = None

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

    # -- watching: SIGHUP and a periodic check ---------------------------------

    def watch(
        self,
        reactor: Any,
        interval: float,
        clock: Any = None,
        run_in_thread: Callable[[Callable[[], bool]], defer.Deferred[bool]] | None = None,
    ) -> None:
        """Check the files every ``interval`` seconds and reload on SIGHUP.

        Call in the reactor thread once it runs. The file reading runs
        through ``run_in_thread`` (default: the reactor's thread pool).
        """
        if run_in_thread is None:
            pool = reactor.getThreadPool()

            def run_in_thread(f: Callable[[], bool]) -> defer.Deferred[bool]:
                return deferToThreadPool(reactor, pool, f)

        runner = run_in_thread

        def poll(force: bool = False) -> defer.Deferred[Any]:
            d = runner(self.reload if force else self.check)
            # A LoopingCall stops for good when its call fails.
            d.addErrback(lambda f: log.failure("reloading discard lists failed", f))
            return d

        self._loop = task.LoopingCall(poll)
        self._loop.clock = clock if clock is not None else reactor
        self._loop.start(interval, now=False)
        self._install_hup(reactor, lambda: poll(force=True))

    def _install_hup(self, reactor: Any, hup: Callable[[], Any]) -> None:
        # twistd uses SIGUSR1 (log rotation) but not SIGHUP, with or without -n.
        if (
            not hasattr(signal, "SIGHUP")
            or threading.current_thread() is not threading.main_thread()
        ):
            return
        previous = signal.getsignal(signal.SIGHUP)

        def on_hup(signum: int, frame: Any) -> None:
            reactor.callFromThread(hup)
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGHUP, on_hup)
        self._hup_handler = on_hup
        self._previous_hup = previous

    def unwatch(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._hup_handler is not None and signal.getsignal(signal.SIGHUP) is self._hup_handler:
            previous = self._previous_hup
            signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)
        self._hup_handler = None


def make(cfg: Config, reactor: Any) -> ListsStage | None:
    lists = cfg.filters.lists
    if not lists.rules and not lists.files:
        return None
    stage = ListsStage(lists.rules, lists.files)
    stage.reload()  # at start-up, before the reactor runs: a blocking read is fine
    if lists.files:
        reactor.callWhenRunning(stage.watch, reactor, lists.reload_interval)
        reactor.addSystemEventTrigger("before", "shutdown", stage.unwatch)
    return stage
