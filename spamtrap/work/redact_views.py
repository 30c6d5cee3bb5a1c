"""Trap-address redaction, the views: decoded text that remembers which
raw unit each byte came from, so masked bytes go back in their own encoding
(QP, percent escapes, HTML references, quoted pairs, encoded words), and
text read through those encodings (see spamtrap.work.redact)."""

from __future__ import annotations

import base64
import bisect
import html
import html.entities
import re
from collections.abc import Callable

from spamtrap.work.redact_traps import LOCAL_BYTES, TrapSet, changed_spans, mask, redact_flat

# How many encodings deep a text is undone: "&#37;40" (an entity of "%")
# is two, which is as far as any reader goes.
MAX_LAYERS = 2

PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
# HTML character references as HTML5 reads them: numeric with any number
# of digits (leading zeros too) and an optional ";", named ones with or
# without ";" (html.unescape knows which legacy names may omit it).
_ENTITY = re.compile(rb"&(?:#[xX]([0-9A-Fa-f]+);?|#([0-9]+);?|[A-Za-z][A-Za-z0-9]{0,40};?)")
# Bytes an address is made of. A reference ending in ";" that decodes to
# anything else ("&nbsp;", "&#8217;") ends an address just as its raw text
# does ("&" and ";" are in none), so it is read as written, for free.
_ADDRESS_BYTES = frozenset(LOCAL_BYTES + b"@")
# Named references that decode to one of them: the rest of HTML's 2,000
# names only matter where a trap domain is a U-label.
_ADDRESS_NAMES = sorted(
    (
        name
        for name, value in html.entities.html5.items()
        if name.endswith(";")
        and len(value) == 1
        and value.isascii()
        and ord(value) in _ADDRESS_BYTES
    ),
    key=len,
    reverse=True,
)
_ENTITY_ASCII = re.compile(
    rb"&(?:#[xX]([0-9A-Fa-f]+);?|#([0-9]+);?|(?:"
    + b"|".join(re.escape(n.encode()) for n in _ADDRESS_NAMES)
    + rb"))"
)
_ENTITY_HINT = re.compile(rb"&[#A-Za-z]")
# References to "@" and "%" (which may start a "%40"), and escapes of
# "@", "%" and "&" (which may start a reference).
_ENTITY_SEPARATOR = re.compile(
    rb"&#[xX]0*(?:40|25)(?![0-9A-Fa-f])|&#0*(?:64|37)(?![0-9])|&(?:commat|percnt)"
)
_PERCENT_SEPARATOR = re.compile(rb"%(?:40|25|26)")
# An escape of an address byte (or of "&", which may start a reference).
# Without one, the decoded text holds no address that the raw text does
# not ("%20" decodes to a byte that ends an address; "%", "2", "0" do not).
_PERCENT_ADDRESS = re.compile(rb"%(?:3[0-9]|[46][0-9A-Fa-f]|[57][0-9Aa]|2[5-7BbDdEe])")

LITERAL, QP_ESCAPE, PERCENT_ESCAPE, ENTITY_REF, B_WORD, QUOTED_PAIR = range(6)


class View:
    """Decoded bytes built from units of a raw text, and the way back.

    A literal unit decodes byte for byte (``_`` to a space in RFC 2047 Q
    text, which masking never changes); any other unit is one escape, an
    encoded word or a reference, rewritten whole at its raw length when any
    of its decoded bytes changes. Raw bytes that are in no unit (soft line
    breaks, the gap between adjacent encoded words) decode to nothing."""

    __slots__ = ("chunks", "size", "starts", "units")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.starts: list[int] = []
        self.units: list[tuple[int, int, int]] = []  # raw start, raw end, kind

    def add(self, raw_start: int, raw_end: int, decoded: bytes, kind: int = LITERAL) -> None:
        if decoded:
            self.starts.append(self.size)
            self.units.append((raw_start, raw_end, kind))
            self.chunks.append(decoded)
            self.size += len(decoded)

    def scan(
        self,
        raw: bytes,
        start: int,
        end: int,
        pattern: re.Pattern[bytes],
        decode: Callable[[re.Match[bytes]], tuple[bytes, int]],
        literal: Callable[[bytes], bytes] = bytes,
    ) -> None:
        """Adds ``raw[start:end]``: ``pattern``'s matches as units that
        ``decode`` gives (decoded bytes, kind), literal runs between them."""
        pos = start
        for m in pattern.finditer(raw, start, end):
            decoded, kind = decode(m)
            if kind == LITERAL:  # reads as written: part of the literal run
                continue
            if m.start() > pos:
                self.add(pos, m.start(), literal(raw[pos : m.start()]))
            self.add(m.start(), m.end(), decoded, kind)
            pos = m.end()
        if pos < end:
            self.add(pos, end, literal(raw[pos:end]))

    def text(self) -> bytes:
        return b"".join(self.chunks)

    def write_back(self, out: bytearray, old: bytes, new: bytes) -> None:
        """Puts the changes from ``old`` (this view's text) to ``new`` (as
        long) into ``out``, the raw text, keeping its length."""
        touched: list[int] = []
        for s, e in changed_spans(old, new):
            u = bisect.bisect_right(self.starts, s) - 1
            while u < len(self.units) and self.starts[u] < e:
                start = self.starts[u]
                raw_start, raw_end, kind = self.units[u]
                if kind == LITERAL:
                    a, b = max(s, start), min(e, start + len(self.chunks[u]))
                    out[raw_start + a - start : raw_start + b - start] = new[a:b]
                elif not touched or touched[-1] != u:
                    touched.append(u)
                u += 1
        for u in touched:
            start = self.starts[u]
            raw_start, raw_end, kind = self.units[u]
            decoded = new[start : start + len(self.chunks[u])]
            raw = bytes(out[raw_start:raw_end])
            replacement = _reencode(kind, raw, decoded)
            if len(replacement) != len(raw):  # never expected; the length wins
                replacement = mask(raw)
            out[raw_start:raw_end] = replacement


def _reencode(kind: int, raw: bytes, decoded: bytes) -> bytes:
    """A unit's new raw text for its new decoded bytes, as long as ``raw``."""
    if kind == QP_ESCAPE:
        return b"=%02X" % decoded[0]
    if kind == PERCENT_ESCAPE:
        return b"%%%02X" % decoded[0]
    if kind == QUOTED_PAIR:
        return b"\\" + decoded[:1]
    if kind == B_WORD:
        encoded = base64.b64encode(decoded)
        # A word without its padding, or with junk in it: the same decoded
        # bytes in the same room (decoders ignore missing or extra "=").
        encoded = encoded[: len(raw)] if len(encoded) > len(raw) else encoded
        return encoded + b"=" * (len(raw) - len(encoded))
    if kind == ENTITY_REF:
        return _entity_for(raw, decoded)
    return mask(raw)


def _entity_for(raw: bytes, decoded: bytes) -> bytes:
    """A character reference of the masked character, as long as ``raw``:
    same notation, same digit count (leading zeros pad), same ";". A
    masked letter is "x" (or "X" where three decimal digits do not fit)."""
    text = decoded.decode("utf-8", "replace")
    target = text if len(text) == 1 and text.isascii() else "x"
    choices = [target, "X"] if target == "x" else [target]
    semicolon = raw.endswith(b";")
    if raw.startswith(b"&#"):
        hexadecimal = raw[2:3] in (b"x", b"X")
        prefix = raw[:3] if hexadecimal else raw[:2]
        width = len(raw) - len(prefix) - semicolon
        upper = hexadecimal and any(c in b"ABCDEF" for c in raw[3:])
        for char in choices:
            digits = format(ord(char), ("X" if upper else "x") if hexadecimal else "d")
            if len(digits) <= width:
                return prefix + digits.rjust(width, "0").encode() + raw[len(raw) - semicolon :]
    elif semicolon and len(raw) >= 5:  # "&auml;" -> "&#120;"
        for char in choices:
            digits = str(ord(char))
            if len(digits) <= len(raw) - 3:
                return b"&#" + digits.rjust(len(raw) - 3, "0").encode() + b";"
    return mask(raw)


def redact_through(out: bytearray, view: View, traps: TrapSet, layer: int) -> None:
    """Masks in ``out`` the trap addresses of ``view``.

    Every view is built from the original text, never from the output of
    another: a domain masked as written ("&#97;lice@trap.example" ->
    "...@xxxx.xxxxxxx") would no longer mark the address that the decoded
    view sees whole. Masks only ever replace bytes with masked ones, so
    writing each view's changes into one output keeps them all."""
    old = view.text()
    new = redact_in_text(old, traps, layer + 1)
    if new != old:
        view.write_back(out, old, new)


def _decode_entity(m: re.Match[bytes], cache: dict[bytes, bytes], wide: bool) -> tuple[bytes, int]:
    token = m.group()
    decoded = cache.get(token)
    if decoded is None:
        digits = m.group(1) or m.group(2)
        if digits is not None:
            # Leading zeros are HTML's business, not int()'s digit limit.
            value = digits.lstrip(b"0")[:9] or b"0"
            ref = b"&#x" + value if m.group(1) else b"&#" + value
            decoded = html.unescape(ref.decode() + ";").encode("utf-8", "surrogatepass")
        else:
            decoded = html.unescape(token.decode("ascii")).encode("utf-8", "surrogatepass")
        cache[token] = decoded
    # "&foo" that HTML does not know stays text, and so does a reference
    # of a character no address holds ("wide": U-label trap domains).
    if decoded == token or (
        token.endswith(b";")
        and not (len(decoded) == 1 and decoded[0] in _ADDRESS_BYTES)
        and not (wide and not decoded.isascii())
    ):
        return decoded, LITERAL
    return decoded, ENTITY_REF


def _entity_view(data: bytes, traps: TrapSet) -> View:
    view = View()
    cache: dict[bytes, bytes] = {}
    wide = bool(traps.unicode_domains)
    pattern = _ENTITY if wide else _ENTITY_ASCII
    view.scan(data, 0, len(data), pattern, lambda m: _decode_entity(m, cache, wide))
    return view


def _percent_view(data: bytes) -> View:
    view = View()
    view.scan(data, 0, len(data), PERCENT, decode_percent)
    return view


def decode_percent(m: re.Match[bytes]) -> tuple[bytes, int]:
    return bytes([int(m.group(1), 16)]), PERCENT_ESCAPE


def decode_qp(m: re.Match[bytes]) -> tuple[bytes, int]:
    if m.group(1) is None:  # a soft line break: no text
        return b"", QP_ESCAPE
    return bytes([int(m.group(1), 16)]), QP_ESCAPE


def redact_in_text(data: bytes, traps: TrapSet, layer: int = 0) -> bytes:
    """Text: as written, then through HTML references and percent escapes
    (and those inside each other, up to MAX_LAYERS). Same length."""
    flat = redact_flat(data, traps)
    if layer >= MAX_LAYERS:
        return flat
    out = bytearray(flat)
    # A layer can only add an address if its decoded text can hold a
    # separator: "@" or "%40" as written, or escaped in that layer.
    at = b"@" in data
    if (
        b"&" in data
        and _ENTITY_HINT.search(data)
        and (at or b"%" in data or _ENTITY_SEPARATOR.search(data))
    ):
        redact_through(out, _entity_view(data, traps), traps, layer)
    if (
        b"%" in data
        and (at or b"&" in data or _PERCENT_SEPARATOR.search(data))
        and _PERCENT_ADDRESS.search(data)
    ):
        redact_through(out, _percent_view(data), traps, layer)
    return bytes(out)
