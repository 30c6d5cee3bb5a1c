"""The dashboard's cost: intake with one browser watching, side by side.

    python -m bench.run dashboard [--quick]

Two nodes of the same config, with filter workers, run in alternating
rounds of smtp-source: one with ``http.dashboard: off`` (no hook, no
page), one with ``http.dashboard: open`` while a real headless Chromium
keeps its /dashboard open (it polls data.json every 2 s, as a person's
browser does). Chromium runs in real time (no virtual time budget), from
before the first round to after the last.

Per node: messages per second, and the node's own CPU per message
(twistd's user + system time over each round and its drain). The CPU
figure is the one to read: Chromium competes for this machine's cores, so
msg/s also counts the browser, not only the server's work for it. The
issue's bound: the watched node's CPU per message within 2% of the other's.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.servers import Server, cpu_seconds_of, smtp_source, start_spamtrap

CONFIG = """
traps: {{catch_all: true}}
http: {{dashboard: {mode}}}
"""


def _drained(server: Server, deadline: float = 300) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        accepted = server.metric("spamtrap_messages_accepted_total")
        if server.metric("spamtrap_messages_processed_total") >= accepted:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{server.name}: filters did not catch up in {deadline:.0f} s")


def _round(server: Server, sessions: int, n: int) -> tuple[float, float]:
    """(msg/s, CPU µs per message) of one smtp-source run and its drain."""
    cpu0 = sum(cpu_seconds_of(pid) for pid in server.pids)
    wall = smtp_source(server.port, sessions, n)
    _drained(server)
    cpu1 = sum(cpu_seconds_of(pid) for pid in server.pids)
    return n / wall, (cpu1 - cpu0) / n * 1e6


def _browser(url: str, profile: Path) -> subprocess.Popen[bytes]:
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
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(quick: bool = False) -> dict[str, Any]:
    n, rounds, sessions = (1000, 2, 20) if quick else (5000, 6, 20)
    off = start_spamtrap("dashboard off", config=CONFIG.format(mode="off"))
    watched = start_spamtrap("dashboard watched", config=CONFIG.format(mode="open"))
    profile = Path(tempfile.mkdtemp(prefix="spamtrap-bench-chromium-"))
    browser = _browser(f"http://127.0.0.1:{watched.http_ports[0]}/dashboard", profile)
    seen: dict[str, list[tuple[float, float]]] = {off.name: [], watched.name: []}
    try:
        time.sleep(3)  # the page has loaded and polls
        for i in range(rounds):
            # ABBA: the node measured second in a round pays for the first
            # one's background work (bundle writes, flushes); swap each round.
            for server in (off, watched) if i % 2 == 0 else (watched, off):
                seen[server.name].append(_round(server, sessions, n))
        assert browser.poll() is None, "Chromium exited during the run"
    finally:
        browser.terminate()
        browser.wait(30)
        shutil.rmtree(profile, ignore_errors=True)
        off.stop()
        watched.stop()
    rows = []
    for name, results in seen.items():
        rows.append(
            {
                "node": name,
                "msg/s": statistics.median(r[0] for r in results),
                "cpu µs/msg": statistics.median(r[1] for r in results),
            }
        )
    cost = rows[1]["cpu µs/msg"] / rows[0]["cpu µs/msg"] - 1
    print(f"\n## dashboard ({n} msgs x {rounds} rounds, {sessions} sessions, with workers)\n")
    print("| node | msg/s | cpu µs/msg |\n|---|---|---|")
    for row in rows:
        print(f"| {row['node']} | {row['msg/s']:,.0f} | {row['cpu µs/msg']:,.1f} |")
    print(f"\nCPU per message with one browser watching: {cost:+.1%} (bound: +2%)")
    return {"messages": n, "rounds": rounds, "sessions": sessions, "rows": rows, "cost": cost}
