"""The worker pipeline in-process: real spool, real bundles, real thread pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool

from spamtrap.bundle import BundleSet
from spamtrap.collate import Collator
from spamtrap.config import Condition, SetConfig, SpoolConfig
from spamtrap.filters.size import SizeStage
from spamtrap.mbox import read_mbox
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.pipeline import Pipeline
from spamtrap.spool import Spool
from spamtrap.store.local import LocalStore


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
    def __init__(self, tmp: Path, sets: list[SetConfig], workers: int = 2) -> None:
        self.metrics = Metrics()
        self.pool = ThreadPool(1, 4, "test-pipeline")
        self.pool.start()
        self.spool = Spool(str(tmp / "spool"), SpoolConfig(fsync=False), self.metrics, reactor)
        self.spool.start()
        self.store = LocalStore(str(tmp / "bundles"), reactor, self.pool)
        self.pipeline = Pipeline(
            self.spool,
            [("size", SizeStage(1000))],
            Collator(sets),
            {},
            self.metrics,
            reactor,
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
                reactor,
                self.pool,
                self.pipeline.stored,
            )
            for s in sets
        }
        for b in self.pipeline.bundles.values():
            b.start()
        self.tmp = tmp

    async def stop(self) -> None:
        await self.pipeline.drain()
        await defer.DeferredList([b.stop() for b in self.pipeline.bundles.values()])
        await self.spool.stop()
        self.pool.stop()

    def stored_ids(self, set_name: str) -> list[str]:
        ids = []
        for path in sorted((self.tmp / "bundles" / set_name).glob("*.mbox.gz")):
            for _, msg in read_mbox(str(path)):
                ids.append(msg.split(b"\n", 1)[0].split(b": ")[1].strip().decode())
        return ids


def sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    return value or 0.0


@pytest_twisted.ensureDeferred
async def test_every_spooled_message_is_processed_and_acked(tmp_path: Path) -> None:
    w = World(tmp_path, [SetConfig("all")])
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
    w = World(tmp_path, [SetConfig("all")])
    w.pipeline.start()
    n = 0
    for _ in range(20):
        await defer.gatherResults(
            [w.spool.append(envelope(n + k).to_record(), 1.0) for k in range(2)]
        )
        n += 2
        while w.pipeline._busy or w.spool.depth:
            await deferLater(0.005)
    await w.stop()
    assert sample(w.metrics, "spamtrap_messages_processed_total") == n
    assert sorted(w.stored_ids("all")) == sorted(f"m{i}" for i in range(n))


@pytest_twisted.ensureDeferred
async def test_discarded_and_unrouted_messages_are_acked(tmp_path: Path) -> None:
    import re

    private = SetConfig("private", match=[Condition(re.compile("@private"), meta="rcpt")])
    w = World(tmp_path, [private])
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
    w = World(tmp_path, [SetConfig("a"), SetConfig("b")])
    w.pipeline.start()
    await w.spool.append(envelope(1).to_record(), 1.0)
    while w.pipeline._busy or w.spool.depth:
        await deferLater(0.01)
    assert w.spool.in_flight == 1
    w.pipeline.bundles["a"].rotate()
    while not list((tmp_path / "bundles" / "a").glob("*.json")):
        await deferLater(0.01)
    assert w.spool.in_flight == 1  # still held by the open bundle of set b
    w.pipeline.bundles["b"].rotate()
    while w.spool.in_flight:
        await deferLater(0.01)
    await w.stop()
    assert w.stored_ids("a") == w.stored_ids("b") == ["m1"]


@pytest_twisted.ensureDeferred
async def test_messages_a_bundle_could_not_take_stay_spooled(tmp_path: Path) -> None:
    w = World(tmp_path, [SetConfig("all")])
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
    while w.pipeline._busy or w.spool.depth:
        await deferLater(0.01)
    assert sample(w.metrics, "spamtrap_processing_errors_total") == 3
    assert sample(w.metrics, "spamtrap_messages_processed_total") == 3
    bundles.rotate()
    for _ in range(500):  # the store and the acks take a few reactor turns
        if w.spool.in_flight == 3:
            break
        await deferLater(0.01)
    await w.stop()
    # Stored and acked: the even ones; still in the spool: the odd ones.
    assert sorted(w.stored_ids("all")) == ["m0", "m2", "m4"]
    assert w.spool.in_flight == 3


def deferLater(seconds: float) -> Any:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)
