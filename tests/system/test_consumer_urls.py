"""What consumers receive, end to end: a real ``twistd spamtrap`` node with
the local store (the embedded default's store) announces each bundle by list
mail to an SMTP server and by webhook to a web server, both run by this test
on loopback. The URLs in the notices are fetched from the node, their bytes
checked against the notices' SHA256, and ``spamtrap pull --mail`` follows
the very notice mail the relay received, down to each message's wire bytes.

The node is a real process, so the test polls (its port, the relay's mail)
with deadlines; nothing here sleeps for a fixed time.
"""

from __future__ import annotations

import hashlib
import io
import json
import mailbox
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.web.server import Site

from spamtrap.cli.main import build_parser
from spamtrap.cli.pull import run as pull_run
from tests.support.node import Node, RawSMTP, split_metadata
from tests.support.notify import HookServer, MailTrap, body_fields, verify
from tests.support.poll import until

pytestmark = pytest.mark.slow

LIST = "all-bundles@lists.test"
# Line ends as senders really use them: CRLF throughout (stored with LF in
# the default unix set), bare LF (broken bots), and both in one message.
SENT = [
    b"From: a@spam.example\r\nSubject: crlf\r\n\r\nFrom the desk of\r\n.leading dot\r\n",
    b"From: b@spam.example\r\nSubject: bare lf\n\nline one\nline two\n",
    b"From: c@spam.example\r\nSubject: mixed\r\n\r\none\ntwo\r\n",
]


def on_the_wire(data: bytes) -> bytes:
    # RawSMTP ends a message without a final CRLF with one, before the dot.
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback only
        data: bytes = r.read()
        return data


def write_config(path: Path, relay_port: int, hook_url: str, http_port: int) -> Path:
    path.write_text(
        f"""\
node: node1
traps:
  catch_all: true
http:
  public_url: http://127.0.0.1:{http_port}
sets:
  all:
    rotate:
      max_messages: {len(SENT)}
    notify:
      mail: [{LIST}]
      webhooks:
        - url: {hook_url}
          secret: a-shared-secret
relay:
  host: 127.0.0.1
  port: {relay_port}
  sender: spamtrap@node1.test
"""
    )
    return path


def send_all(node: Node) -> None:
    smtp = RawSMTP(node.host, node.smtp_port)
    try:
        for data in SENT:
            smtp.send(b"bot@spam.example", [b"trap@trap.example"], data)
    finally:
        smtp.close()


@pytest_twisted.ensureDeferred
async def test_notices_of_the_local_store_lead_to_the_bundle(tmp_path: Path) -> None:
    relay = MailTrap()
    relay_port = await relay.listen()
    hooks = HookServer()
    hook_port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(hooks))
    node = Node(tmp_path / "data")
    node.config = write_config(
        tmp_path / "spamtrap.yaml",
        relay_port,
        f"http://127.0.0.1:{hook_port.getHost().port}/hook",
        node.http_port,
    )
    try:
        await deferToThread(node.start)
        await deferToThread(send_all, node)
        # The bundle rotates at len(SENT) messages and is stored, then announced.
        await until(lambda: relay.mail_to(LIST) and hooks.requests, timeout=60)
        (msg,) = relay.mail_to(LIST)
        fields = body_fields(msg)
        ((_, headers, body),) = hooks.requests
        (record,) = json.loads(body)["Records"]
        event = record["spamtrap"]
        assert verify("a-shared-secret", headers, body)

        base = f"http://127.0.0.1:{node.http_port}/bundles/"
        assert fields["URL"] == event["url"] == base + fields["Key"]
        assert fields["Manifest-URL"] == event["manifest_url"]
        assert event["key"] == fields["Key"] and event["sha256"] == fields["SHA256"]
        data = await deferToThread(get, fields["URL"])
        assert hashlib.sha256(data).hexdigest() == fields["SHA256"]
        assert len(data) == int(fields["Size"])
        manifest = json.loads(await deferToThread(get, fields["Manifest-URL"]))
        assert (manifest["key"], manifest["sha256"], manifest["size"]) == (
            fields["Key"],
            fields["SHA256"],
            len(data),
        )
        assert manifest["messages"] == int(fields["Messages"]) == len(SENT)

        # A subscriber's maildir holds the notice exactly as the relay got it.
        notices = mailbox.Maildir(tmp_path / "notices")
        notices.add(relay.received[0].data)
        notices.close()
        dest = tmp_path / "dest"
        argv = ["pull", "--set", "all", "--dest", str(dest), "--mail", str(tmp_path / "notices")]
        err = io.StringIO()
        args = build_parser().parse_args([*argv, "--unpack", "maildir", "--wire"])
        assert (await deferToThread(pull_run, args, err), err.getvalue()) == (0, "")
        assert (dest / fields["Key"]).read_bytes() == data
        wire = mailbox.Maildir(dest / "all" / "wire", factory=None, create=False)
        assert sorted(wire.get_bytes(k) for k in wire.keys()) == sorted(map(on_the_wire, SENT))
        # The stored form of the CRLF message has LF (a unix set) and its metadata.
        args = build_parser().parse_args([*argv, "--unpack", "maildir"])
        assert await deferToThread(pull_run, args, io.StringIO()) == 0
        box = mailbox.Maildir(dest / "all" / "maildir", factory=None, create=False)
        stored = {split_metadata(box.get_bytes(k), rebuild=False)[1] for k in box.keys()}
        assert SENT[0].replace(b"\r\n", b"\n") in stored
    finally:
        if node.proc is not None:
            await deferToThread(node.stop)
        await hook_port.stopListening()
        await relay.close()


