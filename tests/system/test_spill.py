"""Memory under large DATA, measured on real processes: glibc's malloc
tuning returns large buffers, and a real node holding 40 unfinished 7.5 MiB
sessions stays within the spill budget."""

from __future__ import annotations

import os
from pathlib import Path

# -- equivalence: spilled and in-memory DATA give the same result ---------------


# -- when a session spills --------------------------------------------------------


# -- RSS after large messages (spamtrap/intake/memory.py) ------------------------------

_FRAGMENT = """
import sys
from spamtrap.intake.memory import tune_malloc
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
if sys.argv[1] == "tuned":
    assert tune_malloc()
x = bytes(8 << 20)  # one large message: glibc raises its thresholds
del x
base = rss()
keep, big = [], []
for i in range(20):  # message-sized buffers with small objects between them
    big.append(b"y" * (4 << 20))
    keep.append(b"k" * (32 << 10))  # larger than any hole the imports left
del big
print(rss() - base)
"""


def test_rss_falls_after_large_buffers_with_tuned_malloc() -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}

    def kept(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True,
            env=env, timeout=60, check=True,
        )
        return int(out.stdout.strip())

    assert kept("plain") > 40_000  # KiB: glibc's dynamic threshold keeps it
    assert kept("tuned") < 8_000


def test_40_sessions_holding_large_data_stay_within_the_budget(tmp_path: Path) -> None:
    """A real node: 40 clients each hold an unfinished 7.5 MiB DATA. Before
    the spill that added 294 MiB of RSS; now the budget (64 MiB) bounds it,
    a fresh session is served meanwhile, and each still gets its 250."""
    import asyncio

    from bench.rss import MIB, hold_large_data
    from tests.support.node import Node

    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text("node: rssnode\ntraps: {catch_all: true}\nsets:\n  all: {}\n")
    node = Node(tmp_path / "data", config=cfg).start()
    assert node.proc is not None
    try:
        out = asyncio.run(
            hold_large_data(
                node.smtp_port, node.proc.pid, 40, int(7.5 * MIB), tmp_path / "data" / "spill"
            )
        )
        added = (out["rss_held_kib"] - out["rss_start_kib"]) / 1024
        assert added < 100, out  # MiB; generous: the budget is 64
        assert out["spilled_bytes"] > 40 * 6 * MIB, out  # it went to disk
        assert out["fresh_session_ok"], out
        assert out["acked"] == 40, out
        assert list((tmp_path / "data" / "spill" / "rssnode").iterdir()) == []
    finally:
        node.stop()
