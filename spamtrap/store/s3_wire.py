"""What the S3 store says and hears, without any I/O: its error, its
configuration (the store URL, the endpoint), the S3 XML it reads and
writes, request queries, and the piece of a file a request sends (read in
the pool, just before signing). spamtrap.store.s3 is the store itself.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET  # noqa: N817 - the usual name
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit
from xml.sax.saxutils import escape

from twisted.internet.defer import CancelledError

from spamtrap.config import StoreConfig
from spamtrap.store import StoreConfigError

DEFAULT_REGION = "us-east-1"
# Names S3-compatible servers accept; AWS is stricter (lowercase, no "_").
BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")


class S3Error(Exception):
    """An S3 request failed. ``status`` is 0 when no HTTP answer came back;
    ``code`` is S3's error code (``SignatureDoesNotMatch``, ``NoSuchBucket``,
    ...) or a name for the transport failure."""

    def __init__(self, status: int, code: str, message: str, key: str, operation: str) -> None:
        super().__init__(status, code, message, key, operation)
        self.status = status
        self.code = code
        self.message = message
        self.key = key
        self.operation = operation

    def __str__(self) -> str:
        answer = f"HTTP {self.status}" if self.status else "no answer"
        return f"{self.code} for key {self.key} ({self.operation}, {answer}): {self.message}"


# -- configuration -------------------------------------------------------------


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or BUCKET_RE.fullmatch(parts.netloc) is None:
        raise StoreConfigError(f"store URL {url!r}: use s3://bucket or s3://bucket/prefix")
    if parts.query or parts.fragment:
        raise StoreConfigError(f"store URL {url!r}: an S3 URL takes no query or fragment")
    prefix = parts.path.strip("/")
    if prefix and any(seg in ("", ".", "..") for seg in prefix.split("/")):
        raise StoreConfigError(f"store URL {url!r}: empty, '.' or '..' prefix segments")
    return parts.netloc, prefix


def resolve_endpoint(config: StoreConfig, environ: Mapping[str, str]) -> str | None:
    """The configured endpoint, else the AWS environment's; None means AWS
    itself (its URL depends on the region, known only after start)."""
    candidates = [
        ("store.endpoint", config.endpoint),
        ("AWS_ENDPOINT_URL_S3", environ.get("AWS_ENDPOINT_URL_S3")),
        ("AWS_ENDPOINT_URL", environ.get("AWS_ENDPOINT_URL")),
    ]
    for source, value in candidates:
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise StoreConfigError(f"{source} {value!r}: use http(s)://host[:port]")
            if parts.query or parts.fragment:
                raise StoreConfigError(f"{source} {value!r}: takes no query or fragment")
            return value.rstrip("/")
    return None


def aws_endpoint(region: str) -> str:
    return f"https://s3.{region}.amazonaws.com"


@dataclass(frozen=True)
class FileRange:
    """A piece of a local file, read in the pool just before it is sent."""

    path: str
    offset: int
    length: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.length)
        if len(data) != self.length:
            raise OSError(f"{self.path}: short read at {self.offset} ({len(data)}/{self.length})")
        return data


Body = bytes | FileRange


# -- XML -----------------------------------------------------------------------


def local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]  # S3 answers in its namespace; some servers do not


def child_text(element: ET.Element, name: str) -> str | None:
    for child in element:
        if local_name(child.tag) == name:
            return child.text or ""
    return None


def parse_xml(body: bytes) -> ET.Element | None:
    try:
        return ET.fromstring(body)  # noqa: S314 - the configured server's answer
    except ET.ParseError:
        return None


def parse_error(body: bytes) -> tuple[str | None, str]:
    """S3's ``<Error><Code/><Message/></Error>``: (code, message)."""
    root = parse_xml(body) if body else None
    if root is None or local_name(root.tag) != "Error":
        text = body[:200].decode("utf-8", "replace").strip()
        return None, text or "(no error body)"
    return child_text(root, "Code"), child_text(root, "Message") or ""


def complete_body(etags: dict[int, str]) -> bytes:
    parts = "".join(
        f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(etags[n])}</ETag></Part>"
        for n in sorted(etags)
    )
    return f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()


def query_string(params: Mapping[str, str | None]) -> str:
    # Sorted and RFC 3986-encoded, as SigV4 canonicalises it anyway.
    return "&".join(
        quote(k, safe="") if v is None else f"{quote(k, safe='')}={quote(v, safe='')}"
        for k, v in sorted(params.items())
    )


def transport_error(error: BaseException) -> tuple[str, str]:
    """A name and a readable reason for a request that got no answer."""
    if isinstance(error, CancelledError):
        return "Timeout", "no answer in time"
    reasons = getattr(error, "reasons", None)  # ResponseFailed and friends
    if reasons:
        return type(error).__name__, "; ".join(r.getErrorMessage() for r in reasons)
    return type(error).__name__, str(error) or repr(error)
