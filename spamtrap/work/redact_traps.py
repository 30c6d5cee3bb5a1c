"""Trap-address redaction, the addresses: which domains and addresses are
traps (in every form a message may write them), where they are in a run of
bytes, and masking them (see spamtrap.work.redact for the whole design)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable

try:  # IDNA 2008 (UTS 46), as browsers and MUAs map names; Twisted brings it.
    import idna as _idna
except ImportError:  # pragma: no cover - the built-in IDNA 2003 codec still works
    _idna = None  # type: ignore[assignment]


# Longest local part looked at left of an "@" (RFC 5321 allows 64).
MAX_LOCAL = 256

# Local-part characters: the usual dot-atom subset. "=", "/", "?" and ":"
# are left out on purpose: they join addresses to URLs and QP escapes
# ("?email=trap@...", "=3Dtrap@..."), and the local part starts after them.
# So are 8-bit bytes: "\xa0trap@..." (a no-break space) and "«trap@...»"
# are common, UTF-8 local parts are not.
LOCAL_BYTES = bytes(b for b in range(128) if chr(b).isalnum() or b in b"._%+'-")
_LEADING_PUNCTUATION = b"._%+'-"
# A separator ("@", or "%40" as in URLs) and the domain after it.
_AT_DOMAIN = re.compile(rb"(@|%40)([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)")

# ASCII letters and 8-bit bytes (a UTF-8 domain in the metadata) -> x, digits -> 1.
_MASK = bytes(
    ord("1") if b in b"0123456789" else ord("x") if b >= 128 or chr(b).isalpha() else b
    for b in range(256)
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


def trap_ranges(data: bytes, traps: TrapSet) -> list[tuple[int, int]]:
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
        local = window[len(window.rstrip(LOCAL_BYTES)) :]
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


def apply_ranges(data: bytes, ranges: list[tuple[int, int]]) -> bytes:
    if not ranges:
        return data
    out = bytearray(data)
    for start, end in ranges:
        out[start:end] = data[start:end].translate(_MASK)
    return bytes(out)


def redact_flat(data: bytes, traps: TrapSet) -> bytes:
    """Raw bytes, read as they are."""
    if b"@" not in data and b"%40" not in data:
        return data
    return apply_ranges(data, trap_ranges(data, traps))


def changed_spans(old: bytes, new: bytes) -> list[tuple[int, int]]:
    """Where two byte strings of one length differ, found in C: the XOR of
    the two is zero wherever they agree."""
    if old == new:
        return []
    xor = (int.from_bytes(old, "big") ^ int.from_bytes(new, "big")).to_bytes(len(old), "big")
    return [m.span() for m in re.finditer(rb"[^\x00]+", xor)]
