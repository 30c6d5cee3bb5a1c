"""The spool's writer thread: every file write, fsync and deletion of the
spool, as group commits (see spamtrap.work.spool for the whole design)."""

from __future__ import annotations

import errno
import os
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, cast

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from spamtrap.config import SpoolConfig
from spamtrap.work.spool_records import (
    HEADER,
    MAGIC,
    SpoolEntry,
    SpoolError,
    ack_path,
    drop_cached,
    segment_path,
    unlink_quietly,
)

# Longest time acks and deletions wait for an append to ride along with.
ACK_DELAY = 0.1
# Buffers per writev() call (POSIX guarantees 16; Linux takes 1024).
IOV_MAX = max(16, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 16

log = Logger()


def write_all(fd: int, chunks: Sequence[bytes]) -> None:
    """Write ``chunks`` to ``fd`` in order, as writev() calls, resuming
    after a short write; raises OSError.

    Not ``os.write(b"".join(chunks))``: an output queue's commit holds 0.2 s
    of messages, about a MiB, and the join copied it into a fresh buffer
    each time, holding the GIL. py-spy put that join at about 4 µs of
    GIL-held time per message in a node with three output queues
    (2026-12-06, docs/benchmarks.md, issue 13)."""
    start, end = 0, len(chunks)
    pending: list[bytes | memoryview] = list(chunks)
    while start < end:
        group = pending[start : start + IOV_MAX]
        written = os.writev(fd, group)
        if written == 0 and any(len(c) for c in group):
            raise OSError(errno.EIO, "writev() wrote nothing")
        # Whole buffers written; a partly written one resumes at its rest.
        for chunk in group:
            size = len(chunk)
            if written < size:
                pending[start] = memoryview(chunk)[written:]
                break
            written -= size
            start += 1


@dataclass(slots=True)
class Append:
    payload: bytes
    received_ms: int
    deferred: Deferred[SpoolEntry]


@dataclass(slots=True)
class AppendMany:
    """Records appended as one: an output queue's share of a pipeline batch.

    One hand-over, one Deferred and one callback for all of them. Measured
    (three output queues on a 4 KiB message, 2026-12-03): a Deferred and a
    locked hand-over per record cost 22 µs of CPU per message per queue,
    most of the outputs' cost to intake."""

    payloads: list[bytes]
    received_ms: int
    deferred: Deferred[int]
    # crc32 of each payload, when the caller has them: one message goes to
    # every output queue that lists its set, and its crc is the same in all
    # (computed once, not once per queue: about 1.5 µs of a 4 KiB message's
    # GIL-held time per queue, since zlib keeps the GIL under 5 KiB).
    crcs: list[int] | None = None


# Where an AppendMany record went, as Spool queues it: (seq, offset, size,
# received_at); plain tuples, not SpoolEntry objects.
Location = tuple[int, int, int, float]
Outcome = (
    tuple[Deferred[SpoolEntry], SpoolEntry | SpoolError]
    | tuple[Deferred[int], list[Location] | SpoolError]
)


@dataclass(slots=True)
class Batch:
    """The outcome of one group commit, handed back to the reactor."""

    results: list[Outcome]
    # The segment the next append goes to; every lower one is sealed.
    next_seq: int
    committed: bool
    # Why the batch failed, for health and the log: e.g. "No space left on device".
    error: str = ""


class SpoolWriter:
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
        on_batch: Callable[[Batch], None],
        on_exit: Callable[[], None],
        *,
        drop_written: bool = False,
    ) -> None:
        self._dir = directory
        # Drop each commit's pages from the page cache once durable
        # (spool_records.drop_cached): for a log read long after it is
        # written (an output queue), not the intake spool, whose workers read
        # each record within a moment of its commit.
        self._drop_written = drop_written
        self._config = config
        self._deliver = deliver
        self._on_batch = on_batch
        self._on_exit = on_exit
        self._cond = threading.Condition()
        # Inbox, guarded by _cond.
        self._appends: list[Append | AppendMany] = []
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
        self._created = False  # this commit created a segment: sync the directory
        self._dropped = 0  # bytes of the segment dropped from the page cache
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

    def append(self, item: Append | AppendMany) -> None:
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

    def _commit(self, appends: list[Append | AppendMany]) -> Batch:
        results: list[Outcome] = []
        self._created = False
        try:
            chunks: list[bytes] = []
            for item in appends:
                if isinstance(item, AppendMany):
                    ms = item.received_ms
                    at = ms / 1000.0
                    crcs = item.crcs or [zlib.crc32(p) for p in item.payloads]
                    where = [
                        (*self._record(p, ms, chunks, crc), len(p), at)
                        for p, crc in zip(item.payloads, crcs, strict=True)
                    ]
                    results.append((item.deferred, where))
                    continue
                payload = item.payload
                seq, offset = self._record(payload, item.received_ms, chunks, zlib.crc32(payload))
                entry = SpoolEntry(
                    seq=seq,
                    offset=offset,
                    size=len(item.payload),
                    received_at=item.received_ms / 1000.0,
                    path=self._path,
                )
                results.append((item.deferred, entry))
            self._write(chunks)
            self._sync()
            if self._created:
                self._sync_directory()
        # Any failure to persist must fail the batch (451), never hang it.
        except Exception as e:  # noqa: BLE001
            self._abandon_segment()
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            failed = [(item.deferred, SpoolError(f"spool write failed: {e}")) for item in appends]
            return Batch(
                cast("list[Outcome]", failed),
                next_seq=self._seq,
                committed=False,
                error=why,
            )
        return Batch(results, next_seq=self._seq, committed=True)

    def _record(
        self, payload: bytes, received_ms: int, chunks: list[bytes], crc: int
    ) -> tuple[int, int]:
        """Add one record to ``chunks`` (written first when the segment is
        full); its (seq, offset)."""
        record_size = HEADER.size + len(payload)
        full = self._size + record_size > self._config.segment_bytes
        if self._fd is not None and self._size > 0 and full:
            self._write(chunks)
            chunks.clear()
            self._seal()
        if self._fd is None:
            self._open_segment()
            self._created = True
        chunks.append(HEADER.pack(MAGIC, len(payload), received_ms, crc))
        chunks.append(payload)
        where = (self._seq, self._size)
        self._size += record_size
        return where

    def _open_segment(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._path = segment_path(self._dir, self._seq)
        self._fd = os.open(self._path, flags, 0o640)
        self._size = 0
        self._dropped = 0

    def _write(self, chunks: list[bytes]) -> None:
        # self._size already counts these bytes; only the fd moves here.
        assert self._fd is not None
        write_all(self._fd, chunks)

    def _sync(self) -> None:
        if self._config.fsync and self._fd is not None:
            os.fdatasync(self._fd)
        if self._drop_written and self._fd is not None:
            drop_cached(self._fd, self._dropped, self._size - self._dropped)
            self._dropped = self._size

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
        unlink_quietly(segment_path(self._dir, seq))
        unlink_quietly(ack_path(self._dir, seq))

    def _close(self) -> None:
        if self._fd is not None:
            self._abandon_segment()
        for seq in list(self._ack_files):
            f = self._ack_files.pop(seq)
            try:
                f.close()
            except OSError as e:
                log.warn("spool: cannot close acks of segment {seq}: {e}", seq=seq, e=e)
