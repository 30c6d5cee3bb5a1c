"""The worker pipeline in-process: real spool, real bundles, real thread pool
(World), for the pipeline and bundle-state tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool

from spamtrap.bundle.mbox import read_mbox
from spamtrap.bundle.sets import BundleSet
from spamtrap.config import SetConfig, SpoolConfig
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

    live: list[World] = []  # not yet stopped: see stop_abandoned_worlds

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


def stop_abandoned_worlds() -> None:
    """A test that failed before World.stop leaves its pool's threads
    running, and they would keep pytest from exiting: stop them (run after
    every unit test by tests/unit/conftest.py)."""
    while World.live:
        w = World.live.pop()
        w.pipeline.running = False
        w.spool.stop()
        w.pool.stop()


def sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    return value or 0.0
