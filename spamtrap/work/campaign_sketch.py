"""The content sketch campaigns are found by: normalised text -> MinHash.

Near-copies of one spam run share a template but differ in what a bulk
mailer fills in per recipient: Message-ID, To, Date, the recipient's name,
random hex or base64 tokens in links, and "hash-busting" words added to
defeat exact checksums. Without those, two messages of one template have
nearly the same set of *word pairs* (2-word shingles), and two templates
of one genre, sharing their everyday words, still do not. A MinHash sketch
estimates the Jaccard similarity of two such sets from 64 numbers, and cut
into bands (LSH) it lets an index find the campaigns that share a band
with a message in constant time per band (spamtrap.work.campaign).

Normalisation (:func:`text_and_parts`, :func:`features`), bounded in bytes
and parts (the MAX_* constants):

- the text: the Subject (RFC 2047 decoded) and every ``text/*`` part of
  the MIME tree (spamtrap.mime), transfer encoding undone; UTF-16 and
  UTF-32 parts are made UTF-8, other charsets are taken byte for byte (the
  copies of one campaign share theirs); HTML tags, comments, ``style`` and
  ``script`` blocks and character references are dropped (a long HTML
  part only as far as the text needs, :func:`_strip_html`); every other
  header field (Received, Date, Message-ID, To ...) is never read;
- lower-cased, cut into words at white space and ASCII punctuation, every
  digit read as ``0`` (prices, order and phone numbers read alike); only
  the first MAX_WORDS words count;
- each non-text part is one feature: its type and a checksum of its first
  ATTACHMENT_PREFIX bytes (the same image in every copy is one feature);
- a text with fewer than MIN_WORDS words (CJK without spaces, a subject
  alone) adds overlapping 4-byte pieces of itself.

Features are hashed with ``zlib.crc32``: deterministic, so sketches (and
campaign ids) are the same in every process and on every node; Python's
``hash()`` of bytes is randomised per process.

The sketch is a one-permutation MinHash (Li, Owen and Zhang, 2012) with
rotation densification (Shrivastava and Li, 2014): each feature's hash
picks one of BINS bins by its low bits and the bin keeps the smallest rest;
an empty bin borrows the value of the next full one, offset by the
distance. One pass over the features, where classic MinHash makes one pass
per hash function, and every step a C call over a whole list (translate,
split, crc32 through map, sorted): a 4 KiB message costs some tens of µs
(docs/benchmarks.md). BANDS bands of ROWS bins become the :func:`band_keys`.
Every scan is linear in its (bounded) input, whatever the content.
"""

from __future__ import annotations

import operator
import re
import zlib
from collections.abc import Iterable, Sequence
from email.header import decode_header, make_header
from typing import Literal, overload

from spamtrap.mime import split_message, walk

BINS = 64
BIN_BITS = 6  # BINS == 1 << BIN_BITS
ROWS = 3
BANDS = BINS // ROWS  # 21: the last bin is in no band
EMPTY = 0xFFFFFFFF  # every bin of the sketch of a message without any feature
MIN_WORDS = 8
MAX_PIECES = 1024
# What one message costs at most. Only the first MAX_WORDS words count (the
# start of a text says which template it is), and they fit well inside
# MAX_TEXT bytes (words average 6 bytes with their space): once the text
# parts gave that much, the rest is not decoded. Also bounded: body bytes
# walked, parts, depth, bytes decoded per text part, and the bytes of a
# non-text part that identify it.
MAX_WORDS = 128
MAX_TEXT = 12 * MAX_WORDS
MAX_BODY = 256 * 1024
MAX_PARTS = 32
MAX_DEPTH = 5
MAX_PART_TEXT = 16 * 1024
ATTACHMENT_PREFIX = 1024

Sketch = tuple[int, ...]

# The top header fields the sketch reads; every other one is ignored (and
# not parsed: a spam header of 2 KiB of Received lines costs more to parse
# than the whole sketch).
_TOP_FIELDS = (b"subject", b"content-type", b"content-transfer-encoding")
_TOP_FIELD = re.compile(rb"\n(" + b"|".join(_TOP_FIELDS) + rb")[ \t]*+:")
MAX_SUBJECT = 1024  # characters of the Subject read
MAX_FIELD = 8 * 1024  # bytes of each of those fields (with its continuations)
# On lower-cased text. Every pattern and scan here is linear: a tag stops
# at the next "<", and blocks whose content is no text (style, script,
# comments) are cut out with bytes.find, an unclosed one to the next start.
_TAG = re.compile(rb"<[^<>]*+>")
_BLOCKS = ((b"<style", b"</style"), (b"<script", b"</script"), (b"<!--", b"-->"))
_ENTITY = re.compile(rb"&#?\w{1,10};?")
_PUNCT = bytes(c for c in range(0x21, 0x7F) if not chr(c).isalnum())
# Punctuation becomes white space (the words split there), and every digit
# a 0: numbers, prices, order and phone numbers all read the same.
_WORDS = bytes.maketrans(_PUNCT + b"123456789", b" " * len(_PUNCT) + b"0" * 9)
# A quiet cut in HTML (see _strip_html): after a ">", _MARGIN bytes either
# side without "<", ">" or "&" (an entity is at most 13 bytes, a block
# marker 8). Linear: each attempt starts at a ">" and stops at the next of
# those three bytes.
_MARGIN = 16
_QUIET = re.compile(rb">[^<>&]{%d}" % (2 * _MARGIN))
HTML_CHUNK = 4096  # bytes of HTML stripped at a time, about 2 * MAX_TEXT of text
_WIDE = ("utf-16", "utf-32", "utf16", "utf32", "ucs-2", "ucs-4")


def _top_fields(head: bytes) -> bytes:
    """The first line of each field in _TOP_FIELDS, with its continuation
    lines, found in the lower-cased header in one scan."""
    low = b"\n" + head.lower()  # offsets: head's + 1
    out: dict[bytes, bytes] = {}
    for m in _TOP_FIELD.finditer(low):
        if m.group(1) in out:
            continue
        end = m.end()
        while True:
            nl = low.find(b"\n", end)
            end = len(low) if nl < 0 else nl + 1
            if nl < 0 or low[end : end + 1] not in (b" ", b"\t") or end - m.start() > MAX_FIELD:
                break
        out[m.group(1)] = head[m.start() : end - 1].rstrip(b"\r\n") + b"\n"
        if len(out) == len(_TOP_FIELDS):
            break
    return b"".join(out.values())


def _subject(value: str) -> bytes:
    value = value[:MAX_SUBJECT]
    if "=?" in value:
        try:
            value = str(make_header(decode_header(value)))
        except Exception:  # noqa: BLE001, S110 - a bad encoded word: the raw text will do
            pass
    return value.encode("utf-8", "replace")


def text_and_parts(data: bytes) -> tuple[bytes, list[int]]:
    """The message's text, lower-cased (see the module docstring), and one
    feature hash per non-text part."""
    head, body = split_message(data)
    texts: list[bytes] = []
    others: list[int] = []
    room = MAX_TEXT
    # The walk reads only the fields that matter at the top, and the start
    # of the body.
    top = _top_fields(head) + b"\n" + body[:MAX_BODY]
    for part in walk(top, max_parts=MAX_PARTS, max_depth=MAX_DEPTH):
        if part.depth == 0:
            subject = part.header("subject")
            if subject:
                texts.append(_subject(subject).lower())
        ctype = part.content_type
        if ctype.startswith(("multipart/", "message/")):
            continue
        if not ctype.startswith("text/"):
            seed = zlib.crc32(ctype.encode("ascii", "replace"))
            others.append(zlib.crc32(part.raw[:ATTACHMENT_PREFIX], seed))
            continue
        if room <= 0:
            continue
        text = part.body(MAX_PART_TEXT)
        charset = part.params.get("charset", "").strip().lower()
        if charset.startswith(_WIDE):
            try:
                text = text.decode(charset, "replace").encode("utf-8")
            except (LookupError, ValueError):
                pass
        text = text.lower()
        if ctype == "text/html" or b"</" in text:
            text = _strip_html(text, room)
        texts.append(text[:room])
        room -= len(text)
    return b" ".join(texts), others


def _strip_html(text: bytes, need: int | None = None) -> bytes:
    """The text without its tags, blocks and character references. With
    ``need``, a long text is stripped in chunks, and once they give that
    many bytes the rest is left: the result is then a prefix, ``need``
    bytes at least, of the whole text's.

    Why: only the first MAX_TEXT bytes of text count, and stripping costs
    about 5 ns a byte (the _TAG scan most). On spam-2 (2026-12-03) it took
    20.5 µs a message over whole parts, 17.0 µs in chunks; parts of 10-16
    KiB of HTML gain most: the 90th percentile of one message's sketch went
    from 138 to 122 µs, the 99th from 205 to 178 µs.

    A chunk ends at a quiet cut (_QUIET): _MARGIN bytes without "<", ">"
    or "&" on each side, after a ">". Then no block marker, tag or entity
    spans the cut; and if the chunk ends outside every block and after
    every "<" it holds is closed (checked by _strip, which returns None
    otherwise), each step (block cuts, tags, entities) gives for the whole
    text what it gives for the chunk followed by what it gives for the
    rest: the chunks add up to the whole. tests/unit/test_campaign_sketch.py
    holds the cases where a cut must be refused."""
    if need is None:
        return _strip(text)
    out: list[bytes] = []
    done = at = 0
    while done < need and len(text) - at > HTML_CHUNK + 4 * _MARGIN:
        quiet = _QUIET.search(text, at + HTML_CHUNK)
        if quiet is None:
            break
        cut = quiet.start() + 1 + _MARGIN
        piece = _strip(text[at:cut], True)
        if piece is None:
            break
        out.append(piece)
        done += len(piece)
        at = cut
    if done < need:
        out.append(_strip(text[at:]))  # the rest in one piece
    return b"".join(out)


@overload
def _strip(text: bytes, cut: Literal[False] = False) -> bytes: ...
@overload
def _strip(text: bytes, cut: Literal[True]) -> bytes | None: ...
def _strip(text: bytes, cut: bool = False) -> bytes | None:
    """Blocks, tags and character references out. With ``cut`` (the text
    ends at a quiet cut of a longer one, see _strip_html): None when what
    comes after the cut could change what this part gives."""
    for start, end in _BLOCKS:
        if start in text:
            pieces = text.split(start)
            if cut and end not in pieces[-1]:
                return None  # the cut is inside a block
            kept = [pieces[0]]
            for piece in pieces[1:]:
                at = piece.find(end)
                if at >= 0:
                    kept.append(piece[at + len(end) :])
            text = b" ".join(kept)
    if cut and text.rfind(b"<") > text.rfind(b">"):
        return None  # an unclosed "<": the rest may close it
    text = _TAG.sub(b" ", text)
    # At a cut, the _MARGIN quiet bytes before it are still the last ones
    # here (no step removes them): every entity ends before the cut.
    return _ENTITY.sub(b" ", text) if b"&" in text else text


def features(data: bytes) -> set[int]:
    """The crc32 hashes of the message's normalised features: its word
    pairs (w-shingles of 2 words)."""
    return set(_hashes(data))


def _hashes(data: bytes) -> list[int]:
    """:func:`features` as a list, repeats left in: the sketch does not
    mind them, and building the set cost about 9 µs of the 90 µs features
    took on spam-2 (2026-12-03)."""
    text, others = text_and_parts(data)
    # maxsplit: the words after the first MAX_WORDS are not cut apart.
    words = text[: MAX_TEXT + MAX_SUBJECT].translate(_WORDS).split(None, MAX_WORDS)[:MAX_WORDS]
    if len(words) < MIN_WORDS:
        # Too few words to tell templates apart (CJK without spaces, a
        # subject alone): overlapping 4-byte pieces of the text too.
        squeezed = b"".join(words)
        words += [squeezed[i : i + 4] for i in range(min(len(squeezed) - 3, MAX_PIECES))]
    # crc32(b, crc32(a)) is the crc32 of a + b: one C call per pair.
    singles = list(map(zlib.crc32, words))
    hashes = list(map(zlib.crc32, words[1:], singles))
    # Fewer than MIN_WORDS distinct pairs? When the first MIN_WORDS differ
    # (most messages), there are enough without counting them all.
    if len(set(hashes[:MIN_WORDS])) < MIN_WORDS and len(set(hashes)) < MIN_WORDS:
        hashes += singles
    hashes += others
    return hashes


# Densification: an empty bin takes the value of the bin after it plus
# _STEP (see sketch). Filled going down round the ring from the highest full
# bin, each empty bin's successor is done before it: the order for each
# highest full bin.
_STEP = 1 << (32 - BIN_BITS)
_FILL_ORDER = tuple((*range(top - 1, -1, -1), *range(BINS - 1, top, -1)) for top in range(BINS))


def sketch(hashes: Iterable[int]) -> Sketch:
    """The densified one-permutation MinHash of 32-bit feature hashes
    (repeats allowed)."""
    ordered = sorted(hashes, reverse=True)  # so each bin keeps its smallest
    if not ordered:
        return (EMPTY,) * BINS
    bins = {h & (BINS - 1): h >> BIN_BITS for h in ordered}
    values = list(map(bins.get, range(BINS)))
    if len(bins) < BINS:
        # Rotation: an empty bin takes the value of the next full bin (going
        # round) plus its distance << 26, so two sketches agree on it exactly
        # when they agree on that bin and the empty run before it. That is
        # the value of the bin after it plus 1 << 26: one step per empty
        # bin, where a bisect per empty bin cost about 6 µs of the sketch's
        # 31 µs on spam-2 (2026-12-03).
        for i in _FILL_ORDER[max(bins)]:
            if values[i] is None:
                values[i] = values[(i + 1) % BINS] + _STEP
    return tuple(values)  # type: ignore[arg-type]  # no None is left


def band_keys(s: Sketch) -> list[int]:
    """One key per band (band b: bins ROWS * b to ROWS * b + ROWS - 1): equal keys
    mean the two sketches agree on every bin of that band. Tuples of ints
    hash alike in every process, but the keys never leave it anyway."""
    rows = [s[r : BANDS * ROWS : ROWS] for r in range(ROWS)]
    return list(map(hash, zip(range(BANDS), *rows, strict=True)))


def similarity(a: Sequence[int], b: Sequence[int]) -> float:
    """The estimated Jaccard similarity of two feature sets: the share of
    bins on which their sketches agree. Either may be an array of them:
    operator.eq over both costs 2 µs, int.__eq__ over a tuple of the array
    5 µs (2026-12-03)."""
    return sum(map(operator.eq, a, b)) / BINS


def message_sketch(data: bytes) -> Sketch:
    return sketch(_hashes(data))
