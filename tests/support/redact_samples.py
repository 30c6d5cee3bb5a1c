"""A spam with trap addresses in every place redaction must reach, and the
ways to find them again: shared by the redaction unit tests and the system
test that publishes redacted sets."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage

from spamtrap.config import FeedConfig

TRAP_DOMAINS = ["trap.example", "Second-Trap.example"]
TRAP_ADDRESSES = ["spamtrap@example.org"]
FEED = FeedConfig(id="donor", address="feed1@donor.example")
RCPT = "catchme@catchall.example"  # a catch-all trap: known only from RCPT TO
ALL_TRAPS = [*TRAP_ADDRESSES, FEED.address, RCPT]


def trap_pattern() -> re.Pattern[str]:
    """Any trap address (case-insensitive), as text, however delimited."""
    full = "|".join(re.escape(a) for a in ALL_TRAPS)
    domains = "|".join(re.escape(d) for d in TRAP_DOMAINS)
    return re.compile(
        rf"(?<![\w.+-])(?:{full})(?![\w-]|\.\w)|[\w.+'-]*(?:@|%40)(?:{domains})(?![\w-]|\.\w)", re.I
    )


TRAP_RE = trap_pattern()

HTML = (
    "<p>Dear <a href='mailto:x@trap.example'>x@trap.example</a>,</p>\n"
    "<p>unsubscribe: http://spam.example/u?e=someone%40trap.example&amp;x=1</p>\n"
    "<p>contact bob@other.example or alice@example.org</p>\n" * 3
)
PLAIN = (
    "Hello Jane.Doe-99@TRAP.example, your friend SpamTrap@Example.ORG sent this.\n"
    "Reply to bob@other.example, not xspamtrap@example.org.\n"
    "Visit spamtrap@example.org.evil.example today. " + "filler " * 30 + "\n"
    "Also info@second-trap.example and user@trap.example.net.\n"
)


def every_text(data: bytes) -> list[str]:
    """The raw bytes, every decoded header value and every decoded part,
    as Python's email package reads them."""
    texts = [data.decode("latin-1")]
    message = email.message_from_bytes(data, policy=email.policy.default)
    for part in message.walk():
        for name, value in part.items():
            texts.append(f"{name}: {value}")  # RFC 2047 decoded by the policy
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            texts.append(payload.decode("utf-8", "replace"))
    return texts


def build_message() -> bytes:
    """A spam with trap addresses in every place redaction must reach."""
    msg = EmailMessage()
    msg["Received"] = "from relay (relay [192.0.2.1]) by mx; for <feed1@donor.example>"
    msg["Delivered-To"] = "feed1@donor.example"
    msg["From"] = "Bob <bob@other.example>"
    msg["To"] = "Jäne Doe <Jane.Doe-99@TRAP.example>, catchme@catchall.example"
    msg["Cc"] = "feed2@donor.example"
    msg["Subject"] = "Angebot für·someone@trap.example, spamtrap@example.org, alice@example.org"
    msg.set_content(PLAIN, cte="quoted-printable")
    msg.add_alternative(HTML, subtype="html", cte="base64")
    inner = EmailMessage()
    inner["From"] = "catchme@catchall.example"
    inner["To"] = "x@trap.example"
    inner["Subject"] = "forwarded"
    inner.set_content("inner body for someone@trap.example from bob@other.example\n")
    msg.add_attachment(inner)
    msg.add_attachment(
        b"list: info@second-trap.example, alice@example.org\n",
        maintype="application",
        subtype="octet-stream",
        filename="list.txt",
    )
    data = msg.as_bytes(policy=email.policy.SMTP)
    # A preamble (never decoded by anything, still in the bytes).
    boundary = msg.get_boundary()
    assert boundary is not None
    marker = f"--{boundary}".encode()
    return data.replace(marker, b"preamble for x@trap.example\r\n" + marker, 1)
