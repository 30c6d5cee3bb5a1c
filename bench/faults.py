"""Recovery after faults, and duplicates per 10,000: the fault script as a benchmark.

    python -m bench.run faults [--quick]

Each round builds a fresh cluster on loopback (tests/support/cluster.py): a real
redis-server (AOF, appendfsync always), SeaweedFS as the shared bucket, and
three twistd nodes: A listener (127.0.0.2), B all (127.0.0.3), C worker
(127.0.0.4). 10,000 messages stream across A and B; at 20% C is killed with
SIGKILL for good, at 50% Redis is killed and started again 3 s later. Then
every 250'd id is looked up in the bucket.

Recovery times:
- worker kill: from the kill until Redis lists no pending entry for C (B
  took them all over); with the test-sized claim_idle of 5 s;
- Redis restart: from Redis being started again until every listener
  answers from Redis again and has forwarded what it spooled meanwhile.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.cluster import Cluster, NodeSpec, Settings, fault_script
from tests.support.seaweedfs import start_seaweedfs

MESSAGES = 10_000
SPECS = [
    NodeSpec("A", "listener", "127.0.0.2"),
    NodeSpec("B", "all", "127.0.0.3"),
    NodeSpec("C", "worker", "127.0.0.4"),
]


def one_round(work: Path, s3: Any, messages: int) -> dict[str, Any]:
    with Cluster(work, SPECS, s3=s3, settings=Settings()) as cluster:
        report = fault_script(cluster, messages=messages)
    rec = report["recovery_seconds"]
    return {
        "accepted": report["accepted"],
        "missing": report["missing_count"],
        "unmarked_duplicates": report["unmarked_duplicate_count"],
        "duplicate_copies": report["duplicate_copies"],
        "duplicates_per_10000": report["duplicates_per_10000"],
        "worker_held_at_kill": report["worker_held_at_kill"],
        "worker_kill_s": rec["worker_kill"],
        "redis_restart_s": rec["redis_restart"],
        "redis_down_s": report["redis_down_seconds"],
        "spooled": sum(c["spooled"] for c in report["counters"].values()),
        "msg_per_s": report["load"]["messages_per_second"],
    }


def run(quick: bool) -> dict[str, Any]:
    rounds = 1 if quick else 3
    messages = 2_000 if quick else MESSAGES
    results = []
    with tempfile.TemporaryDirectory(prefix="spamtrap-faults-") as tmp:
        s3 = start_seaweedfs(Path(tmp) / "seaweedfs")
        try:
            for i in range(rounds):
                started = time.monotonic()
                r = one_round(Path(tmp) / f"round{i}", s3, messages)
                r["wall_s"] = round(time.monotonic() - started, 1)
                results.append(r)
        finally:
            s3.stop()
    print(markdown(results, Settings().claim_idle))
    return {"settings": {"claim_idle": Settings().claim_idle}, "rounds": results}


def markdown(results: list[dict[str, Any]], claim_idle: float) -> str:
    keys = [
        "accepted", "missing", "unmarked_duplicates", "duplicate_copies",
        "duplicates_per_10000", "worker_held_at_kill", "worker_kill_s",
        "redis_down_s", "redis_restart_s", "spooled", "msg_per_s", "wall_s",
    ]  # fmt: skip
    lines = [
        f"claim_idle {claim_idle:g} s; one column per round, then the median",
        "",
        "| | " + " | ".join(f"round {i + 1}" for i in range(len(results))) + " | median |",
        "|---" * (len(results) + 2) + "|",
    ]
    for key in keys:
        values = [r[key] for r in results]
        cells = [f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" for v in values]
        median = statistics.median(values)
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {median:,.2f} |")
    return "\n".join(lines)
