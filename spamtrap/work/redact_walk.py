"""Trap-address redaction over a message's MIME structure: header
blocks, parameters, transfer encodings and the walk over the parts (see
spamtrap.work.redact)."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

from spamtrap.mime import (
    IDENTITY_ENCODINGS,
    content_type,
    decode_base64,
    field_spans,
    header_fields,
    split_message,
)
from spamtrap.work.redact_traps import TrapSet, apply_ranges, redact_flat, trap_ranges
from spamtrap.work.redact_views import (
    B_WORD,
    PERCENT,
    QUOTED_PAIR,
    View,
    decode_percent,
    decode_qp,
    redact_in_text,
    redact_through,
)
from spamtrap.work.redact_wide import redact_wide

MAX_PARTS = 1000  # as mime.walk
MAX_DEPTH = 10

_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")
# A soft line break may carry white space (RFC 2045 6.7) or a stray CR
# before its LF (QUIRK: Python's binascii.a2b_qp reads "=\r\r\n" as one).
_QP_UNIT = re.compile(rb"=([0-9A-Fa-f]{2})|=[ \t]*\r*\n")
_Q_UNIT = re.compile(rb"=([0-9A-Fa-f]{2})")
# An RFC 2045/2231 parameter: its name and its value (a quoted string,
# which may run unclosed to the end, or a token). Each alternative stops at
# a byte the next one cannot start with, and a failed attempt never reads
# past the next ";", so finditer stays linear.
_PARAM = re.compile(
    rb';[ \t\r\n]*([A-Za-z0-9_.*-]+)[ \t\r\n]*=[ \t\r\n]*("(?:[^"\\]|\\.)*"?|[^;\s"]*)'
)
_PARAM_NAME = re.compile(rb"([^*]*)(?:\*([0-9]{1,4}))?(\*)?")
# Inside a quoted parameter value: a quoted pair, or a fold (CRLF dropped).
_QUOTED_UNIT = re.compile(rb"\\([\x00-\xff])|\r?\n")
_WHITE_SPACE = b" \t\r\n"

_Q_SPACE = bytes.maketrans(b"_", b" ")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="

# Types read as text (HTML references, percent escapes, UTF-16); every
# other body is binary and only its addresses as written are masked.
_TEXT_TYPES = (
    "application/xhtml+xml",
    "application/xml",
    "application/json",
    "application/javascript",
    "application/ecmascript",
    "application/x-javascript",
    "application/rtf",
    "application/ics",
)


def _is_text(ctype: str) -> bool:
    return (
        ctype.startswith(("text/", "message/", "multipart/"))
        or ctype in _TEXT_TYPES
        or ctype.endswith(("+xml", "+json"))
    )


def _body_redactor(ctype: str, params: dict[str, str], traps: TrapSet) -> Callable[[bytes], bytes]:
    """How a decoded body of this type is read."""
    if not _is_text(ctype):
        return lambda data: redact_flat(data, traps)
    charset = params.get("charset", "").strip().strip("'\"")

    def text(data: bytes) -> bytes:
        return redact_wide(data, charset, traps, redact_in_text(data, traps))

    return text


def _redact_qp(raw: bytes, traps: TrapSet, redact_body: Callable[[bytes], bytes]) -> bytes:
    """Quoted-printable, masked unit by unit: a literal stays literal and
    an ``=XX`` escape stays an escape, so every line keeps its length and
    soft line breaks stay."""
    view = View()
    view.scan(raw, 0, len(raw), _QP_UNIT, decode_qp)
    old = view.text()
    new = redact_body(old)
    out = bytearray(raw)
    if new != old:
        view.write_back(out, old, new)
    # Then the raw text, for readers that do not decode: an address written
    # across a soft break's "=" ("x@trap.example=\r\n..."). Escapes and soft
    # breaks are blanked out of the read, so they are never touched.
    if b"@" in raw or b"%40" in raw:
        blanked = _QP_UNIT.sub(lambda m: b" " * len(m.group()), raw)
        return apply_ranges(bytes(out), trap_ranges(blanked, traps))
    return bytes(out)


def _redact_base64(
    raw: bytes,
    traps: TrapSet,
    redact_body: Callable[[bytes], bytes] | None,
    message_depth: int = 0,
) -> bytes:
    """A base64 body: decoded, masked (as a message when ``redact_body``
    is None) and, only if that changed anything, re-encoded into the
    original's lines."""
    decoded = decode_base64(raw)
    if redact_body is None:
        new = redact_message(decoded, traps, message_depth)
    else:
        new = redact_body(decoded)
    if new == decoded:
        # Raw text is no base64 ("@" is not in its alphabet), but spam says
        # base64 over plain text too: read it raw as well.
        return redact_flat(raw, traps)
    encoded = base64.b64encode(new)
    lines = raw.split(b"\n")
    if sum(len(line) for line in lines) - raw.count(b"\r") == len(encoded) and all(
        not line.rstrip(b"\r").translate(None, _B64_ALPHABET) for line in lines
    ):
        # Clean base64: the new text fills the old lines exactly.
        out = []
        pos = 0
        for line in lines:
            body = line.rstrip(b"\r")
            out.append(encoded[pos : pos + len(body)] + line[len(body) :])
            pos += len(body)
        return b"\n".join(out)
    eol = b"\r\n" if b"\r\n" in raw else b"\n"
    first = raw.lstrip(b"\r\n").split(b"\n", 1)[0].rstrip(b"\r")
    width = len(first) if 4 <= len(first) <= 76 and len(first) % 4 == 0 else 76
    wrapped = [encoded[i : i + width] for i in range(0, len(encoded), width)]
    return eol.join(wrapped) + raw[len(raw.rstrip(b"\r\n")) :]


def _header_view(block: bytes) -> View:
    """A header block as decoders read it: raw text, RFC 2047 encoded words
    decoded, and the white space between two adjacent encoded words dropped
    (RFC 2047 6.2), so text split across words is read joined."""
    view = View()
    pos = 0
    previous_word_end = -1
    for w in _ENCODED_WORD.finditer(block):
        gap = block[pos : w.start()]
        if not (pos == previous_word_end and not gap.strip(_WHITE_SPACE)):
            view.add(pos, w.start(), gap)
        start, end = w.span(3)
        if w.group(2) in (b"Q", b"q"):
            view.scan(block, start, end, _Q_UNIT, decode_qp, lambda s: s.translate(_Q_SPACE))
        else:
            view.add(start, end, decode_base64(w.group(3)), B_WORD)
        pos = previous_word_end = w.end()
    view.add(pos, len(block), block[pos:])
    return view


def _redact_header(block: bytes, traps: TrapSet) -> bytes:
    """A header block: raw text and encoded words, then parameters."""
    # The raw text always, and the decoded view on top: the view drops
    # every encoded word's syntax and joins its text to what stands next to
    # it, so an address right before or after a word ("x@trap.example=?a?Q?
    # b?=", "...=?a?Q?.b?=") reads there with a longer domain (trap.exampleb,
    # trap.example.b), not a trap one, while the raw text still shows it.
    out = bytearray(redact_in_text(block, traps))
    if b"=?" in block:
        redact_through(out, _header_view(block), traps, -1)
    if b"*" in block or b"\\" in block:
        _redact_parameters(block, traps, out)
    return bytes(out)


def _redact_parameters(block: bytes, traps: TrapSet, out: bytearray) -> None:
    """RFC 2231 parameters of the Content-* fields, read as decoders read
    them: ``name*0*``, ``name*1``... joined in order, extended sections
    percent-decoded (after the ``charset'language'`` prefix), quoted
    sections with their quoted pairs undone. Masks go into ``out``."""
    spans, _ = field_spans(block)
    for field in spans:
        if not field.name.lower().startswith("content-"):
            continue
        # name -> [(section, is extended, value start, value end)]
        groups: dict[bytes, list[tuple[int, bool, int, int]]] = {}
        for m in _PARAM.finditer(block, field.start, field.end):
            name = _PARAM_NAME.fullmatch(m.group(1).lower())
            if name is None:
                continue
            base, section, star = name.groups()
            key = base if section is not None else b"%s\x00%d" % (base, m.start())
            groups.setdefault(key, []).append(
                (int(section or 0), star is not None, m.start(2), m.end(2))
            )
        for pieces in groups.values():
            view = View()
            for number, extended, start, end in sorted(pieces):
                if block[start : start + 1] == b'"':
                    start += 1
                    end -= end > start and block[end - 1 : end] == b'"'
                    view.scan(block, start, end, _QUOTED_UNIT, _decode_quoted)
                    continue
                if extended and number == 0:
                    # charset'language' comes first: not part of the value.
                    quote = block.find(b"'", start, end)
                    second = block.find(b"'", quote + 1, end) if quote >= 0 else -1
                    if second >= 0:
                        start = second + 1
                if extended:
                    view.scan(block, start, end, PERCENT, decode_percent)
                else:
                    view.add(start, end, block[start:end])
            old = view.text()
            new = redact_in_text(old, traps)
            if new != old:
                view.write_back(out, old, new)


def _decode_quoted(m: re.Match[bytes]) -> tuple[bytes, int]:
    if m.group(1) is None:  # a fold: unfolding drops the line end
        return b"", QUOTED_PAIR
    return m.group(1), QUOTED_PAIR


def _multipart_spans(body: bytes, boundary: bytes, limit: int) -> list[tuple[int, int]]:
    """Where mime.split_multipart's parts are in ``body``: same rules
    (lenient delimiters, a missing close delimiter), as offsets."""
    delim = re.compile(rb"(?:^|\r?\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r?\n|$)")
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for m in delim.finditer(body):
        if len(spans) >= limit:
            return spans
        if start is not None:
            spans.append((start, m.start()))
        if m.group(1):
            return spans
        nl = body.find(b"\n", m.end())
        start = len(body) if nl < 0 else nl + 1
    if start is not None and start < len(body) and len(spans) < limit:
        spans.append((start, len(body)))
    return spans


def redact_message(data: bytes, traps: TrapSet, depth: int = 0) -> bytes:
    """A whole message: its parts walked without recursion (a base64
    message/rfc822 is the only nesting, bounded by MAX_DEPTH)."""
    # (start, end, replacement); bytes outside every edit are read as text.
    edits: list[tuple[int, int, bytes]] = []
    stack = [(0, len(data), depth)]
    parts = 0
    while stack and parts < MAX_PARTS:
        start, end, level = stack.pop()
        parts += 1
        chunk = data[start:end]
        head, body = split_message(chunk)
        body_start = end - len(body)
        if head:
            edits.append((start, start + len(head), _redact_header(head, traps)))
        fields = header_fields(head)
        ctype, params = content_type(fields)
        encoding = next((v for n, v in fields if n == "content-transfer-encoding"), "")
        encoding = encoding.strip().lower()
        nested = level < MAX_DEPTH
        if ctype.startswith("multipart/") and nested:
            boundary = params.get("boundary", "").encode("utf-8", "replace")
            if boundary:
                room = max(MAX_PARTS - parts - len(stack), 0)
                spans = _multipart_spans(body, boundary, room)
                for s, e in reversed(spans):
                    stack.append((body_start + s, body_start + e, level + 1))
            # The preamble, delimiters and epilogue are read as text.
        elif ctype == "message/rfc822" and nested and encoding in IDENTITY_ENCODINGS:
            stack.append((body_start, end, level + 1))
        elif encoding == "base64" and ctype == "message/rfc822" and nested:
            edits.append((body_start, end, _redact_base64(body, traps, None, level + 1)))
        else:
            redact_body = _body_redactor(ctype, params, traps)
            if encoding == "quoted-printable":
                edits.append((body_start, end, _redact_qp(body, traps, redact_body)))
            elif encoding == "base64":
                edits.append((body_start, end, _redact_base64(body, traps, redact_body)))
            elif body:
                edits.append((body_start, end, redact_body(body)))
    edits.sort()
    out = []
    pos = 0
    for start, end, replacement in edits:
        out.append(redact_in_text(data[pos:start], traps))
        out.append(replacement)
        pos = end
    out.append(redact_in_text(data[pos:], traps))
    return b"".join(out)
