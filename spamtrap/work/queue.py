"""The Redis Streams work queue: listeners and filter workers scaled apart.

One stream, one consumer group, shared by every node (docs/scaling.md):

- A **listener** XADDs each message (its spool record: metadata and bytes)
  and answers 250 once Redis acknowledged it (and, with ``replicas``, once
  WAIT saw that many replicas have it). Adds are grouped: one pipeline of
  XADDs per round trip, like the spool's group commit. ``XTRIM MAXLEN ~``
  bounds the stream; what it trims is counted as shed.
- When Redis is unreachable, the listener does what ``on_unreachable``
  says: keep answering 250 from its local durable spool (the default) and
  forward that backlog once Redis is back, or answer 451.
- A **worker** reads with XREADGROUP, first its own pending entries (after
  a restart), then new ones. It acknowledges (XACK, then XDEL so the stream
  holds only unprocessed messages) once every bundle holding a message is
  stored, like the local spool's ack policy. While it holds a message, it
  refreshes the entry's idle time (XCLAIM JUSTID to itself), so only a dead
  or cut-off worker's entries grow idle; any worker takes those over with
  XAUTOCLAIM after ``claim_idle``. A taken-over message may be stored twice:
  both copies carry the same X-Spamtrap-Id.

redis-py blocks, so every call runs in a bounded thread pool of its own
with one connection per thread: the reactor never waits on Redis.

This module is the listener side (QueueWriter, QueueIntake, Forwarder);
spamtrap.work.queue_source is the worker side, and
spamtrap.work.queue_link the link to Redis that both use.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Protocol, TypeVar

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from spamtrap.interfaces import WorkerReactor, as_reactor_from_threads, as_reactor_time
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.work.queue_link import (
    RECORD,
    QueueLink,
    QueueUnavailableError,
    RedisClient,
    ReplicasMissingError,
    wait_ms,
)
from spamtrap.work.spool import Spool, SpoolEntry, SpoolError, read_entries

log = Logger()

_T = TypeVar("_T")


class _Cancellable(Protocol):
    """A Deferred of any result, as stop() sees what the forwarder awaits."""

    called: bool

    def cancel(self) -> None: ...


# -- listener side -------------------------------------------------------


class QueueWriter:
    """Adds records to the stream, many per round trip."""

    def __init__(self, link: QueueLink, metrics: Metrics) -> None:
        self.link = link
        self.metrics = metrics
        self.cfg = link.cfg
        self._pending: collections.deque[tuple[bytes, defer.Deferred[None]]] = collections.deque()
        # One round trip at a time: what arrives meanwhile goes in the next
        # one. Fewer, larger batches cost less CPU per message (measured:
        # about 90 us less than two in flight), and the other connections
        # stay free for a worker's reads and acks in an "all" process.
        self._flushing = False

    def add(self, record: bytes) -> defer.Deferred[None]:
        """Fires once Redis acknowledged the XADD; fails with
        QueueUnavailableError if it did not."""
        if not self.link.up:
            return defer.fail(QueueUnavailableError("Redis is unreachable"))
        d: defer.Deferred[None] = defer.Deferred()
        self._pending.append((record, d))
        self._kick()
        return d

    def add_many(self, records: Sequence[bytes]) -> defer.Deferred[list[None]]:
        """Fires once every record is added; fails if any was not."""
        adds = [self.add(r) for r in records]
        d = defer.gatherResults(adds, consumeErrors=True)

        def first_error(failure: Failure) -> Failure:
            return failure.value.subFailure  # type: ignore[union-attr,no-any-return]

        d.addErrback(first_error)
        return d

    def _kick(self) -> None:
        if not self.link.up:
            # Down while these waited: fail them now rather than one
            # timeout per batch; each falls back (spool or 451) at once.
            pending, self._pending = self._pending, collections.deque()
            for _, d in pending:
                d.errback(QueueUnavailableError("Redis is unreachable"))
            return
        if self._pending and not self._flushing:
            n = min(len(self._pending), self.cfg.batch)
            batch = [self._pending.popleft() for _ in range(n)]
            self._flushing = True
            added = self.link.call("xadd", self._xadd, [r for r, _ in batch])
            added.addBoth(self._flushed, batch)

    def _xadd(self, client: RedisClient, records: list[bytes]) -> int:
        """(In a pool thread.) One pipeline: the XADDs, the trim, the WAIT."""
        cfg = self.cfg
        stream = self.link.stream
        pipe = client.pipeline(transaction=False)
        for record in records:
            pipe.execute_command("XADD", stream, "*", RECORD, record)
        if cfg.maxlen:
            pipe.execute_command("XTRIM", stream, "MAXLEN", "~", cfg.maxlen)
        if cfg.replicas:
            pipe.execute_command("WAIT", cfg.replicas, wait_ms(cfg))
        replies = pipe.execute()
        if cfg.replicas and replies[-1] < cfg.replicas:
            raise ReplicasMissingError(
                f"only {replies[-1]} of {cfg.replicas} replica(s) acknowledged in {wait_ms(cfg)} ms"
            )
        trimmed = int(replies[len(records)]) if cfg.maxlen else 0
        if trimmed:
            # Every node's trims, for a cluster-wide figure (spamtrap_queue_shed_cluster).
            client.execute_command("INCRBY", stream + b":shed", trimmed)
        return trimmed

    def _flushed(
        self, result: int | Failure, batch: list[tuple[bytes, defer.Deferred[None]]]
    ) -> None:
        self._flushing = False
        if isinstance(result, Failure):
            if result.check(ReplicasMissingError):
                # Not durable as configured: down until the probe sees the
                # replicas again, so the forwarder does not add it in a loop.
                self.metrics.queue_errors.labels(op="wait").inc()
                self.link.mark_down(str(result.value))
            elif not result.check(QueueUnavailableError):
                log.failure("adding to the Redis stream failed", result)
                result = Failure(QueueUnavailableError(str(result.value)))
            for _, d in batch:
                d.errback(result)
        else:
            if result:
                self.metrics.queue_shed.inc(result)
            self.metrics.queue_added.inc(len(batch))
            for _, d in batch:
                d.callback(None)
        self._kick()


class QueueIntake:
    """A listener's ``submit``: into the stream; while Redis is unreachable,
    into the local spool (``spool``) or a 451 (``tempfail``)."""

    def __init__(self, writer: QueueWriter, spool: Spool, policy: str, metrics: Metrics) -> None:
        self.writer = writer
        self.spool = spool
        self.policy = policy
        self.metrics = metrics

    def submit(self, env: Envelope) -> defer.Deferred[object]:
        link = self.writer.link
        if not link.settled:
            return link.first_answer().addCallback(lambda _: self.submit(env))
        record = env.to_record()
        if not link.up:
            return defer.maybeDeferred(self._unreachable, record, env.received_at)
        d: defer.Deferred[object] = self.writer.add(record).addErrback(
            self._add_failed, record, env.received_at
        )
        return d

    def _add_failed(
        self, failure: Failure, record: bytes, received_at: float
    ) -> defer.Deferred[SpoolEntry]:
        failure.trap(QueueUnavailableError)
        return self._unreachable(record, received_at)

    def _unreachable(self, record: bytes, received_at: float) -> defer.Deferred[SpoolEntry]:
        if self.policy == "tempfail":
            self.metrics.queue_unreachable.labels(action="tempfail").inc()
            raise QueueUnavailableError("Redis is unreachable")
        self.metrics.queue_unreachable.labels(action="spooled").inc()
        return self.spool.append(record, received_at)


class Forwarder:
    """Moves what the local spool holds (taken during an outage, or left
    from before a restart) into the stream, acking each batch once Redis
    has it."""

    def __init__(
        self,
        spool: Spool,
        writer: QueueWriter,
        metrics: Metrics,
        reactor: WorkerReactor,
        pool: ThreadPool,
    ) -> None:
        self.spool = spool
        self.writer = writer
        self.link = writer.link
        self.metrics = metrics
        self.reactor = reactor
        self.pool = pool  # file reads of spooled records
        self.running = False
        self.busy = False
        self._loop: defer.Deferred[None] | None = None
        self._wait: _Cancellable | None = None

    def start(self) -> None:
        self.running = True
        self._loop = defer.ensureDeferred(self._run())
        self._loop.addErrback(lambda f: log.failure("spool forwarder stopped", f))

    async def _run(self) -> None:
        while self.running:
            try:
                entry = await self._waiting(self.spool.get())
            except (defer.CancelledError, SpoolError):
                return
            batch = [entry, *self.spool.take(self.writer.cfg.batch - 1)]
            self.busy = True
            try:
                await self._forward(batch)
            finally:
                self.busy = False

    async def _forward(self, batch: list[SpoolEntry]) -> None:
        records = await deferToThreadPool(
            as_reactor_from_threads(self.reactor), self.pool, read_entries, batch
        )
        good = [(e.key, r) for e, r in zip(batch, records, strict=True) if isinstance(r, bytes)]
        if len(good) < len(batch):
            # Left in the spool for an operator; the rest go on.
            log.error(
                "{n} spooled record(s) unreadable; left in the spool", n=len(batch) - len(good)
            )
            self.metrics.processing_errors.inc(len(batch) - len(good))
        while self.running:
            try:
                await self._waiting(self.link.wait_up())
                await self.writer.add_many([r for _, r in good])
            except QueueUnavailableError:
                continue  # wait for Redis again; the batch stays in flight
            except defer.CancelledError:
                return  # stopping: not acked, so the spool keeps the batch
            self.spool.ack_keys(k for k, _ in good)
            self.metrics.queue_forwarded.inc(len(good))
            return

    def _waiting(self, d: defer.Deferred[_T]) -> defer.Deferred[_T]:
        self._wait = d  # cancelled by stop()
        return d

    async def drain(self) -> None:
        """While Redis answers, forward everything spooled; then stop."""
        while self.running and self.link.up and (self.spool.depth or self.busy):
            await task.deferLater(as_reactor_time(self.reactor), 0.05, lambda: None)
        await self.stop()

    async def stop(self) -> None:
        self.running = False
        if self._wait is not None and not self._wait.called:
            self._wait.cancel()
        if self._loop is not None:
            await self._loop
