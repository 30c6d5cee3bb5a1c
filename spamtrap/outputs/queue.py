"""An output's own durable queue: the intake spool's segment log, reused.

Each output queues its items in ``DATA/outputs/<name>/<node>/`` (per node
name, as the intake spool is, so processes sharing a data directory do not
share a log): spamtrap.work.spool.Spool, with its group-commit fsync, CRC
recovery and acks, bounded by the output's ``max_messages``, ``max_bytes``
and ``max_age`` (the oldest is shed, counted in
``spamtrap_output_shed_total{output}``). An entry's time is when it was
queued, so ``max_age`` bounds the wait in this queue.

A record is the copy the set keeps (redacted where the set redacts), in
one of two forms:

- ``b"O1 " + set name + b"\\n" + Envelope.to_record()`` of the copy;
- ``b"O2 " + set name + b"\\n" + b"%d\\n" % len(delta) + delta +`` the
  intake spool's record the message was read from, where the copy is that
  message with ``delta`` (a JSON object) merged into its meta fields (a
  campaign id, say). Most kept copies are: re-encoding the whole envelope
  per message cost the node about 16 µs of its 60-100 µs per message for
  an output (docs/benchmarks.md, issue 13); this takes about 1.
"""

from __future__ import annotations

import json
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
_DELTA = b"O2 "
_JSON = json.JSONEncoder(separators=(",", ":"), check_circular=False)
# Output queues are small next to the intake spool: smaller segments are
# deleted sooner once their entries are sent.
SEGMENT_BYTES = 16 * 1024 * 1024
# Appends gather this long into one write and fdatasync. The intake spool's
# entry waits for the commit (and for its bundles, which take far longer),
# so the wait costs nothing but a moment before the first send; one fsync
# per output per message batch of the intake would cost more CPU than the
# rest of the hand-over together.
COMMIT_INTERVAL = 0.2


class ItemBase:
    """An intake spool record and what its envelope held when decoded,
    taken before the stages run (they change the envelope in place): a
    kept copy that differs from it only in meta fields is queued as the
    record and those fields (``O2``)."""

    __slots__ = (
        "data",
        "feed",
        "mail_from",
        "meta",
        "msg_id",
        "rcpts",
        "received",
        "received_at",
        "record",
    )

    def __init__(self, record: bytes, env: Envelope) -> None:
        self.record = record
        self.msg_id = env.msg_id
        self.received_at = env.received_at
        self.mail_from = env.mail_from
        self.rcpts = env.rcpts[:]
        self.data = env.data
        self.feed = env.feed
        self.meta = {k: v[:] for k, v in env.meta.items()}
        self.received = env.received[:]

    def delta(self, copy: Envelope) -> dict[str, list[str]] | None:
        """The meta fields ``copy`` adds or changes, or None when it differs
        in anything else (another message, redacted, a field removed)."""
        if not (
            copy.data is self.data  # stages that change the bytes make new ones
            and copy.msg_id == self.msg_id
            and copy.received_at == self.received_at
            and copy.mail_from == self.mail_from
            and copy.rcpts == self.rcpts
            and copy.feed == self.feed
            and copy.received == self.received
            and copy.meta.keys() >= self.meta.keys()
        ):
            return None
        base = self.meta
        return {k: v for k, v in copy.meta.items() if base.get(k) != v}


def encode_item(set_name: str, env: Envelope, base: ItemBase | None = None) -> bytes:
    """The queue record of one message for one output (any thread);
    ``base``: the intake record ``env`` was decoded from, if it was."""
    head = set_name.encode("ascii") + b"\n"
    delta = base.delta(env) if base is not None else None
    if delta is None:
        return _MAGIC + head + env.to_record()
    assert base is not None
    fields = _JSON.encode(delta).encode("utf-8", "surrogateescape")
    return b"".join((_DELTA, head, b"%d\n" % len(fields), fields, base.record))


def decode_item(record: bytes) -> tuple[str, Envelope]:
    """(set name, envelope) from a queue record; raises ValueError."""
    magic = record[: len(_MAGIC)]
    if magic not in (_MAGIC, _DELTA):
        raise ValueError(f"not an output queue record: {record[:8]!r}")
    nl = record.index(b"\n")
    set_name = record[len(_MAGIC) : nl].decode("ascii")
    if magic == _MAGIC:
        return set_name, Envelope.from_record(record[nl + 1 :])
    end = record.index(b"\n", nl + 1)
    start = end + 1 + int(record[nl + 1 : end])
    delta = json.loads(record[end + 1 : start].decode("utf-8", "surrogateescape"))
    if not isinstance(delta, dict):
        raise ValueError("output queue record: its meta fields are not an object")
    env = Envelope.from_record(record[start:])
    env.meta.update(delta)
    return set_name, env


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

    def append_many(self, records: list[bytes], crcs: list[int] | None = None) -> Deferred[int]:
        """Queue encoded items in one hand-over; fires once all are durable.
        ``crcs``: each record's ``zlib.crc32``, if known."""
        return self.spool.append_many(records, self._clock.seconds(), crcs)

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
