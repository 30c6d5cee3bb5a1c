"""The reactor side of a bundle set: storing sealed bundles.

At most ``shards`` uploads of a set run at a time (a bundle holds its slot
while it uploads and while it waits to retry); the set's ``upload_policy``
decides about a bundle that finds every slot taken (see spamtrap.bundle.sets).
Every state change goes through ``Lifecycle.move``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.base import DelayedCall
from twisted.internet.defer import maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from spamtrap import retry
from spamtrap.bundle.file import BundleFile as _Bundle
from spamtrap.bundle.file import manifest_bytes, message_keys
from spamtrap.bundle.manifest import Published
from spamtrap.bundle.state import BundleState, Lifecycle
from spamtrap.config import SetConfig, StoreConfig
from spamtrap.metrics import Metrics
from spamtrap.store import Store

log = Logger()

S = BundleState


class Uploader:
    """The reactor side of a set: stores sealed bundles, at most ``slots`` at
    a time, with the wait queue, retries, skipping and acknowledgement."""

    def __init__(
        self,
        set_config: SetConfig,
        node: str,
        lifecycle: Lifecycle,
        store: Store,
        metrics: Metrics,
        reactor: Any,
        pool: ThreadPool,
        clock: Any,
        rng: random.Random,
        on_stored: Callable[[list[Any]], None],
        on_published: Callable[[Published], object] | None,
        on_settled: Callable[[], None],
        store_config: StoreConfig,
    ) -> None:
        self._set = set_config.name
        self._node = node
        self._lifecycle = lifecycle
        self._store = store
        self._reactor = reactor
        self._pool = pool
        self._clock = clock
        self._rng = rng
        self._on_stored = on_stored
        self._on_published = on_published
        self._on_settled = on_settled
        self._slots = max(1, set_config.shards)
        self._policy = set_config.upload_policy
        self._queue_limit = max(0, set_config.upload_queue)
        self._retry_initial = store_config.retry_initial
        self._retry_max = store_config.retry_max
        self._backlog_bytes = store_config.backlog_bytes
        self._waiting: deque[_Bundle] = deque()  # READY, in arrival order
        self._retries: dict[_Bundle, DelayedCall] = {}  # RETRY_WAIT
        self._outage = False  # a store failed and the backlog is not caught up
        self.stopping = False  # finished bundles wait instead of being skipped
        self.abandoned = False  # stop was cancelled: store nothing more
        self.cleaning = 0  # .part removals running in the pool
        self._m_bundles = metrics.bundles.labels(set=self._set)
        self._m_bytes = metrics.bundle_bytes.labels(set=self._set)
        self._m_errors = metrics.store_errors.labels(set=self._set)
        self._m_skipped = metrics.bundles_skipped
        self._m_dropped = metrics.bundles_dropped

    def _busy_slots(self) -> int:
        # A bundle holds its slot while it uploads and while it waits to retry.
        return self._lifecycle.count(S.UPLOADING, S.RETRY_WAIT)

    def sealed(self, bundle: _Bundle) -> None:
        """A sealed bundle wants storing: start it, let it wait, or skip it."""
        if self.abandoned:
            self._drop(bundle, "abandoned")  # as abandon() does: the spool replays it
            self._on_settled()
            return
        self._lifecycle.move(bundle, S.READY)
        bundle.doc = bundle.manifest_doc(self._set, self._node)
        if self._busy_slots() < self._slots and not self._waiting:
            self._upload(bundle)
        elif self._outage or self.stopping:
            # The store is failing (or we are stopping): wait, bounded.
            self._waiting.append(bundle)
            self._shed_backlog()
        elif self._policy == "queue":
            self._waiting.append(bundle)
            while len(self._waiting) > self._queue_limit:
                self._skip(self._waiting.popleft(), "queue-full")
        else:
            self._skip(bundle, "busy")

    def seal_failed(self, bundle: _Bundle, failure: Failure) -> None:
        log.failure(
            "set {set}: could not seal bundle {key}; "
            "its {n} message(s) will be replayed from the spool (spool keys {keys})",
            failure,
            set=self._set,
            key=bundle.key,
            n=bundle.messages,
            keys=message_keys(bundle.tokens),
        )
        self._drop(bundle, "seal-error")
        self._remove_part(bundle)

    def _upload(self, bundle: _Bundle) -> None:
        self._retries.pop(bundle, None)
        self._lifecycle.move(bundle, S.UPLOADING)
        assert bundle.doc is not None  # built when it was sealed
        manifest = manifest_bytes(bundle.doc)
        d = maybeDeferred(
            self._store.put, bundle.key, bundle.part_path, manifest, bundle.index_path
        )
        d.addCallbacks(lambda _: self._stored(bundle), lambda f: self._put_failed(bundle, f))
        d.addErrback(
            lambda f: log.failure(
                "set {set}: handling the store result of {key} failed",
                f,
                set=self._set,
                key=bundle.key,
            )
        )

    def _stored(self, bundle: _Bundle) -> None:
        self._lifecycle.move(bundle, S.STORED)
        self._m_bundles.inc()
        self._m_bytes.inc(bundle.size)
        log.info(
            "set {set}: stored {key} ({n} messages, {size} bytes)",
            set=self._set,
            key=bundle.key,
            n=bundle.messages,
            size=bundle.size,
        )
        self._acknowledge(bundle)
        if self._on_published is not None:
            self._publish(bundle, self._on_published)
        self._remove_part(bundle)
        self._next()

    def _acknowledge(self, bundle: _Bundle) -> None:
        try:
            self._on_stored(bundle.tokens)
        except Exception:  # noqa: BLE001 - logged; the bundle is stored regardless
            log.failure("set {set}: on_stored failed for {key}", set=self._set, key=bundle.key)

    def _publish(self, bundle: _Bundle, on_published: Callable[[Published], object]) -> None:
        try:
            assert bundle.doc is not None  # built when it was sealed
            notice = Published(bundle.doc, self._store.url(bundle.key))
        except Exception:  # noqa: BLE001 - a notice must never break the set
            log.failure("set {set}: no URL for {key}", set=self._set, key=bundle.key)
            return
        d = maybeDeferred(on_published, notice)
        d.addErrback(
            lambda f: log.failure(
                "set {set}: on_published failed for {key}", f, set=self._set, key=bundle.key
            )
        )

    def _next(self) -> None:
        """A slot is free: start the oldest waiting bundles."""
        while self._waiting and self._busy_slots() < self._slots:
            self._upload(self._waiting.popleft())
        if not self._waiting and not self._retries:
            self._outage = False  # the backlog is caught up

    def _skip(self, bundle: _Bundle, reason: str) -> None:
        """Drop a finished bundle on purpose: acknowledged, deleted, counted."""
        self._lifecycle.move(bundle, S.SKIPPED)
        log.warn(
            "set {set}: skipped bundle {key} ({n} messages, {reason})",
            set=self._set,
            key=bundle.key,
            n=bundle.messages,
            reason=reason,
        )
        self._m_skipped.labels(set=self._set, reason=reason).inc()
        self._acknowledge(bundle)
        self._remove_part(bundle)

    def _shed_backlog(self) -> None:
        total = sum(b.size for b in self._waiting)
        while self._waiting and total > self._backlog_bytes:
            oldest = self._waiting.popleft()
            total -= oldest.size
            self._skip(oldest, "backlog-full")

    def _put_failed(self, bundle: _Bundle, failure: Failure) -> None:
        self._m_errors.inc()
        bundle.attempts += 1
        if self.abandoned:
            log.error(
                "set {set}: storing {key} failed after stop was cancelled: {error}; "
                "its messages will be replayed from the spool",
                set=self._set,
                key=bundle.key,
                error=failure.getErrorMessage(),
            )
            self._drop(bundle, "abandoned")
            self._on_settled()
            return
        self._outage = True
        delay = self._backoff(bundle.attempts)
        log.error(
            "set {set}: storing {key} failed (attempt {attempt}): {error}; retry in {delay:.1f}s",
            set=self._set,
            key=bundle.key,
            attempt=bundle.attempts,
            error=failure.getErrorMessage(),
            delay=delay,
        )
        # The bundle keeps its slot: during an outage only the slot holders
        # retry, the rest wait in order behind them.
        self._lifecycle.move(bundle, S.RETRY_WAIT)
        self._retries[bundle] = self._clock.callLater(delay, self._upload, bundle)

    def _backoff(self, attempts: int) -> float:
        """retry_initial doubling to retry_max, with jitter in [base/2, base]
        so that many sets (and nodes) do not retry against a recovering
        store in step."""
        return retry.backoff(self._retry_initial, self._retry_max, attempts, self._rng)

    def _drop(self, bundle: _Bundle, reason: str) -> None:
        self._lifecycle.move(bundle, S.DROPPED)
        self._m_dropped.labels(set=self._set, reason=reason).inc()

    def _remove_part(self, bundle: _Bundle) -> None:
        self.cleaning += 1
        d = deferToThreadPool(self._reactor, self._pool, bundle.remove_parts)
        d.addErrback(
            lambda f: log.failure(
                "set {set}: removing {path}", f, set=self._set, path=bundle.part_path
            )
        )
        d.addBoth(self._cleaned)

    def _cleaned(self, _: object) -> None:
        self.cleaning -= 1
        self._on_settled()

    def abandon(self) -> None:
        """Stop was cancelled: give up retries and waiting bundles unstored
        (their .part files stay for the next start to remove)."""
        self.abandoned = True
        retries, self._retries = self._retries, {}
        waiting, self._waiting = list(self._waiting), deque()
        log.warn(
            "set {set}: stop cancelled; {n} bundle(s) not stored, "
            "their messages will be replayed from the spool",
            set=self._set,
            n=self._lifecycle.in_flight,
        )
        for bundle, call in retries.items():
            call.cancel()
            self._drop(bundle, "abandoned")
        for bundle in waiting:
            self._drop(bundle, "abandoned")
        self._on_settled()
