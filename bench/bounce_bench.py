"""Benchmark: the native bounce detector against a real spamd, same corpus.

    python -m bench.bounce_bench [--repeats 5] [--sample 300] [--no-spamd]

The native detector runs in this process on one core, over every message
of the SpamAssassin corpus ``spam-2`` (and the bounce test set), held in
memory; the best and the median of ``--repeats`` passes are reported. spamd
(Debian ``spamd``, 3 children, started as in docs/recipes.md) is fed a
fixed sample of the same corpus, every k-th message, through spamtrap's own
non-blocking client with 3 requests in flight; its figure is wall-clock
messages per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from spamtrap.filters.bounce import classify
from tests.support.corpus import BOUNCES, corpus_paths, envelope_sender, load_message


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d"),
        "nproc": os.cpu_count(),
        "cpu": model or platform.processor(),
        "python": platform.python_version(),
    }


def native(messages: list[tuple[bytes, str]], repeats: int) -> dict[str, float]:
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for data, sender in messages:
            classify(data, sender)
        rates.append(len(messages) / (time.perf_counter() - started))
    return {"best": max(rates), "median": statistics.median(rates)}


def spamd(messages: list[bytes], children: int) -> dict[str, Any]:
    from twisted.internet import defer
    from twisted.internet import reactor as _reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint

    from spamtrap.filters.spamd import SpamdClient
    from tests.support.spamd_server import running_spamd

    reactor: Any = _reactor
    out: dict[str, Any] = {}
    with running_spamd(children=children) as server:
        version = subprocess.run(
            ["spamassassin", "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()

        async def run() -> None:
            endpoint = TCP4ClientEndpoint(reactor, server.host, server.port, timeout=60)
            client = SpamdClient(endpoint, reactor, timeout=120, max_concurrency=children)
            await client.symbols(messages[0])  # warm up: the first child loads its rules
            started = time.perf_counter()
            replies = await defer.gatherResults([client.symbols(m) for m in messages])
            out["rate"] = len(messages) / (time.perf_counter() - started)
            out["bounces"] = sum("ANY_BOUNCE_MESSAGE" in r.symbols for r in replies)

        # Not task.react: it exits the process when done.
        failures: list[Any] = []

        def start() -> None:
            d = defer.ensureDeferred(run())
            d.addErrback(failures.append)
            d.addBoth(lambda _: reactor.stop())

        reactor.callWhenRunning(start)
        reactor.run()
        if failures:
            failures[0].raiseException()
    out["version"] = version[0] if version else "?"
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sample", type=int, default=300, help="messages sent to spamd")
    parser.add_argument("--children", type=int, default=3)
    parser.add_argument("--no-spamd", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    spam = [load_message(p) for p in corpus_paths("spam-2")]
    spam_env = [(d, envelope_sender(d)) for d in spam]
    bounces = [load_message(p) for p in sorted(BOUNCES.glob("*.eml"))]
    bounce_env = [(d, envelope_sender(d)) for d in bounces]

    figures: dict[str, Any] = {"machine": machine()}
    figures["native_spam2"] = {"messages": len(spam), **native(spam_env, args.repeats)}
    if bounce_env:
        figures["native_bounces"] = {
            "messages": len(bounces), **native(bounce_env, args.repeats)
        }
    if not args.no_spamd:
        step = max(1, len(spam) // args.sample)
        sample = spam[::step][: args.sample]
        figures["spamd_spam2"] = {
            "messages": len(sample), "children": args.children, **spamd(sample, args.children)
        }

    if args.json:
        json.dump(figures, sys.stdout, indent=2)
        print()
        return
    m = figures["machine"]
    print(f"{m['date']}, {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}")
    for key, label in (("native_spam2", "native, spam-2"), ("native_bounces", "native, bounces")):
        if key in figures:
            f = figures[key]
            print(f"{label:22} {f['messages']:5} msgs  best {f['best']:8.0f} msg/s"
                  f"  median {f['median']:8.0f} msg/s  (1 core)")
    if "spamd_spam2" in figures:
        f = figures["spamd_spam2"]
        print(f"{'spamd, spam-2 sample':22} {f['messages']:5} msgs  {f['rate']:8.1f} msg/s"
              f"  ({f['children']} children; {f['version']})")
        print(f"native / spamd: {figures['native_spam2']['median'] / f['rate']:.0f} times faster")


if __name__ == "__main__":
    main()
