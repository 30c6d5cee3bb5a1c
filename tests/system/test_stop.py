"""A stop is prompt: sessions get smtp.stop_grace, then 421 and are closed;
what got a 250 is still processed and stored."""

from __future__ import annotations

import gzip
import signal
import time
from pathlib import Path

from twisted.internet import address
from twisted.internet.testing import StringTransport

from spamtrap.config import Config
from tests.support.node import Node, RawSMTP, SMTPError, bundles
from tests.support.smtp_helpers import Harness, trap_config


def _config(grace: float = 10.0) -> Config:
    return trap_config(smtp__stop_grace=grace)


def _trickling(h: Harness) -> None:
    h.send(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<v@trap.example>\r\nDATA\r\n")
    h.replies()


def test_a_trickler_in_data_gets_421_after_the_grace() -> None:
    h = Harness(_config(10))
    _trickling(h)
    done = h.factory.shutdown()
    for _ in range(4):  # one byte every 2 s: the data timeout never fires
        h.clock.advance(2)
        h.send(b"x")
    assert not h.transport.disconnecting and not done.called
    h.clock.advance(2)
    assert h.replies() == [b"421 4.3.2 Service shutting down"]
    assert h.transport.disconnecting
    h.send(b"more\r\n.\r\n")  # too late: nothing is taken any more
    assert h.submitted == []
    h.proto.connectionLost(None)
    assert done.called


def test_a_session_that_finishes_within_the_grace_gets_250_then_421() -> None:
    h = Harness(_config(10))
    _trickling(h)
    h.factory.shutdown()
    h.clock.advance(5)
    h.send(b"body\r\n.\r\n")
    assert h.codes() == [250, 421]
    assert len(h.submitted) == 1


def test_idle_sessions_close_at_once_and_grace_zero_closes_all() -> None:
    h = Harness(_config(0))
    idle = h.factory.buildProtocol(None)
    t = StringTransport(peerAddress=address.IPv4Address("TCP", "192.0.2.9", 1))
    idle.makeConnection(t)
    _trickling(h)
    h.factory.shutdown()
    assert t.value().endswith(b"421 4.3.2 Service shutting down\r\n")
    assert not h.transport.disconnecting
    h.clock.advance(0)
    assert h.transport.disconnecting


def test_a_reply_pending_on_the_spool_is_not_cut_by_the_grace() -> None:
    h = Harness(_config(10), auto_ack=False)
    _trickling(h)
    h.send(b"x\r\n.\r\n")
    done = h.factory.shutdown()
    h.clock.advance(10)
    assert not h.transport.disconnecting  # its 250 is a commit away
    h.pending[0].callback(None)
    assert h.codes() == [250, 421]
    h.proto.connectionLost(None)
    assert done.called


def test_a_peer_that_never_closes_is_aborted_and_the_stop_goes_on() -> None:
    h = Harness(_config(10), auto_ack=False)
    _trickling(h)
    h.send(b"x\r\n.\r\n")  # the spool never answers (a stuck disk)
    aborted: list[bool] = []
    h.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    done = h.factory.shutdown()
    h.clock.advance(11.9)
    assert not done.called
    h.clock.advance(0.2)
    assert aborted == [True]
    assert done.called
    h.proto.connectionLost(None)  # reported later by the transport: harmless
    assert not h.factory.sessions


# -- a real node ---------------------------------------------------------------


def test_sigterm_with_a_trickling_client(tmp_path: Path) -> None:
    """SIGTERM while a client trickles one byte every 0.5 s inside DATA: the
    trickler gets 421 after the grace, twistd exits within grace + drain, and
    every message acked before is in a bundle."""
    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text(
        "node: stopnode\ntraps: {catch_all: true}\nsmtp: {stop_grace: 3s}\nsets:\n  all: {}\n"
    )
    node = Node(tmp_path / "data", config=cfg).start()
    assert node.proc is not None
    try:
        c = RawSMTP(node.host, node.smtp_port)
        c.cmd(b"EHLO acked", 250)
        ids = [
            c.send(b"a@b", [b"v@trap.example"], b"Subject: acked %d\r\n\r\nx\r\n" % i)
            for i in range(3)
        ]
        c.close()
        trickler = RawSMTP(node.host, node.smtp_port)
        trickler.cmd(b"EHLO t", 250)
        trickler.cmd(b"MAIL FROM:<t@b>", 250)
        trickler.cmd(b"RCPT TO:<v@trap.example>", 250)
        trickler.cmd(b"DATA", 354)
        trickler.sock.sendall(b"Subject: trickle\r\n\r\n")
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        trickler.sock.settimeout(0.5)
        reply = None
        while reply is None and time.monotonic() - started < 30:
            try:
                trickler.sock.sendall(b"y")
                reply = trickler.reply()
            except TimeoutError:
                continue  # no reply yet: trickle on
            except (OSError, SMTPError):
                break
        assert reply is not None and reply[0] == 421, reply
        assert reply[1].startswith(b"421 4.3.2"), reply
        assert time.monotonic() - started >= 2.5  # it had its grace
        trickler.sock.close()
        rc = node.proc.wait(60)
        took = time.monotonic() - started
        assert rc in (0, -signal.SIGTERM), node.log()
        assert took < 3 + 20, took  # the grace plus the drain, not the trickle
        stored = b"".join(gzip.decompress(b.read_bytes()) for b in bundles(node.data_dir))
        for i, msg_id in enumerate(ids):
            assert b"Subject: acked %d" % i in stored
            assert msg_id.encode() in stored
        assert b"Subject: trickle" not in stored
    finally:
        if node.proc.poll() is None:
            node.stop()
