"""The seams of spamtrap.interfaces: each implementation provides its
interface (at run time here; mypy checks the signatures, see
``interfaces._implementations_conform``), and the shared errors mean the
same thing whichever component raised them."""

from __future__ import annotations

import ast
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.python.threadpool import ThreadPool

import spamtrap
from spamtrap.config import Config, QueueConfig, RelayConfig, SetConfig, SpoolConfig
from spamtrap.errors import IntakeUnavailableError, SourceStoppedError, WorkSourceError
from spamtrap.interfaces import (
    BundleSink,
    DelayedCall,
    Intake,
    NetworkReactor,
    NoticeChannel,
    ReactorFromThreads,
    ReactorTime,
    Store,
    WorkerReactor,
    WorkSource,
    pick_clock,
)
from spamtrap.metrics import Metrics
from spamtrap.notify.mail import MailSender
from spamtrap.notify.webhook import WebhookSender
from spamtrap.store.local import LocalStore
from spamtrap.store.s3 import S3Store
from spamtrap.work.collate import Collator
from spamtrap.work.pipeline import Pipeline
from spamtrap.work.queue import QueueIntake, QueueWriter
from spamtrap.work.queue_link import QueueLink, QueueUnavailableError
from spamtrap.work.queue_source import QueueSource
from spamtrap.work.spool import Spool, SpoolError, SpoolIntake
from tests.support.smtp_helpers import Harness


class ThreadCalls:
    """A reactor stand-in that only hands calls back from threads."""

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def make_link(metrics: Metrics | None = None) -> QueueLink:
    # A client is given, so nothing connects; nothing is started.
    return QueueLink(QueueConfig(), metrics or Metrics(), ThreadCalls(), object(), task.Clock())


def test_spool_and_queue_are_work_sources(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), SpoolConfig(), Metrics(), ThreadCalls(), task.Clock())
    source = QueueSource(make_link(), "node", Metrics())
    for work in (spool, source):
        assert isinstance(work, WorkSource)
        assert work.depth == 0
        assert work.take(10) == []


def test_intakes_stores_sinks_and_channels_provide_their_interfaces(tmp_path: Path) -> None:
    metrics = Metrics()
    spool = Spool(str(tmp_path / "spool"), SpoolConfig(), metrics, ThreadCalls(), task.Clock())
    link = make_link(metrics)
    assert isinstance(SpoolIntake(spool), Intake)
    assert isinstance(QueueIntake(QueueWriter(link, metrics), spool, "spool", metrics), Intake)
    pool = ThreadPool()
    assert isinstance(LocalStore(str(tmp_path / "bundles"), ThreadCalls(), pool), Store)
    s3 = S3Store("bucket", "", task.Clock(), pool, agent=object())
    assert isinstance(s3, Store)
    cfg = Config()
    pipeline = Pipeline(spool, [], Collator(cfg.sets), {}, metrics, task.Clock(), pool, 0, cfg)
    assert isinstance(pipeline, BundleSink)
    relay = RelayConfig(host="127.0.0.1", port=2525)
    assert isinstance(MailSender(relay, None, task.Clock(), "trap.test"), NoticeChannel)
    assert isinstance(WebhookSender(object(), task.Clock()), NoticeChannel)


def test_reactor_parts_match_twisted() -> None:
    from twisted.internet import reactor

    clock = task.Clock()
    assert isinstance(clock, ReactorTime)
    assert not isinstance(clock, ReactorFromThreads)  # a Clock runs no threads
    assert isinstance(reactor, WorkerReactor)
    assert isinstance(reactor, NetworkReactor)
    assert isinstance(clock.callLater(1, lambda: None), DelayedCall)


def test_pick_clock_says_what_is_missing() -> None:
    clock = task.Clock()
    assert pick_clock(clock, ThreadCalls()) is clock
    assert pick_clock(None, clock) is clock
    with pytest.raises(TypeError, match=r"seconds\(\) and callLater\(\)"):
        pick_clock(None, ThreadCalls())
    # A spool without a clock on a reactor that keeps no time fails at once,
    # not at its first age check.
    with pytest.raises(TypeError, match="pass a clock"):
        Spool("unused", SpoolConfig(), Metrics(), ThreadCalls())


# -- the shared errors --------------------------------------------------------------


def test_error_hierarchy() -> None:
    assert issubclass(SpoolError, WorkSourceError)
    assert issubclass(SourceStoppedError, WorkSourceError)
    assert issubclass(QueueUnavailableError, IntakeUnavailableError)
    # The queue's errors are its own, not the spool's.
    assert not issubclass(QueueUnavailableError, SpoolError)


def test_stopped_spool_fails_get_with_source_stopped(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), SpoolConfig(), Metrics(), ThreadCalls(), task.Clock())
    waiting = spool.get()
    spool.stop()
    for d in (waiting, spool.get()):
        failure = []
        d.addErrback(failure.append)
        assert failure[0].check(SourceStoppedError)
        assert failure[0].check(SpoolError)  # still the spool's own error too


@pytest_twisted.ensureDeferred
async def test_stopped_queue_reader_fails_get_with_source_stopped_not_spool_error() -> None:
    source = QueueSource(make_link(), "node", Metrics())
    waiting = source.get()
    await source.stop_reading()
    for d in (waiting, source.get()):
        with pytest.raises(SourceStoppedError) as caught:
            await d
        assert not isinstance(caught.value, SpoolError)


class ListSource:
    """A work source that is not the spool: hands out nothing, then stops."""

    def __init__(self) -> None:
        self.waiters: deque[defer.Deferred[Any]] = deque()
        self.acked: list[tuple[int, int]] = []

    @property
    def depth(self) -> int:
        return 0

    def get(self) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.waiters.append(d)
        return d

    def take(self, limit: int) -> list[Any]:
        return []

    def read_entries(self, entries: Sequence[Any]) -> list[bytes | WorkSourceError]:
        return []

    def ack_keys(self, keys: Iterable[tuple[int, int]]) -> None:
        self.acked += keys

    def stop(self) -> None:
        while self.waiters:
            self.waiters.popleft().errback(SourceStoppedError("list source stopped"))


def test_pipeline_ends_quietly_when_any_source_stops() -> None:
    source = ListSource()
    assert isinstance(source, WorkSource)
    cfg = Config(sets=[SetConfig(name="all")])
    clock = task.Clock()
    pipeline = Pipeline(source, [], Collator(cfg.sets), {}, Metrics(), clock, None, 2, cfg)
    pipeline.start()
    assert len(source.waiters) == 2
    source.stop()
    results: list[Any] = []
    for loop in pipeline._loops:
        loop.addBoth(results.append)
    assert results == [None, None]  # ended, no failure escaped the loops


def test_smtp_answers_any_intake_refusal_with_queue_unavailable() -> None:
    h = Harness(auto_ack=False)
    h.replies()
    h.transaction(b"x\r\n")
    h.pending[0].errback(IntakeUnavailableError("no intake for now"))
    assert h.replies()[-1] == b"451 4.3.0 Queue unavailable, try again later"
    assert h.metrics.messages_rejected.labels(reason="queue")._value.get() == 1
    assert h.metrics.messages_rejected.labels(reason="spool")._value.get() == 0


PACKAGE = Path(spamtrap.__file__).parent


def module_file(name: str) -> Path | None:
    """The source of spamtrap module ``name``, or None if it is none of ours."""
    parts = name.split(".")
    if parts[0] != "spamtrap":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def loaded_at_import(name: str) -> set[str]:
    """Every spamtrap module that importing ``name`` loads: the module-level
    imports, followed through the package __init__ files, without those
    under ``if TYPE_CHECKING`` or inside functions (they load later, if at
    all). Read from the sources, so a fresh interpreter is not needed."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen or module_file(current) is None:
            continue
        seen.add(current)
        parts = current.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages
        path = module_file(current)
        assert path is not None
        is_package = path.name == "__init__.py"
        statements = list(ast.parse(path.read_text()).body)
        while statements:
            node = statements.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                statements += node.orelse
            elif isinstance(node, (ast.If, ast.Try)):
                statements += node.body + node.orelse + getattr(node, "finalbody", [])
                statements += [s for h in getattr(node, "handlers", []) for s in h.body]
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = parts if is_package else parts[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    source = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                todo.append(source)
                todo += [f"{source}.{alias.name}" for alias in node.names]  # submodules
    return seen


def test_the_import_walk_finds_what_an_import_loads() -> None:
    # Checked against the interpreter for a module whose imports are known.
    import spamtrap.work.queue  # noqa: F401 - loaded for the comparison

    walked = loaded_at_import("spamtrap.work.queue")
    assert {"spamtrap", "spamtrap.work", "spamtrap.work.queue"} <= walked
    assert walked <= set(sys.modules)


def test_smtp_does_not_import_the_redis_queue() -> None:
    loaded = loaded_at_import("spamtrap.intake.smtp")
    assert "spamtrap.intake.smtp" in loaded and "spamtrap.errors" in loaded
    assert "spamtrap.work.queue" not in loaded
