"""The runner of one output: from its queue to its ``send``, and back.

``concurrency`` loops each take the next queued entry and try it until it
is sent, fails permanently or ages out:

- every try waits for a token of the output's rate limit (a token bucket
  holding one second's worth of ``rate``, at least one; 0 = unlimited);
- success: counted in ``spamtrap_output_sent_total``, the entry is acked;
- PermanentFailure: counted in ``spamtrap_output_failed_total{reason}`` and
  ``spamtrap_output_dropped_total``, acked (dropped);
- anything else (TemporaryFailure, a far end that answers garbage, a bug
  in a kind): counted by reason (``error`` when it names none) and tried
  again after ``retry_initial`` seconds, doubling up to ``retry_max``,
  each wait times a random factor in [0.8, 1.2]; an entry whose next try
  would come after ``max_age`` in the queue is shed (counted) instead.

An entry being tried (or waiting for its next try) stays unacked in the
queue's log, so a stop or a kill -9 loses nothing: a restart sends it
again, with the same ``X-Spamtrap-Id``. A stop lets sends in flight finish
for ``stop_grace`` seconds, then closes the output (killing its children,
closing its sockets) and leaves what is unsent on disk.

Health: an output is *failing* when its last ``FAILING_AFTER`` tries all
failed, or when its oldest entry has waited more than ``STALE_AFTER``
seconds (or half of ``max_age``, if that is less): it is behind.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task, threads
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from spamtrap import retry
from spamtrap.interfaces import as_reactor_time
from spamtrap.outputs.base import OutputFailure, OutputItem, PermanentFailure
from spamtrap.outputs.queue import decode_item
from spamtrap.work.spool import SpoolEntry, SpoolError, SpoolStoppedError

if TYPE_CHECKING:
    from spamtrap.config.schema import OutputConfig
    from spamtrap.interfaces import ReactorTime
    from spamtrap.metrics import Metrics
    from spamtrap.outputs.base import Output
    from spamtrap.outputs.queue import OutputQueue

log = Logger()

FAILING_AFTER = 3  # consecutive failed tries
STALE_AFTER = 900.0  # seconds the oldest entry may wait before the output is behind
STOP_GRACE = 10.0
JITTER = 0.2


def backoff(settings: OutputConfig, attempt: int, rng: random.Random) -> float:
    """Seconds to wait after failed try ``attempt`` (from 1), with jitter."""
    return retry.backoff(
        settings.retry_initial, settings.retry_max, attempt, rng, (1 - JITTER, 1 + JITTER)
    )


class TokenBucket:
    """``rate`` tokens a second, holding at most max(1, rate); FIFO waiters."""

    def __init__(self, rate: float, clock: ReactorTime) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.clock = clock
        self.stamp = clock.seconds()
        self.waiters: collections.deque[Deferred[None]] = collections.deque()
        self.timer: Any = None

    def take(self) -> Deferred[None]:
        """Fires when a token is taken; cancelling withdraws the request."""
        if self.rate <= 0:
            return defer.succeed(None)
        d: Deferred[None] = Deferred(canceller=self._cancel)
        self.waiters.append(d)
        self._release()
        return d

    def _cancel(self, d: Deferred[None]) -> None:
        try:
            self.waiters.remove(d)
        except ValueError:
            pass

    def _tick(self) -> None:
        self.timer = None
        self._release()

    def _release(self) -> None:
        now = self.clock.seconds()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        while self.waiters and self.tokens >= 1:
            d = self.waiters.popleft()
            if not d.called:
                self.tokens -= 1
                d.callback(None)
        if self.waiters and self.timer is None:
            self.timer = self.clock.callLater((1 - self.tokens) / self.rate, self._tick)

    def stop(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


def read_in_thread(reactor: Any) -> Callable[[SpoolEntry], Deferred[bytes]]:
    """Reads an entry's record in the reactor's thread pool (a disk read)."""

    def read(entry: SpoolEntry) -> Deferred[bytes]:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), entry.read)

    return read


class OutputRunner:
    """Sends one output's queue. Every method runs in the reactor thread."""

    def __init__(
        self,
        output: Output,
        settings: OutputConfig,
        queue: OutputQueue,
        metrics: Metrics,
        clock: ReactorTime,
        read: Callable[[SpoolEntry], Deferred[bytes]],
        *,
        rng: random.Random | None = None,
        stop_grace: float = STOP_GRACE,
    ) -> None:
        self.name = settings.name
        self.output = output
        self.settings = settings
        self.queue = queue
        self.clock = clock
        self.read = read
        self.rng = rng or random.Random()
        self.stop_grace = stop_grace
        self.bucket = TokenBucket(settings.rate, clock)
        self.running = False
        self._loops: list[Deferred[None]] = []
        # Deferreds a loop waits on that a stop cancels at once (a get, a
        # backoff, a rate token), and the sends, cancelled after the grace.
        self._waits: set[Deferred[Any]] = set()
        self._sends: set[Deferred[Any]] = set()
        # Entries being tried: key -> when it was queued.
        self._held: dict[tuple[int, int], float] = {}
        self.consecutive_failures = 0
        self.last_failure: str | None = None  # "reason: detail" of the latest
        self._m_sent = metrics.output_sent.labels(output=self.name)
        self._m_dropped = metrics.output_dropped.labels(output=self.name)
        self._m_shed = metrics.output_shed.labels(output=self.name)
        self._m_failed = metrics.output_failed
        metrics.output_queue_depth.labels(output=self.name).set_function(lambda: self.depth)
        metrics.output_oldest_age.labels(output=self.name).set_function(self.oldest_age)

    # -- state ----------------------------------------------------------

    @property
    def depth(self) -> int:
        """Entries queued or being tried."""
        return self.queue.depth + len(self._held)

    def oldest_age(self) -> float:
        """Seconds the oldest entry (queued or being tried) has waited; 0 if none."""
        times = list(self._held.values())
        queued = self.queue.oldest_queued
        if queued is not None:
            times.append(queued)
        return max(0.0, self.clock.seconds() - min(times)) if times else 0.0

    def failing(self) -> str | None:
        """Why the output counts as failing (for /healthz), or None."""
        if self.consecutive_failures >= FAILING_AFTER:
            return f"last {self.consecutive_failures} sends failed ({self.last_failure})"
        stale = min(STALE_AFTER, self.settings.max_age / 2)
        age = self.oldest_age()
        if age > stale:
            return f"behind: the oldest message has waited {age:.0f}s"
        return None

    # -- lifecycle ------------------------------------------------------

    def start(self) -> None:
        self.running = True
        self._loops = [defer.ensureDeferred(self._loop()) for _ in range(self.settings.concurrency)]

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Stop taking entries; sends in flight get ``stop_grace`` seconds."""
        if not self.running:
            return
        self.running = False
        held = len(self._held)  # being tried, or waiting for their next try
        self.bucket.stop()
        for d in list(self._waits):
            d.cancel()
        loops = defer.DeferredList(list(self._loops), consumeErrors=True)
        if self._sends:
            grace: Deferred[None] = task.deferLater(
                as_reactor_time(self.clock), self.stop_grace, lambda: None
            )
            yield defer.DeferredList([loops, grace], fireOnOneCallback=True, consumeErrors=True)
            if not grace.called:
                grace.cancel()
        try:
            yield defer.maybeDeferred(self.output.close)
        except Exception:  # noqa: BLE001 - a kind's close must not stop the node's stop
            log.failure("output {name}: close failed", name=self.name)
        for d in list(self._sends):
            d.cancel()
        yield loops
        if held:
            log.info(
                "output {name}: {n} message(s) being tried stay queued for the next start",
                name=self.name,
                n=held,
            )

    # -- the loops ------------------------------------------------------

    def _wait(self, d: Deferred[Any]) -> Deferred[Any]:
        self._waits.add(d)
        return d.addBoth(self._unwait, d)

    def _unwait(self, result: object, d: Deferred[Any]) -> object:
        self._waits.discard(d)
        return result

    async def _loop(self) -> None:
        while self.running:
            try:
                entry = await self._wait(self.queue.get())
            except (CancelledError, SpoolStoppedError):
                return
            self._held[entry.key] = entry.received_at
            try:
                await self._deliver(entry)
            except Exception:  # noqa: BLE001 - the loop must go on; the entry stays queued
                log.failure("output {name}: unexpected error", name=self.name)
            finally:
                self._held.pop(entry.key, None)

    async def _deliver(self, entry: SpoolEntry) -> None:
        try:
            set_name, env = decode_item(await self.read(entry))
        except (SpoolError, OSError, ValueError, KeyError) as e:
            # A record that fails its CRC or does not parse: never sendable.
            log.error("output {name}: dropping unreadable entry: {e}", name=self.name, e=e)
            self._m_failed.labels(output=self.name, reason="unreadable").inc()
            self._m_dropped.inc()
            self.queue.ack(entry)
            return
        attempt = 1
        while self.running:
            try:
                await self._wait(self.bucket.take())
            except CancelledError:
                return
            if not self.running:
                return
            item = OutputItem(env, set_name, attempt)
            send = defer.maybeDeferred(self.output.send, item)
            self._sends.add(send)
            try:
                await send
            except Exception as e:  # noqa: BLE001 - any failure is counted, none is a crash
                if not self.running:
                    return  # stopped mid-send: the entry stays queued
                if not self._failed(entry, item, e):
                    return
            else:
                self._sent(entry)
                return
            finally:
                self._sends.discard(send)
            delay = backoff(self.settings, attempt, self.rng)
            if self.clock.seconds() + delay - entry.received_at > self.settings.max_age:
                log.warn(
                    "output {name}: shedding {id}: still failing after {max_age:g}s queued",
                    name=self.name,
                    id=item.id,
                    max_age=self.settings.max_age,
                )
                self._m_shed.inc()
                self.queue.ack(entry)
                return
            try:
                await self._wait(task.deferLater(as_reactor_time(self.clock), delay, lambda: None))
            except CancelledError:
                return
            attempt += 1

    def _sent(self, entry: SpoolEntry) -> None:
        self._m_sent.inc()
        if self.consecutive_failures:
            log.info(
                "output {name}: sends succeed again after {n} failure(s)",
                name=self.name,
                n=self.consecutive_failures,
            )
        self.consecutive_failures = 0
        self.queue.ack(entry)

    def _failed(self, entry: SpoolEntry, item: OutputItem, e: Exception) -> bool:
        """Count a failed try; True when it is to be tried again."""
        reason = e.reason if isinstance(e, OutputFailure) else "error"
        detail = e.detail if isinstance(e, OutputFailure) else repr(e)
        self._m_failed.labels(output=self.name, reason=reason).inc()
        self.last_failure = f"{reason}: {detail}" if detail else reason
        permanent = isinstance(e, PermanentFailure)
        if self.consecutive_failures == 0 or not isinstance(e, OutputFailure):
            # One line per streak of failures (and every unexpected one).
            log.warn(
                "output {name}: sending {id} failed ({why}); {then}",
                name=self.name,
                id=item.id,
                why=self.last_failure,
                then="dropped" if permanent else "retrying with backoff",
            )
        self.consecutive_failures += 1
        if permanent:
            self._m_dropped.inc()
            self.queue.ack(entry)
        return not permanent
