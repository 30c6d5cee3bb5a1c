"""The worker pipeline in-process: real spool, real bundles, real thread pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool

from spamtrap.bundle.mbox import read_mbox
from spamtrap.bundle.sets import BundleSet
from spamtrap.config import Condition, SetConfig, SpoolConfig
from spamtrap.filters.size import SizeStage
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.store.local import LocalStore
from spamtrap.work.collate import Collator
from spamtrap.work.pipeline import Pipeline
from spamtrap.work.spool import Spool
from tests.support.threaded_clock import ThreadedClock


def envelope(i: int, rcpt: str = "v@trap.example", size: int = 10) -> Envelope:
    return Envelope(
        msg_id=f"m{i}",
        received_at=1000.0 + i,
        mail_from="a@b",
        rcpts=[rcpt],
        data=b"Subject: %d\r\n\r\n" % i + b"x" * size + b"\r\n",
        meta={"id": [f"m{i}"], "rcpt": [f"<{rcpt}>"]},
    )


class World:
    """The pipeline with a real spool, bundles, store and thread pool.

    With ``clock`` (a ThreadedClock) every component keeps time on it: the
    test moves time with ``settle``, and only real thread work is waited
    for. Without it, the real reactor."""

    live: list[World] = []  # not yet stopped: see abandon_worlds

    def __init__(
        self,
        tmp: Path,
        sets: list[SetConfig],
        workers: int = 2,
        clock: ThreadedClock | None = None,
    ) -> None:
        self.clock = clock
        World.live.append(self)
        # One object for timers and the way back from threads, as the
        # daemon's reactor is.
        r: Any = clock if clock is not None else reactor
        self.metrics = Metrics()
        self.pool = ThreadPool(1, 4, "test-pipeline")
        self.pool.start()
        self.spool = Spool(str(tmp / "spool"), SpoolConfig(fsync=False), self.metrics, r)
        self.spool.start()
        self.store = LocalStore(str(tmp / "bundles"), r, self.pool)
        self.pipeline = Pipeline(
            self.spool,
            [("size", SizeStage(1000))],
            Collator(sets),
            {},
            self.metrics,
            r,
            self.pool,
            workers,
        )
        self.pipeline.bundles = {
            s.name: BundleSet(
                s,
                "node",
                str(tmp / "open"),
                self.store,
                self.metrics,
                r,
                self.pool,
                self.pipeline.stored,
            )
            for s in sets
        }
        for b in self.pipeline.bundles.values():
            b.start()
        self.tmp = tmp

    async def _run(self, d: Any, what: str) -> Any:
        if self.clock is None:
            return await d
        return await self.clock.run(defer.ensureDeferred(d), what)

    async def settle(self, done: Any, what: str) -> None:
        """Until ``done()`` holds; needs ``clock``."""
        assert self.clock is not None, "World(clock=ThreadedClock()) moves time by hand"
        await self.clock.settle(done, what)

    async def idle(self) -> None:
        """Until every spooled message went through the stages."""
        await self.settle(lambda: not (self.pipeline._busy or self.spool.depth), "idle workers")

    async def stop(self) -> None:
        await self._run(self.pipeline.drain(), "the pipeline to drain")
        await self._run(
            defer.DeferredList([b.stop() for b in self.pipeline.bundles.values()]),
            "the bundles to stop",
        )
        await self._run(self.spool.stop(), "the spool to stop")
        self.pool.stop()
        World.live.remove(self)

    def stored_ids(self, set_name: str) -> list[str]:
        ids = []
        for path in sorted((self.tmp / "bundles" / set_name).glob("*.mbox.gz")):
            for _, msg in read_mbox(str(path)):
                ids.append(msg.split(b"\n", 1)[0].split(b": ")[1].strip().decode())
        return ids


@pytest.fixture(autouse=True)
def abandon_worlds() -> Any:
    """A test that failed before World.stop leaves its pool's threads
    running, and they would keep pytest from exiting: stop them."""
    yield
    while World.live:
        w = World.live.pop()
        w.pipeline.running = False
        w.spool.stop()
        w.pool.stop()


def sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    return value or 0.0


@pytest_twisted.ensureDeferred
async def test_every_spooled_message_is_processed_and_acked(tmp_path: Path) -> None:
    w = World(tmp_path, [SetConfig("all")], clock=ThreadedClock())
    n = 700  # more than several batches, appended while workers run
    w.pipeline.start()
    await defer.gatherResults(
        [w.spool.append(envelope(i).to_record(), 1000.0 + i) for i in range(n)]
    )
    await w.stop()
    assert sorted(w.stored_ids("all")) == sorted(f"m{i}" for i in range(n))
    assert sample(w.metrics, "spamtrap_messages_processed_total") == n
    assert w.spool.in_flight == 0 and w.spool.depth == 0


@pytest_twisted.ensureDeferred
async def test_idle_workers_woken_by_small_commits_lose_nothing(tmp_path: Path) -> None:
    # Both workers wait; each commit then brings two entries. A worker that
    # wakes must not leave a stray request behind the other one's.
    w = World(tmp_path, [SetConfig("all")], clock=ThreadedClock())
    w.pipeline.start()
    n = 0
    for _ in range(20):
        await defer.gatherResults(
            [w.spool.append(envelope(n + k).to_record(), 1.0) for k in range(2)]
        )
        n += 2
        await w.idle()
    await w.stop()
    assert sample(w.metrics, "spamtrap_messages_processed_total") == n
    assert sorted(w.stored_ids("all")) == sorted(f"m{i}" for i in range(n))


@pytest_twisted.ensureDeferred
async def test_discarded_and_unrouted_messages_are_acked(tmp_path: Path) -> None:
    import re

    private = SetConfig("private", match=[Condition(re.compile("@private"), meta="rcpt")])
    w = World(tmp_path, [private], clock=ThreadedClock())
    w.pipeline.start()
    await w.spool.append(envelope(1, "x@private.example").to_record(), 1.0)
    await w.spool.append(envelope(2, "x@public.example").to_record(), 2.0)
    await w.spool.append(envelope(3, "x@private.example", size=5000).to_record(), 3.0)
    await w.stop()
    assert w.stored_ids("private") == ["m1"]
    m = w.metrics.registry.get_sample_value(
        "spamtrap_filter_verdicts_total",
        {"stage": "size", "verdict": "discard", "reason": "too-large"},
    )
    assert m == 1
    # nothing waits in the spool: discarded and unrouted ones were acked at once
    assert w.spool.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_a_message_in_two_sets_is_acked_after_both_are_stored(tmp_path: Path) -> None:
    w = World(tmp_path, [SetConfig("a"), SetConfig("b")], clock=ThreadedClock())
    w.pipeline.start()
    await w.spool.append(envelope(1).to_record(), 1.0)
    await w.idle()
    assert w.spool.in_flight == 1
    w.pipeline.bundles["a"].rotate()
    a_stored = lambda: list((tmp_path / "bundles" / "a").glob("*.json"))  # noqa: E731
    await w.settle(a_stored, "set a's bundle to be stored")
    assert w.spool.in_flight == 1  # still held by the open bundle of set b
    w.pipeline.bundles["b"].rotate()
    await w.settle(lambda: not w.spool.in_flight, "the ack after set b's bundle")
    await w.stop()
    assert w.stored_ids("a") == w.stored_ids("b") == ["m1"]


@pytest_twisted.ensureDeferred
async def test_messages_a_bundle_could_not_take_stay_spooled(tmp_path: Path) -> None:
    w = World(tmp_path, [SetConfig("all")], clock=ThreadedClock())
    bundles = w.pipeline.bundles["all"]
    real_add_many = bundles.add_many

    def odd(data: bytes) -> bool:
        return data.split(b"\nSubject: ", 1)[1][:1] in b"13579"

    def lose_odd_ones(items: list[tuple[bytes, float, Any]]) -> list[Any]:
        real_add_many([item for item in items if not odd(item[0])])
        return [token for data, _, token in items if odd(data)]

    bundles.add_many = lose_odd_ones  # type: ignore[method-assign]
    w.pipeline.start()
    await defer.gatherResults([w.spool.append(envelope(i).to_record(), 1.0) for i in range(6)])
    await w.idle()
    assert sample(w.metrics, "spamtrap_processing_errors_total") == 3
    assert sample(w.metrics, "spamtrap_messages_processed_total") == 3
    bundles.rotate()
    # The store and the acks take a few turns through the threads.
    await w.settle(lambda: w.spool.in_flight == 3, "the even ones to be acked")
    await w.stop()
    # Stored and acked: the even ones; still in the spool: the odd ones.
    assert sorted(w.stored_ids("all")) == ["m0", "m2", "m4"]
    assert w.spool.in_flight == 3


def deferLater(seconds: float) -> Any:
    """A real-time wait, for tests that build ``World()`` on the real
    reactor (tests/unit/test_bundle_state.py); World(clock=...) needs none."""
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)
