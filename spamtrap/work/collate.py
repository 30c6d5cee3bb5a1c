"""Set rules: which output sets a message lands in.

A set's ``match`` conditions must all hold and none of its ``exclude``
conditions may; a set with no conditions takes everything. A condition
searches a regexp in every value of a message header (``header:``) or of a
metadata field (``meta:``, the names of spamtrap.message.META_FIELDS).

``meta:`` reads only our metadata (Envelope.values), never the message's
header fields: a sender can write its own ``X-Spamtrap-Feed:`` into the
message, and config loading refuses ``header:`` rules on ``X-Spamtrap-*``
names for that reason.
"""

from __future__ import annotations

import re

from spamtrap.config import Condition, SetConfig
from spamtrap.message import MAX_HEADER_BYTES, Envelope
from spamtrap.regex_safety import MAX_VALUE_CHARS

# Headers are searched at most MAX_HEADER_BYTES far in (defined beside the
# spoofed-field scan): a message with no blank line after its header must
# not make every rule scan megabytes.
__all__ = ["MAX_HEADER_BYTES", "Collator", "message_headers"]

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FOLD = re.compile(rb"\r?\n[ \t]+")


def message_headers(data: bytes) -> dict[str, list[str]]:
    """Header fields of raw message bytes: lower-cased name -> unfolded values.

    Lenient by design: lines that are not ``Name: value`` are skipped, and the
    bytes are decoded with surrogateescape so nothing raises.
    """
    m = _HEADER_END.search(data, 0, MAX_HEADER_BYTES)
    head = data[: m.start()] if m else data[:MAX_HEADER_BYTES]
    head = _FOLD.sub(b" ", head)
    out: dict[str, list[str]] = {}
    for line in head.splitlines():
        name, sep, value = line.partition(b":")
        name = name.strip()  # QUIRK: "Subject : x" is common in spam
        if not sep or not name or b" " in name or b"\t" in name:
            continue
        out.setdefault(name.decode("ascii", "replace").lower(), []).append(
            value.strip().decode("utf-8", "surrogateescape")
        )
    return out


class Collator:
    def __init__(self, sets: list[SetConfig]) -> None:
        self.sets = sets
        self.needs_headers = any(c.header for s in sets for c in (*s.match, *s.exclude))

    def sets_for(self, env: Envelope) -> list[str]:
        headers = message_headers(env.data) if self.needs_headers else {}

        def holds(cond: Condition) -> bool:
            if cond.header is not None:
                values = headers.get(cond.header.lower(), [])
            else:
                values = env.values(cond.meta or "")
            # Bounded like the lists stage's rules (regex_safety).
            return any(cond.regex.search(v[:MAX_VALUE_CHARS]) for v in values)

        return [
            s.name
            for s in self.sets
            if all(holds(c) for c in s.match) and not any(holds(c) for c in s.exclude)
        ]
