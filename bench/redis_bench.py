"""Filter throughput through Redis: 1 and 2 worker processes behind one listener.

    python -m bench.run redis_workers [--quick]

For each case a fresh real ``redis-server`` (AOF on, ``appendfsync always``:
an acknowledged XADD is on disk, as a single Redis needs for a durable 250)
and one ``--role listener`` process take a fixed number of real spam messages
(SpamAssassin spam-2, repeated) over SMTP while no worker runs, so they all
wait in the stream. Then 1 (or 2) ``--role worker`` processes start, and we
time from the moment every worker answers /healthz with the queue up until
their ``spamtrap_messages_processed_total`` add up to the count (every
message through the filters and written into a bundle), and until their
``spamtrap_queue_acked_total`` do (every bundle stored, every entry XACKed
and XDELed). The baseline, in the same run: the same messages into a plain
node's durable spool with its filters off, then that node restarted with its
filters on (role all, no Redis), timed the same way.

Default stages (the embedded default configuration) and the default two
filter threads per process; only the set's rotation is shortened, so that
bundles are stored, and messages acked, during the run rather than after an
hour. Everything runs on 127.0.0.1, bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.e2e import _send_all
from bench.servers import TWISTD, Server, _popen, busy_cpu_seconds, cpu_seconds_of, tool
from spamtrap.bundle.mbox import read_mbox
from tests.support.corpus import CorpusUnavailableError, corpus_paths, envelope_sender, load_message
from tests.support.node import free_port
from tests.support.redis_server import RedisServer

# The default config, with bundles stored every 2,000 messages or second.
CONFIG = """
traps: {catch_all: true}
sets:
  all:
    rotate: {max_messages: 2000, max_age: 1s}
"""
# The baseline's preload: the same node with its filters off.
PRELOAD = CONFIG + "filters: {workers: 0}\n"
STREAM = "spamtrap"  # queue.stream's default
POLL = 0.05
DRAIN_DEADLINE = 600.0
READY_DEADLINE = 60.0


def messages(n: int) -> tuple[list[tuple[bytes, bytes]], str]:
    """``n`` messages (envelope sender, bytes) and where they come from."""
    try:
        paths = corpus_paths("spam-2")
    except CorpusUnavailableError as e:
        print(f"\nSpamAssassin corpus unavailable ({e}): generated 4 KiB messages instead")
        one = b"From: bot@spam.example\r\nSubject: cheap pills\r\n\r\n" + (b"y" * 76 + b"\r\n") * 52
        return [(b"bot@spam.example", one)] * n, "generated, 4 KiB"
    corpus = [(envelope_sender(d).encode(), d) for d in (load_message(p) for p in paths)]
    out = [corpus[i % len(corpus)] for i in range(n)]
    return out, f"SpamAssassin spam-2 ({len(corpus)} messages) repeated"


def _spawn(
    workdir: Path,
    data: Path,
    node: str,
    config: Path,
    *,
    smtp: bool = False,
    role: str | None = None,
    queue: str | None = None,
) -> Server:
    http = free_port()
    smtp_port = free_port() if smtp else 0
    args = [
        str(TWISTD), "-n", "--pidfile=", "--logfile", str(workdir / f"{node}.log"),
        "spamtrap", "--config", str(config), "--data-dir", str(data), "--node", node,
        "--http", f"tcp:{http}:interface=127.0.0.1",
    ]  # fmt: skip
    if smtp:
        args += ["--smtp", f"tcp:{smtp_port}:interface=127.0.0.1"]
    if role is not None and queue is not None:
        args += ["--role", role, "--queue", queue]
    server = Server(node, smtp_port, http_ports=[http])
    server.procs.append(_popen(args))
    return server


def _ready(server: Server, queue: bool) -> None:
    """Wait until /healthz answers (the node has started: spool recovered,
    filters running), and with ``queue`` until Redis is up for it."""
    end = time.monotonic() + READY_DEADLINE
    url = f"http://127.0.0.1:{server.http_ports[0]}/healthz"
    while time.monotonic() < end:
        if server.procs[0].poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.procs[0].returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback
                health = json.loads(r.read())
            if health.get("status") == "ok" and (not queue or health.get("queue") == "up"):
                return
        except OSError:
            pass
        time.sleep(POLL)
    raise TimeoutError(f"{server.name} not ready in {READY_DEADLINE:.0f} s")


def _send(server: Server, batch: list[tuple[bytes, bytes]]) -> float:
    """Send every message over 20 concurrent sessions; msg/s."""
    started = time.perf_counter()
    asyncio.run(_send_all(server.port, batch))
    return len(batch) / (time.perf_counter() - started)


def _drain(workers: list[Server], n: int, redis: RedisServer | None) -> dict[str, Any]:
    """Poll the workers until all ``n`` are processed (and, with Redis, acked)."""
    pids = [w.pids[0] for w in workers]
    redis_pid = redis.proc.pid if redis is not None and redis.proc is not None else None
    cpu0 = [cpu_seconds_of(p) for p in pids]
    redis0 = cpu_seconds_of(redis_pid) if redis_pid else 0.0
    busy0 = busy_cpu_seconds()
    t0 = time.perf_counter()
    samples: list[tuple[float, float]] = []
    done: dict[str, Any] = {}
    while True:
        now = time.perf_counter() - t0
        each = [w.metric("spamtrap_messages_processed_total") for w in workers]
        samples.append((now, sum(each)))
        if "processed_s" not in done and sum(each) >= n:
            done["processed_s"] = now
            done["per_worker"] = each
            done["cpu"] = [cpu_seconds_of(p) - c for p, c in zip(pids, cpu0, strict=True)]
            done["busy_cores"] = (busy_cpu_seconds() - busy0) / now
            if redis_pid:
                done["redis_cpu"] = cpu_seconds_of(redis_pid) - redis0
        if "processed_s" in done:
            if redis is None:
                break
            if sum(w.metric("spamtrap_queue_acked_total") for w in workers) >= n:
                done["acked_s"] = now
                break
        if now > DRAIN_DEADLINE:
            raise TimeoutError(f"not done in {DRAIN_DEADLINE:.0f} s: {samples[-1][1]:.0f} of {n}")
        time.sleep(POLL)
    done["p0"] = samples[0][1]
    done["steady"] = _steady(samples, n)
    return done


def _steady(samples: list[tuple[float, float]], n: int) -> float:
    """msg/s between 10% and 90% processed: without start and tail effects."""
    t10 = next(t for t, p in samples if p >= 0.1 * n)
    p10 = next(p for t, p in samples if p >= 0.1 * n)
    t90 = next(t for t, p in samples if p >= 0.9 * n)
    p90 = next(p for t, p in samples if p >= 0.9 * n)
    return (p90 - p10) / (t90 - t10) if t90 > t10 else 0.0


def _stored(data: Path) -> tuple[int, int, int]:
    """Messages in the stored bundles, distinct X-Spamtrap-Ids among them,
    and the bundles' compressed bytes."""
    ids: set[bytes] = set()
    count = size = 0
    for path in (data / "bundles").rglob("*.mbox.gz"):
        size += path.stat().st_size
        for _, msg in read_mbox(str(path)):
            count += 1
            head = msg.split(b"\n\n", 1)[0]
            for line in head.split(b"\n"):
                if line.lower().startswith(b"x-spamtrap-id:"):
                    ids.add(line.split(b":", 1)[1].strip())
                    break
    return count, len(ids), size


def _row(label: str, n: int, intake: float, d: dict[str, Any], data: Path) -> dict[str, Any]:
    stored, distinct, size = _stored(data)
    took = d["processed_s"]
    done = n - d["p0"]  # what was processed after every worker was ready
    return {
        "mode": label,
        "intake msg/s": intake,
        "msg/s": done / took,
        "steady msg/s": d["steady"],
        "processed s": took,
        "acked s": d.get("acked_s", ""),
        "share per worker": "/".join(f"{p / n:.2f}" for p in d["per_worker"]),
        "worker cores": sum(d["cpu"]) / took,
        "msg per worker CPU-s": done / sum(d["cpu"]),
        "machine busy cores": d["busy_cores"],
        # Anything else on the machine: other jobs disturbing the run.
        "other cores": d["busy_cores"] - (sum(d["cpu"]) + d.get("redis_cpu", 0.0)) / took,
        "redis us/msg out": 1e6 * d["redis_cpu"] / done if "redis_cpu" in d else "",
        "stored": stored,
        "duplicates": stored - distinct,
        "bytes/msg stored": size / max(stored, 1),
    }


def spool_baseline(workdir: Path, batch: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """One plain node (role all): preload its spool, restart it with filters."""
    data = workdir / "spool-data"
    preload, config = workdir / "preload.yaml", workdir / "config.yaml"
    preload.write_text(PRELOAD)
    config.write_text(CONFIG)
    node = _spawn(workdir, data, "solo", preload, smtp=True)
    try:
        _ready(node, queue=False)
        cpu0 = cpu_seconds_of(node.pids[0])
        intake = _send(node, batch)
        intake_cpu = cpu_seconds_of(node.pids[0]) - cpu0
        assert node.metric("spamtrap_spool_depth") == len(batch), "preload not all spooled"
    finally:
        node.stop(timeout=120)
    node = _spawn(workdir, data, "solo", config, smtp=True)
    try:
        _ready(node, queue=False)
        d = _drain([node], len(batch), None)
    finally:
        node.stop(timeout=300)
    row = _row("spool, 1 process (role all, no Redis)", len(batch), intake, d, data)
    row["intake us/msg"] = 1e6 * intake_cpu / len(batch)
    return row


def redis_workers(
    workdir: Path, batch: list[tuple[bytes, bytes]], n_workers: int
) -> dict[str, Any]:
    """A fresh Redis and listener; preload the stream; drain it with workers."""
    n = len(batch)
    case = workdir / f"redis-{n_workers}"
    data = case / "data"
    config = workdir / "config.yaml"
    config.write_text(CONFIG)
    redis = RedisServer(case / "redis", appendfsync="always")
    started: list[Server] = []
    try:
        redis.start()
        listener = _spawn(
            case, data, "listener", config, smtp=True, role="listener", queue=redis.url
        )
        started.append(listener)
        _ready(listener, queue=True)
        assert redis.proc is not None
        redis_cpu0 = cpu_seconds_of(redis.proc.pid)
        cpu0 = cpu_seconds_of(listener.pids[0])
        intake = _send(listener, batch)
        intake_cpu = cpu_seconds_of(listener.pids[0]) - cpu0
        redis_preload = cpu_seconds_of(redis.proc.pid) - redis_cpu0
        length = redis.command("XLEN", STREAM)
        assert length == n, f"stream holds {length}, sent {n}"
        workers = [
            _spawn(case, data, f"worker{i}", config, role="worker", queue=redis.url)
            for i in range(n_workers)
        ]
        started += workers
        for w in workers:
            _ready(w, queue=True)
        d = _drain(workers, n, redis)
        for w in workers:
            w.stop(timeout=300)  # the last bundles are stored and acked
        left = redis.command("XLEN", STREAM)
        pending = redis.command("XPENDING", STREAM, "spamtrap")[0]
        assert left == 0 and pending == 0, f"stream left {left}, pending {pending}"
    finally:
        for s in reversed(started):
            s.stop(timeout=300)
        redis.stop()
    row = _row(f"Redis, {n_workers} worker process(es)", n, intake, d, data)
    row["intake us/msg"] = 1e6 * intake_cpu / n
    row["redis us/msg in"] = 1e6 * redis_preload / n
    return row


def main(quick: bool = False) -> list[dict[str, Any]]:
    tool("redis-server")  # a clear message rather than a failure halfway
    n, rounds = (5000, 1) if quick else (20000, 3)
    batch, source = messages(n)
    size = statistics.mean(len(d) for _, d in batch)
    print(f"\n## redis_workers: {n} messages x {rounds} rounds, {source}, mean {size:.0f} bytes")
    workdir = Path(tempfile.mkdtemp(prefix="spamtrap-bench-redis-"))
    runs: list[list[dict[str, Any]]] = []
    try:
        for r in range(rounds):  # the three cases alternate, so noise hits all alike
            case = workdir / f"round{r}"
            case.mkdir()
            runs.append(
                [
                    spool_baseline(case, batch),
                    redis_workers(case, batch, 1),
                    redis_workers(case, batch, 2),
                ]
            )
            shutil.rmtree(case, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [_median([run[i] for run in runs]) for i in range(3)]
    base, one, two = (r["msg/s"] for r in rows)
    rows[1]["/spool"] = one / base
    rows[2]["/spool"] = two / base
    rows[2]["2w/1w"] = two / one
    rows[2]["2w/1w each round"] = " ".join(
        f"{run[2]['msg/s'] / run[1]['msg/s']:.2f}" for run in runs
    )
    return rows


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure over the rounds, and the range of msg/s."""
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, int | float):
            out[key] = statistics.median(r[key] for r in rows)
        else:
            out[key] = value
    rates = [r["msg/s"] for r in rows]
    out["msg/s range"] = f"{min(rates):.0f}-{max(rates):.0f}"
    return out
