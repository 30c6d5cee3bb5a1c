"""The trap's ESMTP protocol, driven over a StringTransport with a Clock."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from spamtrap import testing
from spamtrap.config import SetConfig
from spamtrap.intake import proxy
from tests.support.smtp_helpers import Harness


def test_greeting_and_ehlo_extensions() -> None:
    h = Harness()
    assert h.replies() == [b"220 trap.test ESMTP spamtrap"]
    h.send(b"EHLO bot.example\r\n")
    lines = h.replies()
    assert lines[0] == b"250-trap.test"
    exts = {line[4:] for line in lines[1:]}
    assert b"PIPELINING" in exts and b"8BITMIME" in exts and b"ENHANCEDSTATUSCODES" in exts
    assert b"SIZE 8388608" in exts
    assert not any(e.startswith(b"AUTH") for e in exts)
    assert b"STARTTLS" not in exts  # no TLS-capable transport here


def test_ehlo_offers_starttls_on_a_tls_transport() -> None:
    h = Harness(tls=True)
    h.replies()
    h.send(b"EHLO x\r\n")
    assert b"250 STARTTLS" in h.replies()


def test_250_only_after_the_spool_has_it() -> None:
    h = Harness(auto_ack=False)
    h.replies()
    h.send(b"EHLO x\r\n")
    h.transaction(b"Subject: hi\r\n\r\nbody\r\n")
    assert h.codes() == [250, 250, 250, 354]
    assert len(h.submitted) == 1
    h.send(b"QUIT\r\n")  # pipelined behind the pending reply: must wait
    assert h.codes() == []
    h.pending[0].callback(None)
    assert h.codes() == [250, 221]
    assert h.metrics.messages_accepted._value.get() == 1


def test_spool_failure_answers_451_and_session_goes_on() -> None:
    h = Harness(auto_ack=False)
    h.replies()
    h.transaction(b"x\r\n")
    h.pending[0].errback(OSError("disk full"))
    assert h.codes() == [250, 250, 354, 451]
    h.send(b"NOOP\r\n")
    assert h.codes() == [250]


def test_message_bytes_are_exact() -> None:
    h = Harness()
    body = (
        b"From: a@b\r\nSubject: \xff\xfe 8-bit\r\n\r\n"
        b"From the start\r\n..leading dot\r\nbare\nLF\r\n\x00nul\r\n.\tdot-tab\r\nno end"
    )
    h.send(b"HELO x\r\nMAIL FROM:<s@x>\r\nRCPT TO:<v@trap.example>\r\nDATA\r\n")
    # dot-stuffed as a client would send it
    h.send(body.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n")
    env = h.submitted[0]
    assert env.data == body + b"\r\n"
    assert env.meta["size"] == [str(len(body) + 2)]


def test_empty_message() -> None:
    h = Harness()
    h.send(b"MAIL FROM:<>\r\nRCPT TO:<v@trap.example>\r\nDATA\r\n.\r\n")
    assert h.submitted[0].data == b""
    assert h.submitted[0].mail_from == ""


def test_overlong_line_in_data_stays_data() -> None:
    """Twisted's parent ran the rest of the body as commands after a long line."""
    h = Harness()
    h.replies()
    long_line = b"<html>" + b"A" * 1_000_000
    injected = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@elsewhere.example>\r\nDATA\r\nowned\r\n"
    h.transaction(long_line + b"\r\n" + injected)
    assert h.codes() == [250, 250, 354, 250]
    assert len(h.submitted) == 1
    assert h.submitted[0].data == long_line + b"\r\n" + injected


def test_too_big_gets_552_and_the_session_stays_in_step() -> None:
    cfg = testing.config(
        node="n",
        traps__domains=["trap.example"],
        smtp__max_message_size=1000,
        sets=[SetConfig(name="all")],
    )
    h = Harness(cfg)
    h.replies()
    h.send(b"MAIL FROM:<a@b> SIZE=5000\r\n")
    assert h.codes() == [552]
    h.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<v@trap.example>\r\nDATA\r\n")
    for _ in range(100):  # 100 KB in many reads: memory stays bounded
        h.send(b"x" * 998 + b"\r\n")
        assert len(h.proto._data) < 2000
    h.send(b".\r\n")
    assert h.codes() == [250, 250, 354, 552]
    h.transaction(b"small\r\n")
    assert h.codes() == [250, 250, 354, 250]
    assert [e.data for e in h.submitted] == [b"small\r\n"]


def test_input_without_line_end_is_refused_with_500_and_dropped() -> None:
    h = Harness()
    h.replies()
    for _ in range(100):  # 100 KB without a line end: memory stays bounded
        h.send(b"A" * 1000)
        assert len(h.proto._buf) < h.factory.buffer_cap
    assert h.codes() == [500]
    assert not h.transport.disconnecting
    h.send(b"AAAA\r\nNOOP\r\n")  # the rest of the long line is dropped, then on
    assert h.codes() == [250]


def test_non_ascii_verb_gets_500_and_session_goes_on() -> None:
    h = Harness()
    h.replies()
    h.send(b"\xff\xfeHELO x\r\nEH\xc3\xa9LO x\r\nNOOP\r\n")
    assert h.codes() == [500, 500, 250]


def test_starttls_discards_pipelined_commands() -> None:
    h = Harness(tls=True)
    h.replies()
    h.send(b"EHLO x\r\n")
    h.replies()
    h.send(b"STARTTLS\r\nMAIL FROM:<inject@x>\r\nRCPT TO:<v@trap.example>\r\n")
    assert h.codes() == [220]
    assert h.transport.tls_started_with is not None
    assert "starttls-injection" in h.proto.dialect.flags
    # state was reset: the injected MAIL did not open a transaction
    h.send(b"RCPT TO:<v@trap.example>\r\n")
    assert h.codes() == [503]


def test_pipelined_session_in_one_packet() -> None:
    h = Harness()
    h.replies()
    h.send(
        b"EHLO x\r\nMAIL FROM:<a@b> BODY=8BITMIME SIZE=20\r\nRCPT TO:<v@trap.example>\r\n"
        b"RCPT TO:<nobody@elsewhere.example>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n"
    )
    assert h.codes() == [250, 250, 250, 550, 354, 250, 221]
    env = h.submitted[0]
    assert env.meta["mail_from"] == ["<a@b> BODY=8BITMIME SIZE=20"]
    assert env.rcpts == ["v@trap.example"]
    assert "pipelining" in env.meta["dialect"][0]


def test_fifty_recipients_one_envelope() -> None:
    h = Harness()
    rcpts = tuple(b"u%d@trap.example" % i for i in range(50))
    h.transaction(b"x\r\n", rcpts)
    assert len(h.submitted) == 1
    assert len(h.submitted[0].rcpts) == 50
    assert len(h.submitted[0].meta["rcpt"]) == 50


def test_lenient_syntax_is_accepted_and_recorded() -> None:
    h = Harness()
    h.replies()
    h.send(b"helo [1.2.3.4]\nmail from: bot@spam.example\nrcpt to:v@trap.example\ndata\r\n")
    h.send(b"x\r\n.\r\n")
    assert h.codes() == [250, 250, 250, 354, 250]
    env = h.submitted[0]
    assert env.mail_from == "bot@spam.example"
    d = env.meta["dialect"][0]
    assert "helo:literal" in d and "mail:from:_," in d and "bare-lf" in d


def test_non_trap_recipient_is_refused_and_nothing_relays() -> None:
    h = Harness()
    h.replies()
    h.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@gmail.example>\r\nDATA\r\n")
    assert h.codes() == [250, 550, 554]
    assert h.submitted == []


def test_feed_address_carries_the_feed_id() -> None:
    from spamtrap.config import FeedConfig

    cfg = testing.config(
        node="n",
        feeds=[FeedConfig(id="donor1", address="donor1@feeds.trap.example")],
        sets=[SetConfig(name="all")],
    )
    h = Harness(cfg)
    h.transaction(b"x\r\n", (b"Donor1@Feeds.Trap.Example",))
    assert h.submitted[0].feed == "donor1"
    assert h.submitted[0].meta["feed"] == ["donor1"]


def test_command_timeout_and_session_cap() -> None:
    h = Harness()
    h.send(b"MAIL FROM:<a@b>\r\n")  # in a transaction: idle_before_mail is over
    h.replies()
    h.clock.advance(299)
    h.send(b"NOOP\r\n")
    h.clock.advance(299)
    assert not h.transport.disconnecting
    h.clock.advance(2)
    assert h.replies()[-1].startswith(b"421 4.4.2")
    assert h.transport.disconnecting

    h2 = Harness()
    h2.send(b"MAIL FROM:<a@b>\r\n")
    for _ in range(20):  # a slow loris that keeps talking
        h2.clock.advance(100)
        h2.send(b"NOOP\r\n")
    assert h2.transport.disconnecting
    assert h2.replies()[-1].startswith(b"421")


def test_data_timeout_is_longer_than_command_timeout() -> None:
    h = Harness()
    h.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<v@trap.example>\r\nDATA\r\n")
    h.clock.advance(400)
    assert not h.transport.disconnecting
    h.send(b"x\r\n.\r\n")
    assert len(h.submitted) == 1


def test_command_timeout_restarts_after_the_250() -> None:
    h = Harness()
    h.replies()
    h.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<v@trap.example>\r\nDATA\r\n")
    h.clock.advance(550)  # inside the data timeout
    h.send(b"x\r\n.\r\n")
    h.clock.advance(299)
    assert not h.transport.disconnecting
    h.clock.advance(2)  # 301 s of silence after the 250: the command timeout
    assert h.replies()[-1] == b"421 4.4.2 Timeout, closing connection"
    assert h.transport.disconnecting


def test_waiting_for_the_spool_is_no_idle_time_but_the_cap_holds() -> None:
    h = Harness(auto_ack=False)
    h.replies()
    h.transaction(b"x\r\n")
    h.clock.advance(1000)  # the spool is slow: not the client's fault
    assert not h.transport.disconnecting
    h.clock.advance(800)  # but the session cap (30 min) still applies
    assert h.replies()[-1] == b"421 4.4.2 Session too long"
    assert h.transport.disconnecting


def test_one_timer_serves_a_session() -> None:
    h = Harness()
    assert len(h.clock.getDelayedCalls()) == 1
    h.send(b"EHLO x\r\n")
    h.transaction(b"x\r\n")
    assert len(h.clock.getDelayedCalls()) == 1
    h.proto.connectionLost(None)
    assert h.clock.getDelayedCalls() == []


def test_input_is_paused_only_when_it_arrives_during_the_spool_wait() -> None:
    h = Harness(auto_ack=False)
    h.replies()
    h.transaction(b"x\r\n")
    assert h.transport.producerState == "producing"  # nothing to hold back yet
    h.send(b"NOOP\r\n")
    assert h.transport.producerState == "paused"
    assert h.codes() == [250, 250, 354]
    h.pending[0].callback(None)
    assert h.transport.producerState == "producing"
    assert h.codes() == [250, 250]


def test_ehlo_reply_follows_the_tls_state() -> None:
    h = Harness(tls=True)
    h.replies()
    h.send(b"EHLO x\r\n")
    assert b"250 STARTTLS" in h.replies()
    h.send(b"STARTTLS\r\n")
    assert h.codes() == [220]
    h.send(b"EHLO x\r\n")
    lines = h.replies()
    assert lines[0] == b"250-trap.test" and lines[-1] == b"250 ENHANCEDSTATUSCODES"
    assert not any(b"STARTTLS" in line for line in lines)
    # The factory's other sessions still get STARTTLS offered.
    from tests.support.smtp_helpers import TLSStringTransport

    p2 = h.factory.buildProtocol(None)
    p2.makeConnection(TLSStringTransport())
    p2.dataReceived(b"EHLO y\r\n")
    assert b"250 STARTTLS\r\n" in p2.transport.value()


def test_connection_limit_refuses_with_421() -> None:
    cfg = testing.config(
        node="n",
        traps__catch_all=True,
        smtp__max_connections_per_ip=1,
        sets=[SetConfig(name="all")],
    )
    h = Harness(cfg)
    p2 = h.factory.buildProtocol(None)
    from twisted.internet import address
    from twisted.internet.testing import StringTransport

    t2 = StringTransport(peerAddress=address.IPv4Address("TCP", "192.0.2.7", 1))
    p2.makeConnection(t2)
    assert t2.value().startswith(b"421")
    assert t2.disconnecting
    p2.connectionLost(None)
    h.proto.connectionLost(None)
    assert h.factory.per_ip == {}


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_protocol_from_trusted_network(version: int) -> None:
    cfg = testing.config(
        node="n",
        traps__catch_all=True,
        smtp__proxy_protocol__trusted_networks=["192.0.2.0/24"],
        sets=[SetConfig(name="all")],
    )
    h = Harness(cfg)
    assert h.replies() == []  # no greeting before the header
    build = proxy.build_v1 if version == 1 else proxy.build_v2
    h.send(build(("203.0.113.9", 5555), ("198.51.100.1", 25)) + b"EHLO x\r\n")
    assert h.codes() == [220, 250]
    h.transaction(b"x\r\n")
    env = h.submitted[0]
    assert env.meta["peer"] == ["203.0.113.9 5555"]
    assert env.meta["proxy"] == ["192.0.2.7 40000"]
    assert "[203.0.113.9]" in env.received_line


def test_proxy_header_from_untrusted_network_is_just_a_bad_command() -> None:
    h = Harness()
    h.replies()
    h.send(proxy.build_v1(("203.0.113.9", 5555), ("198.51.100.1", 25)))
    assert h.codes() == [500]
    h.transaction(b"x\r\n")
    assert h.submitted[0].meta["peer"] == ["192.0.2.7 40000"]


def test_bad_proxy_header_from_trusted_network_is_421() -> None:
    cfg = testing.config(
        node="n",
        traps__catch_all=True,
        smtp__proxy_protocol__trusted_networks=["192.0.2.7/32"],
        sets=[SetConfig(name="all")],
    )
    h = Harness(cfg)
    h.send(b"EHLO x\r\n")
    assert h.replies()[-1].startswith(b"421")


def test_early_talker_is_recorded_not_refused() -> None:
    cfg = testing.config(
        node="n",
        traps__catch_all=True,
        smtp__timeouts__greeting_delay=2,
        sets=[SetConfig(name="all")],
    )
    h = Harness(cfg)
    h.send(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<v@t>\r\nDATA\r\nx\r\n.\r\n")
    assert h.replies() == []
    h.clock.advance(2)
    assert h.codes() == [220, 250, 250, 250, 354, 250]
    assert "early-talk" in h.submitted[0].meta["dialect"][0]


def test_metadata_and_received_line() -> None:
    h = Harness()
    h.send(b"EHLO bot.example\r\n")
    h.clock.advance(0.5)
    h.transaction(b"x\r\n", (b"a@trap.example", b"b@trap.example"))
    env = h.submitted[0]
    m = env.meta
    assert m["helo"] == ["bot.example"]
    assert m["peer"] == ["192.0.2.7 40000"] and m["local"] == ["198.51.100.1 25"]
    assert m["domain"] == ["trap.example"]
    assert m["node"] == ["testnode"] and m["id"] == [env.msg_id]
    assert env.received_line.startswith("from bot.example (unknown [192.0.2.7])\r\n\tby trap.test")
    assert f"with ESMTP id {env.msg_id}" in env.received_line
    assert "for <a@trap.example>;" in env.received_line
    block = env.header_block()
    assert block.startswith(b"X-Spamtrap-Id: ")
    assert block.endswith(b"\r\n") and b"\r\nReceived: from bot.example" in block


def test_shutdown_closes_idle_sessions_and_finishes_busy_ones() -> None:
    h = Harness(auto_ack=False)
    h.replies()
    h.transaction(b"x\r\n")
    h.replies()
    done = h.factory.shutdown()
    assert not done.called
    h.pending[0].callback(None)
    lines = h.replies()
    assert lines[0].startswith(b"250 ") and lines[-1].startswith(b"421 ")
    h.proto.connectionLost(None)
    assert done.called


SESSION = (
    b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<v@trap.example>\r\nDATA\r\n"
    b"Subject: s\r\n\r\nline\r\n..dot\r\n\r\n.\r\nMAIL FROM:<c@d>\r\n"
    b"RCPT TO:<w@trap.example>\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n"
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=len(SESSION)), max_size=12))
def test_any_split_of_the_stream_gives_the_same_result(cuts: list[int]) -> None:
    h = Harness()
    points = sorted(set(cuts))
    prev = 0
    for p in [*points, len(SESSION)]:
        h.send(SESSION[prev:p])
        prev = p
    assert [e.data for e in h.submitted] == [
        b"Subject: s\r\n\r\nline\r\n.dot\r\n\r\n",
        b"second\r\n",
    ]
    assert h.codes() == [220, 250, 250, 250, 354, 250, 250, 250, 354, 250, 221]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_arbitrary_bytes_never_crash_the_session(chunks: list[bytes]) -> None:
    h = Harness()
    for c in chunks:
        h.send(c)  # must not raise
    for line in h.replies():
        assert line[:3].isdigit()


@given(st.binary(max_size=200))
def test_proxy_parser_raises_only_proxy_error(data: bytes) -> None:
    try:
        proxy.parse(data)
    except proxy.ProxyError:
        pass


@given(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
    st.sampled_from([proxy.build_v1, proxy.build_v2]),
)
def test_proxy_round_trip(src: tuple[str, int], dst: tuple[str, int], build: object) -> None:
    header = build(src, dst)  # type: ignore[operator]
    parsed = proxy.parse(header + b"EHLO")
    assert parsed is not None
    info, consumed = parsed
    assert consumed == len(header)
    assert info.source == src and info.destination == dst


def test_deferred_submit_does_not_break_pipelining() -> None:
    h = Harness(auto_ack=False)
    h.replies()
    h.send(
        b"MAIL FROM:<a@b>\r\nRCPT TO:<v@trap.example>\r\nDATA\r\nx\r\n.\r\n"
        b"MAIL FROM:<c@d>\r\nRCPT TO:<v@trap.example>\r\nDATA\r\ny\r\n.\r\n"
    )
    assert h.codes() == [250, 250, 354]
    h.pending[0].callback(None)
    assert h.codes() == [250, 250, 250, 354]
    h.pending[1].callback(None)
    assert h.codes() == [250]
    assert isinstance(h.pending[1], defer.Deferred)


class FakeResolver:
    """An IResolver double: no DNS query ever leaves the test."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.pending: list[defer.Deferred[object]] = []

    def lookupPointer(self, name: str, timeout: object = None) -> defer.Deferred[object]:
        from twisted.names import dns

        self.asked.append(name)
        d: defer.Deferred[object] = defer.Deferred()
        if name in self.answers:
            rr = dns.RRHeader(name=name, type=dns.PTR, payload=dns.Record_PTR(self.answers[name]))
            d.callback(([rr], [], []))
        else:
            self.pending.append(d)  # never answers: must not delay anything
        return d


def test_rdns_answer_lands_in_metadata_and_received_line() -> None:
    from spamtrap.intake.rdns import make_lookup

    resolver = FakeResolver({"7.2.0.192.in-addr.arpa": "bot7.dsl.example."})
    cfg = testing.config(
        node="n",
        traps__catch_all=True,
        smtp__rdns=True,
        sets=[SetConfig(name="all")],
    )
    h = Harness(cfg, resolve_ptr=make_lookup(resolver))
    h.send(b"HELO x\r\n")
    h.transaction(b"x\r\n")
    env = h.submitted[0]
    assert resolver.asked == ["7.2.0.192.in-addr.arpa"]
    assert env.meta["rdns"] == ["bot7.dsl.example"]
    assert "(bot7.dsl.example [192.0.2.7])" in env.received_line


def test_a_resolver_that_never_answers_delays_nothing() -> None:
    from spamtrap.intake.rdns import make_lookup

    resolver = FakeResolver({})
    cfg = testing.config(
        node="n",
        traps__catch_all=True,
        smtp__rdns=True,
        sets=[SetConfig(name="all")],
    )
    h = Harness(cfg, resolve_ptr=make_lookup(resolver))
    h.replies()
    h.transaction(b"x\r\n")
    assert h.codes() == [250, 250, 354, 250]
    assert "rdns" not in h.submitted[0].meta
    assert "(unknown [192.0.2.7])" in h.submitted[0].received_line
