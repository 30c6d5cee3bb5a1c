"""The SMTP byte stream against a real ``twistd`` node over loopback: a
bare-LF session and a pipelined burst of 52 transactions in one write."""

from __future__ import annotations

import gzip
import socket
from pathlib import Path

import pytest

from spamtrap.bundle.mbox import read_mbox
from tests.support.node import Node, RawSMTP, bundles, split_metadata
from tests.support.smtp_helpers import TXN, txn

# -- bare-LF clients ----------------------------------------------------------


# -- SMTP smuggling -----------------------------------------------------------


# -- pipelined bursts ---------------------------------------------------------


# -- the command-line cap -----------------------------------------------------


# -- properties: any body, any segmentation, any dialect ----------------------


# -- a real node over loopback ------------------------------------------------


def stored_messages(data_dir: Path) -> list[bytes]:
    out = []
    for path in bundles(data_dir):
        for _from_line, msg in read_mbox(str(path)):
            out.append(split_metadata(msg)[1])
    return out


def recv_replies(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` final reply lines (multi-line replies count once)."""
    buf, finals = b"", []
    while len(finals) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\r\n")
        finals += [ln for ln in lines if ln[3:4] == b" "]
    return finals


@pytest.mark.slow
def test_real_node_takes_a_bare_lf_session_and_a_pipelined_burst(tmp_path: Path) -> None:
    node = Node(tmp_path / "data").start()
    burst_bodies = [b"Subject: big %d\r\n\r\n" % i + b"y" * 5 * 1024 + b"\r\n" for i in range(2)]
    burst_bodies += [b"Subject: small %d\r\n\r\n.leading dot\r\n" % i for i in range(50)]
    try:
        c = RawSMTP(node.host, node.smtp_port)  # reads the 220
        c.sock.sendall(b"EHLO lfbot.example\nMAIL FROM:<lf@spam.example>\n")
        assert [r[:3] for r in recv_replies(c.sock, 2)] == [b"250", b"250"]
        c.sock.sendall(b"RCPT TO:<v@trap.example>\nDATA\n")
        assert [r[:3] for r in recv_replies(c.sock, 2)] == [b"250", b"354"]
        c.sock.sendall(b"Subject: bare lf\n\n..dotted\nend\n.\n")
        assert recv_replies(c.sock, 1)[0].startswith(b"250 ")
        c.sock.sendall(b"QUIT\n")
        assert recv_replies(c.sock, 1)[0].startswith(b"221 ")
        c.sock.close()

        b = RawSMTP(node.host, node.smtp_port)
        burst = b"EHLO burst.example\r\n"
        for i, body in enumerate(burst_bodies):
            stuffed = body.replace(b"\r\n.", b"\r\n..")
            burst += txn(i, stuffed)
        b.sock.sendall(burst + b"QUIT\r\n")
        replies = recv_replies(b.sock, 2 + 4 * len(burst_bodies))
        assert [int(r[:3]) for r in replies] == [250, *TXN * len(burst_bodies), 221]
        b.sock.close()
    finally:
        assert node.stop() in (0, -15), node.log()
    got = stored_messages(node.data_dir)
    assert got.count(b"Subject: bare lf\n\n.dotted\nend\n") == 1
    for body in burst_bodies:
        assert got.count(body) == 1, body[:20]
    assert len(got) == 1 + len(burst_bodies)
    text = b"".join(gzip.decompress(p.read_bytes()) for p in bundles(node.data_dir))
    assert text.count(b"flags=bare-lf") == 1
