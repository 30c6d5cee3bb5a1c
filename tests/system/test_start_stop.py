"""What a real twistd node says when it cannot start, when its disk is full
and when it stops: exit codes, /healthz and the log tell the truth.

The disk-full tests mount a small tmpfs (root only: they skip loudly
elsewhere, and fail under CI=true).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from spamtrap.bundle.mbox import read_mbox
from tests.support.node import REPO, TWISTD, Node, RawSMTP, bundles, free_port
from tests.support.poll import wait_until

TINY = "4m"


def twistd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "--logfile=-", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


# -- start-up errors ------------------------------------------------------------


def test_a_bad_config_exits_1_with_the_errors_only(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("traps: {domains: [a.example]}\nsmtp: {max_message_size: lots}\n")
    out = twistd("spamtrap", "--config", str(config), "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 1, out
    assert out.stderr.splitlines() == [
        "twistd spamtrap: configuration errors:",
        f"{config}:2: smtp.max_message_size: not a size: 'lots' (use e.g. 512, 64KiB, 8MiB, 1GiB)",
        "(twistd spamtrap --help lists the options)",
    ]
    assert out.stdout == ""  # not twistd's whole help text
    assert not (tmp_path / "d").exists()


def test_an_unknown_option_exits_1(tmp_path: Path) -> None:
    out = twistd("spamtrap", "--no-such-option")
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr.startswith("twistd spamtrap: option --no-such-option not recognized\n")


def test_a_port_in_use_is_one_error_line_and_exit_1(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out = twistd("spamtrap", "--data-dir", str(tmp_path),
                     "--smtp", f"tcp:{port}:interface=127.0.0.1",
                     "--http", "tcp:0:interface=127.0.0.1")  # fmt: skip
    assert out.returncode == 1, out.stdout
    text = out.stdout + out.stderr
    problems = [ln for ln in text.splitlines() if re.search(r"#(warn|error|critical)\]", ln)]
    assert len(problems) == 1, text
    assert problems[0].endswith(
        f"[spamtrap.service.compose#critical] cannot listen on tcp:{port}:interface=127.0.0.1: "
        f"Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use; exiting"
    ), text
    for noise in ("Traceback", "ReactorNotRunning", " started as ", "stopped"):
        assert noise not in text, text


# -- a full disk ------------------------------------------------------------------


def mount_tmpfs(where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    problem = ""
    if os.geteuid() != 0:
        problem = "needs root to mount a tmpfs"
    else:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TINY}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            problem = f"mount -t tmpfs is not permitted here: {done.stderr.strip()}"
    if problem and os.environ.get("CI"):
        pytest.fail(f"CI must not skip: {problem}")
    if problem:
        pytest.skip(f"SKIPPED LOUDLY: {problem}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """Mount points for tmpfs file systems of 4 MiB; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(where: Path) -> Path:
        mount_tmpfs(where)
        mounted.append(where)
        return where

    yield mount  # type: ignore[misc]
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], check=False)


def fill(directory: Path) -> Path:
    """Take every free byte of the file system: a file that grows to ENOSPC."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return filler


def health(node: Node) -> tuple[int, dict[str, object]]:
    code, body = node.http_get("/healthz")
    return code, json.loads(body)


def message(size: int) -> bytes:
    # Random text: incompressible enough that its bundle must grow on disk.
    body = os.urandom(size // 2).hex()
    lines = "\r\n".join(body[i : i + 76] for i in range(0, len(body), 76))
    return f"Subject: big\r\n\r\n{lines}\r\n".encode()


def send_expecting(smtp: RawSMTP, data: bytes, code: int) -> bytes:
    smtp.cmd(b"MAIL FROM:<bot@spam.example>", 250)
    smtp.cmd(b"RCPT TO:<trap@trap.example>", 250)
    smtp.cmd(b"DATA", 354)
    smtp.sock.sendall(data + b".\r\n")
    return smtp.expect(code)


def test_a_full_spool_disk_makes_health_degraded_until_writes_succeed(
    tmpfs: object, tmp_path: Path
) -> None:
    data = tmpfs(tmp_path / "data")  # type: ignore[operator]
    node = Node(data, extra=["--node", "full"]).start()
    try:
        smtp = RawSMTP(node.host, node.smtp_port)
        send_expecting(smtp, message(1000), 250)
        code, doc = health(node)
        assert (code, doc["status"]) == (200, "ok"), doc

        filler = fill(data)
        for _ in range(3):
            reply = send_expecting(smtp, message(100_000), 451)
        assert b"4.3.0" in reply
        code, doc = health(node)
        assert (code, doc["status"]) == (503, "degraded"), doc
        (problem,) = doc["problems"]  # type: ignore[misc]
        assert re.fullmatch(
            r"spool: write failed: No space left on device since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
            problem,
        ), problem

        filler.unlink()
        send_expecting(smtp, message(100_000), 250)
        code, doc = health(node)
        assert (code, doc["status"], "problems" in doc) == (200, "ok", False), doc
        smtp.close()
    finally:
        node.stop()
    log = node.log()
    # One line when the outage began, one when it ended: not one per 451.
    assert log.count("spool: write failed: No space left on device") == 1, log
    assert len(re.findall(r"spool: writes succeed again after \d+s of failures", log)) == 1, log


def test_the_stop_message_says_what_stays_in_the_spool(tmpfs: object, tmp_path: Path) -> None:
    # The spool has room, the open bundles' disk does not: every message
    # gets its 250 and none can be written into a bundle.
    data = tmp_path / "data"
    opened = tmpfs(data / "open")  # type: ignore[operator]
    filler = fill(opened)
    node = Node(data, extra=["--node", "full"]).start()
    try:
        smtp = RawSMTP(node.host, node.smtp_port)
        for _ in range(5):
            send_expecting(smtp, message(200_000), 250)
        smtp.close()
    finally:
        assert node.stop() in (0, -15), node.log()
    log = node.log()
    assert (
        "spamtrap node full stopped; 5 messages remain in the spool and will be processed"
        " on the next start" in log
    ), log
    assert "stopped cleanly" not in log
    assert bundles(data) == []

    # And so they are, once there is room again.
    filler.unlink()
    node = Node(data, extra=["--node", "full"], smtp_port=node.smtp_port,
                http_port=node.http_port).start()  # fmt: skip
    assert node.stop() in (0, -15), node.log()
    assert "spamtrap node full stopped cleanly; the spool is empty" in node.log()
    (bundle,) = bundles(data)
    assert len(list(read_mbox(str(bundle)))) == 5


def poll_health(node: Node, code: int, seconds: float = 30) -> dict[str, object]:
    """/healthz once it answers ``code``: bundles are written after the 250."""
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: health(node)[0] == code, seconds, interval=0.1)
    got, doc = health(node)
    assert got == code, doc
    return doc


def test_a_full_bundle_disk_makes_health_degraded_until_writes_succeed(
    tmpfs: object, tmp_path: Path
) -> None:
    # The spool has room, the open bundles' disk does not: mail gets its
    # 250 and stays spooled, and /healthz must say so.
    data = tmp_path / "data"
    opened = tmpfs(data / "open")  # type: ignore[operator]
    node = Node(data, extra=["--node", "full"]).start()
    try:
        smtp = RawSMTP(node.host, node.smtp_port)
        code, doc = health(node)
        assert (code, doc["status"]) == (200, "ok"), doc

        filler = fill(opened)
        for _ in range(3):
            send_expecting(smtp, message(200_000), 250)
        doc = poll_health(node, 503)
        assert doc["status"] == "degraded", doc
        (problem,) = doc["problems"]  # type: ignore[misc]
        assert re.fullmatch(
            r"bundles: set all: write failed: No space left on device"
            r" since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
            problem,
        ), problem

        filler.unlink()
        send_expecting(smtp, message(200_000), 250)
        doc = poll_health(node, 200)
        assert (doc["status"], "problems" in doc) == ("ok", False), doc
        smtp.close()
    finally:
        node.stop()
    assert re.search(r"set all: bundle writes succeed again after \d+s of failures", node.log())
