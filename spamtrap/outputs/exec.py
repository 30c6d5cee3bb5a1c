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

Children are started with reactor.spawnProcess: nothing here blocks the
reactor. The runner bounds how many run at once (``concurrency``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from spamtrap.config.rules import _choice, _duration, _nonempty, rule
from spamtrap.config.schema import OutputConfig
from spamtrap.message import LINE_ENDINGS
from spamtrap.outputs.base import OutputContext, OutputItem, PermanentFailure, TemporaryFailure

log = Logger()

EX_TEMPFAIL = 75  # sysexits.h
# What the child inherits of our environment (never our secrets, such as
# S3 or Redis credentials); SPAMTRAP_* are added per message.
PASSED_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER")
_STDERR_KEPT = 2048  # the last bytes of the child's stderr, for the log


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


class _Child(protocol.ProcessProtocol):
    """One run: write the message, wait for the end, keep stderr's tail."""

    def __init__(self, message: bytes) -> None:
        self.message = message
        # Fires with how it ended (ProcessDone or ProcessTerminated), as a
        # value: a Failure given to callback() would fail the Deferred.
        self.ended: defer.Deferred[BaseException] = defer.Deferred()
        self.stderr = b""
        self.timed_out = False
        self.kill_timer: Any = None  # SIGKILL's, once SIGTERM was sent

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.message)
        transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        pass  # ignored (it must still be read, or the child blocks on a full pipe)

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-_STDERR_KEPT:]

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value or error.ProcessTerminated())


class ExecOutput:
    def __init__(self, name: str, settings: Settings, context: OutputContext) -> None:
        self.name = name
        self.settings = settings
        self.reactor = context.reactor
        self._children: set[Any] = set()  # the running children's transports

    def describe(self) -> str:
        return "exec " + " ".join(self.settings.argv)

    def _environment(self, item: OutputItem) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSED_ENVIRONMENT if k in os.environ}
        env.update(SPAMTRAP_ID=item.id, SPAMTRAP_SET=item.set_name, SPAMTRAP_OUTPUT=self.name)
        return env

    @defer.inlineCallbacks
    def send(self, item: OutputItem) -> Any:
        s = self.settings
        command = resolve_command(s.argv[0])
        if command is None:  # removed since the config was loaded: may come back
            raise TemporaryFailure("spawn", f"{s.argv[0]!r} is not an executable file")
        child = _Child(item.envelope.stored_bytes(s.line_endings))
        try:
            transport = self.reactor.spawnProcess(
                child, command, [s.argv[0], *s.argv[1:]], env=self._environment(item)
            )
        except OSError as e:
            raise TemporaryFailure("spawn", str(e))
        self._children.add(transport)
        timer = self.reactor.callLater(s.timeout, self._stop, child, transport)
        try:
            ended = yield child.ended
        finally:
            self._children.discard(transport)
            for call in (timer, child.kill_timer):
                if call is not None and call.active():
                    call.cancel()
        _judge(child, ended, s)

    def _stop(self, child: _Child, transport: Any) -> None:
        child.timed_out = True
        _signal(transport, "TERM")
        child.kill_timer = self.reactor.callLater(
            self.settings.kill_grace, _signal, transport, "KILL"
        )

    def close(self) -> defer.Deferred[None] | None:
        """Children still running at stop are killed (their entries stay
        queued and run again after the restart)."""
        for transport in list(self._children):
            _signal(transport, "KILL")
        return None


def _signal(transport: Any, name: str) -> None:
    try:
        transport.signalProcess(name)
    except error.ProcessExitedAlready:
        pass


def _judge(child: _Child, ended: BaseException, s: Settings) -> None:
    """Return for a delivered message; raise the failure the run was."""
    if child.timed_out:
        raise TemporaryFailure("timeout", f"still running after {s.timeout:g}s; killed")
    if isinstance(ended, error.ProcessDone):
        return
    value: Any = ended
    status = getattr(value, "exitCode", None)
    tail = child.stderr.decode("utf-8", "replace").strip()
    detail = f"{s.argv[0]}: " + (f"exit status {status}" if status is not None else "ended")
    detail += f": {tail}" if tail else ""
    if status == EX_TEMPFAIL:
        raise TemporaryFailure("tempfail", detail)
    if status is None and getattr(value, "signal", None) is not None:
        raise TemporaryFailure("signal", f"{s.argv[0]}: killed by signal {value.signal}")
    raise PermanentFailure("exit-status", detail)


def build(name: str, settings: Settings, context: OutputContext) -> ExecOutput:
    return ExecOutput(name, settings, context)
