"""Run a real ``twistd -n spamtrap`` process and talk to it over loopback."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.poll import wait_until

REPO = Path(__file__).resolve().parents[2]
TWISTD = Path(sys.executable).parent / "twistd"
CLEAN_EXIT = (0, -signal.SIGTERM)  # twistd re-raises SIGTERM after a clean stop


def require_binary(name: str) -> str:
    """The path of a Debian-packaged tool; skip loudly without it, fail in CI."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path:
        return path
    msg = f"{name} is not installed (apt-get install it, or run `make test`)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must not skip: {msg}")
    pytest.skip(f"SKIPPED LOUDLY: {msg}")
    raise AssertionError("unreachable")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(
    host: str, port: int, proc: subprocess.Popen[bytes], deadline: float = 30
) -> None:
    # Polls a real process's port: there is no clock to inject across a fork.
    def listening() -> bool:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"twistd exited with {proc.returncode} before listening:\n{out}")
        with socket.create_connection((host, port), timeout=1) as s:
            s.recv(100)
        return True

    wait_until(listening, deadline, f"a listener on {host}:{port}", retry_on=(OSError,))


@dataclass
class Node:
    data_dir: Path
    config: Path | None = None
    host: str = "127.0.0.1"
    smtp_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self) -> Node:
        args = [str(TWISTD), "-n", "--pidfile=", "--logfile", str(self.data_dir / "twistd.log")]
        args += ["spamtrap", "--data-dir", str(self.data_dir)]
        args += ["--smtp", f"tcp:{self.smtp_port}:interface={self.host}"]
        args += ["--http", f"tcp:{self.http_port}:interface={self.host}"]
        if self.config:
            args += ["--config", str(self.config)]
        args += self.extra
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "twistd.log"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        if self.takes_mail:
            wait_for_port(self.host, self.smtp_port, self.proc)
        else:
            self.wait_for_http()
        return self

    @property
    def takes_mail(self) -> bool:
        """False for a ``--role worker`` node: it has no SMTP port to wait for."""
        role = self.extra[self.extra.index("--role") + 1] if "--role" in self.extra else "all"
        return role != "worker"

    def wait_for_http(self, deadline: float = 30) -> None:
        # Polls a real process's HTTP port: no clock to inject across a fork.
        proc = self.proc
        assert proc is not None

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"twistd exited with {proc.returncode}:\n{self.log()}")
            return self.http_get("/healthz")[0] == 200

        wait_until(healthy, deadline, f"HTTP on {self.host}:{self.http_port}", retry_on=(OSError,))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"twistd did not stop in {timeout}s:\n{self.log()}")
        return self.proc.returncode

    def log(self) -> str:
        out = (
            self.log_path.read_text(errors="replace")
            if self.log_path and self.log_path.exists()
            else ""
        )
        return out[-5000:]

    def http_get(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{self.host}:{self.http_port}{path}")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback only
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metric(self, name: str) -> float:
        _, body = self.http_get("/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if re.match(re.escape(name) + r"(\{.*\})? ", line):
                total += float(line.rsplit(" ", 1)[1])
        return total


class SMTPError(Exception):
    pass


class RawSMTP:
    """A byte-exact SMTP client (smtplib rewrites bare LF; a trap test must not)."""

    def __init__(self, host: str, port: int, timeout: float = 30) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.expect(220)

    def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise SMTPError("connection closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)

    def expect(self, code: int) -> bytes:
        got, text = self.reply()
        if got != code:
            raise SMTPError(f"expected {code}, got {text!r}")
        return text

    def cmd(self, line: bytes, code: int) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.expect(code)

    def send(self, mail_from: bytes, rcpts: list[bytes], data: bytes) -> str:
        """One transaction; returns the queue id from the 250 reply."""
        self.cmd(b"MAIL FROM:<" + mail_from + b">", 250)
        for r in rcpts:
            self.cmd(b"RCPT TO:<" + r + b">", 250)
        self.cmd(b"DATA", 354)
        stuffed = b"\r\n".join(
            b"." + ln if ln.startswith(b".") else ln for ln in data.split(b"\r\n")
        )
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        self.sock.sendall(stuffed + b".\r\n")
        text = self.expect(250)
        return text.rsplit(b" ", 1)[1].decode()

    def close(self) -> None:
        try:
            self.cmd(b"QUIT", 221)
        except (OSError, SMTPError):
            pass
        self.sock.close()


def bundles(data_dir: Path, set_name: str = "all") -> list[Path]:
    return sorted((data_dir / "bundles" / set_name).glob("*.mbox.gz"))


def stored_ids(data_dir: Path, set_name: str = "all") -> list[str]:
    """The X-Spamtrap-Id of every message in the set's stored bundles."""
    out = []
    for path in bundles(data_dir, set_name):
        for line in gzip.decompress(path.read_bytes()).split(b"\n"):
            if line.startswith(b"X-Spamtrap-Id: "):
                out.append(line.split(b": ", 1)[1].strip().decode())
    return out


def wait_for(what: str, cond: Callable[[], object], node: Node, timeout: float = 60) -> None:
    """Poll ``cond`` while ``node`` runs (a node that exits fails at once);
    AssertionError with the node's log after ``timeout`` seconds."""

    def ready() -> bool:
        if cond():
            return True
        assert node.proc is not None and node.proc.poll() is None, node.log()
        return False

    try:
        wait_until(ready, timeout, what, interval=0.1)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}\n{node.log()}") from None


def metric(node: Node, name: str, **labels: str) -> float:
    """One labelled sample from /metrics (0 when absent)."""
    _, body = node.http_get("/metrics")
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for line in body.decode().splitlines():
        m = re.match(re.escape(name) + r"(?:\{(.*)\})? (\S+)$", line)
        if m and want <= set((m.group(1) or "").split(",")) - {""}:
            total += float(m.group(2))
    return total


def health(node: Node) -> tuple[int, dict[str, object]]:
    status, body = node.http_get("/healthz")
    return status, json.loads(body)


def split_metadata(message: bytes, rebuild: bool = True) -> tuple[bytes, bytes]:
    """Our prepended block (X-Spamtrap-* + trap Received) and the exact bytes
    the client sent (rebuilt from unix line ends, as consumers do); with
    ``rebuild=False`` the message as stored instead (either block line ends)."""
    from spamtrap.message import split_block, wire_bytes

    block, stored = split_block(message)
    return block, (wire_bytes(message) if rebuild else stored)
