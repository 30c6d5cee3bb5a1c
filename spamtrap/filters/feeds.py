"""Stage "feeds": clean up what arrives through a forwarder's feed address.

Donors (use cases B and D) forward their trap mail to a feed address. On the
way their systems add header fields that describe *their* delivery, not the
spam: Delivered-To, X-Original-To (which also give away the donor's trap
addresses), Received lines of their own relays. This stage removes them from
the top header block, byte-exactly, and records what it removed in the
metadata field ``x_stripped``.

Donors whose users forward spam "as attachment" send a wrapper message with
the spam inside as ``message/rfc822`` parts. With ``extract_attached`` every
such part becomes a message of its own, and the wrapper is dropped.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

from spamtrap import mime
from spamtrap.config import Config, FeedConfig
from spamtrap.filters import Replace
from spamtrap.message import Envelope

# Header field names (regexps matched against the whole name, ignoring
# case) that forwarding and final delivery add. Not X-Spam-*: spammers
# forge "X-Spam-Status: No" and the like, and that is data; add it to a
# feed's strip_headers when you know the donor's filter adds it.
DEFAULT_STRIP = [
    r"Delivered-To",
    r"X-Original-To",
    r"X-Original-Delivered-To",
    r"X-Delivered-To",
    r"Envelope-To",
    r"X-Envelope-To",
    r"X-Forwarded-.*",  # X-Forwarded-To, X-Forwarded-For, X-Forwarded-Message-Id
    r"Resent-.*",  # RFC 5322 3.6.6, added by the forwarding user's MUA
    r"X-Resent-.*",
    r"Return-Path",  # added at final delivery (RFC 5321 4.4)
    r"X-Sieve.*",  # Cyrus and Dovecot sieve at the donor's mailbox
]

# An attached message inside an attached message inside ... : how deep
# extraction goes. Deeper ones stay inside the message that holds them.
MAX_MESSAGE_DEPTH = 3
# Most messages taken out of one wrapper.
MAX_EXTRACTED = 256
# Bounds for the walk over a wrapper.
MAX_PARTS = 1000
MAX_DEPTH = 12
# Largest decoded (base64) attached message.
MAX_DECODED = 16 * 1024 * 1024


def _compile(patterns: Sequence[str | re.Pattern[str]]) -> list[re.Pattern[str]]:
    return [p if isinstance(p, re.Pattern) else re.compile(p, re.IGNORECASE) for p in patterns]


DEFAULT_PATTERNS = _compile(DEFAULT_STRIP)


def strip_fields(
    data: bytes, patterns: Sequence[re.Pattern[str]], received: int = 0
) -> tuple[bytes, dict[str, int]]:
    """Remove from the top header block every field whose whole name
    matches one of ``patterns``, and the first ``received`` Received fields.

    Whole fields go, with their continuation lines and line end; every
    other byte stays as it was. Returns the new bytes and the removed
    field names (as first written) with their counts, in order.
    """
    spans, _ = mime.field_spans(data)
    removed: dict[str, int] = {}
    spelling: dict[str, str] = {}
    keep_from = 0
    pieces = []
    received_left = received
    for span in spans:
        lower = span.name.lower()
        if lower == "received" and received_left > 0:
            received_left -= 1
        elif not any(p.fullmatch(span.name) for p in patterns):
            continue
        name = spelling.setdefault(lower, span.name)
        removed[name] = removed.get(name, 0) + 1
        pieces.append(data[keep_from : span.start])
        keep_from = span.end
    if not removed:
        return data, {}
    pieces.append(data[keep_from:])
    return b"".join(pieces), removed


def describe(removed: dict[str, int]) -> str:
    """The ``x_stripped`` value, e.g. ``Received=2, Delivered-To=1``."""
    return ", ".join(f"{name}={n}" for name, n in removed.items())


def _line_end(data: bytes) -> bytes:
    nl = data.find(b"\n")
    return b"\n" if nl >= 0 and not data[:nl].endswith(b"\r") else b"\r\n"


def attached_messages(data: bytes) -> list[bytes]:
    """Every attached message/rfc822 part's message, in order, up to
    MAX_MESSAGE_DEPTH levels deep (an attached message inside an attached
    message is listed after the one that holds it).

    Parts without a transfer encoding are returned byte for byte as they
    are in ``data``; base64 and quoted-printable ones decoded. Each ends
    with a line end: the one before a MIME delimiter belongs to the
    delimiter, so the style of the message's own first line end is added.
    Empty parts are left out.
    """
    out = []
    parts = mime.walk(
        data,
        max_parts=MAX_PARTS,
        max_depth=MAX_DEPTH,
        decode_messages=True,
        max_decoded=MAX_DECODED,
    )
    for part in parts:
        if part.content_type != "message/rfc822" or part.message_depth >= MAX_MESSAGE_DEPTH:
            continue
        inner = part.enclosed_message(MAX_DECODED)
        if not inner or not inner.strip():
            continue
        if not inner.endswith(b"\n"):
            inner += _line_end(inner)
        out.append(inner)
        if len(out) == MAX_EXTRACTED:
            break
    return out


def derived(env: Envelope, n: int, data: bytes) -> Envelope:
    """A copy of ``env`` carrying ``data`` as the ``n``-th extracted message."""
    msg_id = f"{env.msg_id}-{n}"
    meta = copy.deepcopy(env.meta)
    meta["id"] = [msg_id]
    meta["x_extracted_from"] = [env.msg_id]
    meta.pop("x_stripped", None)
    return Envelope(
        msg_id=msg_id,
        received_at=env.received_at,
        mail_from=env.mail_from,
        rcpts=list(env.rcpts),
        data=data,
        feed=env.feed,
        meta=meta,
        received_line=env.received_line,
    )


class FeedStage:
    name = "feeds"

    def __init__(self, feeds: Sequence[FeedConfig]) -> None:
        self.feeds = {f.id: f for f in feeds}
        self.patterns = {
            f.id: (DEFAULT_PATTERNS if f.strip_headers is None else _compile(f.strip_headers))
            for f in feeds
        }

    def __call__(self, env: Envelope) -> Replace | None:
        if env.feed is None:
            return None
        feed = self.feeds.get(env.feed)
        # A feed gone from the config since the message was spooled: it
        # still came through a forwarder, so strip the usual fields.
        patterns = self.patterns.get(env.feed, DEFAULT_PATTERNS)
        if feed is not None and feed.extract_attached:
            inner = attached_messages(env.data)
            if inner:
                messages = []
                for n, data in enumerate(inner, 1):
                    msg = derived(env, n, data)
                    _strip(msg, patterns, 0)
                    messages.append(msg)
                return Replace(messages, reason=f"rfc822:{len(messages)}")
        _strip(env, patterns, feed.strip_received if feed is not None else 0)
        return None


def _strip(env: Envelope, patterns: Sequence[re.Pattern[str]], received: int) -> None:
    # In place: the envelope is this worker's own copy, read from the spool.
    data, removed = strip_fields(env.data, patterns, received)
    if removed:
        env.data = data
        env.meta["x_stripped"] = [describe(removed)]


def make(cfg: Config, reactor: Any) -> FeedStage | None:
    if not cfg.feeds:
        return None
    return FeedStage(cfg.feeds)
