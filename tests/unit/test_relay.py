"""Attribution behind trusted MX relays: XFORWARD, XCLIENT and the relay's
top Received line (spamtrap.intake.relay, and the SMTP commands in spamtrap.intake.smtp)."""

from __future__ import annotations

import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import address
from twisted.internet.testing import StringTransport

from spamtrap import testing
from spamtrap.config import Config, ConfigError, parse_config
from spamtrap.intake import relay
from spamtrap.message import META_FIELDS, Envelope, escape_value
from tests.support.smtp_helpers import Harness, trap_config

RELAY_IP = "192.0.2.25"
BOT_MSG = b"From: bot@spam.example\r\nSubject: buy\r\n\r\nbody\r\n"


def config(relays: list[str] | None = None) -> Config:
    trusted = [RELAY_IP + "/32", "2001:db8::/32"] if relays is None else relays
    return trap_config(smtp__trusted_relays=trusted)


def session(peer: str = RELAY_IP, relays: list[str] | None = None) -> Harness:
    h = Harness(config(relays), peer=peer)
    h.replies()
    return h


def ehlo_keywords(h: Harness, name: bytes = b"mx1.example") -> dict[bytes, bytes]:
    h.send(b"EHLO " + name + b"\r\n")
    lines = h.replies()
    assert lines[0].startswith(b"250")
    return {ln[4:].partition(b" ")[0]: ln[4:].partition(b" ")[2] for ln in lines[1:]}


def deliver(h: Harness, body: bytes = BOT_MSG) -> Envelope:
    before = len(h.submitted)
    h.transaction(body)
    assert len(h.submitted) == before + 1, h.replies()
    return h.submitted[-1]


# -- config -----------------------------------------------------------------


def test_config_trusted_relays_default_empty_and_validated() -> None:
    assert Config().smtp.trusted_relays == []
    cfg = parse_config(
        "traps: {domains: [trap.example]}\nsmtp:\n  trusted_relays: [192.0.2.25, '2001:db8::/32']\n"
    )
    assert cfg.smtp.trusted_relays == ["192.0.2.25/32", "2001:db8::/32"]
    text = textwrap.dedent(
        """\
        traps: {domains: [trap.example]}
        smtp:
          trusted_relays:
            - 10.0.0.0/8
            - 10.0.0.1/8
        """
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.yaml")
    (issue,) = info.value.errors
    assert issue.line == 5
    assert issue.path == "smtp.trusted_relays[1]"
    assert "not a network" in issue.message


# -- advertising and authorisation -------------------------------------------


def test_trusted_relay_is_offered_xforward_and_xclient() -> None:
    exts = ehlo_keywords(session())
    assert exts[b"XFORWARD"] == b"NAME ADDR PORT PROTO HELO IDENT SOURCE"
    assert exts[b"XCLIENT"] == b"NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT"


def test_untrusted_peer_is_not_offered_and_gets_550_changing_nothing() -> None:
    h = session(peer="198.51.100.9")
    exts = ehlo_keywords(h, b"bot.example")
    assert b"XFORWARD" not in exts and b"XCLIENT" not in exts
    h.send(b"XFORWARD NAME=forged.example ADDR=203.0.113.5 HELO=forged\r\n")
    h.send(b"XCLIENT ADDR=203.0.113.5 HELO=forged\r\n")
    assert h.replies() == [b"550 5.7.0 Error: insufficient authorization"] * 2
    env = deliver(h)
    assert env.meta["peer"] == ["198.51.100.9 40000"]
    assert env.meta["helo"] == ["bot.example"]
    assert "relay" not in env.meta and "rdns" not in env.meta
    assert env.received_line.startswith("from bot.example (unknown [198.51.100.9])")
    # the attempt itself is evidence: it stays in the dialect
    assert "XFORWARD" in env.meta["dialect"][0] and "relayed" not in env.meta["dialect"][0]


def test_no_trusted_relays_configured_means_nobody_is_trusted() -> None:
    h = session(relays=[])
    assert b"XFORWARD" not in ehlo_keywords(h)
    h.send(b"XFORWARD ADDR=203.0.113.5\r\n")
    assert h.codes() == [550]


def test_ehlo_reply_cache_does_not_leak_between_trusted_and_untrusted() -> None:
    # The factory renders each EHLO reply once: trust must be part of the key.
    h = session()
    assert b"XFORWARD" in ehlo_keywords(h)
    other = h.factory.buildProtocol(None)
    transport = StringTransport(
        peerAddress=address.IPv4Address("TCP", "198.51.100.9", 40001),
        hostAddress=address.IPv4Address("TCP", "198.51.100.1", 25),
    )
    other.makeConnection(transport)
    transport.clear()
    other.dataReceived(b"EHLO bot\r\n")
    assert b"XFORWARD" not in transport.value() and b"250 " in transport.value()


# -- XFORWARD ----------------------------------------------------------------


def test_xforward_names_the_original_client() -> None:
    h = session()
    ehlo_keywords(h)
    h.send(b"XFORWARD NAME=bot.dsl.example ADDR=203.0.113.5 PORT=51234 PROTO=ESMTP\r\n")
    h.send(b"XFORWARD HELO=pc-4711 IDENT=4Xyz12 SOURCE=REMOTE\r\n")
    assert h.codes() == [250, 250]
    env = deliver(h)
    m = env.meta
    assert m["peer"] == ["203.0.113.5 51234"]
    assert m["rdns"] == ["bot.dsl.example"]
    assert m["helo"] == ["pc-4711"]
    assert m["relay"] == [f"{RELAY_IP} 40000 mx1.example xforward"]
    assert "relayed" in m["dialect"][0].split("flags=")[1]
    assert env.received_line.startswith("from pc-4711 (bot.dsl.example [203.0.113.5])\r\n")
    assert "\tby trap.test (spamtrap) with ESMTP id " in env.received_line
    block = env.header_block()
    assert f"X-Spamtrap-Relay: {RELAY_IP} 40000 mx1.example xforward\r\n".encode() in block
    # Relay sits between Proxy and Rdns in the block
    assert block.index(b"X-Spamtrap-Relay") < block.index(b"X-Spamtrap-Rdns")


def test_xforward_unavailable_values_and_unknown_name() -> None:
    h = session()
    ehlo_keywords(h)
    h.send(
        b"XFORWARD NAME=[UNAVAILABLE] ADDR=203.0.113.5 PORT=[TEMPUNAVAIL] HELO=[unavailable]\r\n"
    )
    assert h.codes() == [250]
    m = deliver(h).meta
    assert m["peer"] == ["203.0.113.5 0"]
    assert "rdns" not in m and "helo" not in m
    h.send(b"XFORWARD NAME=unknown ADDR=203.0.113.6\r\n")
    env = deliver(h)
    assert "rdns" not in env.meta
    assert env.received_line.startswith("from unknown (unknown [203.0.113.6])")


def test_xforward_xtext_is_decoded() -> None:
    h = session()
    ehlo_keywords(h)
    h.send(b"XFORWARD ADDR=203.0.113.5 HELO=[bot+20with+20spaces+2B+3D]\r\n")
    assert h.codes() == [250]
    assert deliver(h).meta["helo"] == ["[bot with spaces+=]"]


def test_xforward_xtext_cr_lf_cannot_forge_a_field() -> None:
    h = session()
    ehlo_keywords(h)
    h.send(b"XFORWARD ADDR=203.0.113.5 HELO=x+0D+0A+09X-Spamtrap-Feed:+20forged\r\n")
    assert h.codes() == [250]
    env = deliver(h)
    # The raw value is kept (evidence); the block shows it escaped, in the
    # Helo field and inside the Received piece, never as a fold or a field.
    assert env.meta["helo"] == ["x\r\n\tX-Spamtrap-Feed: forged"]
    block = env.header_block()
    assert not any(ln.startswith(b"X-Spamtrap-Feed") for ln in block.splitlines())
    assert b"X-Spamtrap-Helo: x\\r\\n\\tX-Spamtrap-Feed: forged\r\n" in block
    assert b"Received: from x\\r\\n\\tX-Spamtrap-Feed: forged (unknown [203.0.113.5])" in block
    assert block.count(b"\r\n\t") == 3  # our own folds only


def test_a_cr_in_the_relays_received_line_is_kept_and_escaped() -> None:
    h = session()
    ehlo_keywords(h)
    received = b"Received: from pc\r4711 (bot.dsl.example [203.0.113.5])\r\n\tby mx1; date\r\n"
    env = deliver(h, received + BOT_MSG)
    assert env.meta["helo"] == ["pc\r4711"]
    assert b"Received: from pc\\r4711 (bot.dsl.example [203.0.113.5])" in env.header_block()


def test_xforward_ipv6_prefix() -> None:
    h = session()
    ehlo_keywords(h)
    h.send(b"XFORWARD ADDR=IPV6:2001:DB8::5 NAME=v6.example\r\n")
    assert h.codes() == [250]
    env = deliver(h)
    assert env.meta["peer"] == ["2001:db8::5 0"]
    assert "[2001:db8::5])" in env.received_line.split("\r\n")[0]


def test_ipv6_relay_is_trusted() -> None:
    h = session(peer="2001:db8::25")
    assert b"XFORWARD" in ehlo_keywords(h)
    h.send(b"XFORWARD ADDR=203.0.113.5\r\n")
    assert h.codes() == [250]
    assert deliver(h).meta["relay"] == ["2001:db8::25 40000 mx1.example xforward"]


@pytest.mark.parametrize(
    ("arg", "reply"),
    [
        (b"", b"501 5.5.4 Syntax: XFORWARD attribute=value..."),
        (b"ADDR", b"501 5.5.4 Syntax: XFORWARD attribute=value..."),
        (b"LOGIN=x", b"501 5.5.4 Bad XFORWARD attribute name: LOGIN"),
        (b"ADDR=not-an-ip", b"501 5.5.4 Bad ADDR syntax: not-an-ip"),
        (b"ADDR=203.0.113.5 PORT=70000", b"501 5.5.4 Bad PORT syntax: 70000"),
        (b"HELO=a+zz", b"501 5.5.4 Bad HELO syntax: bad xtext escape at offset 1"),
    ],
)
def test_bad_xforward_gets_501_and_changes_nothing(arg: bytes, reply: bytes) -> None:
    h = session()
    ehlo_keywords(h)
    h.send(b"XFORWARD ADDR=203.0.113.7 HELO=good\r\n")
    h.send(b"XFORWARD " + arg + b"\r\n")
    assert h.replies() == [b"250 2.0.0 Ok", reply]
    m = deliver(h).meta
    assert m["peer"] == ["203.0.113.7 0"] and m["helo"] == ["good"]


def test_xforward_inside_a_transaction_is_503() -> None:
    h = session()
    ehlo_keywords(h)
    h.send(b"MAIL FROM:<a@b>\r\nXFORWARD ADDR=203.0.113.5\r\n")
    assert h.codes() == [250, 503]


def test_xforward_resets_after_each_transaction_and_on_rset() -> None:
    h = session()
    ehlo_keywords(h)
    h.send(b"XFORWARD ADDR=203.0.113.5 HELO=first\r\n")
    assert deliver(h).meta["peer"] == ["203.0.113.5 0"]
    # the next message carries no XFORWARD and no relay Received line
    env = deliver(h)
    assert env.meta["peer"] == [f"{RELAY_IP} 40000"]
    assert env.meta["helo"] == ["mx1.example"]
    assert env.meta["relay"] == [f"{RELAY_IP} 40000 mx1.example unknown"]
    h.send(b"XFORWARD ADDR=203.0.113.9\r\nRSET\r\n")
    assert deliver(h).meta["peer"] == [f"{RELAY_IP} 40000"]
    # a new EHLO ends it too
    h.send(b"XFORWARD ADDR=203.0.113.9\r\n")
    ehlo_keywords(h)
    assert deliver(h).meta["peer"] == [f"{RELAY_IP} 40000"]


def test_xforward_ends_with_a_transaction_refused_for_its_size() -> None:
    # XFORWARD_README: the attributes last one transaction, delivered or not.
    cfg = config()
    cfg = testing.config(cfg, smtp__max_message_size=64)
    h = Harness(cfg, peer=RELAY_IP)
    h.replies()
    ehlo_keywords(h)
    h.send(b"XFORWARD ADDR=203.0.113.5 HELO=first\r\n")
    h.codes()
    h.transaction(b"Subject: big\r\n\r\n" + b"x" * 200 + b"\r\n")
    assert h.codes()[-1] == 552
    assert deliver(h).meta["peer"] == [f"{RELAY_IP} 40000"]


def test_xforward_with_pipelined_transaction() -> None:
    # Postfix pipelines XFORWARD, MAIL, RCPT and DATA in one write.
    h = session()
    ehlo_keywords(h)
    h.send(
        b"XFORWARD NAME=a.example ADDR=203.0.113.5 PORT=1 PROTO=SMTP HELO=a IDENT=Q1 "
        b"SOURCE=REMOTE\r\nMAIL FROM:<s@x>\r\nRCPT TO:<v@trap.example>\r\nDATA\r\n"
    )
    h.send(BOT_MSG + b".\r\n")
    assert h.codes() == [250, 250, 250, 354, 250]
    env = h.submitted[-1]
    assert env.meta["peer"] == ["203.0.113.5 1"]
    assert "\tby trap.test (spamtrap) with SMTP id " in env.received_line


# -- XCLIENT -----------------------------------------------------------------


def test_xclient_restarts_the_session_for_the_client() -> None:
    h = session()
    ehlo_keywords(h)
    h.send(
        b"XCLIENT NAME=bot.dsl.example ADDR=203.0.113.5 PORT=4000"
        b" DESTADDR=198.51.100.77 DESTPORT=25\r\n"
    )
    assert h.replies() == [b"220 trap.test ESMTP spamtrap"]
    h.send(b"MAIL FROM:<a@b>\r\n")  # the client said no HELO yet
    h.send(b"RSET\r\n")
    h.replies()
    ehlo_keywords(h, b"bots-own-helo")
    env = deliver(h)
    m = env.meta
    assert m["peer"] == ["203.0.113.5 4000"]
    assert m["rdns"] == ["bot.dsl.example"]
    assert m["helo"] == ["bots-own-helo"]
    assert m["local"] == ["198.51.100.77 25"]
    assert m["relay"] == [f"{RELAY_IP} 40000 mx1.example xclient"]
    assert "relayed" in m["dialect"][0]
    assert env.received_line.startswith("from bots-own-helo (bot.dsl.example [203.0.113.5])")


def test_xclient_helo_attribute_wins_over_a_later_ehlo() -> None:
    h = session()
    ehlo_keywords(h)
    h.send(b"XCLIENT ADDR=203.0.113.5 HELO=from-xclient\r\n")
    assert h.codes() == [220]
    assert deliver(h).meta["helo"] == ["from-xclient"]
    # Postfix's smtpd_proxy says "EHLO $smtpd_proxy_ehlo" after XCLIENT:
    # that is the relay's name, not the bot's.
    ehlo_keywords(h, b"relay-proxy-ehlo")
    env = deliver(h)
    assert env.meta["helo"] == ["from-xclient"] and env.meta["peer"] == ["203.0.113.5 0"]
    assert env.received_line.startswith("from from-xclient (unknown [203.0.113.5])")
    # Without HELO= (or with it unavailable) the later EHLO is the client's.
    h.replies()
    h.send(b"XCLIENT HELO=[UNAVAILABLE]\r\n")
    assert h.codes() == [220]
    ehlo_keywords(h, b"bots-own")
    assert deliver(h).meta["helo"] == ["bots-own"]


def test_starttls_forgets_what_the_relay_said() -> None:
    # RFC 3207 4.2: nothing learnt before the TLS handshake counts after it.
    h = Harness(config(), peer=RELAY_IP, tls=True)
    h.replies()
    ehlo_keywords(h)
    h.send(b"XCLIENT ADDR=203.0.113.5 HELO=bot\r\n")
    assert h.codes() == [220]
    ehlo_keywords(h)
    h.send(b"XFORWARD ADDR=203.0.113.6\r\n")
    assert h.codes() == [250]
    h.send(b"STARTTLS\r\n")
    assert h.codes() == [220]
    ehlo_keywords(h, b"mx1-after-tls")
    m = deliver(h).meta
    assert m["peer"] == [f"{RELAY_IP} 40000"] and m["helo"] == ["mx1-after-tls"]
    assert m["relay"] == [f"{RELAY_IP} 40000 mx1-after-tls unknown"]


def test_xclient_from_untrusted_peer_and_inside_a_transaction() -> None:
    h = session(peer="198.51.100.9")
    h.send(b"XCLIENT ADDR=203.0.113.5\r\n")
    assert h.codes() == [550]
    t = session()
    t.send(b"MAIL FROM:<a@b>\r\nXCLIENT ADDR=203.0.113.5\r\n")
    assert t.codes() == [250, 503]


def test_xforward_wins_over_xclient_for_its_transaction() -> None:
    h = session()
    h.send(b"XCLIENT ADDR=203.0.113.5\r\n")
    assert h.codes() == [220]
    ehlo_keywords(h)
    h.send(b"XFORWARD ADDR=203.0.113.99 HELO=inner\r\n")
    assert h.codes() == [250]
    m = deliver(h).meta
    assert m["peer"] == ["203.0.113.99 0"] and m["relay"][0].endswith(" xforward")
    assert deliver(h).meta["peer"] == ["203.0.113.5 0"]


# -- the derived path: the relay's top Received line ---------------------------

DERIVED_CASES = [
    # Postfix
    (
        b"Received: from pc-4711 (bot.dsl.example [203.0.113.5])\r\n"
        b"\tby mx1.example (Postfix) with ESMTP id 4Xyz12\r\n"
        b"\tfor <v@trap.example>; Mon, 1 Jan 2024 00:00:00 +0000\r\n",
        ("203.0.113.5", 0, "bot.dsl.example", "pc-4711"),
    ),
    # Postfix, no rDNS, client port logging, IPv6
    (
        b"Received: from [IPv6:2001:db8::5] (unknown [IPv6:2001:db8::5]:51234)\r\n"
        b"\tby mx1.example (Postfix) with SMTP id 4Xyz13; Mon, 1 Jan 2024 00:00:00 +0000\r\n",
        ("2001:db8::5", 51234, None, "[IPv6:2001:db8::5]"),
    ),
    # Postfix with TLS comments
    (
        b"Received: from rubel.example (rubel.example [198.51.100.214])\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
        b"\t(No client certificate requested)\r\n"
        b"\tby mx1.example (Postfix) with ESMTPS id 1; date\r\n",
        ("198.51.100.214", 0, "rubel.example", "rubel.example"),
    ),
    # Exim with a verified name, port and helo=
    (
        b"Received: from p5.dip.example ([203.0.113.231]:11218 helo=sandpiper)\r\n"
        b"\tby mail1.example with esmtp (Exim 4.96)\r\n\tid 1CJaZW-0006rU-00; date\r\n",
        ("203.0.113.231", 11218, "p5.dip.example", "sandpiper"),
    ),
    # Exim without a name
    (
        b"Received: from [203.0.113.8] (port=41234 helo=bot.example)\r\n"
        b"\tby mail1.example with esmtp (Exim 4.96) id 1x-2; date\r\n",
        ("203.0.113.8", 41234, None, "bot.example"),
    ),
    # Exim, HELO equal to the verified name (no helo=)
    (
        b"Received: from gilmore.example ([203.0.113.71])\r\n"
        b"\tby castle.example with esmtp (Exim 4.41) id 1; date\r\n",
        ("203.0.113.71", 0, "gilmore.example", "gilmore.example"),
    ),
    # Sendmail with "(may be forged)"
    (
        b"Received: from mx56.spam.example (64.rev.example [203.0.113.56] (may be forged))\r\n"
        b"\tby mail.example (8.17.1/8.17.1) with ESMTP id i8FJ; date\r\n",
        ("203.0.113.56", 0, "64.rev.example", "mx56.spam.example"),
    ),
    # Sendmail without rDNS, ident
    (
        b"Received: from bigass1 (IDENT:root@host.example [203.0.113.2])\r\n"
        b"\tby x.example (8.9.3) id 1; date\r\n",
        ("203.0.113.2", 0, "host.example", "bigass1"),
    ),
    (
        b"Received: from bigass1.example ([203.0.113.3]) by slim1.example with esmtp; date\r\n",
        ("203.0.113.3", 0, None, "bigass1.example"),
    ),
    # qmail
    (
        b"Received: from unknown (HELO feux01a-isp) (203.0.113.210)\r\n"
        b"  by totor.example with SMTP; date\r\n",
        ("203.0.113.210", 0, None, "feux01a-isp"),
    ),
    # IPv4-mapped IPv6
    (
        b"Received: from cs.example ([::ffff:203.0.113.141]) by mail.example with esmtp; date\r\n",
        ("203.0.113.141", 0, None, "cs.example"),
    ),
]


@pytest.mark.parametrize(("received", "want"), DERIVED_CASES)
def test_received_parser(received: bytes, want: tuple[str, int, str | None, str | None]) -> None:
    client = relay.derive_client(received + b"Subject: x\r\n\r\nbody\r\n")
    assert client is not None
    assert (client.addr, client.port, client.name, client.helo) == want


@pytest.mark.parametrize(("received", "want"), DERIVED_CASES[:1] + DERIVED_CASES[3:4])
def test_trusted_relay_without_xforward_derives_the_client(
    received: bytes, want: tuple[str, int, str | None, str | None]
) -> None:
    h = session()
    ehlo_keywords(h)
    # a forged Received line further down must not be what is read
    forged = b"Received: from forged (forged [198.18.0.1]) by forged; date\r\n"
    env = deliver(h, received + forged + BOT_MSG)
    addr, port, name, helo = want
    assert env.meta["peer"] == [f"{addr} {port}"]
    assert env.meta["helo"] == [helo]
    assert env.meta.get("rdns") == ([name] if name else None)
    assert env.meta["relay"] == [f"{RELAY_IP} 40000 mx1.example derived"]
    assert env.received_line.startswith(f"from {helo} ({name or 'unknown'} [{addr}])")
    assert "relayed" in env.meta["dialect"][0]


HOP_BOT = b"Received: from pc-4711 (bot.dsl.example [203.0.113.5])\r\n\tby mx0.example; date\r\n"
HOP_AMAVIS = b"Received: from localhost (localhost [127.0.0.1])\r\n\tby mx1.example; date\r\n"
HOP_INNER = b"Received: from mx0.example (mx0.example [192.0.2.26])\r\n\tby mx1.example; date\r\n"


@pytest.mark.parametrize(
    "hops",
    [
        [HOP_AMAVIS, HOP_BOT],  # Postfix -> amavis -> Postfix
        [HOP_INNER, HOP_BOT],  # two relays, both trusted
        [HOP_AMAVIS, HOP_INNER, HOP_BOT],
    ],
)
def test_derived_client_walks_down_trusted_hops(hops: list[bytes]) -> None:
    h = session(relays=[RELAY_IP + "/32", "192.0.2.26/32"])
    ehlo_keywords(h)
    forged = b"Received: from forged (forged [198.18.0.1]) by pc-4711; date\r\n"
    env = deliver(h, b"".join(hops) + forged + BOT_MSG)
    m = env.meta
    assert m["peer"] == ["203.0.113.5 0"] and m["helo"] == ["pc-4711"]
    assert m["rdns"] == ["bot.dsl.example"]
    assert m["relay"] == [f"{RELAY_IP} 40000 mx1.example derived"]


def test_derived_walk_stops_at_the_first_untrusted_hop() -> None:
    # 192.0.2.26 is not trusted here: it is the client, whatever is below.
    content = HOP_INNER + HOP_BOT + BOT_MSG
    client = relay.derive_client(content, lambda ip: ip == RELAY_IP)
    assert client is not None and client.addr == "192.0.2.26"
    # Only trusted hops down to the end: the innermost one read.
    client = relay.derive_client(HOP_AMAVIS + BOT_MSG, lambda ip: True)
    assert client is not None and client.addr == "127.0.0.1"
    # The walk is bounded in hops.
    many = HOP_AMAVIS * (relay.MAX_HOPS + 3) + HOP_BOT + BOT_MSG
    client = relay.derive_client(many, lambda ip: True)
    assert client is not None and client.addr == "127.0.0.1"


def test_trusted_networks_match_ipv4_mapped_peers() -> None:
    # A dual-stack listener sees an IPv4 client as ::ffff:a.b.c.d.
    cfg = config(relays=["192.0.2.0/24"])
    cfg = testing.config(cfg, smtp__proxy_protocol__trusted_networks=["198.51.100.0/24"])
    f = Harness(cfg).factory
    assert f.trusts_proxy("::ffff:198.51.100.4") and f.trusts_proxy("198.51.100.4")
    assert f.trusts_relay("::ffff:192.0.2.9") and not f.trusts_relay("::ffff:203.0.113.1")
    assert not f.trusts_proxy("not-an-ip") and not f.trusts_proxy("::ffff:192.0.2.9")
    assert f.trusts_hop("::1") and f.trusts_hop("::ffff:127.0.0.1") and f.trusts_hop("192.0.2.9")
    assert not f.trusts_hop("203.0.113.1")


def test_untrusted_peer_never_derives_from_received() -> None:
    h = session(peer="198.51.100.9")
    ehlo_keywords(h, b"bot")
    env = deliver(h, DERIVED_CASES[0][0] + BOT_MSG)
    assert env.meta["peer"] == ["198.51.100.9 40000"] and "relay" not in env.meta


GARBAGE = [
    b"",
    b"Subject: no received at all\r\n\r\nReceived: from x ([203.0.113.1]) in the body\r\n",
    b"Received: by mx1.example (Postfix, from userid 0) id 1; date\r\n\r\n",
    b"Received: from localhost (localhost) by x; date\r\n\r\n",
    b"Received: from x (y [300.1.2.3]) by z; date\r\n\r\n",
    b"Received: from x (y [203.0.113.1\r\n\r\n",
    b"Received: (qmail 10681 invoked by uid 404); 14 Nov 2003 08:05:52 -0000\r\n\r\n",
    b"Received: from (((((((((((\r\n\r\n",
    b"Received:\r\n\r\n",
    b"\xff\xfe\x00 binary junk\r\nReceived: from a ([zz]) by b\r\n\r\n",
]


@pytest.mark.parametrize("content", GARBAGE)
def test_unparseable_received_keeps_the_relay_and_says_so(content: bytes) -> None:
    assert relay.derive_client(content) is None
    h = session()
    ehlo_keywords(h)
    env = deliver(h, content + b"\r\nbody\r\n")
    assert env.meta["peer"] == [f"{RELAY_IP} 40000"]
    assert env.meta["relay"] == [f"{RELAY_IP} 40000 mx1.example unknown"]


def test_received_search_is_bounded() -> None:
    # Past the scan limit, a Received field is not looked for.
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 100) for i in range(200))
    assert len(filler) > relay.MAX_HEADER_SCAN
    assert relay.derive_client(filler + DERIVED_CASES[0][0] + b"\r\n") is None
    # A huge folded field is cut at MAX_FIELD, the client still read from its start.
    long = DERIVED_CASES[0][0].rstrip(b"\r\n") + b"".join(b"\r\n\t(c%d)" % i for i in range(5000))
    value = relay.top_received(long + b"\r\n\r\n")
    assert value is not None and len(value) <= relay.MAX_FIELD
    assert relay.derive_client(long + b"\r\n\r\n") is not None


def test_received_parse_is_linear_on_hostile_input() -> None:
    # Deep nesting, many brackets, many "by"-likes: no backtracking blow-up.
    hostile = [
        b"Received: from " + b"(" * 2000 + b"[" * 2000 + b"\r\n\r\n",
        b"Received: from a " + b"([1.2.3.4 " * 300 + b"\r\n\r\n",
        b"Received: from a " + b"bby " * 500 + b"\r\n\r\n",
        b"Received: from a (" + b"helo=" * 400 + b")\r\n\r\n",
    ]
    for h in hostile:
        relay.derive_client(h)
    # Each shape at N and 4N repeats: linear costs ~4x, quadratic ~16x.
    shapes = [
        (b"Received: from ", b"(" + b"[", b""),
        (b"Received: from a ", b"([1.2.3.4 ", b""),
        (b"Received: from a ", b"bby ", b""),
        (b"Received: from a (", b"helo=", b")"),
        (b"Received: from a (", b"(b [1.2.3.4]) ", b")"),
    ]

    def cost(prefix: bytes, unit: bytes, suffix: bytes, n: int) -> float:
        content = prefix + unit * n + suffix + b"\r\n\r\n"
        best = float("inf")
        for _ in range(3):  # the best of three: the machine is shared
            start = time.process_time()
            for _ in range(20):
                relay.parse_received(content[9:].decode("latin-1"))
            best = min(best, time.process_time() - start)
        return best

    for prefix, unit, suffix in shapes:
        small = cost(prefix, unit, suffix, 150)
        large = cost(prefix, unit, suffix, 600)
        assert large < 8 * small + 0.005, (unit, small, large)


# -- properties ---------------------------------------------------------------

_ATTR = st.sampled_from([*relay.XFORWARD_ATTRS, "LOGIN", "BOGUS", "name", "Addr"])
_WORD = st.binary(max_size=40).filter(lambda b: b"\n" not in b)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_ATTR, _WORD), max_size=6), st.binary(max_size=60))
def test_arbitrary_xforward_never_crashes_or_forges_a_field(
    pairs: list[tuple[str, bytes]], junk: bytes
) -> None:
    h = session()
    ehlo_keywords(h)
    arg = b" ".join(n.encode() + b"=" + v for n, v in pairs) + junk.replace(b"\n", b"")
    h.send(b"XFORWARD " + arg + b"\r\n")
    code = h.codes()
    assert code and code[0] in (250, 501)
    env = deliver(h)
    block = env.header_block()
    # Raw values may hold CR and LF (evidence); the block shows them escaped.
    for values in env.meta.values():
        for v in values:
            if "\n" in v or "\r" in v:
                assert escape_value(v).encode("utf-8", "surrogateescape") in block
    assert block.endswith(b"\r\n")
    names = []
    for line in block.split(b"\n")[:-1]:
        if line.startswith(b"\t"):
            continue  # the Received line's folds
        names.append(line.partition(b":")[0].decode())
    assert set(names) <= {*META_FIELDS.values(), "Received"}
    assert names.count("X-Spamtrap-Peer") == 1 and names.count("X-Spamtrap-Relay") == 1
    assert names.count("Received") == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_received_lines_never_crash(value: bytes) -> None:
    client = relay.derive_client(b"Received: from " + value + b"\r\n\r\n")
    if client is not None:
        assert client.addr is not None and relay.normalise_ip(client.addr) == client.addr
        for text in (client.name, client.helo):
            assert text is None or "\n" not in text


@given(st.binary(max_size=80))
def test_xtext_round_trip(raw: bytes) -> None:
    encoded = b"".join(
        bytes([c]) if 33 <= c <= 126 and c not in (0x2B, 0x3D) else b"+%02X" % c for c in raw
    )
    assert relay.xtext_decode(encoded) == raw
