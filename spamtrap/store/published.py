"""What consumers are told about a stored bundle, in one place.

The notifier (:mod:`spamtrap.notify`), the web layer's listings and feeds
(:mod:`spamtrap.web`) and ``spamtrap pull`` must agree on two things: the
URL a bundle is downloaded from, and the Subject of a notice mail (pull
recognises a mangled notice by it). Both are defined here, once. This module
imports nothing of Twisted, so the blocking ``spamtrap pull`` can use it.

Download URL: the store's own public URL (S3: ``store.url(key)``) when it
has one. Otherwise, only if this node's web server serves the store's
files itself (the local store), ``http.public_url`` + ``/bundles/<key>``.
An S3 store without a URL for the key (AWS with the region not known yet)
has no download URL at all: this node's web server would only redirect to
that same missing URL and answer 404.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from urllib.parse import quote

SUBJECT_TAG = "[spamtrap]"
# "[spamtrap] <set>: <n> messages, <first>..<last>"; a list may prefix it
# (with its own tag, or "Re:"), so the pattern is searched, not matched.
_SUBJECT_RE = re.compile(re.escape(SUBJECT_TAG) + r" ([^\s:]+): \d+ messages, ")

# Printable ASCII without space: everything else in a value is
# percent-encoded, so a value can neither break a header block (CR, LF)
# nor leave us-ascii (a non-ASCII public URL becomes its URI form).
_SAFE = "".join(c for c in string.printable if c not in string.whitespace)


def download_url(key: str, store_url: str | None, public_url: str, web_served: bool) -> str | None:
    """The URL consumers download bundle ``key`` from: ``store_url`` (what
    the store's ``url(key)`` answered) if there is one, else this node's
    ``/bundles/<key>`` under ``public_url`` if ``web_served`` (see
    :func:`spamtrap.store.served_by_web`), else None."""
    if store_url:
        return store_url
    if web_served:
        return f"{public_url.rstrip('/')}/bundles/{key}"
    return None


def header_value(value: object) -> str:
    """``value`` safe for one header field of a notice (percent-encoded)."""
    return quote(str(value), safe=_SAFE)


def subject(manifest: Mapping[str, object]) -> str:
    """The Subject of a bundle's notice mail."""
    fields = ("set", "messages", "first_received", "last_received")
    values = [header_value(manifest[k]) for k in fields]
    return "{} {}: {} messages, {}..{}".format(SUBJECT_TAG, *values)


def subject_set(text: str) -> str | None:
    """The set named by a notice's Subject (:func:`subject`), anywhere in
    ``text``; None if ``text`` is not such a Subject."""
    match = _SUBJECT_RE.search(text)
    return match.group(1) if match else None
