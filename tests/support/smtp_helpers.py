"""Test doubles for driving the SMTP protocol without a network."""

from __future__ import annotations

from typing import Any

from twisted.internet import address, defer, task
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from spamtrap import testing
from spamtrap.config import Config, SetConfig
from spamtrap.intake.smtp import TrapSMTPFactory
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    tls_started_with: Any = None

    def startTLS(self, ctx: Any) -> None:
        self.tls_started_with = ctx


def trap_config(**changes: object) -> Config:
    """The Harness's config: node "testnode", trap domain trap.example, one
    set; ``changes`` as spamtrap.testing.config takes them."""
    return testing.config(
        node="testnode",
        smtp__hostname="trap.test",
        traps__domains=["trap.example"],
        sets=[SetConfig(name="all")],
        **changes,
    )


class Harness:
    """A session on a StringTransport; ``submit`` is recorded and controllable."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        peer: str = "192.0.2.7",
        auto_ack: bool = True,
        tls: bool = False,
        resolve_ptr: Any = None,
    ) -> None:
        if config is None:
            config = trap_config()
        self.config = config
        self.clock = task.Clock()
        self.metrics = Metrics()
        self.submitted: list[Envelope] = []
        self.pending: list[defer.Deferred[None]] = []
        self.auto_ack = auto_ack
        self.factory = TrapSMTPFactory(
            config,
            self.submit,
            self.metrics,
            self.clock,
            tls_context=object() if tls else None,
            resolve_ptr=resolve_ptr,
        )
        self.proto = self.factory.buildProtocol(None)
        transport_cls = TLSStringTransport if tls else StringTransport
        self.transport = transport_cls(
            peerAddress=address.IPv4Address("TCP", peer, 40000),
            hostAddress=address.IPv4Address("TCP", "198.51.100.1", 25),
        )
        self.proto.makeConnection(self.transport)

    def submit(self, env: Envelope) -> defer.Deferred[None]:
        self.submitted.append(env)
        if self.auto_ack:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self.pending.append(d)
        return d

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def replies(self) -> list[bytes]:
        """All reply lines so far (and forget them)."""
        out = self.transport.value().split(b"\r\n")
        self.transport.clear()
        return [line for line in out if line]

    def codes(self) -> list[int]:
        """Final reply codes so far (multi-line replies count once)."""
        return [int(line[:3]) for line in self.replies() if line[3:4] == b" "]

    def transaction(self, body: bytes, rcpts: tuple[bytes, ...] = (b"a@trap.example",)) -> None:
        self.send(b"MAIL FROM:<bot@spam.example>\r\n")
        for r in rcpts:
            self.send(b"RCPT TO:<" + r + b">\r\n")
        self.send(b"DATA\r\n")
        self.send(body + b".\r\n")


# One transaction's commands, and the replies a clean one gets.
MAIL = b"MAIL FROM:<bot@spam.example>"
RCPT = b"RCPT TO:<v@trap.example>"
TXN = [250, 250, 354, 250]


def txn(i: int, body: bytes) -> bytes:
    return (
        b"MAIL FROM:<s%d@spam.example>\r\nRCPT TO:<v@trap.example>\r\nDATA\r\n" % i
        + body
        + b".\r\n"
    )
