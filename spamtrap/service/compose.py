"""``twistd spamtrap``: the service tree (the command-line options are in
spamtrap/service/options.py; the outputs, dashboard, site and /healthz
wiring in spamtrap/service/wiring.py).

makeService takes the reactor as a parameter so tests can build the whole
tree in-process, and it acquires nothing: directories, the TLS certificate,
discard-list files, the SIGHUP handler and reactor timers are taken when the
tree starts, by SpamtrapService itself or by its child services
(spamtrap/service/startup.py). The command-line options are merged into the config
document and checked once with it (config.merge_overrides). The start and
stop order matters and lives in :class:`SpamtrapService`:

start: spool recovery -> output queues' recovery and runners -> bundle sets
-> filter pool and workers -> HTTP -> SMTP
stop (SIGTERM): SMTP stops listening and finishes replies in progress ->
workers drain the spool -> every open bundle is finalised and stored ->
outputs stop (sends in flight get a grace; the unsent stay queued) ->
spool closed -> HTTP closed. The outputs are started and stopped here,
not as child services: children stop first, and draining still enqueues.

With a Redis queue (--queue), a process has a role: a listener's intake goes
into the stream (its spool only holds what came while Redis was down), a
worker's pipeline reads from the stream, and "all" does both.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints, error
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from spamtrap.bundle.sets import BundleSet
from spamtrap.config import Config
from spamtrap.filters import lists
from spamtrap.filters.registry import build_stages
from spamtrap.intake import memory
from spamtrap.intake.endpoints import DEFAULT_BACKLOG
from spamtrap.intake.smtp import TrapSMTPFactory
from spamtrap.intake.spill import SpillDir
from spamtrap.interfaces import EntryT, Intake, WorkSource
from spamtrap.metrics import Metrics
from spamtrap.notify import Notifier
from spamtrap.service.options import Options
from spamtrap.service.startup import ListsReloader, PTRLookup, SighupHandler, TLSContext
from spamtrap.service.wiring import dashboard_for, health, outputs_for, site_for
from spamtrap.store import StoreConfigError, open_store
from spamtrap.work.collate import Collator
from spamtrap.work.pipeline import Pipeline, StoredAcks
from spamtrap.work.queue import Forwarder, QueueIntake, QueueWriter
from spamtrap.work.queue_link import QueueLink, describe
from spamtrap.work.queue_source import QueueSource, StreamEntry
from spamtrap.work.spool import Spool, SpoolEntry, SpoolError, SpoolIntake

# twistd's ServiceMaker (twisted/plugins/spamtrap_plugin.py) reads this
# module's Options and makeService.
__all__ = ["ListenError", "Options", "SpamtrapService", "makeService", "with_backlog"]

log = Logger()


# Twisted's TCP endpoints listen with a backlog of 50: a burst of spam bots
# then sees SYNs dropped and retried seconds later. A trap never refuses.


def with_backlog(description: str) -> str:
    """Add a large listen backlog to a tcp/tcp6 endpoint that names none."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6") and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


# Young-generation collections: one per this many allocations of container
# objects, not CPython's 700. Each message allocates thousands (parsed
# parts, Deferreds, metadata), and a collection every 700 walks the same
# survivors again and again. With gc.freeze() after start-up (the modules,
# config and compiled rules leave the collector's view), the embedded
# default spent 2.7% less CPU per message, in rounds alternating with a
# node without them (2026-12-03, 4 rounds of smtp-source -m 5000).
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Freeze what start-up made, and collect the young generation less
    often; once per process, after every service has started (twistd's:
    see makeService; tests that build nodes in their own process keep the
    collector as it is)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def tune_switching(cfg: Config) -> None:
    """Filter stages hold the GIL in worker threads; the reactor must get it
    back soon after each of its system calls, or SMTP latency grows with
    filter load (CPython's default wait is 5 ms). Each forced switch costs
    CPU, though: see filters.switch_interval."""
    sys.setswitchinterval(cfg.filters.switch_interval)


class SpamtrapService(service.MultiService):
    """One node: owns the components and their start/stop order."""

    def __init__(self, cfg: Config, reactor: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.reactor = reactor
        self.metrics = Metrics()
        # Created at start (privilegedStartService): building acquires nothing.
        data = os.path.abspath(cfg.data_dir)
        self.data_dir = data
        self.pool = ThreadPool(
            minthreads=1, maxthreads=max(cfg.filters.workers, 1) + 2, name="spamtrap-workers"
        )
        self.metrics.node_info.labels(
            node=cfg.node, role=cfg.role, queue="redis" if cfg.queue.url else "none"
        ).set(1)
        self.takes_mail = cfg.role in ("all", "listener")
        self.filters = cfg.role in ("all", "worker")
        # Spool and open bundles are per node name, so several processes (one
        # per core, each with its own --node) can share one data directory.
        self.spool = Spool(os.path.join(data, "spool", cfg.node), cfg.spool, self.metrics, reactor)
        self.link: QueueLink | None = None
        self.forwarder: Forwarder | None = None
        self.source: QueueSource | None = None
        # Where a message goes at the end of DATA, before its 250.
        self.intake: Intake = SpoolIntake(self.spool)
        if cfg.queue.url is not None:
            self.link = QueueLink(cfg.queue, self.metrics, reactor)
            if self.takes_mail:
                writer = QueueWriter(self.link, self.metrics)
                self.intake = QueueIntake(
                    writer, self.spool, cfg.queue.on_unreachable, self.metrics
                )
                self.forwarder = Forwarder(self.spool, writer, self.metrics, reactor, self.pool)
            if self.filters:
                # The consumer name is the node name: a restarted worker
                # finds the messages it held before, in its pending list.
                self.source = QueueSource(self.link, cfg.node, self.metrics)
        self.dashboard = dashboard_for(cfg, self.metrics, reactor)
        if self.dashboard is not None:
            self.intake = self.dashboard.counting(self.intake)
        self.submit = self.intake.submit
        # Uploads get their own small pool: saturated filters must not delay
        # signing and file reads for the store (that would cause "busy" skips).
        self.store_pool = ThreadPool(minthreads=1, maxthreads=4, name="spamtrap-store")
        self.store = open_store(
            cfg.store.url, data, reactor, self.store_pool, config=cfg.store, metrics=self.metrics
        )
        # Built before the bundle sets: each announces its stored bundles through it.
        self.notifier = Notifier(cfg, self.metrics, reactor)

        # Signal handlers and list files are set up by child services at
        # start, in this order (stopped in reverse).
        hup = SighupHandler(reactor)
        hup.setServiceParent(self)
        stages = build_stages(cfg, reactor)
        lists_stage = lists.find(stages)
        if lists_stage is not None and self.filters:
            interval = cfg.filters.lists.reload_interval
            ListsReloader(lists_stage, interval, reactor, hup=hup).setServiceParent(self)

        self.outputs = outputs_for(cfg, self.metrics, reactor, self.filters)

        self.bundles: dict[str, BundleSet]  # set by pipeline_from
        on_published = (
            self.notifier.published
            if self.dashboard is None
            else self.dashboard.chained(self.notifier.published)
        )

        def bundles_for(acks: StoredAcks[Any]) -> dict[str, BundleSet]:
            return {
                s.name: BundleSet(
                    set_config=s,
                    node=cfg.node,
                    work_dir=os.path.join(data, "open", cfg.node),
                    store=self.store,
                    metrics=self.metrics,
                    reactor=reactor,
                    # Sealing and fsync run in the store pool, off the filter threads.
                    pool=self.store_pool,
                    on_stored=acks.stored,
                    store_config=cfg.store,
                    on_published=on_published,
                )
                for s in cfg.sets
            }

        def pipeline_from(work: WorkSource[EntryT]) -> Pipeline[EntryT]:
            # The acknowledgements come first: the bundle sets call them
            # back, and the pipeline writes into the bundle sets.
            acks = StoredAcks(work)
            self.bundles = bundles_for(acks)
            return Pipeline(
                spool=work,
                stages=stages,
                collator=Collator(cfg.sets),
                bundles=self.bundles,
                metrics=self.metrics,
                reactor=reactor,
                pool=self.pool,
                workers=cfg.filters.workers,
                config=cfg,
                acks=acks,
                outputs=self.outputs,
                on_processed=self.dashboard.processed if self.dashboard else None,
            )

        self.pipeline: Pipeline[StreamEntry] | Pipeline[SpoolEntry] = (
            pipeline_from(self.source) if self.source is not None else pipeline_from(self.spool)
        )
        # DATA over smtp.data_memory_budget waits here (spamtrap/intake/spill.py).
        self.spill = SpillDir(os.path.join(data, "spill", cfg.node), reactor)
        # A worker listens for no SMTP: no certificate to load or make. The
        # certificate is loaded (or made) when the service starts.
        self.tls_context: TLSContext | None = None
        if self.takes_mail and cfg.smtp.tls.enabled:
            self.tls_context = TLSContext(cfg.smtp.tls, data, cfg.smtp.hostname)
            self.tls_context.setServiceParent(self)
        resolve_ptr: PTRLookup | None = None
        if cfg.smtp.rdns and self.takes_mail:
            resolve_ptr = PTRLookup()
            resolve_ptr.setServiceParent(self)
        self.smtp_factory = TrapSMTPFactory(
            cfg,
            self.submit,
            self.metrics,
            reactor,
            tls_context=self.tls_context,
            resolve_ptr=resolve_ptr,
            spill=self.spill,
        )
        self.site = site_for(self.store, cfg, self.metrics, self.health, reactor, self.dashboard)
        self.smtp_ports: list[Any] = []
        self.http_ports: list[Any] = []
        # Set when start-up failed (a port in use, the spool locked): only
        # the ports are closed then, and the process exits 1.
        self.start_failed = False
        self._components_started = False
        self._acquired = False
        self._listening: defer.Deferred[Any] | None = None

    def health(self) -> dict[str, Any]:
        """/healthz's answer (spamtrap.service.web_wiring.health)."""
        return health(self)

    def privilegedStartService(self) -> None:
        # Before twistd drops privileges: port 25 works for root, and so
        # does a TLS key only root may read.
        self._acquire()
        if not self.start_failed:
            self._listening = self._listen()

    def _acquire(self) -> None:
        """The data directory, and what the children take before twistd
        drops privileges (the TLS certificate). Once; a failure is one
        critical line and exit 1."""
        if self._acquired:
            return
        self._acquired = True
        try:
            os.makedirs(self.data_dir, exist_ok=True)
            service.MultiService.privilegedStartService(self)
        except (OSError, ValueError) as e:
            log.critical("cannot start: {err}; exiting", err=e)
            self._exit_non_zero()

    @defer.inlineCallbacks
    def _listen(self) -> Any:
        for desc in self.cfg.http.listen:
            self.http_ports.append((yield self._listen_on(desc, self.site)))
        for desc in self.cfg.smtp.listen if self.takes_mail else []:
            port = yield self._listen_on(desc, self.smtp_factory)
            self.smtp_ports.append(port)
            log.info("SMTP listening on {addr}", addr=port.getHost())

    def _listen_on(self, desc: str, factory: Any) -> defer.Deferred[Any]:
        def failed(failure: Failure) -> Failure:
            raise ListenError(f"cannot listen on {desc}: {failure.getErrorMessage().rstrip('.')}")

        d = defer.maybeDeferred(
            endpoints.serverFromString(self.reactor, with_backlog(desc)).listen, factory
        )
        return d.addErrback(failed)

    def startService(self) -> None:
        tune_switching(self.cfg)
        # Before any thread starts: RSS must fall again after large messages.
        memory.tune_malloc()
        self._acquire()  # done already under twistd
        if self.start_failed:
            service.Service.startService(self)  # no child: they would fail again
            return
        service.MultiService.startService(self)
        if self._listening is None:
            self._listening = self._listen()
        self._listening.addErrback(self._listen_failed)
        if self.start_failed:
            return  # a port was taken: start nothing else
        self.pool.start()
        self.store_pool.start()
        if self.takes_mail:
            try:
                self.spool.start()
                self.spill.clean()  # leftovers were never acknowledged
            except (SpoolError, OSError) as e:
                log.critical("cannot open the spool: {err}; exiting", err=e)
                self._exit_non_zero()
                return
        if self.outputs is not None:
            try:
                self.outputs.startService()
            except (SpoolError, OSError) as e:
                log.critical("cannot open an output queue: {err}; exiting", err=e)
                self._exit_non_zero()
                return
        self._components_started = True
        if self.link is not None:
            self.link.start()
        if self.forwarder is not None:
            self.forwarder.start()
        if self.filters:
            for b in self.bundles.values():
                b.start()
            if self.cfg.filters.workers > 0:
                # Without filter workers nothing would process what the
                # source reads, and it would hold it from other workers.
                if self.source is not None:
                    self.source.start()
                self.pipeline.start()
        log.info(
            "spamtrap node {node} started as {role}: data in {data}, store {store}{queue}",
            node=self.cfg.node,
            role=self.cfg.role,
            data=self.data_dir,
            store=self.store.describe(),
            queue=f", queue {describe(self.cfg.queue.url)}" if self.cfg.queue.url else "",
        )

    def _listen_failed(self, failure: Failure) -> None:
        # The endpoint error is the operator's to fix: one line, exit 1.
        if failure.check(ListenError):
            log.critical("{err}; exiting", err=failure.value)
        else:
            log.failure("cannot listen; exiting", failure)
        self._exit_non_zero()

    def _exit_non_zero(self) -> None:
        """Stop, then exit 1: twistd itself would exit 0, and systemd's
        Restart=on-failure would never see the failure."""
        if self.start_failed:
            return
        self.start_failed = True

        def leave() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

        def stop() -> None:
            try:
                self.reactor.stop()
            except error.ReactorNotRunning:
                pass  # already stopping (a SIGTERM meanwhile)

        self.reactor.addSystemEventTrigger("after", "shutdown", leave)
        self.reactor.callLater(0, stop)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        service.MultiService.stopService(self)
        if not self._components_started:
            # Start-up failed before any mail came in: release what start
            # took, in the order of a full stop below (the reverse of start).
            ports = self.smtp_ports + self.http_ports
            yield defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in ports])
            if self.outputs is not None:
                yield self.outputs.stopService()
            yield self.store.close()  # stops the store pool too
            yield self.spool.stop()  # and its lock
            self.pool.stop()
            return
        yield defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in self.smtp_ports])
        yield self.smtp_factory.shutdown()
        self.spill.stop()  # every session is closed: nothing spills any more
        if self.forwarder is not None:
            # What the spool holds goes to Redis if it answers; else it stays
            # spooled and is forwarded at the next start.
            yield defer.ensureDeferred(self.forwarder.drain())
        if self.source is not None:
            # Read no more; what was read is processed below.
            yield defer.ensureDeferred(self.source.stop_reading())
        if self.pipeline.running:
            yield defer.ensureDeferred(self.pipeline.drain())
        if self.filters:
            yield defer.DeferredList([b.stop() for b in self.bundles.values()])
        if self.outputs is not None:
            # Sends in flight get their grace; what is unsent stays queued.
            yield self.outputs.stopService()
        if self.source is not None:
            # The last bundles are stored: acknowledge their messages.
            yield defer.ensureDeferred(self.source.stop())
        # The last bundles' notices are in flight now; they get up to 10 s.
        yield self.notifier.stop()
        # Cancels what is still in flight and stops the store pool.
        yield self.store.close()
        yield self.spool.stop()
        if self.link is not None:
            self.link.stop()
        yield defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in self.http_ports])
        self.pool.stop()
        self._log_stopped()

    def _log_stopped(self) -> None:
        """Say what the next start inherits: a stop is clean only if the
        spool is empty (a full disk or a failing store leaves messages)."""
        left = self.spool.remaining
        if left == 0:
            log.info("spamtrap node {node} stopped cleanly; the spool is empty", node=self.cfg.node)
            return
        later = "forwarded to the queue" if self.forwarder is not None else "processed"
        log.warn(
            "spamtrap node {node} stopped; {n} message{s} remain{v} in the spool and will be "
            "{later} on the next start",
            node=self.cfg.node,
            n=left,
            s="" if left == 1 else "s",
            v="s" if left == 1 else "",
            later=later,
        )


class ListenError(Exception):
    """A listener could not be opened; the message names its endpoint."""


def makeService(options: Options, reactor: Any = None) -> SpamtrapService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
        # twistd's process: the node is its only tenant.
        reactor.callWhenRunning(tune_gc)
    try:
        return SpamtrapService(options.config, reactor)
    except (OSError, ValueError, StoreConfigError) as e:
        # A clear line for the operator rather than a twistd traceback.
        sys.stderr.write(f"spamtrap: cannot start: {e}\n")
        raise SystemExit(1)
