"""``reuseport:PORT[:interface=ADDR][:backlog=N]``: a TCP server endpoint with
SO_REUSEPORT, so several spamtrap processes on one machine share one SMTP
port and the kernel spreads connections between them (one per core).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

DEFAULT_BACKLOG = 1024


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    def __init__(
        self, reactor: Any, port: int, interface: str = "", backlog: int = DEFAULT_BACKLOG
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            # adoptStreamPort duplicates the descriptor; ours is closed below.
            port = self.reactor.adoptStreamPort(sock.fileno(), family, factory)
        except OSError as e:
            return defer.fail(e)
        finally:
            sock.close()
        return defer.succeed(port)


def parse(reactor: Any, port: str, interface: str = "", backlog: str = "") -> ReusePortEndpoint:
    try:
        number = int(port)
        size = int(backlog) if backlog else DEFAULT_BACKLOG
    except ValueError:
        raise ValueError(f"reuseport: bad port {port!r} or backlog {backlog!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"reuseport: port {number} out of range")
    return ReusePortEndpoint(reactor, number, interface, size)
