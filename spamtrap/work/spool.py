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
"""

from __future__ import annotations

import collections
import fcntl
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, cast

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from spamtrap.config import SpoolConfig
from spamtrap.errors import SourceStoppedError, WorkSourceError
from spamtrap.interfaces import ReactorFromThreads, ReactorTime, as_reactor_time, pick_clock
from spamtrap.metrics import Metrics

if TYPE_CHECKING:
    from spamtrap.message import Envelope

MAGIC = b"SPR1"
# magic, payload length, received_at in ms, crc32 of the payload
HEADER = struct.Struct(">4sIQI")
MAX_PAYLOAD = 0xFFFFFFFF
AGE_CHECK_INTERVAL = 1.0
# Longest time acks and deletions wait for an append to ride along with.
ACK_DELAY = 0.1
_SEGMENT_NAME = re.compile(r"^seg-(\d{16})\.(log|ack)$")

log = Logger()


class SpoolError(WorkSourceError):
    """The spool could not store or return a message."""


class SpoolStoppedError(SpoolError, SourceStoppedError):
    """The spool stopped: it takes and hands out nothing any more."""


def segment_path(directory: str, seq: int) -> str:
    return os.path.join(directory, f"seg-{seq:016d}.log")


def ack_path(directory: str, seq: int) -> str:
    return os.path.join(directory, f"seg-{seq:016d}.ack")


@dataclass(slots=True, eq=False)
class SpoolEntry:
    """Where one spooled record lives; the payload stays on disk."""

    seq: int  # segment
    offset: int  # of the record header in the segment
    size: int  # payload bytes
    received_at: float  # seconds, millisecond precision
    path: str = field(repr=False)  # the segment file

    @property
    def key(self) -> tuple[int, int]:
        return (self.seq, self.offset)

    def read(self) -> bytes:
        """The payload, read from disk and CRC-checked. Blocking: call it in a
        worker thread."""
        (payload,) = read_entries([self])
        if isinstance(payload, SpoolError):
            raise payload
        return payload


# Longest single read when read_entries() joins adjacent records.
READ_SPAN = 4 * 1024 * 1024


def read_entries(entries: Sequence[SpoolEntry]) -> list[bytes | SpoolError]:
    """The payloads of ``entries`` in order, CRC-checked; a SpoolError in
    place of each one that cannot be read. Blocking: call it in a worker
    thread.

    Each segment is opened once, and a run of adjacent records (the usual
    case: the queue is FIFO) is read with one pread. A worker thread that
    makes one system call per batch instead of four per message hands the
    GIL back and forth far less often.
    """
    out: list[bytes | SpoolError] = []
    fds: dict[str, int] = {}
    try:
        i = 0
        while i < len(entries):
            first = entries[i]
            # The run: following entries of the same segment, back to back.
            end = first.offset + HEADER.size + first.size
            j = i + 1
            while j < len(entries):
                e = entries[j]
                if e.path != first.path or e.offset != end or end - first.offset > READ_SPAN:
                    break
                end += HEADER.size + e.size
                j += 1
            run = entries[i:j]
            try:
                fd = fds.get(first.path)
                if fd is None:
                    fd = fds[first.path] = os.open(first.path, os.O_RDONLY | os.O_CLOEXEC)
                buf = os.pread(fd, end - first.offset, first.offset)
            except OSError as err:
                out.extend(SpoolError(f"spool record {x.path}@{x.offset}: {err}") for x in run)
            else:
                out.extend(_check_record(x, buf, x.offset - first.offset) for x in run)
            i = j
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def _check_record(entry: SpoolEntry, buf: bytes, at: int) -> bytes | SpoolError:
    where = f"spool record {entry.path}@{entry.offset}"
    if len(buf) < at + HEADER.size + entry.size:
        return SpoolError(f"{where}: truncated")
    magic, length, _, crc = HEADER.unpack_from(buf, at)
    if magic != MAGIC or length != entry.size:
        return SpoolError(f"{where}: bad header")
    start = at + HEADER.size
    payload = buf[start : start + entry.size]
    if zlib.crc32(payload) != crc:
        return SpoolError(f"{where}: CRC mismatch")
    return payload


@dataclass(slots=True)
class _Append:
    payload: bytes
    received_ms: int
    deferred: Deferred[SpoolEntry]


@dataclass(slots=True)
class _Batch:
    """The outcome of one group commit, handed back to the reactor."""

    results: list[tuple[Deferred[SpoolEntry], SpoolEntry | SpoolError]]
    # The segment the next append goes to; every lower one is sealed.
    next_seq: int
    committed: bool
    # Why the batch failed, for health and the log: e.g. "No space left on device".
    error: str = ""


def _scan_segment(path: str) -> tuple[list[tuple[int, int, int]], int, int]:
    """Valid records of a segment as (offset, size, received_ms), then where
    the scan stopped and the file size. It stops at the first torn or corrupt
    record."""
    records = []
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        offset = 0
        while offset + HEADER.size <= file_size:
            magic, length, received_ms, crc = HEADER.unpack(f.read(HEADER.size))
            # Check the length against the file before reading: a garbage
            # header must not make us allocate gigabytes.
            if magic != MAGIC or offset + HEADER.size + length > file_size:
                break
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                break
            records.append((offset, length, received_ms))
            offset += HEADER.size + length
    return records, offset, file_size


def _read_acks(path: str) -> set[int]:
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return set()
    # The last element is "" or a torn line (no newline): ignore it, and any
    # line that is not a number (an ack file is never fsynced).
    return {int(line) for line in lines[:-1] if line.isdigit()}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("spool: cannot delete {path}: {error}", path=path, error=e)


class _Writer:
    """Owns the segment and ack files and does all spool I/O in one thread.

    The reactor posts work through the thread-safe methods (``append``,
    ``ack``, ``delete``, ``barrier``, ``exit``); results come back through
    ``deliver`` (``reactor.callFromThread``).
    """

    def __init__(
        self,
        directory: str,
        config: SpoolConfig,
        next_seq: int,
        deliver: Callable[..., None],
        on_batch: Callable[[_Batch], None],
        on_exit: Callable[[], None],
    ) -> None:
        self._dir = directory
        self._config = config
        self._deliver = deliver
        self._on_batch = on_batch
        self._on_exit = on_exit
        self._cond = threading.Condition()
        # Inbox, guarded by _cond.
        self._appends: list[_Append] = []
        self._acks: list[tuple[int, int]] = []
        self._deletes: list[int] = []
        self._barriers: list[Callable[[], None]] = []
        self._exit = False
        self._sleeping = False  # the writer waits for work: wake it
        # Writer-thread state.
        self._seq = next_seq
        self._fd: int | None = None
        self._path = ""  # of the segment open in _fd
        self._size = 0
        self._ack_files: dict[int, IO[str]] = {}
        self._thread = threading.Thread(target=self._run, name="spamtrap-spool-writer")
        # A daemon: durability comes from fsync before the 250, not from this
        # thread finishing, and a crashed main thread must not hang the exit.
        self._thread.daemon = True

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    # -- reactor side ---------------------------------------------------

    def append(self, item: _Append) -> None:
        with self._cond:
            self._appends.append(item)
            if self._sleeping:
                self._cond.notify()

    def ack(self, records: list[tuple[int, int]]) -> None:
        """Record (segment, offset) keys as done."""
        with self._cond:
            self._wake_for_lazy_work()
            self._acks += records

    def delete(self, seq: int) -> None:
        with self._cond:
            self._wake_for_lazy_work()
            self._deletes.append(seq)

    def _wake_for_lazy_work(self) -> None:
        # Called holding _cond. Only the first ack or delete needs to wake a
        # sleeping writer: it then waits ACK_DELAY with a timeout of its own.
        if self._sleeping and not (self._acks or self._deletes):
            self._cond.notify()

    def barrier(self, callback: Callable[[], None]) -> None:
        """Call back (in the reactor) once everything posted so far is done."""
        with self._cond:
            self._barriers.append(callback)
            self._cond.notify()

    def exit(self) -> None:
        with self._cond:
            self._exit = True
            self._cond.notify()

    # -- writer thread --------------------------------------------------

    def _wait_for_work(self) -> None:
        # Called holding _cond. Appends, barriers and exit are urgent; acks and
        # deletes wait up to ACK_DELAY for an append to share the wake-up with.
        deadline: float | None = None
        while not (self._appends or self._barriers or self._exit):
            timeout = None
            if self._acks or self._deletes:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + ACK_DELAY
                elif now >= deadline:
                    return
                timeout = deadline - now
            self._sleeping = True
            try:
                self._cond.wait(timeout)
            finally:
                self._sleeping = False

    def _run(self) -> None:
        while True:
            with self._cond:
                self._wait_for_work()
                if self._appends and self._config.commit_interval > 0:
                    self._gather()
                appends, self._appends = self._appends, []
                acks, self._acks = self._acks, []
                deletes, self._deletes = self._deletes, []
                barriers, self._barriers = self._barriers, []
                exiting = self._exit
            # Acks and deletes first: an append firing then tells the reactor
            # (and tests) that earlier acks reached the OS.
            if acks:
                self._write_acks(acks, set(deletes))
            for seq in deletes:
                self._delete(seq)
            if appends:
                self._deliver(self._on_batch, self._commit(appends))
            for callback in barriers:
                self._deliver(callback)
            if exiting:
                self._close()
                self._deliver(self._on_exit)
                return

    def _gather(self) -> None:
        # Called holding _cond; wait() releases it so appends keep coming in
        # (without waking us: only exit and barriers notify meanwhile).
        deadline = time.monotonic() + self._config.commit_interval
        while not self._exit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)

    def _commit(self, appends: list[_Append]) -> _Batch:
        entries: list[SpoolEntry] = []
        created = False
        try:
            chunks: list[bytes] = []
            for item in appends:
                record_size = HEADER.size + len(item.payload)
                if (
                    self._fd is not None
                    and self._size > 0
                    and self._size + record_size > self._config.segment_bytes
                ):
                    self._write(chunks)
                    chunks = []
                    self._seal()
                if self._fd is None:
                    self._open_segment()
                    created = True
                crc = zlib.crc32(item.payload)
                chunks.append(HEADER.pack(MAGIC, len(item.payload), item.received_ms, crc))
                chunks.append(item.payload)
                entries.append(
                    SpoolEntry(
                        seq=self._seq,
                        offset=self._size,
                        size=len(item.payload),
                        received_at=item.received_ms / 1000.0,
                        path=self._path,
                    )
                )
                self._size += record_size
            self._write(chunks)
            self._sync()
            if created:
                self._sync_directory()
        # Any failure to persist must fail the batch (451), never hang it.
        except Exception as e:  # noqa: BLE001
            self._abandon_segment()
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            return _Batch(
                [(item.deferred, SpoolError(f"spool write failed: {e}")) for item in appends],
                next_seq=self._seq,
                committed=False,
                error=why,
            )
        results: list[tuple[Deferred[SpoolEntry], SpoolEntry | SpoolError]] = [
            (item.deferred, entry) for item, entry in zip(appends, entries, strict=True)
        ]
        return _Batch(results, next_seq=self._seq, committed=True)

    def _open_segment(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._path = segment_path(self._dir, self._seq)
        self._fd = os.open(self._path, flags, 0o640)
        self._size = 0

    def _write(self, chunks: list[bytes]) -> None:
        # self._size already counts these bytes; only the fd moves here.
        assert self._fd is not None
        view = memoryview(b"".join(chunks))
        while view:
            view = view[os.write(self._fd, view) :]

    def _sync(self) -> None:
        if self._config.fsync and self._fd is not None:
            os.fdatasync(self._fd)

    def _sync_directory(self) -> None:
        # A new file's directory entry is only durable once the dir is synced.
        if not self._config.fsync:
            return
        fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _seal(self) -> None:
        """Finish the current segment (synced) and move on to the next."""
        self._sync()
        self._close_segment()

    def _close_segment(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._seq += 1
        self._size = 0

    def _abandon_segment(self) -> None:
        # After a failed write or sync, the segment may end in a torn record
        # (or unsynced data): recovery would stop there, so later records must
        # never follow it. Start a fresh segment for the next batch.
        try:
            self._close_segment()
        except OSError:
            self._fd = None

    def _write_acks(self, acks: list[tuple[int, int]], deleting: set[int]) -> None:
        touched = set()
        for seq, offset in acks:
            if seq in deleting:
                continue
            try:
                f = self._ack_files.get(seq)
                if f is None:
                    f = self._ack_files[seq] = open(  # kept open
                        ack_path(self._dir, seq), "a", encoding="ascii"
                    )
                f.write(f"{offset}\n")
                touched.add(seq)
            except OSError as e:
                # A lost ack only means a duplicate after a restart.
                log.warn(
                    "spool: cannot record ack {seq}@{offset}: {e}", seq=seq, offset=offset, e=e
                )
        for seq in touched:
            try:
                self._ack_files[seq].flush()
            except OSError as e:
                log.warn("spool: cannot flush acks of segment {seq}: {e}", seq=seq, e=e)

    def _delete(self, seq: int) -> None:
        f = self._ack_files.pop(seq, None)
        if f is not None:
            try:
                f.close()
            except OSError as e:
                log.warn("spool: cannot close acks of segment {seq}: {e}", seq=seq, e=e)
        if seq == self._seq and self._fd is not None:
            self._abandon_segment()
        # The log first: a leftover .ack without its .log is harmless, the
        # other way round would bring every record back.
        _unlink(segment_path(self._dir, seq))
        _unlink(ack_path(self._dir, seq))

    def _close(self) -> None:
        if self._fd is not None:
            self._abandon_segment()
        for seq in list(self._ack_files):
            f = self._ack_files.pop(seq)
            try:
                f.close()
            except OSError as e:
                log.warn("spool: cannot close acks of segment {seq}: {e}", seq=seq, e=e)


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
    ) -> None:
        self._dir = directory
        self._config = config
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
        self._writer: _Writer | None = None
        self._lock_fd: int | None = None
        self._writer_open = False  # still taking acks and deletes
        self._closed = False  # no more appends or gets
        self._stopped = False
        self._stop_waiters: list[Deferred[None]] = []
        self._age_loop: task.LoopingCall | None = None
        # (why, since) while appends fail (a full disk): health reports it.
        self._failing: tuple[str, float] | None = None
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
    def remaining(self) -> int:
        """Records on disk that are neither acked nor shed: after stop(),
        what the next start recovers and processes."""
        return sum(self._live.values())

    @property
    def write_failure(self) -> tuple[str, float] | None:
        """``(reason, since)`` while appends fail, e.g. ``("No space left on
        device", <epoch seconds of the first failure>)``; None once a write
        succeeds again."""
        return self._failing

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
        self._writer = _Writer(
            self._dir,
            self._config,
            next_seq,
            self._reactor.callFromThread,
            self._committed,
            self._writer_exited,
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
        self._writer.append(_Append(bytes(payload), received_ms, d))
        return d

    def _committed(self, batch: _Batch) -> None:
        if self._current_seq is not None:
            self._current_seq = batch.next_seq
        for _, outcome in batch.results:
            if isinstance(outcome, SpoolEntry):
                self._live[outcome.seq] = self._live.get(outcome.seq, 0) + 1
                self._queue.append((outcome.seq, outcome.offset, outcome.size, outcome.received_at))
                self._bytes += outcome.size
        if batch.committed:
            self._metrics.spool_commits.inc()
        self._note_outcome(batch)
        self._shed_over_limit()
        self._delete_finished()
        self._dispatch()
        for d, outcome in batch.results:
            if isinstance(outcome, SpoolEntry):
                d.callback(outcome)
            else:
                d.errback(outcome)

    def _note_outcome(self, batch: _Batch) -> None:
        """Log the first failed write of an outage and the first success
        after it, never each 451 in between."""
        now = self._clock.seconds()
        if not batch.committed and self._failing is None:
            self._failing = (batch.error, now)
            log.error(
                "spool: write failed: {why}; new mail gets 451 until a write succeeds",
                why=batch.error,
            )
        elif batch.committed and self._failing is not None:
            why, since = self._failing
            self._failing = None
            log.info(
                "spool: writes succeed again after {s:.0f}s of failures ({why})",
                s=now - since,
                why=why,
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
            m = _SEGMENT_NAME.match(name)
            if m:
                (logs if m.group(2) == "log" else acks).add(int(m.group(1)))
        recovered = 0
        for seq in sorted(logs):
            path = segment_path(self._dir, seq)
            records, end, file_size = _scan_segment(path)
            if end < file_size:
                log.warn(
                    "spool: {path}: ignoring {n} bytes after offset {end} (torn or corrupt)",
                    path=path,
                    n=file_size - end,
                    end=end,
                )
            acked = _read_acks(ack_path(self._dir, seq))
            live = [r for r in records if r[0] not in acked]
            if not live:
                _unlink(path)
                _unlink(ack_path(self._dir, seq))
                continue
            self._live[seq] = len(live)
            for offset, size, received_ms in live:
                self._queue.append((seq, offset, size, received_ms / 1000.0))
                self._bytes += size
            recovered += len(live)
        for seq in acks - logs:
            _unlink(ack_path(self._dir, seq))
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
