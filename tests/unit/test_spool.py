"""Tests for the durable spool: group commit, FIFO, shedding, acks, recovery."""

from __future__ import annotations

import errno
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from spamtrap.metrics import Metrics
from spamtrap.work import spool as spool_module
from spamtrap.work import spool_writer
from spamtrap.work.spool import Spool, SpoolEntry, SpoolError, read_entries
from spamtrap.work.spool_records import HEADER
from tests.support.spool import ThreadCalls, config, recover
from tests.support.spool import make_spool as make_spool  # the fixture


def segment_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "lock")


def die(spool: Spool) -> None:
    """What a killed process leaves: its lock released, nothing else done."""
    assert spool._lock_fd is not None
    os.close(spool._lock_fd)
    spool._lock_fd = None


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def shed_count(metrics: Metrics, reason: str) -> float:
    return sample(metrics, "spamtrap_spool_shed_total", reason=reason)


def name(entry: SpoolEntry) -> str:
    return os.path.basename(entry.path)


# -- append, get, read ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_round_trip_keeps_bytes_exactly(tmp_path: Path, make_spool: Any) -> None:
    spool = make_spool(tmp_path)
    payloads = [b"", bytes(range(256)), b"From x\r\n\r\n.\n\x00\xff" * 5000]
    appended = []
    for i, payload in enumerate(payloads):
        appended.append(await spool.append(payload, 1700000000.123 + i))
    assert spool.depth == 3
    assert spool.backlog_bytes == sum(len(p) for p in payloads)
    for i, payload in enumerate(payloads):
        entry = await spool.get()
        assert entry.key == appended[i].key
        assert entry.size == len(payload)
        assert entry.received_at == pytest.approx(1700000000.123 + i, abs=0.001)
        assert entry.read() == payload
    assert spool.depth == 0
    assert spool.in_flight == 3


@pytest_twisted.ensureDeferred
async def test_read_entries_reads_a_batch_and_reports_bad_records_alone(
    tmp_path: Path, make_spool: Any
) -> None:
    # Records of 20 + 40 bytes, two to a segment: runs break at segment ends.
    spool = make_spool(tmp_path, config(segment_bytes=120))
    payloads = [b"%02d" % i * 20 for i in range(7)]
    entries = [await spool.append(p, 1.0) for p in payloads]
    assert len({e.seq for e in entries}) == 4
    order = [3, 4, 5, 0, 1, 6, 2]  # out of order, and not back to back
    assert read_entries([entries[i] for i in order]) == [payloads[i] for i in order]

    # A flipped payload byte fails that record's CRC and no other.
    with open(entries[2].path, "r+b") as f:
        f.seek(entries[2].offset + HEADER.size)
        f.write(b"X")
    os.unlink(entries[5].path)  # entries 4 and 5 lose their segment
    got = read_entries(entries)
    assert [g for i, g in enumerate(got) if i not in (2, 4, 5)] == [
        payloads[i] for i in (0, 1, 3, 6)
    ]
    assert isinstance(got[2], SpoolError) and "CRC" in str(got[2])
    assert isinstance(got[4], SpoolError) and isinstance(got[5], SpoolError)
    with pytest.raises(SpoolError, match="CRC"):
        entries[2].read()


@pytest_twisted.ensureDeferred
async def test_concurrent_appends_share_fsyncs(
    tmp_path: Path, make_spool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = []
    real_fdatasync = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        syncs.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(spool_module.os, "fdatasync", counting_fdatasync)
    metrics = Metrics()
    # A short gathering window, so the batch does not depend on how fast this
    # loop runs compared to the writer thread.
    spool = make_spool(tmp_path, config(commit_interval=0.05), metrics)
    n = 100
    entries = await defer.gatherResults([spool.append(b"msg %d" % i, 1.0) for i in range(n)])
    commits = sample(metrics, "spamtrap_spool_commits_total")
    assert 1 <= commits < n / 4
    assert len(syncs) == commits  # one fdatasync per group commit
    assert len({e.key for e in entries}) == n
    assert spool.depth == n


@pytest_twisted.ensureDeferred
async def test_no_fsync_when_disabled(
    tmp_path: Path, make_spool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[int] = []
    monkeypatch.setattr(spool_module.os, "fdatasync", syncs.append)
    monkeypatch.setattr(spool_module.os, "fsync", syncs.append)
    spool = make_spool(tmp_path, config(fsync=False))
    entry = await spool.append(b"x", 1.0)
    assert entry.read() == b"x"
    assert syncs == []


@pytest_twisted.ensureDeferred
async def test_fifo_order_and_several_waiters(tmp_path: Path, make_spool: Any) -> None:
    spool = make_spool(tmp_path)
    waiters = [spool.get() for _ in range(3)]
    assert not any(w.called for w in waiters)
    await defer.gatherResults([spool.append(b"%d" % i, 1.0) for i in range(10)])
    got = [(await w) for w in waiters]
    got += [(await spool.get()) for _ in range(7)]
    assert [e.read() for e in got] == [b"%d" % i for i in range(10)]
    assert len({e.key for e in got}) == 10
    assert spool.in_flight == 10


# -- shedding -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_shed_oldest_by_count(tmp_path: Path, make_spool: Any) -> None:
    metrics = Metrics()
    spool = make_spool(tmp_path, config(max_messages=3), metrics)
    await spool.append(b"first", 1.0)
    in_flight = await spool.get()
    for i in range(5):
        await spool.append(b"m%d" % i, 1.0)
    # Backlog bounded at 3, oldest shed; the in-flight entry is not counted.
    assert spool.depth == 3
    assert shed_count(metrics, "full") == 2
    assert sample(metrics, "spamtrap_spool_depth") == 3
    assert [(await spool.get()).read() for _ in range(3)] == [b"m2", b"m3", b"m4"]
    assert in_flight.read() == b"first"
    assert spool.in_flight == 4


@pytest_twisted.ensureDeferred
async def test_shed_oldest_by_bytes(tmp_path: Path, make_spool: Any) -> None:
    metrics = Metrics()
    spool = make_spool(tmp_path, config(max_bytes=250), metrics)
    for i in range(4):
        await spool.append(bytes([i]) * 100, 1.0)
    assert spool.depth == 2
    assert spool.backlog_bytes == 200
    assert sample(metrics, "spamtrap_spool_bytes") == 200
    assert shed_count(metrics, "full") == 2
    assert [(await spool.get()).read()[:1] for _ in range(2)] == [b"\x02", b"\x03"]


@pytest_twisted.ensureDeferred
async def test_shed_by_age_with_clock(tmp_path: Path, make_spool: Any) -> None:
    metrics = Metrics()
    clock = Clock()
    clock.advance(1000)
    spool = make_spool(tmp_path, config(max_age=60.0), metrics, clock)
    a = await spool.append(b"a", 1000.0)
    await spool.append(b"b", 1000.0)
    await spool.append(b"c", 1030.0)
    got = await spool.get()
    assert got.key == a.key  # a is in flight now
    clock.advance(59)  # the 1 s check runs; nothing is over 60 s old yet
    assert spool.depth == 2
    assert shed_count(metrics, "age") == 0
    clock.advance(2)
    assert spool.depth == 1  # b shed; a in flight is kept
    assert shed_count(metrics, "age") == 1
    assert (await spool.get()).read() == b"c"
    clock.advance(30)
    assert shed_count(metrics, "age") == 1  # c is in flight: never shed
    assert got.read() == b"a"


# -- acks and segments ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ack_deletes_finished_segments(tmp_path: Path, make_spool: Any) -> None:
    # One 80-byte record per segment.
    spool = make_spool(tmp_path, config(segment_bytes=100))
    r1, r2, r3 = [(await spool.append(b"%d" % i * 60, 1.0)) for i in (1, 2, 3)]
    assert segment_files(tmp_path) == [name(r1), name(r2), name(r3)]
    spool.ack(await spool.get())  # r1
    # The append after the ack is the sync point: deletes are done first.
    r4 = await spool.append(b"4" * 60, 1.0)
    assert segment_files(tmp_path) == [name(r2), name(r3), name(r4)]
    e2 = await spool.get()
    e3 = await spool.get()
    spool.ack(e3)
    r5 = await spool.append(b"5" * 60, 1.0)
    # r3's segment is done; r2 is still in flight, r4 and r5 unprocessed.
    assert segment_files(tmp_path) == [name(r2), name(r4), name(r5)]
    spool.ack(e2)
    spool.ack(await spool.get())  # r4
    e5 = await spool.get()
    spool.ack(e5)
    await spool.stop()
    # Everything acked: even the last segment goes once it is sealed at stop.
    assert segment_files(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_ack_keys_acks_queued_and_handed_out_entries(tmp_path: Path, make_spool: Any) -> None:
    spool = make_spool(tmp_path)
    a, b, c = [await spool.append(p, 1.0) for p in (b"a", b"b", b"c")]
    handed = await spool.get()
    assert handed.key == a.key
    spool.ack_keys([a.key, c.key, (999, 0), c.key])  # c never handed out; 999 unknown
    assert spool.in_flight == 0 and spool.depth == 1
    assert (await spool.get()).read() == b"b"
    await spool.stop()
    _, recovered = recover(tmp_path)
    assert [e.key for e in recovered] == [b.key]


@pytest_twisted.ensureDeferred
async def test_ack_is_idempotent(tmp_path: Path, make_spool: Any) -> None:
    spool = make_spool(tmp_path)
    await spool.append(b"a", 1.0)
    await spool.append(b"b", 1.0)
    entry = await spool.get()
    spool.ack(entry)
    spool.ack(entry)
    assert spool.in_flight == 0
    assert spool.depth == 1  # the second ack did not take b with it


# -- recovery -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_recovery_after_crash(tmp_path: Path, make_spool: Any) -> None:
    first = make_spool(tmp_path)
    for i in range(5):
        await first.append(b"m%d" % i, 100.0 + i)
    acked = await first.get()
    handed_out = await first.get()  # in flight, never acked
    first.ack(acked)
    await first.append(b"m5", 105.0)  # the ack reaches the file before this fires
    old_segments = segment_files(tmp_path)
    old_sizes = {n: (tmp_path / n).stat().st_size for n in old_segments}

    # No stop(): a second spool on the same directory is the restart.
    die(first)
    metrics = Metrics()
    second = make_spool(tmp_path, metrics=metrics)
    assert second.depth == 5
    assert sample(metrics, "spamtrap_spool_recovered_total") == 5
    assert sample(metrics, "spamtrap_spool_depth") == 5
    got = [(await second.get()) for _ in range(5)]
    assert [e.read() for e in got] == [b"m1", b"m2", b"m3", b"m4", b"m5"]
    assert got[0].key == handed_out.key
    assert [e.received_at for e in got] == [101.0, 102.0, 103.0, 104.0, 105.0]
    # Appends after recovery go to a new segment; the old ones are untouched.
    new = await second.append(b"new", 106.0)
    assert name(new) not in old_segments
    assert {n: (tmp_path / n).stat().st_size for n in old_segments} == old_sizes


@pytest_twisted.ensureDeferred
async def test_recovery_after_clean_stop_and_fully_acked_cleanup(
    tmp_path: Path, make_spool: Any
) -> None:
    first = make_spool(tmp_path, config(segment_bytes=100))
    pending = [first.append(b"%d" % i * 60, 1.0) for i in range(4)]
    await first.stop()  # commits the pending appends
    entries = await defer.gatherResults(pending)
    assert len(segment_files(tmp_path)) == 4
    second = make_spool(tmp_path, config(segment_bytes=100))
    spool_entries = [(await second.get()) for _ in range(4)]
    assert [e.key for e in spool_entries] == [e.key for e in entries]
    for e in spool_entries[:3]:
        second.ack(e)
    await second.stop()
    third = make_spool(tmp_path, config(segment_bytes=100))
    assert third.depth == 1
    assert segment_files(tmp_path) == [name(entries[3])]


def write_records(directory: Path, payloads: list[bytes]) -> None:
    reactor = ThreadCalls()
    spool = Spool(str(directory), config(fsync=False), Metrics(), reactor, Clock())
    spool.start()
    reactor.wait(defer.gatherResults([spool.append(p, 1.0) for p in payloads]))
    reactor.wait(spool.stop())


# Three records of 120 bytes each: the third starts at 240 and ends at 360.
@pytest.mark.parametrize(
    ("keep", "extra", "survivors"),
    [
        pytest.param(300, b"", 2, id="truncated-payload"),
        pytest.param(247, b"", 2, id="truncated-header"),
        pytest.param(360, b"\0" * 4096, 3, id="zero-filled-tail"),
        pytest.param(360, HEADER.pack(b"SPR1", 0xFFFFFFF0, 1, 0) + b"junk", 3, id="huge-length"),
        pytest.param(360, HEADER.pack(b"SPR1", 4, 1, 0) + b"junk", 3, id="bad-crc-tail"),
    ],
)
def test_torn_tail_is_ignored(tmp_path: Path, keep: int, extra: bytes, survivors: int) -> None:
    payloads = [b"a" * 100, b"b" * 100, b"c" * 100]
    write_records(tmp_path, payloads)
    (segment,) = tmp_path.glob("seg-*.log")
    assert segment.stat().st_size == 360
    with open(segment, "r+b") as f:
        f.truncate(keep)
        f.seek(keep)
        f.write(extra)
    _, entries = recover(tmp_path)
    assert [e.read() for e in entries] == payloads[:survivors]


def test_corrupt_crc_ends_scan_and_read_detects_it(tmp_path: Path) -> None:
    write_records(tmp_path, [b"a" * 100, b"b" * 100, b"c" * 100])
    reactor = ThreadCalls()
    spool = Spool(str(tmp_path), config(fsync=False), Metrics(), reactor, Clock())
    spool.start()
    entries = [reactor.wait(spool.get()) for _ in range(3)]
    reactor.wait(spool.stop())
    # Flip one payload byte of the second record.
    with open(entries[1].path, "r+b") as f:
        f.seek(entries[1].offset + HEADER.size + 10)
        f.write(b"X")
    assert entries[0].read() == b"a" * 100
    with pytest.raises(SpoolError, match="CRC"):
        entries[1].read()
    _, recovered = recover(tmp_path)
    assert [e.read() for e in recovered] == [b"a" * 100]


def test_read_of_missing_segment_is_spool_error(tmp_path: Path) -> None:
    entry = SpoolEntry(1, 0, 5, 1.0, str(tmp_path / "seg-0000000000000001.log"))
    with pytest.raises(SpoolError):
        entry.read()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=25),
    segment_bytes=st.sampled_from([64, 600, 1 << 20]),
    data=st.data(),
)
def test_recovery_returns_exactly_the_unacked(
    payloads: list[bytes], segment_bytes: int, data: st.DataObject
) -> None:
    acked = data.draw(st.sets(st.sampled_from(range(len(payloads))))) if payloads else set()
    cfg = config(fsync=False, segment_bytes=segment_bytes)
    with tempfile.TemporaryDirectory() as directory:
        reactor = ThreadCalls()
        first = Spool(directory, cfg, Metrics(), reactor, Clock())
        first.start()
        appends = [first.append(p, 1000.0 + i) for i, p in enumerate(payloads)]
        reactor.wait(defer.gatherResults(appends))
        entries = [reactor.wait(first.get()) for _ in payloads]
        for i in sorted(acked):
            first.ack(entries[i])
        # A marker append is the sync point for the acks. The first spool
        # must let go of the directory before another opens it (the kill -9
        # test covers a real crash).
        reactor.wait(first.append(b"marker", 2000.0))
        reactor.wait(first.stop())

        second = Spool(directory, cfg, Metrics(), reactor, Clock())
        second.start()
        recovered = [reactor.wait(second.get()) for _ in range(second.depth)]
        expected = [(p, 1000.0 + i) for i, p in enumerate(payloads) if i not in acked]
        assert [(e.read(), e.received_at) for e in recovered] == expected + [(b"marker", 2000.0)]
        reactor.wait(second.stop())


# -- errors and stopping --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_write_error_errbacks_and_next_append_uses_a_new_segment(
    tmp_path: Path, make_spool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = make_spool(tmp_path)
    before = await spool.append(b"before", 1.0)
    real_writev = os.writev

    def torn_writev(fd: int, buffers: list[Any]) -> int:
        if bytes(buffers[0][:4]) != b"SPR1":
            return real_writev(fd, buffers)
        os.write(fd, bytes(buffers[0][:7]))  # part of a header, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "writev", torn_writev)
    with pytest.raises(SpoolError, match="No space"):
        await spool.append(b"lost", 1.0)
    monkeypatch.setattr(spool_module.os, "writev", real_writev)
    after = await spool.append(b"after", 1.0)
    assert after.seq > before.seq
    assert spool.depth == 2
    assert [(await spool.get()).read() for _ in range(2)] == [b"before", b"after"]
    # Recovery finds both despite the torn record in the first segment.
    await spool.stop()
    _, entries = recover(tmp_path)
    assert [e.read() for e in entries] == [b"before", b"after"]


@pytest_twisted.ensureDeferred
async def test_a_failing_disk_is_reported_until_a_write_succeeds(
    tmp_path: Path, make_spool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    spool = make_spool(tmp_path, clock=clock)
    await spool.append(b"before", clock.seconds())
    assert spool.write_failure is None
    real_writev = os.writev

    def full(fd: int, buffers: list[Any]) -> int:
        if bytes(buffers[0][:4]) != b"SPR1":
            return real_writev(fd, buffers)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "writev", full)
    for _ in range(3):
        clock.advance(5)
        with pytest.raises(SpoolError):
            await spool.append(b"lost", clock.seconds())
    # Since the first failure, not the last.
    assert spool.write_failure == ("No space left on device", 1_700_000_005)
    monkeypatch.setattr(spool_module.os, "writev", real_writev)
    await spool.append(b"after", clock.seconds())
    assert spool.write_failure is None
    # What is on disk and not done: both messages, one handed out, none acked.
    entry = await spool.get()
    assert (spool.depth, spool.in_flight, spool.remaining) == (1, 1, 2)
    spool.ack(entry)
    await spool.stop()
    assert spool.remaining == 1


@pytest_twisted.ensureDeferred
async def test_stop_commits_pending_then_refuses(tmp_path: Path, make_spool: Any) -> None:
    spool = make_spool(tmp_path)
    waiting_get = spool.get()
    pending = spool.append(b"pending", 1.0)
    await spool.stop()
    assert pending.called  # committed before stop fired
    entry = await pending
    assert entry.read() == b"pending"
    with pytest.raises(SpoolError):
        await waiting_get  # or it would hang forever
    with pytest.raises(SpoolError):
        await spool.append(b"late", 1.0)
    with pytest.raises(SpoolError):
        await spool.get()
    await spool.stop()  # a second stop is harmless


def test_append_before_start_fails(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), config(), Metrics(), ThreadCalls(), Clock())
    failures: list[Failure] = []
    spool.append(b"x", 1.0).addErrback(failures.append)
    assert len(failures) == 1
    assert failures[0].check(SpoolError)


@pytest_twisted.ensureDeferred
async def test_cancelled_get_does_not_lose_an_entry(tmp_path: Path, make_spool: Any) -> None:
    spool = make_spool(tmp_path)
    cancelled = spool.get()
    waiting = spool.get()
    cancelled.cancel()
    with pytest.raises(CancelledError):
        await cancelled
    await spool.append(b"a", 1.0)
    await spool.append(b"b", 1.0)
    assert (await waiting).read() == b"a"
    # b is still queued for the next consumer.
    assert spool.depth == 1
    assert spool.in_flight == 1
    assert (await spool.get()).read() == b"b"


@pytest_twisted.ensureDeferred
async def test_a_spool_in_use_cannot_be_opened_twice(tmp_path: Path, make_spool: Any) -> None:
    first = make_spool(tmp_path)
    with pytest.raises(SpoolError, match="in use by another process"):
        make_spool(tmp_path)
    await first.stop()
    second = make_spool(tmp_path)  # free again after a clean stop
    assert second.depth == 0


@pytest_twisted.ensureDeferred
async def test_take_hands_out_a_batch_without_waiting(tmp_path: Path, make_spool: Any) -> None:
    spool = make_spool(tmp_path)
    for i in range(5):
        await spool.append(b"m%d" % i, 1.0)
    batch = spool.take(3)
    assert [e.read() for e in batch] == [b"m0", b"m1", b"m2"]
    assert spool.depth == 2 and spool.in_flight == 3
    assert [e.read() for e in spool.take(10)] == [b"m3", b"m4"]
    assert spool.take(10) == []
    for e in batch:
        spool.ack(e)
    assert spool.in_flight == 2


# -- append_many: an output queue's share of a pipeline batch ---------------


@pytest_twisted.ensureDeferred
async def test_append_many_is_one_commit_in_fifo_order_across_segments(
    tmp_path: Path, make_spool: Any
) -> None:
    metrics = Metrics()
    # Small segments: the batch fills one and goes on in the next.
    spool = make_spool(tmp_path, config(segment_bytes=HEADER.size * 2 + 40), metrics=metrics)
    first = await spool.append(b"single", 1.0)
    commits = sample(metrics, "spamtrap_spool_commits_total")
    payloads = [b"batch-%d" % i + b"x" * i for i in range(6)]
    assert await spool.append_many(payloads, 2.5) == 6
    assert sample(metrics, "spamtrap_spool_commits_total") == commits + 1
    assert spool.depth == 7
    assert spool.backlog_bytes == len(b"single") + sum(len(p) for p in payloads)
    got = [await spool.get() for _ in range(7)]
    assert got[0].key == first.key
    assert [e.read() for e in got[1:]] == payloads
    assert all(e.received_at == 2.5 for e in got[1:])
    assert len({e.seq for e in got}) > 2  # it really crossed segments
    # A restart finds them all; acked ones stay acked.
    spool.ack(got[0])
    spool.ack(got[1])
    await spool.stop()
    _, entries = recover(tmp_path)
    assert [e.read() for e in entries] == payloads[1:]


@pytest_twisted.ensureDeferred
async def test_append_many_fails_as_a_whole_on_a_write_error(
    tmp_path: Path, make_spool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = make_spool(tmp_path)
    real_writev = os.writev

    def full_disk(fd: int, buffers: list[Any]) -> int:
        if bytes(buffers[0][:4]) != b"SPR1":
            return real_writev(fd, buffers)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "writev", full_disk)
    with pytest.raises(SpoolError, match="No space"):
        await spool.append_many([b"a", b"b"], 1.0)
    monkeypatch.setattr(spool_module.os, "writev", real_writev)
    assert spool.depth == 0
    assert await spool.append_many([b"c"], 1.0) == 1
    assert [(await spool.get()).read()] == [b"c"]


@pytest_twisted.ensureDeferred
async def test_append_many_writes_the_crcs_it_is_given(tmp_path: Path, make_spool: Any) -> None:
    # The caller's crcs are the records' checksums on disk: right ones read
    # back and recover; a wrong one is what a reader and recovery refuse.
    spool = make_spool(tmp_path)
    payloads = [b"first", b"second", b"third"]
    crcs = [zlib.crc32(p) for p in payloads]
    crcs[1] ^= 1
    assert await spool.append_many(payloads, 1.0, crcs) == 3
    got = [await spool.get() for _ in range(3)]
    assert got[0].read() == b"first"
    with pytest.raises(SpoolError):
        got[1].read()
    with pytest.raises(ValueError, match="one crc per payload"):
        spool.append_many(payloads, 1.0, crcs[:2])
    await spool.stop()
    _, entries = recover(tmp_path)
    assert [e.read() for e in entries] == [b"first"]  # recovery stops at the bad record


@pytest_twisted.ensureDeferred
async def test_append_many_refuses_a_record_too_large(tmp_path: Path, make_spool: Any) -> None:
    spool = make_spool(tmp_path)
    with pytest.raises(SpoolError, match="too large"):
        await spool.append_many([b"ok", b"x" * (spool_module.MAX_PAYLOAD + 1)], 1.0)
    assert spool.depth == 0


# -- writing a commit ----------------------------------------------------------


def _written(tmp_path: Path, chunks: list[bytes]) -> bytes:
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        spool_writer.write_all(fd, chunks)
    finally:
        os.close(fd)
    return path.read_bytes()


def test_write_all_writes_more_buffers_than_one_writev_takes(tmp_path: Path) -> None:
    chunks = [b"%d:" % i + b"x" * (i % 7) for i in range(spool_writer.IOV_MAX * 2 + 5)]
    assert _written(tmp_path, chunks) == b"".join(chunks)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chunks=st.lists(st.binary(max_size=40), max_size=50),
    cap=st.integers(min_value=1, max_value=60),
)
def test_write_all_resumes_after_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: list[bytes], cap: int
) -> None:
    # A short writev (a signal, a quota) ends anywhere, mid-buffer too: the
    # rest follows, each byte once and in order.
    real = os.writev
    calls = []

    def short(fd: int, buffers: list[bytes]) -> int:
        calls.append(len(buffers))
        assert len(buffers) <= spool_writer.IOV_MAX
        room, taken = cap, []
        for b in buffers:
            if room == 0:
                break
            taken.append(bytes(b[:room]))
            room -= len(taken[-1])
        return real(fd, taken)

    monkeypatch.setattr(spool_writer.os, "writev", short)
    assert _written(tmp_path, chunks) == b"".join(chunks)
    total = sum(map(len, chunks))
    if total:
        assert len(calls) >= -(-total // cap)


def test_write_all_that_writes_nothing_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_writer.os, "writev", lambda fd, buffers: 0)
    with pytest.raises(OSError, match="wrote nothing"):
        _written(tmp_path, [b"", b"data"])
    assert _written(tmp_path, [b"", b""]) == b""


# -- the page cache ------------------------------------------------------------


def advice_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Records every POSIX_FADV_DONTNEED the spool gives, as (fd, offset, length)."""
    calls: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_DONTNEED:
            calls.append((fd, offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", advise)
    return calls


@pytest_twisted.ensureDeferred
async def test_a_queue_read_later_drops_each_commit_from_the_page_cache(
    tmp_path: Path, make_spool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = advice_log(monkeypatch)
    spool = make_spool(tmp_path, drop_written=True)
    await spool.append_many([b"a" * 100, b"b" * 50], 1.0)
    await spool.append(b"c" * 10, 1.0)
    size = os.path.getsize(tmp_path / name(await spool.get()))
    # Every byte written, once, in order: each commit drops what it wrote.
    ranges = [(offset, length) for _, offset, length in calls]
    assert ranges == [(0, 2 * HEADER.size + 150), (2 * HEADER.size + 150, HEADER.size + 10)]
    assert sum(length for _, length in ranges) == size


@pytest_twisted.ensureDeferred
async def test_the_intake_spool_keeps_written_pages_and_drops_them_once_read(
    tmp_path: Path, make_spool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = advice_log(monkeypatch)
    spool = make_spool(tmp_path)
    for i in range(3):
        await spool.append(b"m%d" % i, 1.0)
    assert calls == []  # the workers read them in a moment: kept cached
    entries = [await spool.get() for _ in range(3)]
    assert read_entries(entries) == [b"m0", b"m1", b"m2"]
    # One run, read with one pread, dropped as one range.
    assert [(offset, length) for _, offset, length in calls] == [(0, 3 * (HEADER.size + 2))]


def test_dropping_pages_of_a_file_that_cannot_take_the_advice_is_harmless() -> None:
    from spamtrap.work.spool_records import drop_cached

    read_end, write_end = os.pipe()
    try:
        drop_cached(read_end, 0, 4096)  # a pipe: ESPIPE, swallowed
    finally:
        os.close(read_end)
        os.close(write_end)
