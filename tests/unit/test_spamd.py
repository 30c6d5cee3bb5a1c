"""The spamd stage without a server: the SPAMC protocol over a
StringTransport, client limits and timeouts on a Clock, the error policy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import defer, protocol, task
from twisted.internet import reactor as _reactor
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from spamtrap import testing
from spamtrap.config import default_config
from spamtrap.filters import Discard, Keep
from spamtrap.filters.spamd import (
    MAX_REPLY,
    SpamcProtocol,
    SpamdClient,
    SpamdError,
    SpamdResult,
    SpamdStage,
    make,
    parse_reply,
)
from spamtrap.message import Envelope

reactor: Any = _reactor  # typed Any: mypy without the zope plugin


REPLY = (
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 37\r\nSpam: False ; 1.5 / 5.0\r\n\r\n"
    b"ANY_BOUNCE_MESSAGE,BOUNCE_MESSAGE,X_Y\r\n"
)


def test_parse_reply() -> None:
    result = parse_reply(REPLY)
    assert result == SpamdResult(False, 1.5, 5.0, ["ANY_BOUNCE_MESSAGE", "BOUNCE_MESSAGE", "X_Y"])
    spam = parse_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 15.2 / 5.0\r\n\r\nA,B")
    assert (spam.spam, spam.score, spam.symbols) == (True, 15.2, ["A", "B"])


@pytest.mark.parametrize(
    "reply",
    [
        b"SPAMD/1.0 76 Bad header line: x\r\n\r\n",  # an error status
        b"HTTP/1.1 200 OK\r\n\r\nA",  # not spamd
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 10\r\n\r\nA,B",  # cut short
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: x\r\n\r\nA,B",  # a bad length
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 3\r\n",  # no end of header
        b"",
    ],
)
def test_parse_reply_rejects(reply: bytes) -> None:
    with pytest.raises(SpamdError):
        parse_reply(reply)


def connected(data: bytes) -> tuple[SpamcProtocol, StringTransport, list[Any]]:
    proto = SpamcProtocol(data)
    transport = StringTransport()
    proto.makeConnection(transport)
    results: list[Any] = []
    proto.finished.addBoth(results.append)
    return proto, transport, results


def test_protocol_sends_symbols_request_with_content_length() -> None:
    _, transport, _ = connected(b"Subject: x\r\n\r\nbody\r\n")
    assert transport.value() == (
        b"SYMBOLS SPAMC/1.5\r\nContent-length: 20\r\n\r\nSubject: x\r\n\r\nbody\r\n"
    )


def test_protocol_completes_on_content_length_in_pieces() -> None:
    proto, transport, results = connected(b"x")
    for i in range(len(REPLY)):  # one byte at a time
        assert not results
        proto.dataReceived(REPLY[i : i + 1])
        if results:
            break
    assert results[0].symbols[0] == "ANY_BOUNCE_MESSAGE"
    assert transport.disconnecting  # we close once the reply is complete


def test_protocol_without_length_completes_when_spamd_closes() -> None:
    proto, _, results = connected(b"x")
    proto.dataReceived(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 0.0 / 5.0\r\n\r\nA,B")
    assert not results
    proto.connectionLost(protocol.connectionDone)
    assert results[0].symbols == ["A", "B"]


def test_protocol_fails_on_early_close_and_on_a_huge_reply() -> None:
    proto, _, results = connected(b"x")
    proto.dataReceived(b"SPAMD/1.1 0 EX_OK\r\n")
    proto.connectionLost(protocol.connectionDone)
    assert isinstance(results[0].value, SpamdError)

    proto, transport, results = connected(b"x")
    proto.dataReceived(b"SPAMD/1.1 0 EX_OK\r\n" + b"X" * MAX_REPLY)
    assert isinstance(results[0].value, SpamdError)
    assert transport.disconnecting


class FakeEndpoint:
    """Connects every protocol to a StringTransport, at once."""

    def __init__(self) -> None:
        self.connections: list[tuple[SpamcProtocol, StringTransport]] = []

    def connect(self, factory: protocol.Factory) -> defer.Deferred[Any]:
        proto = factory.buildProtocol(None)
        assert isinstance(proto, SpamcProtocol)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.connections.append((proto, transport))
        return defer.succeed(proto)


def test_client_bounds_concurrency() -> None:
    endpoint, clock = FakeEndpoint(), task.Clock()
    client = SpamdClient(endpoint, clock, timeout=30, max_concurrency=2)
    results: list[Any] = []
    for i in range(3):
        client.symbols(b"msg %d" % i).addBoth(results.append)
    assert len(endpoint.connections) == 2  # the third waits for a slot
    endpoint.connections[0][0].dataReceived(REPLY)
    assert len(results) == 1 and isinstance(results[0], SpamdResult)
    assert len(endpoint.connections) == 3
    assert endpoint.connections[2][1].value().endswith(b"msg 2")


def test_client_times_out_on_the_clock_and_drops_the_connection() -> None:
    endpoint, clock = FakeEndpoint(), task.Clock()
    client = SpamdClient(endpoint, clock, timeout=30, max_concurrency=1)
    results: list[Any] = []
    client.symbols(b"a").addBoth(results.append)
    clock.advance(10)
    client.symbols(b"b").addBoth(results.append)  # waits for the slot
    clock.advance(19)
    assert not results
    clock.advance(1)
    assert len(results) == 1 and isinstance(results[0].value, defer.TimeoutError)
    assert endpoint.connections[0][1].disconnecting
    # The slot went to the waiting request, whose time started when it asked.
    assert len(endpoint.connections) == 2
    clock.advance(10)
    assert isinstance(results[1].value, defer.TimeoutError)
    assert endpoint.connections[1][1].disconnecting
    # The client is usable afterwards.
    client.symbols(b"c").addBoth(results.append)
    endpoint.connections[2][0].dataReceived(REPLY)
    assert isinstance(results[2], SpamdResult)


def test_client_timeout_counts_the_wait_for_a_slot() -> None:
    endpoint, clock = FakeEndpoint(), task.Clock()
    client = SpamdClient(endpoint, clock, timeout=30, max_concurrency=1)
    results: list[Any] = []
    client.symbols(b"a")  # holds the only slot, and times out at 30 s
    clock.advance(29)
    client.symbols(b"b").addBoth(results.append)
    clock.advance(1)  # "a" times out; "b" gets the slot and connects
    assert len(endpoint.connections) == 2
    clock.advance(29)
    assert isinstance(results[0].value, defer.TimeoutError)


@pytest.mark.parametrize(
    "symbol",
    [
        "ANY_BOUNCE_MESSAGE",
        "BOUNCE_MESSAGE",
        "CRBOUNCE_MESSAGE",
        "VBOUNCE_MESSAGE",
        "OOOBOUNCE_MESSAGE",
    ],
)
def test_stage_discards_on_bounce_symbols(symbol: str) -> None:
    stage = SpamdStage(lambda data: SpamdResult(False, 0, 5, ["X", symbol]), "keep", task.Clock())
    assert stage(env()) == Discard("spamd:ANY_BOUNCE_MESSAGE")


def test_stage_keeps_other_mail_and_skips_huge_mail() -> None:
    asked: list[bytes] = []

    def ask(data: bytes) -> SpamdResult:
        asked.append(data)
        return SpamdResult(True, 20, 5, ["BAYES_99", "HTML_MESSAGE"])

    stage = SpamdStage(ask, "keep", task.Clock())
    assert stage(env()) is None
    assert stage(env(b"x" * (600 * 1024))) is None
    assert len(asked) == 1  # the big one was not sent, as spamc would not


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "spamtrap.filters.spamd":
            events.append(event)

    globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
    yield events
    globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("on_error", "verdict"), [("keep", Keep("spamd-error")), ("discard", Discard("spamd-error"))]
)
def test_stage_errors_follow_policy_counted_and_rate_limited(
    on_error: str, verdict: Discard | None, log_events: list[dict[str, Any]]
) -> None:
    def broken(data: bytes) -> SpamdResult:
        raise ConnectionRefusedError("spamd is down")

    clock = task.Clock()
    clock.advance(1000)
    stage = SpamdStage(broken, on_error, clock, "127.0.0.1:783")
    for _ in range(5):
        assert stage(env()) == verdict
    assert stage.errors == 5
    assert len(log_events) == 1  # once a minute
    assert log_events[0]["msg_id"] == "m1"
    clock.advance(61)
    stage(env())
    assert stage.errors == 6
    assert len(log_events) == 2 and log_events[1]["unlogged"] == 4


def test_make_follows_the_config() -> None:
    cfg = default_config()
    assert make(cfg, reactor) is None
    cfg = testing.config(cfg, filters__spamd__enabled=True, filters__spamd__on_error="discard")
    stage = make(cfg, reactor)
    assert isinstance(stage, SpamdStage) and stage.on_error == "discard"


def env(data: bytes = b"Subject: hi\r\n\r\nhi\r\n") -> Envelope:
    return Envelope("m1", 0.0, "", ["trap@trap.example"], data)
