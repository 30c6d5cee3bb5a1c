"""The envelope record: the message bytes exactly as received, plus metadata.

The metadata is rendered as a block of ``X-Spamtrap-*`` header fields and one
trap-hop ``Received:`` line, prepended to the untouched message bytes. The
field names are part of spamtrap's contract with consumers (see README,
"Metadata"); never rename one silently.
"""

from __future__ import annotations

import functools
import itertools
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
    "relay": "X-Spamtrap-Relay",
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
    "line_ends": "X-Spamtrap-Line-Ends",
    "spoofed": "X-Spamtrap-Spoofed",
}


def random_base62(n: int = 16) -> str:
    """An unguessable token of ``n`` base62 digits from the ``secrets`` module.

    One big random integer is converted, rather than one secrets.choice()
    per digit: this runs for every connection and message. 64 spare bits
    make the modulo bias unmeasurable.
    """
    num = secrets.randbits(6 * n + 64) % (62**n)
    digits = []
    for _ in range(n):
        num, d = divmod(num, 62)
        digits.append(BASE62[d])
    return "".join(digits)


# Ids need to be unique, not secret: a random per-process prefix and a
# counter make them so without a urandom call per connection and message.
_PROCESS_PREFIX = random_base62(8)
_counter = itertools.count(1)


def _base62(n: int) -> str:
    out = []
    while True:
        n, d = divmod(n, 62)
        out.append(BASE62[d])
        if not n:
            return "".join(reversed(out))


def new_session_id() -> str:
    """A unique id for an SMTP session (unique across processes and restarts)."""
    return _PROCESS_PREFIX + _base62(next(_counter))


def new_message_id(node: str, now: float | None = None) -> str:
    """A unique message id: time-ordered and node-qualified."""
    t = time.time() if now is None else now
    return f"{int(t * 1000):x}.{_PROCESS_PREFIX}{_base62(next(_counter))}.{node}"


# Built once: json.dumps() with non-default arguments builds one per call.
_RECORD_JSON = json.JSONEncoder(separators=(",", ":"))


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
        # Stages' own fields (x_name -> X-Spamtrap-X-Name), after ours.
        for name, values in self.meta.items():
            if name.startswith("x_"):
                header = "X-Spamtrap-" + "-".join(p.capitalize() for p in name.split("_"))
                lines.extend(f"{header}: {_clean(v)}\r\n" for v in values)
        if self.received_line:
            lines.append(f"Received: {self.received_line}\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def full_bytes(self) -> bytes:
        """The metadata block followed by the untouched message."""
        return self.header_block() + self.data

    # Spool serialisation: "<len of JSON>\n" + JSON + message bytes.
    def to_record(self) -> bytes:
        head = _RECORD_JSON.encode(
            {
                "v": 1,
                "id": self.msg_id,
                "t": self.received_at,
                "from": self.mail_from,
                "rcpts": self.rcpts,
                "feed": self.feed,
                "meta": self.meta,
                "received": self.received_line,
            }
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


@functools.lru_cache(maxsize=4)
def _rfc2822_second(second: int) -> str:
    return formatdate(second, localtime=False, usegmt=True)


def rfc2822_date(t: float) -> str:
    """RFC 5322 date in GMT; cached per second (it runs for every message)."""
    return _rfc2822_second(int(t))


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def iso_time(t: float) -> str:
    """ISO-8601 UTC with milliseconds, e.g. 2026-11-22T13:31:15.123Z."""
    ms = int(t * 1000)
    return f"{_iso_second(ms // 1000)}.{ms % 1000:03d}Z"
