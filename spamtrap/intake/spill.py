"""Unfinished DATA on disk instead of in memory.

The SMTP side holds each session's DATA in a bytearray until the end of
data. That is fastest, but 2,800 bots each holding an unfinished 7.5 MiB
message would fill the host. So the factory keeps a budget
(``smtp.data_memory_budget``) for open DATA across sessions; a session whose
DATA is larger than ``smtp.data_spill_threshold``, or whose read takes the
total past the budget, moves its DATA to a spill file under
``DATA/spill/<node>/`` and from then on keeps only the last few bytes in
memory (the end-of-data scan needs them).

What is written is the message content, dot-unstuffed on the way
(RFC 5321 4.5.2): unstuffing drops a dot that follows a line end, a rule
that looks at the two bytes before each dot only, so each piece is unstuffed
with the raw bytes before it as context and the file ends up byte for byte
what the in-memory path would have produced.

Writes run in a small thread pool, one job per spill at a time; bytes that
arrive meanwhile wait in memory, and a session with more than
``PENDING_MAX`` waiting stops reading from its peer until the job is done.
At the end of data the file is read back in that pool: the spool takes a
record as one bytes object, so one message per finishing spill is in memory
from then until the spool has it, and the factory lets at most
``data_memory_budget`` of such read-backs run at once (always at least one).

Spill files are never durable (no fsync): a spilled message has not been
acknowledged, so after a crash the client retries and the files left over
are deleted at the next start (:meth:`SpillDir.clean`).
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger()

# Bytes of the raw DATA a spilled session keeps in memory: the end-of-data
# scan looks back 4 bytes from each read, and one more for the byte before.
CONTEXT = 8
# Bytes waiting for the writer before the session stops reading its peer.
PENDING_MAX = 512 * 1024
# Largest single write: the writer thread must not join a huge backlog.
WRITE_CHUNK = 4 * 1024 * 1024

Runner = Callable[..., "defer.Deferred[Any]"]


class SpillError(Exception):
    """A spill file could not be written or read; the message gets 451."""


class SpillDir:
    """The node's spill directory and the threads that write to it."""

    def __init__(
        self,
        path: str,
        reactor: Any = None,
        run: Runner | None = None,
        threads_max: int = 2,
    ) -> None:
        self.path = path
        self._reactor = reactor
        self._run = run
        self._pool: ThreadPool | None = None
        self._threads_max = threads_max
        self._names = itertools.count()
        self.open_spills = 0
        # Read-backs at the end of data: at most ``limit`` bytes at once.
        self.reading = 0
        self._read_waiters: collections.deque[tuple[int, defer.Deferred[None]]] = (
            collections.deque()
        )
        self._limit = 0

    def clean(self) -> int:
        """Delete what a previous process left (never acknowledged mail);
        create the directory. Blocking: call it at start-up."""
        os.makedirs(self.path, mode=0o750, exist_ok=True)
        removed = 0
        for name in os.listdir(self.path):
            if name.endswith(".spill"):
                try:
                    os.unlink(os.path.join(self.path, name))
                    removed += 1
                except FileNotFoundError:
                    pass
        if removed:
            log.info(
                "removed {n} spill file(s) of unacknowledged DATA from {path}",
                n=removed,
                path=self.path,
            )
        return removed

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if self._run is not None:
            return self._run(f, *args)
        if self._pool is None:
            self._pool = ThreadPool(0, self._threads_max, name="spamtrap-spill")
            self._pool.start()
        return threads.deferToThreadPool(self._reactor, self._pool, f, *args)

    def stop(self) -> None:
        """Stop the threads (after the SMTP side has closed every session)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    def open(self, unstuff: bytes, skip: int = 0) -> Spill:
        """A new spill for one message; ``unstuff`` is the line end that a
        stuffed dot follows (CRLF for CRLF clients, LF for bare-LF ones),
        and the first ``skip`` content bytes are not kept (the line end the
        DATA scan puts in front)."""
        name = os.path.join(self.path, f"{os.getpid()}-{next(self._names)}.spill")
        return Spill(self, name, unstuff, skip)

    # -- the read-back budget ------------------------------------------------

    def reserve(self, size: int, limit: int) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if not self._read_waiters and (self.reading == 0 or self.reading + size <= limit):
            self.reading += size
            d.callback(None)
        else:
            self._read_waiters.append((size, d))
            self._limit = limit
        return d

    def unreserve(self, size: int) -> None:
        self.reading -= size
        while self._read_waiters:
            size, d = self._read_waiters[0]
            if self.reading and self.reading + size > self._limit:
                return
            self._read_waiters.popleft()
            self.reading += size
            d.callback(None)


class Spill:
    """One message's content on disk, unstuffed as it is written."""

    def __init__(self, directory: SpillDir, path: str, unstuff: bytes, skip: int = 0) -> None:
        self._dir = directory
        self._skip = skip
        self.path = path
        self._pattern = unstuff + b"."
        self._context = b""  # the raw bytes before the next piece
        self._pending: list[bytes] = []
        self.pending_bytes = 0
        self.size = 0  # content bytes, written or pending
        self._fd: int | None = None
        self._writing = False
        self._error: Exception | None = None
        self._closed = False
        self._flushed: list[defer.Deferred[None]] = []
        # Called in the reactor when the pending bytes fall to zero.
        self.on_drained: Callable[[], None] | None = None
        directory.open_spills += 1

    def feed(self, raw: bytes) -> None:
        """The next raw DATA bytes (still dot-stuffed)."""
        if self._closed or not raw or self._error is not None:
            return
        ctx = self._context
        joined = ctx + raw
        # The dot is the pattern's last byte, so the context (one byte
        # shorter than the pattern) is never changed by the replace.
        content = joined.replace(self._pattern, self._pattern[:-1])[len(ctx) :]
        self._context = joined[-(len(self._pattern) - 1) :]
        if self._skip:
            dropped = min(self._skip, len(content))
            content = content[dropped:]
            self._skip -= dropped
        if content:
            self._pending.append(content)
            self.pending_bytes += len(content)
            self.size += len(content)
            self._kick()

    def _kick(self) -> None:
        if self._writing or not self._pending or self._error is not None:
            return
        batch: list[bytes] = []
        n = 0
        while self._pending and n < WRITE_CHUNK:
            b = self._pending.pop(0)
            batch.append(b)
            n += len(b)
        self._writing = True
        d = self._dir.run(self._write, batch)
        d.addCallbacks(self._written, self._write_failed, callbackArgs=(n,))

    def _write(self, batch: list[bytes]) -> None:
        # In a thread.
        if self._fd is None:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o600)
        for b in batch:
            view = memoryview(b)
            while view:
                view = view[os.write(self._fd, view) :]

    def _written(self, _: Any, n: int) -> None:
        self._writing = False
        self.pending_bytes -= n
        if self._pending:
            self._kick()
            return
        self._idle()

    def _write_failed(self, failure: Any) -> None:
        self._writing = False
        self._error = SpillError(f"spill file {self.path}: {failure.getErrorMessage()}")
        self._pending.clear()
        self.pending_bytes = 0
        self._idle()

    def _idle(self) -> None:
        waiters, self._flushed = self._flushed, []
        for d in waiters:
            d.callback(None)
        if self.on_drained is not None:
            self.on_drained()

    def _flush(self) -> defer.Deferred[None]:
        if not self._writing and (not self._pending or self._error is not None):
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._flushed.append(d)
        return d

    async def content(self, limit: int) -> bytes:
        """The whole content, once written; the file is deleted after.
        Waits for the factory's read-back budget (``limit`` bytes)."""
        await self._flush()
        if self._error is not None:
            self.discard()
            raise self._error
        size = self.size
        await self._dir.reserve(size, limit)
        try:
            data: bytes = await self._dir.run(self._read_and_remove, size)
        except Exception as e:
            self._dir.unreserve(size)
            raise SpillError(f"spill file {self.path}: {e}") from e
        finally:
            self._close()
        return data

    def _read_and_remove(self, size: int) -> bytes:
        # In a thread. One pread of the whole size: one allocation, no join.
        fd, self._fd = self._fd, None
        try:
            if fd is None:
                return b""
            data = os.pread(fd, size, 0)
            if len(data) < size:  # a short read: rare, so the slow way
                parts = [data]
                got = len(data)
                while got < size:
                    more = os.pread(fd, size - got, got)
                    if not more:
                        raise SpillError(f"short read: {got} of {size} bytes")
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
            return data
        finally:
            if fd is not None:
                os.close(fd)
            _unlink(self.path)

    def discard(self) -> None:
        """The message is not wanted (too large, the session closed): drop
        the file once the write in flight is done."""
        if self._closed:
            return
        self._pending.clear()
        self.pending_bytes = 0
        self._close()
        d = self._flush()
        d.addCallback(lambda _: self._dir.run(self._remove))
        d.addErrback(lambda f: log.failure("cannot remove spill file {path}", f, path=self.path))

    def _remove(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        _unlink(self.path)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._dir.open_spills -= 1


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
