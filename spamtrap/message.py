"""The envelope record: the message bytes exactly as received, plus metadata.

The metadata is rendered as a block of ``X-Spamtrap-*`` header fields and one
trap-hop ``Received:`` line, prepended to the untouched message bytes. The
field names are part of spamtrap's contract with consumers (see README,
"Metadata"); never rename one silently.

Everything in the block that a sender controls (HELO, MAIL FROM, RCPT TO,
the names of its own ``X-Spamtrap-*`` fields) is data, never structure:
:meth:`Envelope.header_block` is the one place that escapes it, visibly and
reversibly (:func:`escape_value`, :func:`unescape_value`). The envelope and
the spool record keep the raw values, as evidence.

A set stores its messages with ``unix`` line ends (a message sent with CRLF
throughout is stored with LF, and the block uses LF) or ``wire`` ones (the
bytes as sent, CRLF block). :func:`wire_bytes` rebuilds the exact bytes sent
from either form.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import secrets
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import formatdate

from spamtrap.mime import MAX_HEADER_BYTES

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
    "campaign": "X-Spamtrap-Campaign",
}


# A set's choice of line ends (SetConfig.line_endings).
LINE_ENDINGS = ("unix", "wire")


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


# Between the pieces of the trap-hop Received line, in received_line.
_FOLD = "\r\n\t"

# Built once: json.dumps() with non-default arguments builds one per call.
# No circular check (a record is plain dicts, lists and strings; the bytes
# are the same): 8.0 -> 6.6 us per encode on spam-2, measured 2026-12-03.
_RECORD_JSON = json.JSONEncoder(separators=(",", ":"), check_circular=False)
_RECORD_DECODER = json.JSONDecoder()


# -- escaping: sender-controlled text inside our header block -----------------

# C0 and C1 controls (NEL, U+0085, among them), DEL, the Unicode line and
# paragraph separators and the escape character itself: str.splitlines()
# ends a line at the C1 and Unicode ones. Everything else, 8-bit bytes
# (surrogateescape'd) included, is written as it came.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\\\\]")
_ESCAPES = {"\\": "\\\\", "\r": "\\r", "\n": "\\n", "\t": "\\t", "\0": "\\0"}
_ESCAPED = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.?)", re.DOTALL)
_UNESCAPES = {"\\": "\\", "r": "\r", "n": "\n", "t": "\t", "0": "\0"}


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    n = ord(c)
    return _ESCAPES.get(c) or (f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}")


def escape_value(value: str) -> str:
    r"""``value`` made safe for one header line, reversibly.

    A backslash becomes ``\\``; CR, LF, TAB and NUL become ``\r``, ``\n``,
    ``\t``, ``\0``; any other C0 control, DEL and the C1 controls ``\xNN``
    (two lower-case hex digits); U+2028 and U+2029 ``\u2028``, ``\u2029``;
    a leading space ``\x20`` (header parsers drop it). Nothing else changes.
    :func:`unescape_value` undoes it.
    """
    # Fast path: almost every value has nothing to escape.
    if _UNSAFE.search(value) is not None:
        value = _UNSAFE.sub(_escape_char, value)
    if value[:1] == " ":
        value = "\\x20" + value[1:]
    return value


def unescape_value(text: str) -> str:
    """The raw value of an escaped metadata value (see :func:`escape_value`).

    Raises ValueError on a backslash that starts no escape of ours.
    """
    if "\\" not in text:
        return text

    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        if code in _UNESCAPES:
            return _UNESCAPES[code]
        if len(code) in (3, 5):
            return chr(int(code[1:], 16))
        raise ValueError(f"bad escape {m.group()!r} at offset {m.start()} in {text!r}")

    return _ESCAPED.sub(one, text)


# -- facts of the message bytes as stored --------------------------------------

# The end of the header section: the first empty line that stays empty
# after CRLF -> LF conversion (LF, or CRLF, right after an LF). Readers may
# end the header earlier (Python's email package also takes "\r\r\n" for an
# empty line, which conversion makes a line end), never later: the scan
# lists at least every field any of them sees, in both stored forms.
# A field name starting a line of the header, matched in the lower-cased
# header with an LF put in front and every CR made an LF (offsets stay).
# CR alone counts as a line end here: Python's email package splits lines
# on it, so a field after a bare CR is a field to it. The pattern starts
# with a literal, which the regex engine skips ahead to fast (a lookbehind
# or a character set would cost a step per byte), and its possessive
# quantifiers never backtrack.
_OWN_NAME = re.compile(rb"\n(x-spamtrap-[^\s:]*+)[ \t]*+:")
# At most this many names are listed in X-Spamtrap-Spoofed; then "(+N more)".
MAX_SPOOFED = 64

LINE_ENDS = ("crlf", "lf", "mixed", "none")


def line_ends_of(data: bytes) -> str:
    """``crlf`` (every LF has a CR before it), ``lf`` (no LF has), ``mixed``,
    or ``none`` (no LF at all). A CR without LF is not a line end."""
    return _line_facts(data)[0]


def _line_facts(data: bytes) -> tuple[str, int]:
    """:func:`line_ends_of` ``data``, and how many LFs it holds."""
    lf = data.count(b"\n")
    if not lf:
        return "none", 0
    crlf = data.count(b"\r\n")
    if crlf == lf:
        return "crlf", lf
    return ("lf" if crlf == 0 else "mixed"), lf


def _head_end(data: bytes) -> int:
    """Where the top header section ends (see the note above _OWN_NAME),
    at most MAX_HEADER_BYTES in: the offset of the LF that ends its last
    line, or 0 if the data starts with an empty line."""
    if data[:1] == b"\n" or data[:2] == b"\r\n":
        return 0
    end = min(len(data), MAX_HEADER_BYTES)
    nl = data.find(b"\n", 0, MAX_HEADER_BYTES)
    if nl < 0:  # one fast memchr for no LF at all
        return end
    # The earlier of the two blank lines. The one the first line end makes
    # likely is looked for first, the other only before it: a CRLF message
    # has no "\n\n", and looking for one read all of it up to 256 KiB
    # (spoofed_of: 9.8 -> 5.1 us per spam-2 message, measured 2026-12-03).
    likely, other = (b"\n\r\n", b"\n\n") if data[nl - 1 : nl] == b"\r" else (b"\n\n", b"\n\r\n")
    i = data.find(likely, 0, end)
    if i >= 0:
        end = i
    # Only matches that start before end: end + len - 1 bounds the search.
    i = data.find(other, 0, min(end + len(other) - 1, MAX_HEADER_BYTES))
    if i >= 0:
        end = i
    return end


# The X-Spamtrap-Spoofed marker of a message whose first byte is a space or
# TAB: every mail reader takes its first line for a continuation of our
# trap-hop Received field (RFC 5322 2.2.3 unfolding). The bytes stay as
# sent; this says so.
LEADING_WSP = "leading-wsp"


def spoofed_of(data: bytes) -> str | None:
    """What in the message would pass for ours: ``leading-wsp`` (see
    LEADING_WSP) first if it starts with a space or TAB, then the names of
    its own ``X-Spamtrap-*`` fields, in order, joined by ", " (field names
    hold no spaces); None if there is neither.

    Only the top header section counts (up to the first empty line, at most
    MAX_HEADER_BYTES), as a mail reader would see it. Linear, and a header
    without the prefix costs one lower-casing copy and one search.
    """
    end = _head_end(data)
    names: list[str] = [LEADING_WSP] if data[:1] in (b" ", b"\t") else []
    low = b"\n" + data[:end].lower()  # offsets: data's + 1
    if b"x-spamtrap-" in low:
        low = low.replace(b"\r", b"\n")
        found = 0
        for m in _OWN_NAME.finditer(low):
            if found < MAX_SPOOFED:
                # Spelled as sent: the name's bytes from its offsets.
                a, b = m.span(1)
                names.append(data[a - 1 : b - 1].decode("utf-8", "surrogateescape"))
            found += 1
        if found > MAX_SPOOFED:
            names.append(f"(+{found - MAX_SPOOFED} more)")
    return ", ".join(names) if names else None


# -- rebuilding what was sent ---------------------------------------------------


def split_block(stored: bytes) -> tuple[bytes, bytes]:
    """A stored message split into our metadata block and the message.

    The block is the ``X-Spamtrap-*`` fields at the top followed by exactly
    one ``Received:`` field, ours. Its last line is always the one starting
    ``TAB for <`` (the pieces between our folds are escaped, so none holds a
    line end), and the block ends after it: a message whose own first line
    starts with a TAB or space (Spoofed ``leading-wsp``) stays the
    message's. A block from before that rule, whose Received has no ``for``
    line, ends at the first line that does not start with a TAB. Raises
    ValueError without a Received field.
    """
    pos = 0
    while stored.startswith(b"X-Spamtrap-", pos):
        nl = stored.find(b"\n", pos)
        if nl < 0:
            raise ValueError(f"metadata field without a line end at byte {pos}")
        pos = nl + 1
    if not stored.startswith(b"Received:", pos):
        raise ValueError(
            f"no trap-hop Received field after the X-Spamtrap-* fields (byte {pos}):"
            " not a message stored by spamtrap"
        )
    while True:
        line = pos
        nl = stored.find(b"\n", pos)
        if nl < 0:
            raise ValueError(f"trap-hop Received field without a line end at byte {pos}")
        pos = nl + 1
        if stored.startswith(b"\tfor <", line) or stored[pos : pos + 1] != b"\t":
            return stored[:pos], stored[pos:]


def wire_bytes(stored: bytes) -> bytes:
    """The exact message bytes the client sent, from a stored message.

    Drop the metadata block (see :func:`split_block`); then, if
    ``X-Spamtrap-Line-Ends`` is ``crlf`` and the block's own lines end in LF
    (a ``unix`` set converted the message), replace every LF with CRLF;
    otherwise the bytes are the wire bytes already. A message stored before
    Line-Ends existed has a CRLF block and is returned as it is.
    """
    block, message = split_block(stored)
    if block.endswith(b"\r\n"):
        return message
    for line in block.split(b"\n"):
        if line.startswith(b"X-Spamtrap-Line-Ends:"):
            if line[len(b"X-Spamtrap-Line-Ends:") :].strip() == b"crlf":
                return message.replace(b"\n", b"\r\n")
            break
    return message


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
    # The trap-hop Received line: its pieces, raw, between our folds;
    # header_block escapes each and folds with its line end. The last piece
    # starts "for <" (split_block relies on it).
    received: list[str] = field(default_factory=list)
    # (data, line ends, spoofed names, LF count) of the last data looked at:
    # stages replace data, so it is recomputed when data is another object.
    _facts: tuple[bytes, str, str | None, int] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def received_line(self) -> str:
        """The trap-hop Received line as one value: its pieces joined by
        CRLF+TAB (unescaped; header_block writes the escaped field)."""
        return _FOLD.join(self.received)

    def _data_facts(self) -> tuple[bytes, str, str | None, int]:
        facts = self._facts
        data = self.data
        if facts is None or facts[0] is not data:
            line_ends, lf = _line_facts(data)
            facts = (data, line_ends, spoofed_of(data), lf)
            self._facts = facts
        return facts

    @property
    def line_ends(self) -> str:
        """``X-Spamtrap-Line-Ends`` of the message bytes (before conversion)."""
        return self._data_facts()[1]

    @property
    def spoofed(self) -> str | None:
        """``X-Spamtrap-Spoofed``: the message's own X-Spamtrap-* field names."""
        return self._data_facts()[2]

    def values(self, name: str) -> list[str]:
        # line_ends and spoofed are facts of the bytes as they are now.
        if name == "line_ends":
            return [self.line_ends]
        if name == "spoofed":
            spoofed = self.spoofed
            return [spoofed] if spoofed is not None else []
        return self.meta.get(name, [])

    def header_block(self, eol: str = "\r\n") -> bytes:
        """Our metadata fields and the trap-hop Received line, lines ending
        in ``eol``. Every value is escaped (escape_value): nothing a sender
        sent can end a line or start a field of ours."""
        _, line_ends, spoofed, _ = self._data_facts()
        meta = self.meta
        headers: list[str] = []
        values: list[str] = []  # headers[i]'s value, then the Received pieces
        for name, header in META_FIELDS.items():
            # as self.values(name), without a call per name
            if name == "line_ends":
                field_values: Sequence[str] = (line_ends,)
            elif name == "spoofed":
                field_values = () if spoofed is None else (spoofed,)
            else:
                field_values = meta.get(name, ())
            for value in field_values:
                headers.append(header)
                values.append(value)
        # Stages' own fields (x_name -> X-Spamtrap-X-Name), after ours.
        for name, field_values in meta.items():
            if name.startswith("x_"):
                header = "X-Spamtrap-" + "-".join(p.capitalize() for p in name.split("_"))
                headers.extend(header for _ in field_values)
                values += field_values
        values += self.received
        # One check of all values instead of an escape_value() each: almost
        # no value needs escaping. Printable text holds none of _UNSAFE but
        # the backslash, and a value's leading space follows a ":" in the
        # probe (a ": " inside one only takes the exact way). header_block:
        # 12.4 -> 8.3 us per spam-2 message, measured 2026-12-03.
        probe = ":".join(values)
        if not probe.isprintable() or "\\" in probe or ": " in probe or probe[:1] == " ":
            values = [escape_value(v) for v in values]
        lines = [f"{h}: {v}{eol}" for h, v in zip(headers, values, strict=False)]
        if self.received:
            folded = (eol + "\t").join(values[len(headers) :])
            lines.append(f"Received: {folded}{eol}")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def full_bytes(self) -> bytes:
        """The metadata block followed by the untouched message (``wire``)."""
        return self.header_block() + self.data

    def stored_bytes(self, line_endings: str = "unix") -> bytes:
        """The message as a set stores it (``unix`` or ``wire`` line ends).

        ``unix``: the block ends its lines with LF, and a message with CRLF
        line ends throughout (Line-Ends ``crlf``) is stored with LF; any
        other message (``lf``, ``mixed``, ``none``) is stored as sent.
        ``wire``: the block ends its lines with CRLF; the message as sent.
        :func:`wire_bytes` gives back the bytes sent in both cases.
        """
        if line_endings == "wire":
            return self.header_block() + self.data
        data, line_ends, _, lf = self._data_facts()
        if line_ends == "crlf":
            # Every LF has a CR before it. If every CR has an LF after it
            # too (as good as every message), the conversion deletes every
            # CR, and translate() does that in one pass where replace()
            # searches for each CRLF: 17.4 -> 8.4 us (count included) per
            # spam-2 message, measured 2026-12-03.
            if data.count(b"\r") == lf:
                data = data.translate(None, b"\r")
            else:
                data = data.replace(b"\r\n", b"\n")
        return self.header_block("\n") + data

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
                "received": self.received,
            }
        ).encode("utf-8", "surrogateescape")
        return b"%d\n" % len(head) + head + self.data

    @classmethod
    def from_record(cls, record: bytes) -> Envelope:
        nl = record.index(b"\n")
        n = int(record[:nl])
        text = record[nl + 1 : nl + 1 + n].decode("utf-8", "surrogateescape")
        # raw_decode() is json.loads() without its two white-space matches
        # (7.4 -> 6.0 us on spam-2, measured 2026-12-03); text it does not
        # take whole goes to json.loads(), for the same result or error.
        try:
            head, end = _RECORD_DECODER.raw_decode(text)
        except ValueError:
            end = -1
        if end != len(text):
            head = json.loads(text)
        if head.get("v") != 1:
            raise ValueError(f"unknown spool record version {head.get('v')!r}")
        # "received" is a list of pieces; a string (spool files written before
        # the pieces were kept) is the pieces joined by CRLF+TAB.
        received = head["received"]
        pieces = received.split(_FOLD) if isinstance(received, str) else list(received)
        return cls(
            msg_id=head["id"],
            received_at=head["t"],
            mail_from=head["from"],
            rcpts=head["rcpts"],
            data=record[nl + 1 + n :],
            feed=head["feed"],
            meta=head["meta"],
            received=[p for p in pieces if p] if isinstance(received, str) else pieces,
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
