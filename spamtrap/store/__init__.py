"""Where finished bundles go: the key scheme, what a download is
(``LocalFile``, ``Redirect``), and ``open_store`` (the Store interface
itself is ``spamtrap.interfaces.Store``).

A key is ``<set>/<UTC ISO-8601 to seconds>.<node>.<random base62>.mbox.gz``;
its manifest sits beside it under the same name ending in ``.json``, and its
index (:mod:`spamtrap.bundle.index`) under the name ending in
``.index.jsonl``. Listing
by prefix (``all/2026-11-22T13``) finds a time range, and the random part
makes the key a secret: objects are public to whoever knows the key.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import unquote, urlsplit

from spamtrap.interfaces import Store as Store  # the interface lives with the other seams
from spamtrap.message import random_base62

if TYPE_CHECKING:
    from twisted.python.threadpool import ThreadPool

    from spamtrap.config import StoreConfig
    from spamtrap.interfaces import NetworkReactor
    from spamtrap.metrics import Metrics

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
SET_NAME_RE = re.compile(NAME_PATTERN)
BUNDLE_SUFFIX = ".mbox.gz"
MANIFEST_SUFFIX = ".json"
INDEX_SUFFIX = ".index.jsonl"
# A whole key: set, time, node, random part, and which of the three it is.
KEY_RE = re.compile(
    rf"(?P<set>{NAME_PATTERN})/"
    r"(?P<time>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})\."
    rf"(?P<node>{NAME_PATTERN})\."
    r"(?P<random>[0-9A-Za-z]{16,})"
    r"(?P<suffix>\.mbox\.gz|\.json|\.index\.jsonl)"
)


class StoreConfigError(Exception):
    """The store URL cannot be used."""


class StoreClosedError(Exception):
    """The store was closed (the service is stopping): nothing more is done."""


@dataclass(frozen=True)
class LocalFile:
    """A download the web layer streams itself: a regular file, symlinks
    resolved, that the store has checked lies inside its own directory."""

    path: str


@dataclass(frozen=True)
class Redirect:
    """A download served elsewhere (S3): the web layer sends the client on."""

    url: str


# What ``Store.open_download`` answers; None means "no such bundle".
Download: TypeAlias = LocalFile | Redirect | None


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename, a new or deleted file) durable.
    The store, its retention and ``spamtrap pull`` all place files this way."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def valid_set_name(name: str) -> bool:
    return SET_NAME_RE.fullmatch(name) is not None


def bundle_key(set_name: str, opened_at: float, node: str) -> str:
    """A new, unguessable key for a bundle of ``set_name`` opened at ``opened_at``."""
    if not valid_set_name(set_name):
        raise ValueError(f"invalid set name {set_name!r}")
    if not valid_set_name(node):
        raise ValueError(f"invalid node name {node!r}")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(opened_at))
    return f"{set_name}/{stamp}.{node}.{random_base62(16)}{BUNDLE_SUFFIX}"


def manifest_key(key: str) -> str:
    """The manifest's key for a bundle key."""
    if not key.endswith(BUNDLE_SUFFIX):
        raise ValueError(f"not a bundle key: {key!r}")
    return key[: -len(BUNDLE_SUFFIX)] + MANIFEST_SUFFIX


def index_key(key: str) -> str:
    """The index's key for a bundle key."""
    if not key.endswith(BUNDLE_SUFFIX):
        raise ValueError(f"not a bundle key: {key!r}")
    return key[: -len(BUNDLE_SUFFIX)] + INDEX_SUFFIX


def served_by_web(url: str | None) -> bool:
    """Whether this node's web server serves the files of the store that
    ``url`` (``store.url``) opens: that store class's ``served_by_web``,
    for code that has the config rather than the store."""
    scheme = urlsplit(url or "").scheme
    if scheme in ("", "file"):
        from spamtrap.store.local import LocalStore

        return LocalStore.served_by_web
    if scheme == "s3":
        from spamtrap.store.s3 import S3Store

        return S3Store.served_by_web
    return False  # no store at all: the config check reports the URL


def open_store(
    url: str | None,
    data_dir: str,
    reactor: NetworkReactor,
    pool: ThreadPool,
    config: StoreConfig | None = None,
    metrics: Metrics | None = None,
) -> Store:
    """The store for ``--store``/``store.url``: None means DATA/bundles.
    ``config`` holds the S3 settings (endpoint, region, uploads) and the
    local store's retention, whose deletions ``metrics`` counts."""
    from spamtrap.store.local import LocalStore

    retention = config.retention if config is not None else None
    if url is None:
        return LocalStore(os.path.join(data_dir, "bundles"), reactor, pool, retention, metrics)
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise StoreConfigError(f"store URL {url!r}: use file:///absolute/path (three slashes)")
        if parts.query or parts.fragment:
            raise StoreConfigError(f"store URL {url!r}: a file URL takes no query or fragment")
        return LocalStore(unquote(parts.path), reactor, pool, retention, metrics)
    if parts.scheme == "s3":
        if retention is not None and (retention.max_age or retention.max_bytes):
            raise StoreConfigError(
                f"store URL {url!r}: store.retention is for a local store; an S3 bucket "
                "expires objects by its lifecycle rules (see docs/s3.md)"
            )
        from spamtrap.store.s3 import S3Store

        return S3Store.from_url(url, reactor, pool, config)
    raise StoreConfigError(
        f"store URL {url!r}: unsupported scheme {parts.scheme!r} "
        "(use file:///path or s3://bucket/prefix)"
    )
