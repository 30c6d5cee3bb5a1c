"""The pages about one set: ``/bundles/<set>/<name>`` downloads,
``/bundles/<set>/`` listings and ``/feeds/<set>`` (see spamtrap.web). A
listing or a feed needs the set's own bearer token; the store lists in its
own pool, and the answer goes out when the listing is done."""

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
from twisted.web import server

from spamtrap.bundle.manifest import Manifest
from spamtrap.config import Config, SetConfig
from spamtrap.interfaces import Store
from spamtrap.store import BUNDLE_SUFFIX, KEY_RE, LocalFile, Redirect, index_key
from spamtrap.store.published import download_url
from spamtrap.web.pages import IMMUTABLE, JSON_TYPE, TEXT_TYPE, Page, error_page, segment
from spamtrap.web.ranges import BundleFile

# The log namespace the HTTP side has always had.
_log = Logger(namespace="spamtrap.web")

# Key suffix -> Content-Type. Never Content-Encoding: gzip for a bundle, or
# HTTP clients would silently gunzip the very file whose sha256 is published.
CONTENT_TYPES = {
    ".mbox.gz": b"application/gzip",
    ".json": b"application/json",
    ".index.jsonl": b"application/x-ndjson",
}
FEED_LIMIT = 100  # bundles per feed page unless the client asks for fewer
FEED_LIMIT_MAX = 1000
MAX_CURSOR = 200  # characters; a key's name is far shorter


class SetPages(Page):
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
            return error_page(request, 404, "no such set")
        if not set_config.token:
            return error_page(request, 403, "listing is disabled for this set")
        if not _bearer_matches(request.getHeader(b"authorization"), set_config.token):
            request.setHeader(b"www-authenticate", b'Bearer realm="spamtrap"')
            return error_page(request, 401, "a valid bearer token is required")
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
        reply = DelayedReply(request)
        d: Deferred[list[Manifest]] = maybeDeferred(self._store.list_manifests, set_name)
        d.addCallback(body).addCallbacks(reply.json, reply.failed, errbackArgs=(what,))
        return server.NOT_DONE_YET


class Bundles(SetPages):
    """``/bundles/<set>/<name>`` downloads and ``/bundles/<set>/`` listings."""

    def render_GET(self, request: server.Request) -> Any:
        parts = [segment(p) for p in request.postpath or []]
        match parts:
            case [str(set_name), ""] | [str(set_name)] if set_name:
                return self._listing(request, set_name)
            case [str(set_name), str(name)] if set_name and name:
                return self._download(request, f"{set_name}/{name}")
        return error_page(request, 404, "not found")

    # Downloads

    def _download(self, request: server.Request, key: str) -> Any:
        content_type = next((t for s, t in CONTENT_TYPES.items() if key.endswith(s)), None)
        if content_type is None or KEY_RE.fullmatch(key) is None:
            return error_page(request, 404, "no such bundle")
        download = self._store.open_download(key)
        if isinstance(download, Redirect):
            # An S3 store: objects are public by key there; send the client on.
            request.redirect(download.url.encode("ascii"))
            return b""
        if not isinstance(download, LocalFile):
            return error_page(request, 404, "no such bundle")
        # The store checked that the file is regular and inside it (no
        # symlink out); a regular file is checked again here, as static.File
        # would list a directory.
        real = download.path
        if not os.path.isfile(real):
            return error_page(request, 404, "no such bundle")
        request.setHeader(b"cache-control", IMMUTABLE)
        try:
            # static.File streams 64 KiB reads through a producer paced by
            # the transport (a slow client never makes us buffer the file),
            # and answers HEAD, Range (resumed downloads) and
            # If-Modified-Since; BundleFile bounds what a Range may ask
            # for. Bundles in an S3 store are served by S3 (a redirect, no
            # byte of them passes through here).
            return BundleFile(real, content_type).render_GET(request)
        except OSError:
            # The file went away between the checks and open().
            return error_page(request, 404, "no such bundle")

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


class Feeds(SetPages):
    """``/feeds/<set>?since=<cursor>&limit=<n>``: the set's bundles strictly
    after ``since`` in key order, at most ``limit`` of them (the oldest
    ones, so a client pages forward by passing the returned cursor back),
    newest first. ``more`` says whether another page follows."""

    def render_GET(self, request: server.Request) -> Any:
        parts = [segment(p) for p in request.postpath or []]
        match parts:
            case [str(set_name), ""] | [str(set_name)] if set_name:
                pass
            case _:
                return error_page(request, 404, "not found")
        refused = self._refused(request, set_name)
        if refused is not None:
            return refused
        args = request.args or {}
        since = _query_value(args, b"since", "")
        limit_text = _query_value(args, b"limit", str(FEED_LIMIT))
        if since is None or len(since) > MAX_CURSOR or not since.isprintable():
            return error_page(request, 400, "since: expected a cursor from an earlier answer")
        if limit_text is None or not re.fullmatch(r"[0-9]{1,9}", limit_text) or int(limit_text) < 1:
            return error_page(request, 400, f"limit: expected a number from 1 to {FEED_LIMIT_MAX}")
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


class DelayedReply:
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
