"""Outputs in the composition root: built pure, wired into the pipeline,
run only where the pipeline runs, and named in /healthz when failing."""

from __future__ import annotations

import threading
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock

from spamtrap.service.compose import Options, SpamtrapService, makeService


def service(tmp_path: Path, *args: str, outputs: str | None = None) -> SpamtrapService:
    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text(
        f"data_dir: {tmp_path / 'data'}\n"
        "node: n1\n"
        "traps: {catch_all: true}\n"
        "sets: {all: {}, private: {private: true}}\n"
        + (
            outputs
            if outputs is not None
            else "outputs:\n"
            "  hook: {type: exec, sets: [all], argv: [cat]}\n"
            "  secret: {type: exec, sets: [private], argv: [cat], concurrency: 1}\n"
        )
    )
    o = Options()
    o.parseOptions(["--config", str(cfg), *args])
    return makeService(o, reactor=MemoryReactorClock())


def test_outputs_are_built_without_acquiring_anything(tmp_path: Path) -> None:
    threads = threading.active_count()
    svc = service(tmp_path)
    assert not (tmp_path / "data").exists()  # no queue directory yet
    assert threading.active_count() == threads  # no writer thread yet
    outputs = svc.outputs
    assert outputs is not None
    assert list(outputs.runners) == ["hook", "secret"]
    assert svc.pipeline.outputs is outputs
    assert list(outputs.routes("all")) == ["hook"]
    assert list(outputs.routes("private")) == ["secret"]
    assert outputs.queues["hook"].directory == str(tmp_path / "data" / "outputs" / "hook" / "n1")
    assert outputs.runners["hook"].output.describe() == "exec cat"


def test_no_outputs_none_built(tmp_path: Path) -> None:
    svc = service(tmp_path, outputs="")
    assert svc.outputs is None
    assert svc.pipeline.outputs is None
    assert "outputs" not in svc.health()


def test_a_listener_builds_no_outputs(tmp_path: Path) -> None:
    svc = service(tmp_path, "--role", "listener", "--queue", "redis://127.0.0.1:1/0")
    assert svc.outputs is None


def test_healthz_names_failing_outputs_and_stays_ok(tmp_path: Path) -> None:
    svc = service(tmp_path)
    svc.running = True  # what startService sets; health() reads only that
    health = svc.health()
    assert health["outputs"] == {"hook": 0, "secret": 0}
    assert "outputs_failing" not in health
    assert svc.outputs is not None
    runner = svc.outputs.runners["secret"]
    runner.consecutive_failures = 3
    runner.last_failure = "exit-status: /usr/bin/cat: exit status 1"
    health = svc.health()
    assert health["status"] == "ok"
    assert health["outputs_failing"] == {
        "secret": "last 3 sends failed (exit-status: /usr/bin/cat: exit status 1)"
    }
