"""The thread side of an output set's bundles (spamtrap.bundle.sets has the
whole lifecycle): the open bundles, one per shard, each under its own lock.

``add`` and ``add_many`` run in filter threads and take the lock of the
shard they write to. A bundle that is due leaves its shard (SEALING) and is
sealed (gzip trailer, fsync) in the pool given to the set, the store pool,
never in the filter thread that filled it; the sealed bundle, or the
failure, goes to the reactor (the set's Uploader).

``per_campaign_cap`` is counted per bundle under the shard's lock
(spamtrap.bundle.campaign_cap).

``add_many`` compresses a batch's share of a shard in few calls: zlib
releases the GIL on every call, and a worker that hands the GIL back and
forth once per message costs the reactor (and itself) a thread switch each
time. A chunk stops before its raw bytes could fill the bundle, so a bundle
still rotates at about ``max_bytes``, and exactly at ``max_messages``.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from spamtrap.bundle.campaign_cap import CampaignCap
from spamtrap.bundle.file import BundleFile as _Bundle
from spamtrap.bundle.file import BundleWriteError, Item, failure_reason
from spamtrap.bundle.state import BundleState, Lifecycle
from spamtrap.config import RotateConfig
from spamtrap.interfaces import ReactorFromThreads, ReactorTime
from spamtrap.latch import FailureLatch
from spamtrap.metrics import Metrics
from spamtrap.store import bundle_key

log = Logger()

PART_SUFFIX = ".part"
CHUNK_BYTES = 256 * 1024  # most raw bytes add_many compresses in one call

S = BundleState


class ShardWriter:
    """The thread side of a set: its open bundles, one lock per shard.

    ``add``/``add_many`` run in filter threads. A bundle that comes due
    leaves its shard and is sealed in ``pool`` (the store pool); the sealed
    bundle, or the failure, goes to the reactor through ``on_sealed`` /
    ``on_seal_failed``."""

    def __init__(
        self,
        set_name: str,
        node: str,
        directory: str,
        rotate_config: RotateConfig,
        shards: int,
        lifecycle: Lifecycle,
        metrics: Metrics,
        reactor: ReactorFromThreads,
        pool: ThreadPool,
        clock: ReactorTime,
        rng: random.Random,
        on_sealed: Callable[[_Bundle], None],
        on_seal_failed: Callable[[_Bundle, Failure], None],
        per_campaign_cap: int = 0,
    ) -> None:
        self._set = set_name
        # One count per shard's bundle; None: no cap.
        self._caps = (
            [CampaignCap(per_campaign_cap) for _ in range(shards)] if per_campaign_cap else None
        )
        self._m_sampled = metrics.campaign_sampled_out.labels(set=set_name)
        self._node = node
        self.directory = directory
        self._rotate_config = rotate_config
        self._lifecycle = lifecycle
        self._reactor = reactor
        self._pool = pool
        self._clock = clock
        self._rng = rng
        self._on_sealed = on_sealed
        self._on_seal_failed = on_seal_failed
        self.shards: list[_Bundle | None] = [None] * shards
        self._locks = [threading.Lock() for _ in range(shards)]
        self.stopped = False  # set in the reactor; read under a shard lock
        self._m_messages = metrics.set_messages.labels(set=set_name)
        self._m_dropped = metrics.bundles_dropped.labels(set=set_name, reason="write-error")
        # (why, since) while bundle writes or seals fail (a full disk):
        # health reports it. Set and cleared by any thread, under the lock.
        self._failing = FailureLatch(clock)

    @property
    def write_failure(self) -> tuple[str, float] | None:
        """``(reason, since)`` while writing or sealing bundles fails, e.g.
        ``("No space left on device", <epoch seconds of the first
        failure>)``; None once a write reaches the disk again."""
        return self._failing.failure

    def _write_failed(self, error: BaseException) -> None:
        """Any thread: remember the first failure of an outage."""
        self._failing.failed(failure_reason(error))

    def _write_succeeded(self) -> None:
        """Any thread: bytes reached the disk; log the end of an outage once."""
        ended = self._failing.succeeded()
        if ended is not None:
            why, lasted = ended
            log.info(
                "set {set}: bundle writes succeed again after {s:.0f}s of failures ({why})",
                set=self._set,
                s=lasted,
                why=why,
            )

    def add(
        self, entry: bytes, received_at: float, token: Any, fields: bytes | None = None
    ) -> None:
        shard = self._rng.randrange(len(self.shards))
        with self._locks[shard]:
            full = self._write_locked(shard, [(entry, received_at, token, fields)])
        for bundle in full:
            self._seal_later(bundle)

    def add_many(self, items: Sequence[Item]) -> list[Any]:
        groups: dict[int, list[Item]] = {}
        for item in items:
            groups.setdefault(self._rng.randrange(len(self.shards)), []).append(item)
        failed: list[Any] = []
        for shard, rest in groups.items():
            full: list[_Bundle] = []
            with self._locks[shard]:
                while rest:
                    n = self._chunk_length(shard, rest)
                    chunk, rest = rest[:n], rest[n:]
                    try:
                        full += self._write_locked(shard, chunk)
                    except BundleWriteError as e:
                        # The one log line of this failure: the caller only
                        # keeps the returned messages spooled.
                        log.error("{error}", error=e, set=self._set, key=e.key)
                        failed += e.tokens
            for bundle in full:
                self._seal_later(bundle)
        return failed

    def _chunk_length(self, shard: int, items: list[Item]) -> int:
        """With the shard's lock held: how many of ``items`` to compress in
        one call. The chunk ends where the shard's bundle may be due to
        rotate: raw bytes bound the compressed growth, give or take
        deflate's hold-back."""
        rc = self._rotate_config
        bundle = self.shards[shard]
        room = rc.max_messages - (bundle.messages if bundle is not None else 0)
        budget = min(rc.max_bytes - (bundle.size if bundle is not None else 0), CHUNK_BYTES)
        raw = 0
        for n, item in enumerate(items, 1):
            raw += len(item[0])
            if n >= room or raw >= budget:
                return n
        return len(items)

    def _write_locked(self, shard: int, items: list[Item]) -> list[_Bundle]:
        """With the shard's lock held: write the items to the shard's bundle;
        returns it if it is now due to rotate (detached: seal it). Raises
        BundleWriteError (not logged: the caller decides) if the write fails."""
        if self.stopped:
            raise RuntimeError(f"set {self._set}: add() after stop()")
        bundle = self.shards[shard]
        if bundle is None:
            try:
                bundle = self.shards[shard] = self._new_bundle()
            except OSError as e:
                self._write_failed(e)
                raise
        failing = self._failing.failure is not None
        sampled: list[Any] = []  # tokens of entries over per_campaign_cap
        if self._caps is not None:
            items, sampled = self._caps[shard].split(bundle, items)
        try:
            if items:
                bundle.write_many(items)
            if failing and items:
                # Buffered and held back by deflate, a write "succeeds"
                # without touching the disk: only bytes on it end an outage.
                bundle.push()
        except Exception as e:
            self._write_failed(e)
            # The gzip stream is now broken: drop the whole bundle. None
            # of its messages was acknowledged, so the spool replays them.
            self.shards[shard] = None
            self._lifecycle.move(bundle, S.DROPPED)
            self._m_dropped.inc()
            earlier = bundle.messages
            try:
                bundle.discard()
            except OSError:
                pass  # the write error is the one to report
            raise BundleWriteError(
                self._set, bundle.key, [item[2] for item in items] + sampled, earlier, e
            ) from e
        if failing and items:
            self._write_succeeded()
        self._m_messages.inc(len(items))
        if sampled:
            # Acknowledged with the bundle that holds their campaign's first copies.
            bundle.tokens.extend(sampled)
            self._m_sampled.inc(len(sampled))
        rc = self._rotate_config
        if bundle.size < rc.max_bytes and bundle.messages < rc.max_messages:
            return []
        self._detach_locked(shard, bundle)
        return [bundle]

    def _new_bundle(self) -> _Bundle:
        opened_at = self._clock.seconds()
        key = bundle_key(self._set, opened_at, self._node)
        part = os.path.join(self.directory, os.path.basename(key) + PART_SUFFIX)
        os.makedirs(self.directory, exist_ok=True)  # once per bundle: cheap, survives a wiped dir
        bundle = _Bundle(key, part, opened_at)
        self._lifecycle.enter(bundle)
        return bundle

    def _detach_locked(self, shard: int, bundle: _Bundle) -> None:
        """With the shard's lock held: take its bundle out of service."""
        self.shards[shard] = None
        self._lifecycle.move(bundle, S.SEALING)

    def detach(self, shard: int, expected: _Bundle | None) -> None:
        """In the pool: detach the shard's bundle (if it is still ``expected``,
        or whatever it is when ``expected`` is None) and seal it here."""
        with self._locks[shard]:
            bundle = self.shards[shard]
            if bundle is None or (expected is not None and bundle is not expected):
                return  # a worker rotated it first
            self._detach_locked(shard, bundle)
        self._seal(bundle)

    def _seal_later(self, bundle: _Bundle) -> None:
        # Any thread: ThreadPool.callInThreadWithCallback is thread-safe.
        self._pool.callInThreadWithCallback(_ignore_result, self._seal, bundle)

    def _seal(self, bundle: _Bundle) -> None:
        """In the pool: seal a detached bundle, then hand it to the reactor."""
        try:
            bundle.seal()
        except Exception as e:  # noqa: BLE001 - on_seal_failed logs it; it must not strand the bundle
            self._write_failed(e)
            self._reactor.callFromThread(self._on_seal_failed, bundle, Failure())
        else:
            if self._failing.failure is not None:
                self._write_succeeded()
            self._reactor.callFromThread(self._on_sealed, bundle)


def _ignore_result(ok: bool, result: object) -> None:
    """_seal reports through the reactor itself and never raises."""
