"""Stage "clamd": the INSTREAM protocol over a StringTransport and the
client over a fake endpoint, on a Clock. Against loopback servers and a
real clamd: tests/integration/test_clamd.py."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from spamtrap.config import ClamdConfig, Config
from spamtrap.filters.clamd import (
    CHUNK,
    ClamdClient,
    ClamdError,
    ClamdProtocol,
    make,
    parse_reply,
)
from spamtrap.filters.virus import EICAR

reactor: Any = _reactor  # typed Any: mypy without the zope plugin


def frames(written: bytes) -> tuple[bytes, list[bytes]]:
    """Split what the client wrote into its command and its chunks."""
    command, _, rest = written.partition(b"\0")
    chunks = []
    while rest:
        n = int.from_bytes(rest[:4], "big")
        chunks.append(rest[4 : 4 + n])
        rest = rest[4 + n :]
    return command, chunks


class Transport(StringTransport):
    aborted = False
    lost = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()

    def finish(self, proto: Protocol) -> None:
        """What the reactor does once a closed connection is gone."""
        assert self.disconnecting
        self.lost = True
        proto.connectionLost(Failure(ConnectionDone()))


def connected(command: bytes, payload: bytes | None = None) -> tuple[ClamdProtocol, Transport]:
    proto = ClamdProtocol(command, payload, "test")
    transport = Transport()
    proto.makeConnection(transport)
    return proto, transport


def watch(d: Deferred[Any]) -> list[Any]:
    """A list that will hold what ``d`` fires with."""
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def result_of(d: Deferred[Any]) -> Any:
    out = watch(d)
    assert out, "the Deferred has not fired"
    return out[0]


def test_instream_framing() -> None:
    payload = bytes(range(256)) * 600  # 153,600 bytes: three chunks
    _, transport = connected(b"INSTREAM", payload)
    command, chunks = frames(transport.value())
    assert command == b"zINSTREAM"
    assert [len(c) for c in chunks] == [CHUNK, CHUNK, len(payload) - 2 * CHUNK, 0]
    assert b"".join(chunks) == payload


def test_empty_payload_and_ping() -> None:
    _, transport = connected(b"INSTREAM", b"")
    assert transport.value() == b"zINSTREAM\0\0\0\0\0"
    _, transport = connected(b"PING")
    assert transport.value() == b"zPING\0"


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        (b"stream: OK\0", None),
        (b"stream: Eicar-Test-Signature.UNOFFICIAL FOUND\0", "Eicar-Test-Signature.UNOFFICIAL"),
        (b"stream: Win.Trojan.Agent-1234 FOUND\0", "Win.Trojan.Agent-1234"),
    ],
)
def test_reply_byte_by_byte(reply: bytes, verdict: str | None) -> None:
    proto, transport = connected(b"INSTREAM", b"data")
    for i in range(len(reply)):
        assert not transport.disconnecting
        proto.dataReceived(reply[i : i + 1])
    assert transport.disconnecting  # the connection is closed after the reply
    assert not proto.done.called  # and the verdict given once it is gone
    transport.finish(proto)
    assert parse_reply(result_of(proto.done)) == verdict


@pytest.mark.parametrize(
    "reply",
    [
        b"INSTREAM size limit exceeded. ERROR",
        b"stream: Can't allocate memory ERROR",
        b"UNKNOWN COMMAND",
        b"",
    ],
)
def test_error_replies(reply: bytes) -> None:
    with pytest.raises(ClamdError, match="clamd at 127.0.0.1:3310 said"):
        parse_reply(reply, "127.0.0.1:3310")


def test_reply_without_end_is_an_error() -> None:
    proto, transport = connected(b"INSTREAM", b"data")
    proto.dataReceived(b"x" * 5000)
    transport.finish(proto)
    failure = result_of(proto.done)
    assert isinstance(failure, Failure) and failure.check(ClamdError)
    assert "reply too long" in str(failure.value)


def test_connection_closed_before_the_reply() -> None:
    proto, _ = connected(b"INSTREAM", b"data")
    proto.dataReceived(b"stream: O")
    proto.connectionLost(Failure(ConnectionError("reset")))
    failure = result_of(proto.done)
    assert isinstance(failure, Failure) and failure.check(ClamdError)
    assert "closed the connection without a reply" in str(failure.value)


class FakeEndpoint:
    """Connection attempts wait until the test accepts or refuses them."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Deferred[Protocol], Factory]] = []
        self.connections: list[tuple[ClamdProtocol, Transport]] = []

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        entry: tuple[Deferred[Protocol], Factory]

        def cancel(d: Deferred[Protocol]) -> None:
            self.waiting.remove(entry)

        entry = (Deferred(cancel), factory)
        self.waiting.append(entry)
        return entry[0]

    def accept(self) -> tuple[ClamdProtocol, Transport]:
        d, factory = self.waiting.pop(0)
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3310))  # type: ignore[arg-type]
        assert isinstance(proto, ClamdProtocol)
        transport = Transport()
        proto.makeConnection(transport)
        d.callback(proto)
        self.connections.append((proto, transport))
        return proto, transport

    def refuse(self) -> None:
        d, _ = self.waiting.pop(0)
        d.errback(ConnectionRefusedError(111, "Connection refused"))

    def open(self) -> list[tuple[ClamdProtocol, Transport]]:
        return [(p, t) for p, t in self.connections if not t.lost]


def fake_client(**kw: Any) -> tuple[ClamdClient, FakeEndpoint, Clock]:
    clock = Clock()
    client = ClamdClient(ClamdConfig(enabled=True, **kw), reactor, clock)
    client.endpoint = fake = FakeEndpoint()
    return client, fake, clock


def test_scan_sends_the_message_and_reads_the_verdict() -> None:
    client, fake, clock = fake_client()
    d = client.scan(EICAR)
    proto, transport = fake.accept()
    assert frames(transport.value()) == (b"zINSTREAM", [EICAR, b""])
    proto.dataReceived(b"stream: Eicar-Test-Signature FOUND\0")
    transport.finish(proto)
    assert result_of(d) == "Eicar-Test-Signature"
    assert clock.getDelayedCalls() == []  # the timeout was cancelled


def test_timeout_while_waiting_for_the_reply() -> None:
    client, fake, clock = fake_client(timeout=30.0)
    outcome = watch(client.scan(b"message"))
    proto, transport = fake.accept()
    clock.advance(29.9)
    assert outcome == []
    clock.advance(0.2)
    failure = outcome[0]
    assert isinstance(failure, Failure) and failure.check(ClamdError)
    assert "clamd at 127.0.0.1:3310 gave no answer within 30s" == str(failure.value)
    assert transport.aborted
    transport.finish(proto)  # the reactor's late news changes nothing
    assert outcome == [failure]
    # The slot is free again: the next scan connects at once.
    client.scan(b"next")
    assert len(fake.waiting) == 1


def test_timeout_while_connecting() -> None:
    client, fake, clock = fake_client(timeout=5.0)
    d = client.scan(b"message")
    clock.advance(5)
    failure = result_of(d)
    assert isinstance(failure, Failure) and failure.check(ClamdError)
    assert "no answer within 5s" in str(failure.value)
    assert fake.waiting == []  # the connection attempt was cancelled


def test_connection_refused() -> None:
    client, fake, clock = fake_client()
    d = client.scan(b"message")
    fake.refuse()
    failure = result_of(d)
    assert isinstance(failure, Failure) and failure.check(ClamdError)
    assert "cannot connect to clamd at 127.0.0.1:3310" in str(failure.value)
    assert clock.getDelayedCalls() == []


def test_concurrency_is_bounded() -> None:
    client, fake, _ = fake_client(max_concurrency=2)
    results = [client.scan(b"message %d" % i) for i in range(5)]
    done = 0
    while done < 5:
        while fake.waiting:
            fake.accept()
        # Never more than two at once, and two whenever two are waiting.
        assert len(fake.open()) == min(2, 5 - done)
        proto, transport = fake.open()[0]
        proto.dataReceived(b"stream: OK\0")
        assert fake.waiting == []  # the slot is held until the socket is closed
        transport.finish(proto)
        done += 1
    assert [result_of(d) for d in results] == [None] * 5
    assert len(fake.connections) == 5


def test_ping() -> None:
    client, fake, _ = fake_client()
    d = client.ping()
    proto, transport = fake.accept()
    assert transport.value() == b"zPING\0"
    proto.dataReceived(b"PONG\0")
    transport.finish(proto)
    assert result_of(d) is True


def test_stage_is_off_by_default() -> None:
    assert make(Config(), reactor) is None
