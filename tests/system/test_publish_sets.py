"""Per-set copies through a real twistd: redaction of shared sets, dedup."""

from __future__ import annotations

from pathlib import Path

import pytest

from spamtrap.bundle.mbox import read_mbox
from tests.support.node import Node, RawSMTP
from tests.support.poll import wait_until
from tests.support.redact_samples import TRAP_RE, build_message, every_text

pytestmark = pytest.mark.slow

CONFIG = """
node: redact
traps:
  domains: [trap.example, second-trap.example]
  addresses: [spamtrap@example.org, catchme@catchall.example]
feeds:
  - {id: donor, address: feed1@donor.example}
sets:
  private: {}
  shared:
    redact_trap_addresses: true
    dedup_window: 1h
"""


def messages(data_dir: Path, set_name: str) -> list[bytes]:
    out = []
    for path in sorted((data_dir / "bundles" / set_name).glob("*.mbox.gz")):
        out += [msg for _, msg in read_mbox(str(path))]
    return out


def test_shared_set_has_no_trap_address_and_private_keeps_them(tmp_path: Path) -> None:
    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text(CONFIG)
    node = Node(tmp_path / "data", config=cfg).start()
    data = build_message()
    try:
        c = RawSMTP(node.host, node.smtp_port)
        for _ in range(2):  # the same spam twice: dedup keeps one in "shared"
            c.send(b"bot@spam.example", [b"Jane.Doe-99@TRAP.example"], data)
        c.close()
        # A real process: poll its metrics with a deadline.
        wait_until(
            lambda: node.metric("spamtrap_messages_processed_total") >= 2,
            30,
            "the workers to process both messages",
        )
        assert node.metric("spamtrap_set_duplicates_total") == 1
    finally:
        node.stop()
    private = messages(node.data_dir, "private")
    shared = messages(node.data_dir, "shared")
    assert len(private) == 2 and len(shared) == 1
    for msg in private:
        assert any(TRAP_RE.search(t) for t in every_text(msg))
        assert b"Jane.Doe-99@TRAP.example" in msg
    found = [m.group(0) for t in every_text(shared[0]) for m in TRAP_RE.finditer(t)]
    assert found == [], found
    assert b"bob@other.example" in shared[0]  # other addresses stay
    assert len(shared[0]) == len(private[0])  # structure and length are kept
