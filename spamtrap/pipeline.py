"""The worker side: spool -> filter stages -> sets -> bundle writers.

``workers`` loops each take the next spooled message and process it in the
bounded filter thread pool, so the reactor only hands work around. A message
leaves the spool (is acked) once every bundle it went into has been stored,
or at once when the stages discard it or no set wants it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from spamtrap import mbox
from spamtrap.collate import Collator
from spamtrap.filters import Outcome, Stage, run_stages
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.spool import SpoolError

log = Logger()

# Messages handed to a worker thread at once, and how long a worker waits
# for a batch to fill. A hop to a thread and back costs far more than
# processing one message, and bundles are not due for minutes: gathering
# keeps the reactor (and the GIL) free for SMTP.
BATCH = 256
BATCH_WAIT = 0.05


@dataclass
class Pending:
    """A spooled message waiting for the bundles that hold it to be stored."""

    entry: Any
    remaining: int


@dataclass
class Result:
    env: Envelope
    outcome: Outcome
    sets: list[str]


def evaluate(stages: Sequence[tuple[str, Stage]], collator: Collator, env: Envelope) -> Result:
    """The decision for one message; shared by the daemon and ``spamtrap explain``."""
    outcome = run_stages(stages, env)
    sets = collator.sets_for(env) if outcome.keep else []
    return Result(env, outcome, sets)


class Pipeline:
    def __init__(
        self,
        spool: Any,
        stages: Sequence[tuple[str, Stage]],
        collator: Collator,
        bundles: dict[str, Any],
        metrics: Metrics,
        reactor: Any,
        pool: Any,
        workers: int,
    ) -> None:
        self.spool = spool
        self.stages = list(stages)
        self.collator = collator
        self.bundles = bundles
        self.metrics = metrics
        self.reactor = reactor
        self.pool = pool
        self.workers = workers
        self.running = False
        self._loops: list[defer.Deferred[None]] = []
        self._gets: set[defer.Deferred[Any]] = set()
        self._busy = 0

    # BundleSet's on_stored callback: runs in the reactor thread.
    def stored(self, tokens: list[Pending]) -> None:
        for p in tokens:
            p.remaining -= 1
            if p.remaining == 0:
                self.spool.ack(p.entry)

    def start(self) -> None:
        self.running = True
        self._loops = [defer.ensureDeferred(self._loop()) for _ in range(self.workers)]

    async def _loop(self) -> None:
        while self.running:
            get = self.spool.get()
            self._gets.add(get)
            try:
                entry = await get
            except (defer.CancelledError, SpoolError):
                return  # stopping
            finally:
                self._gets.discard(get)
            # Take what else is queued, up to a batch: one thread hop and one
            # round of bookkeeping for many messages keeps the reactor free.
            batch = [entry]
            self._busy += 1  # held from here on: drain() must wait for it
            try:
                if self.spool.depth < BATCH - 1 and self.running:
                    await task.deferLater(self.reactor, BATCH_WAIT, lambda: None)
                more = self.spool.take(BATCH - 1)
                self._busy += len(more)
                batch += more
                await self._process(batch)
            finally:
                self._busy -= len(batch)

    async def _process(self, batch: list[Any]) -> None:
        tokens = [Pending(e, 0) for e in batch]
        results = await deferToThreadPool(self.reactor, self.pool, self._work_batch, tokens)
        verdicts: Counter[tuple[str, str, str]] = Counter()
        for token, result in zip(tokens, results, strict=True):
            if result is None:
                self.metrics.processing_errors.inc()
                continue  # logged; the message stays in the spool
            self.metrics.messages_processed.inc()
            for v in result.outcome.verdicts:
                verdicts[(v.stage, v.verdict, v.reason)] += 1
            if not result.sets:
                self.spool.ack(token.entry)
        for (stage, verdict, reason), n in verdicts.items():
            self.metrics.filter_verdicts.labels(stage=stage, verdict=verdict, reason=reason).inc(n)

    def _work_batch(self, tokens: list[Pending]) -> list[Result | None]:
        out: list[Result | None] = []
        for token in tokens:
            try:
                out.append(self._work(token))
            except Exception:  # noqa: BLE001 - one bad record must not stop the batch
                log.failure("processing spooled message failed; it stays spooled")
                out.append(None)
        return out

    def _work(self, token: Pending) -> Result:
        """In a pool thread: read, decide, and write into the sets' bundles."""
        env = Envelope.from_record(token.entry.read())
        result = evaluate(self.stages, self.collator, env)
        if result.sets:
            data = mbox.entry(env.mail_from, env.received_at, env.full_bytes())
            # Set before any add(): a bundle may be stored before the last add.
            token.remaining = len(result.sets)
            for name in result.sets:
                self.bundles[name].add(data, env.received_at, token)
        return result

    @property
    def idle(self) -> bool:
        return self._busy == 0

    async def drain(self) -> None:
        """Process everything spooled, then stop the loops."""
        while self.running and (self.spool.depth > 0 or self._busy):
            d: defer.Deferred[None] = defer.Deferred()
            self.reactor.callLater(0.05, d.callback, None)
            await d
        await self.stop()

    async def stop(self) -> None:
        self.running = False
        for g in list(self._gets):
            g.cancel()
        await defer.DeferredList(self._loops)
