"""The SMTP byte stream: bare-LF clients, SMTP smuggling, pipelined bursts,
the command-line cap. Driven over a StringTransport with a Clock; the same
sessions against a real node are in tests/system/test_smtp_stream.py."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spamtrap import testing
from spamtrap.config import SetConfig
from tests.support.smtp_helpers import MAIL, RCPT, TXN, Harness, txn


def lf_session(body_on_wire: bytes, end: bytes = b".\n") -> bytes:
    return b"EHLO bot\n" + MAIL + b"\n" + RCPT + b"\nDATA\n" + body_on_wire + end


def test_bare_lf_client_ends_data_with_lf_dot_lf() -> None:
    h = Harness()
    h.send(lf_session(b"Subject: lf\n\n..y\nbody\n") + b"QUIT\n")
    assert h.codes() == [220, 250, *TXN, 221]
    [env] = h.submitted
    assert env.data == b"Subject: lf\n\n.y\nbody\n"  # dot-unstuffed, LF kept
    assert "bare-lf" in env.meta["dialect"][0]
    assert "smuggling" not in env.meta["dialect"][0]


def test_bare_lf_client_may_end_with_lf_dot_crlf() -> None:
    h = Harness()
    h.replies()
    h.send(lf_session(b"a\r\n..b\nc\n", end=b".\r\n"))
    assert h.codes() == [250, *TXN]
    # A line starts after any LF: the dot after CRLF is unstuffed as well.
    assert h.submitted[0].data == b"a\r\n.b\nc\n"


def test_bare_lf_client_empty_message_and_leading_dot() -> None:
    h = Harness()
    h.send(lf_session(b"", end=b".\n") + b"MAIL FROM:<a@b>\nRCPT TO:<w@trap.example>\nDATA\n")
    h.send(b"..first\n.\n")
    assert [e.data for e in h.submitted] == [b"", b".first\n"]


def test_one_crlf_command_line_makes_the_session_strict() -> None:
    h = Harness()
    h.replies()
    # EHLO with CRLF, the rest bare LF: LF.LF is data, not the end.
    h.send(b"EHLO x\r\n" + MAIL + b"\n" + RCPT + b"\nDATA\nline\n.\n" + MAIL + b"\n")
    assert h.codes() == [250, 250, 250, 354]
    assert h.submitted == []
    h.send(b"\r\n.\r\n")
    assert h.codes() == [250]
    assert h.submitted[0].data == b"line\n.\n" + MAIL + b"\n\r\n"
    assert "smuggling" in h.submitted[0].meta["dialect"][0]


def test_crlf_session_keeps_both_dots_after_a_lone_lf() -> None:
    h = Harness()
    h.transaction(b"a\n..b\r\n..c\r\n")
    # After CRLF a line starts (one dot dropped); after a lone LF it does not.
    assert h.submitted[0].data == b"a\n..b\r\n.c\r\n"


LOOKALIKES = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\n"]


@pytest.mark.parametrize("fake_end", LOOKALIKES)
def test_crlf_client_smuggled_end_of_data_stays_data(fake_end: bytes) -> None:
    h = Harness()
    h.replies()
    smuggled = (
        b"MAIL FROM:<admin@bank.example>\r\nRCPT TO:<x@elsewhere.example>\r\nDATA\r\nforged\r\n"
    )
    body = b"Subject: s\r\n\r\nhi" + fake_end + smuggled
    h.send(b"EHLO x\r\n" + MAIL + b"\r\n" + RCPT + b"\r\nDATA\r\n" + body + b".\r\nQUIT\r\n")
    assert h.codes() == [250, *TXN, 221]  # one message: the forged one is its data
    [env] = h.submitted
    # Exactly as sent, but for the one stuffing dot a CRLF-led fake carries.
    assert env.data == body.replace(b"\r\n.", b"\r\n")
    assert "smuggling" in env.meta["dialect"][0].split("flags=")[1].split(",")


def test_an_ordinary_crlf_message_is_not_flagged() -> None:
    h = Harness()
    h.transaction(b"Subject: x\r\n\r\nEnd of sentence.\r\n..dot\r\n.\tx\r\n" * 50)
    assert "smuggling" not in h.submitted[0].meta["dialect"][0]


def test_crlf_dot_cr_at_the_end_of_a_read_waits_for_the_next() -> None:
    h = Harness()
    h.replies()
    h.send(MAIL + b"\r\n" + RCPT + b"\r\nDATA\r\nx\r\n.\r")
    assert h.codes() == [250, 250, 354]
    h.send(b"\n")
    assert h.codes() == [250]
    assert h.submitted[0].data == b"x\r\n"
    assert "smuggling" not in h.submitted[0].meta["dialect"][0]


def test_a_message_full_of_lookalikes_is_one_message() -> None:
    h = Harness()
    h.transaction(b"\n.\n" * 100_000 + b"\r\n")
    assert h.submitted[0].data == b"\n.\n" * 100_000 + b"\r\n"
    assert h.codes()[-1] == 250


@pytest.mark.parametrize("auto_ack", [True, False])
def test_burst_of_two_5k_messages_in_one_write(auto_ack: bool) -> None:
    h = Harness(auto_ack=auto_ack)
    h.replies()
    bodies = [b"%d" % i + b"x" * 5 * 1024 + b"\r\n" for i in range(2)]
    h.send(b"EHLO x\r\n" + b"".join(txn(i, b) for i, b in enumerate(bodies)) + b"QUIT\r\n")
    for d in h.pending:  # fires as they come: acking one submits the next
        d.callback(None)
    assert h.codes() == [250, *TXN, *TXN, 221]
    assert [e.data for e in h.submitted] == bodies


@pytest.mark.parametrize("auto_ack", [True, False])
def test_burst_of_fifty_transactions_in_one_write(auto_ack: bool) -> None:
    h = Harness(auto_ack=auto_ack)
    h.replies()
    bodies = [b"Subject: small %d\r\n\r\nhello from a bot\r\n" % i for i in range(50)]
    burst = b"EHLO x\r\n" + b"".join(txn(i, b) for i, b in enumerate(bodies)) + b"QUIT\r\n"
    assert len(burst) > 5000  # more than the command-line cap behind the first reply
    h.send(burst)
    for d in h.pending:
        d.callback(None)
    assert h.codes() == [250, *TXN * 50, 221]
    assert [e.data for e in h.submitted] == bodies
    assert [e.mail_from for e in h.submitted] == [f"s{i}@spam.example" for i in range(50)]


def test_held_input_keeps_the_transport_paused_until_no_transaction_is_left() -> None:
    h = Harness(auto_ack=False)
    h.replies()
    h.send(txn(0, b"a\r\n"))
    assert h.transport.producerState == "producing"
    h.send(txn(1, b"b\r\n") + txn(2, b"c\r\n"))  # arrives while the first is pending
    assert h.transport.producerState == "paused"
    h.pending[0].callback(None)
    # The held input still holds a transaction: reading more would let a
    # pipelining peer grow the buffer by a read per reply.
    assert len(h.pending) == 2 and h.transport.producerState == "paused"
    h.pending[1].callback(None)
    assert h.transport.producerState == "paused"
    h.pending[2].callback(None)
    assert h.transport.producerState == "producing"
    assert h.codes() == TXN * 3
    assert h.proto._buf == bytearray()


def test_early_talker_input_is_held_with_the_transport_paused() -> None:
    cfg = testing.config(
        node="n",
        traps__catch_all=True,
        smtp__timeouts__greeting_delay=2,
        sets=[SetConfig(name="all")],
    )
    h = Harness(cfg)
    h.send(b"EHLO x\r\n" + b"A" * 50_000)
    assert h.transport.producerState == "paused"
    assert h.replies() == []
    h.clock.advance(2)
    assert h.transport.producerState == "producing"
    assert h.codes() == [220, 250, 500]  # the unended 50 KB line is refused as too long


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [None, 1000, 1, 4096, 4097])
def test_60k_helo_is_refused_the_same_in_one_read_or_many(size: int | None) -> None:
    h = Harness()
    h.replies()
    stream = b"HELO " + b"h" * 60_000 + b"\r\n" + MAIL + b"\r\n" + RCPT + b"\r\nDATA\r\nx\r\n.\r\n"
    for c in [stream] if size is None else chunks(stream, size):
        h.send(c)
        assert len(h.proto._buf) <= 4096
    assert h.codes() == [500, *TXN]
    assert not h.transport.disconnecting
    env = h.submitted[0]
    assert "helo" not in env.meta  # the refused HELO never ran
    assert "long-line" in env.meta["dialect"][0]
    assert h.metrics.smtp_errors.labels(kind="line-too-long")._value.get() == 1


def test_line_cap_counts_the_line_end() -> None:
    h = Harness()
    h.replies()
    cap = h.factory.buffer_cap
    ok = b"NOOP " + b"n" * (cap - 7) + b"\r\n"
    assert len(ok) == cap
    h.send(ok)
    h.send(b"NOOP " + b"n" * (cap - 6) + b"\r\n")  # one byte more
    h.send(b"NOOP\n")
    assert h.codes() == [250, 500, 250]


SESSION_WITH_LONG_LINE = (
    b"EHLO " + b"e" * 9000 + b"\r\nNOOP\r\n" + b"X" * 5000 + b"\nEHLO ok\r\n" + txn(0, b"body\r\n")
)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, len(SESSION_WITH_LONG_LINE)), max_size=20))
def test_line_cap_verdict_does_not_depend_on_segmentation(cuts: list[int]) -> None:
    h = Harness()
    prev = 0
    for p in [*sorted(set(cuts)), len(SESSION_WITH_LONG_LINE)]:
        h.send(SESSION_WITH_LONG_LINE[prev:p])
        prev = p
    assert h.codes() == [220, 500, 250, 500, 250, *TXN]
    assert [e.data for e in h.submitted] == [b"body\r\n"]


BODY = st.binary(max_size=120) | st.lists(
    st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"a", b"From ", b"\x00", b"\xff"]),
    max_size=40,
).map(b"".join)


def stuff(body: bytes, lf: bool) -> tuple[bytes, bytes]:
    """(bytes on the wire before the final dot line, what must be stored)."""
    if not body:
        return b"", b""
    eol = b"\n" if lf else b"\r\n"
    stored = body if body.endswith(eol) else body + eol
    start = eol[-1:] if lf else eol  # a line starts after this
    wire = (b"." + stored if stored.startswith(b".") else stored).replace(
        start + b".", start + b".."
    )
    return wire, stored


def lookalike_count(data_on_wire: bytes) -> int:
    """LF.LF once CR reads as LF: CRLF.CRLF's middle plus every lookalike."""
    t = data_on_wire.translate(bytes.maketrans(b"\r", b"\n"))
    n, p = 0, t.find(b"\n.\n")
    while p >= 0:
        n, p = n + 1, t.find(b"\n.\n", p + 1)
    return n


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lf=st.booleans(),
    bodies=st.lists(BODY, min_size=1, max_size=4),
    lf_ends=st.lists(st.sampled_from([b".\n", b".\r\n"]), min_size=4, max_size=4),
    cuts=st.lists(st.integers(0, 3000), max_size=15),
    auto_ack=st.booleans(),
    ack_as_we_go=st.booleans(),
)
def test_stored_bytes_are_the_unstuffed_body_for_any_segmentation(
    lf: bool,
    bodies: list[bytes],
    lf_ends: list[bytes],
    cuts: list[int],
    auto_ack: bool,
    ack_as_we_go: bool,
) -> None:
    eol = b"\n" if lf else b"\r\n"
    stream = b"EHLO bot.example" + eol
    expected, smuggled = [], []
    for i, body in enumerate(bodies):
        wire, stored = stuff(body, lf)
        end = lf_ends[i] if lf else b".\r\n"
        stream += b"MAIL FROM:<s%d@x>" % i + eol + RCPT + eol + b"DATA" + eol + wire + end
        expected.append(stored)
        smuggled.append(not lf and lookalike_count(b"\r\n" + wire + end) > 1)
    stream += b"QUIT" + eol

    h = Harness(auto_ack=auto_ack)
    fired = 0

    def ack() -> None:
        nonlocal fired
        while fired < len(h.pending):
            h.pending[fired].callback(None)
            fired += 1

    prev = 0
    for p in [*sorted({c for c in cuts if c < len(stream)}), len(stream)]:
        h.send(stream[prev:p])
        prev = p
        if ack_as_we_go:
            ack()
    ack()
    assert h.codes() == [220, 250, *TXN * len(bodies), 221]
    assert [e.data for e in h.submitted] == expected
    for i, env in enumerate(h.submitted):
        flags = env.meta["dialect"][0].partition("flags=")[2].split(",")
        assert ("smuggling" in flags) == any(smuggled[: i + 1]), i  # a session flag
        assert ("bare-lf" in flags) == lf
