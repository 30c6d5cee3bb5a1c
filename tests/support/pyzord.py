"""A real Pyzor server (Debian ``pyzor``: ``pyzord``) on loopback, and the
real ``pyzor`` client to ask it what it counted.

Debian's pyzord runs on the system Python, whose ``dbm.gnu`` comes with
``python3-gdbm``, so the server keeps its digests in a gdbm file of its
own directory (the venv's Python has no ``_gdbm``: docs/recipes.md). Both
packages are in the Makefile's DEBS; without them the tests skip loudly,
and fail in CI.

``PyzordServer.check(messages)`` runs ``pyzor -s mbox check`` over an mbox
of the messages, with a client home whose ``servers`` file names only
this server, and returns each message's (report count, whitelist count).
Accounts for signed reports go in ``passwd`` and ``access`` (pyzord's
formats: ``user : key`` and ``ops : user : allow``).

``spam(n)`` makes distinct messages (so distinct digests) for it to count.
"""

from __future__ import annotations

import base64
import mailbox
import os
import quopri
import random
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.node import free_port

# Debian's, not a pip-installed one on PATH (that runs on the venv's Python).
DEBIAN_PYZORD = "/usr/bin/pyzord"
DEBIAN_PYZOR = "/usr/bin/pyzor"
SYSTEM_PYTHON = "/usr/bin/python3"
# pyzord's usage log: "user,client address,op,[digests],code".
_USAGE_LINE = re.compile(r"([-.\w]+),[0-9a-fA-F.:]+,(\w+),\[.*\],(\d+)$")
_CHECK_LINE = re.compile(r"^(\S+)\t\((\d+), '([^']*)'\)(?:\t(\d+)\t(\d+))?$")


WORDS = (
    "cheap pills offer watches replica casino bonus winner claim prize discount shipping"
    " worldwide secure order today limited exclusive deal members only click now free"
).split()


def spam(n: int) -> bytes:
    """Distinct messages of the shapes traps see (plain, HTML, base64,
    quoted-printable, 8-bit charsets), each with a body of its own."""
    rng = random.Random(n)
    lines = [" ".join(rng.choice(WORDS) for _ in range(9)) + f" ref {n} {k}" for k in range(8)]
    text = "\r\n".join(lines) + "\r\n"
    head = f"From: bot{n}@spam.example\r\nTo: trap@trap.example\r\nSubject: offer {n}\r\n"
    head += "MIME-Version: 1.0\r\n"
    shape = n % 5
    if shape == 0:
        return (head + "Content-Type: text/plain\r\n\r\n" + text).encode()
    if shape == 1:
        html = "".join(f"<p>{line}</p>\r\n" for line in lines)
        return (
            head + 'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
            f"--b\r\nContent-Type: text/plain\r\n\r\n{text}\r\n"
            f"--b\r\nContent-Type: text/html\r\n\r\n<html><body>{html}</body></html>\r\n--b--\r\n"
        ).encode()
    if shape == 2:
        body = base64.encodebytes(text.encode()).decode().replace("\n", "\r\n")
        cte = "Content-Transfer-Encoding: base64\r\n"
        return (head + "Content-Type: text/plain\r\n" + cte + "\r\n" + body).encode()
    if shape == 3:
        body = quopri.encodestring(("Grüße – " + text).encode("utf-8")).decode()
        return (
            head + "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n" + body
        ).encode()
    return (
        head.encode()
        + b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\n"
        + ("Très bon marché ".encode("latin-1") + text.encode())
    )


def _missing(what: str) -> None:
    msg = f"{what} (apt-get install pyzor python3-gdbm, or run `make test`)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must not skip: {msg}")
    pytest.skip(f"SKIPPED LOUDLY: {msg}")


def require_pyzord() -> None:
    """Skip loudly (fail in CI) unless Debian's pyzord can run with gdbm."""
    for path in (DEBIAN_PYZORD, DEBIAN_PYZOR):
        if not os.access(path, os.X_OK):
            _missing(f"{path} is not installed")
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import dbm.gnu"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        _missing("the system Python has no dbm.gnu (python3-gdbm) for pyzord's gdbm engine")


@dataclass
class PyzordServer:
    home: Path
    port: int = 0
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_udp_port(self.host)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, accounts: dict[str, str] | None = None, deadline: float = 20) -> PyzordServer:
        """Start pyzord; ``accounts`` (user -> key) may report besides anonymous."""
        require_pyzord()
        self.home.mkdir(parents=True, exist_ok=True)
        passwd, access = self.home / "pyzord.passwd", self.home / "pyzord.access"
        users = dict(accounts or {})
        passwd.write_text("".join(f"{user} : {key}\n" for user, key in users.items()))
        access.write_text(
            "check report ping pong info : anonymous : allow\n"
            + "".join(f"check report ping pong info : {user} : allow\n" for user in users)
        )
        args = [
            DEBIAN_PYZORD, "--homedir", str(self.home), "-a", self.host, "-p", str(self.port),
            "-e", "gdbm", f"--dsn={self.home / 'digests.db'}",
            f"--password-file={passwd}", f"--access-file={access}",
            f"--log-file={self.home / 'pyzord.log'}",
            f"--usage-log-file={self.home / 'usage.log'}",
        ]  # fmt: skip
        with open(self.home / "stdout.log", "wb") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_ready(deadline)
        return self

    def _wait_ready(self, deadline: float) -> None:
        # Polls a real process: there is no clock to inject across a fork.
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"pyzord exited with {self.proc.returncode}: {self.log()}")
            if self.ping():
                return
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"pyzord did not answer ping in {deadline}s: {self.log()}")

    def ping(self) -> bool:
        result = self.pyzor("ping", timeout=2)
        return result.returncode == 0 and "(200, 'OK')" in result.stdout

    def client_home(self) -> Path:
        home = self.home / "client"
        home.mkdir(exist_ok=True)
        (home / "servers").write_text(f"{self.address}\n")
        return home

    def pyzor(
        self, *args: str, stdin: bytes = b"", timeout: float = 5
    ) -> subprocess.CompletedProcess[str]:
        """The real client, Debian's ``pyzor``, pointed at this server only."""
        result = subprocess.run(
            [DEBIAN_PYZOR, "--homedir", str(self.client_home()), "-t", str(int(timeout)), *args],
            input=stdin,
            capture_output=True,
            timeout=timeout * 4 + 10,
            check=False,
        )
        return subprocess.CompletedProcess(
            result.args,
            result.returncode,
            result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"),
        )

    def check(self, messages: Sequence[bytes]) -> list[tuple[int, int]]:
        """(count, whitelist count) per message, by ``pyzor -s mbox check``."""
        path = self.home / "check.mbox"
        path.unlink(missing_ok=True)
        box = mailbox.mbox(str(path))
        for raw in messages:
            box.add(mailbox.mboxMessage(raw))
        box.close()
        result = self.pyzor("-s", "mbox", "check", stdin=path.read_bytes())
        counts = []
        for line in result.stdout.splitlines():
            m = _CHECK_LINE.match(line)
            if m is None or m[1] != self.address or m[2] != "200":
                raise AssertionError(f"pyzor check: unexpected line {line!r}:\n{result.stderr}")
            counts.append((int(m[4]), int(m[5])))
        if len(counts) != len(messages):
            raise AssertionError(
                f"pyzor check answered {len(counts)} of {len(messages)}:"
                f" {result.stdout}{result.stderr}"
            )
        return counts

    def digest(self, raw: bytes) -> str:
        """What ``pyzor digest`` prints for the message."""
        result = self.pyzor("digest", stdin=raw)
        return result.stdout.strip()

    def usage(self, op: str = "report") -> list[tuple[str, int]]:
        """(user, code) of each ``op`` request, from pyzord's usage log."""
        path = self.home / "usage.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        found = []
        for line in text.splitlines():
            m = _USAGE_LINE.search(line)
            if m is not None and m[2] == op:
                found.append((m[1], int(m[3])))
        return found

    def log(self) -> str:
        parts = []
        for name in ("stdout.log", "pyzord.log"):
            path = self.home / name
            if path.exists():
                parts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


def free_udp_port(host: str) -> int:
    # A port free for both UDP (pyzord) and TCP (free_port's check).
    while True:
        port = free_port(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port


@pytest.fixture
def pyzord(tmp_path: Path) -> Iterator[PyzordServer]:
    server = PyzordServer(tmp_path / "pyzord").start()
    try:
        yield server
    finally:
        server.stop()
