"""FaultProxy against real upstreams: an echo server in a thread, and redis-server."""

from __future__ import annotations

import os
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from tests.support import poll
from tests.support.faultproxy import FaultProxy
from tests.support.node import free_port, require_binary

SILENCE = 0.5  # how long a client waits before it calls the link dead


class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes every byte back and records what reached it, and over how many links."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.lock = threading.Lock()
        self.received = bytearray()
        self.accepted = 0
        self.open = 0

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", int(self.socket.getsockname()[1]))


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = cast(EchoServer, self.server)
        with server.lock:
            server.accepted += 1
            server.open += 1
        try:
            while data := self.request.recv(65536):
                with server.lock:
                    server.received += data
                self.request.sendall(data)
        except OSError:
            pass  # reset by the proxy: that is what these tests do
        finally:
            with server.lock:
                server.open -= 1


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(2)


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(echo.address) as p:
        yield p


def connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=SILENCE)


def roundtrip(sock: socket.socket, data: bytes, reply_len: int | None = None) -> bytes:
    """Send data and read a reply as long as it (an echo), or reply_len bytes."""
    sock.sendall(data)
    got = bytearray()
    while len(got) < (len(data) if reply_len is None else reply_len):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return bytes(got)


def wait_until(predicate: Callable[[], bool], what: str, deadline: float = 2.0) -> None:
    # The proxy serves real sockets from its own threads: no clock can drive
    # them, so poll briefly, with a deadline.
    poll.wait_until(predicate, deadline, what, interval=0.01)


def assert_silent(sock: socket.socket) -> None:
    """Nothing arrives, and the connection is not closed either (no EOF, no reset)."""
    with pytest.raises(TimeoutError):
        sock.recv(1)


def assert_cut(sock: socket.socket) -> None:
    """The connection ends at once, with EOF or a reset, well before SILENCE."""
    start = time.monotonic()
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        data = b""
    assert data == b""
    assert time.monotonic() - start < SILENCE


def assert_reset_on_connect(proxy: FaultProxy) -> None:
    """A new connection is reset: the RST may beat connect()'s own return."""
    with pytest.raises(ConnectionResetError), connect(proxy) as client:
        client.recv(1)


def test_pass_forwards_both_ways_with_backpressure_and_half_close(
    echo: EchoServer, proxy: FaultProxy
) -> None:
    payload = os.urandom(3 << 20)  # many times the proxy's buffers
    with connect(proxy) as client:
        client.settimeout(10)
        assert roundtrip(client, b"PING\r\n") == b"PING\r\n"

        def send() -> None:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        while chunk := client.recv(65536):  # EOF only once the echo server closed
            got += chunk
        sender.join(5)
    assert got == payload
    assert bytes(echo.received) == b"PING\r\n" + payload
    assert proxy.connections == 1
    wait_until(lambda: proxy.active == 0, "the finished pair to be dropped")


def test_blackhole_silences_open_connections_but_keeps_them_open(
    echo: EchoServer, proxy: FaultProxy
) -> None:
    client = connect(proxy)
    assert roundtrip(client, b"before\r\n") == b"before\r\n"

    proxy.set_mode("blackhole")
    assert proxy.mode == "blackhole"
    client.sendall(b"lost\r\n")
    assert_silent(client)
    # Bytes are read and dropped: more than any socket buffers hold goes
    # out without blocking, and none of it arrives.
    client.sendall(bytes(32 << 20))
    assert bytes(echo.received) == b"before\r\n"
    # Neither end was told anything: both sockets stay open.
    assert proxy.active == 1
    assert echo.open == 1
    client.close()


def test_blackhole_accepts_new_connections_into_silence(
    echo: EchoServer, proxy: FaultProxy
) -> None:
    proxy.set_mode("blackhole")
    with connect(proxy) as client:
        client.sendall(b"hello\r\n")
        assert_silent(client)
        assert proxy.connections == 1
        assert proxy.active == 1
    assert echo.accepted == 0
    assert bytes(echo.received) == b""


def test_back_to_pass_cuts_blackholed_connections_and_forwards_new_ones(
    echo: EchoServer, proxy: FaultProxy
) -> None:
    old = connect(proxy)
    assert roundtrip(old, b"old\r\n") == b"old\r\n"
    proxy.set_mode("blackhole")
    held = connect(proxy)
    # The held connection must be accepted while the blackhole is on.
    wait_until(lambda: proxy.connections == 2, "the proxy to accept the held connection")
    old.sendall(b"lost\r\n")
    held.sendall(b"lost too\r\n")

    proxy.set_mode("pass")
    assert_cut(old)
    assert_cut(held)
    with connect(proxy) as new:
        assert roundtrip(new, b"new\r\n") == b"new\r\n"
        assert proxy.active == 1
    assert bytes(echo.received) == b"old\r\nnew\r\n"
    assert echo.accepted == 2  # the held connection never reached upstream
    old.close()
    held.close()


def test_reset_resets_open_and_new_connections(echo: EchoServer, proxy: FaultProxy) -> None:
    client = connect(proxy)
    assert roundtrip(client, b"one\r\n") == b"one\r\n"

    proxy.set_mode("reset")
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    assert_reset_on_connect(proxy)
    assert proxy.connections == 2
    assert proxy.active == 0
    wait_until(lambda: echo.open == 0, "upstream to see its connection reset")
    client.close()

    proxy.set_mode("pass")
    with connect(proxy) as again:
        assert roundtrip(again, b"two\r\n") == b"two\r\n"


def test_a_dead_upstream_resets_the_client() -> None:
    # Bound but not listening: connections are refused, and the proxy cannot
    # be given this port and end up proxying to itself.
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        upstream = ("127.0.0.1", int(dead.getsockname()[1]))
        with FaultProxy(upstream) as proxy:
            assert_reset_on_connect(proxy)
            assert proxy.connections == 1
            wait_until(lambda: proxy.active == 0, "the failed pair to be dropped")


def test_close_stops_everything_and_frees_the_port(echo: EchoServer) -> None:
    proxy = FaultProxy(echo.address).start()
    port = proxy.port
    flowing = connect(proxy)
    assert roundtrip(flowing, b"x") == b"x"
    proxy.set_mode("blackhole")
    held = connect(proxy)
    wait_until(lambda: proxy.active == 2, "the proxy to accept the held connection")

    start = time.monotonic()
    proxy.close()
    assert time.monotonic() - start < 1.0
    proxy.close()  # idempotent

    assert_cut(flowing)
    assert_cut(held)
    assert not [t for t in threading.enumerate() if t.name == f"faultproxy:{port}"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=SILENCE)
    with socket.socket() as s:  # no SO_REUSEADDR: nothing of the proxy may linger
        s.bind(("127.0.0.1", port))
    wait_until(lambda: echo.open == 0, "upstream to see its connection closed")
    flowing.close()
    held.close()


def test_a_proxy_restarts_on_the_port_it_was_given(echo: EchoServer) -> None:
    port = free_port()
    for word in (b"first\r\n", b"second\r\n"):
        with FaultProxy(echo.address, port=port) as proxy, connect(proxy) as client:
            assert proxy.port == port
            assert roundtrip(client, word) == word
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=SILENCE)


def test_set_mode_rejects_unknown_modes(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="drop"):
        proxy.set_mode("drop")  # type: ignore[arg-type]
    assert proxy.mode == "pass"


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    redis_server = require_binary("redis-server")
    port = free_port()
    args = [redis_server, "--port", str(port), "--bind", "127.0.0.1"]
    args += ["--dir", str(tmp_path), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        def pong() -> bool:
            assert proc.poll() is None, f"redis-server exited with {proc.returncode}"
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                return roundtrip(s, b"PING\r\n", 7) == b"+PONG\r\n"

        poll.wait_until(pong, 10, "redis-server to answer PING", retry_on=(OSError,))
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.needs_debian
def test_redis_across_a_partition(redis_port: int) -> None:
    with FaultProxy(("127.0.0.1", redis_port)) as proxy:
        client = connect(proxy)
        assert roundtrip(client, b"SET trap example.org\r\n", 5) == b"+OK\r\n"

        proxy.set_mode("blackhole")
        client.sendall(b"SET trap lost.example.org\r\n")
        assert_silent(client)

        proxy.set_mode("pass")
        assert_cut(client)
        with connect(proxy) as again:
            expected = b"$11\r\nexample.org\r\n"
            assert roundtrip(again, b"GET trap\r\n", len(expected)) == expected
        client.close()
