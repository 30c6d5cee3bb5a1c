"""The worker side of the work queue: a filter worker's feed from the
Redis stream (see spamtrap.work.queue for the whole design)."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.logger import Logger

from spamtrap.errors import SourceStoppedError, WorkSourceError
from spamtrap.interfaces import DelayedCall, as_reactor_time
from spamtrap.metrics import Metrics
from spamtrap.work.queue_link import (
    RECORD,
    Key,
    QueueLink,
    QueueUnavailableError,
    RedisClient,
    Reply,
    format_id,
    parse_id,
)

# One namespace for everything the work queue logs, whichever module of it.
log = Logger(namespace="spamtrap.work.queue")

ACK_DELAY = 0.05  # acks gathered this long go to Redis in one round trip
ACK_CHUNK = 1000  # ids per XACK/XDEL/XCLAIM command
MAX_BLOCK = 1.0  # longest XREADGROUP BLOCK, in seconds: bounds a clean stop
CLAIM_PAUSE = 0.05  # while taking over a backlog: wait this long for buffer room


@dataclass(eq=False)
class StreamEntry:
    """A message read from the stream; ``key`` plays the spool key's part."""

    key: Key
    record: bytes


class QueueSource:
    """A worker's feed from the stream, with the spool's consumer interface
    (get, take, depth, read_entries, ack_keys), so the Pipeline runs on
    either."""

    def __init__(self, link: QueueLink, consumer: str, metrics: Metrics) -> None:
        self.link = link
        self.cfg = link.cfg
        self.consumer = consumer.encode()
        self.metrics = metrics
        self.clock = link.clock
        self._buffer: collections.deque[StreamEntry] = collections.deque()
        self._waiters: collections.deque[defer.Deferred[StreamEntry]] = collections.deque()
        # Ids read and not yet acked: refreshed so no other worker takes them.
        self._held: set[Key] = set()
        self._acks: list[Key] = []
        self._unacked: set[Key] = set()  # the keys in _acks and in flight to Redis
        self._ack_call: DelayedCall | None = None
        self._acking: defer.Deferred[None] | None = None
        self._fetching = False
        self._fetch: defer.Deferred[None] | None = None
        self._wait: defer.Deferred[None] | None = None  # for Redis to answer
        self._room_wait: defer.Deferred[None] | None = None  # for the buffer to empty
        self._ack_wait: defer.Deferred[None] | None = None
        self._refresh: task.LoopingCall | None = None
        self._claim: task.LoopingCall | None = None
        self._block_ms = int(min(MAX_BLOCK, self.cfg.timeout / 2) * 1000)
        metrics.queue_held.set_function(lambda: len(self._held))

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        self._fetching = True
        self._fetch = defer.ensureDeferred(self._fetch_loop())
        self._fetch.addErrback(lambda f: log.failure("Redis stream reader stopped", f))
        idle = self.cfg.claim_idle
        self._refresh = task.LoopingCall(self._refresh_held)
        self._refresh.clock = as_reactor_time(self.clock)
        self._refresh.start(idle / 3, now=False).addErrback(QueueLink._log_loop_failure)
        self._claim = task.LoopingCall(self._claim_idle)
        self._claim.clock = as_reactor_time(self.clock)
        self._claim.start(idle / 2, now=False).addErrback(QueueLink._log_loop_failure)

    async def stop_reading(self) -> None:
        """Read no more; what was read stays buffered for the pipeline's
        drain."""
        self._fetching = False
        if self._claim is not None and self._claim.running:
            self._claim.stop()
        for d in (self._wait, self._room_wait):
            if d is not None and not d.called:
                d.cancel()
        if self._fetch is not None:
            await self._fetch
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            waiter.errback(SourceStoppedError("queue reader stopped"))

    async def stop(self) -> None:
        """Send the last acks (one try, bounded by ``timeout``)."""
        await self.stop_reading()
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
            self._ack_call = None
        if self._ack_wait is not None and not self._ack_wait.called:
            self._ack_wait.cancel()
        if self._acking is not None:
            await self._acking
        if self._acks and self.link.up:
            await self._flush_acks()
        if self._acks:
            log.warn(
                "{n} message(s) stored but not acknowledged in Redis; another worker may"
                " store them again (same X-Spamtrap-Id)",
                n=len(self._acks),
            )

    # -- the spool's consumer interface -----------------------------------

    @property
    def depth(self) -> int:
        return len(self._buffer)

    def get(self) -> defer.Deferred[StreamEntry]:
        if not self._fetching and not self._buffer:
            return defer.fail(SourceStoppedError("queue reader stopped"))

        def withdraw(d: defer.Deferred[StreamEntry]) -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        d: defer.Deferred[StreamEntry] = defer.Deferred(withdraw)
        self._waiters.append(d)
        self._dispatch()
        return d

    def take(self, limit: int) -> list[StreamEntry]:
        out: list[StreamEntry] = []
        while self._buffer and len(out) < limit:
            out.append(self._buffer.popleft())
        self._room()
        return out

    @staticmethod
    def read_entries(entries: Sequence[StreamEntry]) -> list[bytes | WorkSourceError]:
        return [e.record for e in entries]

    def ack_keys(self, keys: Iterable[Key]) -> None:
        """Done with these (stored, discarded or unrouted): XACK and XDEL,
        gathered for ACK_DELAY."""
        for key in keys:
            self._held.discard(key)
            self._acks.append(key)
            self._unacked.add(key)
        if self._acks and self._ack_call is None and self._acking is None:
            self._ack_call = self.clock.callLater(ACK_DELAY, self._ack_due)

    def _dispatch(self) -> None:
        while self._buffer and self._waiters:
            self._waiters.popleft().callback(self._buffer.popleft())
        self._room()

    def _room(self) -> None:
        d = self._room_wait
        if d is not None and not d.called and self._has_room():
            self._room_wait = None
            d.callback(None)

    def _has_room(self) -> bool:
        # Read ahead at most one batch: the rest stays in the stream for
        # other workers rather than idling in this one's buffer.
        return len(self._buffer) < self.cfg.batch

    # -- reading -----------------------------------------------------------

    async def _fetch_loop(self) -> None:
        cursor = b"0"  # first our own pending entries, left by a previous run
        while self._fetching:
            try:
                if not self._has_room():
                    self._room_wait = defer.Deferred()
                    await self._room_wait
                await self._waiting(self.link.wait_up())
            except defer.CancelledError:
                continue
            if not self._fetching:
                return
            try:
                reply = await self.link.call("read", self._xreadgroup, cursor)
            except QueueUnavailableError:
                continue
            entries = _stream_entries(reply)
            if cursor == b">":
                self._receive(entries, "new")
            elif entries:
                cursor = entries[-1][0]  # page through the pending list
                self._receive(entries, "own")
            else:
                cursor = b">"

    def _waiting(self, d: defer.Deferred[None]) -> defer.Deferred[None]:
        self._wait = d
        return d

    def _xreadgroup(self, client: RedisClient, cursor: bytes) -> Reply:
        import redis

        try:
            return client.execute_command(
                "XREADGROUP", "GROUP", self.link.group, self.consumer,
                "COUNT", self.cfg.batch, "BLOCK", self._block_ms,
                "STREAMS", self.link.stream, cursor,
            )  # fmt: skip
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            # Redis lost the group (restarted without its data): make it again.
            self.link.ensure_group(client)
            return None

    def _receive(self, entries: list[tuple[bytes, Reply]], how: str) -> None:
        trimmed = []
        n = 0
        for raw_id, fields in entries:
            key = parse_id(raw_id)
            record = _record(fields)
            if record is None:
                trimmed.append(key)  # shed before it was read: drop its pending entry
                continue
            if key in self._held or key in self._unacked:
                # Already ours: claimed back from ourselves (our refresh
                # failed for a while), or done and waiting for its XACK.
                continue
            self._held.add(key)
            self._buffer.append(StreamEntry(key, record))
            n += 1
        if n:
            self.metrics.queue_read.labels(how=how).inc(n)
        if trimmed:
            self.ack_keys(trimmed)
        self._dispatch()

    # -- holding and taking over -----------------------------------------

    def _refresh_held(self) -> defer.Deferred[None] | None:
        """Reset the idle time of every entry we hold, so that XAUTOCLAIM
        elsewhere takes only a dead worker's entries."""
        ids = [format_id(k) for k in (*self._held, *self._acks)]
        if not ids or not self.link.up:
            return None
        d = self.link.call("refresh", self._xclaim_self, ids)
        d.addErrback(lambda f: f.trap(QueueUnavailableError))
        return d

    def _xclaim_self(self, client: RedisClient, ids: list[bytes]) -> None:
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(ids), ACK_CHUNK):
            pipe.execute_command(
                "XCLAIM", self.link.stream, self.link.group, self.consumer, 0,
                *ids[i : i + ACK_CHUNK], "JUSTID",
            )  # fmt: skip
        pipe.execute()

    def _claim_idle(self) -> defer.Deferred[None] | None:
        if not self.link.up or not self._fetching or not self._has_room():
            return None
        return defer.ensureDeferred(self._claim_all())

    async def _claim_all(self) -> None:
        """Take over idle entries a batch at a time until none is left: a
        dead worker may hold many batches (its open bundles), and each one
        would otherwise wait another claim_idle/2."""
        while self.link.up and self._fetching:
            try:
                entries = await self.link.call("claim", self._xautoclaim)
            except QueueUnavailableError:
                return
            self._claimed(entries)
            if len(entries) < self.cfg.batch:
                return
            while self._fetching and not self._has_room():
                await task.deferLater(as_reactor_time(self.clock), CLAIM_PAUSE, lambda: None)

    def _xautoclaim(self, client: RedisClient) -> list[tuple[bytes, Reply]]:
        """(In a pool thread.) Take over entries idle for claim_idle, up to a
        batch, scanning the whole pending list at most once."""
        claimed: list[tuple[bytes, Reply]] = []
        cursor = b"0-0"
        idle_ms = int(self.cfg.claim_idle * 1000)
        while len(claimed) < self.cfg.batch:
            reply = client.execute_command(
                "XAUTOCLAIM", self.link.stream, self.link.group, self.consumer, idle_ms,
                cursor, "COUNT", self.cfg.batch - len(claimed),
            )  # fmt: skip
            cursor = reply[0]
            # Redis 7 lists entries trimmed meanwhile apart (reply[2]) and
            # drops them from the pending list itself; Redis 6.2 gives them
            # as entries without fields.
            claimed += [(i, f) for i, f in reply[1] if i is not None]
            if cursor == b"0-0":
                break
        return claimed

    def _claimed(self, entries: list[tuple[bytes, Reply]]) -> None:
        if not entries:
            return
        log.info(
            "took over {n} message(s) idle for over {idle:g}s (a worker stopped or was cut off)",
            n=len(entries),
            idle=self.cfg.claim_idle,
        )
        self._receive(entries, "claimed")

    # -- acknowledging -----------------------------------------------------

    def _ack_due(self) -> None:
        self._ack_call = None
        self._acking = defer.ensureDeferred(self._flush_acks())

    async def _flush_acks(self) -> None:
        try:
            while self._acks:
                batch, self._acks = self._acks[: ACK_CHUNK * 4], self._acks[ACK_CHUNK * 4 :]
                try:
                    await self.link.call("ack", self._xack, [format_id(k) for k in batch])
                except QueueUnavailableError:
                    self._acks[:0] = batch  # kept, and tried again once Redis answers
                    if not self._fetching:
                        return  # stopping: one try only
                    self._ack_wait = self.link.wait_up()
                    await self._ack_wait
                    continue
                self._unacked.difference_update(batch)
                self.metrics.queue_acked.inc(len(batch))
        except defer.CancelledError:
            return
        finally:
            self._acking = None

    def _xack(self, client: RedisClient, ids: list[bytes]) -> None:
        # XDEL too: the stream then holds only unprocessed messages, so
        # MAXLEN bounds the backlog and what it trims is really shed.
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(ids), ACK_CHUNK):
            chunk = ids[i : i + ACK_CHUNK]
            pipe.execute_command("XACK", self.link.stream, self.link.group, *chunk)
            pipe.execute_command("XDEL", self.link.stream, *chunk)
        pipe.execute()


def _stream_entries(reply: Reply) -> list[tuple[bytes, Reply]]:
    """XREADGROUP's raw reply for one stream -> [(id, fields or None)]."""
    if not reply:
        return []
    _stream, entries = reply[0]
    return [(e[0], e[1]) for e in entries]


def _record(fields: Reply) -> bytes | None:
    if not fields:
        return None
    pairs = dict(zip(fields[::2], fields[1::2], strict=True))
    value = pairs.get(RECORD)
    return value if isinstance(value, bytes) else None
