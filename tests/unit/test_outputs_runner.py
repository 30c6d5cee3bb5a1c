"""An output's queue and runner: sends, retries, rate, bounds, stop, health.

The queue is the real segment log (its writer thread hands results back
through the real reactor); every timer runs on a ThreadedClock, so no test
waits out a backoff or a rate limit.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.defer import Deferred

from spamtrap.config import SpoolConfig
from spamtrap.config.schema import OutputConfig
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.outputs.base import OutputItem, PermanentFailure, TemporaryFailure
from spamtrap.outputs.queue import OutputQueue, decode_item, encode_item
from spamtrap.outputs.runner import (
    FAILING_AFTER,
    STOP_GRACE,
    OutputRunner,
    TokenBucket,
    backoff,
)
from spamtrap.work.spool import SpoolEntry
from tests.support.threaded_clock import ThreadedClock

INTAKE = SpoolConfig(commit_interval=0.0, fsync=False)


def envelope(i: int) -> Envelope:
    return Envelope(
        msg_id=f"id{i}",
        received_at=1000.0 + i,
        mail_from="a@b.example",
        rcpts=["v@trap.example"],
        data=b"Subject: %d\r\n\r\nbody\r\n" % i,
        meta={"id": [f"id{i}"]},
    )


def settings(**changes: Any) -> OutputConfig:
    base = OutputConfig(name="out", type="test", sets=["all"], retry_initial=5.0)
    return dataclasses.replace(base, **changes)


class NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return 1.0


class FakeOutput:
    """Each send waits for the test: ``answer(i, result)`` ends call ``i``."""

    name = "out"

    def __init__(self) -> None:
        self.calls: list[tuple[OutputItem, Deferred[object]]] = []
        self.closed = 0

    def send(self, item: OutputItem) -> Deferred[object]:
        d: Deferred[object] = Deferred()
        self.calls.append((item, d))
        return d

    def answer(self, i: int, result: object = None) -> None:
        d = self.calls[i][1]
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(result)

    @property
    def open_calls(self) -> list[int]:
        return [i for i, (_, d) in enumerate(self.calls) if not d.called]

    def describe(self) -> str:
        return "fake"

    def close(self) -> None:
        self.closed += 1


class World:
    def __init__(self, tmp: Path, cfg: OutputConfig, output: Any = None) -> None:
        self.tmp = tmp
        self.cfg = cfg
        self.clock = ThreadedClock()
        self.clock.advance(100_000)  # entries are stamped with the clock's time
        self.metrics = Metrics()
        self.output = output or FakeOutput()
        self.queue, self.runner = self._make()

    def _make(self) -> tuple[OutputQueue, OutputRunner]:
        queue = OutputQueue(
            "out",
            str(self.tmp / "q"),
            self.cfg,
            INTAKE,
            self.metrics,
            self.clock,
            self.clock,
            commit_interval=0.0,
        )

        def read(entry: SpoolEntry) -> Deferred[bytes]:
            return defer.succeed(entry.read())

        runner = OutputRunner(
            self.output, self.cfg, queue, self.metrics, self.clock, read, rng=NoJitter()
        )
        return queue, runner

    def start(self) -> None:
        self.queue.start()
        self.runner.start()

    async def add(self, *ids: int) -> None:
        for i in ids:
            await self.clock.run(self.queue.append(encode_item("all", envelope(i))), "an append")

    async def settle(self, done: Any, what: str) -> None:
        await self.clock.settle(done, what)

    async def calls(self, n: int) -> None:
        await self.settle(lambda: len(self.output.calls) >= n, f"{n} sends")

    async def stop(self) -> None:
        stopping = self.runner.stop()
        self.clock.advance(STOP_GRACE)  # for sends still in flight
        await self.clock.run(stopping, "the runner to stop")
        await self.clock.run(self.queue.stop(), "the queue to stop")

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, {"output": "out", **labels})
        return value or 0.0


@pytest.fixture
def worlds() -> Any:
    made: list[World] = []

    def make(tmp: Path, cfg: OutputConfig | None = None, output: Any = None) -> World:
        w = World(tmp, cfg or settings(), output)
        made.append(w)
        return w

    yield make
    for w in made:
        if w.runner.running:
            w.runner.running = False
        pytest_twisted.blockon(w.queue.stop())


def test_records_keep_the_set_and_the_envelope() -> None:
    env = envelope(1)
    set_name, back = decode_item(encode_item("private.x", env))
    assert set_name == "private.x"
    assert back.to_record() == env.to_record()
    with pytest.raises(ValueError):
        decode_item(env.to_record())


def test_backoff_doubles_up_to_retry_max_with_jitter() -> None:
    cfg = settings(retry_initial=2.0, retry_max=30.0)
    assert [backoff(cfg, n, NoJitter()) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    rng = random.Random(7)
    waits = [backoff(cfg, 3, rng) for _ in range(200)]
    assert min(waits) >= 8 * 0.8 and max(waits) <= 8 * 1.2
    assert max(waits) - min(waits) > 2  # spread, not one value
    assert backoff(cfg, 10_000, NoJitter()) == 30  # no overflow


def test_token_bucket_holds_a_second_and_releases_in_order() -> None:
    from twisted.internet.task import Clock

    clock = Clock()
    bucket = TokenBucket(2.0, clock)
    got = [bucket.take() for _ in range(5)]
    assert [d.called for d in got] == [True, True, False, False, False]
    clock.advance(0.5)
    assert [d.called for d in got] == [True, True, True, False, False]
    got[3].cancel()  # a withdrawn request takes no token
    clock.advance(0.5)
    assert got[4].called
    clock.advance(10)  # a quiet spell fills it only to its capacity
    assert sum(bucket.take().called for _ in range(5)) == 2
    slow = TokenBucket(0.2, clock)  # below 1/s: still one at a time
    assert slow.take().called and not slow.take().called
    assert all(TokenBucket(0, clock).take().called for _ in range(100))  # unlimited


@pytest_twisted.ensureDeferred
async def test_a_sent_entry_is_acked_and_counted(tmp_path: Path, worlds: Any) -> None:
    w = worlds(tmp_path)
    w.start()
    await w.add(1)
    await w.calls(1)
    item = w.output.calls[0][0]
    assert (item.id, item.set_name, item.attempt) == ("id1", "all", 1)
    assert item.envelope.data == envelope(1).data
    assert w.runner.depth == 1
    w.output.answer(0)
    assert w.sample("spamtrap_output_sent_total") == 1
    assert w.runner.depth == 0 and w.queue.remaining == 0
    await w.stop()


@pytest_twisted.ensureDeferred
async def test_a_permanent_failure_is_counted_and_dropped(tmp_path: Path, worlds: Any) -> None:
    w = worlds(tmp_path)
    w.start()
    await w.add(1, 2)
    await w.calls(2)
    w.output.answer(0, PermanentFailure("5xx", "550 no thanks"))
    w.output.answer(1)
    assert w.sample("spamtrap_output_failed_total", reason="5xx") == 1
    assert w.sample("spamtrap_output_dropped_total") == 1
    assert w.sample("spamtrap_output_sent_total") == 1
    w.clock.advance(3600)
    assert len(w.output.calls) == 2  # never tried again
    assert w.queue.remaining == 0
    await w.stop()


@pytest_twisted.ensureDeferred
async def test_temporary_failures_are_retried_with_backoff(tmp_path: Path, worlds: Any) -> None:
    w = worlds(tmp_path, settings(concurrency=1))
    w.start()
    await w.add(1)
    await w.calls(1)
    w.output.answer(0, TemporaryFailure("refused", "connection refused"))
    w.clock.advance(4.9)
    assert len(w.output.calls) == 1
    w.clock.advance(0.1)  # retry_initial
    assert [c[0].attempt for c in w.output.calls] == [1, 2]
    w.output.answer(1, ValueError("garbage from the far end"))  # not a crash: retried
    w.clock.advance(9.9)
    assert len(w.output.calls) == 2
    w.clock.advance(0.1)  # doubled
    assert len(w.output.calls) == 3
    assert {c[0].id for c in w.output.calls} == {"id1"}
    w.output.answer(2)
    assert w.sample("spamtrap_output_failed_total", reason="refused") == 1
    assert w.sample("spamtrap_output_failed_total", reason="error") == 1
    assert w.sample("spamtrap_output_sent_total") == 1
    assert w.queue.remaining == 0
    await w.stop()


@pytest_twisted.ensureDeferred
async def test_an_entry_still_failing_at_max_age_is_shed(tmp_path: Path, worlds: Any) -> None:
    w = worlds(tmp_path, settings(max_age=25.0, retry_initial=10.0))
    w.start()
    await w.add(1)
    await w.calls(1)
    w.output.answer(0, TemporaryFailure("timeout"))
    w.clock.advance(10)
    w.output.answer(1, TemporaryFailure("timeout"))  # the next try would come at 30 s
    assert w.sample("spamtrap_output_shed_total") == 1
    assert w.queue.remaining == 0
    w.clock.advance(100)
    assert len(w.output.calls) == 2
    await w.stop()


@pytest_twisted.ensureDeferred
async def test_rate_limits_tries_per_second(tmp_path: Path, worlds: Any) -> None:
    w = worlds(tmp_path, settings(rate=2.0, concurrency=10))
    w.start()
    await w.add(*range(6))
    await w.calls(2)
    sent_at = collections.Counter[int]()
    for _ in range(6):
        for i in w.output.open_calls:
            w.output.answer(i)
        sent_at[int(w.clock.seconds() - 100_000)] = len(w.output.calls)
        w.clock.advance(0.5)
    # Two at once (the bucket's second), then one every half second.
    assert [sent_at[t] for t in (0, 1, 2)] == [3, 5, 6]
    assert w.sample("spamtrap_output_sent_total") == 6
    await w.stop()


@pytest_twisted.ensureDeferred
async def test_concurrency_bounds_sends_in_flight(tmp_path: Path, worlds: Any) -> None:
    w = worlds(tmp_path, settings(concurrency=2))
    w.start()
    await w.add(*range(5))
    await w.calls(2)
    w.clock.advance(60)
    assert len(w.output.calls) == 2
    assert w.runner.depth == 5
    assert w.sample("spamtrap_output_queue_depth") == 5
    w.output.answer(0)
    await w.calls(3)
    assert w.output.open_calls == [1, 2]
    await w.stop()


@pytest_twisted.ensureDeferred
async def test_a_full_queue_sheds_its_oldest(tmp_path: Path, worlds: Any) -> None:
    w = worlds(tmp_path, settings(max_messages=3, concurrency=1))
    w.start()
    await w.add(0)
    await w.calls(1)  # a blackholed send holds id0
    await w.add(*range(1, 7))
    assert w.sample("spamtrap_output_shed_total") == 3
    assert w.runner.depth == 4  # in flight + the 3 newest
    w.output.answer(0)
    for n in range(2, 5):
        await w.calls(n)
        w.output.answer(n - 1)
    assert [c[0].id for c in w.output.calls] == ["id0", "id4", "id5", "id6"]
    await w.stop()


@pytest_twisted.ensureDeferred
async def test_oldest_age_and_health(tmp_path: Path, worlds: Any) -> None:
    w = worlds(tmp_path, settings(concurrency=1))
    w.start()
    assert w.runner.failing() is None
    assert w.sample("spamtrap_output_oldest_age_seconds") == 0
    await w.add(1, 2)
    await w.calls(1)
    w.clock.advance(60)
    assert w.sample("spamtrap_output_oldest_age_seconds") == pytest.approx(60)
    for n in range(FAILING_AFTER):
        w.output.answer(n, TemporaryFailure("refused", "connection refused"))
        if n < FAILING_AFTER - 1:
            assert w.runner.failing() is None
            w.clock.advance(5.0 * 2**n)
    assert w.runner.failing() == "last 3 sends failed (refused: connection refused)"
    w.clock.advance(20)
    w.output.answer(3)  # success clears it
    assert w.runner.failing() is None
    await w.calls(5)  # id2, waiting since the start
    w.clock.advance(900)
    assert w.runner.failing() is not None and "behind" in w.runner.failing()  # type: ignore[operator]
    w.output.answer(4)
    assert w.runner.failing() is None
    await w.stop()


@pytest_twisted.ensureDeferred
async def test_an_unreadable_record_is_dropped(tmp_path: Path, worlds: Any) -> None:
    w = worlds(tmp_path)
    w.start()
    await w.clock.run(w.queue.append(b"not a record"), "an append")
    await w.add(1)
    await w.calls(1)
    assert w.output.calls[0][0].id == "id1"
    assert w.sample("spamtrap_output_failed_total", reason="unreadable") == 1
    assert w.sample("spamtrap_output_dropped_total") == 1
    await w.stop()


@pytest_twisted.ensureDeferred
async def test_a_record_that_fails_its_crc_is_dropped(tmp_path: Path, worlds: Any) -> None:
    w = worlds(tmp_path)
    w.queue.start()
    await w.add(1, 2)
    (segment,) = (tmp_path / "q").glob("seg-*.log")
    data = bytearray(segment.read_bytes())
    data[40] ^= 0xFF  # inside the first record's payload
    segment.write_bytes(bytes(data))
    w.runner.start()
    await w.calls(1)
    assert w.output.calls[0][0].id == "id2"
    assert w.sample("spamtrap_output_failed_total", reason="unreadable") == 1
    w.output.answer(0)
    assert w.queue.remaining == 0
    await w.stop()


@pytest_twisted.ensureDeferred
async def test_stop_gives_a_grace_then_keeps_the_unsent_queued(tmp_path: Path, worlds: Any) -> None:
    w = worlds(tmp_path, settings(concurrency=2))
    w.start()
    await w.add(1, 2, 3)
    await w.calls(2)
    w.output.answer(0, TemporaryFailure("refused"))  # id1 waits for its retry
    stopping = w.runner.stop()
    w.clock.advance(1)
    assert not stopping.called  # id2's send has its grace
    w.output.answer(1)  # finishes inside it
    await w.clock.run(stopping, "the runner to stop")
    assert w.output.closed == 1
    assert w.sample("spamtrap_output_sent_total") == 1
    await w.clock.run(w.queue.stop(), "the queue to stop")

    # The next start sends what was left, once each, with the same ids.
    w.output = FakeOutput()
    w.queue, w.runner = w._make()
    w.start()
    assert w.sample("spamtrap_output_queue_recovered_total") == 2
    await w.calls(2)
    assert sorted(c[0].id for c in w.output.calls) == ["id1", "id3"]
    assert {c[0].attempt for c in w.output.calls} == {1}
    w.output.answer(0)
    w.output.answer(1)
    await w.stop()


@pytest_twisted.ensureDeferred
async def test_stop_cancels_a_send_that_outlasts_the_grace(tmp_path: Path, worlds: Any) -> None:
    w = worlds(tmp_path)
    w.start()
    await w.add(1)
    await w.calls(1)
    stopping = w.runner.stop()
    w.clock.advance(10)  # the grace
    await w.clock.run(stopping, "the runner to stop")
    assert w.output.closed == 1
    assert w.output.calls[0][1].called  # cancelled
    assert w.sample("spamtrap_output_failed_total", reason="error") == 0  # not a failure
    assert w.queue.remaining == 1  # still queued for the next start
    await w.clock.run(w.queue.stop(), "the queue to stop")
