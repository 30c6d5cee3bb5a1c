"""Benchmark: campaign assignment, its cost and its quality.

    python -m bench.run campaigns [--quick]
    python -m bench.campaigns [--campaigns 200] [--variants 20] [--seed 1]
    python -m bench.campaigns --tlsh     (the comparison with TLSH, python3-tlsh)

- cost: CPU µs per message on one core, over the SpamAssassin corpus
  ``spam-2`` and over the synthetic messages (about 4 KiB): the mean of a
  pass over all of them (best of several passes) for the features, the
  sketch, and the whole assignment (sketch and index), and the median and
  90th percentile of one message's sketch;
- quality on a labelled synthetic set: N campaigns x M variants, each
  variant with the mutations bulk mailers make (see :func:`variant`);
  purity (the share of each found cluster that is its main campaign) and
  completeness (the share of each campaign in its main cluster), both
  weighted by size; then the same with spintax, a share of the words
  replaced at random in each copy (SPINS), where word pairs give out;
- the clusters of ``spam-2``: how many, and the largest with a subject.
"""

from __future__ import annotations

import argparse
import base64
import random
import statistics
import time
from collections import Counter, defaultdict
from email.utils import formatdate
from typing import Any

from spamtrap.work.campaign import CampaignIndex
from spamtrap.work.campaign_sketch import features, message_sketch, sketch
from tests.support.corpus import corpus_paths, load_message

COMMON = (
    "the and you your for this that with are our have will not can from all now "
    "get free more only just one new best offer today click here time money "
    "now order want need make home business email please information receive "
    "list remove people work year day price special save per online"
).split()
SYLLABLES = (
    "ba be bi bo bu ca ce co da de di do fa fe fi ga ge go ha he hi ka ke ki ko la le li lo"
    " lu ma me mi mo na ne ni no pa pe pi po ra re ri ro sa se si so ta te ti to va ve vi vo"
).split()
NAMES = (
    "alice bob carol dave erin frank grace heidi ivan judy mallory oscar peggy trent walter".split()
)


def vocabulary(rng: random.Random, n: int = 6000) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def word(rng: random.Random, vocab: list[str]) -> str:
    # Zipf-like: common words often, the topic vocabulary by a power law.
    if rng.random() < 0.35:
        return rng.choice(COMMON)
    return vocab[min(int(rng.paretovariate(0.8)) - 1, len(vocab) - 1)]


def template(rng: random.Random, vocab: list[str], size: int) -> dict[str, Any]:
    paragraphs: list[str] = []
    while sum(len(p) for p in paragraphs) < size:
        sentence = " ".join(word(rng, vocab) for _ in range(rng.randint(8, 18)))
        paragraphs.append(sentence.capitalize() + ".")
    return {
        "subject": " ".join(word(rng, vocab) for _ in range(rng.randint(3, 7))).title(),
        "paragraphs": paragraphs,
        "html": rng.random() < 0.5,
        "domain": "".join(rng.choice(SYLLABLES) for _ in range(3)) + ".example",
        "sender": rng.choice(NAMES),
    }


def variant(
    rng: random.Random, t: dict[str, Any], vocab: list[str], n: int, spin: float = 0.0
) -> bytes:
    """One copy of a template as a bulk mailer sends it: new Message-ID,
    To, Date; the recipient's name in the greeting and subject (half the
    time); a random hex tracking token and a base64 one in the links; a
    few hash-busting words and sometimes a line of word salad; shuffled
    footer lines, a changed price. With ``spin``, that share of the words
    is replaced at random (spintax) and one sentence is left out."""
    name = rng.choice(NAMES).title()
    hexid = f"{rng.getrandbits(128):032x}"
    b64 = base64.urlsafe_b64encode(rng.randbytes(18)).decode()
    paragraphs = list(t["paragraphs"])
    if spin:
        del paragraphs[rng.randrange(len(paragraphs))]
        paragraphs = [
            " ".join(w if rng.random() >= spin else word(rng, vocab) for w in p.split())
            for p in paragraphs
        ] or ["."]
    for _ in range(rng.randint(2, 6)):  # hash-busting words
        i = rng.randrange(len(paragraphs))
        words = paragraphs[i].split()
        words.insert(rng.randrange(len(words) + 1), rng.choice(vocab))
        paragraphs[i] = " ".join(words)
    if rng.random() < 0.3:
        paragraphs.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(10, 30))))
    price = f"${rng.randint(9, 99)}.{rng.randint(0, 99):02d}"
    link = f"http://{t['domain']}/c/{hexid}?u={b64}"
    body_lines = [f"Dear {name},", "", *paragraphs, "", f"Only {price} today: {link}", ""]
    footer = [f"Unsubscribe: http://{t['domain']}/u/{hexid[:12]}", f"Ref {rng.randint(1, 10**8)}"]
    rng.shuffle(footer)
    body_lines += footer
    subject = t["subject"] + (f", {name}" if rng.random() < 0.5 else "")
    rcpt = f"{name.lower()}{rng.randint(1, 999)}@trap.example"
    head = [
        f"Received: from mx{rng.randint(1, 200)}.{t['domain']}"
        f" ([198.51.100.{rng.randint(1, 254)}])",
        f"Message-ID: <{hexid}.{n}@{t['domain']}>",
        f"Date: {formatdate(1_790_000_000 + rng.randint(0, 86400))}",
        f"From: {t['sender']} <{t['sender']}@{t['domain']}>",
        f"To: {rcpt}",
        f"Subject: {subject}",
        "MIME-Version: 1.0",
    ]
    if t["html"]:
        html = "".join(f"<p>{line}</p>\n" for line in body_lines)
        head.append('Content-Type: text/html; charset="utf-8"')
        body = f"<html><body>\n{html}</body></html>\n"
    else:
        head.append("Content-Type: text/plain; charset=utf-8")
        body = "\n".join(body_lines) + "\n"
    return ("\r\n".join(head) + "\r\n\r\n" + body.replace("\n", "\r\n")).encode()


def synthetic(
    campaigns: int, variants: int, seed: int, size: int = 5600, spin: float = 0.0
) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    vocab = vocabulary(rng)
    messages = []
    for label in range(campaigns):
        t = template(rng, vocab, rng.randint(size // 4, size))
        messages += [(label, variant(rng, t, vocab, i, spin)) for i in range(variants)]
    rng.shuffle(messages)
    return messages


def quality(labels: list[int], found: list[str]) -> dict[str, float]:
    by_cluster: dict[str, Counter[int]] = defaultdict(Counter)
    by_label: dict[int, Counter[str]] = defaultdict(Counter)
    for label, cluster in zip(labels, found, strict=True):
        by_cluster[cluster][label] += 1
        by_label[label][cluster] += 1
    n = len(labels)
    return {
        "campaigns": len(by_label),
        "clusters": len(by_cluster),
        "purity": sum(c.most_common(1)[0][1] for c in by_cluster.values()) / n,
        "completeness": sum(c.most_common(1)[0][1] for c in by_label.values()) / n,
    }


def assign_all(messages: list[bytes]) -> list[str]:
    from twisted.internet.task import Clock

    index = CampaignIndex(Clock(), window=86400, max_campaigns=1_000_000)
    return [index.assign(message_sketch(m)).campaign for m in messages]


def cost(messages: list[bytes], repeats: int) -> dict[str, float]:
    """CPU µs per message: the best of ``repeats`` passes."""
    out: dict[str, float] = {}
    for name, run in (
        ("features_us", lambda: [features(m) for m in messages]),
        ("sketch_us", lambda: [message_sketch(m) for m in messages]),
        ("assign_us", lambda: assign_all(messages)),
    ):
        best = float("inf")
        for _ in range(repeats):
            started = time.process_time()
            run()
            best = min(best, time.process_time() - started)
        out[name] = best / len(messages) * 1e6
    return out


def _subject(data: bytes) -> str:
    for line in data.split(b"\n", 200):
        if line[:8].lower() == b"subject:":
            return line[8:].strip().decode("utf-8", "replace")[:60]
    return ""


def corpus(repeats: int) -> dict[str, Any]:
    messages = [load_message(p) for p in corpus_paths("spam-2")]
    found = assign_all(messages)
    sizes = Counter(found)
    first: dict[str, bytes] = {}
    for data, cid in zip(messages, found, strict=True):
        first.setdefault(cid, data)
    largest = [
        {"campaign": cid, "messages": n, "subject of the first": _subject(first[cid])}
        for cid, n in sizes.most_common(10)
    ]
    lengths = sorted(map(len, messages))
    return {
        "messages": len(messages),
        "median_bytes": lengths[len(lengths) // 2],
        "clusters": len(sizes),
        "singletons": sum(1 for n in sizes.values() if n == 1),
        "largest": largest,
        **cost(messages, repeats),
        **per_message(messages),
    }


def per_message(messages: list[bytes]) -> dict[str, float]:
    """The median and 90th percentile of one message's sketch time (each
    message the best of 5 runs: the least disturbed by the machine)."""
    times = []
    for m in messages:
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            sketch(features(m))
            best = min(best, time.process_time() - started)
        times.append(best)
    times.sort()
    return {
        "sketch_us_p50": times[len(times) // 2] * 1e6,
        "sketch_us_p90": times[int(len(times) * 0.9)] * 1e6,
    }


def python_speed() -> float:
    """CPU µs of an empty 1,000-step Python loop: the machine's speed, to
    compare figures taken on different machines (about 8-10 µs on a quiet
    3 GHz core with CPython 3.11)."""
    import timeit

    return min(timeit.repeat("for _ in range(1000): pass", number=2000, repeat=5)) / 2000 * 1e6


SPINS = (0.05, 0.1, 0.2)


def main(
    quick: bool = False, campaigns: int = 200, variants: int = 20, seed: int = 1
) -> dict[str, Any]:
    if quick:
        campaigns, variants = 40, 10
    repeats = 2 if quick else 5
    labelled = synthetic(campaigns, variants, seed)
    found = assign_all([m for _, m in labelled])
    synth = {
        "variants": variants,
        **quality([label for label, _ in labelled], found),
        **cost([m for _, m in labelled[:2000]], repeats),
        **per_message([m for _, m in labelled[:1000]]),
        "median_bytes": statistics.median(len(m) for _, m in labelled),
    }
    spun = []
    for spin in SPINS:
        hard = synthetic(campaigns, variants, seed, spin=spin)
        found = assign_all([m for _, m in hard])
        spun.append({"spin": spin, **quality([label for label, _ in hard], found)})
    real = corpus(repeats)
    speed = python_speed()
    print(f"\n## campaigns: synthetic set ({campaigns} campaigns x {variants} variants)\n")
    _table([synth])
    print("\nwith spintax (that share of the words replaced at random, a sentence left out):\n")
    _table(spun)
    print("\n## campaigns: SpamAssassin spam-2\n")
    _table([{k: v for k, v in real.items() if k != "largest"}])
    print("\nlargest clusters:\n")
    _table(real["largest"])
    print(f"\nmachine speed: an empty 1,000-step Python loop takes {speed:.1f} µs")
    return {"synthetic": synth, "spintax": spun, "spam2": real, "python_loop_us": speed}


def tlsh_comparison(campaigns: int = 100, variants: int = 10, seed: int = 2) -> None:
    """TLSH on the same normalised text, clustered by a linear scan at a few
    distance thresholds (docs/campaigns.md, "Why MinHash, not TLSH"). Needs
    the ``tlsh`` module: Debian's python3-tlsh (``apt-get install
    python3-tlsh``) is taken from the system Python's packages, which share
    the venv's ABI when both are CPython 3.11."""
    # Twisted (for the clock) before the system's packages join the path.
    from twisted.internet import task  # noqa: F401

    from spamtrap.work.campaign_sketch import text_and_parts

    labelled = synthetic(campaigns, variants, seed)
    labels = [label for label, _ in labelled]
    started = time.process_time()
    found = assign_all([m for _, m in labelled])
    minhash_us = (time.process_time() - started) / len(labelled) * 1e6
    rows: list[dict[str, Any]] = [
        {
            "method": "minhash (normalisation, sketch, index)",
            "us": minhash_us,
            **quality(labels, found),
        }
    ]
    try:
        import tlsh  # type: ignore[import-not-found]
    except ImportError:
        import sys

        sys.path.append("/usr/lib/python3/dist-packages")  # Debian's python3-tlsh
        import tlsh
    started = time.process_time()
    texts = [text_and_parts(m)[0] for _, m in labelled]
    normalise_us = (time.process_time() - started) / len(texts) * 1e6
    started = time.process_time()
    hashes = [tlsh.hash(t) for t in texts]
    tlsh_us = normalise_us + (time.process_time() - started) / len(texts) * 1e6
    for threshold in (10, 20, 30, 40, 50):
        firsts: list[tuple[str, int]] = []
        clusters = []
        for h in hashes:
            cid = next(
                (c for first, c in firsts if h and first and tlsh.diff(h, first) <= threshold),
                None,
            )
            if cid is None:
                cid = len(firsts)
                firsts.append((h, cid))
            clusters.append(str(cid))
        rows.append(
            {
                "method": f"tlsh <= {threshold} (normalisation and hash, no index)",
                "us": tlsh_us,
                **quality(labels, clusters),
            }
        )
    _table(rows)


def _table(rows: list[dict[str, Any]]) -> None:
    from bench.run import table

    table(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--campaigns", type=int, default=200)
    parser.add_argument("--variants", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tlsh", action="store_true", help="compare with TLSH only")
    a = parser.parse_args()
    if a.tlsh:
        tlsh_comparison()
    else:
        main(a.quick, a.campaigns, a.variants, a.seed)
