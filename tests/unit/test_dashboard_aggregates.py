"""The dashboard's last-hour aggregates and its JSON document.

Time is a ``task.Clock``: minutes pass when the test says so. The
document is built from a real ``Metrics`` registry, which the tests update
as the components would, so every figure is checked against the counter
it claims to show.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet import defer, task

from spamtrap import testing
from spamtrap.bundle.manifest import Manifest, Published
from spamtrap.config import Config, SetConfig
from spamtrap.dashboard import Dashboard
from spamtrap.dashboard.lasthour import (
    MAX_LABEL,
    MINUTES,
    LastHour,
    SpaceSaving,
    label,
    network_of,
)
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics

T0 = 1_790_000_000.0  # a minute boundary


def envelope(helo: str = "bot.example", peer: str = "192.0.2.7 4025", **meta: str) -> Envelope:
    fields = {"helo": [helo], "peer": [peer], "dialect": ["cmds=EHLO:fqdn,MAIL,RCPT,DATA"]}
    fields.update({k: [v] for k, v in meta.items()})
    return Envelope("m1", T0, "a@b.example", ["x@trap.example"], b"x", meta=fields)


def config(*sets: SetConfig) -> Config:
    return testing.config(
        traps__catch_all=True,
        sets=list(sets) or [SetConfig(name="all")],
        http__public_url="https://traps.example/st/",
    )


def doc_of(board: Dashboard) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(board.document())
    return parsed


# -- space-saving -------------------------------------------------------------


def test_space_saving_keeps_the_heavy_hitters_within_k_counters() -> None:
    counter = SpaceSaving(4)
    for i in range(1000):
        counter.add("heavy")
        counter.add(f"rare-{i}")  # a new key every time: each evicts the smallest
        if i % 2:
            counter.add("half")
    assert len(counter.counts) < 8  # at most 2k counters
    top = dict(counter.top(2))
    assert top["heavy"] >= 1000 and top["half"] >= 500  # never under-counted
    assert counter.errors.get("heavy", 0) == 0  # kept from its first add


def test_space_saving_new_keys_inherit_the_largest_evicted_count() -> None:
    counter = SpaceSaving(2)
    counter.add("a", 5)
    counter.add("b", 3)
    counter.add("c", 2)
    counter.add("d", 1)  # 2k counters: the k largest stay, 2 is the floor
    assert counter.counts == {"a": 5, "b": 3}
    counter.add("d")  # d was seen twice: counted 3, of which 2 may be wrong
    counter.add("a")
    assert counter.counts == {"a": 6, "b": 3, "d": 3}
    assert counter.errors == {"d": 2}
    assert counter.top(2) == [("a", 6), ("b", 3)]
    counter.clear()
    assert (counter.counts, counter.errors, counter.floor) == ({}, {}, 0)


def test_space_saving_needs_a_counter() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SpaceSaving(0)


# -- the last hour ------------------------------------------------------------


def test_per_minute_counts_end_with_the_current_minute() -> None:
    clock = task.Clock()
    clock.advance(T0)
    hour = LastHour(clock)
    for _ in range(3):
        hour.accepted()
    clock.advance(60)
    hour.accepted()
    clock.advance(30)  # still the same minute
    hour.accepted([("helo", "x.example")])
    counts = hour.per_minute()
    assert len(counts) == MINUTES
    assert counts[-2:] == [3, 2] and sum(counts) == 5


def test_minutes_older_than_an_hour_are_forgotten() -> None:
    clock = task.Clock()
    clock.advance(T0)
    hour = LastHour(clock)
    for _ in range(7):
        hour.accepted()
    hour.count("helo", "old.example")
    clock.advance(59 * 60)
    assert hour.per_minute()[0] == 7  # 59 minutes ago: still in the hour
    assert hour.top("helo") == [("old.example", 1)]
    clock.advance(60)
    assert sum(hour.per_minute()) == 0
    assert hour.top("helo") == []


def test_a_bucket_coming_round_again_starts_empty() -> None:
    clock = task.Clock()
    clock.advance(T0)
    hour = LastHour(clock)
    hour.accepted([("peer", "192.0.2.0/24")])
    clock.advance(MINUTES * 60)  # the same slot of the ring, an hour later
    hour.accepted()
    assert hour.per_minute()[-1] == 1
    assert hour.top("peer") == []


def test_the_hour_top_sums_the_minutes() -> None:
    clock = task.Clock()
    clock.advance(T0)
    hour = LastHour(clock)
    for minute in range(3):
        hour.count_many([("helo", "a.example"), ("helo", "a.example"), ("helo", f"m{minute}")])
        clock.advance(60)
    assert hour.top("helo", 2) == [("a.example", 6), ("m0", 1)]


def test_memory_is_bounded_whatever_the_traffic() -> None:
    clock = task.Clock()
    clock.advance(T0)
    hour = LastHour(clock, k=8)
    for minute in range(2 * MINUTES):
        for i in range(200):
            hour.count("helo", f"h{minute}-{i}-" + "x" * 500)
        clock.advance(60)
    assert all(len(bucket.tops["helo"].counts) < 2 * 8 for bucket in hour._ring)
    kept = [key for bucket in hour._ring for key in bucket.tops["helo"].counts]
    assert len(kept) > MINUTES * 8 // 2  # every minute kept some
    assert max(map(len, kept)) == MAX_LABEL


def test_accepted_keys_are_labelled_too() -> None:
    clock = task.Clock()
    hour = LastHour(clock)
    hour.accepted([("helo", "trap@trap.example"), ("dialect", "d" * 300), ("peer", "p")])
    assert hour.top("helo") == [("*@trap.example", 1)]
    assert hour.top("dialect") == [("d" * (MAX_LABEL - 1) + "\u2026", 1)]
    assert hour.top("peer") == [("p", 1)]


def test_labels_mask_address_local_parts_and_are_cut() -> None:
    assert label("helo trap1@trap.example x") == "helo *@trap.example x"
    assert label("<a.b+c@x.example>") == "<*@x.example>"
    cut = label("h" * 500)
    assert len(cut) == MAX_LABEL and cut.endswith("\u2026")
    assert label("plain.example") == "plain.example"


@pytest.mark.parametrize(
    ("peer", "network"),
    [
        ("192.0.2.77 4025", "192.0.2.0/24"),
        ("2001:db8:1:2::5 25", "2001:db8:1::/48"),
        ("::ffff:198.51.100.9 25", "198.51.100.0/24"),
        ("unknown 0", None),
        ("", None),
    ],
)
def test_peer_networks(peer: str, network: str | None) -> None:
    assert network_of(peer) == network


# -- the document -------------------------------------------------------------


def test_figures_are_the_metrics() -> None:
    clock = task.Clock()
    clock.advance(T0)
    m = Metrics()
    board = Dashboard(config(), m, clock, web_served=True)
    m.messages_accepted.inc(12)
    m.messages_rejected.labels(reason="relay").inc(2)
    m.messages_rejected.labels(reason="size").inc(1)
    m.spool_shed.labels(reason="full").inc(4)
    m.queue_shed.inc(1)
    m.connections_open.set(3)
    m.spool_depth.set(9)
    m.messages_processed.inc(8)
    m.filter_verdicts.labels(stage="virus", verdict="discard", reason="Eicar").inc(2)
    m.filter_verdicts.labels(stage="virus", verdict="discard", reason="Other").inc(1)
    m.filter_verdicts.labels(stage="size", verdict="pass", reason="").inc(8)
    m.set_messages.labels(set="all").inc(6)
    m.bundles_open.labels(set="all").set(1)
    m.bundles_waiting.labels(set="all").set(2)
    m.bundles_skipped.labels(set="all", reason="busy").inc(1)
    m.bundles.labels(set="all").inc(5)
    m.notifications.labels(channel="mail", outcome="sent").inc(5)
    m.campaigns_tracked.set(2)
    m.campaign_sampled_out.labels(set="all").inc(3)
    doc = doc_of(board)
    assert doc["figures"] == {
        "messages_accepted": 12,
        "messages_rejected": 3,
        "messages_shed": 5,
        "sessions_open": 3,
        "spool_depth": 9,
        "queue_length": None,  # no queue configured
        "messages_processed": 8,
        "intake_last_hour": 0,  # nothing came through the intake hook
        "campaigns_tracked": 2,
    }
    assert doc["verdicts"] == [
        {"stage": "size", "verdict": "pass", "count": 8},
        {"stage": "virus", "verdict": "discard", "count": 3},
    ]
    assert doc["sets"] == [
        {
            "name": "all",
            "messages": 6,
            "duplicates": 0,
            "sampled_out": 3,
            "bundles_open": 1,
            "bundles_stored": 5,
            "bundles_waiting": 2,
            "bundles_skipped": 1,
            "last": [],
        }
    ]
    assert doc["private_sets"] is None
    assert doc["notices"] == [{"channel": "mail", "outcome": "sent", "count": 5}]
    assert doc["outputs"] == []  # no output metrics: designed for their absence


def test_the_document_is_built_at_most_once_a_second() -> None:
    clock = task.Clock()
    clock.advance(T0)
    m = Metrics()
    board = Dashboard(config(), m, clock, web_served=True)
    first = board.document()
    m.messages_accepted.inc()
    clock.advance(0.5)
    assert board.document() is first
    clock.advance(0.5)
    assert json.loads(board.document())["figures"]["messages_accepted"] == 1


class HeldIntake:
    """An intake whose answers the test gives."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[object]] = []

    def submit(self, env: Envelope, /) -> defer.Deferred[object]:
        d: defer.Deferred[object] = defer.Deferred()
        self.pending.append(d)
        return d


def test_the_intake_hook_counts_only_durable_messages() -> None:
    clock = task.Clock()
    clock.advance(T0)
    board = Dashboard(config(), Metrics(), clock, web_served=True)
    inner = HeldIntake()
    intake = board.counting(inner)
    ok = intake.submit(envelope(helo="one.example"))
    bad = intake.submit(envelope(helo="two.example"))
    assert board.last_hour.per_minute()[-1] == 0  # not durable yet: no 250
    inner.pending[0].callback("stored")
    inner.pending[1].errback(OSError("disk full"))
    assert ok.result == "stored"  # the intake's answer passes through
    failures: list[object] = []
    bad.addErrback(failures.append)
    assert len(failures) == 1  # and so does its failure (the 451)
    doc = doc_of(board)
    assert doc["intake_per_minute"][-1] == 1 and doc["figures"]["intake_last_hour"] == 1
    assert doc["top"]["helo"] == [["one.example", 1]]
    assert doc["top"]["peer"] == [["192.0.2.0/24", 1]]
    assert doc["top"]["dialect"] == [["cmds=EHLO:fqdn,MAIL,RCPT,DATA", 1]]


def test_a_broken_hook_never_costs_the_250() -> None:
    board = Dashboard(config(), Metrics(), task.Clock(), web_served=True)
    inner = HeldIntake()
    env = envelope()
    env.meta = None  # type: ignore[assignment]  # accepted() will raise
    d = board.counting(inner).submit(env)
    inner.pending[0].callback("stored")
    assert d.result == "stored"


def test_campaigns_come_from_the_processed_messages() -> None:
    board = Dashboard(config(), Metrics(), task.Clock(), web_served=True)
    board.processed([envelope(campaign="c-1"), envelope(campaign="c-1"), envelope()])
    board.processed([envelope(campaign="c-2")])
    assert doc_of(board)["top"]["campaign"] == [["c-1", 2], ["c-2", 1]]


def published(set_name: str, name: str, url: str | None = None) -> Published:
    key = f"{set_name}/{name}.mbox.gz"
    manifest = Manifest(
        set=set_name,
        key=key,
        size=100,
        sha256="0" * 64,
        messages=3,
        first_received="2026-01-01T00:00:00.000Z",
        last_received="2026-01-01T00:01:00.000Z",
        node="n1",
    )
    return Published(manifest, url)


def test_private_sets_appear_only_as_counts() -> None:
    m = Metrics()
    cfg = config(
        SetConfig(name="open", token="tok-open-1"),
        SetConfig(name="secret-customer", private=True, token="tok-secret-2"),
        SetConfig(name="other-private", private=True),
    )
    board = Dashboard(cfg, m, task.Clock(), web_served=True)
    m.set_messages.labels(set="secret-customer").inc(4)
    m.set_messages.labels(set="other-private").inc(1)
    m.bundles_open.labels(set="secret-customer").set(1)
    board.published(published("secret-customer", "2026-01-01T00:00:00.n1.SECRETKEY0000000"))
    board.published(published("open", "2026-01-01T00:00:00.n1.OPENKEY000000000"))
    raw = board.document().decode()
    for secret in ("secret-customer", "other-private", "SECRETKEY", "tok-"):
        assert secret not in raw
    doc = json.loads(raw)
    assert [s["name"] for s in doc["sets"]] == ["open"]
    assert [b["key"] for b in doc["sets"][0]["last"]] == [
        "open/2026-01-01T00:00:00.n1.OPENKEY000000000.mbox.gz"
    ]
    assert doc["private_sets"]["sets"] == 2
    assert doc["private_sets"]["messages"] == 5
    assert doc["private_sets"]["bundles_open"] == 1
    assert "last" not in doc["private_sets"]


def test_output_outcomes_are_the_output_metrics() -> None:
    m = Metrics()
    board = Dashboard(config(), m, task.Clock(), web_served=True)
    m.output_sent.labels(output="pyzor").inc(7)
    m.output_failed.labels(output="hook", reason="https://user:secret@hook.example/x 500").inc()
    m.output_failed.labels(output="hook", reason="timeout").inc(2)
    m.output_queue_depth.labels(output="pyzor").set(2)
    raw = board.document().decode()
    assert "secret" not in raw and "timeout" not in raw  # reasons are summed over
    assert json.loads(raw)["outputs"] == [
        {"output": "hook", "figures": {"failed": 3}},
        {"output": "pyzor", "figures": {"queue_depth": 2, "sent": 7}},
    ]


def test_last_bundles_link_where_notices_do() -> None:
    clock = task.Clock()
    local = Dashboard(config(), Metrics(), clock, web_served=True)
    for i in range(7):
        local.published(published("all", f"2026-01-01T00:00:0{i}.n1.KEY{i:013d}"))
    last = doc_of(local)["sets"][0]["last"]
    assert len(last) == 5  # bounded, newest first
    assert last[0]["key"] == "all/2026-01-01T00:00:06.n1.KEY0000000000006.mbox.gz"
    assert last[0]["url"] == "https://traps.example/st/bundles/" + last[0]["key"]
    assert last[0]["messages"] == 3
    s3 = Dashboard(config(), Metrics(), clock, web_served=False)
    s3.published(published("all", "x", url="https://bucket.example/all/x.mbox.gz"))
    s3.published(published("all", "y"))  # S3 without a URL for the key: no link
    assert [b["url"] for b in doc_of(s3)["sets"][0]["last"]] == [
        None,
        "https://bucket.example/all/x.mbox.gz",
    ]


def test_the_published_chain_always_reaches_the_notifier() -> None:
    board = Dashboard(config(), Metrics(), task.Clock(), web_served=True)
    told: list[Published] = []
    hook = board.chained(told.append)
    notice = published("all", "n")
    hook(notice)
    broken = Published(None, None)  # type: ignore[arg-type]  # the dashboard's part raises
    hook(broken)
    assert told == [notice, broken]
