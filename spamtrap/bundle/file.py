"""One bundle file: a single-member gzip stream of mbox entries, written
with a running sha256 of the compressed bytes, and its manifest.

A bundle is written under its shard's lock while OPEN; once detached from
its shard it belongs to one thread at a time (see spamtrap.bundle.state).
"""

from __future__ import annotations

import hashlib
import os
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

from spamtrap.bundle.manifest import MANIFEST_FORMAT, Manifest
from spamtrap.bundle.state import BundleState

__all__ = ["MANIFEST_FORMAT", "BundleFile", "BundleWriteError", "Manifest", "manifest_bytes"]


def iso_utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def message_keys(tokens: Iterable[Any], most: int = 8) -> str:
    """The spool keys of some tokens, for a log line."""
    keys = [getattr(t, "key", t) for t in tokens]
    shown = ", ".join(str(k) for k in keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


class BundleWriteError(OSError):
    """Writing a bundle failed; the bundle was dropped (its messages stay
    spooled). The original error is the ``__cause__``."""

    def __init__(self, set_name: str, key: str, tokens: list[Any], earlier: int, cause: Exception):
        super().__init__(
            f"set {set_name}: dropped bundle {key} after a write error ({cause}); "
            f"{len(tokens)} message(s) in the failed write (spool keys {message_keys(tokens)}) "
            f"and {earlier} earlier one(s) stay spooled"
        )
        self.set_name = set_name
        self.key = key
        self.tokens = tokens


def failure_reason(error: BaseException) -> str:
    """A short reason for health: an OSError's strerror ("No space left on
    device"), else the message."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class BundleFile:
    """One bundle file. Written under its shard's lock while open; once
    detached from its shard it belongs to the finaliser alone."""

    def __init__(self, key: str, part_path: str, opened_at: float) -> None:
        self.key = key
        self.part_path = part_path
        self.opened_at = opened_at
        self.file = open(part_path, "xb")  # stays open until seal()
        self.compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: gzip wrapper
        self.sha256 = hashlib.sha256()
        self.size = 0  # compressed bytes written
        self.messages = 0
        self.first_received = float("inf")
        self.last_received = float("-inf")
        self.tokens: list[Any] = []
        self.state = BundleState.OPEN  # changed by Lifecycle.move only
        # Reactor-only bookkeeping.
        self.rotating = False  # a detach is queued for it
        self.attempts = 0
        self.doc: Manifest | None = None  # the manifest, built once sealed

    def _emit(self, data: bytes) -> None:
        if data:
            self.file.write(data)
            self.sha256.update(data)
            self.size += len(data)

    def write(self, entry: bytes, received_at: float, token: Any) -> None:
        self.write_many([(entry, received_at, token)])

    def write_many(self, items: Sequence[tuple[bytes, float, Any]]) -> None:
        data = items[0][0] if len(items) == 1 else b"".join([e for e, _, _ in items])
        self._emit(self.compressor.compress(data))
        self.messages += len(items)
        for _, received_at, token in items:
            self.tokens.append(token)
            # Workers finish out of order: keep the covered period, not the order.
            if received_at < self.first_received:
                self.first_received = received_at
            if received_at > self.last_received:
                self.last_received = received_at

    def push(self) -> None:
        """Blocking: write out everything compressed so far (a zlib sync
        flush keeps the gzip stream valid), so that a disk that failed
        writes proves it takes bytes again; raises as a write would."""
        self._emit(self.compressor.flush(zlib.Z_SYNC_FLUSH))
        self.file.flush()

    def seal(self) -> None:
        """Blocking: write the gzip trailer and make the file durable."""
        self._emit(self.compressor.flush())
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def discard(self) -> None:
        """Blocking: close and delete a bundle that cannot be completed."""
        try:
            self.file.close()
        finally:
            unlink_quietly(self.part_path)

    def manifest_doc(self, set_name: str, node: str) -> Manifest:
        return Manifest(
            format=MANIFEST_FORMAT,
            set=set_name,
            key=self.key,
            size=self.size,
            sha256=self.sha256.hexdigest(),
            messages=self.messages,
            first_received=iso_utc(self.first_received),
            last_received=iso_utc(self.last_received),
            node=node,
        )


def manifest_bytes(doc: Manifest) -> bytes:
    """The stored manifest bytes (:meth:`Manifest.to_json_bytes`)."""
    return doc.to_json_bytes()
