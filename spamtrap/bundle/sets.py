"""The bundle lifecycle of one output set: write, rotate, finalise, store.

Each set keeps ``shards`` bundles open; every message goes to one of them at
random, so one period yields several files instead of one file full of a
single dictionary attack. A bundle is a single-member gzip file written to
``WORK/<set>/<name>.part`` with a running sha256 of the compressed bytes,
and its index (one line per message, spamtrap.bundle.index) beside it. It
uses ``zlib.compressobj`` with the gzip wrapper (wbits 31) rather than
GzipFile: deflate dominates either way (measured within a few per cent,
compressobj ahead), and compressobj hands us the compressed bytes to hash
and count without a wrapping file object.

A bundle is rotated when it reaches ``rotate.max_bytes`` compressed bytes
(as written so far: deflate holds back a little), ``rotate.max_messages`` or
``rotate.max_age``. Rotation seals it (gzip trailer, fsync) in the store
pool; then, in the reactor, the manifest is built and the store is asked to
put the object, its index and then the manifest. Only after that are the
messages' tokens handed to ``on_stored`` (the caller acknowledges the spool), so a
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

A failed write or seal (a full disk) is remembered as ``write_failure``,
``(reason, since)``, which ``/healthz`` reports as degraded: the spool
took the mail, but nothing is stored. While it is set, each write also
pushes its compressed bytes out (a zlib sync flush), since buffering and
deflate's hold-back let a write "succeed" without touching the disk; the
first write or seal that reaches the disk clears it.

Every bundle moves through the states of :mod:`spamtrap.bundle.state`
(OPEN -> SEALING -> READY -> UPLOADING <-> RETRY_WAIT -> STORED, SKIPPED or
DROPPED), and only ``Lifecycle.move`` changes a state: it refuses an illegal
move and keeps the gauges in step. Two halves share the work:

- :class:`~spamtrap.bundle.shards.ShardWriter`, the thread side
  (spamtrap/bundle/shards.py): ``add`` and ``add_many`` run in
  filter threads and take the lock of the shard they write to. A bundle
  that is due leaves its shard (SEALING) and is sealed (gzip trailer, fsync)
  in the pool given to the set, the store pool, never in the filter thread
  that filled it.
- :class:`~spamtrap.bundle.upload.Uploader`, the reactor side: slots, the wait queue, retries,
  skipping, acknowledging and announcing. Its blocking file work (removing
  a ``.part``) goes to the same pool.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from spamtrap.bundle.file import BundleFile as _Bundle
from spamtrap.bundle.file import BundleWriteError, Item, unlink_quietly
from spamtrap.bundle.manifest import Published
from spamtrap.bundle.shards import PART_SUFFIX, ShardWriter
from spamtrap.bundle.state import Lifecycle
from spamtrap.bundle.upload import Uploader
from spamtrap.config import SetConfig, StoreConfig
from spamtrap.interfaces import (
    ReactorTime,
    WorkerReactor,
    as_reactor_from_threads,
    as_reactor_time,
    pick_clock,
)
from spamtrap.metrics import Metrics
from spamtrap.store import Store, valid_set_name

__all__ = ["BundleSet", "BundleWriteError"]

log = Logger()

AGE_CHECK_INTERVAL = 1.0  # seconds between checks for bundles past max_age


class BundleSet:
    """One output set: a ShardWriter filling bundles in filter threads and
    an Uploader storing them from the reactor, with rotation and stop."""

    def __init__(
        self,
        set_config: SetConfig,
        node: str,
        work_dir: str,
        store: Store,
        metrics: Metrics,
        reactor: WorkerReactor,
        pool: ThreadPool,
        on_stored: Callable[[list[Any]], None],
        clock: ReactorTime | None = None,
        rng: random.Random | None = None,
        store_config: StoreConfig | None = None,
        on_published: Callable[[Published], object] | None = None,
    ) -> None:
        """``pool`` runs the set's blocking file work: sealing (gzip trailer,
        fsync), detaching from the reactor, removing .part files. Give it
        the store pool, not the filter pool: a bundle is then sealed off the
        filter thread that filled it.

        ``on_stored`` gets a stored (or skipped) bundle's tokens in the
        reactor. ``on_published`` is called in the reactor with a
        ``Published`` (the manifest and ``store.url(key)``) once object and
        manifest are stored; its errors (raised or in a returned Deferred) are logged only."""
        for what, value in (("set", set_config.name), ("node", node)):
            if not valid_set_name(value):
                raise ValueError(f"invalid {what} name {value!r} (bundle keys need [A-Za-z0-9_.-])")
        self.name = set_config.name
        self._rotate_config = set_config.rotate
        self._reactor = reactor
        self._pool = pool
        self._clock = pick_clock(clock, reactor)
        rng = rng if rng is not None else random.Random()
        self.lifecycle = Lifecycle(
            self.name,
            state_gauge=metrics.bundles_state,
            open_gauge=metrics.bundles_open.labels(set=self.name),
            waiting_gauge=metrics.bundles_waiting.labels(set=self.name),
        )
        self.uploader = Uploader(
            set_config,
            node,
            self.lifecycle,
            store,
            metrics,
            reactor,
            pool,
            self._clock,
            rng,
            on_stored,
            on_published,
            self._check_idle,
            store_config if store_config is not None else StoreConfig(),
        )
        self.writer = ShardWriter(
            self.name,
            node,
            os.path.join(work_dir, set_config.name),
            set_config.rotate,
            max(1, set_config.shards),
            self.lifecycle,
            metrics,
            reactor,
            pool,
            self._clock,
            rng,
            self.uploader.sealed,
            self.uploader.seal_failed,
            per_campaign_cap=set_config.per_campaign_cap,
        )
        self._detaching = 0  # reactor only: detach tasks queued in the pool
        self._stop_waiters: list[Deferred[None]] = []
        self._loop = LoopingCall(self._check_age)
        self._loop.clock = as_reactor_time(self._clock)

    # -- start -------------------------------------------------------------

    def start(self) -> None:
        # Runs once at startup, before intake, so blocking here is harmless.
        directory = self.writer.directory
        os.makedirs(directory, exist_ok=True)
        leftovers = [n for n in os.listdir(directory) if n.endswith(PART_SUFFIX)]
        for name in leftovers:
            # Never acknowledged, so the spool replays these messages.
            unlink_quietly(os.path.join(directory, name))
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

    def add(
        self, entry: bytes, received_at: float, token: Any, fields: bytes | None = None
    ) -> None:
        """Thread-safe; call from a worker thread, never the reactor (it
        writes a file). ``entry`` is an mbox.entry(), ``fields`` the
        message's index fields (spamtrap.bundle.index.encode_fields). Raises
        BundleWriteError, not logged, if the write fails (the bundle is
        then dropped; its messages stay spooled)."""
        self.writer.add(entry, received_at, token, fields)

    @property
    def write_failure(self) -> tuple[str, float] | None:
        """``(reason, since)`` while this set cannot write or seal bundles
        (see ShardWriter.write_failure); None when writes succeed."""
        return self.writer.write_failure

    def add_many(self, items: Sequence[Item]) -> list[Any]:
        """add() for a batch of (entry, received_at, token[, fields]), each to a random
        shard as add() does. Returns the tokens that could not be written
        (their bundle was dropped, and logged once here with the set, the
        key and the spool keys; the spool keeps those messages)."""
        return self.writer.add_many(items)

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
        for shard, bundle in enumerate(self.writer.shards):
            if bundle is not None and not bundle.rotating and due(bundle):
                bundle.rotating = True
                self._rotate_shard(shard, bundle)

    def _rotate_shard(self, shard: int, expected: _Bundle | None) -> None:
        self._detaching += 1
        d = deferToThreadPool(
            as_reactor_from_threads(self._reactor), self._pool, self.writer.detach, shard, expected
        )
        d.addErrback(lambda f: log.failure("set {set}: rotation failed", f, set=self.name))
        d.addBoth(self._detach_done)

    def _detach_done(self, _: object) -> None:
        self._detaching -= 1
        self._check_idle()

    # -- stopping (reactor) --------------------------------------------------

    def stop(self) -> Deferred[None]:
        """Finalise and store every open bundle; fires once all stores
        (with their retries) have succeeded. Cancelling the returned
        Deferred abandons the retries: those messages stay unacknowledged
        in the spool, and their .part files are removed at the next start."""
        if self._loop.running:
            self._loop.stop()
        self.writer.stopped = True  # stopping: what _check_idle reads too
        self.uploader.stopping = True
        # Every shard, not only the open ones: a worker may be opening a
        # bundle right now; the pool task takes the lock after it.
        for shard in range(len(self.writer.shards)):
            self._rotate_shard(shard, None)
        d: Deferred[None] = Deferred(canceller=self._abandon)
        self._stop_waiters.append(d)
        self._check_idle()
        return d

    def _abandon(self, d: Deferred[None]) -> None:
        if d in self._stop_waiters:
            self._stop_waiters.remove(d)
        self.uploader.abandon()

    def _check_idle(self) -> None:
        if not self.writer.stopped or self._detaching or self.uploader.cleaning:
            return
        if self.lifecycle.in_flight:
            return
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)
