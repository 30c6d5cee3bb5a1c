"""per_campaign_cap: at most N messages of a campaign per bundle, the rest
counted as sampled out and acknowledged, never lost; and the campaign ids
the pipeline writes into the stored messages."""

from __future__ import annotations

import gzip
import mailbox
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from spamtrap.bundle.campaign_cap import CampaignCap
from spamtrap.bundle.sets import BundleSet
from spamtrap.config import ConfigError, parse_config
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.testing import ListWorkSource, MemoryStore, SyncPool
from spamtrap.work.campaign import campaign_id
from spamtrap.work.campaign_sketch import message_sketch
from spamtrap.work.collate import Collator
from spamtrap.work.pipeline import BATCH_WAIT, Pipeline
from tests.support.campaign_samples import near_copy


class SyncClock(Clock):
    """callFromThread at once: with SyncPool every thread hop is a call."""

    def callFromThread(self, callable: Callable[..., object], *args: object, **kw: object) -> None:  # noqa: N802, A002
        callable(*args, **kw)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


# -- the count ----------------------------------------------------------------------


def test_the_cap_counts_per_bundle_and_keeps_what_has_no_campaign() -> None:
    cap = CampaignCap(2)
    one, two = object(), object()
    items = [(b"e", 1.0, n, None, "a" if n < 5 else None) for n in range(7)]
    kept, sampled = cap.split(one, items)
    assert [item[2] for item in kept] == [0, 1, 5, 6]
    assert sampled == [2, 3, 4]
    kept, sampled = cap.split(one, [(b"e", 1.0, 9, None, "a"), (b"e", 1.0, 10, None, "b")])
    assert [item[2] for item in kept] == [10] and sampled == [9]
    # A new bundle counts from zero; an item without a fifth element has no campaign.
    kept, sampled = cap.split(two, [(b"e", 1.0, 11, None, "a"), (b"e", 1.0, 12)])
    assert [item[2] for item in kept] == [11, 12] and sampled == []


def test_a_cap_below_one_is_refused() -> None:
    try:
        CampaignCap(0)
    except ValueError:
        return
    raise AssertionError("CampaignCap(0) accepted")


def _bundle_set(
    tmp: Path, cap: int, acked: list[Any], max_messages: int = 1000
) -> tuple[BundleSet, MemoryStore, Metrics]:
    cfg = parse_config(
        "traps: {catch_all: true}\n"
        f"sets: {{s: {{per_campaign_cap: {cap}, rotate: {{max_messages: {max_messages}}}}}}}\n"
    )
    metrics = Metrics()
    store = MemoryStore()
    pool: Any = SyncPool()
    bundles = BundleSet(
        cfg.sets[0], "node", str(tmp), store, metrics, SyncClock(), pool, acked.extend
    )
    bundles.start()
    return bundles, store, metrics


def _stored_messages(store: MemoryStore) -> list[bytes]:
    out = []
    for key, data in sorted(store.objects.items()):
        if key.endswith(".mbox.gz"):
            with tempfile.NamedTemporaryFile() as f:
                f.write(gzip.decompress(data))
                f.flush()
                out += [m.as_bytes() for m in mailbox.mbox(f.name)]
    return out


def entry(n: int, campaign: str | None) -> tuple[bytes, float, Any, None, str | None]:
    data = b"From x Thu Jan  1 00:00:00 1970\nSubject: %d\n\nbody\n\n" % n
    return (data, 1.0, (0, n), None, campaign)


def test_a_bundle_holds_at_most_the_cap_and_every_message_is_acked(tmp_path: Path) -> None:
    acked: list[Any] = []
    bundles, store, metrics = _bundle_set(tmp_path, 2, acked)
    items = [entry(n, "a") for n in range(10)] + [entry(n, "b") for n in range(10, 13)]
    assert bundles.add_many(items) == []
    bundles.rotate()
    assert sorted(acked) == [(0, n) for n in range(13)]  # the sampled-out ones too
    stored = _stored_messages(store)
    assert [re.search(rb"Subject: (\d+)", m).group(1) for m in stored] == [  # type: ignore[union-attr]
        b"0",
        b"1",
        b"10",
        b"11",
    ]
    assert sample(metrics, "spamtrap_campaign_sampled_out_total", set="s") == 9
    assert sample(metrics, "spamtrap_set_messages_total", set="s") == 4
    # The next bundle takes the campaign again.
    acked.clear()
    bundles.add_many([entry(n, "a") for n in range(20, 25)])
    bundles.rotate()
    assert len(acked) == 5
    assert len(_stored_messages(store)) == 6
    assert sample(metrics, "spamtrap_campaign_sampled_out_total", set="s") == 12


def test_the_cap_starts_again_in_the_bundle_a_rotation_opens(tmp_path: Path) -> None:
    acked: list[Any] = []
    bundles, store, metrics = _bundle_set(tmp_path, 3, acked, max_messages=4)
    # One add_many that fills a bundle (4 messages) and goes on into the next.
    items = [entry(n, "a") for n in range(3)] + [entry(n, "b") for n in range(3, 9)]
    bundles.add_many(items)
    bundles.rotate()
    per_bundle = []
    for key, data in sorted(store.objects.items()):
        if key.endswith(".mbox.gz"):
            per_bundle.append(gzip.decompress(data).count(b"\nSubject: "))
    # The first bundle: a0-a2 and b3, full; the second: b4-b6, and b7, b8
    # over the cap (b3 was the first bundle's).
    assert sorted(per_bundle) == [3, 4]
    assert sorted(acked) == [(0, n) for n in range(9)]
    assert sample(metrics, "spamtrap_campaign_sampled_out_total", set="s") == 2


# -- through the pipeline -----------------------------------------------------------


def _pipeline(tmp: Path, yaml: str) -> tuple[Pipeline[Any], ListWorkSource, MemoryStore, Metrics]:
    cfg = parse_config(yaml)
    clock = SyncClock()
    source = ListWorkSource()
    metrics = Metrics()
    store = MemoryStore()
    pool: Any = SyncPool()
    pipeline: Pipeline[Any] = Pipeline(
        source, [], Collator(cfg.sets), {}, metrics, clock, pool, 1, cfg
    )
    pipeline.bundles = {
        s.name: BundleSet(
            s, "node", str(tmp / s.name), store, metrics, clock, pool, pipeline.stored
        )
        for s in cfg.sets
    }
    for b in pipeline.bundles.values():
        b.start()
    pipeline.start()
    pipeline.clock = clock  # type: ignore[attr-defined]
    return pipeline, source, store, metrics


def _env(n: int, data: bytes) -> Envelope:
    return Envelope(
        f"m{n}", 1_790_000_000.0 + n, "a@b.example", ["x@trap.example"], data,
        meta={"id": [f"m{n}"], "rcpt": ["<x@trap.example>"]},
    )  # fmt: skip


def test_stored_messages_carry_their_campaign_and_a_capped_set_samples(tmp_path: Path) -> None:
    pipeline, source, store, metrics = _pipeline(
        tmp_path,
        """traps: {domains: [trap.example]}
sets:
  all: {}
  thin:
    per_campaign_cap: 3
    redact_trap_addresses: true
""",
    )
    messages = [near_copy(n % 2, n) for n in range(20)]  # two campaigns, ten each
    for n, data in enumerate(messages):
        source.add(_env(n, data).to_record())
    pipeline.clock.advance(BATCH_WAIT)  # type: ignore[attr-defined]
    for b in pipeline.bundles.values():
        b.rotate()
    assert sorted(k[1] for k in source.acked) == list(range(20))
    assert source.in_flight == []
    stored = {
        key.split("/")[0]: gzip.decompress(data)
        for key, data in store.objects.items()
        if key.endswith(".mbox.gz")
    }
    campaigns = {
        name: re.findall(rb"\nX-Spamtrap-Campaign: ([0-9a-f]{16})\n", b)
        for name, b in stored.items()
    }
    assert len(campaigns["all"]) == 20 and len(set(campaigns["all"])) == 2
    # The redacted copies are in the same campaigns, three of each.
    assert sorted(campaigns["thin"]) == sorted(c for c in set(campaigns["all"]) for _ in range(3))
    assert b"x@trap.example" not in stored["thin"]
    assert sample(metrics, "spamtrap_campaign_sampled_out_total", set="thin") == 14
    assert sample(metrics, "spamtrap_campaigns_new_total") == 2
    # The index beside each bundle names the campaign too.
    index = [v for k, v in store.objects.items() if k.startswith("all/") and "index" in k]
    assert index and index[0].count(b'"campaign":"') == 20


def test_campaigns_off_means_no_field(tmp_path: Path) -> None:
    pipeline, source, store, metrics = _pipeline(
        tmp_path, "traps: {catch_all: true}\ncampaigns: {enabled: false}\nsets: {s: {}}\n"
    )
    for n in range(4):
        source.add(_env(n, near_copy(0, n)).to_record())
    pipeline.clock.advance(BATCH_WAIT)  # type: ignore[attr-defined]
    pipeline.bundles["s"].rotate()
    (data,) = [v for k, v in store.objects.items() if k.endswith(".mbox.gz")]
    assert gzip.decompress(data).count(b"\nSubject: ") == 4
    assert b"X-Spamtrap-Campaign" not in gzip.decompress(data)
    assert sample(metrics, "spamtrap_campaigns_new_total") == 0


def test_bad_campaign_keys_are_errors_with_their_lines() -> None:
    text = """traps: {catch_all: true}
campaigns:
  enabled: false
  windw: 1h
  max_campaigns: 0
sets:
  a: {per_campaign_cap: -1}
  b:
    per_campaign_cap: 3
"""
    try:
        parse_config(text, "trap.yaml")
    except ConfigError as e:
        lines = str(e).splitlines()
    else:
        raise AssertionError("accepted")
    assert "trap.yaml:4: campaigns.windw: unknown key 'windw'; did you mean 'window'?" in lines
    assert "trap.yaml:5: campaigns.max_campaigns: must be at least 1, got 0" in lines
    assert "trap.yaml:7: sets.a.per_campaign_cap: must be at least 0, got -1" in lines
    assert (
        "trap.yaml:9: sets.b.per_campaign_cap: per_campaign_cap needs campaigns.enabled: true"
        " (no message has a campaign)"
    ) in lines


def test_set_rules_can_read_the_campaign(tmp_path: Path) -> None:
    first = campaign_id(message_sketch(near_copy(0, 0)))
    pipeline, source, store, _ = _pipeline(
        tmp_path,
        "traps: {catch_all: true}\n"
        f"sets: {{others: {{exclude: [{{meta: campaign, regex: {first}}}]}}}}\n",
    )
    for n in range(6):
        source.add(_env(n, near_copy(n % 2, n)).to_record())
    pipeline.clock.advance(BATCH_WAIT)  # type: ignore[attr-defined]
    pipeline.bundles["others"].rotate()
    (data,) = [v for k, v in store.objects.items() if k.endswith(".mbox.gz")]
    ids = set(re.findall(rb"\nX-Spamtrap-Campaign: ([0-9a-f]{16})\n", gzip.decompress(data)))
    assert len(ids) == 1 and first.encode() not in ids
    assert gzip.decompress(data).count(b"\nSubject: ") == 3
    assert len(source.acked) == 6


def test_a_failed_write_keeps_the_sampled_out_ones_spooled_too(tmp_path: Path) -> None:
    acked: list[Any] = []
    bundles, store, metrics = _bundle_set(tmp_path, 1, acked)
    assert bundles.add_many([entry(0, "a")]) == []
    bundle = bundles.writer.shards[0]
    assert bundle is not None
    real = bundle.file

    class Full:  # a full disk: every write fails
        def write(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            real.close()

    bundle.file = Full()  # type: ignore[assignment]
    big = (entry(2, "b")[0] + random.randbytes(200_000), 1.0, (0, 2), None, "b")
    lost = bundles.add_many([entry(1, "a"), big])
    # 1 was over the cap of a bundle that is lost now: it stays spooled with 2.
    assert sorted(lost) == [(0, 1), (0, 2)]
    assert sample(metrics, "spamtrap_campaign_sampled_out_total", set="s") == 0
    assert bundles.add_many([entry(3, "a"), entry(4, "a")]) == []
    bundles.rotate()
    assert sorted(acked) == [(0, 3), (0, 4)]  # 0 went down with its bundle: replayed
    assert len(_stored_messages(store)) == 1
    assert sample(metrics, "spamtrap_campaign_sampled_out_total", set="s") == 1
