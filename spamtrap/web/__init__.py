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

The pages: spamtrap/web/pages.py (what all share), spamtrap/web/sets.py
(a set's downloads, listing and feed), spamtrap/web/ranges.py (Range
requests on downloads).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.web import resource, server

from spamtrap.config import Config
from spamtrap.interfaces import Store
from spamtrap.metrics import Metrics
from spamtrap.web.pages import JSON_TYPE, TEXT_TYPE, Page
from spamtrap.web.sets import Bundles, Feeds

METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

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
    root = Page()
    children: dict[bytes, resource.Resource] = {
        b"": _Index(),
        b"bundles": Bundles(store, config),
        b"feeds": Feeds(store, config),
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


class _Index(Page):
    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", TEXT_TYPE)
        return INDEX


class _Metrics(Page):
    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", METRICS_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return self._metrics.render()


class _Health(Page):
    def __init__(self, health: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self._health = health

    def render_GET(self, request: server.Request) -> bytes:
        status = self._health()
        request.setResponseCode(200 if status.get("status") == "ok" else 503)
        request.setHeader(b"content-type", JSON_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(status).encode("utf-8") + b"\n"
