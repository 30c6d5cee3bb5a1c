"""The bundle lifecycle as a state machine: the moves, the gauges, the threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from spamtrap.bundle.file import BundleFile
from spamtrap.bundle.sets import BundleWriteError
from spamtrap.bundle.state import (
    LEGAL_MOVES,
    LIVE,
    BundleState,
    IllegalMoveError,
    Lifecycle,
)
from spamtrap.config import SetConfig, StoreConfig
from spamtrap.metrics import Metrics
from tests.support.bundles import ControlledStore, Harness, fill_the_disk, fired
from tests.support.pipeline_world import World, envelope
from tests.support.threaded_clock import ThreadedClock

S = BundleState


class Item:
    def __init__(self, key: str = "all/k.mbox.gz") -> None:
        self.key = key
        self.state = S.OPEN


def state_metric(metrics: Metrics, state: BundleState, set_name: str = "all") -> float | None:
    return metrics.registry.get_sample_value(
        "spamtrap_bundles_state", {"set": set_name, "state": state.value}
    )


def states(h: Harness) -> dict[str, float]:
    """The live-state gauge of the harness's set, zeros left out."""
    out = {}
    for s in LIVE:
        v = state_metric(h.metrics, s)
        if v:
            out[s.name] = v
    return out


def dropped(h: Harness, reason: str) -> float | None:
    return h.metrics.registry.get_sample_value(
        "spamtrap_bundles_dropped_total", {"set": "all", "reason": reason}
    )


# -- the machine alone -----------------------------------------------------------


def all_paths() -> list[list[BundleState]]:
    """Every path from OPEN to a final state, taking RETRY_WAIT at most twice."""
    paths: list[list[BundleState]] = []

    def walk(path: list[BundleState]) -> None:
        last = path[-1]
        if last.terminal:
            paths.append(path)
            return
        for nxt in sorted(LEGAL_MOVES[last], key=lambda s: s.value):
            if path.count(S.RETRY_WAIT) >= 2 and nxt is S.RETRY_WAIT:
                continue
            walk([*path, nxt])

    walk([S.OPEN])
    return paths


def test_the_legal_moves_are_the_documented_ones() -> None:
    assert {(a, b) for a, targets in LEGAL_MOVES.items() for b in targets} == {
        (S.OPEN, S.SEALING),
        (S.OPEN, S.DROPPED),
        (S.SEALING, S.READY),
        (S.SEALING, S.DROPPED),
        (S.READY, S.UPLOADING),
        (S.READY, S.SKIPPED),
        (S.READY, S.DROPPED),
        (S.UPLOADING, S.STORED),
        (S.UPLOADING, S.RETRY_WAIT),
        (S.UPLOADING, S.DROPPED),
        (S.RETRY_WAIT, S.UPLOADING),
        (S.RETRY_WAIT, S.DROPPED),
    }
    # Every final state can be reached, every state leads to one.
    ends = {p[-1] for p in all_paths()}
    assert ends == {S.STORED, S.SKIPPED, S.DROPPED}
    assert {s for p in all_paths() for s in p} == set(BundleState)


@pytest.mark.parametrize("path", all_paths(), ids=lambda p: ">".join(s.name for s in p))
def test_every_legal_path_moves_and_the_gauges_follow(path: list[BundleState]) -> None:
    metrics = Metrics()
    life = Lifecycle(
        "all",
        state_gauge=metrics.bundles_state,
        open_gauge=metrics.bundles_open.labels(set="all"),
        waiting_gauge=metrics.bundles_waiting.labels(set="all"),
    )
    other = Item("all/other.mbox.gz")  # a second bundle stays OPEN throughout
    life.enter(other)
    item = Item()
    life.enter(item)
    for state in path[1:]:
        life.move(item, state)
        assert item.state is state
        for s in LIVE:
            expected = (s is state) + (s is S.OPEN)
            assert state_metric(metrics, s) == expected, (s, state)
            assert life.count(s) == expected
        waiting = metrics.registry.get_sample_value("spamtrap_bundles_waiting", {"set": "all"})
        assert waiting == (state in (S.READY, S.UPLOADING, S.RETRY_WAIT))
        assert metrics.registry.get_sample_value("spamtrap_bundles_open", {"set": "all"}) == 1
        assert life.in_flight == (state in (S.SEALING, S.READY, S.UPLOADING, S.RETRY_WAIT))
    assert item.state.terminal


ILLEGAL = [
    (a, b) for a in BundleState for b in BundleState if b not in LEGAL_MOVES[a] and b is not S.OPEN
]


@pytest.mark.parametrize("source,target", ILLEGAL, ids=lambda s: s.name)
def test_illegal_moves_are_refused_with_the_bundle_named(
    source: BundleState, target: BundleState
) -> None:
    metrics = Metrics()
    life = Lifecycle("all", state_gauge=metrics.bundles_state)
    item = Item("all/2026-11-22T13:31:15.node1.abcdefghijklmnop.mbox.gz")
    life.enter(item)
    # Walk the shortest legal path to ``source``.
    path = next(p for p in all_paths() if source in p)
    for s in path[1 : path.index(source) + 1]:
        life.move(item, s)
    before = {s: state_metric(metrics, s) for s in LIVE}
    with pytest.raises(IllegalMoveError) as info:
        life.move(item, target)
    message = str(info.value)
    assert "set all" in message and item.key in message
    assert f"{source.name} -> {target.name}" in message
    assert (info.value.source, info.value.target) == (source, target)
    assert item.state is source  # nothing changed
    assert {s: state_metric(metrics, s) for s in LIVE} == before


def test_moves_from_many_threads_keep_exact_counts() -> None:
    metrics = Metrics()
    life = Lifecycle("all", state_gauge=metrics.bundles_state)
    per_thread = 300

    def worker() -> None:
        for _ in range(per_thread):
            item = Item()
            life.enter(item)
            life.move(item, S.SEALING)
            life.move(item, S.READY)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert life.count(S.READY) == 6 * per_thread
    assert state_metric(metrics, S.READY) == 6 * per_thread
    assert state_metric(metrics, S.OPEN) == 0 and state_metric(metrics, S.SEALING) == 0


# -- the machine in a bundle set (task.Clock) ----------------------------------


def test_a_stored_bundle_passes_every_state_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ControlledStore()
    h = Harness(tmp_path, store=store, store_config=StoreConfig(retry_initial=2, retry_max=8))
    seen: list[tuple[str, str]] = []
    real_move = h.bundles.lifecycle.move

    def recording_move(bundle: Any, target: BundleState) -> None:
        seen.append((bundle.state.name, target.name))
        real_move(bundle, target)

    monkeypatch.setattr(h.bundles.lifecycle, "move", recording_move)
    h.add(0)
    assert states(h) == {"OPEN": 1}
    h.bundles.rotate()
    assert states(h) == {"UPLOADING": 1}
    store.fail(0)
    assert states(h) == {"RETRY_WAIT": 1}
    h.reactor.advance(2)
    assert states(h) == {"UPLOADING": 1}
    store.succeed(1)
    assert states(h) == {} and h.acked == [[0]]
    assert seen == [
        ("OPEN", "SEALING"),
        ("SEALING", "READY"),
        ("READY", "UPLOADING"),
        ("UPLOADING", "RETRY_WAIT"),
        ("RETRY_WAIT", "UPLOADING"),
        ("UPLOADING", "STORED"),
    ]


def test_skipped_bundles_are_counted_and_leave_no_state(tmp_path: Path) -> None:
    store = ControlledStore()
    h = Harness(tmp_path, store=store)
    h.add(0)
    h.bundles.rotate()
    h.add(1)
    h.bundles.rotate()  # finds the one slot busy: skipped
    assert states(h) == {"UPLOADING": 1}
    assert h.acked == [[1]]
    store.succeed(0)
    assert states(h) == {}


def test_queued_bundles_are_ready_until_a_slot_frees(tmp_path: Path) -> None:
    store = ControlledStore()
    h = Harness(tmp_path, store=store, set_options={"upload_policy": "queue"})
    for token in range(3):
        h.add(token)
        h.bundles.rotate()
    assert states(h) == {"UPLOADING": 1, "READY": 2}
    assert h.metric("spamtrap_bundles_waiting") == 3
    store.succeed(0)
    assert states(h) == {"UPLOADING": 1, "READY": 1}


def test_a_write_error_drops_the_open_bundle_and_chains_the_cause(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.add(0)
    fill_the_disk(h)
    with pytest.raises(BundleWriteError) as info:
        h.add(1, os.urandom(200_000) + b"\n")
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == 28
    assert "set all" in str(info.value) and info.value.key.startswith("all/")
    assert info.value.tokens == [1]
    assert states(h) == {} and dropped(h, "write-error") == 1


def test_a_seal_error_drops_the_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_seal(self: Any) -> None:
        self.file.close()
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(BundleFile, "seal", failing_seal)
    h = Harness(tmp_path)
    h.add(0)
    h.bundles.rotate()
    assert states(h) == {} and dropped(h, "seal-error") == 1 and h.acked == []


def test_a_cancelled_stop_drops_retrying_and_ready_bundles(tmp_path: Path) -> None:
    store = ControlledStore()
    h = Harness(tmp_path, store=store, set_options={"upload_policy": "queue"})
    h.add(0)
    h.bundles.rotate()
    store.fail(0)
    h.add(1)
    h.bundles.rotate()
    assert states(h) == {"RETRY_WAIT": 1, "READY": 1}
    d = h.bundles.stop()
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    d.cancel()
    assert states(h) == {} and dropped(h, "abandoned") == 2
    assert h.metric("spamtrap_bundles_waiting") == 0


def test_a_bundle_sealed_twice_is_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.add(0)
    bundle = h.bundles.writer.shards[0]
    h.bundles.rotate()
    assert bundle is not None and bundle.state is S.STORED
    with pytest.raises(IllegalMoveError, match=r"STORED -> READY"):
        h.bundles.uploader.sealed(bundle)
    assert h.acked == [[0]]  # acknowledged once


class QueuedPool:
    """A pool that runs its tasks when the test says, recording the thread
    each was handed over from."""

    def __init__(self) -> None:
        self.tasks: list[tuple[Any, Any, tuple[Any, ...]]] = []

    def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any) -> None:
        self.tasks.append((on_result, f, a))

    def run(self) -> None:
        while self.tasks:
            on_result, f, a = self.tasks.pop(0)
            on_result(True, f(*a))


def test_sealing_runs_in_the_set_pool_not_the_filter_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(tmp_path, max_messages=2)
    pool = QueuedPool()
    h.bundles.writer._pool = pool  # type: ignore[assignment]
    sealed_in: list[str] = []
    real_seal = BundleFile.seal

    def seal(self: BundleFile) -> None:
        sealed_in.append(threading.current_thread().name)
        real_seal(self)

    monkeypatch.setattr(BundleFile, "seal", seal)

    def filter_thread() -> None:
        h.add(0)
        h.add(1)  # the bundle is full now: it must not be sealed here

    t = threading.Thread(target=filter_thread, name="filter-1")
    t.start()
    t.join()
    assert sealed_in == [] and len(pool.tasks) == 1
    assert states(h) == {"SEALING": 1}
    assert h.metric("spamtrap_bundles_open") == 0
    pool.run()
    h.reactor.drain()
    assert sealed_in == [threading.current_thread().name]
    assert h.acked == [[0, 1]] and states(h) == {}


def test_stop_waits_for_a_bundle_still_sealing(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_messages=1)
    pool = QueuedPool()
    h.bundles.writer._pool = pool  # type: ignore[assignment]
    h.add(0)
    d = h.bundles.stop()
    assert not fired(d) and states(h) == {"SEALING": 1}
    pool.run()
    assert fired(d) and h.acked == [[0]]


# -- errors logged once ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_failed_bundle_write_is_logged_once_with_its_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[dict[str, Any]] = []

    def capture(event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical):
            events.append(event)

    def full_disk(self: BundleFile, items: Any) -> None:
        raise OSError(28, "No space left on device")

    w = World(tmp_path, [SetConfig("all")], clock=ThreadedClock())
    monkeypatch.setattr(BundleFile, "write_many", full_disk)
    globalLogPublisher.addObserver(capture)  # type: ignore[arg-type]
    try:
        w.pipeline.start()
        envs = [envelope(i) for i in range(3)]
        await defer.gatherResults([w.spool.append(e.to_record(), 1.0) for e in envs])
        await w.idle()
        await w.stop()
    finally:
        globalLogPublisher.removeObserver(capture)  # type: ignore[arg-type]
    drops = w.metrics.registry.get_sample_value(
        "spamtrap_bundles_dropped_total", {"set": "all", "reason": "write-error"}
    )
    assert drops is not None and drops >= 1
    texts = [formatEvent(e) for e in events]
    assert len(texts) == drops, texts  # one line per failure, none from the pipeline
    for text in texts:
        assert "set all: dropped bundle all/" in text and "No space left" in text
        assert "spool keys (" in text
    assert w.spool.in_flight == 3  # nothing acked
