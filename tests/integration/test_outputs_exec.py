"""``type: exec`` with real commands on the real reactor: a script that
files each message, exit statuses, and a hanging one killed at its timeout."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from spamtrap.config import RelayConfig
from spamtrap.message import Envelope
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
