"""A bounded, lenient MIME walk over raw message bytes.

Spam has broken MIME: missing boundaries, wrong charsets, NUL bytes, 10,000
tiny parts, deep nesting. The stages need to look inside without trusting
any of it, so this walker works on the raw bytes (each part's body is a slice
of the original message, which is what rfc822 extraction must keep exact),
never recurses in Python, and stops at fixed limits on parts and depth.
Nothing here raises on bad input.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FOLD = re.compile(rb"\r?\n[ \t]+")
_PARAM = re.compile(rb';\s*([A-Za-z0-9_.*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')

MAX_HEADER_BYTES = 256 * 1024


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block, body). No blank line: it is all header (bounded)."""
    m = _HEADER_END.search(data, 0, MAX_HEADER_BYTES)
    if m is None:
        if len(data) > MAX_HEADER_BYTES:
            return data[:0], data  # not a header at all: treat it as body
        return data, b""
    return data[: m.start()], data[m.end() :]


def header_fields(block: bytes) -> list[tuple[str, str]]:
    """Unfolded ``(lower-case name, value)`` pairs; lines without a colon skipped."""
    out = []
    for line in _FOLD.sub(b" ", block).splitlines():
        name, sep, value = line.partition(b":")
        name = name.strip()
        if not sep or not name or b" " in name or b"\t" in name:
            continue
        out.append(
            (name.decode("ascii", "replace").lower(), value.strip().decode("utf-8", "replace"))
        )
    return out


def content_type(fields: list[tuple[str, str]]) -> tuple[str, dict[str, str]]:
    """The type (lower case, default text/plain) and its parameters."""
    value = next((v for n, v in fields if n == "content-type"), "")
    main = value.split(";", 1)[0].strip().lower() or "text/plain"
    if "/" not in main:
        main = "text/plain"
    return main, _params(value)


def _params(value: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, val in _PARAM.findall(value.encode("utf-8", "replace")):
        v = val.decode("utf-8", "replace")
        if v.startswith('"') and v.endswith('"') and len(v) >= 2:
            v = v[1:-1].replace('\\"', '"')
        params.setdefault(key.decode("ascii", "replace").lower().rstrip("*"), v)
    return params


@dataclass
class Part:
    fields: list[tuple[str, str]]
    content_type: str
    params: dict[str, str]
    depth: int
    raw: bytes  # the body bytes exactly as in the message (still transfer-encoded)
    children: int = 0  # multipart: how many sub-parts were found
    notes: list[str] = field(default_factory=list)  # what was odd about it

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.fields if n == name), None)

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
        raw = self.raw[: limit * 2 if self.encoding in ("base64", "quoted-printable") else limit]
        if self.encoding == "base64":
            cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", raw)
            cleaned = cleaned[: len(cleaned) - len(cleaned) % 4]
            try:
                return base64.b64decode(cleaned)[:limit]
            except (binascii.Error, ValueError):
                return b""
        if self.encoding == "quoted-printable":
            return quopri.decodestring(raw)[:limit]
        return raw[:limit]


def walk(data: bytes, *, max_parts: int = 1000, max_depth: int = 10) -> Iterator[Part]:
    """Every part of a message, depth first, the top-level message first.

    A multipart body is split on its boundary; a ``message/rfc822`` part is
    walked into as a message of its own. Limits end the walk early.
    """
    stack: list[tuple[bytes, int]] = [(data, 0)]
    seen = 0
    while stack and seen < max_parts:
        chunk, depth = stack.pop()
        head, body = split_message(chunk)
        fields = header_fields(head)
        ctype, params = content_type(fields)
        part = Part(fields, ctype, params, depth, body)
        seen += 1
        children: list[bytes] = []
        if depth < max_depth:
            if ctype.startswith("multipart/"):
                boundary = params.get("boundary", "")
                if boundary:
                    children = split_multipart(body, boundary.encode("utf-8", "replace"))
                else:
                    part.notes.append("multipart without boundary")
            elif ctype == "message/rfc822" and part.encoding in ("", "7bit", "8bit", "binary"):
                children = [body]
        elif ctype.startswith(("multipart/", "message/")):
            part.notes.append("nesting limit reached")
        part.children = len(children)
        yield part
        for child in reversed(children):
            stack.append((child, depth + 1))


def split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    """The sub-parts of a multipart body (the preamble and epilogue dropped).

    Lenient: a missing close delimiter ends the last part at the end of the
    body; delimiter lines may have trailing white space (RFC 2046 5.1.1).
    """
    delim = re.compile(rb"(?:^|\r?\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r?\n|$)")
    parts: list[bytes] = []
    start: int | None = None
    for m in delim.finditer(body):
        if start is not None:
            parts.append(body[start : m.start()])
        if m.group(1):  # the close delimiter
            return parts
        nl = body.find(b"\n", m.end())
        start = len(body) if nl < 0 else nl + 1
    if start is not None and start < len(body):
        parts.append(body[start:])
    return parts
