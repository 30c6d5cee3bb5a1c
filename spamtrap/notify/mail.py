"""List mail: one machine-readable notice per stored bundle and list address.

The notice is sent through the configured relay with Twisted's
ESMTPSenderFactory, one attempt per call; retrying is the Notifier's job, so
the factory's own reconnect loop is turned off (``retries=0``).

Credentials never travel in plaintext: a relay with a username must use
STARTTLS (the relay's certificate is verified) unless it is on loopback,
where nobody can listen in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from io import BytesIO
from typing import Any

from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.mail import smtp
from twisted.python.failure import Failure

from spamtrap.config import RelayConfig
from spamtrap.message import random_base62, rfc2822_date
from spamtrap.store.published import header_value, subject  # shared with spamtrap pull

# The whole SMTP transaction: connect, STARTTLS, AUTH, DATA.
ATTEMPT_TIMEOUT = 120.0
CONNECT_TIMEOUT = 30.0

# The body: (field name, manifest key). Consumers parse it as a header block.
FIELDS = [
    ("Set", "set"),
    ("Key", "key"),
    ("URL", "url"),
    ("Size", "size"),
    ("SHA256", "sha256"),
    ("Messages", "messages"),
    ("First-Received", "first_received"),
    ("Last-Received", "last_received"),
    ("Node", "node"),
    ("Format", "format"),
    # Added after the first release: new fields go at the end.
    ("Manifest-URL", "manifest_url"),
]

_URL_KEYS = ("url", "manifest_url")

Connect = Callable[[str, int, Any], Any]  # (host, port, factory) -> IConnector


class RelayConfigError(ValueError):
    """The relay settings would be unsafe or cannot work."""


def notice(manifest: Mapping[str, object], sender: str, to: str, now: float) -> bytes:
    """The whole mail for one list address (LF line ends: the SMTP client
    turns them into CRLF and dot-stuffs)."""
    domain = sender.rpartition("@")[2] or "localhost"
    node = header_value(manifest.get("node", "spamtrap"))
    headers = [
        ("From", sender),
        ("To", to),
        ("Subject", subject(manifest)),
        ("Date", rfc2822_date(now)),
        ("Message-ID", f"<{random_base62(20)}.{node}@{domain}>"),
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=us-ascii"),
        ("Content-Transfer-Encoding", "7bit"),
        # RFC 3834: no vacation replies or other auto-responses to this.
        ("Auto-Submitted", "auto-generated"),
        ("Precedence", "bulk"),
    ]
    # The Notifier always fills in url and manifest_url; a manifest handed
    # in without them leaves them out. Any other field missing is an error.
    values = [(n, manifest.get(k) if k in _URL_KEYS else manifest[k]) for n, k in FIELDS]
    body = [(n, header_value(v)) for n, v in values if v is not None]
    text = "".join(f"{n}: {v}\n" for n, v in headers) + "\n"
    text += "".join(f"{n}: {v}\n" for n, v in body)
    return text.encode("ascii")


def _utf8(value: str | None) -> bytes | None:
    return None if value is None else value.encode("utf-8")


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


def is_permanent(failure: Failure) -> bool:
    """A 5xx reply (rejected recipient, AUTH declined, no STARTTLS offered)
    will not change by retrying; anything else (4xx, network, timeout) may."""
    error = failure.value
    return isinstance(error, smtp.SMTPClientError) and 500 <= error.code < 600


def describe_error(failure: Failure) -> str:
    """An error for the log: the relay's reply only. An SMTPClientError's
    text includes the session transcript, and that holds the AUTH line."""
    error = failure.value
    if isinstance(error, smtp.SMTPClientError):
        reply = error.resp.decode("utf-8", "replace")
        return f"{error.code:03d} {reply}" if error.code > 0 else reply
    return failure.getErrorMessage() or repr(error)


class _SenderFactory(smtp.ESMTPSenderFactory):
    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        # The client keeps a transcript by default, AUTH line included, and
        # puts it into its exceptions: keep credentials out of memory and logs.
        p.debug = False
        return p


class MailSender:
    """Sends one message through the relay per ``send`` call."""

    def __init__(
        self,
        relay: RelayConfig,
        reactor: Any,
        clock: Any,
        helo: str,
        connect: Connect | None = None,
        client_tls: Callable[[str], Any] | None = None,
    ) -> None:
        check_relay(relay)
        self._relay = relay
        self._clock = clock
        self._helo = helo.encode("idna") if helo.isascii() and helo else b"localhost"
        if connect is None:

            def connect(host: str, port: int, factory: Any) -> Any:
                return reactor.connectTCP(host, port, factory, timeout=CONNECT_TIMEOUT)

        self._connect = connect
        # The relay's certificate is verified against the system's roots
        # unless a test hands in its own trust.
        self._client_tls = client_tls or ssl.optionsForClientTLS

    def send(self, to: str, message: bytes) -> Deferred[None]:
        relay = self._relay
        connector: list[Any] = []  # filled once connecting has begun

        def abort(_: Deferred[Any]) -> None:
            # Marking the send finished stops the factory from reporting the
            # disconnect we cause on an already cancelled Deferred.
            factory.sendFinished = True
            for c in connector:
                c.disconnect()

        result: Deferred[Any] = Deferred(abort)
        factory = _SenderFactory(
            _utf8(relay.username),
            _utf8(relay.password),
            relay.sender,
            [to],
            BytesIO(message),
            result,
            retries=0,
            contextFactory=self._client_tls(relay.host) if relay.starttls else None,
            heloFallback=relay.username is None and not relay.starttls,
            requireAuthentication=relay.username is not None,
            requireTransportSecurity=relay.starttls,
        )
        factory.domain = self._helo
        connector.append(self._connect(relay.host, relay.port, factory))
        result.addTimeout(ATTEMPT_TIMEOUT, self._clock)
        return result.addCallback(lambda _: None)
