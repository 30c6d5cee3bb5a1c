"""The HTTP side: bundle downloads, set listings and feeds, ``/metrics``
and ``/healthz``.

Bundles are public to whoever knows their unguessable key, so downloads
need no authentication. Listing a set or reading its feed reveals its keys,
so it needs that set's own bearer token (a private set's bundles are
therefore only ever listed to holders of its token). Keys never change once
stored: downloads are cached forever, everything else never.

A feed (``/feeds/<set>``) pages through a set's bundles in key order. A key
begins with the UTC time its bundle was opened, so key order is time order;
the cursor of a bundle is its key's name without the set and the suffix,
e.g. ``2026-11-22T13:05:00.node1.4wHkcYIyIeNMVh2H``. ``since`` may be any
string: a bare time such as ``2026-11-22T13`` starts at that hour.

The web layer knows the store only through ``spamtrap.interfaces.Store``:
``open_download`` says what to answer a download (a ``LocalFile`` streamed
from here, a ``Redirect``, or None), and ``list_manifests`` runs in the
store's own pool, never in the filters'.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server, static

from spamtrap.bundle.manifest import Manifest
from spamtrap.config import Config, SetConfig
from spamtrap.interfaces import Store
from spamtrap.metrics import Metrics
from spamtrap.store import BUNDLE_SUFFIX, KEY_RE, LocalFile, Redirect, index_key
from spamtrap.store.published import download_url

_log = Logger()

# Key suffix -> Content-Type. Never Content-Encoding: gzip for a bundle, or
# HTTP clients would silently gunzip the very file whose sha256 is published.
CONTENT_TYPES = {
    ".mbox.gz": b"application/gzip",
    ".json": b"application/json",
    ".index.jsonl": b"application/x-ndjson",
}
IMMUTABLE = b"public, max-age=31536000, immutable"
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
TEXT_TYPE = b"text/plain; charset=utf-8"
JSON_TYPE = b"application/json"
READ_METHODS = (b"GET", b"HEAD")
FEED_LIMIT = 100  # bundles per feed page unless the client asks for fewer
FEED_LIMIT_MAX = 1000
MAX_CURSOR = 200  # characters; a key's name is far shorter

INDEX = b"""\
spamtrap: a spam trap's bundle server.

GET /bundles/<set>/<name>.mbox.gz  a bundle of trapped spam (gzipped mboxrd)
GET /bundles/<set>/<name>.json     its manifest (size, sha256, messages, period)
GET /bundles/<set>/<name>.index.jsonl  its index, one JSON line per message
GET /bundles/<set>/                the set's manifests, newest first
                                   (needs Authorization: Bearer <token>)
GET /feeds/<set>?since=C&limit=N   the set's bundles after cursor C, newest
                                   first, with the next cursor (same token)
GET /metrics                       Prometheus metrics
GET /healthz                       health as JSON; 503 when not ok
GET /dashboard                     the live dashboard (unless http.dashboard
                                   is off; with token, ?token=<token>)
"""


def make_root(
    store: Store,
    config: Config,
    metrics: Metrics,
    health: Callable[[], dict[str, Any]],
    dashboard: resource.Resource | None = None,
) -> resource.Resource:
    """The resource tree of the HTTP service (what ``make_site`` serves,
    and what tests drive with ``treq.testing.StubTreq``); ``dashboard``
    (spamtrap.dashboard) is mounted at /dashboard when given."""
    root = _Page()
    children: dict[bytes, resource.Resource] = {
        b"": _Index(),
        b"bundles": _Bundles(store, config),
        b"feeds": _Feeds(store, config),
        b"metrics": _Metrics(metrics),
        b"healthz": _Health(health),
    }
    if dashboard is not None:
        children[b"dashboard"] = dashboard
    for name, child in children.items():
        # Without mypy-zope, mypy does not know a Resource is an IResource.
        root.putChild(name, child)  # type: ignore[arg-type]
    return root


def make_site(
    store: Store,
    config: Config,
    metrics: Metrics,
    health: Callable[[], dict[str, Any]],
    reactor: Any,
    dashboard: resource.Resource | None = None,
) -> server.Site:
    """The whole HTTP service over ``store``, whose listings run in the
    store's own pool."""
    site = _Site(make_root(store, config, metrics, health, dashboard), reactor=reactor)
    site.displayTracebacks = False
    site.noisy = False  # no "Starting factory" log line per listen
    return site


class _Site(server.Site):
    def getResourceFor(self, request: server.Request) -> Any:
        # Request.process() has just set "Server: TwistedWeb/<version>" and
        # nothing is rendered yet: replace it for every routed response.
        request.setHeader(b"server", b"spamtrap")
        return super().getResourceFor(request)


def _error(request: server.Request, code: int, text: str) -> bytes:
    """A short plain-text error body; never cached (a 404 may become a 200
    once the bundle is stored)."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", TEXT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return text.encode("utf-8") + b"\n"


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return _error(request, 404, "not found")


_NOT_FOUND = _NotFound()


class _Page(resource.Resource):
    """A read-only resource: GET and HEAD (server.Request drops the body of
    a HEAD), a text 405 for anything else, and no children."""

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return _NOT_FOUND

    def render(self, request: server.Request) -> Any:
        if request.method not in READ_METHODS:
            request.setHeader(b"allow", b", ".join(READ_METHODS))
            return _error(request, 405, "method not allowed")
        return self.render_GET(request)

    def render_GET(self, request: server.Request) -> Any:
        return _error(request, 404, "not found")


class _Index(_Page):
    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", TEXT_TYPE)
        return INDEX


class _Metrics(_Page):
    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", METRICS_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return self._metrics.render()


class _Health(_Page):
    def __init__(self, health: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self._health = health

    def render_GET(self, request: server.Request) -> bytes:
        status = self._health()
        request.setResponseCode(200 if status.get("status") == "ok" else 503)
        request.setHeader(b"content-type", JSON_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(status).encode("utf-8") + b"\n"


def _segment(raw: bytes) -> str | None:
    """One decoded path segment, or None if it could escape a directory.

    server.Request has already percent-decoded each segment, so "%2e%2e"
    arrives as ".." and "%2f" as a "/" inside a segment: both refused here.
    A leading dot also covers the store's hidden temp files.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.startswith(".") or not text.isprintable() or "/" in text or "\\" in text:
        return None
    return text


class _SetPages(_Page):
    """Pages about one set: the store, the sets' tokens and bundle URLs."""

    isLeaf = True

    def __init__(self, store: Store, config: Config) -> None:
        super().__init__()
        self._store = store
        self._sets: dict[str, SetConfig] = {s.name: s for s in config.sets}
        self._public_url = config.http.public_url

    def _refused(self, request: server.Request, set_name: str) -> bytes | None:
        """The error page if this request may not list ``set_name``, else None.

        Each set has its own token, so one set's token never opens another
        set (a private one included)."""
        set_config = self._sets.get(set_name)
        if set_config is None:
            return _error(request, 404, "no such set")
        if not set_config.token:
            return _error(request, 403, "listing is disabled for this set")
        if not _bearer_matches(request.getHeader(b"authorization"), set_config.token):
            request.setHeader(b"www-authenticate", b'Bearer realm="spamtrap"')
            return _error(request, 401, "a valid bearer token is required")
        return None

    def _with_url(self, manifest: Manifest) -> dict[str, object]:
        """A copy of a manifest with the bundle's download URL, by the rule
        notices use too (:func:`spamtrap.store.published.download_url`): the
        store's own (S3) if it has one, else this server's for the local
        store, else None (an S3 store without a URL for the key: a
        download here would only redirect to that missing URL). A bundle
        with an index gets its ``index_url`` by the same rule."""
        key = manifest.key
        url = download_url(key, self._store.url(key), self._public_url, self._store.served_by_web)
        doc: dict[str, object] = {**manifest.to_dict(), "url": url}
        if manifest.index is not None:
            ikey = index_key(key)
            doc["index_url"] = download_url(
                ikey, self._store.url(ikey), self._public_url, self._store.served_by_web
            )
        return doc

    def _answer_later(
        self,
        request: server.Request,
        what: str,
        set_name: str,
        body: Callable[[list[Manifest]], bytes],
    ) -> Any:
        """List ``set_name`` (the store does it in its own pool) and send
        ``body(manifests)`` as JSON when the listing is done."""
        reply = _DelayedReply(request)
        d: Deferred[list[Manifest]] = maybeDeferred(self._store.list_manifests, set_name)
        d.addCallback(body).addCallbacks(reply.json, reply.failed, errbackArgs=(what,))
        return server.NOT_DONE_YET


class _Bundles(_SetPages):
    """``/bundles/<set>/<name>`` downloads and ``/bundles/<set>/`` listings."""

    def render_GET(self, request: server.Request) -> Any:
        parts = [_segment(p) for p in request.postpath or []]
        match parts:
            case [str(set_name), ""] | [str(set_name)] if set_name:
                return self._listing(request, set_name)
            case [str(set_name), str(name)] if set_name and name:
                return self._download(request, f"{set_name}/{name}")
        return _error(request, 404, "not found")

    # Downloads

    def _download(self, request: server.Request, key: str) -> Any:
        content_type = next((t for s, t in CONTENT_TYPES.items() if key.endswith(s)), None)
        if content_type is None or KEY_RE.fullmatch(key) is None:
            return _error(request, 404, "no such bundle")
        download = self._store.open_download(key)
        if isinstance(download, Redirect):
            # An S3 store: objects are public by key there; send the client on.
            request.redirect(download.url.encode("ascii"))
            return b""
        if not isinstance(download, LocalFile):
            return _error(request, 404, "no such bundle")
        # The store checked that the file is regular and inside it (no
        # symlink out); a regular file is checked again here, as static.File
        # would list a directory.
        real = download.path
        if not os.path.isfile(real):
            return _error(request, 404, "no such bundle")
        request.setHeader(b"cache-control", IMMUTABLE)
        try:
            # static.File streams 64 KiB reads through a producer paced by
            # the transport (a slow client never makes us buffer the file),
            # and answers HEAD, Range (resumed downloads) and
            # If-Modified-Since; _BundleFile bounds what a Range may ask
            # for. Bundles in an S3 store are served by S3 (a redirect, no
            # byte of them passes through here).
            return _BundleFile(real, content_type).render_GET(request)
        except OSError:
            # The file went away between the checks and open().
            return _error(request, 404, "no such bundle")

    # Listings

    def _listing(self, request: server.Request, set_name: str) -> Any:
        refused = self._refused(request, set_name)
        if refused is not None:
            return refused
        return self._answer_later(
            request,
            f"listing set {set_name}",
            set_name,
            lambda manifests: self._listing_body(set_name, manifests),
        )

    def _listing_body(self, set_name: str, manifests: list[Manifest]) -> bytes:
        bundles = [self._with_url(m) for m in manifests]
        return json.dumps({"set": set_name, "bundles": bundles}).encode("utf-8") + b"\n"


class _Feeds(_SetPages):
    """``/feeds/<set>?since=<cursor>&limit=<n>``: the set's bundles strictly
    after ``since`` in key order, at most ``limit`` of them (the oldest
    ones, so a client pages forward by passing the returned cursor back),
    newest first. ``more`` says whether another page follows."""

    def render_GET(self, request: server.Request) -> Any:
        parts = [_segment(p) for p in request.postpath or []]
        match parts:
            case [str(set_name), ""] | [str(set_name)] if set_name:
                pass
            case _:
                return _error(request, 404, "not found")
        refused = self._refused(request, set_name)
        if refused is not None:
            return refused
        args = request.args or {}
        since = _query_value(args, b"since", "")
        limit_text = _query_value(args, b"limit", str(FEED_LIMIT))
        if since is None or len(since) > MAX_CURSOR or not since.isprintable():
            return _error(request, 400, "since: expected a cursor from an earlier answer")
        if limit_text is None or not re.fullmatch(r"[0-9]{1,9}", limit_text) or int(limit_text) < 1:
            return _error(request, 400, f"limit: expected a number from 1 to {FEED_LIMIT_MAX}")
        limit = min(int(limit_text), FEED_LIMIT_MAX)
        return self._answer_later(
            request,
            f"feed of set {set_name}",
            set_name,
            lambda manifests: self._page(set_name, manifests, since, limit),
        )

    def _page(
        self, set_name: str, manifests: list[Manifest], since: str, limit: int
    ) -> bytes:
        newer = []
        for manifest in manifests:
            cursor = _cursor(manifest, set_name)
            if cursor is not None and cursor > since:
                newer.append((cursor, manifest))
        newer.sort(key=lambda pair: pair[0])
        page = newer[:limit]
        doc = {
            "set": set_name,
            "bundles": [self._with_url(m) for _, m in reversed(page)],
            "cursor": page[-1][0] if page else since,
            "more": len(newer) > limit,
        }
        return json.dumps(doc).encode("utf-8") + b"\n"


def _cursor(manifest: Manifest, set_name: str) -> str | None:
    """A manifest's feed cursor: its key's name without suffix; None for a
    manifest that is not a bundle of this set."""
    key = manifest.key
    if not key.endswith(BUNDLE_SUFFIX):
        return None
    m = KEY_RE.fullmatch(key)
    if m is None or m.group("set") != set_name:
        return None
    return key[len(set_name) + 1 : -len(BUNDLE_SUFFIX)]


def _query_value(args: dict[bytes, list[bytes]], name: bytes, default: str) -> str | None:
    """The last value of a query argument as text; None if not UTF-8."""
    values = args.get(name)
    if not values:
        return default
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _bearer_matches(header: bytes | None, token: str) -> bool:
    if header is None:
        return False
    scheme, _, presented = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(presented.strip(), token.encode("utf-8"))


# Byte ranges one response may send, after overlapping and adjacent ones
# are joined. More (after joining) get the whole file with a 200 instead.
MAX_RANGES = 16
# A Range header is a handful of bytes from a resuming client; a longer one
# is not worth parsing (RFC 9110 14.2 lets a server ignore any Range).
MAX_RANGE_HEADER = 4096
_RANGE_SPEC = re.compile(rb"[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*")


def plan_ranges(header: bytes, size: int) -> list[tuple[int, int]] | None:
    """The byte ranges to send for a ``Range`` header on a ``size``-byte file.

    Returns None to ignore the header (send the whole file with 200): it is
    malformed, not in bytes, or asks for more than MAX_RANGES separate
    pieces. Otherwise the satisfiable ranges as inclusive ``(first, last)``
    offsets, overlapping and adjacent ones joined, in ascending order, so
    the parts never add up to more than the file; an empty list means none
    is satisfiable (416).
    """
    # QUIRK: RFC 9110 14.2 allows both the joining and the ignoring. Without
    # them a Range of a thousand overlapping "0-" specs makes a 3 KB request
    # download the file a thousand times. RFC 9110 14.6 asks for the parts
    # in the order requested: joined parts cannot keep it, and real clients
    # (curl, wget, browsers, spamtrap pull) ask in ascending order anyway.
    if len(header) > MAX_RANGE_HEADER:
        return None
    unit, sep, specs = header.partition(b"=")
    if not sep or unit.strip().lower() != b"bytes" or not specs.strip(b" \t,"):
        return None
    wanted: list[tuple[int, int]] = []
    for spec in specs.split(b","):
        if not spec.strip():
            continue  # RFC 9110 5.6.1: empty list elements are ignored
        m = _RANGE_SPEC.fullmatch(spec)
        if m is None:
            return None
        first_text, last_text = m.groups()
        if not first_text:
            if not last_text:
                return None
            # A suffix: the last N bytes; "-0" is satisfiable by nothing.
            length = int(last_text)
            if length > 0 and size > 0:
                wanted.append((max(0, size - length), size - 1))
            continue
        first = int(first_text)
        last = int(last_text) if last_text else size - 1
        if last_text and last < first:
            return None
        if first < size:
            wanted.append((first, min(last, size - 1)))
    joined: list[tuple[int, int]] = []
    for first, last in sorted(wanted):
        if joined and first <= joined[-1][1] + 1:
            joined[-1] = (joined[-1][0], max(joined[-1][1], last))
        else:
            joined.append((first, last))
    if len(joined) > MAX_RANGES:
        return None
    return joined


class _BundleFile(static.File):
    """A static.File with our content type, our plain 404 and bounded ranges."""

    # Plain 404s that also reset the immutable Cache-Control; and do not
    # tell which files exist but are unreadable.
    childNotFound = _NOT_FOUND  # type: ignore[assignment]
    forbidden = _NOT_FOUND  # type: ignore[assignment]

    def __init__(self, path: str, content_type: bytes) -> None:
        super().__init__(path)
        self.type = content_type.decode("ascii")
        self.encoding = None

    def makeProducer(self, request: Any, file: Any) -> Any:  # noqa: N802 - static.File API
        """static.File's, with the Range header planned by plan_ranges: it
        sends any overlapping range as often as it is asked for (and logs
        every malformed header in full)."""
        header = request.getHeader(b"range")
        if header is None:
            return super().makeProducer(request, file)
        size = self.getFileSize()
        ranges = plan_ranges(header, size)
        if ranges is None:
            self._setContentHeaders(request)
            request.setResponseCode(200)
            return static.NoRangeStaticProducer(request, file)
        if len(ranges) <= 1:
            # No satisfiable range: static.File's own 416, with "*/size".
            first, last = ranges[0] if ranges else (size, None)
            offset, length = self._doSingleRangeRequest(request, (first, last))
            self._setContentHeaders(request, length)
            return static.SingleRangeStaticProducer(request, file, offset, length)
        info = self._doMultipleRangeRequest(request, ranges)
        return static.MultipleRangeStaticProducer(request, file, info)


class _DelayedReply:
    """Answers a request after render() returned NOT_DONE_YET, unless the
    client has gone away meanwhile (writing then would raise)."""

    def __init__(self, request: server.Request) -> None:
        self._request = request
        self._gone = False
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, reason: Failure) -> None:
        self._gone = True

    def json(self, body: bytes) -> None:
        self._send(200, JSON_TYPE, body)

    def failed(self, reason: Failure, what: str) -> None:
        _log.failure("{what} failed", failure=reason, what=what)
        self._send(500, TEXT_TYPE, f"{what} failed\n".encode())

    def _send(self, code: int, content_type: bytes, body: bytes) -> None:
        if self._gone:
            return
        request = self._request
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.setHeader(b"cache-control", b"no-store")
        request.write(body)
        request.finish()
