"""The worker side: spool -> filter stages -> sets -> bundle writers.

``workers`` loops each take the next spooled message and process it in the
bounded filter thread pool, so the reactor only hands work around. A message
leaves the spool (is acked) once every bundle it went into has been stored,
or at once when the stages discard it or no set wants it.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from spamtrap.bundle import index, mbox
from spamtrap.bundle.file import Item
from spamtrap.config import Config
from spamtrap.errors import WorkSourceError
from spamtrap.filters import Outcome, Stage, run_stages
from spamtrap.interfaces import (
    EntryT,
    WorkerReactor,
    WorkSource,
    as_reactor_from_threads,
    as_reactor_time,
)
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.outputs.base import Handoff, OutputSink
from spamtrap.outputs.queue import ItemBase, encode_item
from spamtrap.work.campaign import CampaignAssigner, CampaignIndex
from spamtrap.work.collate import Collator
from spamtrap.work.dedup import Deduper
from spamtrap.work.redact import EnvelopeRedactor, redact_text

log = Logger()

# Messages handed to a worker thread at once, and how long a worker waits
# for a batch to fill. A hop to a thread and back costs far more than
# processing one message, and bundles are not due for minutes: gathering
# keeps the reactor (and the GIL) free for SMTP.
BATCH = 256
BATCH_WAIT = 0.05


@dataclass(eq=False)
class Pending:
    """A spooled message in several sets, waiting for the bundles that hold
    it to be stored."""

    key: tuple[int, int]  # SpoolEntry.key
    remaining: int


# What a bundle holds for each message, to hand back once it is stored: the
# message's spool key when it went to one set (the usual case), or a Pending
# shared by its sets. Keys are tuples of ints, which the garbage collector
# stops tracking; open bundles hold many thousands of them for an hour.
Token = tuple[int, int] | Pending


@dataclass
class Result:
    env: Envelope
    outcome: Outcome
    sets: list[str]  # every set anything of this message lands in
    # What is stored: each surviving message (the original, or what a stage
    # such as rfc822 extraction replaced it with) with the sets it lands in.
    deliveries: list[tuple[Envelope, list[str]]] = field(default_factory=list)


def survivor_sets(collator: Collator, outcome: Outcome) -> list[tuple[Envelope, list[str]]]:
    """Each message that goes on, with the sets it lands in: the set rules'
    choice, plus the sets stages routed it to (only those, with only=True).
    Sets that are not configured are left out."""
    known = [s.name for s in collator.sets]
    out = []
    for env, route in outcome.survivors:
        by_rules = collator.sets_for(env)
        if route is None:
            chosen = set(by_rules)
        elif route.only:
            chosen = set(route.sets)
        else:
            chosen = {*by_rules, *route.sets}
        out.append((env, [name for name in known if name in chosen]))
    return out


def evaluate(
    stages: Sequence[tuple[str, Stage]],
    collator: Collator,
    env: Envelope,
    budget: float = float("inf"),
    campaigns: CampaignAssigner | None = None,
) -> Result:
    """The decision for one message; shared by the daemon and ``spamtrap explain``.
    With ``campaigns``, each message the stages keep gets its campaign
    before the set rules run (they may read ``meta: campaign``)."""
    outcome = run_stages(stages, env, budget)
    if campaigns is not None and outcome.keep:
        for survivor, _ in outcome.survivors:
            campaigns.assign(survivor)
    deliveries = survivor_sets(collator, outcome) if outcome.keep else []
    sets = [s.name for s in collator.sets if any(s.name in d for _, d in deliveries)]
    return Result(env, outcome, sets, deliveries)


class StoredAcks(Generic[EntryT]):
    """The ``BundleSink`` the bundle sets call back: a message leaves the
    work source once every bundle holding it is stored.

    Its own object so the bundle sets can be built before the pipeline
    that writes into them: each needs the other, and neither is patched
    after construction."""

    def __init__(self, work: WorkSource[EntryT]) -> None:
        self.work = work

    # BundleSet's on_stored callback: runs in the reactor thread.
    def stored(self, tokens: Sequence[Token]) -> None:
        done = []
        for token in tokens:
            if not isinstance(token, Pending):
                done.append(token)
                continue
            token.remaining -= 1
            if token.remaining == 0:
                done.append(token.key)
        self.work.ack_keys(done)


class Pipeline(Generic[EntryT]):
    """Takes messages from a ``WorkSource`` (``spool``: the local spool or
    the Redis stream), and is the ``BundleSink`` its bundles call back
    (through ``acks``: pass the one the bundle sets were given)."""

    def __init__(
        self,
        spool: WorkSource[EntryT],
        stages: Sequence[tuple[str, Stage]],
        collator: Collator,
        bundles: Mapping[str, Any],
        metrics: Metrics,
        reactor: WorkerReactor,
        pool: ThreadPool,
        workers: int,
        config: Config | None = None,
        *,
        acks: StoredAcks[EntryT] | None = None,
        on_processed: Callable[[list[Envelope]], object] | None = None,
        outputs: OutputSink | None = None,
    ) -> None:
        self.spool = spool
        # Per-message outputs: each kept copy of a set they list is queued
        # durably before the spool entry may be acked (it holds one count
        # of the entry's Pending until the appends commit).
        self.outputs = outputs
        # Called in the reactor thread once per batch with the messages that
        # landed in a set (the dashboard counts their campaigns).
        self.on_processed = on_processed
        self.stages = list(stages)
        self.collator = collator
        self.bundles = bundles
        self.acks = acks if acks is not None else StoredAcks(spool)
        if self.acks.work is not spool:
            raise ValueError("acks must acknowledge into the pipeline's own work source")
        self.metrics = metrics
        self.reactor = reactor
        self.pool = pool
        self.workers = workers
        self.running = False
        self._loops: list[defer.Deferred[None]] = []
        self._gets: set[defer.Deferred[EntryT]] = set()
        self._busy = 0
        # Per-set copies: redaction of trap addresses and dedup windows.
        cfg = config or Config()
        self.budget = cfg.filters.stage_budget
        self.redactor = EnvelopeRedactor(cfg.traps, cfg.feeds)
        self.redacting = {s.name for s in cfg.sets if s.redact_trap_addresses}
        self.dedupers = {
            s.name: Deduper(s.dedup_window, reactor) for s in cfg.sets if s.dedup_window > 0
        }
        # Sets storing the wire bytes; every other set stores unix line ends.
        self.wire_sets = {s.name for s in cfg.sets if s.line_endings == "wire"}
        # Campaign ids, on each message the stages keep, before the set
        # rules and any set's redaction (a redacted copy is in the same campaign).
        self.campaigns = (
            CampaignAssigner(
                CampaignIndex(reactor, cfg.campaigns.window, cfg.campaigns.max_campaigns), metrics
            )
            if cfg.campaigns.enabled
            else None
        )

    def stored(self, tokens: Sequence[Token]) -> None:
        """The BundleSink: see StoredAcks."""
        self.acks.stored(tokens)

    def start(self) -> None:
        self.running = True
        self._loops = [defer.ensureDeferred(self._loop()) for _ in range(self.workers)]

    async def _loop(self) -> None:
        while self.running:
            get = self.spool.get()
            self._gets.add(get)
            try:
                entry = await get
            except (defer.CancelledError, WorkSourceError):
                return  # stopping
            finally:
                self._gets.discard(get)
            # Take what else is queued, up to a batch: one thread hop and one
            # round of bookkeeping for many messages keeps the reactor free.
            batch = [entry]
            self._busy += 1  # held from here on: drain() must wait for it
            try:
                if self.spool.depth < BATCH - 1 and self.running:
                    await task.deferLater(as_reactor_time(self.reactor), BATCH_WAIT, lambda: None)
                more = self.spool.take(BATCH - 1)
                self._busy += len(more)
                batch += more
                await self._process(batch)
            finally:
                self._busy -= len(batch)

    async def _process(self, batch: list[EntryT]) -> None:
        handoffs: list[tuple[Token, list[Handoff]]] = []
        results = await deferToThreadPool(
            as_reactor_from_threads(self.reactor), self.pool, self._work_batch, batch, handoffs
        )
        if handoffs:
            # One hand-over per batch; its messages' counts go when it commits.
            assert self.outputs is not None
            items = [item for _, batch_items in handoffs for item in batch_items]
            self.outputs.enqueue(items).addCallback(self._queued, [t for t, _ in handoffs])
        # Counted and acked once per batch: the reactor's share stays small.
        verdicts: Counter[tuple[str, str, str]] = Counter()
        unrouted = []
        errors = 0
        for entry, result in zip(batch, results, strict=True):
            if result is None:
                errors += 1
                continue  # logged; the message stays in the spool
            for v in result.outcome.verdicts:
                verdicts[(v.stage, v.verdict, v.reason)] += 1
            if not result.sets:
                unrouted.append(entry.key)
        self.spool.ack_keys(unrouted)
        if self.on_processed is not None:
            self._tell_processed(results)
        if errors:
            self.metrics.processing_errors.inc(errors)
        self.metrics.messages_processed.inc(len(batch) - errors)
        for (stage, verdict, reason), n in verdicts.items():
            self.metrics.filter_verdicts.labels(stage=stage, verdict=verdict, reason=reason).inc(n)

    def _tell_processed(self, results: list[Result | None]) -> None:
        assert self.on_processed is not None
        landed = [r.deliveries[0][0] for r in results if r is not None and r.sets and r.deliveries]
        try:
            self.on_processed(landed)
        except Exception:  # noqa: BLE001 - an observer must never stop the pipeline
            log.failure("on_processed failed")

    def _work_batch(
        self,
        batch: list[EntryT],
        handoffs: list[tuple[Token, list[Handoff]]] | None = None,
    ) -> list[Result | None]:
        """In a pool thread: read, decide, and write into the sets' bundles.

        Each step runs for the whole batch: one read (see read_entries), the
        decisions, then one add_many per set. Every system call and every
        zlib call lets the GIL go, and a worker that gives it up and takes
        it back per message makes the reactor wait for it each time."""
        records = self.spool.read_entries(batch)
        results: list[Result | None] = []
        tokens: list[Token | None] = []
        adds: dict[str, list[Item]] = {}
        for entry, record in zip(batch, records, strict=True):
            token: Token | None = None
            try:
                if isinstance(record, WorkSourceError):
                    raise record
                result, token = self._decide(entry, record, adds, handoffs)
            except Exception:  # noqa: BLE001 - one bad record must not stop the batch
                log.failure("processing spooled message failed; it stays spooled")
                result = None
            results.append(result)
            tokens.append(token)
        failed: set[Token] = set()
        for name, items in adds.items():
            # add_many logs a failed write once, with the bundle and spool keys.
            failed.update(self.bundles[name].add_many(items))
        if failed:
            if handoffs:  # stays spooled: it is processed again
                handoffs[:] = [h for h in handoffs if h[0] not in failed]
            return [None if t in failed else r for t, r in zip(tokens, results, strict=True)]
        return results

    def _decide(
        self,
        entry: EntryT,
        record: bytes,
        adds: dict[str, list[Item]],
        handoffs: list[tuple[Token, list[Handoff]]] | None = None,
    ) -> tuple[Result, Token | None]:
        """The decision for one message; its bundle entries (with their
        index fields) go to ``adds``."""
        env = Envelope.from_record(record)
        # Taken before the stages change env: most kept copies are queued
        # for the outputs as this record and their new meta fields.
        base = ItemBase(record, env) if self.outputs is not None else None
        result = evaluate(self.stages, self.collator, env, self.budget, self.campaigns)
        writes: list[tuple[str, bytes, float, bytes, str | None]] = []
        sends: list[Handoff] = []
        reasons = index.notable(result.outcome.verdicts) if result.deliveries else []
        for msg, sets in result.deliveries:
            campaign = next(iter(msg.meta.get("campaign", ())), None)
            # One mbox entry per distinct copy: (redacted?, line endings).
            entries: dict[tuple[bool, str], bytes] = {}
            fields: dict[bool, bytes] = {}  # index fields per (redacted?)
            redacted_env: Envelope | None = None
            for name in sets:
                copy = msg
                if name in self.redacting:
                    redacted_env = redacted_env or self.redactor(msg)
                    copy = redacted_env
                dedup = self.dedupers.get(name)
                # Redact first: copies that differ only in a trap address collapse.
                if dedup is not None and dedup.seen(copy):
                    self.metrics.set_duplicates.labels(set=name).inc()
                    continue
                # Redact before converting line ends: redaction keeps lengths.
                kind = (copy is not msg, "wire" if name in self.wire_sets else "unix")
                data = entries.get(kind)
                if data is None:
                    data = mbox.entry(copy.mail_from, copy.received_at, copy.stored_bytes(kind[1]))
                    entries[kind] = data
                info = fields.get(kind[0])
                if info is None:
                    info = fields[kind[0]] = self._index_fields(msg, copy, reasons)
                writes.append((name, data, msg.received_at, info, campaign))
                if self.outputs is not None:
                    sends += self._handoffs(name, copy, base)
        if not writes:
            result.sets = []  # discarded, unrouted or all duplicates: acked at once
            return result, None
        # One count per bundle entry: the spool entry is acked when all are stored.
        # The outputs' appends together hold one more count.
        counts = len(writes) + (1 if sends else 0)
        token: Token = entry.key if counts == 1 else Pending(entry.key, counts)
        if sends and handoffs is not None:
            handoffs.append((token, sends))
        for name, data, received_at, info, campaign in writes:
            adds.setdefault(name, []).append((data, received_at, token, info, campaign))
        return result, token

    def _queued(self, _: None, tokens: list[Token]) -> None:
        """The outputs' appends of a batch committed: release their counts."""
        self.acks.stored(tokens)

    def _handoffs(self, set_name: str, copy: Envelope, base: ItemBase | None) -> list[Handoff]:
        """The queue records of a set's kept copy, one per output listing
        it, with their crc: one record and one crc for them all, computed
        here in the worker (see OutputSink.enqueue)."""
        assert self.outputs is not None
        names = self.outputs.routes(set_name)
        if not names:
            return []
        record = encode_item(set_name, copy, base)
        crc = zlib.crc32(record)
        return [(name, record, crc) for name in names]

    def _index_fields(
        self, msg: Envelope, copy: Envelope, reasons: list[tuple[str, str, str]]
    ) -> bytes:
        """A stored copy's index fields: from the copy, so a redacted copy's
        (its HELO, ...) are redacted; a stage reason may quote an address too."""
        if copy is not msg and reasons:
            traps = self.redactor.traps.plus(msg.rcpts)
            reasons = [(s, v, redact_text(r, traps)) for s, v, r in reasons]
        return index.encode_fields(copy, len(msg.rcpts), reasons)

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
