"""``/dashboard`` and ``/dashboard/data.json`` as twisted.web resources.

The page is one self-contained HTML document: its script and style are
inlined from the package's ``static`` directory when this module is
imported, and a Content-Security-Policy allows exactly those two (by
hash) and requests to this server only, so the page works offline and
fetches nothing from anywhere else. The script polls ``data.json`` every
few seconds and fills the page through ``textContent`` and DOM calls,
never HTML: a HELO name is whatever the sender made it.

Access (``http.dashboard``): ``open``, ``token`` (``?token=<t>`` or
``Authorization: Bearer <t>``, compared in constant time) or ``off`` (no
resource is mounted: 404 like any unknown path). The token guards the
figures (``data.json``); the page itself holds none, and is served to
anyone who may reach the dashboard at all, so that a reload works once the
script has taken the token out of the address bar.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from importlib import resources
from typing import Any

from twisted.web import resource, server

from spamtrap.dashboard.figures import Dashboard

HTML_TYPE = b"text/html; charset=utf-8"
JSON_TYPE = b"application/json"
TEXT_TYPE = b"text/plain; charset=utf-8"
READ_METHODS = (b"GET", b"HEAD")


def _static(name: str) -> str:
    return (resources.files("spamtrap.dashboard") / "static" / name).read_text("utf-8")


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def _page() -> tuple[bytes, bytes]:
    """The page with its script and style inlined, and the CSP that
    allows exactly them."""
    script, style = _static("dashboard.js"), _static("dashboard.css")
    html = _static("dashboard.html")
    html = html.replace("/*STYLE*/", style).replace("/*SCRIPT*/", script)
    csp = (
        "default-src 'none'; "
        f"script-src {_csp_hash(script)}; "
        f"style-src {_csp_hash(style)}; "
        "connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html.encode("utf-8"), csp.encode("ascii")


PAGE, PAGE_CSP = _page()


def _error(request: server.Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", TEXT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return text.encode("utf-8") + b"\n"


def presented_token(request: server.Request) -> bytes | None:
    """The token a request carries: ``Authorization: Bearer <t>``, else
    the last ``?token=``."""
    header = request.getHeader(b"authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(b" ")
        if scheme.lower() == b"bearer":
            return value.strip()
    values = (request.args or {}).get(b"token")
    return values[-1] if values else None


class _Access:
    """``open`` or ``token`` (with the configured token, or None)."""

    def __init__(self, mode: str, token: str | None) -> None:
        self.mode = mode
        self._token = token.encode("utf-8") if token else None

    def refused(self, request: server.Request) -> bytes | None:
        """The error page for a request that may not see the dashboard."""
        if self.mode == "open":
            return None
        if self._token is None:
            return _error(request, 403, "the dashboard needs http.dashboard_token in the config")
        presented = presented_token(request)
        if presented is None or not hmac.compare_digest(presented, self._token):
            request.setHeader(b"www-authenticate", b'Bearer realm="spamtrap dashboard"')
            return _error(request, 401, "a valid token is required: /dashboard?token=<token>")
        return None


class _Guarded(resource.Resource):
    """GET and HEAD only, behind the access check (None: none)."""

    isLeaf = True

    def __init__(self, access: _Access | None) -> None:
        super().__init__()
        self._access = access

    def render(self, request: server.Request) -> Any:
        if request.method not in READ_METHODS:
            request.setHeader(b"allow", b", ".join(READ_METHODS))
            return _error(request, 405, "method not allowed")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        refused = self._access.refused(request) if self._access else None
        if refused is not None:
            return refused
        return self.answer(request)

    def answer(self, request: server.Request) -> bytes:
        raise NotImplementedError


class _PageResource(_Guarded):
    def answer(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", HTML_TYPE)
        request.setHeader(b"content-security-policy", PAGE_CSP)
        return PAGE


class _Data(_Guarded):
    def __init__(self, access: _Access, dashboard: Dashboard) -> None:
        super().__init__(access)
        self._dashboard = dashboard

    def answer(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", JSON_TYPE)
        return self._dashboard.document()


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return _error(request, 404, "not found")


class DashboardResource(resource.Resource):
    """``/dashboard`` (and ``/dashboard/``): the page; ``/dashboard/data.json``:
    its figures."""

    def __init__(self, dashboard: Dashboard, mode: str, token: str | None) -> None:
        super().__init__()
        if mode not in ("open", "token"):
            raise ValueError(f"dashboard access must be open or token, not {mode!r}")
        self._page = _PageResource(None)  # code only: the figures are data.json's
        self._data = _Data(_Access(mode, token), dashboard)

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        # /dashboard is render() below; /dashboard/ comes here as b"".
        if path == b"" and not request.postpath:
            return self._page
        if path == b"data.json" and not request.postpath:
            return self._data
        return _NotFound()

    def render(self, request: server.Request) -> Any:
        return self._page.render(request)


def make_dashboard_resource(dashboard: Dashboard, mode: str, token: str | None) -> Any:
    """The resource to mount at ``/dashboard``, or None when ``mode`` is off."""
    if mode == "off":
        return None
    return DashboardResource(dashboard, mode, token)
