"""Trap-address redaction for sets shared with other organisations.

Trap addresses are the operator's secret. A set with
``redact_trap_addresses`` gets a copy of each message in which every trap
address is masked: ASCII letters (and 8-bit bytes) become ``x``, digits
become ``1``, everything else stays, and the ``@`` (or ``%40``) between
local part and domain stays. Length and structure are kept, so hash-based
tools still work on the rest of the message.

A trap address is any ``local@domain`` whose domain is a trap domain (any
local part, even an empty one), or that equals one of the given addresses
(case-insensitive). Non-trap addresses are left as they are.

Where it looks, on raw bytes and bounded like :mod:`spamtrap.mime`:

- every header block (the message's and each part's), raw, and inside RFC
  2047 encoded words, which are decoded, masked and re-encoded in place;
- every leaf part's body: as is when it has an identity encoding;
  quoted-printable unit by unit (each literal byte or ``=XX`` escape keeps
  its form, soft line breaks are untouched, so lines keep their lengths);
  base64 decoded and, if anything changed, re-encoded with the part's own
  line length and line ends; a base64 ``message/rfc822`` is redacted as the
  message it holds;
- preambles, epilogues and whatever lies beyond the walk's limits: raw.

Not recognised: quoted local parts (``"a b"@x``), the 8-bit part of a UTF-8
local part (only its ASCII end is masked; the trap domain is masked
anyway), HTML entities (``&#64;``), bare trap domains without ``@``, and
addresses inside compressed attachments.
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import re
from collections.abc import Iterable

from spamtrap.config import FeedConfig, TrapConfig
from spamtrap.message import Envelope
from spamtrap.mime import (
    IDENTITY_ENCODINGS,
    content_type,
    decode_base64,
    header_fields,
    split_message,
)

MAX_PARTS = 1000  # as mime.walk
MAX_DEPTH = 10
# Longest local part looked at left of an "@" (RFC 5321 allows 64).
MAX_LOCAL = 256

# Local-part characters: the usual dot-atom subset. "=", "/", "?" and ":"
# are left out on purpose: they join addresses to URLs and QP escapes
# ("?email=trap@...", "=3Dtrap@..."), and the local part starts after them.
# So are 8-bit bytes: "\xa0trap@..." (a no-break space) and "«trap@...»"
# are common, UTF-8 local parts are not.
_LOCAL_BYTES = bytes(b for b in range(128) if chr(b).isalnum() or b in b"._%+'-")
_LEADING_PUNCTUATION = b"._%+'-"
# A separator ("@", or "%40" as in URLs) and the domain after it.
_AT_DOMAIN = re.compile(rb"(@|%40)([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)")
_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")
_QP_UNIT = re.compile(rb"=([0-9A-Fa-f]{2})|=[ \t]*\r?\n")

# ASCII letters and 8-bit bytes (a UTF-8 domain in the metadata) -> x, digits -> 1.
_MASK = bytes(
    ord("1") if b in b"0123456789" else ord("x") if b >= 128 or chr(b).isalpha() else b
    for b in range(256)
)
_Q_SPACE = bytes.maketrans(b"_", b" ")


def mask(data: bytes) -> bytes:
    """The masked form of ``data``: letters x, digits 1, the rest kept."""
    return data.translate(_MASK)


class TrapSet:
    """Trap domains and trap addresses, normalised for matching."""

    def __init__(
        self, addresses: Iterable[str], domains: Iterable[str], base: TrapSet | None = None
    ) -> None:
        self.domains = frozenset(_norm_domain(d) for d in domains) - {b""}
        full = set()
        for address in addresses:
            local, at, domain = address.strip().strip("<>").rpartition("@")
            if at and local:
                full.add(
                    local.encode("utf-8", "surrogateescape").lower() + b"@" + _norm_domain(domain)
                )
        self.addresses = frozenset(full)
        self.address_domains = frozenset(a.rpartition(b"@")[2] for a in full)
        self._base = base

    def plus(self, addresses: Iterable[str]) -> TrapSet:
        """This set and more addresses (a message's RCPT TO), without copying it."""
        return TrapSet(addresses, (), base=self)

    def __bool__(self) -> bool:
        return bool(self.domains or self.addresses or self._base)

    def is_domain(self, domain: bytes) -> bool:
        return domain in self.domains or (self._base is not None and self._base.is_domain(domain))

    def has_addresses_at(self, domain: bytes) -> bool:
        return domain in self.address_domains or (
            self._base is not None and self._base.has_addresses_at(domain)
        )

    def is_address(self, address: bytes) -> bool:
        return address in self.addresses or (
            self._base is not None and self._base.is_address(address)
        )


def _norm_domain(domain: str) -> bytes:
    return domain.strip().rstrip(".").lower().encode("utf-8", "surrogateescape")


# -- finding and masking -----------------------------------------------------


def _trap_ranges(data: bytes, traps: TrapSet) -> list[tuple[int, int]]:
    """The byte ranges of ``data`` to mask: the local part and the domain of
    every trap address (the separator between them is kept)."""
    # Which domains after an "@" matter, found in C; then only their
    # occurrences are looked at in Python (spam can hold millions of "@").
    found = {domain for _, domain in _AT_DOMAIN.findall(data)}
    domains = sorted(
        (d for d in found if traps.is_domain(d.lower()) or traps.has_addresses_at(d.lower())),
        key=len,
        reverse=True,
    )
    if not domains:
        return []
    pattern = re.compile(
        rb"(@|%40)(" + b"|".join(map(re.escape, domains)) + rb")(?![A-Za-z0-9-]|\.[A-Za-z0-9-])"
    )
    ranges = []
    for m in pattern.finditer(data):
        sep = m.start(1)
        domain = m.group(2).lower()
        window = data[max(0, sep - MAX_LOCAL) : sep]
        local = window[len(window.rstrip(_LOCAL_BYTES)) :]
        if traps.is_domain(domain):
            start = sep - len(local)
        elif local and traps.has_addresses_at(domain):
            local = local.lower()
            # "'trap@x'" or "--trap@x": punctuation before the local part.
            trimmed = local.lstrip(_LEADING_PUNCTUATION)
            if traps.is_address(local + b"@" + domain):
                start = sep - len(local)
            elif trimmed and traps.is_address(trimmed + b"@" + domain):
                start = sep - len(trimmed)
            else:
                continue
        else:
            continue
        if start < sep:
            ranges.append((start, sep))
        ranges.append(m.span(2))
    return ranges


def _apply(data: bytes, ranges: list[tuple[int, int]]) -> bytes:
    if not ranges:
        return data
    out = bytearray(data)
    for start, end in ranges:
        out[start:end] = data[start:end].translate(_MASK)
    return bytes(out)


def _redact_flat(data: bytes, traps: TrapSet) -> bytes:
    """Raw bytes, read as they are."""
    if b"@" not in data and b"%40" not in data:
        return data
    return _apply(data, _trap_ranges(data, traps))


def _redact_qp(raw: bytes, traps: TrapSet, header: bool = False) -> bytes:
    """Quoted-printable (``header``: RFC 2047 Q, where "_" is a space),
    masked unit by unit: a literal stays literal and an ``=XX`` escape stays
    an escape, so every line keeps its length and soft line breaks stay."""
    decoded = bytearray()
    # (decoded offset, raw offset, is an escape) for each run of units
    runs: list[tuple[int, int, bool]] = []
    pos = 0
    for m in _QP_UNIT.finditer(raw):
        if m.start() > pos:
            runs.append((len(decoded), pos, False))
            literal = raw[pos : m.start()]
            decoded += literal.translate(_Q_SPACE) if header else literal
        if m.group(1) is not None:
            runs.append((len(decoded), m.start(), True))
            decoded.append(int(m.group(1), 16))
        pos = m.end()
    if pos < len(raw):
        runs.append((len(decoded), pos, False))
        literal = raw[pos:]
        decoded += literal.translate(_Q_SPACE) if header else literal
    out = bytearray(raw)
    starts = [r[0] for r in runs]
    for start, end in _trap_ranges(bytes(decoded), traps):
        for i in range(start, end):
            run = bisect.bisect_right(starts, i) - 1
            d_start, r_start, escape = runs[run]
            new = _MASK[decoded[i]]
            if escape:
                if new != decoded[i]:
                    out[r_start : r_start + 3] = b"=%02X" % new
            else:
                out[r_start + i - d_start] = new
    # Then the raw text, for readers that do not decode: an address written
    # across a soft break's "=" ("x@trap.example=\r\n..."). Escapes and soft
    # breaks are blanked out of the view, so they are never touched.
    view = _QP_UNIT.sub(lambda m: b" " * len(m.group()), bytes(out))
    return _apply(bytes(out), _trap_ranges(view, traps))


def _redact_base64(raw: bytes, traps: TrapSet, message_depth: int | None = None) -> bytes:
    """A base64 body: decoded, masked (as a message when ``message_depth``
    is given) and, only if that changed anything, re-encoded with the
    original's line length and line ends."""
    decoded = decode_base64(raw)
    if message_depth is None:
        new = _redact_flat(decoded, traps)
    else:
        new = _redact_message(decoded, traps, message_depth)
    if new == decoded:
        # Raw text is no base64 ("@" is not in its alphabet), but spam says
        # base64 over plain text too: read it raw as well.
        return _redact_flat(raw, traps)
    eol = b"\r\n" if b"\r\n" in raw else b"\n"
    first = raw.lstrip(b"\r\n").split(b"\n", 1)[0].rstrip(b"\r")
    width = len(first) if 4 <= len(first) <= 76 and len(first) % 4 == 0 else 76
    encoded = base64.b64encode(new)
    lines = [encoded[i : i + width] for i in range(0, len(encoded), width)]
    return eol.join(lines) + raw[len(raw.rstrip(b"\r\n")) :]


def _redact_header(block: bytes, traps: TrapSet) -> bytes:
    """A header block: raw text, and RFC 2047 encoded words decoded."""
    words = list(_ENCODED_WORD.finditer(block))
    if not words:
        return _redact_flat(block, traps)
    # Raw addresses outside the encoded words; a word's encoded text is no
    # address (and "=3D...@x" must not be read as one).
    view = bytearray(block)
    for w in words:
        view[w.start() : w.end()] = b" " * (w.end() - w.start())
    out = bytearray(_apply(block, _trap_ranges(bytes(view), traps)))
    for w in reversed(words):  # right to left: a B word may change length
        text = w.group(3)
        if w.group(2) in b"Qq":
            new = _redact_qp(text, traps, header=True)
        else:
            decoded = decode_base64(text)
            masked = _redact_flat(decoded, traps)
            new = text if masked == decoded else base64.b64encode(masked)
        if new != text:
            out[w.start(3) : w.end(3)] = new
    return bytes(out)


# -- the MIME structure ------------------------------------------------------


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


def _redact_message(data: bytes, traps: TrapSet, depth: int = 0) -> bytes:
    """A whole message: its parts walked without recursion (a base64
    message/rfc822 is the only nesting, bounded by MAX_DEPTH)."""
    # (start, end, replacement); bytes outside every edit are read raw.
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
        elif ctype == "message/rfc822" and nested and encoding in IDENTITY_ENCODINGS:
            stack.append((body_start, end, level + 1))
        elif encoding == "quoted-printable":
            edits.append((body_start, end, _redact_qp(body, traps)))
        elif encoding == "base64":
            inner = level + 1 if ctype == "message/rfc822" and nested else None
            edits.append((body_start, end, _redact_base64(body, traps, inner)))
        # Anything else (identity bodies, preambles, epilogues) is read raw.
    edits.sort()
    out = []
    pos = 0
    for start, end, replacement in edits:
        out.append(_redact_flat(data[pos:start], traps))
        out.append(replacement)
        pos = end
    out.append(_redact_flat(data[pos:], traps))
    return b"".join(out)


# -- the public API ----------------------------------------------------------


def redact(data: bytes, addresses: Iterable[str], domains: Iterable[str]) -> bytes:
    """``data`` (a message) with every trap address masked.

    ``addresses`` are whole trap addresses; any address at one of
    ``domains`` is a trap address too. Pure: no I/O, never raises on bad
    MIME."""
    traps = TrapSet(addresses, domains)
    return redact_with(data, traps)


def redact_with(data: bytes, traps: TrapSet) -> bytes:
    """As :func:`redact`, with a prepared :class:`TrapSet`."""
    if not traps:
        return data
    return _redact_message(data, traps)


def redact_text(text: str, traps: TrapSet) -> str:
    """A single value (a metadata field, an address), read raw."""
    raw = text.encode("utf-8", "surrogateescape")
    new = _redact_flat(raw, traps)
    return text if new == raw else new.decode("utf-8", "surrogateescape")


class EnvelopeRedactor:
    """Redacts envelopes for one config: built once, called per message
    (in a worker thread; it keeps no state between calls)."""

    def __init__(self, traps: TrapConfig, feeds: Iterable[FeedConfig]) -> None:
        addresses = list(traps.addresses) + [f.address for f in feeds]
        self.traps = TrapSet(addresses, traps.domains)

    def __call__(self, env: Envelope) -> Envelope:
        """A redacted copy of ``env``: its message bytes, its metadata
        values, its trap-hop Received line, its envelope sender (the mbox
        ``From_`` line) and its recipients. The message's own RCPT TO
        addresses count as trap addresses, which covers catch-all and
        pattern traps. Recipient domains (the ``domain`` metadata field)
        are masked whole."""
        traps = self.traps.plus(env.rcpts)
        meta = {}
        for name, values in env.meta.items():
            if name == "domain":
                meta[name] = [
                    mask(v.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")
                    for v in values
                ]
            else:
                meta[name] = [redact_text(v, traps) for v in values]
        return dataclasses.replace(
            env,
            data=redact_with(env.data, traps),
            meta=meta,
            received_line=redact_text(env.received_line, traps),
            mail_from=redact_text(env.mail_from, traps),
            rcpts=[redact_text(r, traps) for r in env.rcpts],
        )


def redact_envelope(env: Envelope, traps: TrapConfig, feeds: Iterable[FeedConfig]) -> Envelope:
    """A redacted copy of ``env``; see :class:`EnvelopeRedactor`, which the
    pipeline should build once per config rather than once per message."""
    return EnvelopeRedactor(traps, feeds)(env)
