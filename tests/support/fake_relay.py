"""The far end of one SMTP client connection, on a StringTransport: replies
go in, the client's commands come out. Used by the notice mailer's and the
forward output's unit tests (both send through spamtrap.smtp_client)."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure


class FakeRelay:
    """One connection of ``factory``; ``connector`` is what the factory is
    told it lost (a MemoryReactor's, or None)."""

    def __init__(self, factory: Any, connector: Any = None) -> None:
        self.factory = factory
        self.connector = connector
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def say(self, reply: bytes) -> bytes:
        self.protocol.dataReceived(reply)
        while self.transport.producer is not None:  # the message body
            self.transport.producer.resumeProducing()
        sent = self.transport.value()
        self.transport.clear()
        return sent

    def lose(self, reason: Exception) -> None:
        self.protocol.connectionLost(Failure(reason))
        self.factory.clientConnectionLost(self.connector, Failure(reason))
