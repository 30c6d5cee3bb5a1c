"""The pipeline's hand-over to the outputs: which copy, to whom, and when
the spool entry may go (only once the outputs' appends committed)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from spamtrap.config import Config, SpoolConfig, parse_config
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.outputs.base import Handoff
from spamtrap.outputs.queue import decode_item, encode_item
from spamtrap.outputs.service import Outputs
from spamtrap.testing import ListWorkSource, SyncPool
from spamtrap.work.collate import Collator
from spamtrap.work.pipeline import BATCH_WAIT, Pipeline
from tests.support.threaded_clock import ThreadedClock


class SyncClock(Clock):
    """A Clock whose callFromThread runs at once: with SyncPool, the
    pipeline's thread hop happens inside the test's own call."""

    def callFromThread(self, f: Any, *a: Any, **kw: Any) -> None:
        f(*a, **kw)


class Bundles:
    """A set's bundles: takes what the pipeline adds, stores on demand."""

    def __init__(self) -> None:
        self.tokens: list[Any] = []

    def add_many(self, items: list[Any]) -> list[Any]:
        self.tokens += [item[2] for item in items]
        return []


class Sink:
    """The OutputSink: ``routes`` from a mapping, appends the test commits."""

    def __init__(self, routes: dict[str, list[str]]) -> None:
        self._routes = routes
        self.enqueued: list[tuple[list[Handoff], Deferred[None]]] = []

    def routes(self, set_name: str) -> Sequence[str]:
        return self._routes.get(set_name, [])

    def enqueue(self, handoffs: Sequence[Handoff]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.enqueued.append((list(handoffs), d))
        return d

    def items(self) -> list[tuple[str, str, Envelope]]:
        out = []
        for handoffs, _ in self.enqueued:
            for name, record, crc in handoffs:
                assert crc == zlib.crc32(record)  # the record's, for the queue to write
                out.append((name, *decode_item(record)))
        return out


def handoff(name: str, record: bytes) -> Handoff:
    return (name, record, zlib.crc32(record))


def envelope(i: int, rcpt: str = "victim@trap.example") -> Envelope:
    return Envelope(
        msg_id=f"m{i}",
        received_at=1000.0 + i,
        mail_from="a@b.example",
        rcpts=[rcpt],
        data=b"To: " + rcpt.encode() + b"\r\nSubject: %d\r\n\r\nbody\r\n" % i,
        meta={"id": [f"m{i}"], "rcpt": [f"<{rcpt}>"]},
    )


class World:
    def __init__(self, cfg: Config, routes: dict[str, list[str]]) -> None:
        self.clock = SyncClock()
        self.source = ListWorkSource()
        self.bundles = {s.name: Bundles() for s in cfg.sets}
        self.sink = Sink(routes)
        self.pipeline = Pipeline(
            self.source,
            [],
            Collator(cfg.sets),
            self.bundles,
            Metrics(),
            self.clock,
            SyncPool(),  # type: ignore[arg-type]
            1,
            cfg,
            outputs=self.sink,
        )
        self.pipeline.start()

    def process(self, *envs: Envelope) -> None:
        for env in envs:
            self.source.add(env.to_record())
        self.clock.advance(BATCH_WAIT)

    def store(self, set_name: str) -> None:
        bundles = self.bundles[set_name]
        tokens, bundles.tokens = bundles.tokens, []
        self.pipeline.stored(tokens)


CFG = parse_config(
    """traps: {domains: [trap.example]}
sets:
  all: {}
  private:
    private: true
    redact_trap_addresses: true
  unlisted: {}
"""
)


def test_each_output_gets_the_copy_of_each_set_it_lists() -> None:
    w = World(CFG, {"all": ["o1"], "private": ["o2", "o3"]})
    w.process(envelope(1))
    got = sorted((name, set_name) for name, set_name, _ in w.sink.items())
    # One append batch per message; the private copy only to o2 and o3.
    assert got == [("o1", "all"), ("o2", "private"), ("o3", "private")]
    assert len(w.sink.enqueued) == 1
    copies = {name: env for name, _, env in w.sink.items()}
    assert b"victim@trap.example" in copies["o1"].data
    # The redacting set hands over its redacted copy.
    assert b"victim@trap.example" not in copies["o2"].data
    assert b"@xxxx.xxxxxxx" in copies["o2"].data
    assert copies["o2"].data == copies["o3"].data
    assert {env.msg_id for env in copies.values()} == {"m1"}


def test_a_copy_that_is_the_intake_record_is_queued_as_it() -> None:
    w = World(CFG, {"all": ["o1"], "private": ["o2"]})
    w.process(envelope(1))
    ((handoffs, _),) = w.sink.enqueued
    records = {name: record for name, record, _ in handoffs}
    # The copy of "all" is the spooled message and the meta fields the
    # pipeline added (its campaign): the spool's record, not encoded again.
    assert records["o1"].startswith(b"O2 all\n")
    assert records["o1"].endswith(envelope(1).to_record())
    # The redacted copy is another envelope: queued whole.
    assert records["o2"].startswith(b"O1 private\n")
    copies = {name: env for name, _, env in w.sink.items()}
    assert copies["o1"].data == envelope(1).data
    assert copies["o1"].meta.keys() >= envelope(1).meta.keys()


def test_the_entry_is_acked_only_once_bundles_and_appends_are_done() -> None:
    w = World(CFG, {"all": ["o1"]})
    w.process(envelope(1))
    w.store("all")
    w.store("private")
    w.store("unlisted")
    assert w.source.acked == []  # the output's append has not committed
    w.sink.enqueued[0][1].callback(None)
    assert w.source.acked == [(0, 0)]


def test_a_batch_is_handed_over_at_once_and_released_together() -> None:
    cfg = parse_config("traps: {catch_all: true}\nsets: {all: {}}\n")
    w = World(cfg, {"all": ["o1", "o2"]})
    w.process(envelope(1), envelope(2), envelope(3))
    ((handoffs, committed),) = w.sink.enqueued  # one hand-over for the batch
    assert [name for name, *_ in handoffs] == ["o1", "o2"] * 3
    w.store("all")
    assert w.source.acked == []
    committed.callback(None)
    assert sorted(w.source.acked) == [(0, 0), (0, 1), (0, 2)]


def test_appends_committing_first_still_wait_for_the_bundles() -> None:
    cfg = parse_config("traps: {catch_all: true}\nsets: {all: {}}\n")
    w = World(cfg, {"all": ["o1"]})
    w.process(envelope(1))
    w.sink.enqueued[0][1].callback(None)
    assert w.source.acked == []  # one bundle holds it, and one set alone
    w.store("all")
    assert w.source.acked == [(0, 0)]


def test_messages_of_sets_no_output_lists_are_not_handed_over() -> None:
    cfg = parse_config("traps: {catch_all: true}\nsets: {all: {}}\n")
    w = World(cfg, {"other": ["o1"]})
    w.process(envelope(1))
    assert w.sink.enqueued == []
    w.store("all")
    assert w.source.acked == [(0, 0)]  # a single set's key, as without outputs


def test_duplicates_a_set_leaves_out_are_not_handed_over() -> None:
    cfg = parse_config("traps: {catch_all: true}\nsets: {all: {dedup_window: 1h}}\n")
    w = World(cfg, {"all": ["o1"]})
    w.process(envelope(1), envelope(1))
    assert [env.msg_id for _, _, env in w.sink.items()] == ["m1"]


# -- Outputs: the real sink over real queues ---------------------------------


class Recorder:
    name = "rec"

    def __init__(self) -> None:
        self.items: list[Any] = []

    def send(self, item: Any) -> Deferred[object]:
        self.items.append(item)
        return defer.succeed(None)

    def describe(self) -> str:
        return "recorder"

    def close(self) -> None:
        pass


def outputs_config(tmp_path: Path) -> Config:
    return parse_config(
        f"""data_dir: {tmp_path}
node: n1
traps: {{catch_all: true}}
spool: {{fsync: false, commit_interval: 0}}
sets: {{all: {{}}, private: {{private: true}}}}
outputs:
  a: {{type: exec, sets: [all], argv: [cat]}}
  b: {{type: exec, sets: [all, private], argv: [cat]}}
"""
    )


@pytest_twisted.ensureDeferred
async def test_outputs_route_and_queue_durably(tmp_path: Path) -> None:
    clock = ThreadedClock()
    cfg = outputs_config(tmp_path)
    recorders: dict[str, Recorder] = {}

    def build(settings: Any, context: Any) -> Recorder:
        return recorders.setdefault(settings.name, Recorder())

    def read(entry: Any) -> Deferred[bytes]:
        return defer.succeed(entry.read())

    outputs = Outputs(cfg, Metrics(), clock, clock=clock, read=read, build=build)
    assert list(outputs.routes("all")) == ["a", "b"]
    assert list(outputs.routes("private")) == ["b"]
    assert list(outputs.routes("nope")) == []
    assert (tmp_path / "outputs").exists() is False  # building acquires nothing
    outputs.startService()
    assert (tmp_path / "outputs" / "a" / "n1").is_dir()
    done = outputs.enqueue(
        [
            handoff("a", encode_item("all", envelope(1))),
            handoff("b", encode_item("private", envelope(1))),
        ]
    )
    await clock.run(done, "the appends")
    await clock.settle(lambda: len(recorders["b"].items) == 1, "b's send")
    await clock.settle(lambda: len(recorders["a"].items) == 1, "a's send")
    assert recorders["b"].items[0].set_name == "private"
    await clock.run(defer.ensureDeferred(_stop(outputs)), "the outputs to stop")


async def _stop(outputs: Outputs) -> None:
    await outputs.stopService()


@pytest_twisted.ensureDeferred
async def test_an_append_that_fails_is_counted_as_shed_and_still_fires(tmp_path: Path) -> None:
    clock = ThreadedClock()
    cfg = outputs_config(tmp_path)
    metrics = Metrics()
    outputs = Outputs(cfg, metrics, clock, clock=clock, build=lambda s, c: Recorder())
    # Never started: every append fails, as on a broken disk.
    done = outputs.enqueue([handoff("a", b"x"), handoff("b", b"y")])
    assert done.called  # fired, not failed: the pipeline goes on
    shed = metrics.registry.get_sample_value("spamtrap_output_shed_total", {"output": "a"})
    assert shed == 1


def test_spool_config_of_a_queue_follows_the_output_and_the_intake() -> None:
    from spamtrap.outputs.queue import spool_config

    settings = outputs_config(Path("/tmp")).outputs[0]
    got = spool_config(settings, SpoolConfig(fsync=False, commit_interval=0.01))
    assert (got.max_messages, got.max_bytes, got.max_age) == (
        settings.max_messages,
        settings.max_bytes,
        settings.max_age,
    )
    # fsync as the intake spool; commits gathered longer (one fsync per 0.2 s).
    assert (got.fsync, got.commit_interval) == (False, 0.2)
    assert got.segment_bytes <= 16 * 1024 * 1024
