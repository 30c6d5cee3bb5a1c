"""A bundle's manifest: the frozen, typed record stored beside each
``.mbox.gz`` as ``<same name>.json``.

Format 1 (every manifest spamtrap has written) is one JSON object with the
keys ``format, set, key, size, sha256, messages, first_received,
last_received, node`` in that order, written by ``json.dumps`` with
``ensure_ascii=False`` and a trailing newline. :meth:`Manifest.to_json_bytes`
writes exactly those bytes, so a bundle stored before the Manifest type
existed and one stored after have the same manifest bytes.

:meth:`Manifest.from_json` checks every field and raises
:class:`ManifestError` naming the bundle key (when known) and the bad field.
A bundle stored with an index (:mod:`spamtrap.bundle.index`) has two more
keys after those: ``index``, the index's file name (the bundle's name with
``.index.jsonl`` for ``.mbox.gz``), and ``index_sha256``. Both or neither;
a manifest without them (every bundle stored before indexes) stays valid.

Keys that a later format or another tool added are kept, in order, in
``extra`` and written back after the known ones, so reading and writing a
manifest loses nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spamtrap.store import index_key

MANIFEST_FORMAT = 1

# The fields of format 1, in the order they are written.
FIELDS = (
    "format",
    "set",
    "key",
    "size",
    "sha256",
    "messages",
    "first_received",
    "last_received",
    "node",
)
# Optional, after FIELDS: the bundle's index (both or neither).
INDEX_FIELDS = ("index", "index_sha256")

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_UTC_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


class ManifestError(ValueError):
    """A manifest that is not valid JSON or has a bad field. ``key`` is the
    bundle's key when it could be read, ``field`` the offending field (None
    when the document as a whole is bad)."""

    def __init__(self, what: str, key: str | None, field: str | None, problem: str) -> None:
        where = what if key is None else f"{what} of {key}"
        super().__init__(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")
        self.key = key
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Manifest:
    """One bundle's manifest. ``size`` and ``sha256`` are of the
    ``.mbox.gz``; the times are ISO 8601 UTC (``2026-11-22T13:31:15Z``)."""

    set: str
    key: str
    size: int
    sha256: str
    messages: int
    first_received: str
    last_received: str
    node: str
    format: int = MANIFEST_FORMAT
    # The index's file name and sha256; None for a bundle without one.
    index: str | None = None
    index_sha256: str | None = None
    # Keys beyond format 1, kept in their order: (name, JSON value).
    extra: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the written order."""
        doc: dict[str, Any] = {name: getattr(self, name) for name in FIELDS}
        if self.index is not None:
            doc["index"] = self.index
            doc["index_sha256"] = self.index_sha256
        doc.update(self.extra)
        return doc

    def to_json_bytes(self) -> bytes:
        """The stored manifest: the same bytes spamtrap has always written."""
        return (json.dumps(self.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str, what: str = "manifest") -> Manifest:
        """Parse and check a stored manifest. ``what`` names it in errors
        (``"manifest s3://bucket/all/x.json"``)."""
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else data
            doc = json.loads(text)
        except (UnicodeDecodeError, ValueError) as e:
            raise ManifestError(what, None, None, f"not JSON ({e})") from e
        return cls.from_dict(doc, what)

    @classmethod
    def from_dict(cls, doc: object, what: str = "manifest") -> Manifest:
        """Check an already parsed manifest (a JSON object)."""
        if not isinstance(doc, Mapping):
            raise ManifestError(what, None, None, f"expected a JSON object, got {_kind(doc)}")
        raw_key = doc.get("key")
        key = raw_key if isinstance(raw_key, str) and raw_key else None

        def bad(field: str, problem: str) -> ManifestError:
            return ManifestError(what, key, field, problem)

        for name in FIELDS:
            if name not in doc:
                raise bad(name, "missing")
        fmt = doc["format"]
        if not _is_int(fmt):
            raise bad("format", f"expected a number, got {_kind(fmt)}")
        if fmt != MANIFEST_FORMAT:
            raise bad("format", f"{fmt} is not known (this spamtrap reads {MANIFEST_FORMAT})")
        for name in ("set", "key", "node"):
            value = doc[name]
            if not isinstance(value, str) or not value:
                raise bad(name, f"expected a non-empty string, got {_kind(value)}")
        for name in ("size", "messages"):
            value = doc[name]
            if not _is_int(value) or value < 0:
                raise bad(name, f"expected a whole number >= 0, got {_kind(value)}")
        sha256 = doc["sha256"]
        if not isinstance(sha256, str) or _SHA256_RE.fullmatch(sha256) is None:
            raise bad("sha256", f"expected 64 lower-case hex digits, got {_kind(sha256)}")
        for name in ("first_received", "last_received"):
            value = doc[name]
            if not isinstance(value, str) or _UTC_RE.fullmatch(value) is None:
                raise bad(name, f"expected a UTC time (2026-11-22T13:31:15Z), got {_kind(value)}")
        if doc["first_received"] > doc["last_received"]:
            raise bad("first_received", "later than last_received")
        index, index_sha256 = _index_fields(doc, bad)
        return cls(
            format=fmt,
            set=doc["set"],
            key=doc["key"],
            size=doc["size"],
            sha256=sha256,
            messages=doc["messages"],
            first_received=doc["first_received"],
            last_received=doc["last_received"],
            node=doc["node"],
            index=index,
            index_sha256=index_sha256,
            extra=tuple(
                (str(k), v) for k, v in doc.items() if k not in FIELDS and k not in INDEX_FIELDS
            ),
        )


def index_name(key: str) -> str:
    """The file name of bundle ``key``'s index (no set directory)."""
    return index_key(key).rsplit("/", 1)[-1]


def _index_fields(doc: Mapping[str, Any], bad: Any) -> tuple[str | None, str | None]:
    """``index`` and ``index_sha256`` of a checked manifest, or (None, None).
    The name must be the bundle's own: readers fetch and write a file by it."""
    present = [name for name in INDEX_FIELDS if name in doc]
    if not present:
        return None, None
    if len(present) == 1:
        other = INDEX_FIELDS[1 - INDEX_FIELDS.index(present[0])]
        raise bad(other, f"missing (the manifest has {present[0]})")
    name, sha256 = doc["index"], doc["index_sha256"]
    expected = index_name(doc["key"]) if str(doc["key"]).endswith(".mbox.gz") else None
    if name != expected:
        raise bad("index", f"expected {expected!r} for this key, got {_kind(name)}")
    if not isinstance(sha256, str) or _SHA256_RE.fullmatch(sha256) is None:
        raise bad("index_sha256", f"expected 64 lower-case hex digits, got {_kind(sha256)}")
    return name, sha256


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: object) -> str:
    """A bad value for an error message, shortened."""
    text = json.dumps(value, ensure_ascii=True, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Published:
    """What BundleSet announces once a bundle and its manifest are stored:
    the manifest and ``store.url(key)`` (None for a store without public
    URLs, such as the local one: the notifier then uses this node's web
    server, see :func:`spamtrap.store.published.download_url`)."""

    manifest: Manifest
    url: str | None
