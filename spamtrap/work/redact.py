"""Trap-address redaction for sets shared with other organisations.

Trap addresses are the operator's secret. A set with
``redact_trap_addresses`` gets a copy of each message in which every trap
address is masked: ASCII letters (and 8-bit bytes) become ``x``, digits
become ``1``, everything else stays, and the ``@`` (or ``%40``) between
local part and domain stays. Length and structure are kept, so hash-based
tools still work on the rest of the message.

A trap address is any ``local@domain`` whose domain is a trap domain (any
local part, even an empty one), or that equals one of the given addresses
(case-insensitive). Internationalised trap domains match in both forms:
configured as ``bücher.example`` or as ``xn--bcher-kva.example``, either
form in a message is a trap domain. Non-trap addresses are left as they are.

Where it looks, on raw bytes and bounded like :mod:`spamtrap.mime`. Every
encoding is undone into a *view* (decoded bytes that remember which raw
unit each byte came from), the view is masked, and each changed unit is
written back in its own encoding at its own length:

- every header block (the message's and each part's): raw text and RFC
  2047 encoded words decoded, adjacent words joined as decoders join them
  (an address may start in one word and end in the next); RFC 2231
  parameters (``filename*0*=utf-8''...%40...; filename*1*=...``)
  percent-decoded and joined across continuations; quoted parameters with
  their quoted pairs undone;
- every leaf part's body, after its transfer encoding: quoted-printable
  unit by unit (a literal stays literal, an ``=XX`` escape stays an escape,
  soft line breaks stay, so lines keep their lengths); base64 decoded and,
  if anything changed, re-encoded into the same line lengths; a base64
  ``message/rfc822`` is redacted as the message it holds;
- in text (text parts, headers, preambles): HTML character references
  (``&#64;``, ``&#x40;``, ``&commat;``, ``&period;``, with leading zeros or
  without ``;``, as HTML reads them) and URL percent escapes, each
  re-written as a reference or escape of the masked character; UTF-16 and
  UTF-32 text parts (charset from Content-Type, or a byte-order mark),
  both byte orders when the charset does not say;
- binary parts (not text): only addresses written as they are;
- preambles, epilogues and whatever lies beyond the walk's limits: as text.

Not recognised: quoted local parts (``"a b"@x``), the 8-bit part of a UTF-8
local part (only its ASCII end is masked; the trap domain is masked
anyway), bare trap domains without ``@``, U-labels in charsets other than
UTF-8, UTF-16 and UTF-32, encoded words in UTF-16, and addresses inside
compressed attachments.

Every pattern here runs in linear time: no nested quantifiers over
overlapping classes, and every scan that can fail resumes after what it
read.
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import html
import html.entities
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable

from spamtrap.config import FeedConfig, TrapConfig
from spamtrap.message import Envelope
from spamtrap.mime import (
    IDENTITY_ENCODINGS,
    content_type,
    decode_base64,
    field_spans,
    header_fields,
    split_message,
)

try:  # IDNA 2008 (UTS 46), as browsers and MUAs map names; Twisted brings it.
    import idna as _idna
except ImportError:  # pragma: no cover - the built-in IDNA 2003 codec still works
    _idna = None  # type: ignore[assignment]

MAX_PARTS = 1000  # as mime.walk
MAX_DEPTH = 10
# Longest local part looked at left of an "@" (RFC 5321 allows 64).
MAX_LOCAL = 256
# How many encodings deep a text is undone: "&#37;40" (an entity of "%")
# is two, which is as far as any reader goes.
MAX_LAYERS = 2

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
# A soft line break may carry white space (RFC 2045 6.7) or a stray CR
# before its LF (QUIRK: Python's binascii.a2b_qp reads "=\r\r\n" as one).
_QP_UNIT = re.compile(rb"=([0-9A-Fa-f]{2})|=[ \t]*\r*\n")
_Q_UNIT = re.compile(rb"=([0-9A-Fa-f]{2})")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
# HTML character references as HTML5 reads them: numeric with any number
# of digits (leading zeros too) and an optional ";", named ones with or
# without ";" (html.unescape knows which legacy names may omit it).
_ENTITY = re.compile(rb"&(?:#[xX]([0-9A-Fa-f]+);?|#([0-9]+);?|[A-Za-z][A-Za-z0-9]{0,40};?)")
# Bytes an address is made of. A reference ending in ";" that decodes to
# anything else ("&nbsp;", "&#8217;") ends an address just as its raw text
# does ("&" and ";" are in none), so it is read as written, for free.
_ADDRESS_BYTES = frozenset(_LOCAL_BYTES + b"@")
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

# ASCII letters and 8-bit bytes (a UTF-8 domain in the metadata) -> x, digits -> 1.
_MASK = bytes(
    ord("1") if b in b"0123456789" else ord("x") if b >= 128 or chr(b).isalpha() else b
    for b in range(256)
)
_Q_SPACE = bytes.maketrans(b"_", b" ")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
# UTF-8 continuation bytes: deleting them from a slice leaves one byte per character.
_UTF8_CONTINUATION = bytes(range(0x80, 0xC0))

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


def mask(data: bytes) -> bytes:
    """The masked form of ``data``: letters x, digits 1, the rest kept."""
    return data.translate(_MASK)


class TrapSet:
    """Trap domains and trap addresses, normalised for matching."""

    def __init__(
        self, addresses: Iterable[str], domains: Iterable[str], base: TrapSet | None = None
    ) -> None:
        self.domains = frozenset(f for d in domains for f in _domain_forms(d))
        full: set[bytes] = set()
        for address in addresses:
            local, at, domain = address.strip().strip("<>").rpartition("@")
            if at and local:
                low = local.encode("utf-8", "surrogateescape").lower()
                full.update(low + b"@" + form for form in _domain_forms(domain))
        self.addresses = frozenset(full)
        self.address_domains = frozenset(a.rpartition(b"@")[2] for a in full)
        self._base = base
        # Non-ASCII domains (U-labels), which _AT_DOMAIN does not read.
        wide = {d for d in self.domains | self.address_domains if not d.isascii()}
        if base is not None:
            wide |= base.unicode_domains
        self.unicode_domains: frozenset[bytes] = frozenset(wide)
        self._unicode_pattern: re.Pattern[bytes] | None = None

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

    def unicode_pattern(self) -> re.Pattern[bytes] | None:
        """The U-label trap domains in UTF-8, any case, longest first."""
        if self._unicode_pattern is None and self.unicode_domains:
            alternatives = []
            for domain in sorted(self.unicode_domains, key=len, reverse=True):
                text = domain.decode("utf-8", "surrogateescape")
                alternatives.append(b"".join(_any_case(c) for c in text))
            self._unicode_pattern = re.compile(b"|".join(alternatives), re.IGNORECASE)
        return self._unicode_pattern


def _any_case(char: str) -> bytes:
    if char.isascii():
        return re.escape(char.encode())
    forms = {char, char.lower(), char.upper()}
    forms = {f for f in forms if len(f) == 1}
    encoded = sorted(re.escape(f.encode("utf-8", "surrogateescape")) for f in forms)
    return b"(?:" + b"|".join(encoded) + b")"


def _fold(domain: bytes) -> bytes:
    """A domain as written, in the form TrapSet keeps (lower case, NFC)."""
    if domain.isascii():
        return domain.lower()
    text = unicodedata.normalize("NFC", domain.decode("utf-8", "surrogateescape").lower())
    return text.encode("utf-8", "surrogateescape")


def _domain_forms(domain: str) -> set[bytes]:
    """A configured domain, lower case, in every form a message may write
    it: as given, and its A-label or U-label twin (IDNA 2008 and 2003 differ
    on a few letters such as "ß", so both are kept)."""
    name = unicodedata.normalize("NFC", domain.strip().rstrip(".").lower())
    if not name:
        return set()
    forms = {name}
    if name.isascii():
        if "xn--" in name:
            forms.update(_try(lambda: name.encode("ascii").decode("idna")))
            if _idna is not None:
                forms.update(_try(lambda: _idna.decode(name)))
    else:
        forms.update(_try(lambda: name.encode("idna").decode("ascii")))
        if _idna is not None:
            forms.update(_try(lambda: _idna.encode(name, uts46=True).decode("ascii")))
    return {
        unicodedata.normalize("NFC", f.lower()).encode("utf-8", "surrogateescape")
        for f in forms
        if f
    }


def _try(convert: Callable[[], str]) -> list[str]:
    try:
        return [convert()]
    except (UnicodeError, ValueError):  # not a valid IDN: it matches as written only
        return []


# -- finding and masking -----------------------------------------------------


def _trap_ranges(data: bytes, traps: TrapSet) -> list[tuple[int, int]]:
    """The byte ranges of ``data`` to mask: the local part and the domain of
    every trap address (the separator between them is kept)."""
    # Which domains after an "@" matter, found in C; then only their
    # occurrences are looked at in Python (spam can hold millions of "@").
    found = {domain.lower() for _, domain in _AT_DOMAIN.findall(data)}
    # Folded, so that spam writing a domain in a thousand cases
    # ("tRaP.example") does not make a thousand alternatives to try at
    # every "@": the pattern ignores case instead.
    candidates = {d for d in found if traps.is_domain(d) or traps.has_addresses_at(d)}
    alternatives = [re.escape(d) for d in candidates]
    if traps.unicode_domains and not data.isascii():
        pattern = traps.unicode_pattern()
        if pattern is not None:
            wide = {_fold(m.group()) for m in pattern.finditer(data)}
            alternatives += [
                b"".join(_any_case(c) for c in d.decode("utf-8", "surrogateescape")) for d in wide
            ]
    if not alternatives:
        return []
    alternatives.sort(key=len, reverse=True)
    pattern = re.compile(
        rb"(@|%40)(" + b"|".join(alternatives) + rb")(?![A-Za-z0-9-]|\.[A-Za-z0-9-])",
        re.IGNORECASE,
    )
    ranges = []
    for m in pattern.finditer(data):
        sep = m.start(1)
        domain = _fold(m.group(2))
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


def _changed_spans(old: bytes, new: bytes) -> list[tuple[int, int]]:
    """Where two byte strings of one length differ, found in C: the XOR of
    the two is zero wherever they agree."""
    if old == new:
        return []
    xor = (int.from_bytes(old, "big") ^ int.from_bytes(new, "big")).to_bytes(len(old), "big")
    return [m.span() for m in re.finditer(rb"[^\x00]+", xor)]


# -- views: decoded text that knows where each byte came from -----------------

_LITERAL, _QP_ESCAPE, _PERCENT_ESCAPE, _ENTITY_REF, _B_WORD, _QUOTED_PAIR = range(6)


class _View:
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

    def add(self, raw_start: int, raw_end: int, decoded: bytes, kind: int = _LITERAL) -> None:
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
            if kind == _LITERAL:  # reads as written: part of the literal run
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
        for s, e in _changed_spans(old, new):
            u = bisect.bisect_right(self.starts, s) - 1
            while u < len(self.units) and self.starts[u] < e:
                start = self.starts[u]
                raw_start, raw_end, kind = self.units[u]
                if kind == _LITERAL:
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
    if kind == _QP_ESCAPE:
        return b"=%02X" % decoded[0]
    if kind == _PERCENT_ESCAPE:
        return b"%%%02X" % decoded[0]
    if kind == _QUOTED_PAIR:
        return b"\\" + decoded[:1]
    if kind == _B_WORD:
        encoded = base64.b64encode(decoded)
        # A word without its padding, or with junk in it: the same decoded
        # bytes in the same room (decoders ignore missing or extra "=").
        encoded = encoded[: len(raw)] if len(encoded) > len(raw) else encoded
        return encoded + b"=" * (len(raw) - len(encoded))
    if kind == _ENTITY_REF:
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


def _through(out: bytearray, view: _View, traps: TrapSet, layer: int) -> None:
    """Masks in ``out`` the trap addresses of ``view``.

    Every view is built from the original text, never from the output of
    another: a domain masked as written ("&#97;lice@trap.example" ->
    "...@xxxx.xxxxxxx") would no longer mark the address that the decoded
    view sees whole. Masks only ever replace bytes with masked ones, so
    writing each view's changes into one output keeps them all."""
    old = view.text()
    new = _redact_text(old, traps, layer + 1)
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
        return decoded, _LITERAL
    return decoded, _ENTITY_REF


def _entity_view(data: bytes, traps: TrapSet) -> _View:
    view = _View()
    cache: dict[bytes, bytes] = {}
    wide = bool(traps.unicode_domains)
    pattern = _ENTITY if wide else _ENTITY_ASCII
    view.scan(data, 0, len(data), pattern, lambda m: _decode_entity(m, cache, wide))
    return view


def _percent_view(data: bytes) -> _View:
    view = _View()
    view.scan(data, 0, len(data), _PERCENT, _decode_percent)
    return view


def _decode_percent(m: re.Match[bytes]) -> tuple[bytes, int]:
    return bytes([int(m.group(1), 16)]), _PERCENT_ESCAPE


def _decode_qp(m: re.Match[bytes]) -> tuple[bytes, int]:
    if m.group(1) is None:  # a soft line break: no text
        return b"", _QP_ESCAPE
    return bytes([int(m.group(1), 16)]), _QP_ESCAPE


def _redact_text(data: bytes, traps: TrapSet, layer: int = 0) -> bytes:
    """Text: as written, then through HTML references and percent escapes
    (and those inside each other, up to MAX_LAYERS). Same length."""
    flat = _redact_flat(data, traps)
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
        _through(out, _entity_view(data, traps), traps, layer)
    if (
        b"%" in data
        and (at or b"&" in data or _PERCENT_SEPARATOR.search(data))
        and _PERCENT_ADDRESS.search(data)
    ):
        _through(out, _percent_view(data), traps, layer)
    return bytes(out)


# -- UTF-16 and UTF-32 -------------------------------------------------------


def _wide_codecs(data: bytes, charset: str) -> tuple[int, list[tuple[str, int]]]:
    """(code unit size, [(codec, where the text starts)]) for a wide
    charset, or (0, []) for any other."""
    name = charset.lower().replace("_", "-")
    if name in ("utf-16", "utf-16le", "utf-16be", "utf-16-le", "utf-16-be", "ucs-2", "unicode"):
        size = 2
    elif name in ("utf-32", "utf-32le", "utf-32be", "utf-32-le", "utf-32-be", "ucs-4"):
        size = 4
    elif data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        size = 2  # a text part without a charset, but with a byte-order mark
    else:
        return 0, []
    bits = str(size * 8)
    boms = {"le": "\ufeff".encode(f"utf-{bits}-le"), "be": "\ufeff".encode(f"utf-{bits}-be")}
    for order, bom in boms.items():
        if data.startswith(bom):
            return size, [(f"utf-{bits}-{order}", len(bom))]
    if name.endswith(("le", "be")):
        return size, [(f"utf-{bits}-{name[-2:]}", 0)]
    # QUIRK: RFC 2781 4.3 reads a BOM-less "UTF-16" as big-endian, Windows
    # senders (and Python's email package) as little-endian: redact both.
    return size, [(f"utf-{bits}-le", 0), (f"utf-{bits}-be", 0)]


def _redact_wide(data: bytes, charset: str, traps: TrapSet, out: bytes) -> bytes:
    """``out`` (``data`` redacted as bytes) with ``data`` read as the UTF-16
    or UTF-32 text it holds: each masked character is written back as one
    code unit of "x" or "1"."""
    size, codecs = _wide_codecs(data, charset)
    edited = bytearray(out)
    for codec, start in codecs:
        count = (len(data) - start) // size
        body = data[start : start + count * size]
        text = _code_units(body, codec, size)
        if text is None:
            continue
        view = text.encode("utf-8", "surrogatepass")
        new = _redact_text(view, traps)
        spans = _changed_spans(view, new)
        if not spans:
            continue
        ascii_only = len(view) == len(text)
        done = chars = 0  # characters start in view[:done] at `chars` bytes
        for s, e in spans:
            if ascii_only:
                first, offset = s, s
            else:  # which characters the span touches, counted in C
                first = chars + _starts(view, done, s + 1) - 1
                offset = s
                while 0x80 <= view[offset] < 0xC0 and offset > 0:
                    offset -= 1
                chars += _starts(view, done, e)
                done = e
            last = e if ascii_only else chars
            for i in range(first, last):
                old_char = text[i]
                new_char = chr(new[offset]) if old_char.isascii() else "x"
                offset += 1 if ascii_only else len(old_char.encode("utf-8", "surrogatepass"))
                if new_char != old_char:
                    pos = start + i * size
                    edited[pos : pos + size] = new_char.encode(codec)
    return bytes(edited)


def _code_units(body: bytes, codec: str, size: int) -> str | None:
    """One character per code unit (a surrogate pair stays two), so that
    character i is at byte i * size; None if that cannot be had."""
    try:
        text = body.decode(codec, "surrogatepass")
    except UnicodeDecodeError:
        return None
    if len(text) * size == len(body):
        return text
    if size == 2:  # surrogate pairs were joined: split them again
        units = memoryview(body).cast("H")  # native order; swap if need be
        if (codec.endswith("le")) != (sys.byteorder == "little"):
            units = memoryview(_swap16(body)).cast("H")
        return "".join(map(chr, units))
    return None


def _swap16(body: bytes) -> bytes:
    swapped = bytearray(body)
    swapped[0::2], swapped[1::2] = body[1::2], body[0::2]
    return bytes(swapped)


def _starts(view: bytes, start: int, end: int) -> int:
    """How many UTF-8 characters start in ``view[start:end]``."""
    return len(view[start:end].translate(None, _UTF8_CONTINUATION))


# -- bodies and headers ------------------------------------------------------


def _is_text(ctype: str) -> bool:
    return (
        ctype.startswith(("text/", "message/", "multipart/"))
        or ctype in _TEXT_TYPES
        or ctype.endswith(("+xml", "+json"))
    )


def _body_redactor(ctype: str, params: dict[str, str], traps: TrapSet) -> Callable[[bytes], bytes]:
    """How a decoded body of this type is read."""
    if not _is_text(ctype):
        return lambda data: _redact_flat(data, traps)
    charset = params.get("charset", "").strip().strip("'\"")

    def text(data: bytes) -> bytes:
        out = _redact_text(data, traps)
        if _wide_codecs(data, charset)[0]:
            out = _redact_wide(data, charset, traps, out)
        return out

    return text


def _redact_qp(raw: bytes, traps: TrapSet, redact_body: Callable[[bytes], bytes]) -> bytes:
    """Quoted-printable, masked unit by unit: a literal stays literal and
    an ``=XX`` escape stays an escape, so every line keeps its length and
    soft line breaks stay."""
    view = _View()
    view.scan(raw, 0, len(raw), _QP_UNIT, _decode_qp)
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
        return _apply(bytes(out), _trap_ranges(blanked, traps))
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
        new = _redact_message(decoded, traps, message_depth)
    else:
        new = redact_body(decoded)
    if new == decoded:
        # Raw text is no base64 ("@" is not in its alphabet), but spam says
        # base64 over plain text too: read it raw as well.
        return _redact_flat(raw, traps)
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


def _header_view(block: bytes) -> _View:
    """A header block as decoders read it: raw text, RFC 2047 encoded words
    decoded, and the white space between two adjacent encoded words dropped
    (RFC 2047 6.2), so text split across words is read joined."""
    view = _View()
    pos = 0
    previous_word_end = -1
    for w in _ENCODED_WORD.finditer(block):
        gap = block[pos : w.start()]
        if not (pos == previous_word_end and not gap.strip(_WHITE_SPACE)):
            view.add(pos, w.start(), gap)
        start, end = w.span(3)
        if w.group(2) in (b"Q", b"q"):
            view.scan(block, start, end, _Q_UNIT, _decode_qp, lambda s: s.translate(_Q_SPACE))
        else:
            view.add(start, end, decode_base64(w.group(3)), _B_WORD)
        pos = previous_word_end = w.end()
    view.add(pos, len(block), block[pos:])
    return view


def _redact_header(block: bytes, traps: TrapSet) -> bytes:
    """A header block: raw text and encoded words, then parameters."""
    if b"=?" in block:
        out = bytearray(block)
        _through(out, _header_view(block), traps, -1)
    else:
        out = bytearray(_redact_text(block, traps))
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
            view = _View()
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
                    view.scan(block, start, end, _PERCENT, _decode_percent)
                else:
                    view.add(start, end, block[start:end])
            old = view.text()
            new = _redact_text(old, traps)
            if new != old:
                view.write_back(out, old, new)


def _decode_quoted(m: re.Match[bytes]) -> tuple[bytes, int]:
    if m.group(1) is None:  # a fold: unfolding drops the line end
        return b"", _QUOTED_PAIR
    return m.group(1), _QUOTED_PAIR


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
        out.append(_redact_text(data[pos:start], traps))
        out.append(replacement)
        pos = end
    out.append(_redact_text(data[pos:], traps))
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
            # Piece by piece, so a redacted value never joins or splits a fold.
            received=[redact_text(p, traps) for p in env.received_pieces()],
            received_line="",
            mail_from=redact_text(env.mail_from, traps),
            rcpts=[redact_text(r, traps) for r in env.rcpts],
        )


def redact_envelope(env: Envelope, traps: TrapConfig, feeds: Iterable[FeedConfig]) -> Envelope:
    """A redacted copy of ``env``; see :class:`EnvelopeRedactor`, which the
    pipeline should build once per config rather than once per message."""
    return EnvelopeRedactor(traps, feeds)(env)
