"""A real Postfix in front of a real spamtrap node (MX delegation, cases C
and E): the stored metadata names the bot, not Postfix.

A Python client connects to a private Postfix from 127.0.0.2 with a HELO of
its own; Postfix relays the trap domain to the node on 127.0.0.1, whose
``smtp.trusted_relays`` is 127.0.0.1/32. With XFORWARD the client comes from
it; without, from Postfix's own Received line.
"""

from __future__ import annotations

import re
import smtplib
from pathlib import Path

import pytest

from spamtrap.bundle.mbox import read_mbox
from tests.support.mta import PrivatePostfix
from tests.support.node import Node, bundles, require_binary
from tests.support.poll import wait_until

pytestmark = pytest.mark.slow

BOT_HELO = "bot-helo.example"
BOT_IP = "127.0.0.2"
RELAY_HELO = "mx1.relay.test"


def run_through_postfix(tmp_path: Path, xforward: str) -> tuple[bytes, int]:
    """One message bot -> Postfix -> node; returns (the stored message, the bot's port)."""
    require_binary("postfix")
    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text(
        "traps: {domains: [trap.example]}\n"
        "smtp:\n  hostname: trap.test\n  trusted_relays: [127.0.0.1/32]\n"
    )
    node = Node(tmp_path / "data", config=cfg).start()
    mta: PrivatePostfix | None = None
    try:
        # Built inside try: if it raises, the node is still stopped.
        mta = PrivatePostfix(
            main={
                "relay_domains": "trap.example",
                "transport_maps": f"inline:{{ trap.example=smtp:[127.0.0.1]:{node.smtp_port} }}",
                "smtp_send_xforward_command": xforward,
                "smtp_helo_name": RELAY_HELO,
            }
        )
        mta.start()
        with smtplib.SMTP(timeout=30, local_hostname=BOT_HELO, source_address=(BOT_IP, 0)) as c:
            c.connect("127.0.0.1", mta.port)
            assert c.sock is not None
            bot_port = c.sock.getsockname()[1]
            c.sendmail(
                "bot@spam.example",
                ["victim@trap.example"],
                b"From: bot@spam.example\r\nSubject: relayed\r\n\r\nbuy now\r\n",
            )
        # Polls two real processes: there is no clock to inject across a fork.
        try:
            wait_until(
                lambda: node.metric("spamtrap_messages_accepted_total") >= 1 and mta.queue_empty(),
                60,
                interval=0.2,
            )
        except TimeoutError:
            raise AssertionError(f"Postfix did not deliver:\n{mta.log()}\n{node.log()}") from None
    finally:
        if mta is not None:
            mta.cleanup()
        node.stop()
    stored = [msg for p in bundles(node.data_dir) for _, msg in read_mbox(str(p))]
    assert len(stored) == 1, (sorted(node.data_dir.rglob("*")), node.log())
    return stored[0], bot_port


def fields(message: bytes) -> dict[str, list[str]]:
    """Our block's fields (name -> values) and the unfolded trap Received line."""
    out: dict[str, list[str]] = {}
    head = re.split(rb"\r?\n\r?\n", message, maxsplit=1)[0].decode("utf-8", "replace")
    unfolded = re.sub(r"\r?\n[ \t]+", " ", head)
    for line in re.split(r"\r?\n", unfolded):
        name, _, value = line.partition(": ")
        out.setdefault(name, []).append(value)
    return out


def test_postfix_xforward_names_the_bot(tmp_path: Path) -> None:
    message, bot_port = run_through_postfix(tmp_path, "yes")
    f = fields(message)
    assert f["X-Spamtrap-Peer"] == [f"{BOT_IP} {bot_port}"]
    assert f["X-Spamtrap-Helo"] == [BOT_HELO]
    (relay_field,) = f["X-Spamtrap-Relay"]
    assert re.fullmatch(rf"127\.0\.0\.1 \d+ {re.escape(RELAY_HELO)} xforward", relay_field)
    assert "X-Spamtrap-Rdns" not in f  # Postfix looked up no name: NAME=unknown
    assert "relayed" in f["X-Spamtrap-Dialect"][0]
    # The first Received is ours and names the bot; Postfix's own follows.
    ours, postfix = f["Received"][:2]
    assert ours.startswith(f"from {BOT_HELO} (unknown [{BOT_IP}]) by trap.test (spamtrap)")
    assert " with ESMTP id " in ours  # the bot's protocol, from XFORWARD PROTO
    assert postfix.startswith(f"from {BOT_HELO} (unknown [{BOT_IP}])")
    assert f"by {RELAY_HELO} (Postfix) with ESMTP id " in postfix
    assert message.endswith(b"buy now\r\n") or message.endswith(b"buy now\n")


def test_postfix_without_xforward_is_derived_from_its_received_line(tmp_path: Path) -> None:
    message, _ = run_through_postfix(tmp_path, "no")
    f = fields(message)
    assert f["X-Spamtrap-Peer"] == [f"{BOT_IP} 0"]  # Postfix's line carries no port
    assert f["X-Spamtrap-Helo"] == [BOT_HELO]
    (relay_field,) = f["X-Spamtrap-Relay"]
    assert re.fullmatch(rf"127\.0\.0\.1 \d+ {re.escape(RELAY_HELO)} derived", relay_field)
    assert "relayed" in f["X-Spamtrap-Dialect"][0]
    assert f["Received"][0].startswith(f"from {BOT_HELO} (unknown [{BOT_IP}]) by trap.test")
