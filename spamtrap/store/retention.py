"""Retention for the local store: ``store.retention.max_age`` and ``max_bytes``.

The store's disk use is the bytes of its bundles, their indexes and their
manifests. Before a bundle is placed, the oldest bundles are deleted until
it fits under ``max_bytes``; bundles older than ``max_age`` go at each put
and on a timer. So the bound holds at every moment, not only after a sweep.
A bundle that alone is bigger than ``max_bytes`` cannot be stored within
the bound: it is refused (:class:`RetentionError`), its messages stay in
the spool, and the store retries it like any failed put.

"Oldest" is by the time in the key (when the bundle was opened), then the
key. A bundle goes with its manifest first, so that no reader ever sees a
manifest whose bundle is gone, then the bundle, then its index. Leftovers
of one (a bundle or index whose manifest was never placed, after a crash)
are grouped by name and go the same way.

Everything here blocks (listing, stat, unlink, fsync): it runs in the
store's own pool, under the store's lock (see LocalStore), so two puts never
both count the same free space. Every deletion is counted in
``spamtrap_retention_deleted_total{reason}`` (``age`` or ``bytes``) and
its bytes in ``spamtrap_retention_deleted_bytes_total{reason}``;
``spamtrap_store_bytes`` is the disk use after each put or sweep.

S3 has no such thing here: a bucket's lifecycle rules expire objects
(docs/s3.md).
"""

from __future__ import annotations

import calendar
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from spamtrap.store import BUNDLE_SUFFIX, INDEX_SUFFIX, KEY_RE, MANIFEST_SUFFIX, fsync_dir

log = Logger()

# A bundle's files in the order they are deleted: the commit marker first.
_DELETE_ORDER = (MANIFEST_SUFFIX, BUNDLE_SUFFIX, INDEX_SUFFIX)
SWEEP_INTERVAL = 60.0  # seconds between age sweeps when nothing is stored


class RetentionError(OSError):
    """A bundle cannot be stored within ``store.retention.max_bytes``."""


@dataclass
class StoredBundle:
    """One bundle's files in the store, found by name."""

    stem: str  # "<set>/<name>" without the suffix
    opened: float  # the time in its key
    files: dict[str, int] = field(default_factory=dict)  # suffix -> bytes

    @property
    def size(self) -> int:
        return sum(self.files.values())


def _opened(stamp: str) -> float:
    return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")))


def scan(root: str) -> list[StoredBundle]:
    """Blocking: the store's bundles under ``root``, oldest first. Only
    names that are keys count; temporary files of a put in progress do not."""
    found: dict[str, StoredBundle] = {}
    try:
        sets = list(os.scandir(root))
    except FileNotFoundError:
        return []
    for set_dir in sets:
        if not set_dir.is_dir(follow_symlinks=False):
            continue
        with os.scandir(set_dir.path) as entries:
            for entry in entries:
                match = KEY_RE.fullmatch(f"{set_dir.name}/{entry.name}")
                if match is None or not entry.is_file(follow_symlinks=False):
                    continue
                suffix = match.group("suffix")
                stem = f"{set_dir.name}/{entry.name[: -len(suffix)]}"
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
                bundle = found.get(stem)
                if bundle is None:
                    bundle = found[stem] = StoredBundle(stem, _opened(match.group("time")))
                bundle.files[suffix] = size
    return sorted(found.values(), key=lambda b: (b.opened, b.stem))


class Retention:
    """Applies ``store.retention`` to the store at ``root``. ``clock``
    gives the time (``seconds()``); ``metrics`` may be None."""

    def __init__(
        self,
        root: str,
        max_age: float | None,
        max_bytes: int | None,
        clock: Any,
        metrics: Any = None,
    ) -> None:
        self.root = root
        self.max_age = max_age
        self.max_bytes = max_bytes
        self._clock = clock
        self._deleted: Callable[[str, int], None] = lambda reason, size: None
        self._used_gauge = None
        if metrics is not None:
            bundles, deleted_bytes = metrics.retention_deleted, metrics.retention_deleted_bytes
            self._used_gauge = metrics.store_bytes

            def count(reason: str, size: int) -> None:
                bundles.labels(reason=reason).inc()
                deleted_bytes.labels(reason=reason).inc(size)

            self._deleted = count

    @property
    def active(self) -> bool:
        return self.max_age is not None or self.max_bytes is not None

    def make_room(self, key: str, incoming: int) -> None:
        """Blocking, before bundle ``key`` (``incoming`` bytes with its index
        and manifest) is placed: delete what is too old, then the oldest
        until it fits. RetentionError if it cannot fit at all."""
        if self.max_bytes is not None and incoming > self.max_bytes:
            raise RetentionError(
                f"bundle {key} with its index and manifest is {incoming} bytes, more than "
                f"store.retention.max_bytes ({self.max_bytes}): not stored (raise the "
                "bound or lower the set's rotate.max_bytes)"
            )
        self._trim(self._expire(scan(self.root)), incoming)

    def settle(self, key: str) -> None:
        """Blocking, after bundle ``key`` was placed: check the bound again
        (files may have come from elsewhere) without touching ``key``."""
        stem = key[: -len(BUNDLE_SUFFIX)]
        bundles = self._expire(scan(self.root))
        placed = [b for b in bundles if b.stem == stem]
        rest = [b for b in bundles if b.stem != stem]
        self._trim(rest, sum(b.size for b in placed))

    def _trim(self, bundles: list[StoredBundle], incoming: int) -> None:
        """Delete the oldest of ``bundles`` until they and ``incoming``
        bytes fit under ``max_bytes``."""
        used = sum(b.size for b in bundles)
        if self.max_bytes is not None:
            while bundles and used + incoming > self.max_bytes:
                oldest = bundles.pop(0)
                self._delete(oldest, "bytes")
                used -= oldest.size
        self._show(used + incoming)

    def sweep(self) -> int:
        """Blocking: delete the bundles older than ``max_age``; how many."""
        bundles = scan(self.root)
        kept = self._expire(bundles)
        self._show(sum(b.size for b in kept))
        return len(bundles) - len(kept)

    def _expire(self, bundles: list[StoredBundle]) -> list[StoredBundle]:
        """Delete the bundles past ``max_age``; the rest, oldest first."""
        if self.max_age is None:
            return bundles
        cutoff = self._clock.seconds() - self.max_age
        kept = []
        for bundle in bundles:
            if bundle.opened <= cutoff:
                self._delete(bundle, "age")
            else:
                kept.append(bundle)
        return kept

    def _delete(self, bundle: StoredBundle, reason: str) -> None:
        directory = os.path.join(self.root, bundle.stem.split("/", 1)[0])
        for suffix in _DELETE_ORDER:
            if suffix in bundle.files:
                try:
                    os.unlink(os.path.join(self.root, bundle.stem + suffix))
                except FileNotFoundError:
                    pass
            if suffix == MANIFEST_SUFFIX:
                # The manifest's removal is durable before the bundle goes.
                fsync_dir(directory)
        fsync_dir(directory)
        self._deleted(reason, bundle.size)
        log.info(
            "store retention: deleted {stem} ({size} bytes, {reason})",
            stem=bundle.stem,
            size=bundle.size,
            reason="older than max_age" if reason == "age" else "over max_bytes",
        )

    def _show(self, used: int) -> None:
        if self._used_gauge is not None:
            self._used_gauge.set(used)
