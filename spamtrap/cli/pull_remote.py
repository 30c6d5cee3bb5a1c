"""spamtrap pull: what a source lists (remote bundles and manifests, the
entries it cannot follow) and what every source provides."""

from __future__ import annotations

import json
import re
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol

from spamtrap.store import BUNDLE_SUFFIX, INDEX_SUFFIX, KEY_RE, MANIFEST_SUFFIX

SHA256 = re.compile(r"[0-9a-f]{64}")
CHUNK = 64 * 1024  # bytes per read or write of a bundle
# The time a bundle key starts with, and a cursor is.
KEY_TIME = "%Y-%m-%dT%H:%M:%S"


class PullError(Exception):
    """A bundle or a listing failed; the message says which and why."""


class ResumeRefusedError(PullError):
    """The source cannot resume from the requested offset."""


@dataclass
class Remote:
    """A bundle at a source."""

    key: str  # "<set>/<name>.mbox.gz"
    location: str  # where the source fetches it: a URL or an S3 object key
    size: int | None = None
    sha256: str | None = None
    manifest_location: str | None = None  # a notice's Manifest-URL, if any
    # The bundle's index (spamtrap.bundle.index): its sha256 from the
    # manifest or feed entry (None: the bundle has none, or it is not
    # known), and where to fetch it if not beside the bundle.
    index_sha256: str | None = None
    index_location: str | None = None

    @property
    def set_name(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def cursor(self) -> str:
        return self.key.split("/", 1)[1][: -len(BUNDLE_SUFFIX)]


@dataclass(frozen=True)
class RemoteManifest:
    """What pull takes from a manifest another node or store sent: the
    bundle's key, size and sha256. Checked here, not by
    ``spamtrap.bundle.manifest.Manifest``: the remote may be an older spamtrap or
    another tool, so fields pull does not use are not required, and an
    upper-case sha256 is accepted."""

    key: str
    size: int
    sha256: str  # lower case
    index_sha256: str | None = None  # lower case; None: no index


def remote_manifest(data: bytes, remote: Remote) -> RemoteManifest:
    """Parse a remote's manifest of ``remote``; PullError naming the remote
    key and the bad field otherwise."""
    doc = parse_json(data, f"manifest of {remote.key}")
    raw_key = doc.get("key")
    if bundle_key(str(raw_key or "")) != remote.key:
        raise PullError(f"{remote.key}: the manifest is for {raw_key!r}")
    size = doc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise PullError(f"{remote.key}: manifest field size: {size!r} is not a number of bytes")
    sha = doc.get("sha256")
    if not isinstance(sha, str) or SHA256.fullmatch(sha.lower()) is None:
        raise PullError(f"{remote.key}: manifest field sha256: {sha!r} is not 64 hex digits")
    return RemoteManifest(remote.key, size, sha.lower(), manifest_index(doc, remote.key))


def manifest_index(doc: dict[str, Any], key: str) -> str | None:
    """The index sha256 a manifest (or a feed entry, a manifest with a URL)
    names, lower case; None when it names no index. The index's name must
    be the bundle's own: it becomes a file name here."""
    name, sha = doc.get("index"), doc.get("index_sha256")
    if name is None and sha is None:
        return None
    expected = index_name(key.split("/", 1)[1])
    if name != expected:
        raise PullError(f"{key}: manifest field index: {name!r} is not {expected!r}")
    if not isinstance(sha, str) or SHA256.fullmatch(sha.lower()) is None:
        raise PullError(f"{key}: manifest field index_sha256: {sha!r} is not 64 hex digits")
    return sha.lower()


@dataclass
class Problem:
    """An entry of a listing (a notice, a feed entry) that cannot be
    followed; ``key`` is the bundle it names, when that key is valid."""

    text: str
    key: str | None = None


class Source(Protocol):
    def listing(self, set_name: str, since: str | None) -> tuple[list[Remote], list[Problem]]:
        """The set's bundles after ``since`` (a cursor), oldest first (a
        source without cursors may return older ones too), and the entries
        that name a bundle of the set but cannot be followed."""
        ...

    def manifest(self, remote: Remote) -> RemoteManifest:
        """The bundle's manifest (see :func:`remote_manifest`)."""
        ...

    def fetch(self, remote: Remote, offset: int) -> tuple[Generator[bytes, None, None], int]:
        """The bundle's bytes from ``offset`` on, as chunks, and the offset
        they really start at (0 when the source ignored the range)."""
        ...

    def fetch_index(self, remote: Remote) -> bytes:
        """The bundle's whole index (a few hundred bytes per message)."""
        ...


def bundle_key(text: str) -> str | None:
    """``<set>/<name>.mbox.gz`` from a key that may carry a store prefix;
    None if it is not a bundle key (a notice's key is untrusted input that
    becomes a file name: only exact keys pass)."""
    tail = "/".join(text.strip().split("/")[-2:])
    if KEY_RE.fullmatch(tail) is None or not tail.endswith(BUNDLE_SUFFIX):
        return None
    return tail


def manifest_name(name: str) -> str:
    return name[: -len(BUNDLE_SUFFIX)] + MANIFEST_SUFFIX


def index_name(name: str) -> str:
    """A bundle's (or bundle URL's, object key's) index beside it."""
    return name[: -len(BUNDLE_SUFFIX)] + INDEX_SUFFIX


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise PullError(f"{what}: not JSON ({e})")
    if not isinstance(doc, dict):
        raise PullError(f"{what}: not a JSON object")
    return doc
