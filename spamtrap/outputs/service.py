"""All of a node's outputs: built from ``outputs:``, fed by the pipeline.

``Outputs`` is what the pipeline hands each kept message to (the
``OutputSink``): ``routes`` says which outputs list a set, and ``enqueue``
appends encoded items to their queues durably, firing once every append
has committed (the pipeline acks the intake spool's entry only then). An
append that fails (the queue's disk is full) is logged and counted as shed
for that output: the message is still in its bundles, and intake goes on.

Building acquires nothing (a pure composition root); ``startService``
recovers each queue from disk and starts the runners; ``stopService``
stops the runners (sends in flight get their grace) and closes the queues,
leaving what is unsent on disk. The node stops it after the pipeline has
drained, since draining still enqueues.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from spamtrap.config import Config
from spamtrap.interfaces import ReactorTime
from spamtrap.metrics import Metrics
from spamtrap.outputs import kind_module
from spamtrap.outputs.base import Handoff, Output, OutputContext
from spamtrap.outputs.queue import OutputQueue
from spamtrap.outputs.runner import OutputRunner, read_in_thread
from spamtrap.work.spool import SpoolEntry

log = Logger()


def queue_directory(data_dir: str, output: str, node: str) -> str:
    """``DATA/outputs/<output>/<node>``: per node name, as the intake spool."""
    return os.path.join(data_dir, "outputs", output, node)


class Outputs(service.Service):
    """The node's outputs, their queues and runners."""

    def __init__(
        self,
        cfg: Config,
        metrics: Metrics,
        reactor: Any,
        *,
        clock: ReactorTime | None = None,
        read: Callable[[SpoolEntry], Deferred[bytes]] | None = None,
        build: Callable[[Any, OutputContext], Output] | None = None,
    ) -> None:
        self.metrics = metrics
        self.clock: ReactorTime = clock if clock is not None else reactor
        data = os.path.abspath(cfg.data_dir)
        context = OutputContext(
            reactor=reactor,
            node=cfg.node,
            data_dir=data,
            relay=cfg.relay,
            hostname=cfg.smtp.hostname,
            sets={s.name: s for s in cfg.sets},
        )
        self.queues: dict[str, OutputQueue] = {}
        self.runners: dict[str, OutputRunner] = {}
        # set name -> the outputs that list it, in config order
        self._routes: dict[str, list[str]] = {}
        reader = read if read is not None else read_in_thread(reactor)
        for settings in cfg.outputs:
            name = settings.name
            if build is not None:
                output = build(settings, context)
            else:
                output = kind_module(settings.type).build(name, settings, context)
            queue = OutputQueue(
                name,
                queue_directory(data, name, cfg.node),
                settings,
                cfg.spool,
                metrics,
                reactor,
                clock,
            )
            self.queues[name] = queue
            self.runners[name] = OutputRunner(output, settings, queue, metrics, self.clock, reader)
            for set_name in settings.sets:
                self._routes.setdefault(set_name, []).append(name)

    # -- the OutputSink ---------------------------------------------------

    def routes(self, set_name: str) -> Sequence[str]:
        """The outputs that take the kept messages of ``set_name``."""
        return self._routes.get(set_name, ())

    def enqueue(self, handoffs: Sequence[Handoff]) -> Deferred[None]:
        """Append every item durably; fires (never fails) once all have
        committed or failed (a failed append is logged and counted as shed).

        The pipeline hands over a whole batch at once: this runs in the
        reactor for every batch, so each queue takes its share as one
        append (see spamtrap.work.spool_writer.AppendMany)."""
        done: Deferred[None] = Deferred()
        per_queue: dict[str, tuple[list[bytes], list[int]]] = {}
        for name, record, crc in handoffs:
            records, crcs = per_queue.setdefault(name, ([], []))
            records.append(record)
            crcs.append(crc)
        left = [len(per_queue)]

        def one(result: object, name: str) -> None:
            if isinstance(result, Failure):
                self._append_failed(name, len(per_queue[name][0]), result)
            left[0] -= 1
            if left[0] == 0:
                done.callback(None)

        for name, (records, crcs) in per_queue.items():
            self.queues[name].append_many(records, crcs).addBoth(one, name)
        if not per_queue:
            done.callback(None)
        return done

    def _append_failed(self, name: str, count: int, failure: Failure) -> None:
        self.metrics.output_shed.labels(output=name).inc(count)
        log.error(
            "output {name}: cannot queue {n} message(s) ({why}); they are in their bundles only",
            name=name,
            n=count,
            why=failure.getErrorMessage(),
        )

    # -- health -----------------------------------------------------------

    def failing(self) -> dict[str, str]:
        """Each failing output and why (see spamtrap.outputs.runner)."""
        out = {}
        for name, runner in self.runners.items():
            why = runner.failing()
            failure = self.queues[name].write_failure
            if failure is not None:
                why = f"queue write failed: {failure[0]}"
            if why is not None:
                out[name] = why
        return out

    def describe(self) -> list[str]:
        return [f"{name} ({r.output.describe()})" for name, r in self.runners.items()]

    # -- lifecycle --------------------------------------------------------

    def startService(self) -> None:
        """Recover the queues (blocking, at start-up) and start sending.
        Raises SpoolError when a queue is locked by another process."""
        super().startService()
        for queue in self.queues.values():
            queue.start()
        for runner in self.runners.values():
            runner.start()
        for line in self.describe():
            log.info("output {line}", line=line)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        yield defer.DeferredList([r.stop() for r in self.runners.values()], consumeErrors=True)
        yield defer.DeferredList([q.stop() for q in self.queues.values()], consumeErrors=True)
        left = sum(q.remaining for q in self.queues.values())
        if left:
            log.info("outputs: {n} message(s) stay queued for the next start", n=left)
