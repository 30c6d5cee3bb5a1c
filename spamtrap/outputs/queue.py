"""An output's own durable queue: the intake spool's segment log, reused.

Each output queues its items in ``DATA/outputs/<name>/<node>/`` (per node
name, as the intake spool is, so processes sharing a data directory do not
share a log): spamtrap.work.spool.Spool, with its group-commit fsync, CRC
recovery and acks, bounded by the output's ``max_messages``, ``max_bytes``
and ``max_age`` (the oldest is shed, counted in
``spamtrap_output_shed_total{output}``). An entry's time is when it was
queued, so ``max_age`` bounds the wait in this queue.

A record is ``b"O1 " + set name + b"\\n" + Envelope.to_record()`` of the
copy the set keeps (redacted where the set redacts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred

from spamtrap.config import SpoolConfig
from spamtrap.config.schema import OutputConfig
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.work.spool import Spool, SpoolEntry

if TYPE_CHECKING:
    from spamtrap.interfaces import ReactorFromThreads, ReactorTime

_MAGIC = b"O1 "
# Output queues are small next to the intake spool: smaller segments are
# deleted sooner once their entries are sent.
SEGMENT_BYTES = 16 * 1024 * 1024
# Appends gather this long into one write and fdatasync. The intake spool's
# entry waits for the commit (and for its bundles, which take far longer),
# so the wait costs nothing but a moment before the first send; one fsync
# per output per message batch of the intake would cost more CPU than the
# rest of the hand-over together.
COMMIT_INTERVAL = 0.2


def encode_item(set_name: str, env: Envelope) -> bytes:
    """The queue record of one message for one output (any thread)."""
    return _MAGIC + set_name.encode("ascii") + b"\n" + env.to_record()


def decode_item(record: bytes) -> tuple[str, Envelope]:
    """(set name, envelope) from a queue record; raises ValueError."""
    if not record.startswith(_MAGIC):
        raise ValueError(f"not an output queue record: {record[:8]!r}")
    nl = record.index(b"\n")
    return record[len(_MAGIC) : nl].decode("ascii"), Envelope.from_record(record[nl + 1 :])


class _Labelled:
    """A Prometheus metric child that ignores the spool's own labels: the
    spool counts its sheds by reason, an output's shed counter has none."""

    def __init__(self, child: Any) -> None:
        self.child = child

    def labels(self, **_: str) -> Any:
        return self.child


class _Ignored:
    """The spool's depth and bytes gauges: the runner reports its own depth
    (queued plus in flight), so the spool's functions are not scraped."""

    def set_function(self, f: Callable[[], float]) -> None:
        pass


class QueueMetrics:
    """What Spool updates, as this output's metrics (never the intake
    spool's gauges)."""

    def __init__(self, metrics: Metrics, output: str) -> None:
        self.spool_depth = _Ignored()
        self.spool_bytes = _Ignored()
        self.spool_shed = _Labelled(metrics.output_shed.labels(output=output))
        self.spool_commits = metrics.output_queue_commits.labels(output=output)
        self.spool_recovered = metrics.output_queue_recovered.labels(output=output)


def spool_config(
    settings: OutputConfig, intake: SpoolConfig, commit_interval: float = COMMIT_INTERVAL
) -> SpoolConfig:
    """The segment log's settings: the output's bounds, and the intake
    spool's fsync (benchmarks turn fsync off for both)."""
    return SpoolConfig(
        max_bytes=settings.max_bytes,
        max_messages=settings.max_messages,
        max_age=settings.max_age,
        commit_interval=commit_interval,
        segment_bytes=min(intake.segment_bytes, SEGMENT_BYTES),
        fsync=intake.fsync,
    )


class OutputQueue:
    """One output's queue. Every method is called in the reactor thread."""

    def __init__(
        self,
        name: str,
        directory: str,
        settings: OutputConfig,
        intake: SpoolConfig,
        metrics: Metrics,
        reactor: ReactorFromThreads,
        clock: ReactorTime | None = None,
        *,
        commit_interval: float = COMMIT_INTERVAL,
    ) -> None:
        self.name = name
        self.directory = directory
        self.spool = Spool(
            directory,
            spool_config(settings, intake, commit_interval),
            cast(Metrics, QueueMetrics(metrics, name)),
            reactor,
            clock,
            drop_written=True,
        )
        self._clock = clock if clock is not None else cast("ReactorTime", reactor)

    def start(self) -> None:
        """Recover what is on disk (blocking, at start-up) and take appends."""
        self.spool.start()

    def stop(self) -> Deferred[None]:
        return self.spool.stop()

    def append(self, record: bytes) -> Deferred[SpoolEntry]:
        """Queue an encoded item; fires once it is durable."""
        return self.spool.append(record, self._clock.seconds())

    def append_many(self, records: list[bytes]) -> Deferred[int]:
        """Queue encoded items in one hand-over; fires once all are durable."""
        return self.spool.append_many(records, self._clock.seconds())

    @property
    def depth(self) -> int:
        """Entries queued and not yet taken by the runner."""
        return self.spool.depth

    @property
    def remaining(self) -> int:
        """Entries on disk not yet sent or shed (what a restart resends)."""
        return self.spool.remaining

    @property
    def oldest_queued(self) -> float | None:
        """When the oldest entry not yet taken was queued."""
        return self.spool.oldest_queued

    def get(self) -> Deferred[SpoolEntry]:
        return self.spool.get()

    def ack(self, entry: SpoolEntry) -> None:
        self.spool.ack(entry)

    @property
    def write_failure(self) -> tuple[str, float] | None:
        return self.spool.write_failure
