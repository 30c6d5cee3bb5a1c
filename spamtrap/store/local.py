"""The local directory store: ``ROOT/<set>/<name>.mbox.gz`` plus its manifest.

Every file appears atomically (temp file in the same directory, fsync,
rename, fsync of the directory), the object and its index before the
manifest, so a manifest on disk always means a complete bundle beside it.
All of it, and the listings, run in the store's own pool; downloads are
streamed by the web layer from the ``LocalFile`` that ``open_download``
checked.

With ``store.retention`` (:mod:`spamtrap.store.retention`) each put first
makes room and checks the bound again once placed, under one lock, and a
timer sweeps out bundles past ``max_age``; all of it in the same pool.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from spamtrap.bundle.manifest import Manifest
from spamtrap.interfaces import ReactorFromThreads, as_reactor_from_threads
from spamtrap.message import random_base62
from spamtrap.store import (
    KEY_RE,
    MANIFEST_SUFFIX,
    Download,
    LocalFile,
    StoreClosedError,
    fsync_dir,
    index_key,
    manifest_key,
    valid_set_name,
)
from spamtrap.store.retention import SWEEP_INTERVAL, Retention

if TYPE_CHECKING:
    from spamtrap.config import RetentionConfig
    from spamtrap.metrics import Metrics

log = Logger()

_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")


def _temp_name(target: str) -> str:
    # Hidden and with a suffix no key can have, so listings never see it.
    head, tail = os.path.split(target)
    return os.path.join(head, f".{tail}.{random_base62(8)}.tmp")


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    # This node's web server streams the files (open_download: LocalFile).
    served_by_web = True

    def __init__(
        self,
        root: str,
        reactor: ReactorFromThreads,
        pool: ThreadPool,
        retention: RetentionConfig | None = None,
        metrics: Metrics | None = None,
        clock: Any = None,
    ) -> None:
        """``retention`` None or empty keeps every bundle; ``clock``
        (default: the reactor) times its sweeps and ages."""
        self.root = os.path.abspath(root)
        self._reactor = as_reactor_from_threads(reactor)
        self._pool = pool
        self._closed = False
        self.retention: Retention | None = None
        self._sweeper: LoopingCall | None = None
        # One put (or sweep) at a time counts and frees space.
        self._lock = threading.Lock()
        if retention is not None and (retention.max_age or retention.max_bytes):
            clock = clock if clock is not None else reactor
            self.retention = Retention(
                self.root, retention.max_age, retention.max_bytes, clock, metrics
            )
            if retention.max_age is not None:
                self._sweeper = LoopingCall(self._sweep)
                self._sweeper.clock = clock
                self._sweeper.start(SWEEP_INTERVAL, now=True)

    def _sweep(self) -> None:
        # A LoopingCall stops for good when its function raises: never here.
        if self._closed:
            return
        d = self._in_pool(self._sweep_locked)
        d.addErrback(
            lambda f: log.failure("store retention: sweep of {root} failed", f, root=self.root)
        )

    def _sweep_locked(self) -> int:
        assert self.retention is not None
        with self._lock:
            return self.retention.sweep()

    def _in_pool(self, f: Callable[[*_Args], _T], *args: *_Args) -> Deferred[_T]:
        """``f(*args)`` in the store's pool; StoreClosedError once closed."""
        if self._closed:
            return fail(StoreClosedError(f"{self.describe()} is closed"))
        try:
            return deferToThreadPool(self._reactor, self._pool, f, *args)
        except Exception:  # noqa: BLE001 - e.g. a stopped pool: the caller's errback has it
            return fail()

    def close(self) -> Deferred[None]:
        """Refuse new work and stop the pool; stopping waits for the writes
        already running, which must not be cut off between fsyncs."""
        self._closed = True
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if not getattr(self._pool, "joined", True):
            self._pool.stop()
        return succeed(None)

    def describe(self) -> str:
        return f"local directory {self.root}"

    def url(self, key: str) -> str | None:
        # Served by spamtrap's own web layer, which knows its public URL.
        return None

    def put(self, key: str, path: str, manifest: bytes, index: str | None = None) -> Deferred[None]:
        return self._in_pool(self._put, key, path, manifest, index)

    def _put(self, key: str, path: str, manifest: bytes, index: str | None) -> None:
        if KEY_RE.fullmatch(key) is None or not key.endswith(".mbox.gz"):
            raise ValueError(f"not a bundle key: {key!r}")
        target = os.path.join(self.root, key)
        set_dir = os.path.dirname(target)
        if not os.path.isdir(set_dir):
            os.makedirs(set_dir, exist_ok=True)
            fsync_dir(self.root)  # make the new set directory itself durable
        if self.retention is None:
            self._place(key, path, manifest, index)
            return
        with self._lock:
            incoming = os.path.getsize(path) + len(manifest)
            incoming += os.path.getsize(index) if index is not None else 0
            self.retention.make_room(key, incoming)
            self._place(key, path, manifest, index)
            self.retention.settle(key)

    def _place(self, key: str, path: str, manifest: bytes, index: str | None) -> None:
        target = os.path.join(self.root, key)
        self._place_copy(path, target)
        if index is not None:
            self._place_copy(index, os.path.join(self.root, index_key(key)))
        self._place_bytes(manifest, os.path.join(self.root, manifest_key(key)))
        fsync_dir(os.path.dirname(target))

    def _place_copy(self, source: str, target: str) -> None:
        tmp = _temp_name(target)
        try:
            # A hard link costs nothing on the same filesystem; the caller
            # deletes its own name afterwards, which leaves ours intact.
            os.link(source, tmp)
        except OSError:
            with open(source, "rb") as src, open(tmp, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        try:
            _fsync_file(tmp)
            os.replace(tmp, target)
        except BaseException:
            _remove_quietly(tmp)
            raise
        # The object must be durable under its name before the manifest
        # (the commit marker) can appear.
        fsync_dir(os.path.dirname(target))

    def _place_bytes(self, data: bytes, target: str) -> None:
        tmp = _temp_name(target)
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            _remove_quietly(tmp)
            raise

    def path_for(self, key: str) -> str | None:
        """The file for ``key``, or None if the key is not a stored bundle or
        manifest. ``key`` is taken literally: percent-decoding is the web
        layer's job, and anything that is not exactly ``set/name`` with a
        valid name is refused (``..``, absolute paths, backslashes, NUL).
        The answer is a regular file really inside the root, symlinks
        resolved: a symlinked set directory or bundle must not lead out."""
        if KEY_RE.fullmatch(key) is None:
            return None
        set_name, name = key.split("/")
        real = os.path.realpath(os.path.join(self.root, set_name, name))
        root = os.path.realpath(self.root)
        if os.path.commonpath([real, root]) != root:
            return None
        return real if os.path.isfile(real) else None

    def open_download(self, key: str) -> Download:
        path = self.path_for(key)
        return LocalFile(path) if path is not None else None

    def list_manifests(self, set_name: str) -> Deferred[list[Manifest]]:
        """``read_manifests`` in the store's pool (it checks the name)."""
        return self._in_pool(self.read_manifests, set_name)

    def read_manifests(self, set_name: str) -> list[Manifest]:
        """Blocking: the checked manifests of a set, newest first (by key).

        Unreadable, malformed or invalid manifests are skipped: a listing
        must not fail because one file is damaged."""
        if not valid_set_name(set_name):
            raise ValueError(f"invalid set name {set_name!r}")
        directory = os.path.join(self.root, set_name)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        keys = sorted(
            (f"{set_name}/{n}" for n in names if n.endswith(MANIFEST_SUFFIX)), reverse=True
        )
        result = []
        for key in keys:
            if KEY_RE.fullmatch(key) is None:
                continue
            try:
                with open(os.path.join(self.root, key), "rb") as f:
                    # ManifestError is a ValueError.
                    result.append(Manifest.from_json(f.read(), f"manifest {key}"))
            except (OSError, ValueError):
                continue
        return result


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
