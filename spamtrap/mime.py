"""A bounded, lenient MIME walk over raw message bytes.

Spam has broken MIME: missing boundaries, wrong charsets, NUL bytes, 10,000
tiny parts, deep nesting. The stages need to look inside without trusting
any of it, so this walker works on the raw bytes (each part's body is a slice
of the original message, which is what rfc822 extraction must keep exact),
never recurses in Python, and stops at fixed limits on parts and depth.
Nothing here raises on bad input.

Where a header block ends: at the first blank line, or at the first line
that is neither a header field nor a continuation line (QUIRK: RFC 5322 2.1
requires the blank line, but spam and broken MIME generators often omit it;
like Python's email package, the rest is then the body).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

# A header field line (name, optional white space, colon) and continuation
# lines. Field names may hold 8-bit bytes (spam does), but no controls,
# spaces or colons.
_FIELD_LINE = rb"[^\x00-\x20\x7f:]+[ \t]*:[^\n]*(?:\n|\Z)"
_CONTINUATION = rb"[ \t][^\n]*(?:\n|\Z)"
_HEADER_BLOCK = re.compile(rb"(?:" + _FIELD_LINE + rb"(?:" + _CONTINUATION + rb")*)*")
_FIELD = re.compile(rb"(" + _FIELD_LINE + rb")((?:" + _CONTINUATION + rb")*)")
_FIELD_NAME = re.compile(rb"([^\x00-\x20\x7f:]+)[ \t]*:")
_BLANK_LINE = re.compile(rb"\r?\n")
_BLANK_AFTER_LINE = re.compile(rb"\n()\r?\n")
# header_fields: a fold once CRLFs are LFs, and a field line of the
# unfolded block with an LF put in front and every CR made an LF (see there).
_LF_FOLD = re.compile(rb"\n[ \t]+")
_LINE_FIELD = re.compile(
    # LF, white space, the name (no space or TAB in it), white space, colon
    rb"\n[ \t\x0b\x0c]*+([^:\s](?:[^: \t\n]*[^:\s])?)[ \t\x0b\x0c]*:([^\n]*)"
)
# After "--boundary": "--" for the close delimiter, white space, the line end.
_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*+(?=\r?\n|\Z)")
_PARAM = re.compile(rb';\s*([A-Za-z0-9_.*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')

# Header blocks are read at most this far: a "header" of megabytes is a body.
MAX_HEADER_BYTES = 256 * 1024

IDENTITY_ENCODINGS = ("", "7bit", "8bit", "binary")


def _header_end(data: bytes) -> tuple[int, int]:
    """(end of the header block, start of the body)."""
    end = _HEADER_BLOCK.match(data, 0, MAX_HEADER_BYTES).end()  # type: ignore[union-attr]
    # The blank line that separates them belongs to neither.
    blank = _BLANK_LINE.match(data, end)
    if blank is not None:
        return end, blank.end()
    if end == 0:
        return 0, 0  # no header at all: the part is all body
    # A line that is not a header field. QUIRK: spam puts junk lines among
    # its header fields; if a blank line follows, like MUAs, read on to it
    # (so a Content-Type further down is still seen).
    later = _BLANK_AFTER_LINE.search(data, end, MAX_HEADER_BYTES)
    if later is not None:
        return later.start(1), later.end()
    return end, end


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block, body), each exactly as in ``data``."""
    end, body = _header_end(data)
    return data[:end], data[body:]


@dataclass(frozen=True)
class FieldSpan:
    """One header field of the top header block, with its byte offsets.

    ``data[start:end]`` is the whole field: its first line, every
    continuation line and the line end of the last line.
    """

    name: str  # as written, e.g. "Delivered-To"
    start: int
    end: int


def field_spans(data: bytes) -> tuple[list[FieldSpan], int]:
    """The fields of the top header block, and where that block ends.

    For editing a header without touching anything else: removing the
    bytes of some spans keeps every other byte as it was.
    """
    end, _ = _header_end(data)
    spans = []
    pos = 0
    while pos < end:
        m = _FIELD.match(data, pos, end)
        if m is None:  # a junk line among the fields: it stays as it is
            nl = data.find(b"\n", pos, end)
            pos = end if nl < 0 else nl + 1
            continue
        name = _FIELD_NAME.match(m.group(1))
        assert name is not None
        spans.append(FieldSpan(name.group(1).decode("ascii", "replace"), pos, m.end()))
        pos = m.end()
    return spans, end


def header_fields(block: bytes) -> list[tuple[str, str]]:
    """Unfolded ``(lower-case name, value)`` pairs; lines without a colon skipped.

    The fields are: unfold (a line end, CRLF or LF, and the blanks after it
    become one space), split into lines (at CRLF, LF or CR), and keep each
    line with a colon whose name (before it, white space stripped) is not
    empty and holds no space or TAB. The value is the rest, stripped.
    """
    # One regexp finds the fields, not a Python loop over splitlines()
    # (partition, strip and checks per line): CRLF -> LF first lets the
    # fold pattern start with a literal (\r?\n made the regexp engine try
    # every byte), and CR -> LF after unfolding makes every line start
    # after an LF (the only difference, empty lines, holds no field).
    # 33.4 -> 19.0 us per top header of spam-2, measured 2026-12-03.
    text = b"\n" + _LF_FOLD.sub(b" ", block.replace(b"\r\n", b"\n")).replace(b"\r", b"\n")
    return [
        (name.decode("ascii", "replace").lower(), value.strip().decode("utf-8", "replace"))
        for name, value in _LINE_FIELD.findall(text)
    ]


def content_type(fields: list[tuple[str, str]]) -> tuple[str, dict[str, str]]:
    """The type (lower case, default text/plain) and its parameters."""
    value = next((v for n, v in fields if n == "content-type"), "")
    main = value.split(";", 1)[0].strip().lower() or "text/plain"
    if "/" not in main:
        main = "text/plain"
    return main, _params(value)


def _params(value: str) -> dict[str, str]:
    # Linear time whatever the value: an unclosed quote is scanned to the
    # next quote at most once, since that quote closes it.
    params: dict[str, str] = {}
    for key, val in _PARAM.findall(value.encode("utf-8", "replace")):
        v = val.decode("utf-8", "replace")
        if v.startswith('"') and v.endswith('"') and len(v) >= 2:
            v = v[1:-1].replace('\\"', '"')
        elif v.startswith('"'):
            v = v[1:]  # QUIRK: spam writes boundary="abc with no closing quote
        params.setdefault(key.decode("ascii", "replace").lower().rstrip("*"), v)
    return params


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_JUNK = bytes(b for b in range(256) if b not in _B64_ALPHABET and b != ord("="))


# Bytes per C call when decoding: a2b_base64 and translate hold the GIL
# for the whole buffer (about 2 ms per MiB), so big bodies go in slices.
_SLICE = 1 << 20


def decode_base64(raw: bytes) -> bytes:
    """Base64 decoded as far as it goes: junk bytes are skipped, missing
    padding is added, and text after padding ("QQ==QQ==", two encodings
    glued together) is decoded too. Never raises."""
    if len(raw) > _SLICE:
        clean = b"".join(
            raw[i : i + _SLICE].translate(None, _B64_JUNK) for i in range(0, len(raw), _SLICE)
        )
    else:
        clean = raw.translate(None, _B64_JUNK)
    out = []
    for chunk in clean.split(b"="):
        cut = len(chunk) % 4
        if cut == 1:  # one stray character carries no whole byte
            chunk = chunk[:-1]
        elif cut:
            chunk += b"=" * (4 - cut)
        # _SLICE is a multiple of 4: every slice but the last is whole quads.
        for i in range(0, len(chunk), _SLICE):
            out.append(binascii.a2b_base64(chunk[i : i + _SLICE]))
    return b"".join(out)


def decode_quoted_printable(raw: bytes) -> bytes:
    """Quoted-printable decoded; bad escapes are kept as they are."""
    return binascii.a2b_qp(raw)


@dataclass
class Part:
    fields: list[tuple[str, str]]
    content_type: str
    params: dict[str, str]
    depth: int  # MIME nesting: 0 for the message itself
    raw: bytes  # the body bytes exactly as in the message (still transfer-encoded)
    children: int = 0  # multipart or message: how many sub-parts were found
    notes: list[str] = field(default_factory=list)  # what was odd about it
    # How many message/rfc822 parts enclose this one: 0 in the message
    # itself, 1 inside an attached message, and so on.
    message_depth: int = 0

    def header(self, name: str) -> str | None:
        # A plain loop: next() over a generator cost twice as much (it runs
        # several times per part), measured 2026-12-03.
        for n, v in self.fields:
            if n == name:
                return v
        return None

    @property
    def filename(self) -> str | None:
        disposition = self.header("content-disposition") or ""
        name = _params(disposition).get("filename") or self.params.get("name")
        return name or None

    @property
    def encoding(self) -> str:
        return (self.header("content-transfer-encoding") or "").strip().lower()

    def body(self, limit: int = 8 * 1024 * 1024) -> bytes:
        """The decoded body, at most ``limit`` bytes; bad encodings decode
        as far as they can."""
        if self.encoding == "base64":
            # 4 characters make 3 bytes; line ends and junk take more.
            return decode_base64(self.raw[: limit * 2])[:limit]
        if self.encoding == "quoted-printable":
            return decode_quoted_printable(self.raw[: limit * 3])[:limit]
        return self.raw[:limit]

    def enclosed_message(self, limit: int = 8 * 1024 * 1024) -> bytes | None:
        """A message/rfc822 part's message: its body bytes exactly as in the
        message when not transfer-encoded, else decoded. None for other types."""
        if self.content_type != "message/rfc822":
            return None
        if self.encoding in IDENTITY_ENCODINGS:
            return self.raw
        return self.body(limit)


def walk(
    data: bytes,
    *,
    max_parts: int = 1000,
    max_depth: int = 10,
    decode_messages: bool = False,
    max_decoded: int = 8 * 1024 * 1024,
) -> Iterator[Part]:
    """Every part of a message, depth first, the top-level message first.

    A multipart body is split on its boundary; a ``message/rfc822`` part is
    walked into as a message of its own. RFC 2046 5.2.1 allows only identity
    encodings there, but some clients base64-encode forwarded messages:
    with ``decode_messages`` those are decoded (at most ``max_decoded``
    bytes each) and walked into as well. Limits end the walk early: at most
    ``max_parts`` parts, none deeper than ``max_depth``.
    """
    # (bytes, MIME depth, message depth); an explicit stack, no recursion.
    stack: list[tuple[bytes, int, int]] = [(data, 0, 0)]
    seen = 0
    while stack and seen < max_parts:
        chunk, depth, msg_depth = stack.pop()
        head, body = split_message(chunk)
        fields = header_fields(head)
        ctype, params = content_type(fields)
        part = Part(fields, ctype, params, depth, body, message_depth=msg_depth)
        seen += 1
        children: list[bytes] = []
        child_msg_depth = msg_depth
        if depth < max_depth:
            if ctype.startswith("multipart/"):
                boundary = params.get("boundary", "")
                if boundary:
                    room = max_parts - seen - len(stack)
                    children = split_multipart(
                        body, boundary.encode("utf-8", "replace"), max(room, 0)
                    )
                else:
                    part.notes.append("multipart without boundary")
            elif ctype == "message/rfc822":
                child_msg_depth = msg_depth + 1
                if part.encoding in IDENTITY_ENCODINGS:
                    children = [body]
                elif decode_messages:
                    children = [part.body(max_decoded)]
                    part.notes.append("encoded message/rfc822")
        elif ctype.startswith(("multipart/", "message/")):
            part.notes.append("nesting limit reached")
        part.children = len(children)
        yield part
        for child in reversed(children):
            stack.append((child, depth + 1, child_msg_depth))


def split_multipart(body: bytes, boundary: bytes, limit: int | None = None) -> list[bytes]:
    """The sub-parts of a multipart body (the preamble and epilogue dropped).

    Each part ends where the line end before the next delimiter starts: that
    line end belongs to the delimiter (RFC 2046 5.1.1). Lenient: a missing
    close delimiter ends the last part at the end of the body; delimiter
    lines may have trailing white space. At most ``limit`` parts.

    Delimiters are found with ``bytes.find`` on "\\n--boundary", not with a
    regexp over the whole body: a regexp scan of a 4 MiB body holds the GIL
    for some 100 ms, a find for about 1 ms, and only line starts are tried.
    """
    delim = b"--" + boundary
    parts: list[bytes] = []
    start: int | None = None
    n = len(body)
    # A delimiter line: "--boundary" at the start of the body or after "\n".
    at = 0 if body.startswith(delim) else body.find(b"\n" + delim)
    while at >= 0:
        if body[at] == 0x0A:  # "\n--boundary": the line end before it belongs to it
            line_end = at - 1 if at > 0 and body[at - 1] == 0x0D else at
            tail_at = at + 1 + len(delim)
        else:
            line_end = at
            tail_at = at + len(delim)
        tail = _DELIMITER_TAIL.match(body, tail_at)
        if tail is None:  # "--boundaryX" or "--boundary junk": not a delimiter
            at = body.find(b"\n" + delim, at + 1)
            continue
        if limit is not None and len(parts) >= limit:
            return parts
        if start is not None:
            parts.append(body[start:line_end])
        if tail.group(1):  # the close delimiter
            return parts
        nl = body.find(b"\n", tail.end())
        start = n if nl < 0 else nl + 1
        at = body.find(b"\n" + delim, tail.end())
    if start is not None and start < n and (limit is None or len(parts) < limit):
        parts.append(body[start:])
    return parts
