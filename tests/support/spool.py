"""Spool test helpers: a config, a stand-in reactor for synchronous tests,
recovery of what a spool directory holds, and the make_spool fixture."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from spamtrap.config import SpoolConfig
from spamtrap.metrics import Metrics
from spamtrap.work.spool import Spool, SpoolEntry


def config(**overrides: Any) -> SpoolConfig:
    values: dict[str, Any] = {"commit_interval": 0.0}
    values.update(overrides)
    return SpoolConfig(**values)


class ThreadCalls:
    """A stand-in reactor for synchronous tests: runs the writer thread's
    callFromThread calls when the test waits for a Deferred."""

    def __init__(self) -> None:
        self._calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self._calls.put((f, args))

    def wait(self, d: Deferred[Any], timeout: float = 10.0) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        deadline = time.monotonic() + timeout
        while not results:
            f, args = self._calls.get(timeout=max(0.0, deadline - time.monotonic()))
            f(*args)
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]


def recover(directory: Path) -> tuple[Spool, list[SpoolEntry]]:
    reactor = ThreadCalls()
    spool = Spool(str(directory), config(fsync=False), Metrics(), reactor, Clock())
    spool.start()
    entries = [reactor.wait(spool.get()) for _ in range(spool.depth)]
    reactor.wait(spool.stop())
    return spool, entries


@pytest.fixture
def make_spool() -> Iterator[Callable[..., Spool]]:
    """Starts spools on the real reactor and stops any a test left running."""
    from twisted.internet import reactor

    started: list[Spool] = []

    def make(
        directory: Path,
        cfg: SpoolConfig | None = None,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        *,
        drop_written: bool = False,
    ) -> Spool:
        # A Clock that stays at 0 keeps age shedding out of tests that do
        # not ask for it (their received_at values are in 1970).
        spool = Spool(
            str(directory),
            cfg or config(),
            metrics or Metrics(),
            reactor,
            clock or Clock(),
            drop_written=drop_written,
        )
        spool.start()
        started.append(spool)
        return spool

    yield make
    for spool in started:
        pytest_twisted.blockon(spool.stop())
