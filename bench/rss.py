"""Memory held by unfinished DATA, and what stays after large messages.

    python -m bench.run rss [--quick]

Starts one spamtrap node, opens CLIENTS sessions that each send SIZE bytes of
DATA without the terminator, and reads the node's VmRSS (/proc/PID/status)
before, while they hold their DATA, and after each got its 250 and the
workers stored the messages. Meanwhile a fresh session must be served.
Bounded: every wait has a deadline; loopback only.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _dir_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


async def _reply(r: asyncio.StreamReader) -> bytes:
    while True:
        line = await asyncio.wait_for(r.readline(), 60)
        if not line or line[3:4] != b"-":
            return line


async def _cmd(w: asyncio.StreamWriter, r: asyncio.StreamReader, line: bytes, code: bytes) -> None:
    w.write(line + b"\r\n")
    await w.drain()
    got = await _reply(r)
    if not got.startswith(code):
        raise RuntimeError(f"{line!r}: expected {code!r}, got {got!r}")


async def _open(port: int, src: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0)), 30
    )
    if not (await _reply(r)).startswith(b"220"):
        raise RuntimeError("no greeting")
    await _cmd(w, r, b"EHLO rss.example", b"250")
    return r, w


async def _one_message(port: int) -> bool:
    r, w = await _open(port, "127.0.0.1")
    await _cmd(w, r, b"MAIL FROM:<fresh@spam.example>", b"250")
    await _cmd(w, r, b"RCPT TO:<v@trap.example>", b"250")
    await _cmd(w, r, b"DATA", b"354")
    w.write(b"Subject: fresh\r\n\r\nserved while others hold DATA\r\n.\r\n")
    ok = (await _reply(r)).startswith(b"250")
    w.close()
    return ok


async def hold_large_data(
    port: int, pid: int, clients: int, size: int, spill_dir: Path | None = None
) -> dict[str, Any]:
    """Run the scenario against a node on ``port`` (its process ``pid``)."""
    out: dict[str, Any] = {"clients": clients, "data_bytes": size}
    out["rss_start_kib"] = vm_rss_kib(pid)
    line = b"x" * 998 + b"\r\n"
    body = b"Subject: large\r\n\r\n" + line * (size // len(line))
    conns = []
    for i in range(clients):
        # Many source addresses, as bots come (and within any per-IP limit).
        r, w = await _open(port, f"127.0.{i // 250 + 2}.{i % 250 + 1}")
        await _cmd(w, r, b"MAIL FROM:<big@spam.example>", b"250")
        await _cmd(w, r, b"RCPT TO:<v@trap.example>", b"250")
        await _cmd(w, r, b"DATA", b"354")
        conns.append((r, w))

    async def push(w: asyncio.StreamWriter) -> None:
        w.write(body)
        await asyncio.wait_for(w.drain(), 120)

    await asyncio.gather(*(push(w) for _, w in conns))
    # The node has read everything once its spill files stop growing.
    if spill_dir is not None:
        last, still, deadline = -1, 0.0, time.monotonic() + 120
        while time.monotonic() < deadline:
            now = _dir_bytes(spill_dir)
            if now == last:
                if time.monotonic() - still > 1.0:
                    break
            else:
                last, still = now, time.monotonic()
            await asyncio.sleep(0.2)
        out["spilled_bytes"] = last
    else:
        await asyncio.sleep(3)
    out["rss_held_kib"] = vm_rss_kib(pid)
    out["fresh_session_ok"] = await _one_message(port)

    async def finish(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b".\r\n")
        ok = (await _reply(r)).startswith(b"250")
        w.write(b"QUIT\r\n")
        w.close()
        return ok

    results = await asyncio.gather(*(finish(r, w) for r, w in conns))
    out["acked"] = sum(results)
    out["rss_after_kib"] = vm_rss_kib(pid)
    out["added_while_held_mib"] = round((out["rss_held_kib"] - out["rss_start_kib"]) / 1024, 1)
    return out


def settle_rss(pid: int, seconds: float = 10.0) -> int:
    """VmRSS once the workers are done (it stops falling), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    rss = vm_rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(1)
        now = vm_rss_kib(pid)
        if now >= rss:
            return now
        rss = now
    return rss


def main(quick: bool = False) -> dict[str, Any]:
    from bench.servers import start_spamtrap

    clients = 10 if quick else 40
    config = "traps: {catch_all: true}\n"
    server = start_spamtrap(config=config)
    try:
        pid = server.pids[0]
        assert server.workdir is not None
        spill = server.workdir / "data" / "spill"
        out = asyncio.run(hold_large_data(server.port, pid, clients, int(7.5 * MIB), spill))
        out["rss_settled_kib"] = settle_rss(pid)
    finally:
        server.stop()
    print(f"\n## {clients} sessions holding 7.5 MiB of unfinished DATA\n")
    for k, v in out.items():
        print(f"- {k}: {v}")
    return out


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
