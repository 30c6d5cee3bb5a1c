"""One mail through an SMTP relay: the client behind both the ``forward``
output (spamtrap/outputs/forward.py) and the notice mail
(spamtrap/notify/mail.py).

It is Twisted's ESMTP client, hardened against relays that answer
garbage, and one attempt per call (retrying is the caller's), within a
deadline. What went wrong is one short word (:func:`reason`): a 5xx
(``5xx``) or 4xx (``4xx``) reply to MAIL, RCPT or DATA, a relay that will
not talk to us (``greeting``), STARTTLS or AUTH failing (``tls``,
``auth``), a reply that is not SMTP (``garbage``), a refused, lost or
unresolved connection (``refused``, ``disconnected``, ``dns``,
``connect``) and the deadline (``timeout``). Which of them are worth a
retry is the caller's policy. Credentials never reach an error or the log:
the client's transcript is off, and :func:`describe` gives the relay's
reply only.

Credentials never travel in plaintext either: :func:`check_relay` refuses
a relay with a username but without STARTTLS unless it is on loopback,
where nobody can listen in.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.protocol import connectionDone
from twisted.mail import smtp
from twisted.python.failure import Failure

from spamtrap.config.schema import RelayConfig
from spamtrap.interfaces import ReactorTime, as_reactor_time

CONNECT_TIMEOUT = 30.0  # at most; never beyond the whole attempt's deadline
QUIT_GRACE = 10.0  # after a sent message, for QUIT and its reply
_REPLY = re.compile(rb"[2-5][0-9]{2}(?:[ -]|\Z)")
_LINE_END = re.compile(rb"\r\n|\r|\n")

# (address, code, reply) of a recipient the relay refused.
Refusal = tuple[bytes, int, bytes]
Connect = Callable[[str, int, Any], Any]  # (host, port, factory) -> IConnector


class RelayConfigError(ValueError):
    """The relay settings would be unsafe or cannot work."""


def is_loopback(host: str) -> bool:
    if host.rstrip(".").lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_relay(relay: RelayConfig) -> None:
    """Refuse settings that would send credentials in plaintext."""
    if (relay.username is None) != (relay.password is None):
        raise RelayConfigError("relay: give both username and password, or neither")
    if relay.username is not None and not relay.starttls and not is_loopback(relay.host):
        raise RelayConfigError(
            f"relay: refusing to send credentials in plaintext to {relay.host}:"
            f"{relay.port}; set relay.starttls: true (or use a relay on loopback)"
        )


def dot_stuffed(wire: bytes) -> bytes:
    """RFC 5321 4.5.2: a line starting with "." gets one more."""
    stuffed = wire.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def for_the_wire(text: bytes) -> bytes:
    """``text`` with any line ends (LF, CR, CRLF) as CRLF, dot-stuffed: what
    :func:`send_mail` takes."""
    return dot_stuffed(_LINE_END.sub(b"\r\n", text))


class _Sender(smtp.ESMTPSender):
    """Twisted's ESMTP sender, given mail that is ready for the wire.

    QUIRK: Twisted's client turns every LF into CRLF (a CRLF would become
    CR CR LF) and dot-stuffs within each 16 KiB chunk only (a line starting
    at a chunk's start is missed), and it never says BODY=8BITMIME. The
    mail here is dot-stuffed with CRLF line ends already; the variant for
    the relay (8-bit or not) is picked once EHLO has said what it takes.
    """

    extensions: frozenset[bytes] = frozenset()
    factory: _Factory
    linger: Any = None  # the timer that cuts a finished session's QUIT short
    hung_up = False  # the attempt failed and we dropped the connection

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        # ESMTPClient's, without its IndexError on an empty line ("250-").
        items: dict[bytes, bytes | None] = {}
        for line in resp.splitlines():
            words = line.split(None, 1)
            if words:
                items[words[0]] = words[1] if len(words) > 1 else None
        self.extensions = frozenset(name.upper() for name in items)
        self.tryTLS(code, resp, items)

    def smtpState_from(self, code: int, resp: bytes) -> None:
        # SMTPClient.smtpState_from, with a BODY parameter.
        self._from = self.getMailFrom()
        self._failresponse = self.smtpTransferFailed
        if self._from is None:
            self._disconnectFromServer()
            return
        offered = b"8BITMIME" in self.extensions
        self.factory.data = self.factory.render(offered)
        body = b" BODY=8BITMIME" if offered and not self.factory.data.isascii() else b""
        self.sendLine(b"MAIL FROM:" + smtp.quoteaddr(self._from) + body)
        self._expected = [250]
        self._okresponse = self.smtpState_to

    def lineReceived(self, line: bytes) -> Any:
        if self.hung_up:
            # QUIRK: an aborted TCP transport still hands over the rest of
            # the chunk it read, and Twisted's state machine is undefined
            # after a failure. Nothing the relay says now changes anything.
            return None
        # Twisted reads any three leading digits as a reply code (and skips
        # lines starting with 0); a reply is 2xx-5xx (RFC 5321 4.2).
        if _REPLY.match(line) is None:
            shown = line[:80].decode("ascii", "backslashreplace")
            self.sendError(smtp.SMTPProtocolError(-1, f"not an SMTP reply: {shown}", b""))
            return None
        try:
            return super().lineReceived(line)
        except Exception as e:  # noqa: BLE001 - a relay's reply must never break the client
            # Twisted's client was not written for hostile replies; whatever
            # one makes it raise, the try is over (garbage).
            self.sendError(smtp.SMTPProtocolError(-1, f"reply not understood: {e!r}", b""))
            return None

    def sendError(self, exc: Exception) -> None:
        if self.factory.sendFinished:  # the attempt is over: only let go of the line
            self.hang_up()
            return
        super().sendError(exc)

    def hang_up(self) -> None:
        self.hung_up = True
        transport: Any = self.transport
        transport.abortConnection()

    def getMailData(self) -> BytesIO:
        return BytesIO(self.factory.data)

    def transformChunk(self, chunk: bytes) -> bytes:
        self.resetTimeout()
        return chunk

    def smtpState_helo(self, code: int, resp: bytes) -> None:
        super().smtpState_helo(code, resp)
        # QUIRK: Twisted answers a refused HELO with another HELO, forever.
        self._failresponse = self.smtpConnectionFailed

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendError(smtp.SMTPProtocolError(-1, b"reply line too long", b""))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.linger is not None and self.linger.active():
            self.linger.cancel()
        super().connectionLost(reason)


class _Factory(smtp.ESMTPSenderFactory):
    protocol = _Sender

    def __init__(self, render: Callable[[bool], bytes], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.render = render
        self.data = b""
        self.sender: _Sender | None = None

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        # The transcript holds the AUTH line and goes into every exception.
        p.debug = False
        self.sender = p
        return p


def reason(e: BaseException) -> str:
    """What went wrong, as one word (see the module docstring)."""
    if isinstance(e, defer.TimeoutError | defer.CancelledError | smtp.SMTPTimeoutError):
        return "timeout"
    if isinstance(e, smtp.TLSError | smtp.TLSRequiredError):
        return "tls"
    if isinstance(e, smtp.EHLORequiredError):
        return "greeting"
    if isinstance(e, smtp.ESMTPClientError):  # AUTH refused, or none we speak offered
        return "auth"
    if isinstance(e, smtp.SMTPProtocolError):
        return "garbage"
    if not isinstance(e, smtp.SMTPClientError):
        return _connection_failure(e)
    if e.code < 0:  # the connection failed or was lost
        return _connection_failure(e.__cause__ or e)
    if not 400 <= e.code < 600:
        return "garbage"
    if not isinstance(e, smtp.SMTPDeliveryError):
        # Refused before any command of the message: the relay, not the mail.
        return "greeting"
    return "5xx" if e.code >= 500 else "4xx"


def _connection_failure(e: BaseException) -> str:
    if isinstance(e, SSL.Error):  # the handshake, or the relay's certificate
        return "tls"
    if isinstance(e, error.ConnectionRefusedError):
        return "refused"
    if isinstance(e, error.TCPTimedOutError | error.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(e, error.DNSLookupError):
        return "dns"
    if isinstance(e, error.ConnectionDone | error.ConnectionLost):
        return "disconnected"
    return "connect"


def describe(e: BaseException) -> str:
    """The relay's reply, or the error, for the log: never the session
    transcript (an SMTPClientError's str() has it, AUTH line included).
    Twisted gives a reply as bytes or, for some failures, as str."""
    if isinstance(e, smtp.SMTPClientError):
        reply = _text(e.resp)
        if e.code > 0:
            reply = f"{e.code:03d} {reply}"
        addresses: Any = e.addresses or ()
        refused = [f"{_text(a)}: {c} {_text(r)}" for a, c, r in addresses if c >= 400]
        return f"{reply} ({'; '.join(refused)})" if refused else reply
    return str(e) or repr(e)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def send_mail(
    reactor: Any,
    relay: RelayConfig,
    helo: bytes,
    sender: str,
    to: Sequence[str],
    variants: tuple[bytes, bytes],
    timeout: float,
    client_tls: Callable[[str], Any],
    *,
    clock: ReactorTime | None = None,
    connect: Connect | None = None,
) -> defer.Deferred[list[Refusal]]:
    """Send one mail to every address in ``to`` through ``relay``.

    ``variants`` is the mail, dot-stuffed with CRLF line ends
    (:func:`for_the_wire`), for a relay that offers 8BITMIME and for one
    that does not. Fires with the recipients the relay refused while it took
    the mail for others (empty: all took it); fails with the client's error
    (:func:`reason` and :func:`describe` read it). The connection is closed
    at once after a failure, and within QUIT_GRACE after a success.
    Cancelling drops the connection. ``clock`` (default ``reactor``) keeps
    the deadline and the grace; ``connect`` replaces
    ``reactor.connectTCP``.
    """
    eight, seven = variants
    timer: ReactorTime = clock if clock is not None else reactor
    connector: list[Any] = []

    def abort(_: defer.Deferred[Any]) -> None:
        # A finished factory reports no disconnect on the cancelled Deferred.
        factory.sendFinished = True
        for c in connector:
            c.disconnect()

    result: defer.Deferred[Any] = defer.Deferred(abort)
    factory = _Factory(
        lambda offered: eight if offered else seven,
        relay.username.encode() if relay.username is not None else None,
        relay.password.encode() if relay.password is not None else None,
        sender,
        list(to),
        BytesIO(b""),
        result,
        retries=0,
        contextFactory=client_tls(relay.host) if relay.starttls else None,
        heloFallback=relay.username is None and not relay.starttls,
        requireAuthentication=relay.username is not None,
        requireTransportSecurity=relay.starttls,
    )
    factory.domain = helo
    if connect is None:
        wait = min(CONNECT_TIMEOUT, timeout)
        connector.append(reactor.connectTCP(relay.host, relay.port, factory, timeout=wait))
    else:
        connector.append(connect(relay.host, relay.port, factory))
    result.addTimeout(timeout, as_reactor_time(timer))

    def finished(outcome: Any) -> list[Refusal]:
        _let_go(factory, timer, at_once=isinstance(outcome, Failure))
        if isinstance(outcome, Failure):
            return outcome  # type: ignore[return-value] # a Failure fails the Deferred on
        _, addresses = outcome
        return [(a, code, reply) for a, code, reply in addresses if code not in smtp.SUCCESS]

    return result.addBoth(finished)


def _let_go(factory: _Factory, clock: ReactorTime, at_once: bool) -> None:
    """Close an attempt's connection: at once after a failure (Twisted's
    client would go on with RSET, which a broken relay may never answer),
    within QUIT_GRACE seconds after a success (QUIT and its reply)."""
    sender = factory.sender
    transport = sender.transport if sender is not None else None
    if sender is None or transport is None or not sender.connected:
        return
    if at_once:
        sender.hang_up()
    else:
        sender.linger = clock.callLater(QUIT_GRACE, transport.abortConnection)
