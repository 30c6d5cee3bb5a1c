"""CPU per message: the embedded default against the bare Twisted server.

    python -m bench.run cpu [--quick] [--profile]

Each round sends ``smtp-source -s 20 -m 4000 -l 4096`` to each server in
turn, and reads the server's own CPU (user + system, /proc/PID/stat) from
before the load until every accepted message was processed: SMTP, the
fsynced spool, every default stage, collation and the gzip bundle. The bare
server only parses and discards. The figure is µs of CPU per message, and
the ratio is spamtrap's over the bare server's, from the same run.

``--profile`` also samples spamtrap with py-spy during one more round and
prints µs per message per component (see COMPONENTS): the share of samples
times the measured CPU per message.
"""

from __future__ import annotations

import collections
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.servers import (
    Server,
    caught_up,
    cpu_seconds_of,
    smtp_source,
    start_bare,
    start_spamtrap,
)

SESSIONS, MESSAGES, SIZE = 20, 4000, 4096

# Where a sample's time goes: the first rule matching a frame, walking from
# the innermost frame outwards. Library code is charged to the spamtrap code
# that called it (zlib to the bundle file, os.fdatasync to the spool).
COMPONENTS: list[tuple[str, str]] = [
    ("bundle/index.py", "per-bundle index"),
    ("bundle/file.py", "gzip (bundle file)"),
    ("bundle/mbox.py", "mbox rendering"),
    ("bundle/", "bundle bookkeeping"),
    ("work/spool", "spool append, commit, acks"),
    ("work/campaign", "campaigns"),
    ("outputs/", "outputs"),
    ("dashboard/", "dashboard"),
    ("work/collate.py", "collation"),
    ("work/dedup.py", "dedup"),
    ("work/redact", "redaction"),
    ("filters/virus.py", "stage: virus"),
    ("filters/bounce.py", "stage: bounce"),
    ("filters/lists.py", "stage: lists"),
    ("filters/feeds.py", "stage: feeds"),
    ("filters/size.py", "stage: size"),
    ("filters/", "stages (other)"),
    ("spamtrap/mime.py", "MIME parsing"),
    ("spamtrap/message.py", "envelope and metadata"),
    ("intake/envelope.py", "envelope and metadata"),
    ("work/pipeline.py", "pipeline: batching, decisions, acks"),
    # A reply's socket send, which Twisted's doWrite made before
    # send_reply (issue 15, fourth round): still the reactor's TCP work.
    ("intake/replies.py", "reactor and TCP"),
    ("intake/", "SMTP session (spamtrap)"),
    ("twisted/mail/", "SMTP parsing (twisted.mail)"),
    ("metrics.py", "metrics"),
    ("prometheus_client", "metrics"),
    ("twisted/internet/defer.py", "Deferreds"),
    ("twisted/internet/", "reactor and TCP"),
    ("twisted/python/threadpool", "thread hand-over"),
    ("threading.py", "thread hand-over"),
]


# Innermost frames that mean a thread is waiting, not working.
IDLE = {"EPollReactor.doPoll", "Condition.wait", "Event.wait", "Thread._wait_for_tstate_lock"}


def component(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for pattern, name in COMPONENTS:
            if pattern in frame:
                return name
    return "other"


def _round(server: Server, messages: int, deadline: float = 300.0) -> float:
    """CPU seconds one load costs the server, until it has processed it all."""
    before = sum(cpu_seconds_of(pid) for pid in server.pids)
    smtp_source(server.port, SESSIONS, messages, SIZE)
    caught_up(server, deadline)  # the bare server has no metrics: no wait
    return sum(cpu_seconds_of(pid) for pid in server.pids) - before


RATE = 250  # py-spy samples per second


def _profile(server: Server, messages: int) -> dict[str, float]:
    """Share of py-spy samples per component during one round."""
    samples = sampled(server, lambda: _round(server, messages))
    total = sum(samples.values()) or 1
    return {name: n / total for name, n in samples.most_common()}


def sampled(server: Server, run: Callable[[], object], gil: bool = False) -> Counter[str]:
    """py-spy samples per component of the server's first process while
    ``run()`` runs; ``gil``: only samples of the thread holding the GIL
    (what one process can do at once). A count divided by RATE is seconds."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(tempfile.mkdtemp(prefix="spamtrap-cpu-")) / "profile.txt"
    argv = [py_spy, "record", "--pid", str(server.pids[0]), "--rate", str(RATE)]
    argv += ["--format", "raw", "--output", str(out), "--nonblocking", "--threads"]
    spy = subprocess.Popen(
        [*argv, "--gil"] if gil else argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches
    run()
    spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
    spy.wait(timeout=60)
    samples: Counter[str] = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        # A thread waiting (epoll, a condition, a queue) is not spending CPU.
        if stack.rsplit(";", 1)[-1].split(" (")[0] in IDLE:
            continue
        samples[component(stack)] += int(count)
    return samples


def main(quick: bool = False, profile: bool = False) -> dict[str, Any]:
    messages = 1000 if quick else MESSAGES
    rounds = 2 if quick else 6
    servers = [start_spamtrap("spamtrap (embedded default)"), start_bare()]
    per: dict[str, list[float]] = {s.name: [] for s in servers}
    shares: dict[str, float] = {}
    try:
        for s in servers:  # warm-up: imports, first segment, first bundle
            _round(s, messages // 4)
        for i in range(rounds):
            # ABBA: the server measured second pays for the first one's
            # background work (flushes, bundle writes); swap each round.
            for s in servers if i % 2 == 0 else servers[::-1]:
                per[s.name].append(_round(s, messages) / messages * 1e6)
        if profile:
            shares = _profile(servers[0], messages)
    finally:
        for s in servers:
            s.stop()
    spamtrap, bare = (statistics.median(per[s.name]) for s in servers)
    print(f"\n## cpu ({messages} msgs x {rounds} rounds, -s {SESSIONS}, {SIZE} B)\n")
    print("| server | µs CPU per message (median) | rounds |")
    print("|---|---|---|")
    for s in servers:
        each = ", ".join(f"{v:.0f}" for v in per[s.name])
        print(f"| {s.name} | {statistics.median(per[s.name]):.0f} | {each} |")
    print(f"\nratio spamtrap / bare: {spamtrap / bare:.2f} (goal <= 1.0)")
    if shares:
        print("\n| component | share | µs per message |")
        print("|---|---|---|")
        for name, share in shares.items():
            print(f"| {name} | {share:.1%} | {share * spamtrap:.0f} |")
    return {
        "messages": messages,
        "rounds": rounds,
        "us_per_message": per,
        "ratio": spamtrap / bare,
        "components": {k: v * spamtrap for k, v in shares.items()},
    }
