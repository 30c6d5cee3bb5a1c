"""Pyzor without sockets, for the unit tests of output ``type: pyzor``: a
message and an account's key (pyzor genkey's), pyzord's replies, a
connected UDP port that records what is sent and answers as pyzord would,
a reactor (a task.Clock) that hands out such ports and resolves names from
a table, and what a Deferred that has fired holds."""

from __future__ import annotations

import email
from typing import Any

from twisted.internet import defer
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from spamtrap.outputs import _pyzor_wire as wire

SPAM = (
    b"From: bot@spam.example\r\nTo: trap@trap.example\r\nSubject: pills\r\n\r\n"
    b"Cheap pills for everybody, order today\r\nWe ship worldwide in discreet packages\r\n"
    b"Visit our shop for more offers this week\r\nLimited time only, do not miss out\r\n"
    b"Reply now to get your discount coupon\r\n"
)
# pyzor genkey's "salt,key" for an account.
SALT = "227bfb58efaba7c582d9dcb66ab2063d38df2923"
KEY = "8da9f54058c34e383e997f45d6eb74837139f83b"
NOW = 1_700_000_000.0


def reply(thread: int | str, code: int | str = 200, diag: str = "OK", pv: str = "2.1") -> bytes:
    return f"Code: {code}\nDiag: {diag}\nPV: {pv}\nThread: {thread}\n\n".encode()


class FakeUDP:
    """A connected UDP port: records what is written, delivers what we say."""

    def __init__(self, protocol: Any, interface: str) -> None:
        self.protocol = protocol
        self.interface = interface
        self.peer: tuple[str, int] | None = None
        self.sent: list[bytes] = []
        self.fail_with: Exception | None = None
        self.stopped = False

    def connect(self, host: str, port: int) -> None:
        self.peer = (host, port)

    def write(self, data: bytes, addr: Any = None) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append(data)

    def stopListening(self) -> None:
        self.stopped = True
        self.protocol.doStop()

    def threads(self) -> list[int]:
        return [int(email.message_from_bytes(d)["Thread"]) for d in self.sent]

    def answer(self, code: int = 200, diag: str = "OK", index: int = -1) -> None:
        self.protocol.datagramReceived(reply(self.threads()[index], code, diag), self.peer)


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.advance(NOW)
        self.ports: list[FakeUDP] = []
        self.names: dict[str, str] = {}

    def listenUDP(
        self,
        port: int,
        protocol: Any,
        interface: str = "",
        maxPacketSize: int = 8192,  # noqa: N803 - Twisted's name
    ) -> FakeUDP:
        assert maxPacketSize == wire.MAX_PACKET
        transport = FakeUDP(protocol, interface)
        self.ports.append(transport)
        protocol.makeConnection(transport)
        return transport

    def resolve(self, name: str) -> defer.Deferred[str]:
        if name in self.names:
            return defer.succeed(self.names[name])
        return defer.fail(DNSLookupError(name))


def result_of(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failure_of(d: defer.Deferred[Any]) -> Exception:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out and isinstance(out[0], Failure), f"expected a failure, got {out}"
    value = out[0].value
    assert isinstance(value, Exception)
    return value
