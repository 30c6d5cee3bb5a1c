"""The bundle lifecycle of one output set: write, rotate, finalise, store.

Each set keeps ``shards`` bundles open; every message goes to one of them at
random, so one period yields several files instead of one file full of a
single dictionary attack. A bundle is a single-member gzip file written to
``WORK/<set>/<name>.part`` with a running sha256 of the compressed bytes. It
uses ``zlib.compressobj`` with the gzip wrapper (wbits 31) rather than
GzipFile: deflate dominates either way (measured within a few per cent,
compressobj ahead), and compressobj hands us the compressed bytes to hash
and count without a wrapping file object.

A bundle is rotated when it reaches ``rotate.max_bytes`` compressed bytes
(as written so far: deflate holds back a little), ``rotate.max_messages`` or
``rotate.max_age``. Rotation seals it (gzip trailer, fsync) in the thread
pool; then, in the reactor, the manifest is built and the store is asked to
put the object and then the manifest. Only after that are the messages'
tokens handed to ``on_stored`` (the caller acknowledges the spool), so a
crash at any point leaves the messages in the spool to be replayed: leftover
``.part`` files are deleted at start. Failed stores are retried with backoff
until they succeed.

Threads: ``add`` runs in worker threads and takes the lock of the shard it
writes to. Everything else runs in the reactor; blocking file work goes to
the pool.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from spamtrap.config import SetConfig
from spamtrap.metrics import Metrics
from spamtrap.store import Store, bundle_key, valid_set_name

log = Logger()

AGE_CHECK_INTERVAL = 1.0  # seconds between checks for bundles past max_age
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0
PART_SUFFIX = ".part"
MANIFEST_FORMAT = 1


def iso_utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Bundle:
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
        # Reactor-only bookkeeping.
        self.rotating = False
        self.attempts = 0

    def _emit(self, data: bytes) -> None:
        if data:
            self.file.write(data)
            self.sha256.update(data)
            self.size += len(data)

    def write(self, entry: bytes, received_at: float, token: Any) -> None:
        self._emit(self.compressor.compress(entry))
        self.messages += 1
        self.tokens.append(token)
        # Workers finish out of order: keep the covered period, not the order.
        self.first_received = min(self.first_received, received_at)
        self.last_received = max(self.last_received, received_at)

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
            _unlink_quietly(self.part_path)

    def manifest(self, set_name: str, node: str) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "set": set_name,
            "key": self.key,
            "size": self.size,
            "sha256": self.sha256.hexdigest(),
            "messages": self.messages,
            "first_received": iso_utc(self.first_received),
            "last_received": iso_utc(self.last_received),
            "node": node,
        }
        return (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")


class BundleSet:
    def __init__(
        self,
        set_config: SetConfig,
        node: str,
        work_dir: str,
        store: Store,
        metrics: Metrics,
        reactor: Any,
        pool: ThreadPool,
        on_stored: Callable[[list[Any]], None],
        clock: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        for what, value in (("set", set_config.name), ("node", node)):
            if not valid_set_name(value):
                raise ValueError(f"invalid {what} name {value!r} (bundle keys need [A-Za-z0-9_.-])")
        self.name = set_config.name
        self._rotate_config = set_config.rotate
        self._node = node
        self._dir = os.path.join(work_dir, set_config.name)
        self._store = store
        self._reactor = reactor
        self._pool = pool
        self._on_stored = on_stored
        self._clock = clock if clock is not None else reactor
        self._rng = rng if rng is not None else random.Random()
        shards = max(1, set_config.shards)
        self._open: list[_Bundle | None] = [None] * shards
        self._locks = [threading.Lock() for _ in range(shards)]
        # Bundles detached from their shard and not yet stored or dropped.
        # Changed from workers and the reactor, so it has its own lock.
        self._pending_lock = threading.Lock()
        self._pending = 0
        self._detaching = 0  # reactor only: detach tasks queued in the pool
        self._retries: dict[_Bundle, DelayedCall] = {}
        self._stopped = False
        self._abandoned = False
        self._stop_waiters: list[Deferred[None]] = []
        self._loop = LoopingCall(self._check_age)
        self._loop.clock = self._clock
        self._m_messages = metrics.set_messages.labels(set=self.name)
        self._m_bundles = metrics.bundles.labels(set=self.name)
        self._m_bytes = metrics.bundle_bytes.labels(set=self.name)
        self._m_errors = metrics.store_errors.labels(set=self.name)
        self._m_open = metrics.bundles_open.labels(set=self.name)

    # -- start -------------------------------------------------------------

    def start(self) -> None:
        # Runs once at startup, before intake, so blocking here is harmless.
        os.makedirs(self._dir, exist_ok=True)
        leftovers = [n for n in os.listdir(self._dir) if n.endswith(PART_SUFFIX)]
        for name in leftovers:
            # Never acknowledged, so the spool replays these messages.
            _unlink_quietly(os.path.join(self._dir, name))
        if leftovers:
            log.info(
                "set {set}: removed {n} unfinished bundle(s) from an earlier run",
                set=self.name,
                n=len(leftovers),
            )
        self._loop.start(AGE_CHECK_INTERVAL, now=False).addErrback(
            lambda f: log.failure("set {set}: age loop died", f, set=self.name)
        )

    # -- writing (worker threads) -------------------------------------------

    def add(self, entry: bytes, received_at: float, token: Any) -> None:
        """Thread-safe; call from a worker thread, never the reactor (it
        writes, and may fsync, a file). ``entry`` is an mbox.entry()."""
        shard = self._rng.randrange(len(self._open))
        with self._locks[shard]:
            if self._stopped:
                raise RuntimeError(f"set {self.name}: add() after stop()")
            bundle = self._open[shard]
            if bundle is None:
                bundle = self._open[shard] = self._new_bundle()
                self._m_open.inc()
            try:
                bundle.write(entry, received_at, token)
            except Exception:
                # The gzip stream is now broken: drop the whole bundle. None
                # of its messages was acknowledged, so the spool replays them.
                self._open[shard] = None
                self._m_open.dec()
                log.error(
                    "set {set}: dropped bundle {key} after a write error; "
                    "its {n} earlier message(s) will be replayed from the spool",
                    set=self.name,
                    key=bundle.key,
                    n=bundle.messages,
                )
                bundle.discard()
                raise
            self._m_messages.inc()
            rc = self._rotate_config
            if bundle.size < rc.max_bytes and bundle.messages < rc.max_messages:
                return
            self._detach_locked(shard)
        # Detached: no other thread touches it now, so seal outside the lock.
        self._seal_and_hand_over(bundle)

    def _new_bundle(self) -> _Bundle:
        opened_at = self._clock.seconds()
        key = bundle_key(self.name, opened_at, self._node)
        part = os.path.join(self._dir, os.path.basename(key) + PART_SUFFIX)
        os.makedirs(self._dir, exist_ok=True)  # once per bundle: cheap, and survives a wiped dir
        return _Bundle(key, part, opened_at)

    def _detach_locked(self, shard: int) -> None:
        """With the shard's lock held: take its bundle out of service."""
        self._open[shard] = None
        self._m_open.dec()
        with self._pending_lock:
            self._pending += 1

    def _seal_and_hand_over(self, bundle: _Bundle) -> None:
        """In a pool thread: seal a detached bundle, then store it from the reactor."""
        try:
            bundle.seal()
        except Exception:  # noqa: BLE001 - _drop logs it; it must not strand the bundle
            self._reactor.callFromThread(self._drop, bundle, Failure())
        else:
            self._reactor.callFromThread(self._put, bundle)

    # -- rotation (reactor) --------------------------------------------------

    def rotate(self) -> None:
        """Close and store every open bundle (each has at least one message)."""
        self._rotate_where(lambda bundle: True)

    def _check_age(self) -> None:
        # A LoopingCall stops for good when its function raises.
        try:
            now = self._clock.seconds()
            max_age = self._rotate_config.max_age
            self._rotate_where(lambda bundle: now - bundle.opened_at >= max_age)
        except Exception:  # noqa: BLE001 - logged; the loop must go on
            log.failure("set {set}: age rotation failed", set=self.name)

    def _rotate_where(self, due: Callable[[_Bundle], bool]) -> None:
        # Reading the list without the lock is fine: the pool task checks
        # under the lock that the shard still holds this very bundle.
        for shard, bundle in enumerate(self._open):
            if bundle is not None and not bundle.rotating and due(bundle):
                bundle.rotating = True
                self._rotate_shard(shard, bundle)

    def _rotate_shard(self, shard: int, expected: _Bundle | None) -> None:
        self._detaching += 1
        d = deferToThreadPool(self._reactor, self._pool, self._detach_and_seal, shard, expected)
        d.addErrback(lambda f: log.failure("set {set}: rotation failed", f, set=self.name))
        d.addBoth(self._detach_done)

    def _detach_and_seal(self, shard: int, expected: _Bundle | None) -> None:
        """In the pool: detach the shard's bundle (if it is still ``expected``,
        or whatever it is when ``expected`` is None) and seal it."""
        with self._locks[shard]:
            bundle = self._open[shard]
            if bundle is None or (expected is not None and bundle is not expected):
                return  # a worker rotated it first
            self._detach_locked(shard)
        self._seal_and_hand_over(bundle)

    def _detach_done(self, _: object) -> None:
        self._detaching -= 1
        self._check_idle()

    # -- storing (reactor) ---------------------------------------------------

    def _put(self, bundle: _Bundle) -> None:
        self._retries.pop(bundle, None)
        manifest = bundle.manifest(self.name, self._node)
        d = maybeDeferred(self._store.put, bundle.key, bundle.part_path, manifest)
        d.addCallbacks(lambda _: self._stored(bundle), lambda f: self._put_failed(bundle, f))
        d.addErrback(
            lambda f: log.failure(
                "set {set}: handling the store result of {key} failed",
                f,
                set=self.name,
                key=bundle.key,
            )
        )

    def _stored(self, bundle: _Bundle) -> None:
        self._m_bundles.inc()
        self._m_bytes.inc(bundle.size)
        log.info(
            "set {set}: stored {key} ({n} messages, {size} bytes)",
            set=self.name,
            key=bundle.key,
            n=bundle.messages,
            size=bundle.size,
        )
        try:
            self._on_stored(bundle.tokens)
        except Exception:  # noqa: BLE001 - logged; the bundle is stored regardless
            log.failure("set {set}: on_stored failed for {key}", set=self.name, key=bundle.key)
        self._remove_part(bundle)

    def _put_failed(self, bundle: _Bundle, failure: Failure) -> None:
        self._m_errors.inc()
        bundle.attempts += 1
        if self._abandoned:
            log.error(
                "set {set}: storing {key} failed after stop was cancelled: {error}; "
                "its messages will be replayed from the spool",
                set=self.name,
                key=bundle.key,
                error=failure.getErrorMessage(),
            )
            self._forget(bundle)
            return
        delay = self._backoff(bundle.attempts)
        log.error(
            "set {set}: storing {key} failed (attempt {attempt}): {error}; retry in {delay:.1f}s",
            set=self.name,
            key=bundle.key,
            attempt=bundle.attempts,
            error=failure.getErrorMessage(),
            delay=delay,
        )
        self._retries[bundle] = self._clock.callLater(delay, self._put, bundle)

    def _backoff(self, attempts: int) -> float:
        """1 s doubling to 300 s, with jitter in [base/2, base] so that many
        sets (and nodes) do not retry against a recovering store in step."""
        base = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** min(attempts - 1, 30))
        return base * (0.5 + 0.5 * self._rng.random())

    def _drop(self, bundle: _Bundle, failure: Failure) -> None:
        log.failure(
            "set {set}: could not seal bundle {key}; "
            "its {n} message(s) will be replayed from the spool",
            failure,
            set=self.name,
            key=bundle.key,
            n=bundle.messages,
        )
        self._remove_part(bundle)

    def _remove_part(self, bundle: _Bundle) -> None:
        d = deferToThreadPool(self._reactor, self._pool, _unlink_quietly, bundle.part_path)
        d.addErrback(
            lambda f: log.failure(
                "set {set}: removing {path}", f, set=self.name, path=bundle.part_path
            )
        )
        d.addBoth(lambda _: self._forget(bundle))

    def _forget(self, bundle: _Bundle) -> None:
        with self._pending_lock:
            self._pending -= 1
        self._check_idle()

    # -- stopping (reactor) --------------------------------------------------

    def stop(self) -> Deferred[None]:
        """Finalise and store every open bundle; fires once all stores
        (with their retries) have succeeded. Cancelling the returned
        Deferred abandons the retries: those messages stay unacknowledged
        in the spool, and their .part files are removed at the next start."""
        if self._loop.running:
            self._loop.stop()
        self._stopped = True
        # Every shard, not only the open ones: a worker may be opening a
        # bundle right now; the pool task takes the lock after it.
        for shard in range(len(self._open)):
            self._rotate_shard(shard, None)
        d: Deferred[None] = Deferred(canceller=self._abandon)
        self._stop_waiters.append(d)
        self._check_idle()
        return d

    def _abandon(self, d: Deferred[None]) -> None:
        self._abandoned = True
        if d in self._stop_waiters:
            self._stop_waiters.remove(d)
        retries, self._retries = self._retries, {}
        for bundle, call in retries.items():
            call.cancel()
            self._forget(bundle)
        log.warn(
            "set {set}: stop cancelled; {n} bundle(s) not stored, "
            "their messages will be replayed from the spool",
            set=self.name,
            n=len(retries) + self._pending,
        )

    def _check_idle(self) -> None:
        if not self._stopped or self._detaching or self._pending:
            return
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)
