"""``type: exec`` with the run of the child recorded: what the child gets,
and how the output reads its end (``Ended``) as sendmail reads a delivery
agent's.

The children themselves (a script that files messages, one that hangs and
is killed, a grandchild that keeps stderr open) run in
tests/integration/test_outputs_exec.py and tests/system/test_outputs.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from spamtrap.config import RelayConfig
from spamtrap.message import Envelope
from spamtrap.outputs import _child
from spamtrap.outputs import exec as exec_kind
from spamtrap.outputs.base import (
    OutputContext,
    OutputFailure,
    OutputItem,
    PermanentFailure,
    TemporaryFailure,
)


class Runs:
    """Stands in for the output's thread pool: records each run_child call
    and answers it with what the test gives."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []
        self.pending: list[Deferred[_child.Ended]] = []

    def __call__(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[_child.Ended]:
        self.calls.append((f, args, kwargs))
        d: Deferred[_child.Ended] = Deferred()
        self.pending.append(d)
        return d

    def args(self, i: int = 0) -> dict[str, Any]:
        f, args, kwargs = self.calls[i]
        assert f is _child.run_child
        names = ("command", "argv", "env", "message", "timeout", "kill_grace", "children")
        return dict(zip(names, args, strict=False)) | {"generation": args[7]} | kwargs


def make(tmp_path: Path, **keys: Any) -> tuple[exec_kind.ExecOutput, Runs]:
    script = tmp_path / "hook"
    script.write_text("#!/bin/sh\ncat > /dev/null\n")
    script.chmod(0o755)
    values: dict[str, Any] = {"argv": [str(script), "--flag"], "timeout": 30.0}
    values.update(keys)
    settings = exec_kind.Settings(name="hook", type="exec", sets=["all"], **values)
    context = OutputContext(Clock(), "n1", str(tmp_path), RelayConfig(), "trap.example")
    runs = Runs()
    return exec_kind.ExecOutput("hook", settings, context, in_thread=runs), runs


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


def ended(
    status: int | None = 0, sig: int | None = None, stderr: bytes = b"", timed_out: bool = False
) -> _child.Ended:
    return _child.Ended(status=status, signal=sig, stderr=stderr, timed_out=timed_out)


def test_the_child_gets_the_message_and_our_variables_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    out, runs = make(tmp_path, timeout=12.0, kill_grace=3.0)
    d = out.send(item())
    run = runs.args()
    assert run["command"] == str(tmp_path / "hook")
    assert run["argv"] == [str(tmp_path / "hook"), "--flag"]
    # The message as a unix set stores it: our block, LF line ends.
    assert run["message"] == item().envelope.stored_bytes("unix")
    assert run["message"].startswith(b"X-Spamtrap-Id: ID1\n")
    assert (run["timeout"], run["kill_grace"]) == (12.0, 3.0)
    env = run["env"]
    assert env["SPAMTRAP_ID"] == "ID1"
    assert env["SPAMTRAP_SET"] == "private"
    assert env["SPAMTRAP_OUTPUT"] == "hook"
    assert env["PATH"] == "/usr/bin:/bin"
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert set(env) <= set(exec_kind.PASSED_ENVIRONMENT) | {
        "SPAMTRAP_ID",
        "SPAMTRAP_SET",
        "SPAMTRAP_OUTPUT",
    }
    assert not d.called
    runs.pending[0].callback(ended(0))
    assert outcome(d) is None


def test_wire_line_endings_pipe_the_bytes_as_received(tmp_path: Path) -> None:
    out, runs = make(tmp_path, line_endings="wire")
    out.send(item())
    assert runs.args()["message"] == item().envelope.stored_bytes("wire")
    assert runs.args()["message"].endswith(b"body\r\n")


@pytest.mark.parametrize(
    ("code", "sig", "kind", "reason"),
    [
        (75, None, TemporaryFailure, "tempfail"),
        (1, None, PermanentFailure, "exit-status"),
        (67, None, PermanentFailure, "exit-status"),
        (None, 9, TemporaryFailure, "signal"),
    ],
)
def test_the_exit_status_says_how_it_went(
    tmp_path: Path, code: int | None, sig: int | None, kind: type, reason: str
) -> None:
    out, runs = make(tmp_path)
    d = out.send(item())
    tail = (b"x" * 5000 + b"\nhook: mailbox locked\n")[-_child.STDERR_KEPT :]
    runs.pending[0].callback(ended(code, sig, tail))
    failure = outcome(d)
    assert type(failure) is kind and isinstance(failure, OutputFailure)
    assert failure.reason == reason
    if code is not None:
        assert f"exit status {code}" in failure.detail
        assert failure.detail.endswith("hook: mailbox locked")  # stderr's tail
        assert len(failure.detail) < 2200
    else:
        assert f"signal {sig}" in failure.detail


@pytest.mark.parametrize(
    ("code", "sig"), [(None, signal.SIGKILL), (None, signal.SIGTERM), (0, None)]
)
def test_a_run_past_its_timeout_is_a_timeout_however_it_ended(
    tmp_path: Path, code: int | None, sig: int | None
) -> None:
    # Even a child that exits 0 on SIGTERM did not deliver in time.
    out, runs = make(tmp_path, timeout=30.0)
    d = out.send(item())
    runs.pending[0].callback(ended(code, sig, timed_out=True))
    failure = outcome(d)
    assert isinstance(failure, TemporaryFailure) and failure.reason == "timeout"
    assert "30s" in failure.detail


def test_a_command_that_cannot_start_is_retried(tmp_path: Path) -> None:
    out, runs = make(tmp_path)
    d = out.send(item())
    runs.pending[0].errback(Failure(_child.SpawnError("Argument list too long")))
    failure = outcome(d)
    assert isinstance(failure, TemporaryFailure) and failure.reason == "spawn"
    assert "Argument list too long" in failure.detail
    os.unlink(tmp_path / "hook")  # removed since the config was loaded
    failure = outcome(out.send(item()))
    assert isinstance(failure, TemporaryFailure) and failure.reason == "spawn"
    assert len(runs.calls) == 1  # nothing was started for it


def test_an_error_in_the_run_itself_is_not_hidden(tmp_path: Path) -> None:
    out, runs = make(tmp_path)
    d = out.send(item())
    runs.pending[0].errback(Failure(ValueError("a bug")))
    assert isinstance(outcome(d), ValueError)  # the runner logs it as unexpected


def test_close_kills_the_children_of_runs_started_before_it(tmp_path: Path) -> None:
    out, runs = make(tmp_path)
    out.send(item())
    before = runs.args()["generation"]
    assert out.close() is None  # no pool was started: nothing to join
    out.send(item())
    # A run that registers its child after the close finds the generation
    # moved on, and kills its child (tests/integration: with real ones).
    children: _child.Children = runs.args(1)["children"]
    assert runs.args(1)["generation"] == children.generation == before + 1
    assert "hook" in out.describe()


def test_children_refuses_a_child_from_before_a_kill_all() -> None:
    children = _child.Children()
    old = children.generation
    assert children.kill_all() == 0
    assert not children.add(object(), old)  # type: ignore[arg-type]
    assert children.add(object(), children.generation)  # type: ignore[arg-type]


def test_the_pool_threads_are_daemons() -> None:
    # A process that ends without closing the output does not wait on them.
    pool = exec_kind._Pool(0, 3, name="spamtrap-exec-hook")
    thread = pool.threadFactory(target=lambda: None, name="t")
    assert thread.daemon and thread.name == "t"


def test_resolve_command_takes_paths_and_names_on_path(tmp_path: Path) -> None:
    assert exec_kind.resolve_command("sh") is not None
    assert exec_kind.resolve_command("no-such-command-x") is None
    assert exec_kind.resolve_command(str(tmp_path)) is None  # a directory
    plain = tmp_path / "plain"
    plain.write_text("")
    assert exec_kind.resolve_command(str(plain)) is None
    plain.chmod(0o755)
    assert exec_kind.resolve_command(str(plain)) == str(plain)
