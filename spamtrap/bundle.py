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
and jitter (``store.retry_initial`` doubling to ``store.retry_max``) until
they succeed. Once stored, ``on_published`` gets the manifest and the URL
(notifications hook in there).

Uploads of a set run at most ``shards`` at a time. When a finished bundle
finds them all still running, the set's ``upload_policy`` decides, and it is
counted: ``skip`` (the default) drops the new bundle, ``queue`` keeps it in
a FIFO of at most ``upload_queue`` bundles, shedding the oldest waiting one.
A dropped bundle's messages are acknowledged all the same: they were shed on
purpose, there is always more spam. A failing store is different: then
finished bundles wait as a backlog of at most ``store.backlog_bytes``
(oldest shed, counted) behind the one being retried, and the backlog uploads
by itself once the store is back. Bundles finalised by ``stop()`` are never
skipped.

Threads: ``add`` and ``add_many`` run in worker threads and take the lock
of the shard they write to. Everything else runs in the reactor; blocking
file work goes to the pool.

``add_many`` compresses a batch's share of a shard in few calls: zlib
releases the GIL on every call, and a worker that hands the GIL back and
forth once per message costs the reactor (and itself) a thread switch each
time. A chunk stops before its raw bytes could fill the bundle, so a bundle
still rotates at about ``max_bytes``, and exactly at ``max_messages``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from spamtrap.config import SetConfig, StoreConfig
from spamtrap.metrics import Metrics
from spamtrap.store import Store, bundle_key, valid_set_name

log = Logger()

AGE_CHECK_INTERVAL = 1.0  # seconds between checks for bundles past max_age
PART_SUFFIX = ".part"
CHUNK_BYTES = 256 * 1024  # most raw bytes add_many compresses in one call
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
        self.doc: dict[str, Any] = {}  # the manifest, built once sealed

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

    def manifest_doc(self, set_name: str, node: str) -> dict[str, Any]:
        return {
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


def manifest_bytes(doc: dict[str, Any]) -> bytes:
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
        store_config: StoreConfig | None = None,
        on_published: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        """``on_published`` is called in the reactor with the manifest plus
        ``"url"`` (``store.url(key)``) once object and manifest are stored;
        its errors (raised or in a returned Deferred) are logged only."""
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
        self._on_published = on_published
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
        # Storing (reactor only): bundles holding an upload slot (an attempt
        # running or a retry scheduled), and finished ones waiting for a slot.
        self._slots = shards
        self._uploading: set[_Bundle] = set()
        self._waiting: deque[_Bundle] = deque()
        self._outage = False  # a store failed and the backlog is not caught up
        self._policy = set_config.upload_policy
        self._queue_limit = max(0, set_config.upload_queue)
        store_config = store_config if store_config is not None else StoreConfig()
        self._retry_initial = store_config.retry_initial
        self._retry_max = store_config.retry_max
        self._backlog_bytes = store_config.backlog_bytes
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
        # Until metrics.py has them, skips are counted in the log only.
        self._m_skipped = getattr(metrics, "bundles_skipped", None)
        waiting = getattr(metrics, "bundles_waiting", None)
        self._m_waiting = waiting.labels(set=self.name) if waiting is not None else None

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
        writes, and may fsync, a file). ``entry`` is an mbox.entry().
        Raises if the write fails (the bundle is then dropped)."""
        shard = self._rng.randrange(len(self._open))
        with self._locks[shard]:
            full = self._write_locked(shard, [(entry, received_at, token)])
        # Detached: no other thread touches it now, so seal outside the lock.
        for bundle in full:
            self._seal_and_hand_over(bundle)

    def add_many(self, items: Sequence[tuple[bytes, float, Any]]) -> list[Any]:
        """add() for a batch of (entry, received_at, token), each to a random
        shard as add() does. Returns the tokens that could not be written
        (their bundle was dropped; the spool keeps those messages)."""
        groups: dict[int, list[tuple[bytes, float, Any]]] = {}
        for item in items:
            groups.setdefault(self._rng.randrange(len(self._open)), []).append(item)
        failed: list[Any] = []
        for shard, rest in groups.items():
            full: list[_Bundle] = []
            with self._locks[shard]:
                while rest:
                    n = self._chunk_length(shard, rest)
                    chunk, rest = rest[:n], rest[n:]
                    try:
                        full += self._write_locked(shard, chunk)
                    except Exception:  # noqa: BLE001 - logged; those messages stay spooled
                        failed += [token for _, _, token in chunk]
            for bundle in full:
                self._seal_and_hand_over(bundle)
        return failed

    def _chunk_length(self, shard: int, items: list[tuple[bytes, float, Any]]) -> int:
        """With the shard's lock held: how many of ``items`` to compress in
        one call. The chunk ends where the shard's bundle may be due to
        rotate: raw bytes bound the compressed growth, give or take
        deflate's hold-back."""
        rc = self._rotate_config
        bundle = self._open[shard]
        room = rc.max_messages - (bundle.messages if bundle is not None else 0)
        budget = min(rc.max_bytes - (bundle.size if bundle is not None else 0), CHUNK_BYTES)
        raw = 0
        for n, (entry, _, _) in enumerate(items, 1):
            raw += len(entry)
            if n >= room or raw >= budget:
                return n
        return len(items)

    def _write_locked(self, shard: int, items: list[tuple[bytes, float, Any]]) -> list[_Bundle]:
        """With the shard's lock held: write the items to the shard's bundle;
        returns it if it is now due to rotate (detached: seal it)."""
        if self._stopped:
            raise RuntimeError(f"set {self.name}: add() after stop()")
        bundle = self._open[shard]
        if bundle is None:
            bundle = self._open[shard] = self._new_bundle()
            self._m_open.inc()
        try:
            bundle.write_many(items)
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
        self._m_messages.inc(len(items))
        rc = self._rotate_config
        if bundle.size < rc.max_bytes and bundle.messages < rc.max_messages:
            return []
        self._detach_locked(shard)
        return [bundle]

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
            self._reactor.callFromThread(self._ready, bundle)

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

    def _ready(self, bundle: _Bundle) -> None:
        """A sealed bundle wants storing: start it, let it wait, or skip it."""
        if self._abandoned:
            self._forget(bundle)  # as _abandon does: the spool replays it
            return
        bundle.doc = bundle.manifest_doc(self.name, self._node)
        if len(self._uploading) < self._slots and not self._waiting:
            self._start(bundle)
        elif self._outage or self._stopped:
            # The store is failing (or we are stopping): wait, bounded.
            self._waiting.append(bundle)
            self._shed_backlog()
        elif self._policy == "queue":
            self._waiting.append(bundle)
            while len(self._waiting) > self._queue_limit:
                self._skip(self._waiting.popleft(), "queue-full")
        else:
            self._skip(bundle, "busy")
        self._show_waiting()

    def _start(self, bundle: _Bundle) -> None:
        self._uploading.add(bundle)
        self._put(bundle)

    def _put(self, bundle: _Bundle) -> None:
        self._retries.pop(bundle, None)
        manifest = manifest_bytes(bundle.doc)
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
        self._acknowledge(bundle)
        if self._on_published is not None:
            self._publish(bundle, self._on_published)
        self._remove_part(bundle)
        self._uploading.discard(bundle)
        self._next()

    def _acknowledge(self, bundle: _Bundle) -> None:
        try:
            self._on_stored(bundle.tokens)
        except Exception:  # noqa: BLE001 - logged; the bundle is stored regardless
            log.failure("set {set}: on_stored failed for {key}", set=self.name, key=bundle.key)

    def _publish(self, bundle: _Bundle, on_published: Callable[[dict[str, Any]], Any]) -> None:
        try:
            notice = {**bundle.doc, "url": self._store.url(bundle.key)}
        except Exception:  # noqa: BLE001 - a notice must never break the set
            log.failure("set {set}: no URL for {key}", set=self.name, key=bundle.key)
            return
        d = maybeDeferred(on_published, notice)
        d.addErrback(
            lambda f: log.failure(
                "set {set}: on_published failed for {key}", f, set=self.name, key=bundle.key
            )
        )

    def _next(self) -> None:
        """A slot is free: start the oldest waiting bundles."""
        while self._waiting and len(self._uploading) < self._slots:
            self._start(self._waiting.popleft())
        if not self._waiting and not self._retries:
            self._outage = False  # the backlog is caught up
        self._show_waiting()

    def _skip(self, bundle: _Bundle, reason: str) -> None:
        """Drop a finished bundle on purpose: acknowledged, deleted, counted."""
        log.warn(
            "set {set}: skipped bundle {key} ({n} messages, {reason})",
            set=self.name,
            key=bundle.key,
            n=bundle.messages,
            reason=reason,
        )
        if self._m_skipped is not None:
            self._m_skipped.labels(set=self.name, reason=reason).inc()
        self._acknowledge(bundle)
        self._remove_part(bundle)

    def _shed_backlog(self) -> None:
        total = sum(b.size for b in self._waiting)
        while self._waiting and total > self._backlog_bytes:
            oldest = self._waiting.popleft()
            total -= oldest.size
            self._skip(oldest, "backlog-full")

    def _show_waiting(self) -> None:
        if self._m_waiting is not None:
            self._m_waiting.set(len(self._waiting) + len(self._uploading))

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
            self._uploading.discard(bundle)
            self._forget(bundle)
            return
        self._outage = True
        delay = self._backoff(bundle.attempts)
        log.error(
            "set {set}: storing {key} failed (attempt {attempt}): {error}; retry in {delay:.1f}s",
            set=self.name,
            key=bundle.key,
            attempt=bundle.attempts,
            error=failure.getErrorMessage(),
            delay=delay,
        )
        # The bundle keeps its slot: during an outage only the slot holders
        # retry, the rest wait in order behind them.
        self._retries[bundle] = self._clock.callLater(delay, self._put, bundle)

    def _backoff(self, attempts: int) -> float:
        """retry_initial doubling to retry_max, with jitter in [base/2, base]
        so that many sets (and nodes) do not retry against a recovering
        store in step."""
        base = min(self._retry_max, self._retry_initial * 2.0 ** min(attempts - 1, 30))
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
        waiting, self._waiting = list(self._waiting), deque()
        for bundle, call in retries.items():
            call.cancel()
            self._uploading.discard(bundle)
        log.warn(
            "set {set}: stop cancelled; {n} bundle(s) not stored, "
            "their messages will be replayed from the spool",
            set=self.name,
            n=self._pending,
        )
        for bundle in [*retries, *waiting]:
            self._forget(bundle)
        self._show_waiting()

    def _check_idle(self) -> None:
        if not self._stopped or self._detaching or self._pending:
            return
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)
