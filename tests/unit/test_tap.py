"""The composition root: ``makeService`` builds plain objects and acquires
nothing; command-line options are merged into the config document and
checked once, with it; what a node acquires is taken at start by child
services. A real twistd's exit on a bad certificate is in
tests/system/test_tap.py."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock

from spamtrap.config import DEFAULT_DOCUMENT, ConfigError, Override, default_config, parse_config
from spamtrap.filters import lists
from spamtrap.filters.registry import build_stages
from spamtrap.service.compose import Options, makeService
from spamtrap.service.startup import ListsReloader, PTRLookup, SighupHandler, TLSContext
from spamtrap.work.pipeline import Pending, StoredAcks


def options(*args: str) -> Options:
    o = Options()
    o.parseOptions(list(args))
    return o


def write_config(tmp_path: Path, data: Path, extra: str = "") -> Path:
    lists = tmp_path / "discard.txt"
    lists.write_text("- {name: subject-spam, header: Subject, regex: cheap}\n")
    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text(
        f"data_dir: {data}\n"
        "traps: {catch_all: true}\n"
        f"filters: {{lists: {{files: [{lists}]}}}}\n"
        "sets: {all: {}, other: {}}\n" + extra
    )
    return cfg


def test_make_service_creates_reads_installs_and_schedules_nothing(tmp_path: Path) -> None:
    data = tmp_path / "no" / "such" / "data"
    cfg = write_config(tmp_path, data)
    reactor = MemoryReactorClock()
    hup_before = signal.getsignal(signal.SIGHUP)
    threads_before = threading.active_count()

    svc = makeService(options("--config", str(cfg)), reactor=reactor)

    assert not (tmp_path / "no").exists()  # no data, spool, tls or bundle directory
    assert signal.getsignal(signal.SIGHUP) is hup_before
    assert reactor.triggers == {} and reactor.whenRunningHooks == []
    assert reactor.getDelayedCalls() == []
    assert reactor.tcpServers == [] and reactor.tcpClients == []
    assert threading.active_count() == threads_before
    (lists,) = [stage for name, stage in svc.pipeline.stages if name == "lists"]
    assert lists.reloads == 0 and lists.rules == ()  # the file is read at start
    tls_context = svc.smtp_factory.tls_context
    assert isinstance(tls_context, TLSContext) and not tls_context.loaded
    # One service per thing to acquire, in start order.
    assert [s.name for s in svc] == ["sighup", "lists-reloader", "tls"]


def test_the_pipeline_and_bundle_sets_are_wired_at_construction(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, tmp_path / "data")
    svc = makeService(options("--config", str(cfg)), reactor=MemoryReactorClock())
    # Nothing is patched in afterwards: the pipeline got the bundle sets,
    # and they got the acknowledgements into the pipeline's own source.
    assert svc.pipeline.bundles is svc.bundles
    assert sorted(svc.bundles) == ["all", "other"]
    assert svc.pipeline.acks.work is svc.spool
    for bundle_set in svc.bundles.values():
        assert bundle_set.uploader._on_stored == svc.pipeline.acks.stored


class AckedKeys:
    """The one part of a work source the acknowledgements use."""

    def __init__(self) -> None:
        self.acked: list[Any] = []

    def ack_keys(self, keys: Any) -> None:
        self.acked += list(keys)


def test_acks_wait_for_every_bundle_that_holds_a_message() -> None:
    work = AckedKeys()
    acks: StoredAcks[Any] = StoredAcks(work)  # type: ignore[arg-type]
    shared = Pending((1, 2), remaining=2)
    acks.stored([(1, 1), shared])
    assert work.acked == [(1, 1)]  # (1, 2) is still in the other set's bundle
    acks.stored([shared])
    assert work.acked == [(1, 1), (1, 2)]


def test_a_pipeline_refuses_acks_into_another_source() -> None:
    from spamtrap.metrics import Metrics
    from spamtrap.work.collate import Collator
    from spamtrap.work.pipeline import Pipeline

    cfg = default_config()
    with pytest.raises(ValueError, match="own work source"):
        Pipeline(
            spool=AckedKeys(),  # type: ignore[arg-type]
            stages=[],
            collator=Collator(cfg.sets),
            bundles={},
            metrics=Metrics(),
            reactor=task.Clock(),  # type: ignore[arg-type]
            pool=None,  # type: ignore[arg-type]
            workers=0,
            config=cfg,
            acks=StoredAcks(AckedKeys()),  # type: ignore[arg-type]
        )


class InThisThread:
    """callFromThread for a signal handler called by the test itself."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


def test_the_lists_reloader_reads_at_start_and_stops_watching_at_stop(tmp_path: Path) -> None:
    cfg = parse_config(
        f"traps: {{catch_all: true}}\nfilters: {{lists: {{files: [{tmp_path / 'l.txt'}]}}}}\n"
    )
    (tmp_path / "l.txt").write_text("- {name: r1, header: Subject, regex: cheap}\n")
    stages = build_stages(cfg, task.Clock())
    stage = lists.find(stages)
    # Built without reading its files: that is the reloader's job, at start.
    assert stage is not None and ("lists", stage) in stages and stage.reloads == 0
    clock = task.Clock()
    reads: list[int] = []

    def run_in_thread(f: Any) -> defer.Deferred[bool]:
        reads.append(1)
        return defer.succeed(f())

    hup = SighupHandler(InThisThread())
    reloader = ListsReloader(stage, 30.0, clock, hup=hup, clock=clock, run_in_thread=run_in_thread)
    reloader.startService()
    try:
        assert [r.name for r in stage.rules] == ["r1"]
        assert hup.listeners == [stage.reload_soon]
        (tmp_path / "l.txt").write_text(
            "- {name: r1, header: Subject, regex: cheap}\n- {name: r2, meta: helo, regex: x}\n"
        )
        clock.advance(30)
        assert reads == [1] and [r.name for r in stage.rules] == ["r1", "r2"]
        # SIGHUP reads every file again, whether it looks changed or not.
        hup.hup()
        assert reads == [1, 1] and stage.reloads == 3
    finally:
        reloader.stopService()
    assert hup.listeners == []
    assert clock.getDelayedCalls() == []


def test_no_lists_configured_builds_no_lists_stage() -> None:
    stages = build_stages(default_config(), task.Clock())
    assert lists.find(stages) is None and "lists" not in [name for name, _ in stages]


def test_the_one_sighup_handler_calls_its_listeners_and_restores_the_previous() -> None:
    before = signal.getsignal(signal.SIGHUP)
    hup = SighupHandler(InThisThread())
    calls: list[str] = []
    hup.listeners.append(lambda: calls.append("first"))
    hup.listeners.append(lambda: 1 / 0)  # logged; the others still run
    hup.listeners.append(lambda: calls.append("last"))
    hup.startService()
    try:
        handler = signal.getsignal(signal.SIGHUP)
        assert handler not in (before, signal.SIG_DFL) and callable(handler)
        handler(signal.SIGHUP, None)
        assert calls == ["first", "last"]
    finally:
        hup.stopService()
    assert signal.getsignal(signal.SIGHUP) is before


def test_the_tls_context_is_made_at_start_not_before(tmp_path: Path) -> None:
    cfg = default_config()
    context = TLSContext(cfg.smtp.tls, str(tmp_path / "data"), "trap.example")
    with pytest.raises(RuntimeError, match="not loaded"):
        context.getContext()
    assert not (tmp_path / "data").exists()
    context.privilegedStartService()
    assert (tmp_path / "data" / "tls").is_dir()
    assert context.getContext() is not None
    context.startService()  # loads nothing twice
    assert context.loaded


def test_the_ptr_lookup_is_built_at_start() -> None:
    made: list[str] = []

    def make() -> Any:
        made.append("resolver")
        return lambda ip: defer.succeed(f"host-for-{ip}")

    lookup = PTRLookup(make)
    failed: list[Any] = []
    lookup("127.0.0.1").addErrback(failed.append)
    assert made == [] and "not started" in str(failed[0].value)
    lookup.startService()
    got: list[str] = []
    lookup("127.0.0.1").addCallback(got.append)
    assert made == ["resolver"] and got == ["host-for-127.0.0.1"]


def test_options_replace_what_the_file_says(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "node: filenode\ntraps: {catch_all: true}\nsmtp:\n  listen: [tcp:25, tcp:587]\n"
        "store:\nqueue: {url: 'redis://file-host'}\n"
    )
    o = options("--config", str(cfg), "--node", "cli", "--smtp", "tcp:2525",
                "--store", "file:///srv/bundles", "--queue", "redis://cli-host/2",
                "--role", "listener", "--data-dir", "yes")  # fmt: skip
    c = o.config
    assert (c.node, c.smtp.listen, c.store.url) == ("cli", ["tcp:2525"], "file:///srv/bundles")
    assert (c.queue.url, c.role) == ("redis://cli-host/2", "listener")
    assert c.data_dir == "yes"  # an option's value is a string, never YAML's boolean


def test_no_config_is_the_embedded_default_document() -> None:
    assert parse_config(DEFAULT_DOCUMENT) == default_config()
    o = options("--http", "tcp:8080")
    assert o.config.http.listen == ["tcp:8080"] and o.config.traps.catch_all


def test_an_option_error_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        options("--smtp", "2525")
    assert capsys.readouterr().err.splitlines()[0] == (
        "twistd spamtrap: --smtp: not an endpoint description: '2525' (expected TYPE:ARGS,"
        " e.g. 'tcp:2525' or 'tcp:25:interface=127.0.0.1')"
    )


def test_file_errors_keep_their_line_beside_option_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("traps: {catch_all: true}\nspool: {max_bytes: lots}\n")
    with pytest.raises(SystemExit):
        options("--config", str(cfg), "--node", "a.b")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "twistd spamtrap: configuration errors:"
    assert lines[1].startswith(f"{cfg}:2: spool.max_bytes: not a size: 'lots'")
    assert lines[2].startswith("--node: bad node name 'a.b'")


def test_a_role_from_the_file_still_names_queue_url() -> None:
    with pytest.raises(ConfigError, match="role: role 'worker' needs queue.url"):
        parse_config("traps: {catch_all: true}\nrole: worker\n")
    with pytest.raises(ConfigError, match="--role: role 'worker' needs a queue: --queue"):
        parse_config("traps: {catch_all: true}\n", overrides=[Override("--role", "role", "worker")])


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_any_node_option_is_taken_as_given_or_refused_by_name(value: str) -> None:
    override = [Override("--node", "node", value)]
    try:
        cfg = parse_config("node: x\ntraps: {catch_all: true}\n", overrides=override)
    except ConfigError as e:
        (issue,) = e.errors
        assert issue.option == "--node" and issue.line is None
        assert str(e).startswith("--node: bad node name")
    else:
        assert cfg.node == value


def test_tune_gc_freezes_start_up_and_collects_the_young_less_often() -> None:
    import gc

    from spamtrap.service.compose import GC_YOUNG_THRESHOLD, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_the_switch_interval_is_the_configured_one() -> None:
    import sys

    from spamtrap.config import Config, FilterConfig
    from spamtrap.service.compose import tune_switching

    before = sys.getswitchinterval()
    try:
        tune_switching(Config())
        assert sys.getswitchinterval() == pytest.approx(0.0025)
        tune_switching(Config(filters=FilterConfig(switch_interval=0.004)))
        assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        sys.setswitchinterval(before)
