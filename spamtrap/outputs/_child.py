"""One run of a local command for ``type: exec``, in a worker thread.

The children are started with ``subprocess``, not ``reactor.spawnProcess``.
Twisted lists /proc/self/fd and adds a close action per open descriptor, in
the reactor thread: 620 µs of the reactor's CPU per child with 100
descriptors open, 2.9 ms with 2,000 (a node holding thousands of SMTP
sessions). subprocess closes them in C in the child (close_range): 315 and
441 µs (``/bin/cat`` of 4 KiB, 200 runs each, 2026-12-03). Here that is
spent in a worker thread. The thread then waits for the child in
``select()``, without the GIL.

``run_child`` writes the message to the child's stdin and keeps the tail
of its stderr; stdout goes to /dev/null. It signals the child at its
timeout: SIGTERM, then SIGKILL after the grace. It returns how the child
ended. The child's end is watched through a pidfd, so a grandchild that
keeps stderr open does not keep the run going.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

STDERR_KEPT = 2048  # the last bytes of the child's stderr, for the log
# Without a pidfd (a kernel before 5.3), how often the end is checked.
POLL = 0.05
# What is read of stderr once the child has ended: what it wrote before
# its end, not what a grandchild goes on writing.
DRAIN_LIMIT = 1024 * 1024
_CHUNK = 65536


class SpawnError(Exception):
    """The command could not be started (subprocess raised OSError)."""


@dataclass(frozen=True)
class Ended:
    """How a run ended."""

    status: int | None  # the exit status; None when a signal ended it
    signal: int | None  # the signal that ended it
    stderr: bytes  # the last STDERR_KEPT bytes of its stderr
    timed_out: bool  # it was still running at its timeout (and was signalled)


class Children:
    """The running children of one output, so that ``kill_all`` (the
    reactor, at close) reaches them while worker threads wait on them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        # Bumped by kill_all: a run started before it registers its child
        # after it, and kills it then (a close must miss no child).
        self.generation = 0

    def add(self, proc: subprocess.Popen[bytes], generation: int) -> bool:
        """Track ``proc``; False (untracked) when a kill_all came since
        ``generation``: the caller kills it."""
        with self._lock:
            if generation != self.generation:
                return False
            self._running.add(proc)
            return True

    def discard(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._running.discard(proc)

    def kill_all(self) -> int:
        """SIGKILL every running child; their runs end with signal 9."""
        with self._lock:
            self.generation += 1
            running = list(self._running)
        for proc in running:
            _send(proc, signal.SIGKILL)
        return len(running)


def run_child(
    command: str,
    argv: Sequence[str],
    env: dict[str, str],
    message: bytes,
    timeout: float,
    kill_grace: float,
    children: Children,
    generation: int,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Ended:
    """Run ``command`` (``argv[0]`` as its name) with ``message`` on stdin,
    blocking this (worker) thread until it ends; raises SpawnError when it
    cannot start."""
    try:
        proc = subprocess.Popen(  # noqa: S603 - the configured command, without a shell
            list(argv),
            executable=command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
    except OSError as e:
        raise SpawnError(e.strerror or str(e)) from e
    try:
        if not children.add(proc, generation):
            _send(proc, signal.SIGKILL)  # closing: the output is stopping
        return _watch(proc, message, timeout, kill_grace, clock)
    finally:
        children.discard(proc)
        for pipe in (proc.stdin, proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        if proc.returncode is None:  # only if _watch failed: never leave a zombie
            _send(proc, signal.SIGKILL)
            proc.wait()


def _watch(
    proc: subprocess.Popen[bytes],
    message: bytes,
    timeout: float,
    kill_grace: float,
    clock: Callable[[], float],
) -> Ended:
    assert proc.stdin is not None and proc.stderr is not None
    stdin, stderr = proc.stdin.fileno(), proc.stderr.fileno()
    os.set_blocking(stdin, False)
    os.set_blocking(stderr, False)
    tail = bytearray()
    with selectors.DefaultSelector() as sel:
        pidfd = _pidfd(proc.pid)
        try:
            if pidfd is not None:
                sel.register(pidfd, selectors.EVENT_READ, "end")
            sel.register(stderr, selectors.EVENT_READ, "stderr")
            pending = memoryview(message)
            if pending:
                sel.register(stdin, selectors.EVENT_WRITE, "stdin")
            else:
                proc.stdin.close()
            timed_out, kill_at = False, None
            term_at = clock() + timeout
            ended = False
            while not ended:
                now = clock()
                if not timed_out and now >= term_at:
                    timed_out, kill_at = True, now + kill_grace
                    _send(proc, signal.SIGTERM)
                    continue  # the clock is read again for the wait
                if kill_at is not None and now >= kill_at:
                    kill_at = None  # from here on, wait for the end it brings
                    _send(proc, signal.SIGKILL)
                    continue
                deadline = kill_at if timed_out else term_at
                wait = None if deadline is None else max(0.0, deadline - now)
                if pidfd is None:
                    wait = POLL if wait is None else min(wait, POLL)
                for key, _ in sel.select(wait):
                    if key.data == "end":
                        ended = True
                    elif key.data == "stderr":
                        if _read_into(stderr, tail) == 0:  # its end of the pipe closed
                            sel.unregister(stderr)
                    else:
                        pending = _write_some(stdin, pending)
                        if not pending:  # all written, or the child closed its stdin
                            sel.unregister(stdin)
                            proc.stdin.close()
                if pidfd is None and proc.poll() is not None:
                    ended = True
        finally:
            if pidfd is not None:
                os.close(pidfd)
    # What it wrote to stderr before it ended (bounded: a grandchild may
    # still hold the pipe and write on).
    drained = 0
    while drained < DRAIN_LIMIT:
        n = _read_into(stderr, tail)
        if not n:
            break
        drained += n
    status = proc.wait()
    return Ended(
        status=status if status >= 0 else None,
        signal=-status if status < 0 else None,
        stderr=bytes(tail),
        timed_out=timed_out,
    )


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
        return None


def _read_into(fd: int, tail: bytearray) -> int | None:
    """Read what is there into ``tail`` (keeping its last STDERR_KEPT
    bytes): the bytes read, 0 at the end of the pipe (or a read error),
    None when nothing waits."""
    try:
        chunk = os.read(fd, _CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return 0
    tail += chunk
    del tail[:-STDERR_KEPT]
    return len(chunk)


def _write_some(fd: int, pending: memoryview) -> memoryview:
    """Write what the pipe takes; what is left (empty once all is written,
    or when the child closed its end: the rest is dropped, as a delivery
    agent that exits without reading all of its input)."""
    try:
        return pending[os.write(fd, pending) :]
    except BlockingIOError:
        return pending
    except OSError:  # EPIPE: it closed its stdin
        return pending[:0]


def _send(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        proc.send_signal(sig)
    except OSError:  # ended and reaped meanwhile
        pass
