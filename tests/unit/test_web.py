"""The HTTP side: downloads, listings, metrics and health, in memory.

The tests drive the resource tree (``make_root``) with treq's ``StubTreq``:
real HTTP requests and responses, in memory, no socket. The store's pool
there is a ``SyncPool``, so a listing is answered at once. The property test
and the tests of delayed answers drive the tree with DummyRequest and a pool
that runs when the test says so.

What only a listening Site shows (raw traversal bytes, Range pacing, HEAD on
the wire, the Server header, the real LocalStore's pool) is in
tests/integration/test_web.py."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from spamtrap.bundle.manifest import Manifest
from spamtrap.interfaces import Store
from spamtrap.metrics import Metrics
from spamtrap.store import LocalFile
from spamtrap.testing import MemoryStore
from spamtrap.web import make_root, make_site
from spamtrap.web.ranges import MAX_RANGES, plan_ranges
from tests.support.web import (
    NAME,
    PRIVATE_NAMES,
    SECRET,
    SHARED_TOKEN,
    TOKEN,
    FakeStore,
    InlineReactor,
    Layout,
    build_store,
    header,
    listing_request,
    make_config,
    manifest_for,
    private_manifests,
    render,
)


def test_fake_store_keeps_the_contract(tmp_path: Path) -> None:
    store: Store = FakeStore(tmp_path, {})  # mypy checks the contract
    assert isinstance(store, Store)


# --- the real server on loopback ---------------------------------------------


# --- the resource tree in memory (StubTreq) ----------------------------------

BASE = "http://spamtrap.test"


@dataclass
class Web:
    """make_root over a FakeStore, driven by StubTreq."""

    stub: StubTreq
    layout: Layout
    store: FakeStore
    metrics: Metrics
    health: dict[str, Any]

    async def fetch(self, method: str, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        response = await self._settle(self.stub.request(method, BASE + path, **kwargs))
        body = await self._settle(self.stub.content(response))
        return response, body

    async def _settle(self, d: defer.Deferred[Any]) -> Any:
        """StubTreq moves bytes only when flushed, and static.File's producer
        writes each chunk from the global cooperator (a reactor turn): flush,
        turn, until ``d`` has its result."""
        done: list[bool] = []

        def fired(result: Any) -> Any:
            done.append(True)
            return result

        d.addBoth(fired)
        for _ in range(10_000):
            self.stub.flush()
            if done:
                return await d
            await task.deferLater(reactor, 0, lambda: None)
        raise AssertionError("StubTreq request did not finish")


@pytest.fixture
def web(tmp_path: Path) -> Web:
    layout = build_store(tmp_path)
    store = FakeStore(layout.root, {"private": private_manifests()})
    metrics = Metrics()
    health: dict[str, Any] = {"status": "ok"}
    root = make_root(store, make_config(), metrics, lambda: dict(health))
    return Web(StubTreq(root), layout, store, metrics, health)


# --- downloads ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_download_streams_exact_bytes_with_headers(web: Web) -> None:
    response, body = await web.fetch("GET", f"/bundles/all/{NAME}.mbox.gz")
    assert response.code == 200
    assert body == web.layout.bundle
    assert header(response, "content-type") == "application/gzip"
    # twisted's client turns Content-Length into .length (else UNKNOWN_LENGTH).
    assert response.length == len(web.layout.bundle)
    assert header(response, "cache-control") == "public, max-age=31536000, immutable"
    # Content-Encoding: gzip would make clients gunzip the published file
    # (treq asks for gzip and would decode; it leaves an empty header).
    assert not header(response, "content-encoding")


@pytest_twisted.ensureDeferred
async def test_a_download_that_is_not_a_regular_file_is_404(web: Web) -> None:
    # Whatever the store answers, static.File must never list a directory.
    directory = f"all/{NAME[:-1]}D.mbox.gz"
    (web.layout.root / directory).mkdir()
    assert isinstance(web.store.open_download(directory), LocalFile)
    response, body = await web.fetch("GET", f"/bundles/{directory}")
    assert response.code == 404
    assert body == b"no such bundle\n"


@pytest_twisted.ensureDeferred
async def test_download_manifest_is_json(web: Web) -> None:
    response, body = await web.fetch("GET", f"/bundles/all/{NAME}.json")
    assert response.code == 200
    assert header(response, "content-type") == "application/json"
    assert body == web.layout.manifest
    assert json.loads(body)["sha256"] == hashlib.sha256(web.layout.bundle).hexdigest()


# --- ranges: never more bytes than the file ---------------------------------


@given(
    size=st.integers(min_value=0, max_value=5000),
    specs=st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(min_value=0, max_value=6000)),
            st.one_of(st.none(), st.integers(min_value=0, max_value=6000)),
        ),
        max_size=40,
    ),
    junk=st.binary(max_size=20),
)
@settings(max_examples=300, deadline=None)
def test_planned_ranges_never_exceed_the_file(
    size: int, specs: list[tuple[int | None, int | None]], junk: bytes
) -> None:
    text = ",".join(f"{'' if a is None else a}-{'' if b is None else b}" for a, b in specs)
    for value in (b"bytes=" + text.encode(), b"bytes=" + text.encode() + junk, junk):
        plan = plan_ranges(value, size)
        if plan is None:
            continue
        assert len(plan) <= MAX_RANGES
        assert all(0 <= first <= last < size for first, last in plan)
        # Disjoint, not adjacent, ascending: together at most the file.
        assert all(a[1] + 1 < b[0] for a, b in zip(plan, plan[1:], strict=False))
        assert sum(last - first + 1 for first, last in plan) <= size
    # Every byte asked for (by a well-formed spec) is in the plan, none other.
    if (
        all(a is not None or b is not None for a, b in specs)
        and all(a is None or b is None or a <= b for a, b in specs)
        and specs
    ):
        plan = plan_ranges(b"bytes=" + text.encode(), size)
        asked = set()
        for a, b in specs:
            if a is None:
                asked |= set(range(max(0, size - (b or 0)), size)) if b else set()
            else:
                asked |= set(range(a, min(size, (size - 1 if b is None else b) + 1)))
        if plan is not None:
            assert {i for first, last in plan for i in range(first, last + 1)} == asked


@pytest.mark.parametrize(
    "path",
    [
        f"/bundles/all/{NAME[:-1]}X.mbox.gz",  # well-formed, not stored
        "/bundles/all/nothing.mbox.gz",
        f"/bundles/all/{NAME}.txt",  # stored suffixes only
        f"/bundles/nosuchset/{NAME}.mbox.gz",
    ],
)
@pytest_twisted.ensureDeferred
async def test_unknown_key_is_404_text(web: Web, path: str) -> None:
    response, body = await web.fetch("GET", path)
    assert response.code == 404
    assert header(response, "content-type") == "text/plain; charset=utf-8"
    # A missing bundle may appear later: the 404 must not be cached.
    assert header(response, "cache-control") == "no-store"
    assert len(body) < 100 and b"<" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest_twisted.ensureDeferred
async def test_other_methods_are_405(web: Web, method: str) -> None:
    for path in (f"/bundles/all/{NAME}.mbox.gz", "/bundles/private/", "/metrics", "/healthz"):
        response, body = await web.fetch(method, path, data=b"x")
        assert response.code == 405, path
        assert header(response, "allow") == "GET, HEAD"
        assert b"Traceback" not in body
    assert (web.layout.root / f"all/{NAME}.mbox.gz").read_bytes() == web.layout.bundle
    assert web.store.listed_in_reactor_thread == []


# --- listings ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_listing_without_a_configured_token_is_403(web: Web) -> None:
    response, body = await web.fetch(
        "GET", "/bundles/all/", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.code == 403
    assert body == b"listing is disabled for this set\n"
    assert web.store.listed_in_reactor_thread == []


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer "],
)
@pytest_twisted.ensureDeferred
async def test_listing_without_the_right_token_is_401(web: Web, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response, body = await web.fetch("GET", "/bundles/private/", headers=headers)
    assert response.code == 401
    assert header(response, "www-authenticate") == 'Bearer realm="spamtrap"'
    assert b"ZZZZ" not in body
    assert web.store.listed_in_reactor_thread == []


@pytest_twisted.ensureDeferred
async def test_listing_an_unknown_set_is_404(web: Web) -> None:
    response, _ = await web.fetch(
        "GET", "/bundles/nosuch/", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.code == 404


@pytest.mark.parametrize("path", ["/bundles/private/", "/bundles/private"])
@pytest_twisted.ensureDeferred
async def test_listing_with_the_token(web: Web, path: str) -> None:
    response, body = await web.fetch("GET", path, headers={"Authorization": f"bearer  {TOKEN}"})
    assert response.code == 200
    assert header(response, "content-type") == "application/json"
    assert header(response, "cache-control") == "no-store"
    doc = json.loads(body)
    assert doc["set"] == "private"
    # The bytes of the listing before the Manifest type: each stored
    # manifest's JSON object, keys in their stored order, plus "url".
    expected = [
        {**json.loads(m.to_json_bytes()), "url": f"https://spam.example:8443/bundles/{m.key}"}
        for m in private_manifests()
    ]
    assert body == json.dumps({"set": "private", "bundles": expected}).encode() + b"\n"
    assert doc["bundles"] == expected  # newest first, as the store gave them
    assert web.store.pool.calls == 1  # the store listed once, in its own pool


def manual_site(store: Any) -> Any:
    return make_site(store, make_config(), Metrics(), dict, InlineReactor())


def manual_store(manifests: dict[str, list[Manifest]], root: Path) -> FakeStore:
    """A FakeStore whose pool runs its listings when the test says so."""
    return FakeStore(root, manifests, ManualPool())


class ManualPool:
    """A thread pool double whose work runs when the test says so."""

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any, **kw: Any
    ) -> None:
        def run() -> None:
            try:
                result = f(*args, **kw)
            except Exception:
                on_result(False, Failure())
            else:
                on_result(True, result)

        self.pending.append(run)

    def run_all(self) -> None:
        while self.pending:
            self.pending.pop(0)()


def test_listing_answers_only_when_the_stores_pool_is_done(tmp_path: Path) -> None:
    store = manual_store({"private": private_manifests()}, tmp_path)
    site = manual_site(store)
    request = listing_request()
    assert render(site, request) is NOT_DONE_YET
    assert request.written == [] and not request.finished
    store.pool.run_all()
    assert request.finished == 1
    assert request.responseCode == 200
    assert [b["key"] for b in json.loads(b"".join(request.written))["bundles"]] == [
        f"private/{n}.mbox.gz" for n in PRIVATE_NAMES
    ]


def test_listing_for_a_client_that_went_away_writes_nothing(tmp_path: Path) -> None:
    store = manual_store({"private": private_manifests()}, tmp_path)
    site = manual_site(store)
    request = listing_request()
    assert render(site, request) is NOT_DONE_YET
    # What server.Request does when the connection drops: errback notifyFinish.
    request.processingFailed(Failure(ConnectionLost()))
    store.pool.run_all()  # must neither write nor finish (a real Request would raise)
    assert request.written == []
    assert request.finished == 0


def test_listing_store_failure_is_a_500_without_details(tmp_path: Path) -> None:
    store = manual_store({}, tmp_path)
    store.fail_listing = OSError("disk on fire at /var/lib/spamtrap")
    site = manual_site(store)
    request = listing_request()
    render(site, request)
    store.pool.run_all()
    assert request.responseCode == 500
    assert b"".join(request.written) == b"listing set private failed\n"


def S3Like() -> MemoryStore:  # noqa: N802 - reads as the class it stands for
    """A store with public URLs and no local files, like the S3 store."""
    store = MemoryStore(base_url="http://objects.invalid/traps")
    key = f"all/{NAME}.mbox.gz"
    store.add(key, b"bundle bytes", manifest_for(key, b"bundle bytes"))
    return store


def test_s3_store_download_redirects_to_the_public_object(tmp_path: Path) -> None:
    site = manual_site(S3Like())
    request = DummyRequest([b"bundles", b"all", f"{NAME}.mbox.gz".encode()])
    render(site, request)
    assert request.responseCode == 302
    location = request.responseHeaders.getRawHeaders(b"location")
    assert location == [f"http://objects.invalid/traps/all/{NAME}.mbox.gz".encode()]


def test_s3_store_range_request_is_a_redirect_without_bytes(tmp_path: Path) -> None:
    # S3 serves the bytes (and the ranges): none of them pass through spamtrap.
    site = manual_site(S3Like())
    request = DummyRequest([b"bundles", b"all", f"{NAME}.mbox.gz".encode()])
    request.requestHeaders.setRawHeaders(b"range", [b"bytes=" + b",".join([b"0-"] * 1000)])
    render(site, request)
    assert request.responseCode == 302
    assert b"".join(request.written) == b""


def test_s3_store_unknown_or_bad_keys_are_404(tmp_path: Path) -> None:
    site = manual_site(S3Like())
    unstored = f"{NAME[:-1]}X.mbox.gz".encode()
    for path in (
        [b"bundles", b"all", b"not-a-bundle.mbox.gz"],
        [b"bundles", b"all", b"x.txt"],
        [b"bundles", b"all", unstored],
    ):
        request = DummyRequest(path)
        render(site, request)
        assert request.responseCode == 404


# --- feeds -------------------------------------------------------------------


def feed_request(path: bytes, args: dict[bytes, list[bytes]] | None = None) -> DummyRequest:
    request = DummyRequest([b"feeds", *path.split(b"/")])
    request.args = args or {}
    request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {TOKEN}".encode()])
    return request


def feed_page(site: Any, store: FakeStore, **query: str) -> dict[str, Any]:
    request = feed_request(b"private", {k.encode(): [v.encode()] for k, v in query.items()})
    render(site, request)
    store.pool.run_all()
    assert request.responseCode in (None, 200), b"".join(request.written)
    doc: dict[str, Any] = json.loads(b"".join(request.written))
    return doc


def private_cursor(i: int) -> str:
    return PRIVATE_NAMES[i]  # a key's name without the set and the suffix


@pytest.mark.parametrize("path", ["/feeds/private", "/feeds/private/"])
@pytest_twisted.ensureDeferred
async def test_feed_with_the_token(web: Web, path: str) -> None:
    response, body = await web.fetch("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.code == 200
    assert header(response, "content-type") == "application/json"
    assert header(response, "cache-control") == "no-store"
    doc = json.loads(body)
    expected = [
        {**m.to_dict(), "url": f"https://spam.example:8443/bundles/{m.key}"}
        for m in private_manifests()
    ]
    assert doc == {
        "set": "private",
        "bundles": expected,
        "cursor": private_cursor(0),
        "more": False,
    }
    assert web.store.pool.calls == 1  # listed in the store's own pool


@pytest_twisted.ensureDeferred
async def test_feed_since_and_limit_page_forward(web: Web) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = "/feeds/private"
    # The oldest page first (newest first within it), then onwards from its cursor.
    response, body = await web.fetch("GET", f"{url}?limit=2", headers=auth)
    doc = json.loads(body)
    assert [b["key"] for b in doc["bundles"]] == [
        f"private/{PRIVATE_NAMES[1]}.mbox.gz",
        f"private/{PRIVATE_NAMES[2]}.mbox.gz",
    ]
    assert doc["cursor"] == private_cursor(1)
    assert doc["more"] is True
    response, body = await web.fetch("GET", f"{url}?limit=2&since={doc['cursor']}", headers=auth)
    doc = json.loads(body)
    assert [b["key"] for b in doc["bundles"]] == [f"private/{PRIVATE_NAMES[0]}.mbox.gz"]
    assert (doc["cursor"], doc["more"]) == (private_cursor(0), False)
    # Nothing newer: the cursor stays, so a client can store it blindly.
    response, body = await web.fetch("GET", f"{url}?since={doc['cursor']}", headers=auth)
    assert json.loads(body) == {
        "set": "private",
        "bundles": [],
        "cursor": private_cursor(0),
        "more": False,
    }
    # A bare time is a cursor too: everything from that hour on.
    response, body = await web.fetch("GET", f"{url}?since=2026-02-01T00", headers=auth)
    assert [b["key"] for b in json.loads(body)["bundles"]] == [
        f"private/{n}.mbox.gz" for n in PRIVATE_NAMES[:2]
    ]


@pytest.mark.parametrize(
    ("path", "authorization", "code"),
    [
        ("/feeds/private", None, 401),
        ("/feeds/private", f"Bearer {TOKEN}x", 401),
        ("/feeds/private", f"Bearer {SHARED_TOKEN}", 401),  # another set's token
        ("/feeds/shared", f"Bearer {TOKEN}", 401),
        ("/feeds/all", f"Bearer {TOKEN}", 403),  # no token configured: no feed
        ("/feeds/nosuch", f"Bearer {TOKEN}", 404),
        ("/feeds/", f"Bearer {TOKEN}", 404),
        ("/feeds", f"Bearer {TOKEN}", 404),
        ("/feeds/private/x", f"Bearer {TOKEN}", 404),
        ("/feeds/..%2fprivate", f"Bearer {TOKEN}", 404),
        ("/feeds/private?limit=0", f"Bearer {TOKEN}", 400),
        ("/feeds/private?limit=-1", f"Bearer {TOKEN}", 400),
        ("/feeds/private?limit=ten", f"Bearer {TOKEN}", 400),
        ("/feeds/private?limit=%C2%B2", f"Bearer {TOKEN}", 400),  # a superscript two
        ("/feeds/private?limit=" + "9" * 5000, f"Bearer {TOKEN}", 400),
        ("/feeds/private?since=%00", f"Bearer {TOKEN}", 400),
        ("/feeds/private?since=%ff", f"Bearer {TOKEN}", 400),
        ("/feeds/private?since=" + "x" * 201, f"Bearer {TOKEN}", 400),
    ],
)
@pytest_twisted.ensureDeferred
async def test_feed_refusals(web: Web, path: str, authorization: str | None, code: int) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response, body = await web.fetch("GET", path, headers=headers)
    assert response.code == code
    assert header(response, "content-type") == "text/plain; charset=utf-8"
    assert b"ZZZZ" not in body and b"YYYY" not in body  # no key leaks out
    if code == 401:
        assert header(response, "www-authenticate") == 'Bearer realm="spamtrap"'
    assert web.store.listed_in_reactor_thread == []


def test_feed_skips_manifests_that_are_not_this_sets_bundles(tmp_path: Path) -> None:
    good = private_manifests()
    junk = [
        manifest_for("shared/2026-04-01T00:00:00.node1.WWWWWWWWWWWWWWWW.mbox.gz", b""),
        manifest_for("private/2026-04-01T00:00:00.node1.VVVVVVVVVVVVVVVV.json", b""),
        manifest_for("private/not-a-key.mbox.gz", b""),
    ]
    store = manual_store({"private": junk + good}, tmp_path)
    doc = feed_page(manual_site(store), store)
    assert [b["key"] for b in doc["bundles"]] == [m.key for m in good]


def test_feed_uses_the_stores_own_urls(tmp_path: Path) -> None:
    class S3LikeStore(FakeStore):
        def url(self, key: str) -> str:
            return f"https://bucket.example/spam/{key}"

    store = S3LikeStore(tmp_path, {"private": private_manifests()}, ManualPool())
    doc = feed_page(manual_site(store), store, limit="1")
    assert doc["bundles"][0]["url"] == (
        f"https://bucket.example/spam/private/{PRIVATE_NAMES[2]}.mbox.gz"
    )


def test_feed_answers_only_when_the_pool_is_done(tmp_path: Path) -> None:
    store = manual_store({"private": private_manifests()}, tmp_path)
    request = feed_request(b"private")
    assert render(manual_site(store), request) is NOT_DONE_YET
    assert request.written == []
    store.pool.run_all()
    assert request.finished == 1


cursor_names = st.builds(
    lambda t, node, rnd: f"2026-01-01T00:{t // 60:02d}:{t % 60:02d}.{node}.{rnd}",
    st.integers(0, 3599),
    st.sampled_from(["a", "node1", "node2", "z9"]),
    st.text(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", min_size=16, max_size=17
    ),
)


@settings(max_examples=100, deadline=None)
@given(names=st.sets(cursor_names, max_size=25), limit=st.integers(1, 7))
def test_feed_paging_yields_every_bundle_once_in_order(names: set[str], limit: int) -> None:
    manifests = [manifest_for(f"private/{n}.mbox.gz", b"x") for n in names]
    store = manual_store({"private": manifests}, Path("/nonexistent"))
    site = manual_site(store)
    seen: list[str] = []
    since = ""
    for _ in range(len(names) + 2):
        doc = feed_page(site, store, since=since, limit=str(limit))
        page = [b["key"][len("private/") : -len(".mbox.gz")] for b in doc["bundles"]]
        assert page == sorted(page, reverse=True)  # newest first
        assert len(page) <= limit
        seen += reversed(page)
        if page:
            assert doc["cursor"] == page[0]
        since = doc["cursor"]
        if not doc["more"]:
            break
    assert seen == sorted(names)


# --- metrics, health, index --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_metrics(web: Web) -> None:
    web.metrics.messages_accepted.inc(3)
    response, body = await web.fetch("GET", "/metrics")
    assert response.code == 200
    assert header(response, "content-type") == "text/plain; version=0.0.4; charset=utf-8"
    assert b"\nspamtrap_messages_accepted_total 3.0\n" in body


@pytest_twisted.ensureDeferred
async def test_healthz_follows_status(web: Web) -> None:
    web.health.update(status="ok", spool_depth=0)
    response, body = await web.fetch("GET", "/healthz")
    assert response.code == 200
    assert header(response, "content-type") == "application/json"
    assert json.loads(body) == {"status": "ok", "spool_depth": 0}

    web.health.update(status="degraded", store="unreachable")
    response, body = await web.fetch("GET", "/healthz")
    assert response.code == 503
    assert json.loads(body)["store"] == "unreachable"


@pytest_twisted.ensureDeferred
async def test_index_and_unknown_paths(web: Web) -> None:
    response, body = await web.fetch("GET", "/")
    assert response.code == 200
    assert header(response, "content-type") == "text/plain; charset=utf-8"
    routes = (b"/bundles/<set>/<name>.mbox.gz", b"/bundles/<set>/", b"/feeds/<set>", b"/metrics")
    for route in (*routes, b"/healthz"):
        assert route in body
    for path in ("/nope", "/metrics/extra", "/healthz/", "//metrics", "/bundles", "/bundles/"):
        response, body = await web.fetch("GET", path)
        assert response.code == 404, path
        assert header(response, "content-type") == "text/plain; charset=utf-8"


# --- with the real LocalStore ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_memory_store_over_stubtreq_redirects_and_lists_its_urls() -> None:
    store = MemoryStore(base_url="https://bucket.example/spam")
    keys = [f"private/{n}.mbox.gz" for n in PRIVATE_NAMES]
    for key in reversed(keys):  # stored oldest first
        store.add(key, key.encode(), manifest_for(key, key.encode()))
    stub = StubTreq(make_root(store, make_config(), Metrics(), dict))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = await stub.get(f"{BASE}/bundles/private/", headers=auth)
    doc = json.loads(await stub.content(response))
    assert [b["key"] for b in doc["bundles"]] == keys
    assert [b["url"] for b in doc["bundles"]] == [f"https://bucket.example/spam/{k}" for k in keys]
    assert store.listed == ["private"]
    response = await stub.get(f"{BASE}/bundles/{keys[0]}", allow_redirects=False)
    assert response.code == 302
    assert header(response, "location") == f"https://bucket.example/spam/{keys[0]}"
    assert await stub.content(response) == b""


@pytest_twisted.ensureDeferred
async def test_a_closed_store_makes_a_listing_a_500() -> None:
    store = MemoryStore()
    await store.close()
    stub = StubTreq(make_root(store, make_config(), Metrics(), dict))
    response = await stub.get(f"{BASE}/feeds/private", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.code == 500
    assert await stub.content(response) == b"feed of set private failed\n"


# --- property: no path reaches outside the store, none fails -----------------


@pytest.fixture(scope="module")
def property_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Layout]:
    layout = build_store(tmp_path_factory.mktemp("web-property"))
    return manual_site(FakeStore(layout.root, {})), layout


INTERESTING_SEGMENTS = [
    b"",
    b".",
    b"..",
    b"...",
    b"all",
    b"private",
    b"store",
    b"secret.mbox.gz",
    b"secret.json",
    b"evil.mbox.gz",
    b".partial.mbox.gz",
    b"../all",
    b"all/.",
    b"all.mbox.gz",
    b"../secret.mbox.gz",  # what %2f decodes to inside one segment
    b"..\\secret.mbox.gz",
    b"/secret.mbox.gz",
    b"/etc/passwd",
    b"\x00",
    b"x\x00.mbox.gz",
    NAME.encode() + b".mbox.gz",
    NAME.encode() + b".json",
]
segments = st.one_of(
    st.sampled_from(INTERESTING_SEGMENTS),
    st.binary(max_size=24),
    st.text(max_size=24).map(lambda s: s.encode("utf-8", "surrogatepass")),
)


@settings(max_examples=400, deadline=None)
@given(
    path=st.lists(segments, max_size=5),
    method=st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS"]),
)
def test_bundle_route_never_fails_or_escapes(
    property_site: tuple[Any, Layout], path: list[bytes], method: bytes
) -> None:
    site, layout = property_site
    request = DummyRequest([b"bundles", *path])
    request.method = method
    render(site, request)  # raising here would be a 500 on a real server
    assert request.finished == 1
    status = request.responseCode or 200
    assert status in (200, 401, 403, 404, 405)  # 401/403: listing answers
    body = b"".join(request.written)
    assert SECRET not in body
    if status == 200:  # only for exactly a stored key, and with its bytes
        key = b"/".join(path).decode()
        assert key in layout.files
        assert body == (layout.files[key] if method == b"GET" else b"")
