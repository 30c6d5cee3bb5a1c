"""Pyzor's protocol for output ``type: pyzor``, without sockets: the request
it builds (against Pyzor's own client), the reply parser (with hypothesis),
what each reply code means, and the UDP client on a fake transport and a
task.Clock. The output itself: test_output_pyzor.py; a real pyzord:
tests/integration/test_output_pyzor.py.
"""

from __future__ import annotations

import email
import hashlib
import time
from typing import Any

import pytest
import pyzor
import pyzor.account
import pyzor.client
import pyzor.digest
import pyzor.message
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer

from spamtrap.outputs import _pyzor_wire as wire
from spamtrap.outputs.base import PermanentFailure, TemporaryFailure
from tests.support.pyzor_fakes import (
    KEY,
    NOW,
    SALT,
    SPAM,
    FakeReactor,
    FakeUDP,
    failure_of,
    reply,
    result_of,
)

# -- the request: what Pyzor's own client sends ------------------------------------


def pyzor_client_request(
    monkeypatch: pytest.MonkeyPatch, digest: str, thread: int, accounts: dict[Any, Any]
) -> bytes:
    """The datagram pyzor.client.Client.report sends, captured."""
    sent: list[bytes] = []

    class StopError(Exception):
        pass

    def capture(msg: Any, addr: Any) -> None:
        sent.append(msg.as_string().encode("utf8"))
        raise StopError

    monkeypatch.setattr(pyzor.client.Client, "_send", staticmethod(capture))
    monkeypatch.setattr(pyzor.client.time, "time", lambda: NOW)
    monkeypatch.setattr(pyzor.message.ThreadId, "generate", classmethod(lambda cls: cls(thread)))
    with pytest.raises(StopError):
        pyzor.client.Client(accounts).report(digest, ("127.0.0.1", 24441))
    return sent[0]


def test_request_is_what_pyzor_client_sends_anonymous(monkeypatch: pytest.MonkeyPatch) -> None:
    digest = wire.digest(SPAM)
    ours = wire.build_report(digest, 4242, wire.ANONYMOUS, int(NOW))
    assert ours == pyzor_client_request(monkeypatch, digest, 4242, {})
    msg = email.message_from_bytes(ours)
    assert msg["Op"] == "report" and msg["Op-Digest"] == digest
    assert (msg["Op-Spec"], msg["Thread"], msg["User"]) == ("20,3,60,3", "4242", "anonymous")


def test_request_is_what_pyzor_client_sends_signed(monkeypatch: pytest.MonkeyPatch) -> None:
    digest = wire.digest(SPAM)
    account = pyzor.account.Account("bob", SALT, KEY)
    theirs = pyzor_client_request(monkeypatch, digest, 1024, {("127.0.0.1", 24441): account})
    ours = wire.build_report(digest, 1024, wire.Account("bob", KEY), int(NOW))
    assert ours == theirs
    # pyzord's own check accepts it (and refuses another key).
    monkeypatch.setattr(pyzor.account.time, "time", lambda: NOW + 10)
    pyzor.account.verify_signature(email.message_from_bytes(ours), KEY)
    with pytest.raises(pyzor.SignatureError):
        pyzor.account.verify_signature(email.message_from_bytes(ours), "00" + KEY[2:])


def test_digest_is_pyzors_digest_of_the_parsed_message() -> None:
    expected = pyzor.digest.DataDigester(email.message_from_bytes(SPAM)).value
    assert wire.digest(SPAM) == expected
    # Line ends do not change it.
    assert wire.digest(SPAM.replace(b"\r\n", b"\n")) == expected


# -- the reply parser ------------------------------------------------------------------


def test_parse_reply_reads_pyzords_replies() -> None:
    assert wire.parse_reply(reply(5000)) == wire.Reply(5000, 200, "OK")
    r = wire.parse_reply(reply(1024, 401, "Unauthorized: Signature Error: Unknown user."))
    assert r is not None and (r.code, r.ok) == (401, False)
    assert r.diag.startswith("Unauthorized")


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x00\xff" * 50,
        b"Code: 200\nDiag: OK\nPV: 2.1\n\n",  # no Thread
        b"Code: 200\nPV: 2.1\nThread: 5000\n\n",  # no Diag
        b"Diag: OK\nPV: 2.1\nThread: 5000\n\n",  # no Code
        b"Code: 200\nDiag: OK\nThread: 5000\n\n",  # no PV
        reply("abc"),
        reply(5000, "two hundred"),
        reply(70000),
        reply(-3),
        reply(5000, 42),
        "Code: 200\nDiag: OK\nPV: 2.1\nThread: 5\u00e9000\n\n".encode("latin-1"),
        b"Code: \xff\xfe\nDiag: OK\nPV: 2.1\nThread: 5000\n\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_parse_reply_refuses_garbage(packet: bytes) -> None:
    assert wire.parse_reply(packet) is None


@given(st.binary(max_size=wire.MAX_PACKET))
def test_parse_reply_never_raises_on_bytes(packet: bytes) -> None:
    r = wire.parse_reply(packet)
    assert r is None or (100 <= r.code <= 999 and 0 <= r.thread < 65536)


_header_value = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)


@given(
    st.lists(
        st.tuples(st.sampled_from(["Code", "Diag", "PV", "Thread", "Count", "X"]), _header_value),
        max_size=8,
    )
)
def test_parse_reply_never_raises_on_header_soup(headers: list[tuple[str, str]]) -> None:
    packet = "".join(f"{k}: {v}\n" for k, v in headers).encode("utf-8") + b"\n"
    r = wire.parse_reply(packet)
    assert r is None or (100 <= r.code <= 999 and 0 <= r.thread < 65536)


@given(
    thread=st.integers(0, 65535),
    code=st.integers(100, 999),
    diag=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=60),
)
def test_parse_reply_round_trips_every_wellformed_reply(thread: int, code: int, diag: str) -> None:
    assert wire.parse_reply(reply(thread, code, diag)) == wire.Reply(thread, code, diag)


@pytest.mark.parametrize(
    ("code", "kind", "reason"),
    [
        (400, PermanentFailure, "bad-request"),
        (404, PermanentFailure, "rejected"),
        (501, PermanentFailure, "unsupported"),
        (505, PermanentFailure, "unsupported"),
        (401, TemporaryFailure, "unauthorized"),
        (403, TemporaryFailure, "forbidden"),
        (500, TemporaryFailure, "server-error"),
        (503, TemporaryFailure, "server-error"),
        (302, TemporaryFailure, "server-error"),
    ],
)
def test_outcome_of_each_code(code: int, kind: type[Exception], reason: str) -> None:
    with pytest.raises(kind) as e:
        wire.outcome(wire.Reply(1024, code, "why"))
    assert isinstance(e.value, TemporaryFailure | PermanentFailure)
    assert e.value.reason == reason and f"{code} why" in str(e.value)
    wire.outcome(wire.Reply(1024, 200, "OK"))  # no failure


# -- the UDP client on a fake transport ------------------------------------------------


def client(timeout: float = 5.0) -> tuple[FakeReactor, wire.PyzorClient, FakeUDP]:
    reactor = FakeReactor()
    c = wire.PyzorClient(reactor, "192.0.2.7", 24441, timeout)
    port = reactor.listenUDP(0, c)
    return reactor, c, port


def build_for(thread: int) -> bytes:
    return wire.build_report("ab" * 20, thread, wire.ANONYMOUS, int(NOW))


def test_client_connects_and_matches_replies_by_thread() -> None:
    reactor, c, port = client()
    assert port.peer == ("192.0.2.7", 24441)
    first, second = c.request(build_for), c.request(build_for)
    assert len(set(port.threads())) == 2 and c.in_flight == 2
    port.answer(index=1, diag="second")  # replies may come in any order
    assert result_of(second).diag == "second" and not first.called
    port.answer(index=0)
    assert result_of(first).ok and c.in_flight == 0
    reactor.advance(60)  # the timers were cancelled
    assert not reactor.getDelayedCalls()


def test_client_timeout_is_a_temporary_failure() -> None:
    reactor, c, port = client(timeout=2.0)
    d = c.request(build_for)
    reactor.advance(1.9)
    assert not d.called
    reactor.advance(0.2)
    e = failure_of(d)
    assert isinstance(e, TemporaryFailure) and e.reason == "timeout"
    port.answer()  # too late: a stray, ignored
    assert c.strays == 1


def test_client_ignores_garbage_and_says_so_at_the_timeout() -> None:
    reactor, c, port = client(timeout=1.0)
    d = c.request(build_for)
    for junk in (b"\xff" * 10, b"Code: 200\n\n", reply("x"), b""):
        c.datagramReceived(junk, port.peer)
    assert c.garbage == 4 and not d.called
    reactor.advance(1.0)
    e = failure_of(d)
    assert isinstance(e, TemporaryFailure) and e.reason == "garbage"


def test_client_takes_the_reply_after_garbage() -> None:
    reactor, c, port = client()
    d = c.request(build_for)
    c.datagramReceived(b"garbage", port.peer)
    port.protocol.datagramReceived(reply(port.threads()[0] + 1), port.peer)  # not ours
    port.answer()
    assert result_of(d).ok and (c.garbage, c.strays) == (1, 1)


def test_client_refused_fails_everything_in_flight() -> None:
    reactor, c, port = client()
    a, b = c.request(build_for), c.request(build_for)
    c.connectionRefused()
    for d in (a, b):
        e = failure_of(d)
        assert isinstance(e, TemporaryFailure) and e.reason == "refused"
    assert c.broken and not reactor.getDelayedCalls()


def test_client_port_closed_by_the_reactor_is_refused() -> None:
    # The epoll reactor closes a connected UDP port on an ICMP error.
    reactor, c, port = client()
    d = c.request(build_for)
    port.protocol.doStop()
    e = failure_of(d)
    assert isinstance(e, TemporaryFailure) and e.reason == "refused" and c.broken
    e = failure_of(c.request(build_for))
    assert isinstance(e, TemporaryFailure) and e.reason == "refused"
    assert len(port.sent) == 1 and not reactor.getDelayedCalls()
    c.close()
    assert not port.stopped  # already closed: not closed twice


def test_client_send_error_is_unreachable() -> None:
    reactor, c, port = client()
    port.fail_with = OSError(101, "Network is unreachable")
    e = failure_of(c.request(build_for))
    assert isinstance(e, TemporaryFailure) and e.reason == "unreachable"
    assert c.broken and c.in_flight == 0


def test_client_thread_ids_stay_unique_and_in_range() -> None:
    reactor, c, port = client()
    c._next = wire.THREAD_HIGH - 2  # wraps around below
    held = c.request(build_for)
    for _ in range(5):
        c.request(build_for)
        port.answer()
    threads = port.threads()
    assert all(wire.THREAD_LOW <= t < wire.THREAD_HIGH for t in threads)
    assert threads[0] not in threads[1:] and not held.called


def test_client_cancel_forgets_the_request() -> None:
    reactor, c, port = client()
    d = c.request(build_for)
    d.cancel()
    assert isinstance(failure_of(d), defer.CancelledError) and c.in_flight == 0
    assert not reactor.getDelayedCalls()


def test_client_retire_closes_after_the_last_request() -> None:
    reactor, c, port = client()
    d = c.request(build_for)
    c.retire()
    assert c.broken and not port.stopped
    port.answer()
    assert result_of(d).ok and port.stopped


def test_client_close_fails_whats_in_flight() -> None:
    reactor, c, port = client()
    d = c.request(build_for)
    c.close()
    e = failure_of(d)
    assert isinstance(e, TemporaryFailure) and e.reason == "stopped" and port.stopped


def test_digest_of_a_large_message_is_pyzors() -> None:
    # The 100 KiB the module's docstring measured: still the same digest.
    body = b"".join(
        hashlib.sha256(str(n).encode()).hexdigest()[:12].encode() + b" some words here\r\n"
        for n in range(3500)
    )
    data = b"Subject: big\r\n\r\n" + body
    started = time.perf_counter()
    value = wire.digest(data)
    assert value == pyzor.digest.DataDigester(email.message_from_bytes(data)).value
    assert time.perf_counter() - started < 5  # a sanity bound, not a benchmark
