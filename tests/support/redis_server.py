"""A real ``redis-server`` (Debian) for the queue tests: AOF on, loopback only.

It can be killed (SIGKILL, like a crash) and started again on the same port
and directory, which is how the fault tests restart Redis.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.node import free_port, require_binary
from tests.support.poll import wait_until


@dataclass
class RedisServer:
    directory: Path
    port: int = 0
    host: str = "127.0.0.1"
    # "always": an acknowledged XADD is on disk, so a kill -9 loses nothing.
    appendfsync: str = "always"
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port(self.host)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, deadline: float = 20) -> RedisServer:
        binary = require_binary("redis-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", self.host,
                "--dir", str(self.directory),
                "--appendonly", "yes",
                "--appendfsync", self.appendfsync,
                "--save", "",
                "--protected-mode", "no",
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        self._wait_ready(deadline)
        return self

    def _wait_ready(self, deadline: float) -> None:
        # Polls a real process: there is no clock to inject across a fork.
        proc = self.proc
        assert proc is not None

        def pong_or_exit() -> bool:
            return proc.poll() is not None or self.command("PING") == b"PONG"

        try:
            wait_until(pong_or_exit, deadline, "redis-server", retry_on=(OSError, RuntimeError))
        except TimeoutError as e:
            raise TimeoutError(f"redis-server not ready: {self.log_tail()}") from e
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {self.log_tail()}")

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def log_tail(self) -> str:
        try:
            return (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def client(self) -> Any:
        import redis

        return redis.Redis(host=self.host, port=self.port, socket_timeout=5)

    def command(self, *args: str | bytes | int) -> Any:
        """One command over a fresh connection (RESP by hand: no client state)."""
        with socket.create_connection((self.host, self.port), timeout=5) as s:
            out = b"*%d\r\n" % len(args)
            for a in args:
                b = a if isinstance(a, bytes) else str(a).encode()
                out += b"$%d\r\n%s\r\n" % (len(b), b)
            s.sendall(out)
            f = s.makefile("rb")
            return _read_reply(f)


def _read_reply(f: Any) -> Any:
    line = f.readline()
    if not line:
        raise RuntimeError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise RuntimeError(f"bad reply {line!r}")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
