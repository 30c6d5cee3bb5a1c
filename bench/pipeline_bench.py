"""The whole cleaning pipeline over real spam, on one core.

    python -m bench.pipeline_bench [--repeats N]
    python -m pytest bench/test_bench_pipeline.py    (the same, with pytest-benchmark)

Every built-in stage is on except clamd and spamd (network services; see
docs/benchmarks.md for them), plus set rules and the mbox entry: exactly
what a worker thread does for a message, from the spool record to the bytes
written into a bundle (without the gzip, measured with the bundle writer).
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from typing import Any

from spamtrap.bundle import mbox
from spamtrap.config import FeedConfig, ListRule, SetConfig
from spamtrap.filters.registry import build_stages
from spamtrap.message import Envelope
from spamtrap.testing import config
from spamtrap.work.collate import Collator
from spamtrap.work.pipeline import evaluate
from tests.support.corpus import corpus_paths, envelope_sender, load_message


def corpus_envelopes() -> list[Envelope]:
    out = []
    for i, path in enumerate(corpus_paths("spam-2")):
        data = load_message(path).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        out.append(
            Envelope(
                msg_id=f"bench-{i}",
                received_at=1_790_000_000.0 + i,
                mail_from=envelope_sender(data),
                rcpts=["victim@trap.example"],
                data=data,
                meta={"rcpt": ["<victim@trap.example>"], "helo": ["bot.example"]},
            )
        )
    return out


def pipeline() -> tuple[Any, Collator]:
    cfg = config(
        node="bench",
        traps__domains=["trap.example"],
        feeds=[FeedConfig(id="donor", address="donor@feeds.trap.example")],
        filters__lists__rules=[
            ListRule("retired", re.compile("<retired@trap\\.example>", re.I), meta="rcpt"),
            ListRule("newsletter", re.compile("news\\.example\\.org", re.I), header="List-Id"),
        ],
        sets=[SetConfig(name="all")],
    )
    return build_stages(cfg, reactor=None), Collator(cfg.sets)


def process(stages: Any, collator: Collator, envs: list[Envelope]) -> int:
    kept = 0
    for env in envs:
        # Stages may edit the message (feeds strip headers): give each run a copy.
        copy = Envelope(
            env.msg_id,
            env.received_at,
            env.mail_from,
            env.rcpts,
            env.data,
            env.feed,
            dict(env.meta),
        )
        result = evaluate(stages, collator, copy)
        for msg, sets in result.deliveries:
            if sets:
                mbox.entry(msg.mail_from, msg.received_at, msg.full_bytes())
                kept += 1
    return kept


def main() -> None:
    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 5
    envs = corpus_envelopes()
    stages, collator = pipeline()
    process(stages, collator, envs)  # warm up
    rates = []
    for _ in range(repeats):
        started = time.process_time()
        kept = process(stages, collator, envs)
        rates.append(len(envs) / (time.process_time() - started))
    print(f"stages: {[name for name, _ in stages]}")
    print(f"spam-2: {len(envs)} messages, {kept} kept")
    print(
        f"msg/s per core (CPU time): median {statistics.median(rates):.0f}, "
        f"best {max(rates):.0f}, worst {min(rates):.0f} over {repeats} runs"
    )


if __name__ == "__main__":
    main()
