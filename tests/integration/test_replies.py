"""Replies go straight to the socket when nothing is unsent
(spamtrap.intake.replies.send_reply), and through the transport otherwise:
over real loopback TCP, every byte arrives once and in order."""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater

from spamtrap.intake.replies import send_reply

reactor: Any = _reactor


class Writer(protocol.Protocol):
    def connectionMade(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.factory.connected.callback(self)

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


async def _pair() -> tuple[Any, socket.socket, Any]:
    """A server-side transport (tcp.Server), the client's socket, the port."""
    factory = protocol.ServerFactory()
    factory.protocol = Writer
    factory.connected = defer.Deferred()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    client.setblocking(False)
    server = await factory.connected
    return server.transport, client, port


async def _close(transport: Any, client: socket.socket, port: Any) -> None:
    transport.loseConnection()
    client.close()
    await port.stopListening()


def _read_all(client: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = client.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


async def _drain(client: socket.socket, want: int) -> bytes:
    got = b""
    for _ in range(400):
        got += _read_all(client)
        if len(got) >= want:
            return got
        await deferLater(reactor, 0.01, lambda: None)
    return got


@pytest_twisted.ensureDeferred
async def test_a_reply_to_an_idle_connection_is_sent_at_once() -> None:
    transport, client, port = await _pair()
    try:
        send_reply(transport, b"250 2.0.0 ok\r\n")
        # Sent in the call: the transport never registered for writing.
        assert transport not in reactor.getWriters()
        assert await _drain(client, 14) == b"250 2.0.0 ok\r\n"
    finally:
        await _close(transport, client, port)


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_follows_in_order() -> None:
    transport, client, port = await _pair()
    try:
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # More than both buffers hold while the client reads nothing: the
        # first send is short, the rest waits in the transport, and every
        # reply after it queues behind it instead of overtaking.
        replies = [b"%d-" % i + b"x" * 50_000 + b"\r\n" for i in range(3)]
        replies += [b"250 %d\r\n" % i for i in range(50)]
        for r in replies:
            send_reply(transport, r)
        assert transport in reactor.getWriters()  # the rest is buffered
        want = b"".join(replies)
        assert await _drain(client, len(want)) == want
    finally:
        await _close(transport, client, port)


@pytest_twisted.ensureDeferred
async def test_a_reply_to_a_peer_that_is_gone_leaves_the_loss_to_the_transport() -> None:
    transport, client, port = await _pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()  # a reset
    try:
        for _ in range(3):
            send_reply(transport, b"250 ok\r\n")  # ECONNRESET or EPIPE: not raised here
        # The transport finds the reset on its own and ends the connection.
        await transport.protocol.lost.addTimeout(10, reactor)
        assert not transport.connected
    finally:
        await _close(transport, client, port)


def test_other_transports_get_a_plain_write() -> None:
    from twisted.internet.testing import StringTransport

    t = StringTransport()
    send_reply(t, b"220 hi\r\n")
    send_reply(t, b"250 ok\r\n")
    assert t.value() == b"220 hi\r\n250 ok\r\n"
