"""The durable spool in a real process killed with SIGKILL: every append
that was acknowledged is recovered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import spamtrap
from tests.support.spool import recover


def test_kill_9_loses_nothing_that_was_acknowledged(tmp_path: Path) -> None:
    """A real process appends until killed; every append that fired (a 250)
    must be recovered."""
    child = """
import sys
from twisted.internet import reactor
from spamtrap.config import SpoolConfig
from spamtrap.metrics import Metrics
from spamtrap.work.spool import Spool

spool = Spool(sys.argv[1], SpoolConfig(commit_interval=0, segment_bytes=4096), Metrics(), reactor)
spool.start()

def done(entry, i):
    sys.stdout.write("%d\\n" % i)
    sys.stdout.flush()

def more(i):
    for j in range(i, i + 20):
        spool.append(b"message %d " % j + b"x" * (j % 300), 1.0).addCallback(done, j)
    reactor.callLater(0.001, more, i + 20)

reactor.callWhenRunning(more, 0)
reactor.run()
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(spamtrap.__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(tmp_path)], stdout=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    acknowledged: set[int] = set()
    try:
        while len(acknowledged) < 300:
            line = proc.stdout.readline()
            if not line:
                break
            acknowledged.add(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(acknowledged) >= 300, "the child process did not get going"
    _, entries = recover(tmp_path)
    recovered = [e.read() for e in entries]
    for i in acknowledged:
        assert b"message %d " % i + b"x" * (i % 300) in recovered
    # Order on disk is append order.
    numbers = [int(p.split()[1]) for p in recovered]
    assert numbers == sorted(numbers)
