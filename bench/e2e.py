"""End to end: real spam over SMTP in, stored bundles out.

    python -m bench.run e2e [--quick]

Sends the SpamAssassin public corpus (spam-2, several passes) over 20
concurrent one-message sessions to 1 and to 2 spamtrap processes (all
built-in stages on, clamd/spamd off), stops them with SIGTERM (which drains
the spool and stores every bundle), and reports messages per second from
the first connection to the last bundle stored, checked by counting the
messages in the bundles.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from bench.servers import start_spamtrap
from spamtrap.bundle.mbox import read_mbox
from tests.support.corpus import corpus_paths, envelope_sender, load_message

SESSIONS = 20


async def _send_one(port: int, sender: bytes, data: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if line[3:4] != b"-":
                return line

    async def cmd(line: bytes, code: bytes) -> None:
        writer.write(line + b"\r\n")
        got = await reply()
        if not got.startswith(code):
            raise RuntimeError(f"{line!r} -> {got!r}")

    if not (await reply()).startswith(b"220"):
        raise RuntimeError("no greeting")
    await cmd(b"EHLO e2e.example", b"250")
    await cmd(b"MAIL FROM:<" + sender + b">", b"250")
    await cmd(b"RCPT TO:<victim@trap.example>", b"250")
    await cmd(b"DATA", b"354")
    body = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    body = body.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    writer.write(body + b".\r\n")
    if not (await reply()).startswith(b"250"):
        raise RuntimeError("DATA refused")
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()


async def _send_all(port: int, messages: list[tuple[bytes, bytes]]) -> None:
    queue: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    for m in messages:
        queue.put_nowait(m)

    async def worker() -> None:
        while not queue.empty():
            sender, data = queue.get_nowait()
            await asyncio.wait_for(_send_one(port, sender, data), 60)

    await asyncio.gather(*(worker() for _ in range(SESSIONS)))


def stored_messages(bundles: Path) -> int:
    n = 0
    for path in bundles.rglob("*.mbox.gz"):
        n += len(read_mbox(str(path)))
    return n


def run(processes: int, messages: list[tuple[bytes, bytes]]) -> dict[str, object]:
    server = start_spamtrap(
        f"spamtrap x{processes}", processes=processes, config="traps: {catch_all: true}\n"
    )
    assert server.workdir is not None
    started = time.perf_counter()
    try:
        asyncio.run(_send_all(server.port, messages))
        sent = time.perf_counter()
    finally:
        server.stop(timeout=900, cleanup=False)
    done = time.perf_counter()
    stored = stored_messages(server.workdir / "data" / "bundles")
    shutil.rmtree(server.workdir, ignore_errors=True)
    return {
        "processes": processes,
        "messages": len(messages),
        "stored": stored,
        "intake_s": round(sent - started, 2),
        "total_s": round(done - started, 2),
        "msg/s end to end": len(messages) / (done - started),
    }


def main(quick: bool = False) -> None:
    from bench.run import save, table

    paths = corpus_paths("spam-2")
    passes = 1 if quick else 5
    corpus = [(envelope_sender(d).encode(), d) for d in (load_message(p) for p in paths)]
    messages = corpus * passes
    rows = [run(1, messages), run(2, messages)]
    print(f"\n## end to end: spam-2 x{passes} ({len(messages)} messages), SMTP to stored bundles\n")
    table(rows)
    save("e2e", {"passes": passes, "rows": rows})
