"""Real consumers read bundles that a real ``twistd`` node wrote, in a
``unix`` and a ``wire`` set: gzip, Python's mailbox module, formail, mutt
(in tmux) and SpamAssassin. The line-end rules themselves are unit tests
(tests/unit/test_line_ends.py)."""

from __future__ import annotations

import gzip
import mailbox
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spamtrap.bundle import mbox
from spamtrap.message import wire_bytes
from tests.support.node import Node, RawSMTP, bundles, require_binary
from tests.support.poll import wait_until

# -- config ---------------------------------------------------------------------


# -- the pipeline: one conversion per distinct copy ---------------------------------


# -- real consumers, on bundles a real node wrote ----------------------------------

NODE_CONFIG = """\
smtp: {hostname: trap.test}
traps: {catch_all: true}
sets:
  unix: {}
  wire: {line_endings: wire}
"""

SENT = [
    b"From: a@spam.example\r\nSubject: plain crlf\r\n\r\nHello\r\nFrom the desk of\r\n",
    b"Subject: bare lf\n\nline one\nline two\r\n",
    b"Subject: folded\r\nX-Long: one\r\n\ttwo\r\n\r\nbody\r\n\r\n",
    b"Subject: own fields\r\nX-Spamtrap-Feed: donor1\r\n\r\nbody\r\n",
]


@pytest.fixture(scope="module")
def node_bundles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("line-ends")
    cfg = tmp / "spamtrap.yaml"
    cfg.write_text(NODE_CONFIG)
    node = Node(tmp / "data", config=cfg).start()
    ids = []
    try:
        c = RawSMTP(node.host, node.smtp_port)
        c.cmd(b"EHLO evil\rX-Spamtrap-Peer: 203.0.113.66 25", 250)
        for data in SENT:
            ids.append(c.send(b"bot@spam.example", [b"victim@trap.example"], data))
        c.close()
    finally:
        rc = node.stop()
    assert rc in (0, -signal.SIGTERM), node.log()
    out: dict[str, Any] = {"ids": ids, "dir": tmp}
    for name in ("unix", "wire"):
        [path] = bundles(node.data_dir, name)
        out[f"{name}.gz"] = path
        plain = tmp / f"{name}.mbox"
        plain.write_bytes(gzip.decompress(path.read_bytes()))
        out[name] = plain
    yield out


def stored_by_id(path: Path) -> dict[str, bytes]:
    out = {}
    for _, message in mbox.read_mbox(str(path)):
        out[re.search(rb"^X-Spamtrap-Id: (\S+)", message, re.M).group(1).decode()] = message
    return out


@pytest.mark.slow
def test_node_bundles_rebuild_the_wire_bytes(node_bundles: dict[str, Any]) -> None:
    for name in ("unix", "wire"):
        stored = stored_by_id(node_bundles[name])
        assert [wire_bytes(stored[i]) for i in node_bundles["ids"]] == SENT
    unix = stored_by_id(node_bundles["unix"])
    first = unix[node_bundles["ids"][0]]
    assert b"\r" not in first and b"X-Spamtrap-Line-Ends: crlf\n" in first
    mixed = unix[node_bundles["ids"][1]]
    assert b"X-Spamtrap-Line-Ends: mixed\n" in mixed and mixed.endswith(SENT[1])
    own = unix[node_bundles["ids"][3]]
    assert b"X-Spamtrap-Spoofed: X-Spamtrap-Feed\n" in own


@pytest.mark.slow
def test_gzip_accepts_the_bundle_files(node_bundles: dict[str, Any]) -> None:
    gzip_tool = require_binary("gzip")
    for name in ("unix", "wire"):
        subprocess.run([gzip_tool, "-t", str(node_bundles[f"{name}.gz"])], check=True, timeout=60)


@pytest.mark.slow
def test_python_mailbox_reads_them(node_bundles: dict[str, Any]) -> None:
    for name in ("unix", "wire"):
        box = mailbox.mbox(str(node_bundles[name]))
        assert len(box) == len(SENT)
        for msg in box:
            assert msg.get_all("X-Spamtrap-Peer") == [msg["X-Spamtrap-Peer"]]
            assert msg["X-Spamtrap-Helo"] == "evil\\rX-Spamtrap-Peer: 203.0.113.66 25"
            if name == "unix":
                assert not any("\r" in str(v) for v in msg.values()), msg.items()
        box.close()


@pytest.mark.slow
def test_formail_splits_them(node_bundles: dict[str, Any], tmp_path: Path) -> None:
    formail = require_binary("formail")
    for name in ("unix", "wire"):
        out = tmp_path / name
        out.mkdir()
        whole = node_bundles[name].read_bytes()
        subprocess.run(
            [formail, "-s", "sh", "-c", f'cat > "{out}/msg.$FILENO"'],
            input=whole,
            check=True,
            timeout=60,
        )
        parts = [p.read_bytes() for p in sorted(out.iterdir())]
        assert len(parts) == len(SENT)
        if name == "unix":
            # Byte for byte: formail adds no line (it does to CRLF headers).
            assert b"".join(parts) == whole


def mutt_screen(tmux: str, mutt: str, path: Path, home: Path, name: str) -> str:
    """The pager's screen for the first message of ``path``, from tmux."""
    sock = f"spamtrap-test-{os.getpid()}-{name}"
    (home / "Mail").mkdir(exist_ok=True)  # else mutt asks to create it
    cmd = f"env HOME={home} TERM=screen {mutt} -n -F /dev/null -R -f {path}"
    subprocess.run(
        [tmux, "-L", sock, "new-session", "-d", "-s", name, "-x", "200", "-y", "80", cmd],
        check=True,
        timeout=30,
    )
    try:
        # A real terminal program: poll its screen, with a deadline.
        screen = ""
        opened = False

        def message_shown() -> bool:
            nonlocal screen, opened
            screen = subprocess.run(
                [tmux, "-L", sock, "capture-pane", "-p", "-t", name],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            if not opened and "plain crlf" in screen:
                subprocess.run([tmux, "-L", sock, "send-keys", "-t", name, "Enter"], timeout=10)
                opened = True
                return False
            return opened and "X-Spamtrap-Line-Ends" in screen and "Hello" in screen

        try:
            wait_until(message_shown, 30, "mutt to show the message", interval=0.2)
        except TimeoutError:
            raise AssertionError(f"mutt did not show the message:\n{screen}") from None
        return screen
    finally:
        subprocess.run([tmux, "-L", sock, "kill-server"], timeout=10)


@pytest.mark.slow
def test_mutt_shows_no_carriage_returns(node_bundles: dict[str, Any], tmp_path: Path) -> None:
    tmux, mutt = require_binary("tmux"), require_binary("mutt")
    unix = mutt_screen(tmux, mutt, node_bundles["unix"], tmp_path, "unix")
    assert "^M" not in unix
    assert "X-Spamtrap-Line-Ends: crlf" in unix and "Subject: plain crlf" in unix
    # The check can see them: the wire set's CRLF shows as ^M.
    wire = mutt_screen(tmux, mutt, node_bundles["wire"], tmp_path, "wire")
    assert "Subject: plain crlf^M" in wire


@pytest.mark.slow
def test_spamassassin_parses_our_trap_hop(node_bundles: dict[str, Any], tmp_path: Path) -> None:
    sa = require_binary("spamassassin")
    msg_id = node_bundles["ids"][0]
    message = stored_by_id(node_bundles["unix"])[msg_id]
    # -L: local tests only (no DNS); HOME keeps its state out of the user's.
    run = subprocess.run(
        [sa, "-L", "-t", "-D", "received-header"],
        input=message,
        capture_output=True,
        env=dict(os.environ, HOME=str(tmp_path)),
        timeout=120,
        check=True,
    )
    debug = run.stderr.decode(errors="replace")
    parsed = re.findall(r"received-header: parsed as \[ (.*?) \]", debug)
    assert parsed, debug[-3000:]
    # Our trap hop, and only it (the forged HELO stays inside its helo=).
    [hop] = parsed
    assert "ip=127.0.0.1 " in hop and "by=trap.test " in hop and f"id={msg_id} " in hop
    assert "envfrom=bot@spam.example" in hop and "helo=evil\\\\rX-Spamtrap-Peer:" in hop
    assert b"\r" not in run.stdout
