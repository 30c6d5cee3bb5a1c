"""End to end: a real ``twistd -n spamtrap`` process, real loopback SMTP."""

from __future__ import annotations

import gzip
import hashlib
import json
import mailbox
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from spamtrap.bundle.mbox import read_mbox
from tests.support.node import Node, RawSMTP, bundles, require_binary, split_metadata

pytestmark = pytest.mark.slow

CLEAN_EXIT = (0, -signal.SIGTERM)  # twistd re-raises SIGTERM after a clean stop

MESSAGES: list[tuple[str, bytes]] = [
    ("plain", b"From: a@spam.example\r\nSubject: plain\r\n\r\nHello\r\n"),
    (
        "from-lines",
        b"Subject: from lines\r\n\r\nFrom the desk of\r\n>From quoted\r\n>>From twice\r\n"
        b"From \r\n.leading dot\r\n",
    ),
    (
        "8bit",
        b"Subject: \xe4\xf6\xfc\xff\r\nContent-Type: text/plain\r\n\r\n\x80\x81 junk \xc3\x28\r\n",
    ),
    ("bare-lf", b"Subject: bare lf\n\nline one\nline two\r\nmixed\n"),
    ("no-trailing-newline", b"Subject: no newline\r\n\r\nlast line without end"),
    ("nul", b"Subject: nul\r\n\r\nbefore\x00after\r\n"),
]


def big_attachment() -> bytes:
    import base64
    import os

    payload = base64.encodebytes(os.urandom(2 * 1024 * 1024)).replace(b"\n", b"\r\n")
    return (
        b"Subject: 2 MiB attachment\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
        b"Content-Type: text/plain\r\n\r\nsee attached\r\n--b1\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + payload
        + b"--b1--\r\n"
    )


def expected_bytes(data: bytes) -> bytes:
    # SMTP cannot carry a message without a final line end: the client adds CRLF.
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def read_all(data_dir: Path) -> dict[str, bytes]:
    """id -> original message bytes, from every bundle, checked against mailbox.mbox."""
    out: dict[str, bytes] = {}
    for path in bundles(data_dir):
        ours = read_mbox(str(path))
        raw = gzip.decompress(path.read_bytes())
        plain = path.with_suffix("")
        plain.write_bytes(raw)
        theirs = mailbox.mbox(str(plain))
        assert len(theirs) == len(ours)
        for i, (from_line, msg) in enumerate(ours):
            assert re.fullmatch(rb"From \S+ \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}", from_line)
            # mailbox.mbox keeps mboxrd quoting; undo it the way mboxrd readers do
            quoted = theirs.get_bytes(i, from_=False)
            assert re.sub(rb"(?m)^>(>*From )", rb"\1", quoted) == msg
            meta, original = split_metadata(msg)
            msg_id = re.search(rb"X-Spamtrap-Id: (\S+)", meta).group(1).decode()
            out.setdefault(msg_id, original)
        plain.unlink()
    return out


def test_embedded_default_end_to_end(tmp_path: Path) -> None:
    node = Node(tmp_path / "data").start()
    sent: dict[str, bytes] = {}
    try:
        c = RawSMTP(node.host, node.smtp_port)
        c.cmd(b"EHLO e2e.example", 250)
        for _name, data in MESSAGES:
            sent[c.send(b"bot@spam.example", [b"victim@trap.example"], data)] = data
        big = big_attachment()
        sent[c.send(b"bot@spam.example", [b"x@trap.example"], big)] = big
        fifty = [b"user%d@trap.example" % i for i in range(50)]
        many = b"Subject: fifty\r\n\r\nto fifty\r\n"
        sent[c.send(b"", fifty, many)] = many
        c.close()
        assert node.metric("spamtrap_messages_accepted_total") == len(sent)
    finally:
        rc = node.stop()
    assert rc in CLEAN_EXIT, node.log()
    got = read_all(node.data_dir)
    assert set(got) == set(sent)
    for msg_id, data in sent.items():
        assert got[msg_id] == expected_bytes(data), msg_id
    # one envelope for fifty recipients, all of them in the metadata
    text = b"".join(gzip.decompress(p.read_bytes()) for p in bundles(node.data_dir))
    assert text.count(b"X-Spamtrap-Rcpt: <user") == 50
    assert b"From MAILER-DAEMON " in text
    # the manifest beside each bundle describes it
    for p in bundles(node.data_dir):
        manifest = json.loads(p.with_name(p.name.replace(".mbox.gz", ".json")).read_text())
        assert manifest["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert manifest["size"] == p.stat().st_size
        assert manifest["set"] == "all" and manifest["format"] == 1


def test_bundles_download_over_http(tmp_path: Path) -> None:
    node = Node(tmp_path / "data", extra=["--node", "e2enode"]).start()
    try:
        c = RawSMTP(node.host, node.smtp_port)
        c.send(b"a@b", [b"v@trap.example"], b"Subject: dl\r\n\r\nx\r\n")
        c.close()
    finally:
        assert node.stop() in CLEAN_EXIT
    node.start()  # a restarted node serves what it stored before
    try:
        [path] = bundles(node.data_dir)
        assert ".e2enode." in path.name
        key = f"all/{path.name}"
        status, body = node.http_get(f"/bundles/{key}")
        assert status == 200 and body == path.read_bytes()
        status, body = node.http_get("/bundles/all/" + path.name.replace(".mbox.gz", ".json"))
        assert status == 200 and json.loads(body)["key"] == key
        assert node.http_get("/bundles/all/nope.mbox.gz")[0] == 404
        assert node.http_get("/bundles/../../etc/passwd")[0] == 404
        assert node.http_get("/healthz")[0] == 200
    finally:
        node.stop()


def test_kill_9_mid_stream_loses_nothing_that_got_250(tmp_path: Path) -> None:
    node = Node(tmp_path / "data").start()
    acked: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        i = 0
        while not stop.is_set() and i < 5000:
            try:
                c = RawSMTP(node.host, node.smtp_port, timeout=5)
                acked.append(c.send(b"a@b", [b"v@trap.example"], b"Subject: %d\r\n\r\nx\r\n" % i))
                c.close()
            except Exception:  # noqa: BLE001 - the server is being killed under us
                return
            i += 1

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    while len(acked) < 300:
        threading.Event().wait(0.01)
    assert node.proc is not None
    node.proc.kill()  # kill -9, mid-stream
    node.proc.wait()
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 300
    node.start()  # the restart resumes from what is in the spool
    assert node.stop() in CLEAN_EXIT, node.log()
    stored = read_all(node.data_dir)
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages lost"


def test_intake_goes_on_with_workers_stopped_and_sheds_oldest(tmp_path: Path) -> None:
    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text("traps: {catch_all: true}\nfilters: {workers: 0}\nspool: {max_messages: 50}\n")
    node = Node(tmp_path / "data", config=cfg).start()
    try:
        c = RawSMTP(node.host, node.smtp_port)
        ids = [
            c.send(b"a@b", [b"v@x.example"], b"Subject: %d\r\n\r\nx\r\n" % i) for i in range(200)
        ]
        c.close()
        assert len(ids) == 200
        assert node.metric("spamtrap_spool_depth") == 50
        assert node.metric("spamtrap_spool_shed_total") == 150
    finally:
        node.stop()


def test_swaks_delivers_over_starttls(tmp_path: Path) -> None:
    swaks = require_binary("swaks")
    node = Node(tmp_path / "data").start()
    try:
        out = subprocess.run(
            [
                swaks,
                "--server",
                f"{node.host}:{node.smtp_port}",
                "--to",
                "anything@trap.example",
                "--from",
                "bot@spam.example",
                "--tls",
                "--helo",
                "swaks.example",
                "--header",
                "Subject: via swaks",
            ],
            capture_output=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout.decode(errors="replace")
    finally:
        assert node.stop() in CLEAN_EXIT
    text = b"".join(gzip.decompress(p.read_bytes()) for p in bundles(node.data_dir))
    assert b"Subject: via swaks" in text
    assert re.search(rb"X-Spamtrap-TLS: TLSv1\.[23] \S+", text)
    assert b"with ESMTPS id" in text


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("smtp:\n  max_message_sizee: 1\n")
    import sys

    twistd = Path(sys.executable).parent / "twistd"
    out = subprocess.run(
        [str(twistd), "-n", "--pidfile=", "spamtrap", "--config", str(cfg)],
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode != 0
    text = (out.stdout + out.stderr).decode()
    assert "bad.yaml:2" in text and "max_message_sizee" in text
