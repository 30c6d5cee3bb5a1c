"""Pyzor's UDP protocol, spoken from the reactor (used by ``type: pyzor``).

A Pyzor request and its reply are each one datagram holding an RFC 5322
header block and no body. The request carries ``Op: report``, the digest
(``Op-Digest``), the digest spec (``Op-Spec``), a ``Thread`` id that the
reply echoes, the protocol version ``PV`` and a signature (``User``,
``Time``, ``Sig``); the reply carries ``Code`` and ``Diag``, HTTP style.
The messages are built and read with Pyzor's own classes
(``pyzor.message``, ``pyzor.account``), exactly as ``pyzor.client`` does,
but sent through a Twisted ``DatagramProtocol`` instead of a blocking
socket.

``PyzorClient`` is one connected UDP socket to one server: the kernel
drops datagrams from any other address, and an ICMP "port unreachable"
comes back as ``connectionRefused``. Requests in flight are matched to
replies by their thread id; anything that does not parse as a reply, or
names no request in flight, is counted and ignored.
"""

from __future__ import annotations

import email
import email.errors
from dataclasses import dataclass
from typing import Any

import pyzor
import pyzor.account
import pyzor.digest
import pyzor.message
from twisted.internet import defer, error
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from spamtrap.outputs.base import PermanentFailure, TemporaryFailure

log = Logger()

# pyzord reads at most this much of a datagram; so do we (a reply is far smaller).
MAX_PACKET = 8192
# Thread ids below 1024 are reserved (pyzor.message.ThreadId.ok_range).
THREAD_LOW, THREAD_HIGH = pyzor.message.ThreadId.ok_range
MAX_IN_FLIGHT = THREAD_HIGH - THREAD_LOW

# What each reply code means for the queue entry. Codes are pyzord's
# (pyzor.server.RequestHandler.handle): 400 bad request, 401 bad signature
# or unknown user, 403 operation not allowed for the user, 500 internal
# error, 501 operation not implemented, 505 protocol version not supported.
# A request the server calls malformed stays malformed: dropped and counted.
# An account the server does not accept is a configuration problem the
# operator fixes; until then the entries wait in the queue (bounded by its
# age and size) rather than being thrown away.
PERMANENT_CODES = {400: "bad-request", 501: "unsupported", 505: "unsupported"}
TEMPORARY_CODES = {401: "unauthorized", 403: "forbidden"}


@dataclass(frozen=True)
class Account:
    """Who signs the requests; ``key`` is the hex key of ``pyzor genkey``'s
    "salt,key" (the part after the comma); the anonymous user has none."""

    user: str = pyzor.anonymous_user
    key: str = ""


ANONYMOUS = Account()


@dataclass(frozen=True)
class Reply:
    """One well-formed reply from a Pyzor server."""

    thread: int
    code: int
    diag: str

    @property
    def ok(self) -> bool:
        return self.code == pyzor.message.Response.ok_code


def digest(data: bytes) -> str:
    """The Pyzor digest of a message, as ``pyzor digest`` and ``pyzor check``
    compute it from the same bytes (they parse stdin with
    ``email.message_from_bytes`` too). CPU work: about 15 ms for 100 KiB of
    text, twice that for HTML; callers run it off the reactor thread."""
    msg = email.message_from_bytes(data)
    value: str = pyzor.digest.DataDigester(msg).value
    return value


def build_report(digest_value: str, thread: int, account: Account, timestamp: int) -> bytes:
    """A signed ``Op: report`` request, built as ``pyzor.client.Client.report``
    and ``Client.send`` build it (the signature covers every header but
    ``Sig``, the timestamp included)."""
    msg = pyzor.message.ReportRequest(digest_value, pyzor.digest.digest_spec)
    msg.set_thread(pyzor.message.ThreadId(thread))
    msg.init_for_sending()
    msg["User"] = account.user
    msg["Time"] = str(timestamp)
    hashed = pyzor.account.hash_key(account.key, account.user)
    msg["Sig"] = pyzor.account.sign_msg(hashed, timestamp, msg)
    data: bytes = msg.as_string().encode("utf8")
    return data


def parse_reply(packet: bytes) -> Reply | None:
    """The reply in ``packet``, or None for anything that is not one (a
    reply has ``Code``, ``Diag``, ``PV`` and ``Thread``). Never raises."""
    try:
        msg = email.message_from_bytes(packet, _class=pyzor.message.Response)
        msg.ensure_complete()
        code = int(_header(msg, "Code"))
        thread = int(_header(msg, "Thread"))
        diag = _header(msg, "Diag")
    except (ValueError, TypeError, LookupError, pyzor.CommError, email.errors.MessageError):
        return None
    if not 100 <= code <= 999 or not 0 <= thread < THREAD_HIGH:
        return None
    return Reply(thread, code, diag[:200])


def _header(msg: Any, name: str) -> str:
    # With the compat32 policy a header holding non-ASCII bytes comes back
    # as an email.header.Header; int() of that is a TypeError, and str()
    # keeps it readable for the log.
    value = msg[name]
    if value is None:
        raise LookupError(name)
    return str(value).strip()


def outcome(reply: Reply) -> None:
    """Raise what a non-OK reply means for the entry (see the codes above)."""
    if reply.ok:
        return
    detail = f"{reply.code} {reply.diag}"
    if reply.code in PERMANENT_CODES:
        raise PermanentFailure(PERMANENT_CODES[reply.code], detail)
    if reply.code in TEMPORARY_CODES:
        raise TemporaryFailure(TEMPORARY_CODES[reply.code], detail)
    if 400 <= reply.code < 500:
        raise PermanentFailure("rejected", detail)
    raise TemporaryFailure("server-error", detail)


@dataclass
class _Pending:
    deferred: defer.Deferred[Reply]
    timer: Any  # the reactor's IDelayedCall


class PyzorClient(DatagramProtocol):
    """Requests to one Pyzor server over one connected UDP socket.

    ``request(build)`` picks a free thread id, sends ``build(thread)`` and
    returns a Deferred that fires with the ``Reply`` or fails with
    ``TemporaryFailure`` (``timeout``, ``refused``, ``unreachable``,
    ``garbage`` when only unreadable datagrams came back). Start it with
    ``reactor.listenUDP(0, client, interface=...)``; ``startProtocol``
    connects the socket to the server.
    """

    noisy = False  # a new socket after each outage: no log line for each

    def __init__(self, reactor: Any, host: str, port: int, timeout: float) -> None:
        self._reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self._pending: dict[int, _Pending] = {}
        self._garbage_seen: set[int] = set()
        self._next = THREAD_LOW
        self.garbage = 0  # datagrams that were not a reply
        self.strays = 0  # replies to no request in flight (late, or duplicated)
        # Set once an ICMP error or a failed send said the server is gone:
        # the output then opens a new socket (and resolves again).
        self.broken = False
        self._retiring = False
        self._stopped = False

    # -- DatagramProtocol -------------------------------------------------------

    def startProtocol(self) -> None:
        transport: Any = self.transport
        transport.connect(self.host, self.port)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        reply = parse_reply(datagram)
        if reply is None:
            self.garbage += 1
            # Any request in flight may have been the one answered badly.
            self._garbage_seen.update(self._pending)
            log.debug(
                "pyzor {host}:{port}: ignored a datagram that is not a reply: {data!r}",
                host=self.host,
                port=self.port,
                data=datagram[:80],
            )
            return
        pending = self._pending.pop(reply.thread, None)
        if pending is None:
            self.strays += 1
            return
        self._garbage_seen.discard(reply.thread)
        pending.timer.cancel()
        pending.deferred.callback(reply)
        self._maybe_stop()

    def connectionRefused(self) -> None:
        # ICMP port unreachable: nothing listens there (now); every request
        # in flight is lost with it.
        self.broken = True
        self._fail_all(TemporaryFailure("refused", f"{self.host}:{self.port} port unreachable"))

    def stopProtocol(self) -> None:
        if not self._stopped:
            # Closed under us: the epoll reactor's answer to an ICMP error.
            self._stopped = True
            self.connectionRefused()

    # -- requests -----------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def stopped(self) -> bool:
        """The socket is closed (by us, or by the reactor on an ICMP error)."""
        return self._stopped

    def request(self, build: Any) -> defer.Deferred[Reply]:
        """Send ``build(thread)`` (bytes) and wait for the reply to it."""
        if self._stopped:
            return defer.fail(TemporaryFailure("refused", f"{self.host}:{self.port} closed"))
        thread = self._free_thread()
        d: defer.Deferred[Reply] = defer.Deferred(lambda _: self._forget(thread))
        data = build(thread)
        timer = self._reactor.callLater(self.timeout, self._expire, thread)
        self._pending[thread] = _Pending(d, timer)
        transport: Any = self.transport
        try:
            transport.write(data)
        except (OSError, error.MessageLengthError) as e:
            # ENETUNREACH, EHOSTUNREACH and the like, raised by send().
            self.broken = True
            self._fail(thread, TemporaryFailure("unreachable", f"{self.host}:{self.port}: {e}"))
        return d

    def retire(self) -> None:
        """Take no new requests; close once the last one in flight ends."""
        self.broken = self._retiring = True
        self._maybe_stop()

    def close(self) -> defer.Deferred[None] | None:
        """Fail what is in flight and let go of the socket."""
        self.broken = True
        self._fail_all(TemporaryFailure("stopped", "output closed"))
        return self._stop()

    def _maybe_stop(self) -> None:
        if self._retiring and not self._pending:
            self._stop()

    def _stop(self) -> defer.Deferred[None] | None:
        transport: Any = self.transport
        if self._stopped or transport is None:
            return None
        self._stopped = True
        result = transport.stopListening()
        return result if isinstance(result, defer.Deferred) else None

    def _free_thread(self) -> int:
        if len(self._pending) >= MAX_IN_FLIGHT:
            raise TemporaryFailure("busy", "no free thread id")
        # Sequential from a moving start: ids are unique among requests in
        # flight, and a late reply to an old request rarely finds its id
        # reused (the server only echoes what it was sent).
        while True:
            thread = self._next
            self._next = THREAD_LOW if thread + 1 >= THREAD_HIGH else thread + 1
            if thread not in self._pending:
                return thread

    def _expire(self, thread: int) -> None:
        if thread in self._garbage_seen:
            failure = TemporaryFailure("garbage", f"{self.host}:{self.port} answered garbage")
        else:
            failure = TemporaryFailure(
                "timeout", f"no reply from {self.host}:{self.port} in {self.timeout:g}s"
            )
        pending = self._pending.pop(thread, None)
        self._garbage_seen.discard(thread)
        if pending is not None:
            pending.deferred.errback(failure)
        self._maybe_stop()

    def _fail(self, thread: int, failure: Exception) -> None:
        pending = self._pending.pop(thread, None)
        self._garbage_seen.discard(thread)
        if pending is not None:
            if pending.timer.active():
                pending.timer.cancel()
            pending.deferred.errback(failure)
        self._maybe_stop()

    def _fail_all(self, failure: Exception) -> None:
        for thread in list(self._pending):
            self._fail(thread, failure)

    def _forget(self, thread: int) -> None:
        # The caller cancelled: the Deferred fails with CancelledError.
        pending = self._pending.pop(thread, None)
        self._garbage_seen.discard(thread)
        if pending is not None and pending.timer.active():
            pending.timer.cancel()
        self._maybe_stop()
