"""The link to Redis shared by both sides of the work queue: the client,
its thread pool, whether Redis answers (probes, outage reports), and the
errors (see spamtrap.work.queue for the whole design)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, TypeVarTuple
from urllib.parse import urlsplit

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from spamtrap.config import QueueConfig
from spamtrap.errors import IntakeUnavailableError
from spamtrap.interfaces import (
    ReactorFromThreads,
    ReactorTime,
    as_reactor_from_threads,
    as_reactor_time,
    pick_clock,
)
from spamtrap.metrics import Metrics

# One namespace for everything the work queue logs, whichever module of it.
log = Logger(namespace="spamtrap.work.queue")

RECORD = b"r"  # the stream entry's one field: the spool record
STATS_INTERVAL = 5.0
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


# A raw RESP2 reply (the client's response callbacks are cleared): bytes,
# an int, None, or a list of those, nested. redis-py types none of it, so
# each reader checks the shape it expects.
Reply = Any


class RedisPipeline(Protocol):
    """The part of a redis-py pipeline the queue uses."""

    def execute_command(self, *args: str | bytes | int) -> object: ...

    def execute(self, raise_on_error: bool = True) -> list[Reply]: ...


class RedisClient(Protocol):
    """The part of a redis-py client the queue uses."""

    def execute_command(self, *args: str | bytes | int) -> Reply: ...

    def pipeline(self, transaction: bool = True) -> RedisPipeline: ...


_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")


def connect(cfg: QueueConfig) -> RedisClient:
    """A redis-py client for ``cfg.url``, with replies left raw (the same on
    every redis-py version) and no hidden retries: a failed call is ours to
    handle, and a retried XADD would only add a duplicate."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    assert cfg.url is not None
    kwargs: dict[str, object] = {
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
    return client  # type: ignore[no-any-return]  # redis-py without its stubs: untyped


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
        client: RedisClient | None = None,
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

    def call(
        self, op: str, fn: Callable[[RedisClient, *_Args], _T], *args: *_Args
    ) -> defer.Deferred[_T]:
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

    def ensure_group(self, client: RedisClient) -> None:
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
        d = self.call("stats", self._stats_call).addCallback(self._got_stats)
        d.addErrback(lambda f: f.trap(QueueUnavailableError))
        return d

    def _stats_call(self, client: RedisClient) -> tuple[int, int, int]:
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
