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
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from spamtrap.config import QueueConfig
from spamtrap.errors import IntakeUnavailableError, SourceStoppedError, WorkSourceError
from spamtrap.interfaces import (
    DelayedCall,
    ReactorFromThreads,
    ReactorTime,
    WorkerReactor,
    as_reactor_from_threads,
    as_reactor_time,
    pick_clock,
)
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.work.spool import Spool, SpoolEntry, SpoolError, read_entries

log = Logger()

RECORD = b"r"  # the stream entry's one field: the spool record
ACK_DELAY = 0.05  # acks gathered this long go to Redis in one round trip
ACK_CHUNK = 1000  # ids per XACK/XDEL/XCLAIM command
STATS_INTERVAL = 5.0
MAX_BLOCK = 1.0  # longest XREADGROUP BLOCK, in seconds: bounds a clean stop
CLAIM_PAUSE = 0.05  # while taking over a backlog: wait this long for buffer room
# An outage is logged when it starts, then "still unreachable" this many
# seconds into it, then every OUTAGE_REPORT_EVERY: never once per probe.
OUTAGE_REPORTS = (1.0, 10.0, 60.0)
OUTAGE_REPORT_EVERY = 300.0
# WAIT may block for this share of queue.timeout: the socket's own timeout
# (all of it) must not fire first, or an applied XADD would count as failed.
WAIT_SHARE = 0.5


class QueueUnavailableError(IntakeUnavailableError):
    """Redis did not acknowledge in time (or is unreachable). An intake
    refusal for SMTP (451, try later); the queue's own loops wait for Redis
    to answer again."""


class ReplicasMissingError(QueueUnavailableError):
    """Fewer replicas than ``queue.replicas`` acknowledged (WAIT)."""


Key = tuple[int, int]  # a stream entry id, 1700000000000-5 -> (1700000000000, 5)


def parse_id(raw: bytes) -> Key:
    ms, _, seq = raw.partition(b"-")
    return int(ms), int(seq)


def format_id(key: Key) -> bytes:
    return b"%d-%d" % key


@dataclass(eq=False)
class StreamEntry:
    """A message read from the stream; ``key`` plays the spool key's part."""

    key: Key
    record: bytes


def connect(cfg: QueueConfig) -> Any:
    """A redis-py client for ``cfg.url``, with replies left raw (the same on
    every redis-py version) and no hidden retries: a failed call is ours to
    handle, and a retried XADD would only add a duplicate."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    assert cfg.url is not None
    kwargs: dict[str, Any] = {
        "socket_timeout": cfg.timeout,
        "socket_connect_timeout": cfg.timeout,
        "max_connections": cfg.connections,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if cfg.username is not None:
        kwargs["username"] = cfg.username
    password = cfg.password
    if cfg.password_file is not None:
        with open(cfg.password_file, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    if password is not None:
        kwargs["password"] = password
    if urlsplit(cfg.url).scheme == "rediss":
        if cfg.ca_file is not None:
            kwargs["ssl_ca_certs"] = cfg.ca_file
        if cfg.cert_file is not None:
            kwargs["ssl_certfile"] = cfg.cert_file
            kwargs["ssl_keyfile"] = cfg.key_file
    if int(redis.__version__.split(".")[0]) >= 5:
        kwargs["protocol"] = 2  # the replies parsed here; newer redis-py may default to 3
    client = redis.Redis.from_url(cfg.url, **kwargs)
    client.response_callbacks.clear()  # a per-client copy in every version
    return client


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError)


def wait_ms(cfg: QueueConfig) -> int:
    return max(1, int(cfg.timeout * 1000 * WAIT_SHARE))


def format_duration(seconds: float) -> str:
    """``45s``, ``5m``, ``1h30m``: how long an outage has lasted."""
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def describe(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class QueueLink:
    """The Redis client, the thread pool its calls run in, and whether Redis
    answers. A failed call marks Redis down; a probe then tries every
    ``retry_interval`` until it answers again."""

    def __init__(
        self,
        cfg: QueueConfig,
        metrics: Metrics,
        reactor: ReactorFromThreads,
        client: Any = None,  # a redis-py client: its replies are untyped
        clock: ReactorTime | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.reactor = as_reactor_from_threads(reactor)  # the pool's way back
        self.clock = pick_clock(clock, reactor)
        self.client = client if client is not None else connect(cfg)
        self.stream = cfg.stream.encode()
        self.group = cfg.group.encode()
        self.pool = ThreadPool(minthreads=0, maxthreads=cfg.connections, name="spamtrap-redis")
        self.up = False
        self._errors = _redis_errors()
        self._up_waiters: list[defer.Deferred[None]] = []
        self.settled = False
        self._settle_waiters: list[defer.Deferred[None]] = []
        self._probe: task.LoopingCall | None = None
        self._stats: task.LoopingCall | None = None
        self.running = False
        # When the current outage began (clock seconds), and when its next
        # "still unreachable" line is due, in seconds into it.
        self._down_since: float | None = None
        self._report_at = OUTAGE_REPORTS[0]
        metrics.queue_up.set(0)

    def start(self) -> None:
        self.running = True
        self.pool.start()
        # Until Redis has answered once, it counts as down: the probe also
        # creates the consumer group, so nothing is read or added before.
        self._start_probe(now=True)
        self._stats = task.LoopingCall(self._read_stats)
        self._stats.clock = as_reactor_time(self.clock)
        self._stats.start(STATS_INTERVAL, now=False).addErrback(self._log_loop_failure)

    def stop(self) -> None:
        """Stop probing; the pool finishes the calls in flight (each bounded
        by ``timeout``) before its threads exit."""
        self.running = False
        for loop in (self._probe, self._stats):
            if loop is not None and loop.running:
                loop.stop()
        waiters, self._up_waiters = self._up_waiters, []
        for d in waiters:
            d.cancel()
        self.pool.stop()

    def call(self, op: str, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Run ``fn(client, *args)`` in the pool. Redis errors become
        QueueUnavailableError, are counted, and mark Redis down."""
        d = deferToThreadPool(self.reactor, self.pool, fn, self.client, *args)
        d.addErrback(self._failed, op)
        return d

    def _failed(self, failure: Failure, op: str) -> Failure:
        if failure.check(*self._errors) is None:
            return failure  # a bug, not an outage: let it be logged as such
        self.metrics.queue_errors.labels(op=op).inc()
        self.mark_down(f"{op}: {failure.value}")
        raise QueueUnavailableError(str(failure.value))

    def mark_down(self, why: str) -> None:
        if not self.up:
            return
        self.up = False
        self.metrics.queue_up.set(0)
        self._outage_began()
        log.warn(
            "Redis {url} unreachable ({why}); retrying every {n:g}s",
            url=describe(self.cfg.url or ""),
            why=why,
            n=self.cfg.retry_interval,
        )
        self._start_probe(now=False)

    def _outage_began(self) -> None:
        self._down_since = self.clock.seconds()
        self._report_at = OUTAGE_REPORTS[0]

    def _outage_report_due(self) -> float | None:
        """The outage's length if a "still unreachable" line is due now."""
        if self._down_since is None:
            return None
        lasted = self.clock.seconds() - self._down_since
        if lasted < self._report_at:
            return None
        later = [t for t in OUTAGE_REPORTS if t > lasted]
        if later:
            self._report_at = later[0]
        else:
            # Every OUTAGE_REPORT_EVERY, on its multiples (5 min, 10 min, ...).
            self._report_at = (lasted // OUTAGE_REPORT_EVERY + 1) * OUTAGE_REPORT_EVERY
        return lasted

    def _mark_up(self) -> None:
        if self.up or not self.running:
            return
        self.up = True
        self.metrics.queue_up.set(1)
        if self._down_since is None:
            log.info("Redis {url} answers", url=describe(self.cfg.url or ""))
        else:
            log.info(
                "Redis {url} answers again after {lasted} unreachable",
                url=describe(self.cfg.url or ""),
                lasted=format_duration(self.clock.seconds() - self._down_since),
            )
            self._down_since = None
        waiters, self._up_waiters = self._up_waiters, []
        for d in waiters:
            d.callback(None)

    def wait_up(self) -> defer.Deferred[None]:
        """Fires once Redis answers (at once if it does). Cancellable."""
        if self.up:
            return defer.succeed(None)

        def withdraw(d: defer.Deferred[None]) -> None:
            if d in self._up_waiters:
                self._up_waiters.remove(d)

        d: defer.Deferred[None] = defer.Deferred(withdraw)
        self._up_waiters.append(d)
        return d

    def _start_probe(self, now: bool) -> None:
        if not self.running or (self._probe is not None and self._probe.running):
            return
        self._probe = task.LoopingCall(self._try)
        self._probe.clock = as_reactor_time(self.clock)
        self._probe.start(self.cfg.retry_interval, now=now).addErrback(self._log_loop_failure)

    def _try(self) -> defer.Deferred[None]:
        d = deferToThreadPool(self.reactor, self.pool, self.ensure_group, self.client)
        d.addCallbacks(self._probe_ok, self._probe_failed)
        return d

    def _probe_ok(self, _: object) -> None:
        if self._probe is not None and self._probe.running:
            self._probe.stop()
        self._mark_up()
        self._settle()

    def _settle(self) -> None:
        waiters, self._settle_waiters = self._settle_waiters, []
        self.settled = True
        for d in waiters:
            d.callback(None)

    def first_answer(self) -> defer.Deferred[None]:
        """Fires once the first attempt to reach Redis is over, either way:
        until then, nobody can tell whether Redis is down."""
        if self.settled:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._settle_waiters.append(d)
        return d

    def _probe_failed(self, failure: Failure) -> None:
        if failure.check(QueueUnavailableError, *self._errors) is None:
            log.failure("Redis probe failed", failure)
        elif not self.settled:
            # At start nothing was logged yet: a wrong password or address
            # must show up at once, not as silence.
            self._outage_began()
            log.warn(
                "Redis {url} unreachable at start ({err}); retrying every {n:g}s",
                url=describe(self.cfg.url or ""),
                err=failure.value,
                n=self.cfg.retry_interval,
            )
        else:
            lasted = self._outage_report_due()
            if lasted is not None:
                log.warn(
                    "Redis {url} still unreachable after {lasted} ({err})",
                    url=describe(self.cfg.url or ""),
                    lasted=format_duration(lasted),
                    err=failure.value,
                )
        self._settle()

    def ensure_group(self, client: Any) -> None:
        """(In a pool thread.) Create the stream and the group, starting
        from the stream's beginning, unless they exist."""
        import redis

        try:
            client.execute_command("XGROUP", "CREATE", self.stream, self.group, "0", "MKSTREAM")
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        if self.cfg.replicas:
            # Up means adds can succeed: that needs the replicas too.
            n = client.execute_command("WAIT", self.cfg.replicas, wait_ms(self.cfg))
            if n < self.cfg.replicas:
                raise ReplicasMissingError(f"{n} of {self.cfg.replicas} replica(s) connected")

    def _read_stats(self) -> defer.Deferred[None] | None:
        if not self.up:
            return None
        d = self.call("stats", self._stats_call)
        d.addCallbacks(self._got_stats, lambda f: f.trap(QueueUnavailableError))
        return d

    def _stats_call(self, client: Any) -> tuple[int, int, int]:
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("XLEN", self.stream)
        pipe.execute_command("XPENDING", self.stream, self.group)
        pipe.execute_command("GET", self.stream + b":shed")
        length, pending, shed = pipe.execute(raise_on_error=False)
        # A missing group (Redis lost its data) reads as an error here: the
        # workers' next read creates it again.
        pending_n = pending[0] if isinstance(pending, list) and pending else 0
        shed_n = int(shed) if isinstance(shed, bytes) else 0
        return (length if isinstance(length, int) else 0), pending_n, shed_n

    def _got_stats(self, stats: tuple[int, int, int]) -> None:
        length, pending, shed = stats
        self.metrics.queue_length.set(length)
        self.metrics.queue_pending.set(pending)
        self.metrics.queue_shed_cluster.set(shed)

    @staticmethod
    def _log_loop_failure(failure: Failure) -> None:
        log.failure("Redis queue loop stopped", failure)


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

    def add_many(self, records: Sequence[bytes]) -> defer.Deferred[Any]:
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
            d = self.link.call("xadd", self._xadd, [r for r, _ in batch])
            d.addBoth(self._flushed, batch)

    def _xadd(self, client: Any, records: list[bytes]) -> int:
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

    def _flushed(self, result: Any, batch: list[tuple[bytes, defer.Deferred[None]]]) -> None:
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
        self._wait: defer.Deferred[Any] | None = None

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

    def _waiting(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        self._wait = d
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


# -- worker side ---------------------------------------------------------


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
        self._wait: defer.Deferred[Any] | None = None  # for Redis to answer
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
        for d in waiters:
            d.errback(SourceStoppedError("queue reader stopped"))

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

    def _waiting(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        self._wait = d
        return d

    def _xreadgroup(self, client: Any, cursor: bytes) -> Any:
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

    def _receive(self, entries: list[tuple[bytes, Any]], how: str) -> None:
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

    def _refresh_held(self) -> defer.Deferred[Any] | None:
        """Reset the idle time of every entry we hold, so that XAUTOCLAIM
        elsewhere takes only a dead worker's entries."""
        ids = [format_id(k) for k in (*self._held, *self._acks)]
        if not ids or not self.link.up:
            return None
        d = self.link.call("refresh", self._xclaim_self, ids)
        d.addErrback(lambda f: f.trap(QueueUnavailableError))
        return d

    def _xclaim_self(self, client: Any, ids: list[bytes]) -> None:
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(ids), ACK_CHUNK):
            pipe.execute_command(
                "XCLAIM", self.link.stream, self.link.group, self.consumer, 0,
                *ids[i : i + ACK_CHUNK], "JUSTID",
            )  # fmt: skip
        pipe.execute()

    def _claim_idle(self) -> defer.Deferred[Any] | None:
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

    def _xautoclaim(self, client: Any) -> list[tuple[bytes, Any]]:
        """(In a pool thread.) Take over entries idle for claim_idle, up to a
        batch, scanning the whole pending list at most once."""
        claimed: list[tuple[bytes, Any]] = []
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

    def _claimed(self, entries: list[tuple[bytes, Any]]) -> None:
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

    def _xack(self, client: Any, ids: list[bytes]) -> None:
        # XDEL too: the stream then holds only unprocessed messages, so
        # MAXLEN bounds the backlog and what it trims is really shed.
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(ids), ACK_CHUNK):
            chunk = ids[i : i + ACK_CHUNK]
            pipe.execute_command("XACK", self.link.stream, self.link.group, *chunk)
            pipe.execute_command("XDEL", self.link.stream, *chunk)
        pipe.execute()


def _stream_entries(reply: Any) -> list[tuple[bytes, Any]]:
    """XREADGROUP's raw reply for one stream -> [(id, fields or None)]."""
    if not reply:
        return []
    _stream, entries = reply[0]
    return [(e[0], e[1]) for e in entries]


def _record(fields: Any) -> bytes | None:
    if not fields:
        return None
    pairs = dict(zip(fields[::2], fields[1::2], strict=True))
    value = pairs.get(RECORD)
    return value if isinstance(value, bytes) else None
