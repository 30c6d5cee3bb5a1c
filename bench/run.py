"""spamtrap's benchmarks, side by side with the reference servers in one run.

    python -m bench.run [intake] [multiproc] [hold] [hold_many] [rss] [latency] [e2e]
                        [redis_workers] [faults] [hostile] [cpu] [dashboard] [campaigns]
                        [outputs] [switch]
                        [--quick] [--profile]

With no scenario names, all run. Results print as Markdown and are saved to
bench/out/<scenario>.json. Every load is bounded in count and time, and only
127.0.0.1 is used. See docs/benchmarks.md for figures and how to read them.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from bench.servers import (
    HOLD,
    REPO,
    Server,
    busy_cpu_seconds,
    caught_up,
    cpu_seconds_of,
    smtp_source,
    start_bare,
    start_smtp_sink,
    start_spamtrap,
)

OUT = REPO / "bench" / "out"
QUICK = "--quick" in sys.argv

INTAKE_ONLY = """
traps: {catch_all: true}
filters: {workers: 0}
spool: {max_messages: 100000000, max_bytes: 64GiB}
"""
WORKERS_STOPPED = """
traps: {catch_all: true}
filters: {workers: 0}
spool: {max_messages: 2000}
"""
SATURATED = """
traps: {catch_all: true}
filters:
  order: [size, slow]
  custom:
    slow: {callable: "bench.stages:busy", options: {ms: 2}}
"""


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


def save(name: str, data: dict[str, object]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    data = {"scenario": name, "date": time.strftime("%Y-%m-%d"), "machine": machine(), **data}
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def table(rows: list[dict[str, Any]]) -> None:
    """Print dict rows as a Markdown table, one column per key."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if v < 10 else f"{v:.0f}"
        return str(v)

    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(cell(r[c]) if c in r else "" for c in cols) + " |")


def rates(servers: list[Server], sessions: int, messages: int, rounds: int) -> dict[str, float]:
    """Median msg/s per server, runs alternating so noise hits all alike."""
    seen: dict[str, list[float]] = {s.name: [] for s in servers}
    for _ in range(rounds):
        for s in servers:
            seen[s.name].append(messages / smtp_source(s.port, sessions, messages))
    return {name: statistics.median(v) for name, v in seen.items()}


def intake() -> None:
    """One process, durably spooled, against the bare Twisted ESMTP server."""
    n, rounds = (2000, 2) if QUICK else (5000, 5)
    servers = [
        start_spamtrap("spamtrap intake-only", config=INTAKE_ONLY),
        start_spamtrap("spamtrap with workers"),
        start_bare(),
    ]
    rows = []
    try:
        for sessions in (20, 100):
            r = rates(servers, sessions, n, rounds)
            bare = r["bare-twisted"]
            rows.append(
                {
                    "sessions": sessions,
                    **r,
                    "ratio intake-only": r["spamtrap intake-only"] / bare,
                    "ratio with workers": r["spamtrap with workers"] / bare,
                }
            )
        accepted = servers[0].metric("spamtrap_messages_accepted_total")
    finally:
        for s in servers:
            s.stop()
    print(f"\n## intake ({n} msgs x {rounds} rounds, 4 KiB, one per connection)\n")
    table(rows)
    print(f"\naccepted by intake-only spamtrap: {accepted:.0f} (sent {2 * n * rounds})")
    save("intake", {"messages": n, "rounds": rounds, "rows": rows, "accepted": accepted})


def _children_cpu() -> float:
    """CPU seconds of the children waited for so far: smtp-source's, since the
    servers are still running (a live child is not counted)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _counts(server: Server, name: str, fallback: float) -> list[float]:
    return server.metric_each(name) if server.http_ports else [fallback]


def _round(server: Server, sessions: int, n: int) -> dict[str, Any]:
    """One smtp-source run against one server, measured per process: what
    each accepted, its CPU while SMTP ran, and its CPU until its filters had
    caught up (the whole cost of its messages)."""
    accepted0 = _counts(server, "spamtrap_messages_accepted_total", 0)
    cpu0 = [cpu_seconds_of(pid) for pid in server.pids]
    source0, busy0 = _children_cpu(), busy_cpu_seconds()
    wall = smtp_source(server.port, sessions, n)
    source1, busy1 = _children_cpu(), busy_cpu_seconds()
    cpu1 = [cpu_seconds_of(pid) for pid in server.pids]
    accepted1 = _counts(server, "spamtrap_messages_accepted_total", n)
    drain = caught_up(server)
    cpu2 = [cpu_seconds_of(pid) for pid in server.pids]
    msgs = [b - a for a, b in zip(accepted0, accepted1, strict=True)]
    return {
        "wall": wall,
        "rate": n / wall,
        "source_cores": (source1 - source0) / wall,
        "busy_cores": (busy1 - busy0) / wall,
        "drain_s": drain,
        "procs": [
            {
                "msgs": m,
                "rate": m / wall,
                "cores": (c1 - c0) / wall,
                "msg_per_cpu_s": m / (c2 - c0) if c2 > c0 else 0.0,
            }
            for m, c0, c1, c2 in zip(msgs, cpu0, cpu1, cpu2, strict=True)
        ],
    }


def multiproc() -> None:
    """1 and 2 processes (SO_REUSEPORT) against smtp-sink, per process too."""
    n, rounds = (4000, 2) if QUICK else (10000, 3)
    servers = [
        start_spamtrap("spamtrap x1"),
        start_spamtrap("spamtrap x2", processes=2),
        start_smtp_sink(),
    ]
    med = statistics.median
    rows: list[dict[str, Any]] = []
    per_process: list[dict[str, Any]] = []
    summary = []
    try:
        for sessions in (20, 100):
            seen: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
            for _ in range(rounds):  # alternating, so noise hits all alike
                for s in servers:
                    seen[s.name].append(_round(s, sessions, n))
            rate = {name: med(r["rate"] for r in runs) for name, runs in seen.items()}
            sink = rate["smtp-sink"]
            summary.append(
                {
                    "sessions": sessions,
                    **rate,
                    "x1/sink": rate["spamtrap x1"] / sink,
                    "x2/sink": rate["spamtrap x2"] / sink,
                    "x2/x1": rate["spamtrap x2"] / rate["spamtrap x1"],
                }
            )
            for name, runs in seen.items():
                rows.append(
                    {
                        "sessions": sessions,
                        "server": name,
                        "msg/s": rate[name],
                        "/sink": rate[name] / sink,
                        "server cores": med(sum(p["cores"] for p in r["procs"]) for r in runs),
                        "smtp-source cores": med(r["source_cores"] for r in runs),
                        "machine busy cores": med(r["busy_cores"] for r in runs),
                        # Anything else on the machine: other jobs disturbing the run.
                        "other cores": med(
                            r["busy_cores"]
                            - r["source_cores"]
                            - sum(p["cores"] for p in r["procs"])
                            for r in runs
                        ),
                        "filter catch-up s": med(r["drain_s"] for r in runs),
                    }
                )
                for i in range(len(runs[0]["procs"])):
                    procs = [r["procs"][i] for r in runs]
                    per_process.append(
                        {
                            "sessions": sessions,
                            "server": name,
                            "process": i,
                            "msg/s": med(p["rate"] for p in procs),
                            "share": med(p["msgs"] / n for p in procs),
                            "cores": med(p["cores"] for p in procs),
                            "msg per CPU-s": med(p["msg_per_cpu_s"] for p in procs),
                        }
                    )
        totals = servers[1].metric_each("spamtrap_messages_accepted_total")
    finally:
        for s in servers:
            s.stop()
    print(f"\n## several processes ({n} msgs x {rounds} rounds, 4 KiB, workers on)\n")
    table(summary)
    print()
    table(rows)
    print("\nper process (msg per CPU-s: intake plus the default filters, until caught up)\n")
    table(per_process)
    print(f"\nmessages per process with 2 processes, all rounds: {totals}")
    ours = [p["msg per CPU-s"] for p in per_process if p["server"].startswith("spamtrap")]
    per_core = med(ours)
    print(
        f"\nmodel: one process does {per_core:.0f} msg per CPU-second"
        f" ({1e6 / per_core:.0f} us a message); N machines x P processes (P <= free cores)"
        f" ~ N x P x {per_core:.0f} msg/s, within the store's and Redis's own limits"
    )
    save(
        "multiproc",
        {
            "messages": n,
            "rounds": rounds,
            "rows": summary,
            "servers": rows,
            "per_process": per_process,
            "totals_x2": totals,
            "msg_per_cpu_s": per_core,
        },
    )


FAILURES = ("connect_fail", "bad_greeting", "rejected", "dropped")


def hold(sources: int = 1) -> None:
    """Hold 9,000 sessions (EHLO, wait, one message each); RSS added per session.

    From one address the per-IP limit (200) would refuse most of them, so it
    is off for this run; hold_many comes from 200 addresses with it on."""
    n = 2000 if QUICK else 9000
    rows = []
    one_address = "traps: {catch_all: true}\nsmtp: {max_connections_per_ip: 0}\n"
    starts: tuple[Any, ...] = (
        (lambda: start_spamtrap(config=one_address)) if sources == 1 else start_spamtrap,
        start_bare,
    )
    for start in starts:
        server = start()
        try:
            time.sleep(1)
            idle = server.rss_kib()
            out = subprocess.run(
                [
                    sys.executable,
                    str(HOLD),
                    f"127.0.0.1:{server.port}",
                    str(n),
                    "5",
                    "victim@trap.example",
                    ",".join(map(str, server.pids)),
                ],
                capture_output=True,
                text=True,
                timeout=600,
                env=dict(os.environ, HOLD_SOURCES=str(sources)),
            ).stdout.strip()
            fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
            held = int(fields.get("rss_kib", "0"))
            rows.append(
                {
                    "server": server.name,
                    "sessions": n,
                    "completed": int(fields.get("completed", "0")),
                    "refused_or_dropped": sum(
                        int(fields.get(k, "0"))
                        for k in ("connect_fail", "bad_greeting", "rejected", "dropped")
                    ),
                    "idle_rss_kib": idle,
                    "held_rss_kib": held,
                    "kib_per_session": (held - idle) / n,
                }
            )
        finally:
            server.stop()
    where = "one address" if sources == 1 else f"{sources} addresses, per-IP limit on"
    print(f"\n## {n} concurrent sessions held ({where})\n")
    table(rows)
    save("hold" if sources == 1 else "hold_many", {"rows": rows})


def hold_many() -> None:
    """hold from 200 source addresses with the default per-IP limit (200)."""
    hold(sources=200)


def rss() -> None:
    """RSS while 40 sessions hold 7.5 MiB of unfinished DATA, and after."""
    from bench import rss as rss_bench

    save("rss", rss_bench.main(QUICK))


def _transaction_latency(port: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rwb")

        def cmd(line: bytes | None, code: bytes) -> None:
            if line is not None:
                f.write(line + b"\r\n")
                f.flush()
            while True:
                reply = f.readline()
                if not reply.startswith(code):
                    raise RuntimeError(f"unexpected reply {reply!r}")
                if reply[3:4] != b"-":
                    return

        cmd(None, b"220")
        cmd(b"EHLO probe.example", b"250")
        cmd(b"MAIL FROM:<probe@spam.example>", b"250")
        cmd(b"RCPT TO:<probe@trap.example>", b"250")
        cmd(b"DATA", b"354")
        cmd(b"Subject: probe\r\n\r\nprobe\r\n.", b"250")
        cmd(b"QUIT", b"221")
    return time.perf_counter() - started


def latency() -> None:
    """SMTP latency idle, and while the filter workers are saturated."""
    probes = 100 if QUICK else 300
    load_n = 8000 if QUICK else 20000
    rows = []
    for label, config in (
        ("idle", None),
        ("filters saturated (2 ms of Python per message)", SATURATED),
    ):
        server = start_spamtrap(config=config)
        try:
            if config:
                loader = threading.Thread(target=smtp_source, args=(server.port, 20, load_n))
                loader.start()
                time.sleep(2)  # let the backlog build up
            samples = [_transaction_latency(server.port) for _ in range(probes)]
            backlog = server.metric("spamtrap_spool_depth")
            if config:
                loader.join()
        finally:
            server.stop(timeout=600)
        samples.sort()
        rows.append(
            {
                "state": label,
                "p50_ms": 1000 * samples[len(samples) // 2],
                "p99_ms": 1000 * samples[int(len(samples) * 0.99) - 1],
                "max_ms": 1000 * samples[-1],
                "spool_depth_during": backlog,
            }
        )
    print(f"\n## SMTP latency of one full transaction ({probes} probes)\n")
    table(rows)
    save("latency", {"probes": probes, "rows": rows})


def stopped() -> None:
    """Workers stopped: intake goes on, the spool stays bounded, oldest shed."""
    n = 3000 if QUICK else 10000
    servers = [
        start_spamtrap("workers stopped", config=WORKERS_STOPPED),
        start_spamtrap("workers on"),
    ]
    try:
        r = rates(servers, 20, n, 1 if QUICK else 3)
        depth = servers[0].metric("spamtrap_spool_depth")
        shed = servers[0].metric("spamtrap_spool_shed_total")
        accepted = servers[0].metric("spamtrap_messages_accepted_total")
    finally:
        for s in servers:
            s.stop()
    print("\n## workers stopped (spool.max_messages 2000)\n")
    table([{"server": name, "msg/s (20 sessions)": v} for name, v in r.items()])
    print(f"\nworkers stopped: accepted {accepted:.0f}, spool depth {depth:.0f}, shed {shed:.0f}")
    save("stopped", {"rates": r, "accepted": accepted, "depth": depth, "shed": shed})


def _stalled_server() -> tuple[int, threading.Event]:
    """A fake clamd that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.settimeout(0.5)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)
        for c in held:
            c.close()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], stop


def stalled_clamd() -> None:
    """Intake and SMTP latency with clamd stalled (every scan times out)."""
    n, rounds = (2000, 1) if QUICK else (5000, 3)
    port, stop = _stalled_server()
    stalled = f"""
traps: {{catch_all: true}}
filters:
  clamd: {{enabled: true, host: 127.0.0.1, port: {port}, timeout: 2s, on_error: keep}}
"""
    servers = [start_spamtrap("clamd stalled", config=stalled), start_spamtrap("clamd off")]
    try:
        r = rates(servers, 20, n, rounds)
        probes = {s.name: sorted(_transaction_latency(s.port) for _ in range(50)) for s in servers}
        backlog = servers[0].metric("spamtrap_spool_depth")
    finally:
        for s in servers:
            s.stop(timeout=30)  # the stalled one keeps its backlog spooled for the next start
        stop.set()
    rows = [
        {
            "server": name,
            "msg/s (20 sessions)": v,
            "p50 ms": 1000 * probes[name][25],
            "max ms": 1000 * probes[name][-1],
        }
        for name, v in r.items()
    ]
    print("\n## stalled clamd (every scan waits for its 2 s timeout)\n")
    table(rows)
    print(f"\nspool depth with clamd stalled: {backlog:.0f}")
    save("stalled_clamd", {"rows": rows, "spool_depth": backlog})


def s3() -> None:
    """SMTP to objects in SeaweedFS; intake with the S3 server stopped."""
    from bench.s3_intake import main as s3_main

    rows = s3_main(quick=QUICK)
    print("\n## S3 store: SMTP to objects, and intake with S3 stopped\n")
    table(rows)
    save("s3", {"rows": rows})


def redis_workers() -> None:
    """Filter throughput with 1 and 2 worker processes behind one listener
    through Redis, against one process on its own spool."""
    from bench.redis_bench import main as redis_main

    rows = redis_main(quick=QUICK)
    print("\n## Redis work queue: a preloaded stream drained by 1 and 2 workers\n")
    table(rows)
    save("redis_workers", {"appendfsync": "always", "rows": rows})


def faults() -> None:
    from bench import faults as fault_bench

    save("faults", fault_bench.run(QUICK))


def hostile() -> None:
    """SMTP session times while the workers filter hostile content (issue 11)."""
    from bench import hostile as hostile_bench

    hostile_bench.main()


def campaigns() -> None:
    """Campaign assignment: µs per message, quality on a labelled synthetic
    set, and the clusters of the SpamAssassin corpus spam-2 (issue 14)."""
    from bench import campaigns as campaign_bench

    save("campaigns", campaign_bench.main(quick=QUICK))


def switch() -> None:
    """CPU per message and intake at several GIL switch intervals."""
    from bench import switch as switch_bench

    save("switch", switch_bench.main(quick=QUICK))


def outputs() -> None:
    """Intake with three outputs on (one blackholed) against outputs off,
    and each output's own msg/s (issue 13)."""
    from bench import outputs_bench

    save("outputs", outputs_bench.main(quick=QUICK, profile="--profile" in sys.argv))


SCENARIOS = {
    "intake": intake,
    "multiproc": multiproc,
    "hold": hold,
    "hold_many": hold_many,
    "rss": rss,
    "latency": latency,
    "stopped": stopped,
    "stalled_clamd": stalled_clamd,
    "s3": s3,
    "redis_workers": redis_workers,
    "faults": faults,
    "hostile": hostile,
    "campaigns": campaigns,
    "outputs": outputs,
    "switch": switch,
}


def main() -> None:
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or list(SCENARIOS)
    print(f"# spamtrap benchmarks, {time.strftime('%Y-%m-%d')}, {machine()}")
    for name in names:
        if name == "e2e":
            import importlib

            importlib.import_module("bench.e2e").main(quick=QUICK)
            continue
        if name == "dashboard":
            from bench import dashboard

            save("dashboard", dashboard.main(quick=QUICK))
            continue
        if name == "cpu":
            from bench import cpu

            save("cpu", cpu.main(quick=QUICK, profile="--profile" in sys.argv))
            continue
        SCENARIOS[name]()


if __name__ == "__main__":
    main()
