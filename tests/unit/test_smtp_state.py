"""The SMTP session's one state, and the one method that moves it."""

from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport

from spamtrap.intake.state import (
    LEGAL_MOVES,
    IllegalSessionMoveError,
    SessionState,
    check_move,
)
from tests.support.smtp_helpers import Harness, trap_config

S = SessionState


def test_every_state_has_its_moves_and_every_state_can_close() -> None:
    assert set(LEGAL_MOVES) == set(SessionState)
    for state, moves in LEGAL_MOVES.items():
        assert S.CLOSED in moves, state
    assert LEGAL_MOVES[S.CLOSED] == {S.CLOSED}


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.CLOSED, S.COMMAND),  # nothing is read after close
        (S.GREETING, S.DATA),  # DATA only after a greeting and a MAIL
        (S.DATA, S.REPLY_PENDING),  # the end of data goes through COMMAND
        (S.REPLY_PENDING, S.DATA),
        (S.PROXY, S.COMMAND),  # a PROXY client is greeted first
    ],
)
def test_an_illegal_move_names_the_session(old: SessionState, new: SessionState) -> None:
    message = f"s-42: illegal move {old.name} -> {new.name}"
    with pytest.raises(IllegalSessionMoveError, match=message):
        check_move("s-42", old, new)


def test_a_session_walks_the_states_of_one_transaction() -> None:
    h = Harness(auto_ack=False)
    p = h.proto
    assert p._state is S.COMMAND  # greeted at once (no greeting_delay)
    h.send(b"EHLO bot.example\r\nMAIL FROM:<b@spam.example>\r\nRCPT TO:<a@trap.example>\r\n")
    assert p._state is S.COMMAND
    h.send(b"DATA\r\n")
    assert p._state is S.DATA
    h.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert p._state is S.REPLY_PENDING and len(h.pending) == 1
    h.send(b"QUIT\r\n")  # held while the spool has the message
    assert p._state is S.REPLY_PENDING and h.transport.producerState == "paused"
    h.pending[0].callback(None)
    assert p._state is S.CLOSED  # the 250, then the held QUIT
    queued = b"250 2.0.0 Ok: queued as " + h.submitted[0].msg_id.encode()
    assert h.replies()[-2:] == [queued, b"221 2.0.0 Bye"]


def test_the_greeting_delay_holds_the_session_in_greeting() -> None:
    h = Harness(trap_config(smtp__timeouts__greeting_delay=2.0))
    p = h.factory.buildProtocol(None)
    p.makeConnection(StringTransport(peerAddress=h.transport.getPeer()))
    assert p._state is S.GREETING
    p.dataReceived(b"EHLO early.example\r\n")
    assert p._state is S.GREETING and "early-talk" in p.dialect.flags
    h.clock.advance(2.0)
    assert p._state is S.COMMAND
    assert p.transport.value().startswith(b"220 ") and b"250" in p.transport.value()


def test_a_move_the_session_may_not_make_raises_with_its_id() -> None:
    h = Harness()
    h.send(b"QUIT\r\n")
    assert h.proto._state is S.CLOSED
    with pytest.raises(IllegalSessionMoveError, match=h.proto.session_id):
        h.proto._move(S.DATA)
