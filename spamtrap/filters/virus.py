"""Stage "virus": a fast built-in malware detector.

It runs on every message, so it looks only where malware is: the EICAR test
string, executable magic bytes at the start of an attachment, dangerous
attachment file names, and the same inside zip archives. Text bodies are
only decoded to look for EICAR; attachments are decoded only as far as the
magic checks need, except a zip, which must be whole to be opened.

Everything it reads is hostile, so every walk has a limit: the MIME walk's
parts and depth, and per message a budget of zip entries and decompressed
zip bytes (``filters.virus``). Zip entries are read in bounded chunks, never
whole, so a zip bomb costs a few KiB. Bad input gives no verdict, never an
exception.

A limit that is reached is a verdict, not a pass: what lies beyond it was
not looked at, and only malware hides an ``.exe`` four zips deep or as
entry 1,002. The reasons are ``zip-limit:depth`` (a zip nested deeper than
``max_zip_depth``, a zip quine too), ``zip-limit:entries`` (more than
``max_zip_entries`` in one message), ``zip-limit:bytes`` (more decompressed
bytes than ``max_zip_bytes`` needed) and ``zip-limit:ratio`` (an entry that
says it inflates more than :data:`MAX_ZIP_RATIO` times, past
:data:`MIN_BOMB_BYTES`: a zip bomb).

Time: every regexp here is linear; the MIME walk splits multiparts with
``bytes.find`` and decodes base64 in 1 MiB slices, and zlib inflates in
``READ_CHUNK`` steps, so no single call holds the GIL for long.
"""

from __future__ import annotations

import email.errors
import email.header
import io
import re
import zipfile
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import unquote_to_bytes

from spamtrap.config import Config, VirusConfig
from spamtrap.filters import Discard
from spamtrap.message import Envelope
from spamtrap.mime import IDENTITY_ENCODINGS, Part, walk

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
ZIP_MAGIC = b"PK\x03\x04"

# Decoded bytes of an attachment (or zip entry) that are examined: magic
# bytes and the EICAR test file (which by its definition starts the file).
HEAD_BYTES = 4096
# A PE header further into an MZ file than this is not looked for.
MAX_PE_OFFSET = 64 * 1024
# Decoded text examined for EICAR: more than any message the size stage lets by.
MAX_TEXT_BYTES = 16 * 1024 * 1024
# The MIME walk's limits.
MAX_PARTS = 1000
MAX_DEPTH = 10
READ_CHUNK = 64 * 1024
# An entry declaring a decompressed size above MIN_BOMB_BYTES and more than
# MAX_ZIP_RATIO times its compressed size is a bomb. Deflate tops out near
# 1032:1; text and office files stay below 20:1, a MiB of zeros is 1000:1.
MAX_ZIP_RATIO = 100
MIN_BOMB_BYTES = 16 * 1024 * 1024

_MACHO = {
    b"\xfe\xed\xfa\xce",  # 32-bit, big-endian
    b"\xce\xfa\xed\xfe",  # 32-bit, little-endian
    b"\xfe\xed\xfa\xcf",  # 64-bit, big-endian
    b"\xcf\xfa\xed\xfe",  # 64-bit, little-endian
}
_MACHO_FAT = {b"\xca\xfe\xba\xbe", b"\xca\xfe\xba\xbf"}
_NAME_PARAM = re.compile(
    r';\s*((?:file)?name)(?:\*(\d{1,9}))?(\*)?\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)', re.IGNORECASE
)


def pe_offset(head: bytes) -> int | None:
    """Where an MZ file says its PE header is (None: not an MZ file)."""
    if not head.startswith(b"MZ") or len(head) < 0x40:
        return None
    return int.from_bytes(head[0x3C:0x40], "little")


def executable_kind(head: bytes) -> str | None:
    """The kind ("pe", "elf" or "macho") of executable ``head`` starts, if any."""
    offset = pe_offset(head)
    if offset is not None:
        # Plain text can start with "MZ"; only a real PE header counts.
        return "pe" if head[offset : offset + 4] == b"PE\0\0" else None
    if head.startswith(b"\x7fELF"):
        return "elf"
    magic = head[:4]
    if magic in _MACHO:
        return "macho"
    if magic in _MACHO_FAT and len(head) >= 8:
        # QUIRK: Java class files share 0xCAFEBABE; their next word is the
        # class file version (>= 45), a fat binary's is its few architectures
        # (file(1) uses the same cut).
        return "macho" if 0 < int.from_bytes(head[4:8], "big") < 20 else None
    return None


def content_reason(head: bytes) -> str | None:
    if EICAR in head:
        return "eicar"
    kind = executable_kind(head)
    return f"executable:{kind}" if kind else None


def extension(name: str) -> str:
    """The file name extension as Windows sees it, lower case ("" if none)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    # Windows drops trailing dots and spaces: "invoice.exe. " runs as an .exe.
    base = base.rstrip(" .\t\0")
    _, dot, ext = base.rpartition(".")
    return ext.lower() if dot else ""


def _decode_2047(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (LookupError, ValueError, UnicodeError, email.errors.HeaderParseError):
        return value


def _decode_2231(value: str, with_charset: bool) -> str:
    """An RFC 2231 extended value: ``charset'language'percent-encoded``."""
    charset = "utf-8"
    if with_charset and value.count("'") >= 2:
        charset, _, value = value.split("'", 2)
    raw = unquote_to_bytes(value)
    try:
        return raw.decode(charset or "utf-8", "replace")
    except LookupError:
        return raw.decode("utf-8", "replace")


def _names_in(value: str) -> list[str]:
    """Every file name given in one header value: ``filename``/``name``
    plain, RFC 2047 encoded, RFC 2231 extended and continued."""
    names: list[str] = []
    pieces: dict[str, list[tuple[int, bool, str]]] = {}
    for key, index, star, val in _NAME_PARAM.findall(value):
        if val.startswith('"') and val.endswith('"') and len(val) >= 2:
            val = val[1:-1].replace('\\"', '"')
        if index:
            pieces.setdefault(key.lower(), []).append((int(index), bool(star), val))
        elif star:
            names.append(_decode_2231(val, with_charset=True))
        else:
            names.append(_decode_2047(val))
    for parts in pieces.values():
        parts.sort()
        names.append("".join(_decode_2231(v, with_charset=i == 0) if s else v for i, s, v in parts))
    return names


def file_names(part: Part) -> list[str]:
    """All names a part's headers give it. A mail client may show any of
    them, so all are judged."""
    names = []
    for header in ("content-disposition", "content-type"):
        value = part.header(header)
        if value and "name" in value.lower():
            names += _names_in(value)
    return [n for n in names if n]


class _ZipLimitError(Exception):
    """A zip limit was reached; ``args[0]`` says which."""


@dataclass
class _Budget:
    """What one message may still cost in zip work."""

    entries: int
    bytes: int


class VirusStage:
    name = "virus"

    def __init__(self, cfg: VirusConfig) -> None:
        self.extensions = frozenset(e.lower() for e in cfg.extensions)
        self.max_zip_depth = cfg.max_zip_depth
        self.max_zip_entries = cfg.max_zip_entries
        self.max_zip_bytes = cfg.max_zip_bytes

    def __call__(self, env: Envelope) -> Discard | None:
        reason = self.scan(env.data)
        return Discard(reason) if reason else None

    def scan(self, data: bytes) -> str | None:
        """The reason to discard a raw message, or None."""
        if EICAR in data:
            return "eicar"
        budget = _Budget(self.max_zip_entries, self.max_zip_bytes)
        parts = walk(
            data,
            max_parts=MAX_PARTS,
            max_depth=MAX_DEPTH,
            decode_messages=True,  # forwarded spam base64-encodes them
            max_decoded=MAX_TEXT_BYTES,
        )
        for part in parts:
            if part.children:
                # A container: its parts come next. An encoded message was
                # not in the raw bytes searched above.
                encoded = part.encoding not in IDENTITY_ENCODINGS
                if part.content_type == "message/rfc822" and encoded:
                    if EICAR in part.body(MAX_TEXT_BYTES):
                        return "eicar"
                continue
            if part.content_type.startswith("multipart/"):
                continue  # no boundary, or too deep: nothing to look at
            reason = self._scan_part(part, budget)
            if reason:
                return reason
        return None

    def _scan_part(self, part: Part, budget: _Budget) -> str | None:
        for name in file_names(part):
            ext = extension(name)
            if ext in self.extensions:
                return f"extension:{ext}"
        encoded = part.encoding not in IDENTITY_ENCODINGS
        if part.content_type.startswith("text/"):
            # The raw message was searched already; only an encoding hides it.
            body = part.body(MAX_TEXT_BYTES) if encoded else part.raw[:HEAD_BYTES]
            if encoded and EICAR in body:
                return "eicar"
            head = body[:HEAD_BYTES]
        else:
            head = part.body(HEAD_BYTES)
        offset = pe_offset(head)
        if offset is not None and len(head) < offset + 4 <= MAX_PE_OFFSET:
            head = part.body(offset + 4)
        reason = content_reason(head)
        if reason:
            return reason
        if head.startswith(ZIP_MAGIC) and self.max_zip_depth > 0:
            try:
                reason = self._scan_zip(part.body(len(part.raw)), 1, budget)
            except _ZipLimitError as e:
                return f"zip-limit:{e.args[0]}"
            return f"zip:{reason}" if reason else None
        return None

    def _scan_zip(self, data: bytes, depth: int, budget: _Budget) -> str | None:
        """The reason to discard a zip archive (and the zips in it), or None."""
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except Exception:  # noqa: BLE001 - zipfile raises a zoo of errors on hostile input
            return None
        with archive:
            for info in archive.infolist():
                if budget.entries <= 0:
                    raise _ZipLimitError("entries")
                budget.entries -= 1
                ext = extension(info.filename)
                if ext in self.extensions:
                    return f"extension:{ext}"
                # QUIRK: zipfile decompresses bzip2 and lzma chunks without an
                # output bound (deflate has one), so a bomb in those would cost
                # memory: such entries, like encrypted ones, are judged by name.
                if (
                    info.is_dir()
                    or info.flag_bits & 0x1
                    or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
                ):
                    continue
                if (
                    info.file_size > MIN_BOMB_BYTES
                    and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1)
                ):
                    raise _ZipLimitError("ratio")
                try:
                    reason = self._scan_entry(archive, info, depth, budget)
                except _ZipLimitError:
                    raise
                except Exception:  # noqa: BLE001 - as above: a broken entry is no verdict
                    reason = None
                if reason:
                    return reason
        return None

    def _scan_entry(
        self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, depth: int, budget: _Budget
    ) -> str | None:
        with archive.open(info) as f:
            head = _read(f, HEAD_BYTES, budget)
            offset = pe_offset(head)
            if offset is not None and len(head) < offset + 4 <= MAX_PE_OFFSET:
                head += _read(f, offset + 4 - len(head), budget)
            reason = content_reason(head)
            if reason:
                return reason
            if not head.startswith(ZIP_MAGIC):
                return None
            if depth >= self.max_zip_depth:
                raise _ZipLimitError("depth")
            # An inner zip must be whole to be opened: only one that fits in
            # what is left of the budget is.
            if info.file_size - len(head) > budget.bytes:
                raise _ZipLimitError("bytes")
            rest = _read(f, budget.bytes, budget)
            if f.read(1):
                raise _ZipLimitError("bytes")
            reason = self._scan_zip(head + rest, depth + 1, budget)
            return f"zip:{reason}" if reason else None


def _read(f: IO[bytes], n: int, budget: _Budget) -> bytes:
    """Up to ``n`` decompressed bytes, in chunks, charged to the budget."""
    chunks: list[bytes] = []
    cut = n > budget.bytes
    n = min(n, budget.bytes)
    while n > 0:
        chunk = f.read(min(n, READ_CHUNK))
        if not chunk:
            return b"".join(chunks)  # the entry ended first
        chunks.append(chunk)
        n -= len(chunk)
        budget.bytes -= len(chunk)
    if cut and f.read(1):
        raise _ZipLimitError("bytes")  # more to read than the budget allows
    return b"".join(chunks)


def make(cfg: Config, reactor: Any) -> VirusStage | None:
    if not cfg.filters.virus.enabled:
        return None
    return VirusStage(cfg.filters.virus)
