"""The durable, bounded local spool between SMTP intake and the filter workers.

The SMTP server answers 250 only after ``Spool.append()``'s Deferred fires, and
that Deferred fires only after the record is written and fdatasync'ed. A kill
-9 at any moment therefore loses nothing that got a 250.

On disk
    ``DIR/seg-<16-digit seq>.log`` segment files hold records, each a header
    ``b"SPR1" + struct(">IQI", payload_len, received_at_ms, crc32(payload))``
    followed by the opaque payload (``Envelope.to_record()``). Beside each,
    ``seg-<seq>.ack`` lists, one decimal offset a line, the records that are
    done. Appends always go to a segment created by this process; a new one
    starts when the next record would push the current one past
    ``segment_bytes``.

Group commit
    One dedicated writer thread owns every file. It takes all pending appends
    at once (after waiting ``commit_interval`` to gather more), writes them,
    fdatasyncs once (plus the directory when it created a segment), and fires
    their Deferreds in the reactor through ``callFromThread``. On any write or
    sync error the whole batch errbacks with SpoolError (the SMTP side answers
    451) and the writer moves on to a fresh segment, so a torn record never
    sits in front of later acknowledged ones. The reactor thread only hands
    work over under a short lock: it never touches the disk, and it wakes the
    writer only when the writer sleeps (a wake-up costs a context switch and
    a fight for the GIL, per message if done naively). Acks and segment
    deletions are not urgent: they ride along with the next commit, or are
    written within ``ACK_DELAY`` when no append comes. Those posted before an
    append are done before that append's Deferred fires.

Queue and bounds ("fresh beats complete")
    In memory the spool keeps only ``SpoolEntry`` locations, never payloads;
    workers read the bytes with ``read_entries()`` (a batch) or
    ``SpoolEntry.read()`` in a worker thread. An entry becomes visible to
    ``get()`` only once it is durable. The unprocessed backlog (queued, not
    yet handed out) is bounded by ``max_messages`` and ``max_bytes``: when it
    exceeds either, the oldest entries are shed. Entries older than
    ``max_age`` are shed by a check every second. Entries handed out by
    ``get()`` are in flight and never shed.

Ack policy
    A spooled message is removed (acked) only once the bundle holding it has
    been stored, or once it was discarded by a filter, or shed. Acks are
    written without fsync: losing one after a crash only means the message is
    processed again. A segment file is deleted once it is no longer the one
    being appended to and all its records are acked or shed. After a kill -9
    at any moment, recovery re-queues every record that got a 250 and has no
    ack on disk: nothing acknowledged is lost, and a message may be
    duplicated, which consumers detect by its unique ``X-Spamtrap-Id``.

Recovery
    ``start()`` scans the segments in order and checks each record's CRC. A
    torn or corrupt tail (a crash mid-write, which never got a 250) ends that
    segment's scan. Records not listed in the ack file are queued again.

This module is the spool the reactor sees (Spool, SpoolIntake);
spamtrap.work.spool_records holds the record format and the scans recovery
makes, spamtrap.work.spool_writer the writer thread.
"""

from __future__ import annotations

import collections
import fcntl
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, cast

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from spamtrap.config import SpoolConfig
from spamtrap.interfaces import ReactorFromThreads, ReactorTime, as_reactor_time, pick_clock
from spamtrap.latch import FailureLatch
from spamtrap.metrics import Metrics
from spamtrap.work.spool_records import (
    MAX_PAYLOAD,
    SEGMENT_NAME,
    SpoolEntry,
    SpoolError,
    SpoolStoppedError,
    ack_path,
    read_acks,
    read_entries,
    scan_segment,
    segment_path,
    unlink_quietly,
)
from spamtrap.work.spool_writer import Append, AppendMany, Batch, SpoolWriter

if TYPE_CHECKING:
    from spamtrap.message import Envelope

__all__ = ["Spool", "SpoolEntry", "SpoolError", "SpoolIntake", "SpoolStoppedError", "read_entries"]

AGE_CHECK_INTERVAL = 1.0

log = Logger()


class Spool:
    """A durable FIFO of messages, bounded by count, bytes and age.

    Every method is called in the reactor thread, except ``SpoolEntry.read``.
    """

    def __init__(
        self,
        directory: str,
        config: SpoolConfig,
        metrics: Metrics,
        reactor: ReactorFromThreads,
        # Timers and time; the reactor's own unless given (tests: task.Clock).
        clock: ReactorTime | None = None,
        *,
        drop_written: bool = False,
    ) -> None:
        self._dir = directory
        self._config = config
        # Drop what is written from the page cache once it is durable (see
        # SpoolWriter): for a log read long after it is written.
        self._drop_written = drop_written
        self._metrics = metrics
        self._reactor = reactor
        self._clock = pick_clock(clock, reactor)
        # The backlog as (seq, offset, size, received_at): plain tuples of
        # numbers, which the garbage collector stops tracking. A backlog of a
        # million SpoolEntry objects would make every full collection crawl.
        self._queue: collections.deque[tuple[int, int, int, float]] = collections.deque()
        self._last_path = (-1, "")  # the latest segment_path(), as (seq, path)
        self._bytes = 0
        # Keys of the entries handed out and not yet acked. Keys, not entries:
        # tuples of ints are not tracked by the garbage collector, and a
        # bundle may hold a hundred thousand messages in flight for an hour.
        self._in_flight: set[tuple[int, int]] = set()
        self._waiters: collections.deque[Deferred[SpoolEntry]] = collections.deque()
        # segment seq -> records in it that are neither acked nor shed
        self._live: dict[int, int] = {}
        # The segment the writer appends to; lower ones are sealed. None once
        # stopping: then every segment is sealed.
        self._current_seq: int | None = None
        self._writer: SpoolWriter | None = None
        self._lock_fd: int | None = None
        self._writer_open = False  # still taking acks and deletes
        self._closed = False  # no more appends or gets
        self._stopped = False
        self._stop_waiters: list[Deferred[None]] = []
        self._age_loop: task.LoopingCall | None = None
        # (why, since) while appends fail (a full disk): health reports it.
        self._failing = FailureLatch(self._clock)
        # Read at scrape time, not updated on every queue change.
        metrics.spool_depth.set_function(lambda: len(self._queue))
        metrics.spool_bytes.set_function(lambda: self._bytes)

    # -- properties -----------------------------------------------------

    @property
    def depth(self) -> int:
        """Entries queued and not yet handed out."""
        return len(self._queue)

    @property
    def backlog_bytes(self) -> int:
        """Payload bytes of the queued entries."""
        return self._bytes

    @property
    def in_flight(self) -> int:
        """Entries handed out by get() and not yet acked."""
        return len(self._in_flight)

    @property
    def oldest_queued(self) -> float | None:
        """``received_at`` of the oldest entry queued and not handed out."""
        return self._queue[0][3] if self._queue else None

    @property
    def remaining(self) -> int:
        """Records on disk that are neither acked nor shed: after stop(),
        what the next start recovers and processes."""
        return sum(self._live.values())

    @property
    def write_failure(self) -> tuple[str, float] | None:
        """``(reason, since)`` while appends fail, e.g. ``("No space left on
        device", <epoch seconds of the first failure>)``; None once a write
        succeeds again."""
        return self._failing.failure

    # -- lifecycle ------------------------------------------------------

    def start(self) -> None:
        """Recover the queue from disk (blocking), then start the writer
        thread and the age check."""
        if self._writer is not None or self._closed:
            raise SpoolError("spool already started")
        os.makedirs(self._dir, exist_ok=True)
        self._lock()
        next_seq = self._recover()
        self._current_seq = next_seq
        self._writer = SpoolWriter(
            self._dir,
            self._config,
            next_seq,
            self._reactor.callFromThread,
            self._committed,
            self._writer_exited,
            drop_written=self._drop_written,
        )
        self._writer_open = True
        self._writer.start()
        self._shed_over_limit()
        self._age_loop = task.LoopingCall(self._shed_old)
        self._age_loop.clock = as_reactor_time(self._clock)
        self._age_loop.start(AGE_CHECK_INTERVAL, now=True).addErrback(
            lambda f: log.failure("spool age check stopped", f)
        )
        self._dispatch()

    def stop(self) -> Deferred[None]:
        """Commit pending appends, stop the writer thread, close the files."""
        if self._stopped:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._stop_waiters.append(d)
        if self._closed:
            return d  # already stopping
        self._closed = True
        if self._age_loop is not None and self._age_loop.running:
            self._age_loop.stop()
        waiters, self._waiters = self._waiters, collections.deque()
        for w in waiters:
            w.errback(SpoolStoppedError("spool stopped"))
        if self._writer is None:
            self._finish_stop()
        else:
            self._writer.barrier(self._drained)
        return d

    def _drained(self) -> None:
        # Every append is committed and handled: seal the last segment, so it
        # is deleted if it is already done, and let the writer exit.
        assert self._writer is not None
        self._current_seq = None
        self._delete_finished()
        self._writer_open = False
        self._writer.exit()

    def _writer_exited(self) -> None:
        assert self._writer is not None
        self._writer.join()  # it has posted its last call: returns at once
        self._finish_stop()

    def _lock(self) -> None:
        # Two processes appending to one spool would corrupt it: each process
        # of a node needs its own data directory (or spool directory).
        fd = os.open(os.path.join(self._dir, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SpoolError(
                f"spool {self._dir} is in use by another process"
                " (each process of a node needs its own --node name)"
            ) from None
        self._lock_fd = fd

    def _finish_stop(self) -> None:
        self._stopped = True
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)

    # -- intake ---------------------------------------------------------

    def append(self, payload: bytes, received_at: float) -> Deferred[SpoolEntry]:
        """Store a record durably; fires with its entry once it is synced."""
        if self._closed or self._writer is None:
            return defer.fail(SpoolError("spool is not running"))
        if len(payload) > MAX_PAYLOAD:
            return defer.fail(SpoolError(f"spool record too large: {len(payload)} bytes"))
        d: Deferred[SpoolEntry] = Deferred()
        received_ms = max(0, round(received_at * 1000))
        self._writer.append(Append(bytes(payload), received_ms, d))
        return d

    def append_many(
        self,
        payloads: Sequence[bytes],
        received_at: float,
        crcs: Sequence[int] | None = None,
    ) -> Deferred[int]:
        """Store records durably as one hand-over (all in one commit); fires
        with their number once they are synced. Their entries are queued
        like ``append``'s, but not handed back: for a producer (an output
        queue fed by the pipeline) that needs to know only that they are
        durable. ``crcs``: each payload's ``zlib.crc32``, if the caller
        has them (it appends the same payloads elsewhere too)."""
        if self._closed or self._writer is None:
            return defer.fail(SpoolError("spool is not running"))
        if crcs is not None and len(crcs) != len(payloads):
            raise ValueError("append_many: one crc per payload")
        for payload in payloads:
            if len(payload) > MAX_PAYLOAD:
                return defer.fail(SpoolError(f"spool record too large: {len(payload)} bytes"))
        d: Deferred[int] = Deferred()
        received_ms = max(0, round(received_at * 1000))
        given = list(crcs) if crcs is not None else None
        self._writer.append(AppendMany([bytes(p) for p in payloads], received_ms, d, given))
        return d

    def _committed(self, batch: Batch) -> None:
        if self._current_seq is not None:
            self._current_seq = batch.next_seq
        for _, outcome in batch.results:
            if isinstance(outcome, SpoolEntry):
                self._live[outcome.seq] = self._live.get(outcome.seq, 0) + 1
                self._queue.append((outcome.seq, outcome.offset, outcome.size, outcome.received_at))
                self._bytes += outcome.size
            elif isinstance(outcome, list):
                for where in outcome:
                    self._live[where[0]] = self._live.get(where[0], 0) + 1
                    self._bytes += where[2]
                self._queue.extend(outcome)
        if batch.committed:
            self._metrics.spool_commits.inc()
        self._note_outcome(batch)
        self._shed_over_limit()
        self._delete_finished()
        self._dispatch()
        for d, outcome in batch.results:
            if isinstance(outcome, SpoolError):
                d.errback(outcome)
            elif isinstance(outcome, list):  # an AppendMany's
                cast("Deferred[int]", d).callback(len(outcome))
            else:
                cast("Deferred[SpoolEntry]", d).callback(outcome)

    def _note_outcome(self, batch: Batch) -> None:
        """Log the first failed write of an outage and the first success
        after it, never each 451 in between."""
        if not batch.committed:
            if self._failing.failed(batch.error):
                log.error(
                    "spool: write failed: {why}; new mail gets 451 until a write succeeds",
                    why=batch.error,
                )
        elif ended := self._failing.succeeded():
            why, lasted = ended
            log.info(
                "spool: writes succeed again after {s:.0f}s of failures ({why})", s=lasted, why=why
            )

    # -- consumers ------------------------------------------------------

    def get(self) -> Deferred[SpoolEntry]:
        """The next unprocessed entry (FIFO); waits while there is none.

        Cancelling the Deferred withdraws the request: no entry is lost.
        """
        if self._closed:
            return defer.fail(SpoolStoppedError("spool stopped"))
        d: Deferred[SpoolEntry] = Deferred(canceller=self._cancel_get)
        self._waiters.append(d)
        self._dispatch()
        return d

    def take(self, limit: int) -> list[SpoolEntry]:
        """Up to ``limit`` queued entries at once, without waiting (for batches)."""
        out: list[SpoolEntry] = []
        while self._queue and len(out) < limit:
            out.append(self._hand_out())
        return out

    def _hand_out(self) -> SpoolEntry:
        seq, offset, size, received_at = self._queue.popleft()
        self._bytes -= size
        self._in_flight.add((seq, offset))
        if self._last_path[0] != seq:
            self._last_path = (seq, segment_path(self._dir, seq))
        return SpoolEntry(seq, offset, size, received_at, self._last_path[1])

    def _cancel_get(self, d: Deferred[SpoolEntry]) -> None:
        try:
            self._waiters.remove(d)
        except ValueError:
            pass

    def _dispatch(self) -> None:
        while self._queue and self._waiters:
            d = self._waiters.popleft()
            if d.called:
                continue  # cancelled: its entry stays at the head
            d.callback(self._hand_out())

    @staticmethod
    def read_entries(entries: Sequence[SpoolEntry]) -> list[bytes | SpoolError]:
        """The records of handed-out entries (see read_entries; any thread)."""
        return read_entries(entries)

    def ack(self, entry: SpoolEntry) -> None:
        """Mark an entry done (stored in a bundle, or discarded)."""
        self.ack_keys((entry.key,))

    def ack_keys(self, keys: Iterable[tuple[int, int]]) -> None:
        """Mark entries done by ``SpoolEntry.key``, with one hand-over to the
        writer for all of them. Consumers that hold many messages in flight
        keep keys: the garbage collector skips them."""
        done = []
        for key in keys:
            if key in self._in_flight:
                self._in_flight.remove(key)
            elif not self._unqueue(key):
                continue  # acked already, or shed
            done.append(key)
        self._done(done)

    def _unqueue(self, key: tuple[int, int]) -> bool:
        # Acking an entry that get() never handed out: rare, so a linear scan.
        for i, (seq, offset, size, _) in enumerate(self._queue):
            if (seq, offset) == key:
                del self._queue[i]
                self._bytes -= size
                return True
        return False

    def _done(self, keys: list[tuple[int, int]]) -> None:
        """Entries acked or shed: record them, and delete finished segments."""
        if not keys:
            return
        if self._writer is not None and self._writer_open:
            self._writer.ack(keys)
        for seq, _ in keys:
            live = self._live[seq] - 1
            self._live[seq] = live
            if live == 0:
                self._delete_if_finished(seq)

    def _delete_finished(self) -> None:
        """Delete sealed segments with no live record left (after the current
        segment moved on; _done checks the segments it touches)."""
        for seq, live in list(self._live.items()):
            if live == 0:
                self._delete_if_finished(seq)

    def _delete_if_finished(self, seq: int) -> None:
        sealed = self._current_seq is None or seq < self._current_seq
        if sealed and self._live[seq] == 0:
            del self._live[seq]
            if self._writer is not None and self._writer_open:
                self._writer.delete(seq)

    # -- shedding -------------------------------------------------------

    def _shed_over_limit(self) -> None:
        limit_n, limit_bytes = self._config.max_messages, self._config.max_bytes
        shed = []
        while self._queue and (len(self._queue) > limit_n or self._bytes > limit_bytes):
            shed.append(self._pop_head())
        self._shed(shed, "full")

    def _shed_old(self) -> None:
        # The queue is in arrival order, so the oldest entries are at the head.
        cutoff = self._clock.seconds() - self._config.max_age
        shed = []
        while self._queue and self._queue[0][3] < cutoff:
            shed.append(self._pop_head())
        self._shed(shed, "age")

    def _pop_head(self) -> tuple[int, int]:
        seq, offset, size, _ = self._queue.popleft()
        self._bytes -= size
        return (seq, offset)

    def _shed(self, keys: list[tuple[int, int]], reason: str) -> None:
        if keys:
            self._metrics.spool_shed.labels(reason=reason).inc(len(keys))
            self._done(keys)

    # -- recovery -------------------------------------------------------

    def _recover(self) -> int:
        """Queue the unacked records found on disk; returns the next segment
        number."""
        logs: set[int] = set()
        acks: set[int] = set()
        for name in os.listdir(self._dir):
            m = SEGMENT_NAME.match(name)
            if m:
                (logs if m.group(2) == "log" else acks).add(int(m.group(1)))
        recovered = 0
        for seq in sorted(logs):
            path = segment_path(self._dir, seq)
            records, end, file_size = scan_segment(path)
            if end < file_size:
                log.warn(
                    "spool: {path}: ignoring {n} bytes after offset {end} (torn or corrupt)",
                    path=path,
                    n=file_size - end,
                    end=end,
                )
            acked = read_acks(ack_path(self._dir, seq))
            live = [r for r in records if r[0] not in acked]
            if not live:
                unlink_quietly(path)
                unlink_quietly(ack_path(self._dir, seq))
                continue
            self._live[seq] = len(live)
            for offset, size, received_ms in live:
                self._queue.append((seq, offset, size, received_ms / 1000.0))
                self._bytes += size
            recovered += len(live)
        for seq in acks - logs:
            unlink_quietly(ack_path(self._dir, seq))
        self._metrics.spool_recovered.inc(recovered)
        return max(logs | acks, default=0) + 1


class SpoolIntake:
    """A single node's ``Intake``: each message into the spool; the
    Deferred fires with its ``SpoolEntry`` once it is synced."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def submit(self, env: Envelope) -> Deferred[object]:
        # cast: Deferred is invariant; SMTP never reads the value.
        return cast("Deferred[object]", self.spool.append(env.to_record(), env.received_at))
