"""Stage "clamd" over real sockets: a fake clamd on loopback TCP and a unix
socket (stalls, slow replies, refusals), then a real clamd."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from spamtrap import testing
from spamtrap.config import ClamdConfig
from spamtrap.filters import Discard, Keep
from spamtrap.filters.clamd import (
    ClamdClient,
    ClamdError,
    ClamdStage,
    make,
)
from spamtrap.filters.virus import EICAR
from spamtrap.message import Envelope
from tests.support.clamd_server import EICAR_NAME, SAMPLE_NAME, UNOFFICIAL, Clamd
from tests.support.clamd_server import clamd_server as clamd_server  # the fixture
from tests.support.node import free_port

reactor: Any = _reactor

CLEAN = (
    b"From: <spammer@example.net>\r\nTo: <trap@example.org>\r\nSubject: Cheap meds\r\n\r\n"
    + b"Buy now at http://pharmacy.example.net/ !\r\n" * 50
)


def with_attachment(data: bytes, name: str = "file.bin") -> bytes:
    return (
        b"From: <spammer@example.net>\r\nTo: <trap@example.org>\r\nSubject: Invoice\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="' + name.encode() + b'"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(data) + b"--b1--\r\n"
    )


def envelope(data: bytes) -> Envelope:
    return Envelope("m1", 0.0, "spammer@example.net", ["trap@example.org"], data)


# -- the protocol, on a StringTransport ----------------------------------------


# -- the client, on a fake endpoint and a Clock --------------------------------


# -- the client over loopback, against a fake clamd ----------------------------


class FakeClamdProtocol(Protocol):
    """The server side of zINSTREAM and zPING: FOUND for EICAR, else OK."""

    def __init__(self, server: FakeClamd) -> None:
        self.server = server
        self.buffer = b""
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.out: Any = self.transport
        self.serving = True
        self.server.open += 1
        self.server.max_open = max(self.server.max_open, self.server.open)
        self.server.connected.append(self)
        if self.server.on_connect and not self.server.on_connect.called:
            self.server.on_connect.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer.startswith(b"zPING\0"):
            self.out.write(b"PONG\0")
            return
        if not self.buffer.startswith(b"zINSTREAM\0"):
            return
        rest, payload = self.buffer[len(b"zINSTREAM\0") :], b""
        while len(rest) >= 4:
            n = int.from_bytes(rest[:4], "big")
            if n == 0:
                self.server.payloads.append(payload)
                if self.server.delay is not None:
                    reactor.callLater(self.server.delay, self.reply, payload)
                return
            if len(rest) < 4 + n:
                return
            payload, rest = payload + rest[4 : 4 + n], rest[4 + n :]

    def reply(self, payload: bytes) -> None:
        verdict = b"Eicar-Test-Signature FOUND" if EICAR in payload else b"OK"
        self.out.write(b"stream: " + verdict + b"\0")
        self.out.loseConnection()
        self.done_serving()

    def done_serving(self) -> None:
        # Like clamd: a connection whose reply is sent takes no more work.
        if self.serving:
            self.serving = False
            self.server.open -= 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done_serving()
        self.lost.callback(None)


class FakeClamd(Factory):
    def __init__(self, delay: float | None = 0.0) -> None:
        self.delay = delay  # seconds before the reply; None: never reply (stalled)
        self.open = 0  # connections being served
        self.max_open = 0
        self.connected: list[FakeClamdProtocol] = []
        self.payloads: list[bytes] = []
        self.on_connect: Deferred[FakeClamdProtocol] | None = None

    def buildProtocol(self, addr: Any) -> FakeClamdProtocol:
        return FakeClamdProtocol(self)


async def listen(server: FakeClamd, description: str) -> Any:
    return await serverFromString(reactor, description).listen(server)


@pytest_twisted.ensureDeferred
async def test_loopback_tcp_and_unix(tmp_path: Any) -> None:
    server = FakeClamd()
    tcp = await listen(server, "tcp:0:interface=127.0.0.1")
    unix = await listen(server, f"unix:{tmp_path}/clamd.sock")
    try:
        big = CLEAN * 100  # several chunks
        for cfg in (
            ClamdConfig(host="127.0.0.1", port=tcp.getHost().port),
            ClamdConfig(socket=f"{tmp_path}/clamd.sock"),
        ):
            client = ClamdClient(cfg, reactor)
            assert await client.ping() is True
            assert await client.scan(with_attachment(EICAR)) is None  # the fake does not decode
            assert await client.scan(b"x" + EICAR) == "Eicar-Test-Signature"
            assert await client.scan(big) is None
            assert server.payloads[-1] == big
    finally:
        await tcp.stopListening()
        await unix.stopListening()


@pytest_twisted.ensureDeferred
async def test_loopback_stalled_server_times_out_on_the_clock() -> None:
    server = FakeClamd(delay=None)
    server.on_connect = Deferred()
    port = await listen(server, "tcp:0:interface=127.0.0.1")
    try:
        clock = Clock()
        cfg = ClamdConfig(host="127.0.0.1", port=port.getHost().port, timeout=30.0)
        d = ClamdClient(cfg, reactor, clock).scan(CLEAN)
        conn = await server.on_connect
        clock.advance(30)
        with pytest.raises(ClamdError, match="gave no answer within 30s"):
            await d
        await conn.lost  # the client aborted the connection
        assert server.open == 0
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_loopback_slow_server_sees_at_most_two_connections() -> None:
    from twisted.internet.defer import gatherResults

    server = FakeClamd(delay=0.02)
    port = await listen(server, "tcp:0:interface=127.0.0.1")
    try:
        cfg = ClamdConfig(host="127.0.0.1", port=port.getHost().port, max_concurrency=2)
        client = ClamdClient(cfg, reactor)
        results = await gatherResults([client.scan(b"m%d" % i) for i in range(6)])
        assert results == [None] * 6
        assert len(server.connected) == 6
        assert server.max_open == 2
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_loopback_connection_refused() -> None:
    cfg = ClamdConfig(host="127.0.0.1", port=free_port())
    with pytest.raises(ClamdError, match="cannot connect to clamd at 127.0.0.1:"):
        await ClamdClient(cfg, reactor).scan(CLEAN)


# -- the stage -----------------------------------------------------------------


def in_thread(stage: Callable[[Envelope], Any], data: bytes) -> Deferred[Any]:
    # The runner calls stages in its pool; blockingCallFromThread needs that.
    return threads.deferToThread(stage, envelope(data))


@pytest_twisted.ensureDeferred
async def test_stage_verdicts() -> None:
    server = FakeClamd()
    port = await listen(server, "tcp:0:interface=127.0.0.1")
    try:
        cfg = testing.config(filters__clamd=ClamdConfig(enabled=True, port=port.getHost().port))
        stage = make(cfg, reactor)
        assert stage is not None
        assert await in_thread(stage, EICAR) == Discard("clamd:Eicar-Test-Signature")
        assert await in_thread(stage, CLEAN) is None
        assert stage.errors == 0
    finally:
        await port.stopListening()


@pytest.mark.parametrize(
    ("policy", "verdict"), [("keep", Keep("clamd-error")), ("discard", Discard("clamd-error"))]
)
@pytest_twisted.ensureDeferred
async def test_stage_when_clamd_is_down(policy: str, verdict: Discard | None) -> None:
    cfg = ClamdConfig(enabled=True, port=free_port(), on_error=policy)  # nothing listens
    stage = ClamdStage(ClamdClient(cfg, reactor), reactor, policy)
    assert await in_thread(stage, CLEAN) == verdict
    assert await in_thread(stage, EICAR) == verdict
    assert stage.errors == 2


@pytest_twisted.ensureDeferred
async def test_stage_logs_errors_once_a_minute() -> None:
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "spamtrap.filters.clamd":
            events.append(event)

    clock = Clock()
    cfg = ClamdConfig(enabled=True, port=free_port())
    stage = ClamdStage(ClamdClient(cfg, reactor, clock), reactor, "keep")
    globalLogPublisher.addObserver(observe)  # type: ignore[arg-type]
    try:
        for _ in range(3):
            await in_thread(stage, CLEAN)
        assert len(events) == 1
        clock.advance(61)
        await in_thread(stage, CLEAN)
    finally:
        globalLogPublisher.removeObserver(observe)  # type: ignore[arg-type]
    assert stage.errors == 4
    assert len(events) == 2
    assert events[1]["unlogged"] == 2 and events[1]["errors"] == 4
    assert f"127.0.0.1:{cfg.port}" in str(events[1]["error"])


# -- a real clamd --------------------------------------------------------------

EICAR_FOUND = EICAR_NAME + UNOFFICIAL
SAMPLE_FOUND = SAMPLE_NAME + UNOFFICIAL


@pytest.mark.slow
@pytest.mark.needs_debian
@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest_twisted.ensureDeferred
async def test_real_clamd(clamd_server: Clamd, transport: str) -> None:
    client = ClamdClient(clamd_server.config(transport), reactor)
    assert await client.ping() is True
    # clamd decodes MIME itself: EICAR in a base64 attachment is found.
    eicar_mail = with_attachment(EICAR, "eicar.com")
    assert EICAR not in eicar_mail
    assert await client.scan(eicar_mail) == EICAR_FOUND
    assert await client.scan(clamd_server.sample) == SAMPLE_FOUND
    assert await client.scan(with_attachment(clamd_server.sample)) == SAMPLE_FOUND
    assert await client.scan(CLEAN) is None
    assert await client.scan(with_attachment(b"\0" * 300_000)) is None  # several chunks


@pytest.mark.slow
@pytest.mark.needs_debian
@pytest_twisted.ensureDeferred
async def test_real_clamd_stage(clamd_server: Clamd) -> None:
    cfg = testing.config(filters__clamd=clamd_server.config("unix", max_concurrency=2))
    stage = make(cfg, reactor)
    assert stage is not None
    assert await in_thread(stage, with_attachment(EICAR)) == Discard(f"clamd:{EICAR_FOUND}")
    sample_mail = with_attachment(clamd_server.sample, "report.pdf")
    assert await in_thread(stage, sample_mail) == Discard(f"clamd:{SAMPLE_FOUND}")
    assert await in_thread(stage, CLEAN) is None
    assert stage.errors == 0
