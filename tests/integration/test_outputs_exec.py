"""``type: exec`` with real commands: on the real reactor, a script that
files each message, exit statuses, and a hanging one killed at its
timeout; and run_child (spamtrap.outputs._child) with real children."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from spamtrap.config import RelayConfig
from spamtrap.message import Envelope
from spamtrap.outputs import _child
from spamtrap.outputs import exec as exec_kind
from spamtrap.outputs.base import OutputContext, OutputItem, PermanentFailure, TemporaryFailure


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def output(argv: list[str], **keys: Any) -> exec_kind.ExecOutput:
    settings = exec_kind.Settings(name="hook", type="exec", sets=["all"], argv=argv, **keys)
    context = OutputContext(reactor, "n1", "/nonexistent", RelayConfig(), "trap.example")
    return exec_kind.build("hook", settings, context)


def item(i: int, data: bytes = b"Subject: hi\r\n\r\nbody\r\n") -> OutputItem:
    env = Envelope(
        msg_id=f"ID{i}",
        received_at=1000.0,
        mail_from="a@b.example",
        rcpts=["v@trap.example"],
        data=data,
        meta={"id": [f"ID{i}"]},
    )
    return OutputItem(env, "all")


async def failure_of(d: defer.Deferred[Any]) -> Exception:
    try:
        await d
    except Exception as e:  # noqa: BLE001 - returned for the test to inspect
        return e
    raise AssertionError("the send succeeded")


@pytest_twisted.ensureDeferred
async def test_a_script_files_each_message_with_its_variables(tmp_path: Path) -> None:
    spool = tmp_path / "got"
    spool.mkdir()
    hook = script(
        tmp_path,
        "file.sh",
        f'cat > "{spool}/$SPAMTRAP_ID"\n'
        f'echo "$SPAMTRAP_SET $SPAMTRAP_OUTPUT $1" > "{spool}/$SPAMTRAP_ID.env"\n',
    )
    out = output([hook, "arg1"])
    big = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" * 1000  # more than a pipe buffer
    await defer.gatherResults([out.send(item(1)), out.send(item(2, big))])
    assert (spool / "ID1").read_bytes() == item(1).envelope.stored_bytes("unix")
    assert (spool / "ID2").read_bytes() == item(2, big).envelope.stored_bytes("unix")
    assert (spool / "ID1.env").read_text() == "all hook arg1\n"


@pytest_twisted.ensureDeferred
async def test_exit_statuses_are_read_as_sendmail_reads_them(tmp_path: Path) -> None:
    temp = await failure_of(output([script(tmp_path, "t.sh", "exit 75\n")]).send(item(1)))
    assert isinstance(temp, TemporaryFailure) and temp.reason == "tempfail"
    perm = await failure_of(
        output([script(tmp_path, "p.sh", "echo 'no such user' >&2\nexit 67\n")]).send(item(1))
    )
    assert isinstance(perm, PermanentFailure) and perm.reason == "exit-status"
    assert "exit status 67" in perm.detail and "no such user" in perm.detail
    # A command that does not read its input still ends cleanly.
    await output([script(tmp_path, "n.sh", "exit 0\n")]).send(item(1, b"x" * 1_000_000))


@pytest_twisted.ensureDeferred
async def test_a_hanging_command_is_killed_at_its_timeout(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # Ignores SIGTERM: only the SIGKILL after kill_grace ends it.
    body = f'trap "" TERM\necho $$ >> "{pids}"\nwhile :; do sleep 1; done\n'
    hang = script(tmp_path, "hang.sh", body)
    out = output([hang], timeout=0.5, kill_grace=0.5)
    started = time.monotonic()
    e = await failure_of(out.send(item(1)))
    took = time.monotonic() - started
    assert isinstance(e, TemporaryFailure) and e.reason == "timeout"
    assert 0.9 <= took < 10
    pid = int(pids.read_text().split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest_twisted.ensureDeferred
async def test_close_kills_what_still_runs(tmp_path: Path) -> None:
    hang = script(tmp_path, "hang.sh", "exec sleep 600\n")
    out = output([hang], timeout=600.0)
    d = out.send(item(1))
    out.close()
    e = await failure_of(d)
    assert isinstance(e, TemporaryFailure) and e.reason == "signal"


# run_child itself, in this thread, with real children. Its clock is the
# test's: it jumps once the child says it is ready, so the timeout comes at
# once and no test waits for one.


class ReadyClock:
    """0 until the child has touched ``ready``; then ``step`` further on
    each reading (0: it stays put)."""

    def __init__(self, ready: Path, step: float) -> None:
        self.ready, self.step, self.now = ready, step, 0.0

    def __call__(self) -> float:
        if self.ready.exists():
            self.now += self.step or (1000.0 if self.now == 0 else 0)
        return self.now


def signals_sent(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sent: list[int] = []
    real = _child._send

    def record(proc: Any, sig: int) -> None:
        sent.append(sig)
        real(proc, sig)

    monkeypatch.setattr(_child, "_send", record)
    return sent


def waiting(tmp_path: Path, *, ignore_term: bool) -> str:
    # SIG_IGN survives exec: sleep ignores SIGTERM as the shell did.
    trap = 'trap "" TERM\n' if ignore_term else ""
    ready = tmp_path / "ready"
    return script(tmp_path, "wait.sh", f'{trap}touch "{ready}"\necho ready >&2\nexec sleep 600\n')


def run(command: str, clock: Any, timeout: float = 10.0, **keys: Any) -> _child.Ended:
    children = keys.pop("children", _child.Children())
    generation = keys.pop("generation", children.generation)
    message = keys.pop("message", b"Subject: x\n\nbody\n")
    return _child.run_child(
        command, [command], {}, message, timeout, 10.0, children, generation, clock=clock
    )


def test_a_child_past_its_timeout_gets_sigterm_then_sigkill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = signals_sent(monkeypatch)
    ended = run(waiting(tmp_path, ignore_term=True), ReadyClock(tmp_path / "ready", 1000.0))
    assert sent == [signal.SIGTERM, signal.SIGKILL]
    assert ended.timed_out and ended.signal == signal.SIGKILL and ended.status is None
    assert ended.stderr == b"ready\n"


def test_a_child_that_ends_on_sigterm_gets_no_sigkill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = signals_sent(monkeypatch)
    ended = run(waiting(tmp_path, ignore_term=False), ReadyClock(tmp_path / "ready", 0.0))
    assert sent == [signal.SIGTERM]
    assert ended.timed_out and ended.signal == signal.SIGTERM


def test_a_grandchild_holding_stderr_does_not_hold_the_run(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"
    hook = script(tmp_path, "bg.sh", f'sleep 600 &\necho $! > "{pid_file}"\necho bye >&2\nexit 3\n')
    try:
        ended = run(hook, lambda: 0.0, timeout=600.0)
        assert (ended.status, ended.signal, ended.timed_out) == (3, None, False)
        assert ended.stderr == b"bye\n"
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_only_the_tail_of_stderr_is_kept(tmp_path: Path) -> None:
    hook = script(tmp_path, "loud.sh", "cat >&2\necho 'the last line' >&2\nexit 1\n")
    ended = run(hook, lambda: 0.0, message=b"y" * 300_000)  # more than the pipes hold
    assert len(ended.stderr) == _child.STDERR_KEPT
    assert ended.stderr.endswith(b"yyythe last line\n")


def test_a_run_started_before_a_close_kills_its_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = signals_sent(monkeypatch)
    children = _child.Children()
    before = children.generation
    children.kill_all()  # the close came while this run was on its way
    ended = run(
        script(tmp_path, "s.sh", "exec sleep 600\n"),
        lambda: 0.0,
        600.0,
        children=children,
        generation=before,
    )
    assert sent == [signal.SIGKILL] and ended.signal == signal.SIGKILL


def test_a_command_that_cannot_start_raises_spawn_error(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")  # not executable
    with pytest.raises(_child.SpawnError, match="ermission denied"):
        run(str(plain), lambda: 0.0)
    with pytest.raises(_child.SpawnError, match="No such file"):
        run(str(tmp_path / "gone"), lambda: 0.0)
