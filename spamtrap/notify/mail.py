"""List mail: one machine-readable notice per stored bundle and list address.

The notice is sent through the configured relay with spamtrap's hardened
SMTP client (:mod:`spamtrap.smtp_client`, the forward output's too), one
attempt per call; retrying is the Notifier's job. A relay that answers
garbage fails the attempt, which is retried like any other temporary
failure; only a 5xx reply is permanent.

Credentials never travel in plaintext: a relay with a username must use
STARTTLS (the relay's certificate is verified) unless it is on loopback,
where nobody can listen in (:func:`spamtrap.smtp_client.check_relay`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.mail import smtp
from twisted.python.failure import Failure

from spamtrap.config import RelayConfig
from spamtrap.message import random_base62, rfc2822_date
from spamtrap.smtp_client import Connect, check_relay, describe, for_the_wire, send_mail
from spamtrap.store.published import header_value, subject  # shared with spamtrap pull

# The whole SMTP transaction: connect, STARTTLS, AUTH, DATA.
ATTEMPT_TIMEOUT = 120.0

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
    # The bundle's index (spamtrap.bundle.index), beside the bundle: its
    # file name and sha256, for a bundle stored with one.
    ("Index", "index"),
    ("Index-SHA256", "index_sha256"),
]

# Left out when the manifest has no value (None or missing): the URLs the
# Notifier could not make, the index of a bundle stored without one.
_OPTIONAL_KEYS = ("url", "manifest_url", "index", "index_sha256")

def notice(manifest: Mapping[str, object], sender: str, to: str, now: float) -> bytes:
    """The whole mail for one list address (LF line ends: MailSender sends
    it with CRLF, dot-stuffed)."""
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
    # in without them, or without an index, leaves them out. Any other
    # field missing is an error.
    values = [(n, manifest.get(k) if k in _OPTIONAL_KEYS else manifest[k]) for n, k in FIELDS]
    body = [(n, header_value(v)) for n, v in values if v is not None]
    text = "".join(f"{n}: {v}\n" for n, v in headers) + "\n"
    text += "".join(f"{n}: {v}\n" for n, v in body)
    return text.encode("ascii")


def is_permanent(failure: Failure) -> bool:
    """A 5xx reply (rejected recipient, AUTH declined, no STARTTLS offered)
    will not change by retrying; anything else (4xx, network, timeout) may."""
    error = failure.value
    return isinstance(error, smtp.SMTPClientError) and 500 <= error.code < 600


def describe_error(failure: Failure) -> str:
    """An error for the log: the relay's reply only, never the session
    transcript (it holds the AUTH line)."""
    error = failure.value
    assert error is not None
    return describe(error)


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
        self._reactor = reactor
        self._connect = connect  # None: reactor.connectTCP
        # The relay's certificate is verified against the system's roots
        # unless a test hands in its own trust.
        self._client_tls = client_tls or ssl.optionsForClientTLS

    def send(self, to: str, message: bytes) -> Deferred[None]:
        wire = for_the_wire(message)
        sent = send_mail(
            self._reactor,
            self._relay,
            self._helo,
            self._relay.sender,
            [to],
            (wire, wire),  # ASCII: the same for a relay with 8BITMIME and one without
            ATTEMPT_TIMEOUT,
            self._client_tls,
            clock=self._clock,
            connect=self._connect,
        )
        return sent.addCallback(lambda _: None)
