"""Start and stop the servers a benchmark compares, all on 127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.node import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
BARE = SHARED / "bench" / "bare_twisted_smtp.py"
HOLD = SHARED / "bench" / "hold.py"
TWISTD = Path(sys.executable).parent / "twistd"


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not path:
        raise SystemExit(f"{name} is not installed: run `make deps` (it comes from Debian)")
    return path


@dataclass
class Server:
    name: str
    port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    http_ports: list[int] = field(default_factory=list)
    workdir: Path | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def metric_each(self, name: str) -> list[float]:
        """One metric from each process's own /metrics, in process order."""
        return [Server(self.name, 0, http_ports=[p]).metric(name) for p in self.http_ports]

    def rss_kib(self) -> int:
        total = 0
        for pid in self.pids:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total

    def metric(self, name: str) -> float:
        import urllib.request

        total = 0.0
        for port in self.http_ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:  # noqa: S310
                for line in r.read().decode().splitlines():
                    if re.match(re.escape(name) + r"(\{.*\})? ", line):
                        total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, timeout: float = 300, cleanup: bool = True) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.workdir and cleanup:
            shutil.rmtree(self.workdir, ignore_errors=True)


def cpu_seconds_of(pid: int) -> float:
    """User plus system CPU seconds of one live process (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy (not idle or iowait) since boot."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]
    # guest time is already counted in user and nice
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _popen(
    args: list[str], extra_env: dict[str, str] | None = None, **kw: object
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw
    )


def start_spamtrap(
    name: str = "spamtrap",
    processes: int = 1,
    config: str | None = None,
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """N twistd processes; with N > 1 they share the port with SO_REUSEPORT."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="spamtrap-bench-"))
    data = data_dir or workdir / "data"
    cfg_path = None
    if config is not None:
        cfg_path = workdir / "spamtrap.yaml"
        cfg_path.write_text(config)
    server = Server(name, port, workdir=workdir)
    endpoint = (
        f"reuseport:{port}:interface=127.0.0.1"
        if processes > 1
        else f"tcp:{port}:interface=127.0.0.1"
    )
    for i in range(processes):
        http = free_port()
        args = [
            str(TWISTD),
            "-n",
            "--pidfile=",
            "--logfile",
            str(workdir / f"twistd{i}.log"),
            "spamtrap",
            "--data-dir",
            str(data),
            "--smtp",
            endpoint,
            "--http",
            f"tcp:{http}:interface=127.0.0.1",
            "--node",
            f"bench{i}",
        ]
        if cfg_path:
            args += ["--config", str(cfg_path)]
        server.procs.append(_popen(args, env))
        server.http_ports.append(http)
        wait_for_port("127.0.0.1", port, server.procs[-1])
    time.sleep(0.5)  # let the last process finish starting its workers
    return server


def start_bare() -> Server:
    port = free_port()
    server = Server("bare-twisted", port)
    server.procs.append(_popen([sys.executable, str(BARE), str(port)]))
    wait_for_port("127.0.0.1", port, server.procs[-1])
    return server


def start_smtp_sink() -> Server:
    port = free_port()
    server = Server("smtp-sink", port)
    server.procs.append(
        _popen([tool("smtp-sink"), "-u", "nobody", "-m", "10000", f"127.0.0.1:{port}", "1024"])
    )
    wait_for_port("127.0.0.1", port, server.procs[-1])
    return server


def smtp_source(port: int, sessions: int, messages: int, size: int = 4096) -> float:
    """Seconds smtp-source takes for ``messages`` messages, one per connection."""
    args = [
        tool("smtp-source"),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        "bot@spam.example",
        "-t",
        "victim@trap.example",
        f"127.0.0.1:{port}",
    ]
    started = time.perf_counter()
    subprocess.run(args, check=True, timeout=600, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def caught_up(server: Server, deadline: float = 300) -> float:
    """Wait until each process has filtered all it accepted; seconds waited."""
    started = time.perf_counter()
    if not server.http_ports:
        return 0.0
    while time.perf_counter() - started < deadline:
        accepted = server.metric_each("spamtrap_messages_accepted_total")
        processed = server.metric_each("spamtrap_messages_processed_total")
        if all(p >= a for a, p in zip(accepted, processed, strict=True)):
            return time.perf_counter() - started
        time.sleep(0.05)
    raise TimeoutError(f"{server.name}: filters did not catch up in {deadline:.0f} s")


def measured_round(server: Server, sessions: int, n: int, size: int = 4096) -> tuple[float, float]:
    """One smtp-source run: (its msg/s, the server's CPU µs per message from
    before the run until its workers have processed it)."""
    before = sum(cpu_seconds_of(pid) for pid in server.pids)
    rate = n / smtp_source(server.port, sessions, n, size)
    caught_up(server)
    return rate, (sum(cpu_seconds_of(pid) for pid in server.pids) - before) / n * 1e6
