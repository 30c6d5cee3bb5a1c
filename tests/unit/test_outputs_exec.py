"""``type: exec`` against a stand-in for spawnProcess: what the child gets,
how its end is read, and the timeout's SIGTERM then SIGKILL.

The real commands (a script that files messages, one that hangs) run in
tests/integration/test_outputs_exec.py and tests/system/test_outputs.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from spamtrap.config import RelayConfig
from spamtrap.message import Envelope
from spamtrap.outputs import exec as exec_kind
from spamtrap.outputs.base import (
    OutputContext,
    OutputFailure,
    OutputItem,
    PermanentFailure,
    TemporaryFailure,
)


class Child:
    """What spawnProcess returned: records what the output does to it."""

    def __init__(self, proto: Any, executable: str, args: list[str], env: dict[str, str]) -> None:
        self.proto, self.executable, self.args, self.env = proto, executable, args, env
        self.stdin = b""
        self.stdin_closed = False
        self.signals: list[str] = []
        self.ended = False
        proto.makeConnection(self)

    def write(self, data: bytes) -> None:
        self.stdin += data

    def closeStdin(self) -> None:  # noqa: N802 - the transport's name
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:  # noqa: N802
        if self.ended:
            raise error.ProcessExitedAlready()
        self.signals.append(name)

    def end(self, code: int | None = 0, signal: int | None = None) -> None:
        self.ended = True
        if code == 0 and signal is None:
            reason = Failure(error.ProcessDone(0))
        else:
            reason = Failure(error.ProcessTerminated(exitCode=code, signal=signal))
        self.proto.processEnded(reason)


class Reactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.children: list[Child] = []
        self.refuse: OSError | None = None

    def spawnProcess(  # noqa: N802 - IReactorProcess's name
        self, proto: Any, executable: str, args: list[str], env: dict[str, str]
    ) -> Child:
        if self.refuse is not None:
            raise self.refuse
        child = Child(proto, executable, args, env)
        self.children.append(child)
        return child


def make(tmp_path: Path, **keys: Any) -> tuple[exec_kind.ExecOutput, Reactor]:
    script = tmp_path / "hook"
    script.write_text("#!/bin/sh\ncat > /dev/null\n")
    script.chmod(0o755)
    values: dict[str, Any] = {"argv": [str(script), "--flag"], "timeout": 30.0}
    values.update(keys)
    settings = exec_kind.Settings(name="hook", type="exec", sets=["all"], **values)
    reactor = Reactor()
    context = OutputContext(reactor, "n1", str(tmp_path), RelayConfig(), "trap.example")
    return exec_kind.build("hook", settings, context), reactor


def item(attempt: int = 1) -> OutputItem:
    env = Envelope(
        msg_id="ID1",
        received_at=1000.0,
        mail_from="a@b.example",
        rcpts=["v@trap.example"],
        data=b"Subject: hi\r\n\r\nbody\r\n",
        meta={"id": ["ID1"]},
    )
    return OutputItem(env, "private", attempt)


def outcome(d: Deferred[Any]) -> Any:
    got: list[Any] = []
    d.addBoth(got.append)
    assert got, "the send has not ended"
    return got[0].value if isinstance(got[0], Failure) else got[0]


def test_the_child_gets_the_message_and_our_variables_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    out, reactor = make(tmp_path)
    d = out.send(item())
    (child,) = reactor.children
    assert child.executable == str(tmp_path / "hook")
    assert child.args == [str(tmp_path / "hook"), "--flag"]
    # The message as a unix set stores it: our block, LF line ends.
    assert child.stdin == item().envelope.stored_bytes("unix")
    assert child.stdin.startswith(b"X-Spamtrap-Id: ID1\n")
    assert child.stdin_closed
    assert child.env["SPAMTRAP_ID"] == "ID1"
    assert child.env["SPAMTRAP_SET"] == "private"
    assert child.env["SPAMTRAP_OUTPUT"] == "hook"
    assert child.env["PATH"] == "/usr/bin:/bin"
    assert "AWS_SECRET_ACCESS_KEY" not in child.env
    assert set(child.env) <= set(exec_kind.PASSED_ENVIRONMENT) | {
        "SPAMTRAP_ID",
        "SPAMTRAP_SET",
        "SPAMTRAP_OUTPUT",
    }
    child.end(0)
    assert outcome(d) is None
    assert reactor.getDelayedCalls() == []  # the timeout was cancelled


def test_wire_line_endings_pipe_the_bytes_as_received(tmp_path: Path) -> None:
    out, reactor = make(tmp_path, line_endings="wire")
    out.send(item())
    assert reactor.children[0].stdin == item().envelope.stored_bytes("wire")
    assert reactor.children[0].stdin.endswith(b"body\r\n")


@pytest.mark.parametrize(
    ("code", "signal", "kind", "reason"),
    [
        (75, None, TemporaryFailure, "tempfail"),
        (1, None, PermanentFailure, "exit-status"),
        (67, None, PermanentFailure, "exit-status"),
        (None, 9, TemporaryFailure, "signal"),
    ],
)
def test_the_exit_status_says_how_it_went(
    tmp_path: Path, code: int | None, signal: int | None, kind: type, reason: str
) -> None:
    out, reactor = make(tmp_path)
    d = out.send(item())
    child = reactor.children[0]
    child.proto.errReceived(b"x" * 5000 + b"\nhook: mailbox locked\n")
    child.end(code, signal)
    failure = outcome(d)
    assert type(failure) is kind and isinstance(failure, OutputFailure)
    assert failure.reason == reason
    if code is not None:
        assert f"exit status {code}" in failure.detail
        assert failure.detail.endswith("hook: mailbox locked")  # stderr's tail
        assert len(failure.detail) < 2200


def test_a_child_past_its_timeout_gets_sigterm_then_sigkill(tmp_path: Path) -> None:
    out, reactor = make(tmp_path, timeout=30.0, kill_grace=5.0)
    d = out.send(item())
    child = reactor.children[0]
    reactor.advance(29.9)
    assert child.signals == []
    reactor.advance(0.1)
    assert child.signals == ["TERM"]
    reactor.advance(4.9)
    assert child.signals == ["TERM"]
    reactor.advance(0.1)
    assert child.signals == ["TERM", "KILL"]
    assert not d.called
    child.end(None, 9)
    failure = outcome(d)
    assert isinstance(failure, TemporaryFailure) and failure.reason == "timeout"
    assert reactor.getDelayedCalls() == []


def test_a_child_that_ends_on_sigterm_gets_no_sigkill(tmp_path: Path) -> None:
    out, reactor = make(tmp_path, timeout=1.0, kill_grace=5.0)
    d = out.send(item())
    child = reactor.children[0]
    reactor.advance(1.0)
    child.end(None, 15)
    assert outcome(d).reason == "timeout"
    reactor.advance(10)
    assert child.signals == ["TERM"]


def test_a_command_that_cannot_start_is_retried(tmp_path: Path) -> None:
    out, reactor = make(tmp_path)
    reactor.refuse = OSError(7, "Argument list too long")
    failure = outcome(out.send(item()))
    assert isinstance(failure, TemporaryFailure) and failure.reason == "spawn"
    os.unlink(tmp_path / "hook")  # removed since the config was loaded
    reactor.refuse = None
    failure = outcome(out.send(item()))
    assert isinstance(failure, TemporaryFailure) and failure.reason == "spawn"
    assert reactor.children == []


def test_close_kills_the_children_still_running(tmp_path: Path) -> None:
    out, reactor = make(tmp_path)
    out.send(item())
    second = out.send(item())
    reactor.children[1].end(0)
    assert outcome(second) is None
    out.close()
    assert reactor.children[0].signals == ["KILL"]
    assert reactor.children[1].signals == []
    assert "hook" in out.describe()


def test_resolve_command_takes_paths_and_names_on_path(tmp_path: Path) -> None:
    assert exec_kind.resolve_command("sh") is not None
    assert exec_kind.resolve_command("no-such-command-x") is None
    assert exec_kind.resolve_command(str(tmp_path)) is None  # a directory
    plain = tmp_path / "plain"
    plain.write_text("")
    assert exec_kind.resolve_command(str(plain)) is None
    plain.chmod(0o755)
    assert exec_kind.resolve_command(str(plain)) == str(plain)
