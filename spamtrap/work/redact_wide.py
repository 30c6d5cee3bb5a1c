"""Trap-address redaction in UTF-16 and UTF-32 text parts (see
spamtrap.work.redact)."""

from __future__ import annotations

import sys

from spamtrap.work.redact_traps import TrapSet, changed_spans
from spamtrap.work.redact_views import redact_in_text

# UTF-8 continuation bytes: deleting them from a slice leaves one byte per character.
_UTF8_CONTINUATION = bytes(range(0x80, 0xC0))


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


def redact_wide(data: bytes, charset: str, traps: TrapSet, out: bytes) -> bytes:
    """``out`` (``data`` redacted as bytes) with ``data`` read as the UTF-16
    or UTF-32 text it holds: each masked character is written back as one
    code unit of "x" or "1". Any other charset: ``out`` as it is."""
    size, codecs = _wide_codecs(data, charset)
    if not codecs:
        return out
    edited = bytearray(out)
    for codec, start in codecs:
        count = (len(data) - start) // size
        body = data[start : start + count * size]
        text = _code_units(body, codec, size)
        if text is None:
            continue
        view = text.encode("utf-8", "surrogatepass")
        new = redact_in_text(view, traps)
        spans = changed_spans(view, new)
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
