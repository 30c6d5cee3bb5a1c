"""What every page of the HTTP side shares: read-only resources (GET and
HEAD), plain-text errors that are never cached, the content types, and the
one check of a path segment."""

from __future__ import annotations

from typing import Any

from twisted.web import resource, server

IMMUTABLE = b"public, max-age=31536000, immutable"
TEXT_TYPE = b"text/plain; charset=utf-8"
JSON_TYPE = b"application/json"
READ_METHODS = (b"GET", b"HEAD")


def error_page(request: server.Request, code: int, text: str) -> bytes:
    """A short plain-text error body; never cached (a 404 may become a 200
    once the bundle is stored)."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", TEXT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return text.encode("utf-8") + b"\n"


class NotFound(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return error_page(request, 404, "not found")


NOT_FOUND = NotFound()


class Page(resource.Resource):
    """A read-only resource: GET and HEAD (server.Request drops the body of
    a HEAD), a text 405 for anything else, and no children."""

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return NOT_FOUND

    def render(self, request: server.Request) -> Any:
        if request.method not in READ_METHODS:
            request.setHeader(b"allow", b", ".join(READ_METHODS))
            return error_page(request, 405, "method not allowed")
        return self.render_GET(request)

    def render_GET(self, request: server.Request) -> Any:
        return error_page(request, 404, "not found")


def segment(raw: bytes) -> str | None:
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
