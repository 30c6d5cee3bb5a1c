"""The envelope record: the message bytes exactly as received, plus metadata.

The metadata is rendered as a block of ``X-Spamtrap-*`` header fields and one
trap-hop ``Received:`` line, prepended to the untouched message bytes. The
field names are part of spamtrap's contract with consumers (see README,
"Metadata"); never rename one silently.
"""

from __future__ import annotations

import json
import secrets
import string
import time
from dataclasses import dataclass, field
from email.utils import formatdate

BASE62 = string.digits + string.ascii_letters

# Metadata field name (as used in set rules, ``meta:``) -> header field name.
# The order here is the order of the header block.
META_FIELDS: dict[str, str] = {
    "id": "X-Spamtrap-Id",
    "node": "X-Spamtrap-Node",
    "session": "X-Spamtrap-Session",
    "peer": "X-Spamtrap-Peer",
    "local": "X-Spamtrap-Local",
    "proxy": "X-Spamtrap-Proxy",
    "rdns": "X-Spamtrap-Rdns",
    "helo": "X-Spamtrap-Helo",
    "tls": "X-Spamtrap-TLS",
    "mail_from": "X-Spamtrap-Mail-From",
    "rcpt": "X-Spamtrap-Rcpt",
    "domain": "X-Spamtrap-Domain",
    "feed": "X-Spamtrap-Feed",
    "connected": "X-Spamtrap-Connected",
    "received": "X-Spamtrap-Received",
    "size": "X-Spamtrap-Size",
    "dialect": "X-Spamtrap-Dialect",
    "timing": "X-Spamtrap-Timing",
}


def random_base62(n: int = 16) -> str:
    """An unguessable token from the ``secrets`` module."""
    return "".join(secrets.choice(BASE62) for _ in range(n))


def new_message_id(node: str) -> str:
    """A unique message id: time-ordered, node-qualified, unguessable."""
    return f"{int(time.time() * 1000):x}.{random_base62(12)}.{node}"


def _clean(value: str) -> str:
    # A header value must not break the header block: no CR, LF or NUL.
    return value.replace("\r", " ").replace("\n", " ").replace("\0", " ")


@dataclass
class Envelope:
    """One accepted message: the bytes as received and what we know of it."""

    msg_id: str
    received_at: float  # end of DATA, Unix time
    mail_from: str  # reverse-path without brackets; "" for the null sender
    rcpts: list[str]
    data: bytes  # exactly as received (dot-unstuffed), lines end as they came
    feed: str | None = None
    # name (a META_FIELDS key) -> values, in arrival order
    meta: dict[str, list[str]] = field(default_factory=dict)
    # the trap-hop Received line's value, already folded with CRLF+TAB
    received_line: str = ""

    def values(self, name: str) -> list[str]:
        return self.meta.get(name, [])

    def header_block(self) -> bytes:
        lines = []
        for name, header in META_FIELDS.items():
            for value in self.meta.get(name, []):
                lines.append(f"{header}: {_clean(value)}\r\n")
        if self.received_line:
            lines.append(f"Received: {self.received_line}\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def full_bytes(self) -> bytes:
        """The metadata block followed by the untouched message."""
        return self.header_block() + self.data

    # Spool serialisation: "<len of JSON>\n" + JSON + message bytes.
    def to_record(self) -> bytes:
        head = json.dumps(
            {
                "v": 1,
                "id": self.msg_id,
                "t": self.received_at,
                "from": self.mail_from,
                "rcpts": self.rcpts,
                "feed": self.feed,
                "meta": self.meta,
                "received": self.received_line,
            },
            separators=(",", ":"),
        ).encode("utf-8", "surrogateescape")
        return b"%d\n" % len(head) + head + self.data

    @classmethod
    def from_record(cls, record: bytes) -> Envelope:
        nl = record.index(b"\n")
        n = int(record[:nl])
        head = json.loads(record[nl + 1 : nl + 1 + n].decode("utf-8", "surrogateescape"))
        if head.get("v") != 1:
            raise ValueError(f"unknown spool record version {head.get('v')!r}")
        return cls(
            msg_id=head["id"],
            received_at=head["t"],
            mail_from=head["from"],
            rcpts=head["rcpts"],
            data=record[nl + 1 + n :],
            feed=head["feed"],
            meta=head["meta"],
            received_line=head["received"],
        )


def rfc2822_date(t: float) -> str:
    return formatdate(t, localtime=False, usegmt=True)
