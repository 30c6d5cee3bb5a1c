"""The dashboard's cost: intake with one browser watching, side by side.

    python -m bench.run dashboard [--quick]

Two nodes of the same config, with filter workers, run in alternating
rounds of smtp-source: one with ``http.dashboard: off`` (no hook, no
page), one with ``http.dashboard: open`` while a real headless Chromium
keeps its /dashboard open (it polls data.json every 2 s, as a person's
browser does). Chromium runs in real time (no virtual time budget), from
before the first round to after the last.

Per node: messages per second, and the node's own CPU per message
(twistd's user + system time over each round and its drain).

Two layouts, each a full set of rounds:

- ``apart`` (the issue's figure): both nodes on CPU 0, Chromium and
  smtp-source on CPU 1, as when the operator's browser and the senders are
  other machines. Both nodes get the same core and the same neighbours, so
  the difference is the dashboard's own cost to the node: its intake hooks,
  the page and data.json requests. The bound: < 2% of intake.
- ``shared``: no pinning; Chromium shares the node's two cores, as when the
  operator runs the browser on the trap node itself. The browser then
  competes for the cores the node's rounds need, and the figure counts it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.servers import Server, caught_up, cpu_seconds_of, smtp_source, start_spamtrap

# The ``apart`` layout: the nodes on one CPU, everything else on the other.
NODE_CPUS, OTHER_CPUS = {0}, {1}

CONFIG = """
traps: {{catch_all: true}}
http: {{dashboard: {mode}}}
"""


def _round(server: Server, sessions: int, n: int) -> tuple[float, float]:
    """(msg/s, CPU µs per message) of one smtp-source run and its drain."""
    cpu0 = sum(cpu_seconds_of(pid) for pid in server.pids)
    wall = smtp_source(server.port, sessions, n)
    caught_up(server)
    cpu1 = sum(cpu_seconds_of(pid) for pid in server.pids)
    return n / wall, (cpu1 - cpu0) / n * 1e6


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (and the threads it starts later) on ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def _browser(url: str, profile: Path, cpus: set[int] | None) -> subprocess.Popen[bytes]:
    binary = shutil.which("chromium")
    if binary is None:
        raise SystemExit("bench dashboard: chromium is not installed (apt-get install chromium)")
    args = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",  # keeps headless Chromium running
        url,
    ]
    # Pinned before exec: Chromium's helper processes inherit it.
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    return subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin
    )


def _layout(apart: bool, n: int, rounds: int, sessions: int) -> list[dict[str, Any]]:
    """The two nodes' rounds in one layout; a row per node."""
    mine = os.sched_getaffinity(0)
    off = start_spamtrap("dashboard off", config=CONFIG.format(mode="off"))
    watched = start_spamtrap("dashboard watched", config=CONFIG.format(mode="open"))
    profile = Path(tempfile.mkdtemp(prefix="spamtrap-bench-chromium-"))
    url = f"http://127.0.0.1:{watched.http_ports[0]}/dashboard"
    seen: dict[str, list[tuple[float, float]]] = {off.name: [], watched.name: []}
    browser = None
    try:
        if apart:
            for pid in off.pids + watched.pids:
                _pin(pid, NODE_CPUS)
            os.sched_setaffinity(0, OTHER_CPUS)  # smtp-source inherits it
        browser = _browser(url, profile, OTHER_CPUS if apart else None)
        time.sleep(3)  # the page has loaded and polls
        for i in range(rounds):
            # ABBA: the node measured second in a round pays for the first
            # one's background work (bundle writes, flushes); swap each round.
            for server in (off, watched) if i % 2 == 0 else (watched, off):
                seen[server.name].append(_round(server, sessions, n))
        assert browser.poll() is None, "Chromium exited during the run"
    finally:
        os.sched_setaffinity(0, mine)
        if browser is not None:
            browser.terminate()
            browser.wait(30)
        shutil.rmtree(profile, ignore_errors=True)
        off.stop()
        watched.stop()
    return [
        {
            "node": name,
            "msg/s": statistics.median(r[0] for r in results),
            "cpu µs/msg": statistics.median(r[1] for r in results),
            "rounds": [round(r[0]) for r in results],
        }
        for name, results in seen.items()
    ]


def main(quick: bool = False) -> dict[str, Any]:
    n, rounds, sessions = (1000, 2, 20) if quick else (5000, 6, 20)
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench dashboard: needs two CPUs (nodes on one, browser on the other)")
    out: dict[str, Any] = {"messages": n, "rounds": rounds, "sessions": sessions}
    for layout in ("apart", "shared"):
        rows = _layout(layout == "apart", n, rounds, sessions)
        intake = rows[1]["msg/s"] / rows[0]["msg/s"] - 1
        cpu = rows[1]["cpu µs/msg"] / rows[0]["cpu µs/msg"] - 1
        print(f"\n## dashboard, {layout} ({n} msgs x {rounds} rounds, {sessions} sessions)\n")
        print("| node | msg/s | cpu µs/msg | msg/s per round |\n|---|---|---|---|")
        for row in rows:
            each = ", ".join(str(r) for r in row["rounds"])
            print(f"| {row['node']} | {row['msg/s']:,.0f} | {row['cpu µs/msg']:,.1f} | {each} |")
        bound = " (bound: > -2%)" if layout == "apart" else ""
        print(f"\nwatched against off: intake {intake:+.1%}{bound}, CPU per message {cpu:+.1%}")
        out[layout] = {"rows": rows, "intake": intake, "cpu": cpu}
    return out
