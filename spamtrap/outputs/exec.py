"""Output ``type: exec``: pipe each message to a local command.

The procmail-era hook: the command gets one message on its standard input
(our X-Spamtrap-* metadata block, the trap-hop Received line, then the
message; line ends per ``line_endings``) and ``SPAMTRAP_ID``,
``SPAMTRAP_SET`` and ``SPAMTRAP_OUTPUT`` in its environment. Its exit
status says how it went, as sendmail and procmail read a delivery agent's:

- 0: sent;
- 75 (EX_TEMPFAIL): try again later (a temporary failure ``tempfail``);
- any other status: a permanent failure ``exit-status``, not retried;
- killed by a signal we did not send: temporary (``signal``);
- still running after ``timeout``: SIGTERM, then SIGKILL after
  ``kill_grace``; a temporary failure ``timeout``.

Each child runs in a thread of the output's own pool, started with
subprocess (see spamtrap.outputs._child for why not reactor.spawnProcess):
nothing here blocks the reactor, or takes its CPU. The runner bounds how
many run at once (``concurrency``).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from spamtrap.config.rules import _choice, _duration, _nonempty, rule
from spamtrap.config.schema import OutputConfig
from spamtrap.message import LINE_ENDINGS
from spamtrap.outputs._child import Children, Ended, SpawnError, run_child
from spamtrap.outputs.base import OutputContext, OutputItem, PermanentFailure, TemporaryFailure

EX_TEMPFAIL = 75  # sysexits.h
# What the child inherits of our environment (never our secrets, such as
# S3 or Redis credentials); SPAMTRAP_* are added per message.
PASSED_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER")


@dataclass(frozen=True, kw_only=True)
class Settings(OutputConfig):
    # The command and its arguments, run without a shell. argv[0] is an
    # absolute path or a name found on PATH when the config is loaded.
    argv: list[str] = field(metadata=rule(_nonempty, nonempty=True))
    # Seconds one run may take; then SIGTERM, and SIGKILL after kill_grace.
    timeout: float = field(default=60.0, metadata=rule(_duration(positive=True)))
    kill_grace: float = field(default=5.0, metadata=rule(_duration(positive=True)))
    # "unix": LF line ends (what procmail, formail and mutt expect), as a
    # set's line_endings; "wire": the bytes as received, CRLF metadata.
    line_endings: str = field(default="unix", metadata=rule(_choice(*LINE_ENDINGS)))

    def problems(self) -> list[tuple[str, str]]:
        found = super().problems()
        if self.argv and resolve_command(self.argv[0]) is None:
            where = "is not an executable file" if "/" in self.argv[0] else "is not found on PATH"
            found.append(("argv", f"command {self.argv[0]!r} {where}"))
        return found


def resolve_command(command: str) -> str | None:
    """The executable ``command`` names (a path, or a name on PATH), or None."""
    if "/" in command:
        if os.path.isfile(command) and os.access(command, os.X_OK):
            return os.path.abspath(command)
        return None
    return shutil.which(command)


class _DaemonThread(threading.Thread):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = True


class _Pool(ThreadPool):
    """The output's threads are daemons: a process that ends without
    closing the output (a test, a crash path) does not wait on them."""

    threadFactory = _DaemonThread


class ExecOutput:
    def __init__(
        self,
        name: str,
        settings: Settings,
        context: OutputContext,
        *,
        in_thread: Callable[..., Deferred[Ended]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.settings = settings
        self.reactor = context.reactor
        self._clock = clock
        self._children = Children()
        # One thread per running child, at most concurrency of them (the
        # runner starts no more): a child waits its timeout in its thread,
        # never in the reactor's own pool.
        self._pool: ThreadPool | None = None
        self._in_thread = in_thread if in_thread is not None else self._pooled

    def describe(self) -> str:
        return "exec " + " ".join(self.settings.argv)

    def _environment(self, item: OutputItem) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSED_ENVIRONMENT if k in os.environ}
        env.update(SPAMTRAP_ID=item.id, SPAMTRAP_SET=item.set_name, SPAMTRAP_OUTPUT=self.name)
        return env

    def _pooled(self, f: Callable[..., Ended], *args: Any, **kwargs: Any) -> Deferred[Ended]:
        if self._pool is None:
            self._pool = _Pool(0, self.settings.concurrency, name=f"spamtrap-exec-{self.name}")
            self._pool.start()
        return threads.deferToThreadPool(self.reactor, self._pool, f, *args, **kwargs)

    def send(self, item: OutputItem) -> Deferred[None]:
        s = self.settings
        command = resolve_command(s.argv[0])
        if command is None:  # removed since the config was loaded: may come back
            return defer.fail(TemporaryFailure("spawn", f"{s.argv[0]!r} is not an executable file"))
        d = self._in_thread(
            run_child,
            command,
            [s.argv[0], *s.argv[1:]],
            self._environment(item),
            item.envelope.stored_bytes(s.line_endings),
            s.timeout,
            s.kill_grace,
            self._children,
            self._children.generation,
            clock=self._clock,
        )
        return d.addCallbacks(_judge, _not_started, callbackArgs=(s,))

    def close(self) -> Deferred[None] | None:
        """Children still running at stop are killed (their entries stay
        queued and run again after the restart); fires once their threads
        have ended."""
        self._children.kill_all()
        pool, self._pool = self._pool, None
        if pool is None:
            return None
        # Joining the threads waits for the killed children's ends: in a
        # thread of the reactor's pool, not in the reactor.
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), pool.stop)


def _not_started(failure: Failure) -> None:
    failure.trap(SpawnError)
    raise TemporaryFailure("spawn", failure.getErrorMessage())


def _judge(ended: Ended, s: Settings) -> None:
    """Return for a delivered message; raise the failure the run was."""
    if ended.timed_out:
        raise TemporaryFailure("timeout", f"still running after {s.timeout:g}s; killed")
    if ended.status == 0:
        return
    tail = ended.stderr.decode("utf-8", "replace").strip()
    if ended.status is None:
        raise TemporaryFailure("signal", f"{s.argv[0]}: killed by signal {ended.signal}")
    detail = f"{s.argv[0]}: exit status {ended.status}" + (f": {tail}" if tail else "")
    if ended.status == EX_TEMPFAIL:
        raise TemporaryFailure("tempfail", detail)
    raise PermanentFailure("exit-status", detail)


def build(name: str, settings: Settings, context: OutputContext) -> ExecOutput:
    return ExecOutput(name, settings, context)
