"""The GIL switch interval (filters.switch_interval): CPU per message and
intake of the embedded default at several intervals, side by side.

    python -m bench.run switch [--quick]

Each node runs the embedded default with one interval; their rounds of
``smtp-source -s 20 -m 5000 -l 4096`` alternate (ABBA), and each round's
CPU is read until the workers have processed it. A shorter interval lets
the reactor take the GIL back sooner after its system calls (SMTP latency
under filter load: see ``python -m bench.run latency``), and every forced
switch costs CPU.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.servers import measured_round, start_spamtrap

INTERVALS = ("1ms", "2.5ms", "5ms")
SESSIONS, SIZE = 20, 4096


def main(quick: bool = False) -> dict[str, Any]:
    from bench.run import table

    n, rounds = (500, 2) if quick else (5000, 8)
    servers = [
        start_spamtrap(
            f"switch_interval {i}",
            config=f"traps: {{catch_all: true}}\nfilters: {{switch_interval: {i}}}\n",
        )
        for i in INTERVALS
    ]
    seen: dict[str, list[tuple[float, float]]] = {s.name: [] for s in servers}
    try:
        for s in servers:  # warm-up: imports, first segment, first bundle
            measured_round(s, SESSIONS, n // 4, SIZE)
        for i in range(rounds):
            for s in servers if i % 2 == 0 else servers[::-1]:
                seen[s.name].append(measured_round(s, SESSIONS, n, SIZE))
    finally:
        for s in servers:
            s.stop()
    first = servers[0].name
    base_rate = statistics.median(r for r, _ in seen[first])
    base_cpu = statistics.median(c for _, c in seen[first])
    rows = []
    for name, each in seen.items():
        rate = statistics.median(r for r, _ in each)
        cpu = statistics.median(c for _, c in each)
        rows.append(
            {
                "node": name,
                "msg/s": rate,
                "µs CPU per message": cpu,
                f"msg/s vs {INTERVALS[0]}": rate / base_rate,
                f"CPU vs {INTERVALS[0]}": cpu / base_cpu,
            }
        )
    print(f"\n## switch interval ({n} msgs x {rounds} rounds, -s {SESSIONS}, {SIZE} B)\n")
    table(rows)
    for name, each in seen.items():
        print(f"- {name}: " + ", ".join(f"{r:.0f} msg/s {c:.0f} µs" for r, c in each))
    return {"messages": n, "rounds": rounds, "rows": rows, "rounds_seen": seen}
