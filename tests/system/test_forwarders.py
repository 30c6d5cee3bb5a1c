"""Real MTAs as forwarding donors in front of a real spamtrap node (cases B, D):
the feed strips the donor's Received lines by who added them.

A Python client plays the sender. It connects to a private Postfix or Exim
("the donor", ``mx.donor.test``) either from 127.0.0.2, an address outside
the donor (a spammer on the Internet), or from 127.0.0.1 (a hand-over on
the donor's own machine), with a message that already carries the
spammer's own Received line. The donor forwards it to the node's feed
address. Each trap is sent twice: once to a trap forwarded to feed
``donor1`` (``strip_received_by: [mx.donor.test]``), once to one forwarded
to feed ``raw`` (which strips nothing), to see what the donor really added.

Expected: the stored message keeps the spammer's line always, keeps the
donor's line recording the connection from 127.0.0.2 (the spam's entry
into the donor: evidence), and loses exactly the lines the donor added on
the way out: Postfix's /etc/aliases line ``Received: by mx.donor.test
(Postfix)`` and, from 127.0.0.1, the donor's receipt line too.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spamtrap import mime
from spamtrap.bundle.mbox import read_mbox
from tests.support.exim import PrivateExim
from tests.support.mta import PrivatePostfix
from tests.support.node import Node, bundles, require_binary, split_metadata
from tests.support.poll import wait_until

pytestmark = pytest.mark.slow

DONOR = "mx.donor.test"
SPAMMER_LINE = (
    b"Received: from [10.9.8.7] (helo=pc-4711)\r\n"
    b"\tby smtp.bot.example with esmtpa (Exim 4.94)\r\n"
    b"\tid 1qXy; Tue, 03 Mar 2026 09:59:59 +0000\r\n"
)
REST = (
    b"From: Winner <prize@bot.example>\r\n"
    b"To: sales@traps.donor.test\r\n"
    b"Subject: You won\r\n"
    b"Message-ID: <prize-1@bot.example>\r\n"
    b"Date: Tue, 03 Mar 2026 10:00:00 +0000\r\n"
    b"\r\n"
    b"Claim your prize now.\r\n"
)
MESSAGE = SPAMMER_LINE + REST
ALIAS_LINE = rb"Received: by mx\.donor\.test \(Postfix\)"

NODE_CONFIG = f"""\
smtp: {{hostname: trap.test}}
feeds:
  - id: donor1
    address: donor1@feeds.trap.test
    strip_received_by: [{DONOR}]
  - id: raw
    address: raw@feeds.trap.test
    strip_headers: []
"""


def postfix_entry(client: str) -> bytes:
    return rb"Received: from bot\.example \(unknown \[" + re.escape(client.encode()) + rb"\]\)"


def exim_entry(client: str) -> bytes:
    return (
        rb"Received: from \[" + re.escape(client.encode()) + rb"\] \(helo=bot\.example\)\s+"
        rb"by mx\.donor\.test with esmtp \(Exim 4\.\d+\)"
    )


def received_fields(message: bytes) -> list[bytes]:
    spans, _ = mime.field_spans(message)
    return [message[s.start : s.end] for s in spans if s.name.lower() == "received"]


def meta_value(meta: bytes, name: bytes) -> list[bytes]:
    return re.findall(rb"(?m)^" + name + rb": (.*?)\r?$", meta)


def wait(done: Callable[[], bool], what: Callable[[], str], deadline: float = 60) -> None:
    # Polls real processes: there is no clock to inject across a fork.
    try:
        wait_until(done, deadline, "delivery", interval=0.2)
    except TimeoutError:
        raise AssertionError(f"not delivered in {deadline}s:\n{what()}") from None


def run_donor(
    tmp_path: Path, make_mta: Callable[[int], Any], traps: dict[str, str], client: str
) -> dict[str, tuple[bytes, bytes]]:
    """Send MESSAGE from ``client`` to each trap of the donor MTA that
    ``make_mta(node_port)`` builds; {feed: (our metadata, stored message)}."""
    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text(NODE_CONFIG)
    node = Node(tmp_path / "data", config=cfg).start()
    mta = None
    try:
        mta = make_mta(node.smtp_port)
        mta.start()
        for trap in traps.values():
            with smtplib.SMTP(
                timeout=30, local_hostname="bot.example", source_address=(client, 0)
            ) as c:
                c.connect("127.0.0.1", mta.port)
                c.sendmail("prize@bot.example", [trap], MESSAGE)
        wait(
            lambda: (
                node.metric("spamtrap_messages_accepted_total") >= len(traps) and mta.queue_empty()
            ),
            lambda: f"{mta.log()}\n{node.log()}",
        )
    finally:
        if mta is not None:
            mta.cleanup()
        node.stop()
    stored: dict[str, tuple[bytes, bytes]] = {}
    for path in bundles(node.data_dir):
        for _, msg in read_mbox(str(path)):
            meta, original = split_metadata(msg)
            (feed,) = meta_value(meta, b"X-Spamtrap-Feed")
            stored[feed.decode()] = (meta, original)
    assert sorted(stored) == sorted(traps), node.log()
    return stored


def check(
    stored: dict[str, tuple[bytes, bytes]],
    raw_lines: list[bytes],
    kept_lines: list[bytes],
    stripped: bytes | None,
) -> None:
    """The raw copy's Received lines match ``raw_lines`` (regexps), the
    donor1 copy's ``kept_lines``, and everything below them is the sent
    message, byte for byte."""
    _, raw = stored["raw"]
    meta, kept = stored["donor1"]
    for message, expected in ((raw, raw_lines), (kept, kept_lines)):
        got = received_fields(message)
        assert len(got) == len(expected), got
        for field, pattern in zip(got, expected, strict=True):
            assert re.match(pattern, field), (pattern, field)
        assert got[-1] == SPAMMER_LINE  # the spammer's line, untouched
        # Below the Received lines, the message as sent.
        assert message.endswith(REST)
    assert meta_value(meta, b"X-Spamtrap-X-Stripped") == ([stripped] if stripped else [])


def postfix_tool(mta: PrivatePostfix, tool: str, table: str) -> None:
    # The instance's own main.cf, not the machine's (which may not exist).
    r = subprocess.run(
        [require_binary(tool), "-c", str(mta.config_dir), table],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, f"{tool} {table}: {r.stdout}{r.stderr}"


def postfix_alias(tmp_path: Path) -> Callable[[int], PrivatePostfix]:
    require_binary("postalias")

    def make(node_port: int) -> PrivatePostfix:
        mta = PrivatePostfix(
            main={
                "myhostname": DONOR,
                "mydomain": "donor.test",
                "mydestination": "traps.donor.test",
                "alias_maps": "hash:ALIASES",
                "alias_database": "hash:ALIASES",
                "transport_maps": f"inline:{{ feeds.trap.test=smtp:[127.0.0.1]:{node_port} }}",
            }
        )
        aliases = mta.base / "etc" / "aliases"
        aliases.write_text("sales: donor1@feeds.trap.test\nrawtrap: raw@feeds.trap.test\n")
        main_cf = mta.config_dir / "main.cf"
        main_cf.write_text(main_cf.read_text().replace("ALIASES", str(aliases)))
        postfix_tool(mta, "postalias", f"hash:{aliases}")
        return mta

    return make


def postfix_virtual(tmp_path: Path) -> Callable[[int], PrivatePostfix]:
    require_binary("postmap")

    def make(node_port: int) -> PrivatePostfix:
        mta = PrivatePostfix(
            main={
                "myhostname": DONOR,
                "mydomain": "donor.test",
                "virtual_alias_domains": "traps.donor.test",
                "virtual_alias_maps": "hash:VIRTUAL",
                "transport_maps": f"inline:{{ feeds.trap.test=smtp:[127.0.0.1]:{node_port} }}",
            }
        )
        virtual = mta.base / "etc" / "virtual"
        virtual.write_text(
            "rawtrap@traps.donor.test  raw@feeds.trap.test\n"
            "@traps.donor.test         donor1@feeds.trap.test\n"
        )
        main_cf = mta.config_dir / "main.cf"
        main_cf.write_text(main_cf.read_text().replace("VIRTUAL", str(virtual)))
        postfix_tool(mta, "postmap", f"hash:{virtual}")
        return mta

    return make


def exim_redirect(tmp_path: Path) -> Callable[[int], PrivateExim]:
    def make(node_port: int) -> PrivateExim:
        # The operator's guide's router, and a manualroute to the node.
        routers = f"""\
spamtrap_raw:
  driver = redirect
  domains = traps.donor.test
  local_parts = rawtrap
  data = raw@feeds.trap.test
spamtrap_feed:
  driver = redirect
  domains = traps.donor.test
  data = donor1@feeds.trap.test
to_spamtrap:
  driver = manualroute
  domains = feeds.trap.test
  transport = remote_smtp
  route_list = * 127.0.0.1::{node_port}
  self = send
"""
        return PrivateExim(routers=routers, domains="traps.donor.test", hostname=DONOR)

    return make


TRAPS = {"donor1": "sales@traps.donor.test", "raw": "rawtrap@traps.donor.test"}
OUTSIDE, LOCAL = "127.0.0.2", "127.0.0.1"


@pytest.mark.parametrize("client", [OUTSIDE, LOCAL])
def test_postfix_etc_aliases(tmp_path: Path, client: str) -> None:
    require_binary("postfix")
    stored = run_donor(tmp_path, postfix_alias(tmp_path), TRAPS, client)
    raw = [ALIAS_LINE, postfix_entry(client), re.escape(SPAMMER_LINE)]
    if client == OUTSIDE:
        # Postfix's local(8) adds a line of its own: it goes; the line
        # recording the spammer's connection stays.
        check(stored, raw, raw[1:], b"Received=1, Delivered-To=1")
    else:
        check(stored, raw, raw[2:], b"Received=2, Delivered-To=1")


@pytest.mark.parametrize("client", [OUTSIDE, LOCAL])
def test_postfix_virtual_alias(tmp_path: Path, client: str) -> None:
    require_binary("postfix")
    stored = run_donor(tmp_path, postfix_virtual(tmp_path), TRAPS, client)
    raw = [postfix_entry(client), re.escape(SPAMMER_LINE)]
    if client == OUTSIDE:
        # A virtual alias adds no Received line (and no Delivered-To): nothing goes.
        check(stored, raw, raw, None)
    else:
        check(stored, raw, raw[1:], b"Received=1")


@pytest.mark.parametrize("client", [OUTSIDE, LOCAL])
def test_exim_redirect_router(tmp_path: Path, client: str) -> None:
    stored = run_donor(tmp_path, exim_redirect(tmp_path), TRAPS, client)
    raw = [exim_entry(client), re.escape(SPAMMER_LINE)]
    if client == OUTSIDE:
        check(stored, raw, raw, None)
    else:
        check(stored, raw, raw[1:], b"Received=1")
