"""Campaigns through a real twistd over loopback SMTP: near-copies of one
template share X-Spamtrap-Campaign in the stored bundles, other messages
get other ids, and a set's per_campaign_cap thins its bundle (counted)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spamtrap.bundle.mbox import read_mbox
from tests.support.campaign_samples import TEMPLATES, near_copy
from tests.support.node import Node, RawSMTP
from tests.support.poll import wait_until

pytestmark = pytest.mark.slow

CONFIG = """
node: campaigns
traps:
  domains: [trap.example]
campaigns:
  window: 1h
sets:
  all: {}
  thin:
    per_campaign_cap: 5
    redact_trap_addresses: true
"""

CAMPAIGN = re.compile(rb"^X-Spamtrap-Campaign: ([0-9a-f]{16})$", re.M)


def stored(data_dir: Path, set_name: str) -> list[bytes]:
    out = []
    for path in sorted((data_dir / "bundles" / set_name).glob("*.mbox.gz")):
        out += [msg for _, msg in read_mbox(str(path))]
    return out


def campaign_of(message: bytes) -> bytes:
    found = CAMPAIGN.findall(message.split(b"\nReceived: ", 1)[0])  # our block only
    assert len(found) == 1, message[:400]
    return bytes(found[0])


def test_near_copies_share_a_campaign_and_the_cap_thins_a_set(tmp_path: Path) -> None:
    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text(CONFIG)
    node = Node(tmp_path / "data", config=cfg).start()
    # 30 near-copies of one campaign, and 3 copies each of the other templates.
    sent = [(0, near_copy(0, n)) for n in range(30)]
    sent += [(t, near_copy(t, n)) for t in range(1, len(TEMPLATES)) for n in range(3)]
    try:
        c = RawSMTP(node.host, node.smtp_port)
        for n, (_, data) in enumerate(sent):
            c.send(b"bulk@mailer.example", [f"victim{n}@trap.example".encode()], data)
        c.close()
        wait_until(
            lambda: node.metric("spamtrap_messages_processed_total") >= len(sent),
            60,
            "every message processed",
        )
        sampled = node.metric("spamtrap_campaign_sampled_out_total")
        new = node.metric("spamtrap_campaigns_new_total")
        tracked = node.metric("spamtrap_campaigns_tracked")
    finally:
        node.stop()
    everything = stored(node.data_dir, "all")
    assert len(everything) == len(sent)
    by_template: dict[int, set[bytes]] = {}
    for (template, _), message in zip(sent, sorted(everything, key=_order), strict=True):
        by_template.setdefault(template, set()).add(campaign_of(message))
    assert all(len(ids) == 1 for ids in by_template.values()), by_template
    ids = [next(iter(ids)) for ids in by_template.values()]
    assert len(set(ids)) == len(TEMPLATES)
    assert new == tracked == len(TEMPLATES)
    # thin: at most 5 of the big campaign in its bundle, all of the others.
    thin = stored(node.data_dir, "thin")
    counts: dict[bytes, int] = {}
    for message in thin:
        counts[campaign_of(message)] = counts.get(campaign_of(message), 0) + 1
        assert b"@trap.example" not in message.split(b"\n\n", 1)[0].lower()
    assert counts[by_template[0].copy().pop()] == 5
    assert sorted(counts.values()) == [3] * (len(TEMPLATES) - 1) + [5]
    assert sampled == 30 - 5
    # Nothing is left behind in the spool: the sampled-out ones were acked too.
    restarted = Node(tmp_path / "data", config=cfg).start()
    try:
        assert restarted.metric("spamtrap_spool_recovered_total") == 0
    finally:
        restarted.stop()


def _order(message: bytes) -> int:
    """A stored message's place in the sending order: its victim number."""
    m = re.search(rb"^X-Spamtrap-Rcpt: <victim(\d+)@trap\.example>", message, re.M)
    assert m, message[:400]
    return int(m.group(1))
