"""``type: forward``: its keys, and its SMTP client driven reply by reply
(a MemoryReactorClock and a StringTransport: no sockets, no real time).

The real relay (a private Postfix) and a garbage server on loopback are in
tests/integration/test_output_forward.py.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure

from spamtrap.config import ConfigError, ConfigIssue, parse_config
from spamtrap.config.schema import RelayConfig, SetConfig
from spamtrap.message import Envelope
from spamtrap.outputs import settings_class
from spamtrap.outputs.base import (
    OutputContext,
    OutputFailure,
    OutputItem,
    PermanentFailure,
    TemporaryFailure,
)
from spamtrap.outputs.forward import ForwardOutput, ForwardRelay, Settings, build
from spamtrap.smtp_client import QUIT_GRACE, RelayConfigError
from tests.support.fake_relay import FakeRelay

HEAD = "traps: {catch_all: true}\nsets: {all: {}, shared: {redact_trap_addresses: true}}\n"
TOP_RELAY = RelayConfig(host="127.0.0.1", port=2525, sender="trap@trap.test")
SETS = {
    "all": SetConfig(name="all"),
    "shared": SetConfig(name="shared", redact_trap_addresses=True),
}
DATA = b"From: bot@spam.example\r\nSubject: pills\r\n\r\n.leading dot\r\nbody\r\n"


# -- the keys ---------------------------------------------------------------------


def forward(text: str) -> Settings:
    cfg = parse_config(HEAD + "outputs:\n  partners:\n    type: forward\n    sets: [all]\n" + text)
    (out,) = cfg.outputs
    assert isinstance(out, Settings)
    return out


def issues(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as e:
        forward(text)
    return e.value.errors


def test_the_type_names_this_module_and_the_keys_have_defaults() -> None:
    assert settings_class("forward") is Settings
    s = forward("    to: abuse@partner.test\n")
    assert s.to == ["abuse@partner.test"]
    assert (s.format, s.relay, s.sender, s.subject_prefix) == ("attach", None, None, "spamtrap")
    assert (s.timeout, s.max_original) == (120.0, 1 << 20)


def test_every_key_is_read() -> None:
    s = forward(
        "    to: [a@partner.test, b@partner.test]\n"
        "    format: arf\n"
        "    relay: {host: smtp.partner.test, port: 587, starttls: true,"
        " username: u, password: p}\n"
        "    sender: reports@trap.test\n"
        "    subject_prefix: '[trap]'\n"
        "    timeout: 30s\n"
        "    max_original: 256KiB\n"
        "    rate: 1\n"
    )
    assert s.to == ["a@partner.test", "b@partner.test"]
    assert s.relay == ForwardRelay(
        host="smtp.partner.test", port=587, starttls=True, username="u", password="p"
    )
    assert (s.format, s.sender, s.subject_prefix) == ("arf", "reports@trap.test", "[trap]")
    assert (s.timeout, s.max_original, s.rate) == (30.0, 256 * 1024, 1.0)


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("    format: arf\n", "outputs.partners", "missing required key 'to'"),
        ("    to: []\n", "outputs.partners.to", "must not be empty"),
        ("    to: [nobody]\n", "outputs.partners.to[0]", "not an address: 'nobody'"),
        ("    to: [\u00e9@partner.test]\n", "outputs.partners.to[0]", "not an ASCII address"),
        ("    to: [a@p.test, A@p.test]\n", "outputs.partners.to", "listed twice"),
        ("    to: a@p.test\n    format: mbox\n", "outputs.partners.format", "unknown value"),
        ("    to: a@p.test\n    fromat: arf\n", "outputs.partners.fromat", "did you mean 'format'"),
        ("    to: a@p.test\n    relay: {port: 25}\n", "outputs.partners.relay", "'host'"),
        ("    to: a@p.test\n    relay: {host: 'a b'}\n", "outputs.partners.relay.host", "not a"),
        ("    to: a@p.test\n    relay: {host: h.test, sender: x@y.z}\n", None, "unknown key"),
        ("    to: a@p.test\n    sender: nobody\n", "outputs.partners.sender", "not an address"),
        ('    to: a@p.test\n    subject_prefix: "a\\nb"\n', None, "one line"),
        ("    to: a@p.test\n    timeout: 0\n", "outputs.partners.timeout", ""),
    ],
)
def test_mistakes_are_errors_at_their_line(text: str, path: str | None, message: str) -> None:
    (issue,) = issues(text)
    assert message in issue.message
    if path is not None:
        assert issue.path == path
    # Each snippet's mistake is on its last line; a missing key is reported
    # where the output's mapping starts (its first key).
    last = HEAD.count("\n") + 4 + text.count("\n")
    assert issue.line == (HEAD.count("\n") + 3 if "missing" in message else last)


def test_credentials_in_plaintext_to_a_remote_relay_are_refused_at_their_line() -> None:
    (issue,) = issues("    to: a@p.test\n    relay: {host: mx.p.test, username: u, password: p}\n")
    assert issue.path == "outputs.partners.relay"
    assert "refusing to send credentials in plaintext to mx.p.test:25" in issue.message
    assert issue.line == HEAD.count("\n") + 6
    (issue,) = issues("    to: a@p.test\n    relay: {host: mx.p.test, username: u}\n")
    assert "both username and password" in issue.message
    # On loopback nobody can listen in.
    s = forward("    to: a@p.test\n    relay: {host: 127.0.0.1, username: u, password: p}\n")
    assert s.relay is not None and s.relay.username == "u"


# -- the client ---------------------------------------------------------------------


class Relay(FakeRelay):
    """The relay of the output's last connection attempt."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.host, self.port, factory, self.timeout, _ = reactor.tcpClients[-1]
        super().__init__(factory, reactor.connectors[-1])

    def session(
        self, ehlo: bytes = b"250-mx.partner.test\r\n250-8BITMIME\r\n250 SIZE\r\n"
    ) -> bytes:
        """Greeting to DATA accepted for every recipient; returns the data sent."""
        assert self.say(b"220 mx.partner.test ESMTP\r\n") == b"EHLO trap.test\r\n"
        mail = self.say(ehlo)
        assert mail.startswith(b"MAIL FROM:<trap@trap.test>")
        rcpts = b""
        reply = self.say(b"250 ok\r\n")
        while reply.startswith(b"RCPT"):
            rcpts += reply
            reply = self.say(b"250 ok\r\n")
        assert reply == b"DATA\r\n"
        self.mail_from, self.rcpts = mail, rcpts
        return self.say(b"354 go ahead\r\n")


def context(reactor: Any, relay: RelayConfig = TOP_RELAY) -> OutputContext:
    return OutputContext(
        reactor=reactor,
        node="n1",
        data_dir="/nonexistent",
        relay=relay,
        hostname="trap.test",
        sets=SETS,
    )


def output(reactor: Any, **keys: Any) -> ForwardOutput:
    settings = Settings(
        name="partners",
        type="forward",
        sets=["all"],
        to=keys.pop("to", ["abuse@partner.test", "spam@other.test"]),
        **keys,
    )
    return in_step(build("partners", settings, context(reactor)))


def in_step(out: ForwardOutput) -> ForwardOutput:
    """Mails made at once, in the test's thread (the reactor double has
    no threads)."""
    out.render = defer.maybeDeferred
    return out


def item(data: bytes = DATA, set_name: str = "all") -> OutputItem:
    meta = {"id": ["18c.x.n1"], "peer": ["203.0.113.9 1"], "rcpt": ["<v@trap.example>"]}
    env = Envelope(
        "18c.x.n1",
        1000.0,
        "bot@spam.example",
        ["v@trap.example"],
        data,
        meta=meta,
        received=["from b ([203.0.113.9])", "by trap.test", "for <v@trap.example>; x"],
    )
    return OutputItem(env, set_name)


def outcome(d: Any) -> Any:
    got: list[Any] = []
    d.addBoth(got.append)
    return got


def unstuffed(data: bytes) -> bytes:
    assert data.endswith(b"\r\n.\r\n")
    lines = data[: -len(b".\r\n")].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@pytest.mark.parametrize("fmt", ["attach", "resend", "arf"])
def test_a_send_goes_to_every_partner_through_the_top_level_relay(fmt: str) -> None:
    reactor = MemoryReactorClock()
    out = output(reactor, format=fmt)
    it = item()
    got = outcome(out.send(it))
    relay = Relay(reactor)
    assert (relay.host, relay.port, relay.timeout) == ("127.0.0.1", 2525, 30.0)
    data = relay.session()
    assert relay.rcpts == b"RCPT TO:<abuse@partner.test>\r\nRCPT TO:<spam@other.test>\r\n"
    assert relay.say(b"250 queued as X\r\n") == b"RSET\r\n"
    assert got == [None]
    # The data is the format's mail, dot-stuffed, ending with CRLF.CRLF.
    assert unstuffed(data) == out.mail(it, reactor.seconds(), eight_bit=True)
    assert b"\r\n..leading dot\r\n" in data
    msg = email.message_from_bytes(unstuffed(data), policy=email.policy.compat32)
    assert msg["X-Spamtrap-Id"] == "18c.x.n1"
    assert (msg.get_param("report-type") == "feedback-report") == (fmt == "arf")


def test_8bit_mail_says_so_where_the_relay_offers_8bitmime_and_is_7bit_elsewhere() -> None:
    data = "Subject: caf\u00e9\r\n\r\n\u00e9t\u00e9\r\n".encode()
    reactor = MemoryReactorClock()
    out = output(reactor)
    outcome(out.send(item(data)))
    relay = Relay(reactor)
    sent = relay.session()
    assert relay.mail_from == b"MAIL FROM:<trap@trap.test> BODY=8BITMIME\r\n"
    assert not sent.isascii()
    outcome(out.send(item(data)))
    relay = Relay(reactor)
    sent = relay.session(ehlo=b"250-mx.partner.test\r\n250 SIZE\r\n")
    assert relay.mail_from == b"MAIL FROM:<trap@trap.test>\r\n"
    assert sent.isascii()  # the message went in base64
    # A 7-bit message says nothing, offered or not.
    outcome(out.send(item()))
    relay = Relay(reactor)
    relay.session()
    assert relay.mail_from == b"MAIL FROM:<trap@trap.test>\r\n"


def test_dots_are_stuffed_across_the_client_s_16k_chunks() -> None:
    # Twisted stuffs dots within each 16 KiB chunk only; a line starting at a
    # chunk's first byte must be stuffed too. Put one at every offset around it.
    reactor = MemoryReactorClock()
    out = output(reactor, format="resend")
    head = out.mail(item(b""), reactor.seconds(), True)
    for shift in range(-3, 4):
        pad = 16384 - len(head) - 2 + shift
        data = b"x" * pad + b"\r\n.dot\r\n"
        it = item(data)
        outcome(out.send(it))
        sent = Relay(reactor).session()
        assert unstuffed(sent) == out.mail(it, reactor.seconds(), True)
        assert b"\r\n.dot\r\n" not in sent


def test_line_ends_go_out_as_crlf_only() -> None:
    reactor = MemoryReactorClock()
    out = output(reactor, format="resend")
    outcome(out.send(item(b"Subject: x\n\nlf\nbare\rcr\r\n")))
    sent = Relay(reactor).session()
    assert b"\n" not in sent.replace(b"\r\n", b"") and b"\r" not in sent.replace(b"\r\n", b"")
    assert sent.endswith(b"\r\nlf\r\nbare\r\ncr\r\n.\r\n")


def test_partners_some_of_which_refuse_are_sent_and_logged() -> None:
    reactor = MemoryReactorClock()
    out = output(reactor)
    got = outcome(out.send(item()))
    relay = Relay(reactor)
    relay.say(b"220 hi\r\n")
    relay.say(b"250 mx\r\n")
    assert relay.say(b"250 ok\r\n") == b"RCPT TO:<abuse@partner.test>\r\n"
    assert relay.say(b"550 5.1.1 no such user\r\n") == b"RCPT TO:<spam@other.test>\r\n"
    assert relay.say(b"250 ok\r\n") == b"DATA\r\n"
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        relay.say(b"354 go\r\n")
        relay.say(b"250 queued\r\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert got == [None]  # a retry would send the one who took it a second copy
    (event,) = [e for e in events if e.get("refused")]
    assert "abuse@partner.test: 550 5.1.1 no such user" in event["refused"]


def fails(got: list[Any], cls: type, reason: str) -> OutputFailure:
    (failure,) = got
    assert isinstance(failure, Failure), failure
    assert type(failure.value) is cls, failure.value
    assert failure.value.reason == reason, failure.value
    return failure.value


def test_a_5xx_to_the_message_is_permanent() -> None:
    for step in range(3):  # MAIL, every RCPT, the end of DATA
        reactor = MemoryReactorClock()
        got = outcome(output(reactor, to=["a@partner.test"]).send(item()))
        relay = Relay(reactor)
        relay.say(b"220 hi\r\n")
        relay.say(b"250 mx\r\n")
        replies = [b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"]
        replies[min(step, 2)] = b"554 5.7.1 rejected as spam\r\n"
        if step == 2:
            replies.append(b"554 5.7.1 rejected as spam\r\n")
        for reply in replies:
            relay.say(reply)
            if got:
                break
        failure = fails(got, PermanentFailure, "5xx")
        assert "554 5.7.1 rejected as spam" in failure.detail


def test_4xx_is_temporary_and_so_is_a_refused_greeting() -> None:
    reactor = MemoryReactorClock()
    got = outcome(output(reactor).send(item()))
    relay = Relay(reactor)
    relay.say(b"220 hi\r\n")
    relay.say(b"250 mx\r\n")
    relay.say(b"451 4.3.0 try later\r\n")
    fails(got, TemporaryFailure, "4xx")
    # A relay that will not talk to us at all: the relay's trouble, not the mail's.
    for greeting in (b"554 no service\r\n", b"421 busy\r\n"):
        got = outcome(output(reactor).send(item()))
        Relay(reactor).say(greeting)
        fails(got, TemporaryFailure, "greeting")


def test_a_refused_helo_fails_once_instead_of_looping() -> None:
    reactor = MemoryReactorClock()
    got = outcome(output(reactor).send(item()))
    relay = Relay(reactor)
    relay.say(b"220 hi\r\n")
    assert relay.say(b"502 no ehlo\r\n") == b"HELO trap.test\r\n"
    assert relay.say(b"550 no helo either\r\n") == b""
    fails(got, TemporaryFailure, "greeting")


@pytest.mark.parametrize(
    "garbage",
    [
        b"hello there\r\n",
        b"999 what\r\n",
        b"\xff\xfe\x00\r\n",
        b"x" * 20000,  # no line end at all: the line is over the limit
        b"220 hi\r\n250 mx\r\n354 not what was asked\r\n",
        b"220 hi\r\n777 no such code\r\n",
        b"220 hi\r\n250-mx\r\n250x\r\n",
        b"220 hi\r\n012 informational, Twisted would skip it\r\n",
    ],
)
def test_garbage_from_the_relay_is_a_temporary_failure(garbage: bytes) -> None:
    reactor = MemoryReactorClock()
    got = outcome(output(reactor).send(item()))
    relay = Relay(reactor)
    relay.say(garbage)
    fails(got, TemporaryFailure, "garbage")
    assert relay.transport.disconnecting


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        (error.ConnectionRefusedError(), "refused"),
        (error.TCPTimedOutError(), "timeout"),
        (error.DNSLookupError("no.such.host"), "dns"),
        (error.ConnectError("other"), "connect"),
        (SSL.Error([("SSL routines", "", "certificate verify failed")]), "tls"),
    ],
)
def test_a_connection_that_fails_is_temporary(reason: Exception, label: str) -> None:
    reactor = MemoryReactorClock()
    got = outcome(output(reactor).send(item()))
    host, port, factory, _, _ = reactor.tcpClients[-1]
    factory.clientConnectionFailed(reactor.connectors[-1], Failure(reason))
    fails(got, TemporaryFailure, label)


def test_a_connection_lost_mid_message_is_temporary() -> None:
    reactor = MemoryReactorClock()
    got = outcome(output(reactor).send(item()))
    relay = Relay(reactor)
    relay.session()
    relay.lose(error.ConnectionLost())
    fails(got, TemporaryFailure, "disconnected")


def test_a_silent_relay_times_out_and_is_let_go() -> None:
    reactor = MemoryReactorClock()
    got = outcome(output(reactor, timeout=45.0).send(item()))
    relay = Relay(reactor)
    assert relay.timeout == 30.0  # connecting may take at most 30 s of it
    relay.say(b"220 hi\r\n")
    reactor.advance(44.9)
    assert got == []
    reactor.advance(0.2)
    fails(got, TemporaryFailure, "timeout")
    assert relay.connector._disconnected
    # A timeout below 30 s bounds connecting too.
    outcome(output(reactor, timeout=5.0).send(item()))
    assert reactor.tcpClients[-1][3] == 5.0


def test_starttls_or_auth_the_relay_cannot_do_is_temporary() -> None:
    reactor = MemoryReactorClock()
    tls = RelayConfig(host="127.0.0.1", port=25, starttls=True, sender="trap@trap.test")
    out = in_step(ForwardOutput("p", output(reactor).settings, context(reactor, tls)))
    out.client_tls = lambda host: object()
    got = outcome(out.send(item()))
    relay = Relay(reactor)
    relay.say(b"220 hi\r\n")
    relay.say(b"250 mx\r\n")  # no STARTTLS offered
    fails(got, TemporaryFailure, "tls")
    auth = dataclasses.replace(TOP_RELAY, username="u", password="s3cret")
    out = in_step(ForwardOutput("p", output(reactor).settings, context(reactor, auth)))
    got = outcome(out.send(item()))
    relay = Relay(reactor)
    relay.say(b"220 hi\r\n")
    relay.say(b"250-mx\r\n250 AUTH PLAIN\r\n")
    relay.say(b"535 5.7.8 bad credentials\r\n")  # Twisted tries PLAIN's second form
    relay.say(b"535 5.7.8 bad credentials\r\n")
    failure = fails(got, TemporaryFailure, "auth")
    assert "s3cret" not in str(failure) and "czNjcmV0" not in str(failure)


def test_an_unsafe_top_level_relay_is_refused_when_built() -> None:
    unsafe = RelayConfig(host="mx.example", username="u", password="p")
    settings = output(MemoryReactorClock()).settings
    with pytest.raises(RelayConfigError, match="plaintext"):
        build("p", settings, context(MemoryReactorClock(), unsafe))


def test_a_top_level_sender_smtp_cannot_carry_is_refused_when_built() -> None:
    wide = dataclasses.replace(TOP_RELAY, sender="tr\u00e4p@trap.test")
    settings = output(MemoryReactorClock()).settings
    with pytest.raises(ValueError, match="not ASCII"):
        build("p", settings, context(MemoryReactorClock(), wide))
    fine = dataclasses.replace(settings, sender="trap@trap.test")
    assert build("p", fine, context(MemoryReactorClock(), wide)).report.sender == "trap@trap.test"


def test_the_output_s_own_relay_and_sender_replace_the_top_level_ones() -> None:
    reactor = MemoryReactorClock()
    own = ForwardRelay(host="10.0.0.1", port=587)
    out = output(reactor, relay=own, sender="reports@trap.test")
    assert out.describe() == (
        "forward (attach) to abuse@partner.test, spam@other.test via 10.0.0.1:587"
    )
    outcome(out.send(item()))
    relay = Relay(reactor)
    assert (relay.host, relay.port) == ("10.0.0.1", 587)
    relay.say(b"220 hi\r\n")
    assert relay.say(b"250 mx\r\n") == b"MAIL FROM:<reports@trap.test>\r\n"


def test_original_rcpt_to_only_for_a_set_that_does_not_redact() -> None:
    reactor = MemoryReactorClock()
    out = output(reactor, format="arf")
    shown = out.mail(item(set_name="all"), 0.0, True)
    assert b"Original-Rcpt-To: <v@trap.example>" in shown
    for redacting in ("shared", "unknown-set"):
        hidden = out.mail(item(set_name=redacting), 0.0, True)
        assert b"Original-Rcpt-To" not in hidden


def test_close_lets_go_of_sends_in_flight() -> None:
    reactor = MemoryReactorClock()
    out = output(reactor)
    got = outcome(out.send(item()))
    relay = Relay(reactor)
    relay.say(b"220 hi\r\n")
    assert out.close() is None
    assert relay.connector._disconnected
    fails(got, TemporaryFailure, "timeout")
    # The cancelled factory reports nothing more when the connection goes.
    relay.lose(error.ConnectionDone())
    assert len(got) == 1
    # A closed output sends nothing more (the runner stops before it closes).
    fails(outcome(out.send(item())), TemporaryFailure, "stopped")
    assert len(reactor.tcpClients) == 1


def test_a_retry_carries_the_same_ids() -> None:
    reactor = MemoryReactorClock()
    out = output(reactor)
    sent = []
    for _ in range(2):
        outcome(out.send(item()))
        sent.append(unstuffed(Relay(reactor).session()))
        reactor.advance(60)
    first, second = (email.message_from_bytes(s, policy=email.policy.compat32) for s in sent)
    assert first["X-Spamtrap-Id"] == second["X-Spamtrap-Id"] == "18c.x.n1"
    assert first["Message-ID"] == second["Message-ID"]
    assert first["Date"] != second["Date"]


def test_a_finished_session_is_cut_if_the_relay_never_answers_quit() -> None:
    reactor = MemoryReactorClock()
    got = outcome(output(reactor).send(item()))
    relay = Relay(reactor)
    relay.session()
    assert relay.say(b"250 queued\r\n") == b"RSET\r\n"
    assert got == [None] and not relay.transport.disconnecting
    reactor.advance(QUIT_GRACE)
    assert relay.transport.disconnecting
    # A relay that says goodbye in time leaves no timer behind.
    outcome(output(reactor).send(item()))
    relay = Relay(reactor)
    relay.session()
    relay.say(b"250 queued\r\n")
    assert relay.say(b"250 reset\r\n") == b"QUIT\r\n"
    relay.say(b"221 bye\r\n")
    relay.lose(error.ConnectionDone())
    assert reactor.getDelayedCalls() == []


REPLIES = st.sampled_from(
    [
        b"220 hi\r\n",
        b"250 ok\r\n",
        b"250-mx\r\n250-8BITMIME\r\n250 AUTH PLAIN\r\n",
        b"354 go\r\n",
        b"221 bye\r\n",
        b"334 \r\n",
        b"235 ok\r\n",
        b"421 closing\r\n",
        b"451 later\r\n",
        b"550 no\r\n",
        b"554 never\r\n",
        b"250",  # no line end yet
        b"\r\n",
        b"hello\r\n",
        b"2500 ok\r\n",
        b"\x00\xff\r\n",
        b"250-\r\n",
        b"x" * 17000,
        b"250-mx\r\n250-STARTTLS\r\n250 AUTH\r\n",
        b"250-mx\r\n250 AUTH LOGIN CRAM-MD5\r\n",
        b"334 not base64 !!\r\n",
        b"334 VXNlcm5hbWU6\r\n",
        b"220 2.0.0 ready for TLS\r\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    script=st.lists(REPLIES, max_size=12),
    end=st.sampled_from(["lost", "silent"]),
    with_auth=st.booleans(),
)
def test_no_relay_answer_raises_anything_but_an_output_failure(
    script: list[bytes], end: str, with_auth: bool
) -> None:
    reactor = MemoryReactorClock()
    # AUTH (loopback, so without STARTTLS) makes more of the client's states reachable.
    auth = dataclasses.replace(TOP_RELAY, username="u", password="p") if with_auth else TOP_RELAY
    out = in_step(
        ForwardOutput("p", output(reactor, timeout=30.0).settings, context(reactor, auth))
    )
    got = outcome(out.send(item("Subject: \u00e9\r\n\r\nx\r\n".encode())))
    relay = Relay(reactor)
    for reply in script:
        relay.say(reply)  # raises if the client does
    if end == "lost":
        relay.lose(error.ConnectionLost())
    reactor.advance(30.0 + QUIT_GRACE)
    assert len(got) == 1
    if isinstance(got[0], Failure):
        assert isinstance(got[0].value, OutputFailure), got[0]
    else:
        assert got[0] is None
    assert reactor.getDelayedCalls() == []
