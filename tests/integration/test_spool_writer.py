"""The spool's writer thread on real time: the waits it times itself on the
monotonic clock (the commit window, ACK_DELAY), which no task.Clock can
drive. Every other spool test is a unit test (tests/unit/test_spool.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import deferLater

from spamtrap.metrics import Metrics
from spamtrap.work.spool_writer import ACK_DELAY
from tests.support.poll import until
from tests.support.spool import config
from tests.support.spool import make_spool as make_spool  # the fixture


@pytest_twisted.ensureDeferred
async def test_commit_interval_gathers_later_appends(tmp_path: Path, make_spool: Any) -> None:
    from twisted.internet import reactor

    metrics = Metrics()
    spool = make_spool(tmp_path, config(commit_interval=0.5), metrics)
    early = spool.append(b"early", 1.0)
    # Well inside the window the writer is waiting out, another append comes.
    # The one deliberate wait in the suite: this test is about the writer's
    # own wait, and 0.05 s of a 0.5 s window leaves a wide margin.
    await deferLater(reactor, 0.05, lambda: None)
    assert not early.called
    late = spool.append(b"late", 1.0)
    await defer.gatherResults([early, late])
    assert metrics.registry.get_sample_value("spamtrap_spool_commits_total") == 1


@pytest_twisted.ensureDeferred
async def test_acks_reach_the_file_without_an_append(tmp_path: Path, make_spool: Any) -> None:
    # Acks wait for an append to share the writer's wake-up with, but not
    # for longer than ACK_DELAY.
    spool = make_spool(tmp_path)
    first = await spool.append(b"a", 1.0)
    await spool.append(b"b", 1.0)
    await spool.get()
    spool.ack(first)
    ack_file = tmp_path / os.path.basename(first.path).replace(".log", ".ack")
    await until(
        lambda: ack_file.exists() and ack_file.read_bytes(),
        timeout=100 * ACK_DELAY,
        what="the ack in its file",
        interval=ACK_DELAY / 4,
    )
    assert ack_file.read_bytes() == b"%d\n" % first.offset
