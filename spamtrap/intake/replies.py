"""Writing a reply to the client: at once when the connection has nothing
unsent.

``transport.write()`` only buffers. It registers the socket for writing
(``epoll_ctl``); the reactor's next turn sends the bytes and, the buffer
empty, unregisters it (``epoll_ctl`` again). For an SMTP reply of a few
dozen bytes that the client waits for, that is two system calls and a
trip through the reactor's write path more per reply, five or six replies
a message; each system call also lets the GIL go, and a busy filter
worker that takes it keeps it for up to a switch interval. A reply to a
connection with nothing unsent goes straight to the socket instead (see
docs/benchmarks.md, issue 15, for what it saved).

Only plain TCP (``tcp.Server``): a TLS connection's bytes go through its
own buffer, and other transports (tests, wrappers) get ``write()``. What
the socket does not take (its buffer is full: a client that does not
read) goes to ``write()``, and every later reply queues behind it there,
so the bytes stay in order. The check reads ``FileDescriptor``'s buffer
fields; where they are missing (another Twisted), every reply is written
the usual way.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def _nothing_unsent(transport: Any) -> bool:
    return bool(
        transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.TLS
        and getattr(transport, "_tempDataLen", 1) == 0
        and transport.offset == len(transport.dataBuffer)
    )


def send_reply(transport: Any, data: bytes) -> None:
    """Send ``data`` now if the socket takes it, else buffer what is left."""
    if type(transport) is tcp.Server and _nothing_unsent(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # full (EAGAIN), or gone: the transport finds out itself
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
