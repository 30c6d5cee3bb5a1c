"""One bundle file: a single-member gzip stream of mbox entries, written
with a running sha256 of the compressed bytes, its index and its manifest.

The index (:mod:`spamtrap.bundle.index`) is written beside the ``.part``
as ``<name>.index.jsonl.part``, one line per entry as the entry is written:
only here is the entry's offset in the uncompressed stream known. It is
flushed and fsynced with the bundle at seal, and its sha256 goes into the
manifest.

A bundle is written under its shard's lock while OPEN; once detached from
its shard it belongs to one thread at a time (see spamtrap.bundle.state).
"""

from __future__ import annotations

import hashlib
import os
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

from spamtrap.bundle.index import index_line
from spamtrap.bundle.manifest import MANIFEST_FORMAT, Manifest, index_name
from spamtrap.bundle.state import BundleState

__all__ = [
    "MANIFEST_FORMAT",
    "BundleFile",
    "BundleWriteError",
    "Item",
    "Manifest",
    "manifest_bytes",
]

# What a bundle is given per message: ``(entry, received_at, token)``, or
# with the message's encoded index fields as a fourth element, and its
# campaign id as a fifth (for per_campaign_cap, spamtrap.bundle.campaign_cap).
Item: TypeAlias = (
    tuple[bytes, float, Any]
    | tuple[bytes, float, Any, bytes | None]
    | tuple[bytes, float, Any, bytes | None, str | None]
)


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
        self.index_path = os.path.join(os.path.dirname(part_path), index_name(key) + ".part")
        self.opened_at = opened_at
        self.file = open(part_path, "xb")  # stays open until seal()
        try:
            self.index_file = open(self.index_path, "xb")
        except BaseException:
            self.file.close()
            unlink_quietly(part_path)
            raise
        self.index_sha256 = hashlib.sha256()
        self.raw_size = 0  # uncompressed bytes: where the next entry starts
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

    def write(
        self, entry: bytes, received_at: float, token: Any, fields: bytes | None = None
    ) -> None:
        self.write_many([(entry, received_at, token, fields)])

    def write_many(self, items: Sequence[Item]) -> None:
        """Write ``(entry, received_at, token)`` items, or ``(entry,
        received_at, token, fields)`` with the message's encoded index
        fields (:func:`spamtrap.bundle.index.encode_fields`)."""
        data = items[0][0] if len(items) == 1 else b"".join([item[0] for item in items])
        lines = []
        offset = self.raw_size
        for item in items:
            length = len(item[0])
            lines.append(index_line(offset, length, item[3] if len(item) > 3 else None))
            offset += length
        index = b"".join(lines)
        self._emit(self.compressor.compress(data))
        self.index_file.write(index)
        self.index_sha256.update(index)
        self.raw_size = offset
        self.messages += len(items)
        for item in items:
            received_at, token = item[1], item[2]
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
        self.index_file.flush()

    def seal(self) -> None:
        """Blocking: write the gzip trailer and make the file and its
        index durable."""
        self._emit(self.compressor.flush())
        for f in (self.file, self.index_file):
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def discard(self) -> None:
        """Blocking: close and delete a bundle that cannot be completed."""
        try:
            self.file.close()
        finally:
            try:
                self.index_file.close()
            finally:
                self.remove_parts()

    def remove_parts(self) -> None:
        """Blocking: delete the bundle's and its index's working files."""
        unlink_quietly(self.part_path)
        unlink_quietly(self.index_path)

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
            index=index_name(self.key),
            index_sha256=self.index_sha256.hexdigest(),
        )


def manifest_bytes(doc: Manifest) -> bytes:
    """The stored manifest bytes (:meth:`Manifest.to_json_bytes`)."""
    return doc.to_json_bytes()
