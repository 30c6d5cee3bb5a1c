"""The notice mail through a relay that misbehaves, without a network: the
notice mailer shares the forward output's hardened SMTP client, so no
reply breaks it, every failure reads cleanly in the log, and what goes on
the wire is CRLF and dot-stuffed exactly once."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from spamtrap.notify import Notifier
from spamtrap.notify.mail import ATTEMPT_TIMEOUT, MailSender, describe_error, is_permanent
from spamtrap.smtp_client import QUIT_GRACE
from tests.support.fake_relay import FakeRelay
from tests.support.notify import (
    NotifyMetrics,
    as_published,
    config,
    mail_set,
    manifest,
    notify_errors,
)


class Connections:
    """smtp_connect for the Notifier: remembers each attempt's factory."""

    def __init__(self) -> None:
        self.factories: list[Any] = []

    def __call__(self, host: str, port: int, factory: Any) -> Any:
        self.factories.append(factory)
        return _Connector()

    def relay(self) -> FakeRelay:
        return FakeRelay(self.factories[-1])


class _Connector:
    def disconnect(self) -> None:
        pass


def notifier(clock: Clock, connect: Connections) -> tuple[Notifier, NotifyMetrics]:
    metrics = NotifyMetrics()
    cfg = config(mail_set("all", "list@lists.test"))
    return Notifier(cfg, metrics, Clock(), clock, smtp_connect=connect), metrics


def logged_errors() -> tuple[list[dict[str, Any]], Any]:
    events: list[dict[str, Any]] = []
    observer: Any = events.append  # an ILogObserver; zope interfaces do not type-check
    globalLogPublisher.addObserver(observer)
    return events, observer


def test_an_empty_ehlo_line_does_not_stop_the_notice() -> None:
    clock, connect = Clock(), Connections()
    n, metrics = notifier(clock, connect)
    n.published(as_published(manifest()))
    relay = connect.relay()
    assert relay.say(b"220 relay.test ESMTP\r\n") == b"EHLO node1.test\r\n"
    # Twisted's own client raises IndexError on the empty "250-" line.
    assert relay.say(b"250-relay.test\r\n250-\r\n250 SIZE\r\n").startswith(b"MAIL FROM:")
    assert relay.say(b"250 ok\r\n") == b"RCPT TO:<list@lists.test>\r\n"
    assert relay.say(b"250 ok\r\n") == b"DATA\r\n"
    data = relay.say(b"354 go ahead\r\n")
    assert data.endswith(b"\r\n.\r\n")
    assert b"\nSet: all\r\n" in data and b"\r\r\n" not in data  # CRLF, never doubled
    assert relay.say(b"250 queued\r\n") == b"RSET\r\n"
    assert metrics.count("mail", "sent") == 1
    assert relay.say(b"250 reset\r\n") == b"QUIT\r\n"
    relay.say(b"221 bye\r\n")
    relay.lose(error.ConnectionDone())
    assert clock.getDelayedCalls() == []  # no retry, no QUIT timer left behind


def test_a_refused_list_address_fails_for_good_and_is_logged_with_the_reply() -> None:
    clock, connect = Clock(), Connections()
    n, metrics = notifier(clock, connect)
    events, observer = logged_errors()
    try:
        n.published(as_published(manifest()))
        relay = connect.relay()
        relay.say(b"220 relay.test ESMTP\r\n")
        relay.say(b"250 relay.test\r\n")
        relay.say(b"250 ok\r\n")
        # Every recipient refused: Twisted's error then has a str reply,
        # which made the old describe_error raise AttributeError.
        relay.say(b"550 5.1.1 no such list\r\n")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert metrics.count("mail", "failed") == 1
    assert metrics.count("mail", "retry") == 0
    assert relay.transport.disconnecting  # hung up at once, no RSET dance
    (line,) = notify_errors(events)
    assert "No recipients accepted" in line and "no such list" in line
    assert clock.getDelayedCalls() == []


def test_a_relay_that_speaks_no_smtp_is_retried() -> None:
    clock, connect = Clock(), Connections()
    n, metrics = notifier(clock, connect)
    n.published(as_published(manifest()))
    relay = connect.relay()
    relay.say(b"HTTP/1.1 400 Bad Request\r\n")
    assert relay.transport.disconnecting
    assert metrics.count("mail", "retry") == 1
    assert len(connect.factories) == 1
    clock.advance(max(c.getTime() for c in clock.getDelayedCalls()))
    assert len(connect.factories) == 2  # the retry connects again


def test_the_notice_goes_on_the_wire_with_crlf_and_dot_stuffed_once() -> None:
    clock, connect = Clock(), Connections()
    cfg = config(mail_set("all", "list@lists.test"))
    sender = MailSender(cfg.relay, Clock(), clock, "node1.test", connect)
    got: list[Any] = []
    sender.send("list@lists.test", b"Subject: x\n\n.one\r\n..two\nthree\n").addBoth(got.append)
    relay = connect.relay()
    for reply in (b"220 hi\r\n", b"250 hi\r\n", b"250 ok\r\n", b"250 ok\r\n"):
        relay.say(reply)
    assert relay.say(b"354 go\r\n") == b"Subject: x\r\n\r\n..one\r\n...two\r\nthree\r\n.\r\n"
    relay.say(b"250 queued\r\n")
    assert got == [None]


REPLIES = st.sampled_from(
    [
        b"220 relay.test ESMTP\r\n",
        b"250 ok\r\n",
        b"250-relay.test\r\n250-8BITMIME\r\n250 SIZE\r\n",
        b"250-\r\n",
        b"354 go ahead\r\n",
        b"221 bye\r\n",
        b"334 \r\n",
        b"421 closing\r\n",
        b"451 later\r\n",
        b"550 no\r\n",
        b"250",  # no line end yet
        b"\r\n",
        b"hello\r\n",
        b"2500 ok\r\n",
        b"\x00\xff\r\n",
        b"x" * 17000,
        b"250-relay\r\n250-STARTTLS\r\n250 AUTH\r\n",
        b"334 not base64 !!\r\n",
    ]
)


@settings(max_examples=200, deadline=None)
@given(script=st.lists(REPLIES, max_size=12), lost=st.booleans(), auth=st.booleans())
def test_no_relay_answer_breaks_the_notice_mailer(
    script: list[bytes], lost: bool, auth: bool
) -> None:
    clock, connect = Clock(), Connections()
    # AUTH (loopback, so without STARTTLS) makes more of the client's states reachable.
    relay_auth = {"username": "u", "password": "p"} if auth else {}
    cfg = config(mail_set("all", "list@lists.test"), **relay_auth)
    sender = MailSender(cfg.relay, Clock(), clock, "node1.test", connect)
    got: list[Any] = []
    sender.send("list@lists.test", b"Subject: x\n\nbody\n").addBoth(got.append)
    relay = connect.relay()
    for reply in script:
        relay.say(reply)  # raises if the client does
    if lost:
        relay.lose(error.ConnectionLost())
    clock.advance(ATTEMPT_TIMEOUT + QUIT_GRACE)
    assert len(got) == 1
    if isinstance(got[0], Failure):
        assert isinstance(describe_error(got[0]), str)
        assert isinstance(is_permanent(got[0]), bool)
        assert "\0u\0p" not in describe_error(got[0])
    else:
        assert got[0] is None
    assert clock.getDelayedCalls() == []
