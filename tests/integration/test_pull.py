"""``spamtrap pull`` against real servers on loopback.

HTTP: spamtrap's own Site (make_site) over a real LocalStore holding real
gzipped mboxrd bundles and manifests, served by the test reactor; pull runs
in a thread (it is a blocking program), so the reactor keeps serving. Every
request the server answers is recorded, so the tests can tell what was
downloaded and how (Range or whole).

S3: a moto server started on 127.0.0.1 as a subprocess, with fake
credentials."""

from __future__ import annotations

import email
import hashlib
import io
import json
import mailbox
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.python.threadpool import ThreadPool

from spamtrap import testing
from spamtrap.bundle import mbox
from spamtrap.bundle.manifest import index_name
from spamtrap.cli.pull import (
    STATE_NAME,
    run,
)
from spamtrap.config import Config, SetConfig
from spamtrap.metrics import Metrics
from spamtrap.store import bundle_key, index_key, manifest_key
from spamtrap.store.local import LocalStore
from spamtrap.web import make_site
from tests.support.poll import wait_until
from tests.support.pull import (
    PRIVATE_TOKEN,
    SHARED_TOKEN,
    T0,
    gzip_mbox,
    manifest,
    message,
    parse,
    pull,
    stored,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Bundle:
    key: str
    data: bytes
    messages: list[bytes]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def name(self) -> str:
        return self.key.split("/", 1)[1]


@dataclass
class Node:
    """An in-process spamtrap HTTP server over a real LocalStore."""

    base: str
    store: LocalStore
    tmp: Path
    requests: list[tuple[str, str | None, int]] = field(default_factory=list)
    counter: int = 0

    async def add(self, set_name: str, when: float, count: int = 2, padding: int = 0) -> Bundle:
        messages = [message(self.counter + i, padding) for i in range(count)]
        self.counter += count
        key = bundle_key(set_name, when, "node1")
        data = gzip_mbox(messages, when)
        source = self.tmp / f"upload-{self.counter}.tmp"
        source.write_bytes(data)
        await self.store.put(key, str(source), manifest(key, data, count, when))
        return Bundle(key, data, messages)

    def path(self, key: str) -> Path:
        return Path(self.store.root) / key

    def downloads(self) -> list[tuple[str, str | None, int]]:
        """Bundle requests answered so far: (path, Range header, status)."""
        return [r for r in self.requests if r[0].endswith(".mbox.gz")]


def node_config(port: int) -> Config:
    config = testing.config(
        http__public_url=f"http://127.0.0.1:{port}",
        sets=[
            SetConfig(name="shared", token=SHARED_TOKEN),
            SetConfig(name="private", token=PRIVATE_TOKEN, private=True),
        ],
    )
    return config


@pytest_twisted.async_yield_fixture
async def node(tmp_path: Path):
    pool = ThreadPool(minthreads=1, maxthreads=2, name="test-pull")
    pool.start()
    port_number = free_port()
    store = LocalStore(str(tmp_path / "store"), reactor, pool)
    site = make_site(store, node_config(port_number), Metrics(), dict, reactor)
    server = Node(f"http://127.0.0.1:{port_number}", store, tmp_path)

    def record(request: Any) -> None:
        byte_range = request.getHeader(b"range")
        server.requests.append(
            (request.uri.decode(), byte_range.decode() if byte_range else None, request.code)
        )

    site.log = record  # type: ignore[method-assign]
    port = await serverFromString(reactor, f"tcp:{port_number}:interface=127.0.0.1").listen(site)
    try:
        yield server
    finally:
        await defer.maybeDeferred(port.stopListening)
        pool.stop()


def http_args(node: Node, dest: Path) -> list[str]:
    return ["--set", "shared", "--dest", str(dest), "--http", node.base, "--token", SHARED_TOKEN]


def state_of(dest: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((dest / STATE_NAME).read_text())
    return doc


def assert_fetched(dest: Path, bundle: Bundle) -> None:
    path = dest / bundle.key
    assert path.read_bytes() == bundle.data
    assert not Path(str(path) + ".part").exists()


def leftovers(dest: Path) -> list[str]:
    return sorted(
        str(p.relative_to(dest))
        for p in dest.rglob("*")
        if p.name.endswith((".part", ".tmp"))
        or p.name.startswith(".")
        and p.name != STATE_NAME
        and not p.name.endswith(".lock")
    )


# --- the HTTP feed -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_http_feed_second_run_fetches_nothing_third_only_the_new(
    node: Node, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    first = [await node.add("shared", T0 + i * 60) for i in range(3)]
    private = await node.add("private", T0)

    code, err = await pull(*http_args(node, dest))
    assert (code, err) == (0, "")  # silent: stderr is no terminal
    for bundle in first:
        assert_fetched(dest, bundle)
    assert not (dest / "private").exists()
    assert private.key not in state_of(dest)["bundles"]
    assert sorted(r[0] for r in node.downloads()) == sorted(f"/bundles/{b.key}" for b in first)
    assert all(rng is None and status == 200 for _, rng, status in node.downloads())
    assert leftovers(dest) == []

    node.requests.clear()
    code, err = await pull(*http_args(node, dest))
    assert (code, err) == (0, "")
    assert node.downloads() == []
    assert any(r[0].startswith("/feeds/shared?") for r in node.requests)

    newest = await node.add("shared", T0 + 3600)
    node.requests.clear()
    code, err = await pull(*http_args(node, dest))
    assert (code, err) == (0, "")
    assert [r[0] for r in node.downloads()] == [f"/bundles/{newest.key}"]
    assert_fetched(dest, newest)

    state = state_of(dest)
    assert state["version"] == 1
    assert state["cursors"] == {"shared": newest.name[: -len(".mbox.gz")]}
    assert state["bundles"] == {
        b.key: {"size": len(b.data), "sha256": b.sha256} for b in [*first, newest]
    }


@pytest_twisted.ensureDeferred
async def test_http_feed_pages(node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("spamtrap.cli.pull_sources.PAGE", 2)
    bundles = [await node.add("shared", T0 + i, count=1) for i in range(5)]
    code, _ = await pull(*http_args(node, tmp_path / "dest"))
    assert code == 0
    for bundle in bundles:
        assert_fetched(tmp_path / "dest", bundle)
    pages = [r[0] for r in node.requests if r[0].startswith("/feeds/")]
    assert len(pages) == 3  # 2 + 2 + 1


@pytest_twisted.ensureDeferred
async def test_a_bundle_stored_late_behind_a_newer_one_is_still_fetched(
    node: Node, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    await node.add("shared", T0 + 7200)
    assert (await pull(*http_args(node, dest)))[0] == 0
    # Opened earlier (its key's time), stored later: a longer-lived shard.
    late = await node.add("shared", T0 + 3600)
    assert (await pull(*http_args(node, dest), "--overlap", "0"))[0] == 0
    assert not (dest / late.key).exists()  # key order alone misses it...
    assert (await pull(*http_args(node, dest)))[0] == 0
    assert_fetched(dest, late)  # ...the default overlap does not


@pytest_twisted.ensureDeferred
async def test_resume_completes_a_partial_download_with_a_range_request(
    node: Node, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    bundle = await node.add("shared", T0, count=3, padding=100_000)
    half = len(bundle.data) // 2
    (dest / "shared").mkdir(parents=True)
    (dest / f"{bundle.key}.part").write_bytes(bundle.data[:half])

    code, err = await pull(*http_args(node, dest))
    assert (code, err) == (0, "")
    assert node.downloads() == [(f"/bundles/{bundle.key}", f"bytes={half}-", 206)]
    assert_fetched(dest, bundle)
    assert state_of(dest)["bundles"][bundle.key]["sha256"] == bundle.sha256


class _CutOff(Protocol):
    """An HTTP server that sends half of the promised body, then hangs up."""

    body = b""

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body)
        transport.write(head + self.body[: len(self.body) // 2])
        transport.loseConnection()


def write_maildir(path: Path, *mails: bytes) -> str:
    box = mailbox.Maildir(path)
    for raw in mails:
        box.add(raw)
    box.close()
    return str(path)


@pytest_twisted.ensureDeferred
async def test_an_interrupted_download_is_resumed_by_the_next_run(
    node: Node, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    bundle = await node.add("shared", T0, count=3, padding=100_000)
    factory = Factory.forProtocol(_CutOff)
    _CutOff.body = bundle.data
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    try:
        flaky = f"http://127.0.0.1:{port.getHost().port}"
        mails = write_maildir(tmp_path / "flaky", notice(bundle, flaky))
        code, err = await pull("--set", "shared", "--dest", str(dest), "--mail", mails)
    finally:
        await defer.maybeDeferred(port.stopListening)
    assert code == 1
    assert "interrupted" in err and bundle.key in err
    part = dest / f"{bundle.key}.part"
    kept = part.read_bytes()
    assert 0 < len(kept) < len(bundle.data) and bundle.data.startswith(kept)
    assert not (dest / bundle.key).exists()

    # The next notice points at a working server: only the rest is fetched.
    mails = write_maildir(tmp_path / "good", notice(bundle, node.base))
    code, err = await pull("--set", "shared", "--dest", str(dest), "--mail", mails)
    assert (code, err) == (0, "")
    assert node.downloads() == [(f"/bundles/{bundle.key}", f"bytes={len(kept)}-", 206)]
    assert_fetched(dest, bundle)


@pytest_twisted.ensureDeferred
async def test_a_corrupt_partial_file_is_fetched_again_whole(node: Node, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    bundle = await node.add("shared", T0, count=3, padding=50_000)
    half = len(bundle.data) // 2
    (dest / "shared").mkdir(parents=True)
    (dest / f"{bundle.key}.part").write_bytes(b"\0" * half)

    code, err = await pull(*http_args(node, dest))
    assert (code, err) == (0, "")
    assert [(rng, status) for _, rng, status in node.downloads()] == [
        (f"bytes={half}-", 206),
        (None, 200),
    ]
    assert_fetched(dest, bundle)


@pytest_twisted.ensureDeferred
async def test_sha256_mismatch_deletes_the_file_and_fails(node: Node, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    good = await node.add("shared", T0)
    bad = await node.add("shared", T0 + 60)
    later = await node.add("shared", T0 + 120)
    served = node.path(bad.key)
    corrupt = bytearray(served.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF  # same size, other bytes
    served.write_bytes(bytes(corrupt))

    code, err = await pull(*http_args(node, dest))
    assert code == 1
    assert bad.key in err and "sha256" in err and "deleted" in err
    assert not (dest / bad.key).exists()
    assert not (dest / f"{bad.key}.part").exists()
    for bundle in (good, later):  # the others are still done
        assert_fetched(dest, bundle)
    state = state_of(dest)
    assert bad.key not in state["bundles"]
    # The cursor stops before the failure, so the next run looks again.
    assert state["cursors"]["shared"] == good.name[: -len(".mbox.gz")]

    served.write_bytes(bad.data)  # repaired at the source
    code, err = await pull(*http_args(node, dest))
    assert (code, err) == (0, "")
    assert_fetched(dest, bad)


@pytest.mark.parametrize(("token", "status"), [("wrong", "401"), (PRIVATE_TOKEN, "401")])
@pytest_twisted.ensureDeferred
async def test_a_wrong_token_fails_with_the_reason(
    node: Node, tmp_path: Path, token: str, status: str
) -> None:
    await node.add("shared", T0)
    code, err = await pull(
        "--set", "shared", "--dest", str(tmp_path / "d"), "--http", node.base, "--token", token
    )
    assert code == 1
    assert "set shared" in err and status in err
    assert node.downloads() == []


@pytest_twisted.ensureDeferred
async def test_two_sets_with_a_token_each(node: Node, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    shared = await node.add("shared", T0)
    private = await node.add("private", T0)
    code, err = await pull(
        "--set", "shared", "--set", "private", "--dest", str(dest), "--http", node.base,
        "--token", f"shared={SHARED_TOKEN}", "--token", f"private={PRIVATE_TOKEN}",
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert_fetched(dest, shared)
    assert_fetched(dest, private)


@pytest_twisted.ensureDeferred
async def test_progress_bar_only_when_asked_or_on_a_terminal(node: Node, tmp_path: Path) -> None:
    await node.add("shared", T0)
    await node.add("shared", T0 + 1)
    code, err = await pull(*http_args(node, tmp_path / "a"), "--progress")
    assert code == 0
    assert "\r[" in err and "2/2 bundles" in err
    assert err.rstrip().endswith("2 new bundle(s), 0.0 MB")


# --- unpacking --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unpack_maildir(node: Node, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    one = await node.add("shared", T0, count=3)
    code, err = await pull(*http_args(node, dest), "--unpack", "maildir")
    assert (code, err) == (0, "")
    box = mailbox.Maildir(dest / "shared" / "maildir", factory=None, create=False)
    assert sorted(box.get_bytes(k) for k in box.keys()) == sorted(one.messages)
    names = os.listdir(dest / "shared" / "maildir" / "new")
    assert all(n.count(".") >= 2 and ":" not in n for n in names)  # time.unique.host
    assert os.listdir(dest / "shared" / "maildir" / "tmp") == []

    two = await node.add("shared", T0 + 60, count=2)
    assert (await pull(*http_args(node, dest), "--unpack", "maildir"))[0] == 0
    box = mailbox.Maildir(dest / "shared" / "maildir", factory=None, create=False)
    assert sorted(box.get_bytes(k) for k in box.keys()) == sorted(one.messages + two.messages)
    assert state_of(dest)["bundles"][two.key]["unpacked"] == {"maildir": True}

    # Interrupted after the download, before the unpack was recorded: the
    # next run unpacks it again, into the same names (no copies).
    state = state_of(dest)
    state["bundles"][two.key]["unpacked"]["maildir"] = False
    (dest / STATE_NAME).write_text(json.dumps(state))
    assert (await pull(*http_args(node, dest), "--unpack", "maildir"))[0] == 0
    assert len(os.listdir(dest / "shared" / "maildir" / "new")) == 5


@pytest_twisted.ensureDeferred
async def test_unpack_mbox(node: Node, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    one = await node.add("shared", T0, count=3)
    two = await node.add("shared", T0 + 60, count=2)
    code, err = await pull(*http_args(node, dest), "--unpack", "mbox")
    assert (code, err) == (0, "")
    target = dest / "shared" / "shared.mbox"
    expected = one.messages + two.messages
    assert [m for _, m in mbox.read_mbox(str(target))] == expected
    # Python's mailbox reads it too (it does not undo mboxrd quoting).
    box = mailbox.mbox(target, create=False)
    subjects = [email.message_from_bytes(box.get_bytes(k))["Subject"] for k in box.keys()]
    assert subjects == [f"offer {i}" for i in range(5)]

    # An append cut short: junk after the offset recorded for the bundle.
    state = state_of(dest)
    state["bundles"][two.key]["unpacked"]["mbox"] = False
    (dest / STATE_NAME).write_text(json.dumps(state))
    with open(target, "ab") as f:
        f.write(b"From half-written\n")
    assert (await pull(*http_args(node, dest), "--unpack", "mbox"))[0] == 0
    assert [m for _, m in mbox.read_mbox(str(target))] == expected


# --- list notices by mail ---------------------------------------------------------


def notice(bundle: Bundle, url: str, msgid: str = "", **fields: str | None) -> bytes:
    body = {
        "Set": bundle.key.split("/")[0],
        "Key": bundle.key,
        "URL": f"{url}/bundles/{bundle.key}",
        "Size": str(len(bundle.data)),
        "SHA256": bundle.sha256,
        "Messages": str(len(bundle.messages)),
        "First-Received": "2026-01-01T00:00:00Z",
        "Last-Received": "2026-01-01T00:00:10Z",
        "Node": "node1",
        "Format": "1",
    }
    for name, value in fields.items():
        if value is None:
            body.pop(name.replace("_", "-"), None)
        else:
            body[name.replace("_", "-")] = value
    text = "".join(f"{k}: {v}\n" for k, v in body.items())
    return (
        (f"Message-ID: {msgid}\n" if msgid else "")
        + f"From: spamtrap@trap.example\nTo: shared-list@example.org\n"
        f"Subject: [spamtrap] new bundle in {body.get('Set')}\n"
        f"Content-Type: text/plain; charset=us-ascii\n\n{text}"
    ).encode()


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
@pytest_twisted.ensureDeferred
async def test_mail_notices(node: Node, tmp_path: Path, kind: str) -> None:
    a = await node.add("shared", T0)
    b = await node.add("shared", T0 + 60)
    c = await node.add("shared", T0 + 120)
    private = await node.add("private", T0)
    c_manifest = f"/bundles/{manifest_key(c.key)}?from=notice"
    mails = [
        notice(a, node.base),
        notice(b, node.base, SHA256=None, Size=None),  # from the manifest
        # from the manifest the notice names
        notice(c, node.base, SHA256=None, Manifest_URL=node.base + c_manifest),
        notice(private, node.base),  # another set's list
        notice(private, node.base, URL=None),  # another set's: not this run's problem
        notice(a, node.base, URL=None),  # a good notice of the same key is enough
        b"From: friend@example.org\nSubject: hello\n\nnot a notice\n",
    ]
    path = tmp_path / "notices"
    if kind == "maildir":
        write_maildir(path, *mails)
    else:
        box = mailbox.mbox(path)
        for raw in mails:
            box.add(raw)
        box.close()

    dest = tmp_path / "dest"
    code, err = await pull("--set", "shared", "--dest", str(dest), "--mail", str(path))
    assert (code, err) == (0, "")
    assert_fetched(dest, a)
    assert_fetched(dest, b)
    assert_fetched(dest, c)
    assert not (dest / "private").exists()
    assert sorted(r[0] for r in node.requests) == sorted(
        [f"/bundles/{a.key}", f"/bundles/{b.key}", f"/bundles/{manifest_key(b.key)}"]
        + [f"/bundles/{c.key}", c_manifest]
    )
    assert sorted(state_of(dest)["bundles"]) == sorted([a.key, b.key, c.key])

    node.requests.clear()
    assert (await pull("--set", "shared", "--dest", str(dest), "--mail", str(path)))[0] == 0
    assert node.requests == []


async def add_indexed(node: Node, set_name: str, when: float) -> tuple[Bundle, bytes]:
    """A bundle stored with an index, as BundleSet stores one; its index."""
    messages = [message(node.counter + i) for i in range(2)]
    node.counter += 2
    key = bundle_key(set_name, when, "node1")
    bundle = Bundle(key, gzip_mbox(messages, when), messages)
    lines = [{"offset": i, "length": 1, "id": f"{key}:{i}"} for i in range(2)]
    index = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    source = node.tmp / f"upload-{node.counter}.tmp"
    index_file = node.tmp / f"upload-{node.counter}.index.tmp"
    source.write_bytes(bundle.data)
    index_file.write_bytes(index)
    doc = json.loads(manifest(key, bundle.data, len(messages), when))
    doc |= {"index": index_name(bundle.name), "index_sha256": hashlib.sha256(index).hexdigest()}
    await node.store.put(key, str(source), json.dumps(doc).encode(), str(index_file))
    return bundle, index


@pytest_twisted.ensureDeferred
async def test_mail_notices_bring_the_bundles_index_checked(node: Node, tmp_path: Path) -> None:
    good, good_index = await add_indexed(node, "shared", T0)
    forged, _ = await add_indexed(node, "shared", T0 + 60)
    sha = hashlib.sha256(good_index).hexdigest()
    path = write_maildir(
        tmp_path / "notices",
        notice(good, node.base, Index=index_name(good.name), Index_SHA256=sha),
        # A notice whose index sha256 is not the index's: the index is not kept.
        notice(forged, node.base, Index=index_name(forged.name), Index_SHA256=sha),
    )
    dest = tmp_path / "dest"
    code, err = await pull("--set", "shared", "--dest", str(dest), "--mail", path)
    assert code == 1
    assert err.splitlines() == [
        f"spamtrap pull: {forged.key}: the index's sha256 does not match the manifest; "
        "it was not kept"
    ]
    assert (dest / index_key(good.key)).read_bytes() == good_index
    assert state_of(dest)["bundles"][good.key]["index_sha256"] == sha
    assert not (dest / index_key(forged.key)).exists()
    assert forged.key not in state_of(dest)["bundles"]  # the next run tries again
    assert leftovers(dest) == []
    # Only the bundles and their indexes: the notices said all, no manifest.
    assert sorted(r[0] for r in node.requests) == sorted(
        f"/bundles/{k}" for b in (good, forged) for k in (b.key, index_key(b.key))
    )


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
@pytest_twisted.ensureDeferred
async def test_notices_that_cannot_be_followed_are_errors_naming_them(
    node: Node, tmp_path: Path, kind: str
) -> None:
    good = await node.add("shared", T0)
    lost = [await node.add("shared", T0 + 60 * i) for i in range(1, 7)]
    other = await node.add("private", T0)
    mangled = (
        b"Message-ID: <mangled@test>\nSubject: [list] [spamtrap] shared: 2 messages, x..y\n"
        b"Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\n!!! not base64 !!!\n"
    )
    mails = [
        notice(good, node.base, msgid="<good@test>"),
        notice(lost[0], node.base, msgid="<no-url@test>", URL=None),
        notice(lost[1], node.base, msgid="<ftp@test>", URL=f"ftp://127.0.0.1/{lost[1].key}"),
        notice(lost[2], node.base, msgid="<path@test>", Key="shared/../../../etc/passwd.mbox.gz"),
        notice(lost[3], node.base, msgid="<sha@test>", SHA256="abc"),
        notice(lost[4], node.base, msgid="<size@test>", Size="-5"),
        notice(lost[5], node.base, msgid="<murl@test>", Manifest_URL="file:///etc/passwd"),
        notice(other, node.base, msgid="<other@test>", URL=None),  # not a followed set
        mangled,
    ]
    path = tmp_path / "notices"
    if kind == "maildir":
        write_maildir(path, *mails)
    else:
        box = mailbox.mbox(path)
        for raw in mails:
            box.add(raw)
        box.close()
    dest = tmp_path / "dest"
    code, err = await pull("--set", "shared", "--dest", str(dest), "--mail", str(path))
    assert code == 1
    lines = err.splitlines()
    expected = {
        "<no-url@test>": f"({lost[0].key}): no URL",
        "<ftp@test>": "is not an http(s) URL",
        "<path@test>": "'shared/../../../etc/passwd.mbox.gz' is not a bundle key",
        "<sha@test>": "the sha256 'abc' is not 64 hex digits",
        "<size@test>": "the size '-5' is not a number of bytes",
        "<murl@test>": "the manifest URL 'file:///etc/passwd' is not an http(s) URL",
        "<mangled@test>": "a notice of set shared without a Key field",
    }
    assert len(lines) == len(expected), err
    for msgid, text in expected.items():
        (line,) = [ln for ln in lines if f"notice {msgid}" in ln]
        assert text in line and line.startswith("spamtrap pull: "), line
    assert "<other@test>" not in err and "<good@test>" not in err
    assert_fetched(dest, good)
    assert sorted(state_of(dest)["bundles"]) == [good.key]
    assert [r[0] for r in node.downloads()] == [f"/bundles/{good.key}"]


@pytest_twisted.ensureDeferred
async def test_unpack_catches_up_on_bundles_fetched_without_it_once(
    node: Node, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    one = await node.add("shared", T0, count=3)
    two = await node.add("shared", T0 + 60, count=2)
    gone = await node.add("shared", T0 + 120, count=1)
    corrupt = await node.add("shared", T0 + 180, count=1)
    assert (await pull(*http_args(node, dest)))[0] == 0
    assert not (dest / "shared" / "shared.mbox").exists()
    (dest / gone.key).unlink()  # processed and thrown away, as docs/pull.md allows
    (dest / corrupt.key).write_bytes(b"changed since")
    three = await node.add("shared", T0 + 240, count=2)

    node.requests.clear()
    code, err = await pull(*http_args(node, dest), "--unpack", "mbox")
    assert code == 1
    assert err.splitlines() == [
        f"spamtrap pull: {corrupt.key}: {dest / corrupt.key} no longer matches its size "
        "and sha256; not unpacked"
    ]
    target = dest / "shared" / "shared.mbox"
    # Older bundles first, then the new one; the deleted one is not fetched again.
    unpacked = [m for _, m in mbox.read_mbox(str(target))]
    assert unpacked == one.messages + two.messages + three.messages
    assert [r[0] for r in node.downloads()] == [f"/bundles/{three.key}"]
    bundles = state_of(dest)["bundles"]
    assert bundles[one.key]["unpacked"] == {"mbox": True}
    assert "unpacked" not in bundles[gone.key] and "unpacked" not in bundles[corrupt.key]

    # Once, not twice: the next runs append nothing again.
    (dest / corrupt.key).write_bytes(corrupt.data)  # repaired: now it is unpacked
    assert (await pull(*http_args(node, dest), "--unpack", "mbox")) == (0, "")
    assert (await pull(*http_args(node, dest), "--unpack", "mbox")) == (0, "")
    assert [m for _, m in mbox.read_mbox(str(target))] == (
        one.messages + two.messages + three.messages + corrupt.messages
    )

    # Another target is a target of its own; a run without --unpack leaves both.
    assert (await pull(*http_args(node, dest))) == (0, "")
    assert not (dest / "shared" / "maildir").exists()
    assert (await pull(*http_args(node, dest), "--unpack", "maildir")) == (0, "")
    box = mailbox.Maildir(dest / "shared" / "maildir", factory=None, create=False)
    assert len(box) == 3 + 2 + 2 + 1
    assert state_of(dest)["bundles"][one.key]["unpacked"] == {"mbox": True, "maildir": True}
    for name in os.listdir(dest / "shared" / "maildir" / "new"):
        os.unlink(dest / "shared" / "maildir" / "new" / name)
    assert (await pull(*http_args(node, dest), "--unpack", "maildir")) == (0, "")
    assert os.listdir(dest / "shared" / "maildir" / "new") == []  # not unpacked twice


@pytest_twisted.ensureDeferred
async def test_a_state_file_of_the_one_target_format_is_read(node: Node, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    one = await node.add("shared", T0, count=2)
    assert (await pull(*http_args(node, dest), "--unpack", "mbox")) == (0, "")
    state = state_of(dest)
    state["bundles"][one.key].update(unpack="mbox", unpacked=True)  # as older pulls wrote it
    (dest / STATE_NAME).write_text(json.dumps(state))
    assert (await pull(*http_args(node, dest), "--unpack", "mbox")) == (0, "")
    assert len(mbox.read_mbox(str(dest / "shared" / "shared.mbox"))) == 2
    assert state_of(dest)["bundles"][one.key]["unpacked"] == {"mbox": True}

    state["bundles"][one.key]["unpacked"] = {"zip": True}
    (dest / STATE_NAME).write_text(json.dumps(state))
    code, err = await pull(*http_args(node, dest))
    assert code == 1 and f"{one.key}: 'unpacked' is not a map of" in err


WIRE_MESSAGES = [
    b"Subject: crlf\r\nFrom: a@spam.example\r\n\r\nFrom the desk\r\nline\r\n",
    b"Subject: crlf with a stray CR\r\n\r\nbefore\r\r\nafter\rx\r\n",
    b"Subject: bare lf\n\nline one\nline two\n",
    b"Subject: mixed\r\n\r\none\ntwo\r\n",
]


@pytest.mark.parametrize("line_endings", ["unix", "wire"])
@pytest_twisted.ensureDeferred
async def test_unpack_wire_rebuilds_the_bytes_sent(
    node: Node, tmp_path: Path, line_endings: str
) -> None:
    messages = [stored(m, line_endings) for m in WIRE_MESSAGES]
    if line_endings == "unix":
        assert b"\r\n" not in messages[0]  # stored with LF: the test means something
    key = bundle_key("shared", T0, "node1")
    data = gzip_mbox(messages, T0)
    (tmp_path / "up").write_bytes(data)
    await node.store.put(key, str(tmp_path / "up"), manifest(key, data, len(messages), T0))
    dest = tmp_path / "dest"
    assert (await pull(*http_args(node, dest), "--unpack", "maildir", "--wire")) == (0, "")
    box = mailbox.Maildir(dest / "shared" / "wire", factory=None, create=False)
    assert sorted(box.get_bytes(k) for k in box.keys()) == sorted(WIRE_MESSAGES)
    assert state_of(dest)["bundles"][key]["unpacked"] == {"wire": True}
    assert not (dest / "shared" / "maildir").exists()
    # The stored form is still there to unpack, beside the wire form.
    assert (await pull(*http_args(node, dest), "--unpack", "maildir")) == (0, "")
    box = mailbox.Maildir(dest / "shared" / "maildir", factory=None, create=False)
    assert sorted(box.get_bytes(k) for k in box.keys()) == sorted(messages)


@pytest_twisted.ensureDeferred
async def test_unpack_wire_skips_and_reports_a_message_not_stored_by_spamtrap(
    node: Node, tmp_path: Path
) -> None:
    # The second of three has no metadata block (a foreign mbox, a mangled
    # copy): it has no wire bytes to give, and must not cost the others.
    messages = [stored(WIRE_MESSAGES[0], "unix"), message(7), stored(WIRE_MESSAGES[2], "unix")]
    key = bundle_key("shared", T0, "node1")
    data = gzip_mbox(messages, T0)
    (tmp_path / "up").write_bytes(data)
    await node.store.put(key, str(tmp_path / "up"), manifest(key, data, len(messages), T0))
    dest = tmp_path / "dest"
    code, err = await pull(*http_args(node, dest), "--unpack", "maildir", "--wire")
    assert code == 1
    assert (
        f"{key}: unpacking (wire): message 2 (<7@example.net>) skipped, no wire bytes: "
        "no trap-hop Received field"
    ) in err
    assert err.count("skipped") == 1
    box = mailbox.Maildir(dest / "shared" / "wire", factory=None, create=False)
    assert sorted(box.get_bytes(k) for k in box.keys()) == sorted(
        [WIRE_MESSAGES[0], WIRE_MESSAGES[2]]
    )
    # Done: the next run neither retries it nor fails again.
    assert state_of(dest)["bundles"][key]["unpacked"] == {"wire": True}
    assert (await pull(*http_args(node, dest), "--unpack", "maildir", "--wire")) == (0, "")
    assert len(box.keys()) == 2


@pytest_twisted.ensureDeferred
async def test_unpack_wire_counts_what_it_does_not_name(node: Node, tmp_path: Path) -> None:
    from spamtrap.cli.pull import MAX_SKIPPED_REPORTED

    count = MAX_SKIPPED_REPORTED + 3
    bundle = await node.add("shared", T0, count=count)  # no metadata blocks at all
    dest = tmp_path / "dest"
    code, err = await pull(*http_args(node, dest), "--unpack", "maildir", "--wire")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == MAX_SKIPPED_REPORTED + 1
    assert lines[-1].endswith(
        f"{bundle.key}: unpacking (wire): 3 more messages skipped ({count} in all)"
    )
    assert state_of(dest)["bundles"][bundle.key]["unpacked"] == {"wire": True}


# --- the state file and usage ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_damaged_state_file_stops_the_run_and_is_kept(node: Node, tmp_path: Path) -> None:
    await node.add("shared", T0)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / STATE_NAME).write_text("{not json")
    code, err = await pull(*http_args(node, dest))
    assert code == 1
    assert STATE_NAME in err
    assert (dest / STATE_NAME).read_text() == "{not json"
    assert node.downloads() == []


# --- S3 (moto server) --------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        pytest.skip("SKIPPED LOUDLY: moto_server is not installed (pip install moto[server])")
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        def answers() -> bool:  # a real process: poll its port, there is no clock to inject
            assert proc.poll() is None, f"moto_server exited with {proc.returncode}"
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True

        wait_until(answers, 30, "moto_server to listen", retry_on=(OSError,))
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3(moto: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    import botocore.session

    client = botocore.session.get_session().create_client("s3", endpoint_url=moto)
    bucket = f"traps-{os.getpid()}-{time.monotonic_ns()}"
    client.create_bucket(Bucket=bucket)
    yield client, bucket


def s3_put(client: Any, bucket: str, prefix: str, set_name: str, when: float, n: int) -> Bundle:
    messages = [message(n + i, padding=20_000) for i in range(2)]
    key = bundle_key(set_name, when, "node1")
    data = gzip_mbox(messages, when)
    client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)
    client.put_object(
        Bucket=bucket, Key=f"{prefix}/{manifest_key(key)}", Body=manifest(key, data, 2, when)
    )
    return Bundle(key, data, messages)


def test_s3_source(s3: Any, moto: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client, bucket = s3
    dest = tmp_path / "dest"
    a = s3_put(client, bucket, "spam", "shared", T0, 0)
    b = s3_put(client, bucket, "spam", "shared", T0 + 60, 10)
    s3_put(client, bucket, "spam", "private", T0, 20)
    # An object whose manifest is not there yet: an upload in progress.
    unfinished = bundle_key("shared", T0 + 120, "node1")
    client.put_object(Bucket=bucket, Key=f"spam/{unfinished}", Body=b"partial")
    # Half of b already here: resumed with a Range GET.
    (dest / "shared").mkdir(parents=True)
    (dest / f"{b.key}.part").write_bytes(b.data[: len(b.data) // 2])

    argv = ["--set", "shared", "--dest", str(dest), "--s3", f"s3://{bucket}/spam/"]
    err = io.StringIO()
    assert run(parse([*argv, "--endpoint", moto]), err) == 0, err.getvalue()
    assert_fetched(dest, a)
    assert_fetched(dest, b)
    assert not (dest / unfinished).exists()
    assert not (dest / "private").exists()

    # The endpoint from the environment, as the AWS tools take it.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto)
    (dest / a.key).unlink()  # the state, not the file, says what is done
    assert run(parse(argv), err) == 0, err.getvalue()
    assert not (dest / a.key).exists()
    c = s3_put(client, bucket, "spam", "shared", T0 + 180, 30)
    assert run(parse(argv), err) == 0, err.getvalue()
    assert_fetched(dest, c)


def test_s3_without_credentials_fails_clearly(
    s3: Any, moto: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, bucket = s3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "")
    err = io.StringIO()
    argv = ["--set", "shared", "--dest", str(tmp_path / "d"), "--s3", f"s3://{bucket}/spam"]
    assert run(parse([*argv, "--endpoint", moto]), err) == 1
    assert "set shared" in err.getvalue()


# -- remote manifests ----------------------------------------------------------------


