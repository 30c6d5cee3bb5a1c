"""The HTTP side on a real listening Site on 127.0.0.1:

- traversal attempts go out as raw bytes on a socket, because HTTP clients
  (StubTreq's included) normalise "..", and the point is what the server
  does with what an attacker really sends;
- the Range tests count the bytes a real transport sends, with static.File's
  producers paced by it, and HEAD is checked on the wire (Content-Length
  without a body);
- the ``Server: spamtrap`` header is set by spamtrap's own Site, which
  StubTreq replaces with a plain one;
- the real LocalStore test checks that a listing runs in the store's own
  pool thread, not in the reactor thread.

FakeStore.open_download trusts its key (it only joins and checks
existence), so the traversal tests prove web.py's own checks; the
LocalStore test proves the combination with the real store."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from twisted.python.threadpool import ThreadPool

from spamtrap.bundle.manifest import Manifest
from spamtrap.metrics import Metrics
from spamtrap.web import make_site
from spamtrap.web.ranges import MAX_RANGES
from tests.support.web import (
    NAME,
    SECRET,
    TOKEN,
    FakeStore,
    Layout,
    build_store,
    header,
    make_config,
    manifest_for,
    private_manifests,
)


@dataclass
class Server:
    base: str
    port: int
    layout: Layout
    store: Any
    metrics: Metrics
    health: dict[str, Any]


async def start_server(
    stack: list[Callable[[], Any]], store_factory: Callable[[Layout, ThreadPool], Any], base: Path
) -> Server:
    layout = build_store(base)
    pool = ThreadPool(minthreads=1, maxthreads=2, name="test-web")  # the store's own
    pool.start()
    stack.append(pool.stop)
    store = store_factory(layout, pool)
    metrics = Metrics()
    health: dict[str, Any] = {"status": "ok"}
    site = make_site(store, make_config(), metrics, lambda: dict(health), reactor)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
    stack.append(port.stopListening)
    number = port.getHost().port
    return Server(f"http://127.0.0.1:{number}", number, layout, store, metrics, health)


async def unwind(stack: list[Callable[[], Any]]) -> None:
    while stack:
        await defer.maybeDeferred(stack.pop())


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path):
    stack: list[Callable[[], Any]] = []
    try:
        yield await start_server(
            stack,
            lambda layout, pool: FakeStore(
                layout.root, {"private": private_manifests()}, pool, reactor
            ),
            tmp_path,
        )
    finally:
        await unwind(stack)


async def fetch(method: str, url: str, **kwargs: Any) -> tuple[Any, bytes]:
    response = await treq.request(method, url, persistent=False, **kwargs)
    body = await treq.content(response)
    return response, body


class _RawClient(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport  # an ITransport; mypy lacks mypy-zope
        transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(self.received)


async def raw_request(port: int, method: bytes, target: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``target`` byte for byte, as no normalising client would."""
    request = method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    client = _RawClient(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    data = await client.done
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


@pytest_twisted.ensureDeferred
async def test_every_response_names_spamtrap_as_the_server(server: Server) -> None:
    # On a real socket: StubTreq serves the tree with its own Site.
    for method, path in [
        ("GET", f"/bundles/all/{NAME}.mbox.gz"),
        ("GET", f"/bundles/all/{NAME[:-1]}X.mbox.gz"),
        ("GET", "/nope"),
        ("POST", "/metrics"),
        ("GET", "/healthz"),
    ]:
        response, _ = await fetch(method, server.base + path)
        assert header(response, "server") == "spamtrap", (method, path)


@pytest_twisted.ensureDeferred
async def test_head_gives_headers_without_body(server: Server) -> None:
    target = f"/bundles/all/{NAME}.mbox.gz".encode()
    status, headers, body = await raw_request(server.port, b"HEAD", target)
    assert status == 200
    assert body == b""
    assert headers["content-length"] == str(len(server.layout.bundle))
    assert headers["content-type"] == "application/gzip"
    assert headers["cache-control"] == "public, max-age=31536000, immutable"
    assert headers["server"] == "spamtrap"


@pytest_twisted.ensureDeferred
async def test_range_request_resumes_a_download(server: Server) -> None:
    size = len(server.layout.bundle)
    response, body = await fetch(
        "GET",
        f"{server.base}/bundles/all/{NAME}.mbox.gz",
        headers={"Range": "bytes=100000-"},
    )
    assert response.code == 206
    assert body == server.layout.bundle[100000:]
    assert header(response, "content-range") == f"bytes 100000-{size - 1}/{size}"


async def ranged(port: int, spec: str, method: bytes = b"GET") -> tuple[int, dict[str, str], bytes]:
    """A raw request with ``Range: spec``; the answer as sent, every byte counted."""
    request = (
        method
        + f" /bundles/all/{NAME}.mbox.gz HTTP/1.1\r\nHost: x\r\n"
        f"Range: {spec}\r\nConnection: close\r\n\r\n".encode()
    )
    client = _RawClient(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    data = await client.done
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {n.strip().lower(): v.strip() for n, _, v in (ln.partition(":") for ln in lines)}
    if method != b"HEAD":
        assert int(headers["content-length"]) == len(body), "the body is cut short or overlong"
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("count", [2, 100, 1000])
@pytest_twisted.ensureDeferred
async def test_overlapping_ranges_send_the_file_once(server: Server, count: int) -> None:
    bundle = server.layout.bundle
    status, headers, body = await ranged(server.port, "bytes=" + ",".join(["0-"] * count))
    assert (status, body) == (206, bundle)
    assert headers["content-range"] == f"bytes 0-{len(bundle) - 1}/{len(bundle)}"


@pytest_twisted.ensureDeferred
async def test_overlapping_and_adjacent_ranges_are_joined(server: Server) -> None:
    bundle = server.layout.bundle
    # 0-99 and 50-149 overlap, 150-199 touches them, 5000- and -1000 overlap at the end.
    spec = "bytes=50-149, 0-99,150-199,5000-,-1000"
    status, headers, body = await ranged(server.port, spec)
    assert status == 206
    assert multipart_parts(headers, body) == [
        (f"bytes 0-199/{len(bundle)}", bundle[:200]),
        (f"bytes 5000-{len(bundle) - 1}/{len(bundle)}", bundle[5000:]),
    ]
    assert len(body) < len(bundle)


@pytest_twisted.ensureDeferred
async def test_two_disjoint_ranges_are_a_multipart_answer(server: Server) -> None:
    bundle = server.layout.bundle
    status, headers, body = await ranged(server.port, "bytes=0-9,200000-200099")
    assert status == 206
    assert multipart_parts(headers, body) == [
        (f"bytes 0-9/{len(bundle)}", bundle[:10]),
        (f"bytes 200000-200099/{len(bundle)}", bundle[200000:200100]),
    ]


@pytest.mark.parametrize(
    ("spec", "first", "last"),
    [
        ("bytes=100-199", 100, 199),
        ("bytes=-500", -500, None),  # a suffix: the last 500 bytes
        ("bytes=-999999999", 0, None),  # a suffix longer than the file: all of it
        ("bytes=299990-999999999", 299990, None),  # past the end: up to the end
    ],
)
@pytest_twisted.ensureDeferred
async def test_single_and_suffix_ranges(
    server: Server, spec: str, first: int, last: int | None
) -> None:
    bundle = server.layout.bundle
    status, headers, body = await ranged(server.port, spec)
    want = bundle[first : None if last is None else last + 1]
    start = first % len(bundle)
    assert (status, body) == (206, want)
    assert headers["content-range"] == f"bytes {start}-{start + len(want) - 1}/{len(bundle)}"


@pytest_twisted.ensureDeferred
async def test_too_many_separate_ranges_get_the_whole_file_once(server: Server) -> None:
    bundle = server.layout.bundle
    spec = "bytes=" + ",".join(f"{i * 1000}-{i * 1000 + 9}" for i in range(MAX_RANGES + 1))
    status, headers, body = await ranged(server.port, spec)
    assert (status, body) == (200, bundle)
    assert "content-range" not in headers
    # At the limit the parts are still sent, each once.
    spec = "bytes=" + ",".join(f"{i * 1000}-{i * 1000 + 9}" for i in range(MAX_RANGES))
    status, headers, body = await ranged(server.port, spec)
    assert status == 206
    assert [p for _, p in multipart_parts(headers, body)] == [
        bundle[i * 1000 : i * 1000 + 10] for i in range(MAX_RANGES)
    ]


@pytest.mark.parametrize(
    "spec",
    ["bytes=abc", "bytes=", "bytes=5-1", "items=0-1", "bytes=--1", "bytes=0-1;x", "bytes=1-2-3"],
)
@pytest_twisted.ensureDeferred
async def test_malformed_ranges_are_ignored(server: Server, spec: str) -> None:
    status, headers, body = await ranged(server.port, spec)
    assert (status, body) == (200, server.layout.bundle)


@pytest_twisted.ensureDeferred
async def test_unsatisfiable_range_is_416(server: Server) -> None:
    size = len(server.layout.bundle)
    for spec in (f"bytes={size}-", f"bytes={size}-,{size + 5}-{size + 9}", "bytes=-0"):
        status, headers, body = await ranged(server.port, spec)
        assert (status, body, headers["content-range"]) == (416, b"", f"bytes */{size}")


@pytest_twisted.ensureDeferred
async def test_head_with_many_ranges_sends_no_body(server: Server) -> None:
    status, headers, body = await ranged(server.port, "bytes=" + ",".join(["0-"] * 500), b"HEAD")
    # static.File answers a HEAD with the whole file's headers, ranges or not.
    assert (status, body) == (200, b"")
    assert headers["content-length"] == str(len(server.layout.bundle))


@pytest_twisted.ensureDeferred
async def test_traversal_attempts_are_404_and_never_read_outside(server: Server) -> None:
    for target in TRAVERSALS:
        for method in (b"GET", b"HEAD"):
            status, headers, body = await raw_request(server.port, method, target)
            assert status == 404, target
            assert SECRET not in body, target
            assert headers["server"] == "spamtrap"


@pytest_twisted.ensureDeferred
async def test_real_local_store_listing_and_downloads(tmp_path: Path) -> None:
    from spamtrap.store import bundle_key, manifest_key
    from spamtrap.store.local import LocalStore

    class RecordingLocalStore(LocalStore):
        listed_in_reactor_thread: list[bool] = []

        def read_manifests(self, set_name: str) -> list[Manifest]:
            self.listed_in_reactor_thread.append(isInIOThread())
            return super().read_manifests(set_name)

    assert isInIOThread()  # else the "not in the reactor thread" check below proves nothing
    stack: list[Callable[[], Any]] = []
    try:
        srv = await start_server(
            stack,
            lambda layout, pool: RecordingLocalStore(str(layout.root), reactor, pool),
            tmp_path,
        )
        # Stored out of order: the listing must still come newest first.
        keys = []
        for when in (1767225600, 1772323200, 1769904000):
            key = bundle_key("private", when, "node1")
            data = gzip.compress(key.encode() * 100)
            source = tmp_path / f"upload-{when}.tmp"  # put() may hard-link it
            source.write_bytes(data)
            manifest = manifest_for(key, data).to_json_bytes()
            await srv.store.put(key, str(source), manifest)
            keys.append(key)

        auth = {"Authorization": f"Bearer {TOKEN}"}
        response, body = await fetch("GET", f"{srv.base}/bundles/private/", headers=auth)
        assert response.code == 200
        listed = json.loads(body)["bundles"]
        assert [b["key"] for b in listed] == [keys[1], keys[2], keys[0]]
        # In the store's own pool thread: not the reactor, not the filters.
        assert srv.store.listed_in_reactor_thread == [False]

        for entry in listed:
            assert entry["url"].startswith("https://spam.example:8443/bundles/private/")
            path = entry["url"][len("https://spam.example:8443") :]
            response, data = await fetch("GET", srv.base + path)
            assert response.code == 200
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
            response, manifest = await fetch(
                "GET", f"{srv.base}/bundles/{manifest_key(entry['key'])}"
            )
            assert json.loads(manifest)["key"] == entry["key"]

        for target in TRAVERSALS:
            status, _, body = await raw_request(srv.port, b"GET", target)
            assert status == 404, target
            assert SECRET not in body
    finally:
        await unwind(stack)


def multipart_parts(headers: dict[str, str], body: bytes) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part of a multipart/byteranges body."""
    kind, _, boundary = headers["content-type"].partition("; boundary=")
    assert kind == "multipart/byteranges"
    boundary = boundary.strip('"')
    parts = []
    for chunk in body.split(b"\r\n--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        part_head, _, part_body = chunk.partition(b"\r\n\r\n")
        fields = [ln.partition(":") for ln in part_head.decode().split("\r\n")]
        (found,) = [value.strip() for name, _, value in fields if name.lower() == "content-range"]
        parts.append((found, part_body))
    return parts


TRAVERSALS = [
    b"/bundles/../secret.mbox.gz",
    b"/bundles/all/../../secret.mbox.gz",
    b"/bundles/all/../../all.mbox.gz",
    b"/bundles/%2e%2e/secret.mbox.gz",
    b"/bundles/%2E%2E/secret.json",
    b"/bundles/all/%2e%2e%2f%2e%2e%2fsecret.mbox.gz",
    b"/bundles/all/..%2f..%2fsecret.mbox.gz",
    b"/bundles/..%2fsecret.mbox.gz/x",
    b"/bundles/all/..%5c..%5csecret.mbox.gz",
    b"/bundles/all/..\\..\\secret.mbox.gz",
    b"/bundles//secret.mbox.gz",
    b"/bundles/all//" + NAME.encode() + b".mbox.gz",
    b"/bundles/all/" + NAME.encode() + b".mbox.gz%00.txt",
    b"/bundles/all/" + NAME.encode() + b"%00.mbox.gz",
    b"/bundles/%2fetc%2fpasswd/x",
    b"/bundles/all/%2fetc%2fpasswd",
    b"/bundles/all/evil.mbox.gz",  # symlink out of the store
    b"/bundles/all/../all/" + NAME.encode() + b".mbox.gz",  # not canonical
    b"/bundles/all/./" + NAME.encode() + b".mbox.gz",
    b"/bundles/all/.%2e/secret.mbox.gz",
    b"/bundles/all/.partial.mbox.gz",
    # A stored key, but through a path that is not the key.
    b"/bundles/private/..%2fall%2f" + NAME.encode() + b".mbox.gz",
    b"/bundles/all%2f." + b"/" + NAME.encode() + b".mbox.gz",
]
