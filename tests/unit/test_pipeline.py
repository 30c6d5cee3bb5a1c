"""The worker pipeline in-process: real spool, real bundles, real thread pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer

from spamtrap.config import Condition, SetConfig
from tests.support.pipeline_world import World, envelope, sample
from tests.support.threaded_clock import ThreadedClock


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

    def lose_odd_ones(items: list[tuple[Any, ...]]) -> list[Any]:
        real_add_many([item for item in items if not odd(item[0])])
        return [item[2] for item in items if odd(item[0])]  # (entry, time, token, fields)

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
