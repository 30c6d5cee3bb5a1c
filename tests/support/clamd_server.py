"""A real clamd (Debian ``clamav-daemon``) for tests, on loopback.

freshclam cannot reach its mirrors from a test, so the fixture builds its own
signature database: EICAR and the MD5 of a generated sample file, as ``.hdb``
hash signatures (docs/testing.md). clamd listens on a unix
socket and on a free loopback TCP port at once.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spamtrap.config import ClamdConfig
from spamtrap.filters.virus import EICAR
from tests.support.node import free_port, require_binary
from tests.support.poll import wait_until

EICAR_NAME = "Eicar-Test-Signature"
SAMPLE_NAME = "Spamtrap-Test-Sample"
# clamd appends this to the names of signatures from a local database.
UNOFFICIAL = ".UNOFFICIAL"
START_DEADLINE = 60.0  # seconds; it starts in about 8 s with the real database


def sample_bytes() -> bytes:
    """The generated "malware" sample: fixed, so its MD5 is too."""
    return b"spamtrap test sample\n" + random.Random(20261122).randbytes(4096)


@dataclass
class Clamd:
    socket: str
    port: int
    sample: bytes
    proc: subprocess.Popen[bytes]
    log: Path

    def config(self, transport: str, **kw: object) -> ClamdConfig:
        """A ClamdConfig for this clamd over "unix" or "tcp"."""
        if transport == "unix":
            return ClamdConfig(enabled=True, socket=self.socket, **kw)  # type: ignore[arg-type]
        return ClamdConfig(enabled=True, host="127.0.0.1", port=self.port, **kw)  # type: ignore[arg-type]

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def ping(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(path)
            s.sendall(b"zPING\0")
            return s.recv(16) == b"PONG\0"
    except OSError:
        return False


def start_clamd(directory: Path) -> Clamd:
    clamd = require_binary("clamd")
    sigtool = require_binary("sigtool")
    db = directory / "db"
    db.mkdir()
    (directory / "eicar.com").write_bytes(EICAR)
    sample = sample_bytes()
    (directory / "sample.bin").write_bytes(sample)
    lines = []
    for file, name in (("eicar.com", EICAR_NAME), ("sample.bin", SAMPLE_NAME)):
        out = subprocess.run(
            [sigtool, "--md5", file], cwd=directory, capture_output=True, check=True, text=True
        ).stdout
        digest, size, _ = out.strip().split(":", 2)  # md5:size:file name
        lines.append(f"{digest}:{size}:{name}\n")
    (db / "test.hdb").write_text("".join(lines))

    sock = str(directory / "clamd.sock")
    port = free_port()
    log = directory / "clamd.log"
    conf = directory / "clamd.conf"
    settings = [
        "Foreground yes",
        f"DatabaseDirectory {db}",
        f"LocalSocket {sock}",
        f"TCPSocket {port}",
        "TCPAddr 127.0.0.1",
        f"LogFile {log}",  # no User: it runs as whoever starts it
    ]
    conf.write_text("\n".join(settings) + "\n")
    with open(directory / "clamd.out", "wb") as output:
        proc = subprocess.Popen([clamd, "-c", str(conf)], stdout=output, stderr=subprocess.STDOUT)
    server = Clamd(sock, port, sample, proc, log)
    # Polls a real process: there is no clock to inject across a fork.
    try:
        wait_until(lambda: proc.poll() is not None or ping(sock), START_DEADLINE, "clamd")
    except TimeoutError:
        pass
    if proc.poll() is not None or not ping(sock):
        stop_clamd(server)
        said = (directory / "clamd.out").read_text(errors="replace")
        raise RuntimeError(f"clamd did not start:\n{said}\n{server.log_tail()}")
    return server


def stop_clamd(server: Clamd) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="session")
def clamd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """A running clamd; skipped loudly without clamd, failing in CI."""
    directory = tmp_path_factory.mktemp("clamd")
    short = None
    if len(str(directory / "clamd.sock")) > 100:  # sun_path holds 108 bytes
        short = Path(tempfile.mkdtemp(prefix="clamd-"))
        directory = short
    server = start_clamd(directory)
    try:
        yield server
    finally:
        stop_clamd(server)
        if short is not None:
            shutil.rmtree(short, ignore_errors=True)
