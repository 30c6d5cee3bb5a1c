"""Stage "feeds": clean up what arrives through a forwarder's feed address.

Donors (use cases B and D) forward their trap mail to a feed address. On the
way their systems add header fields that describe *their* delivery, not the
spam: Delivered-To, X-Original-To (which also give away the donor's trap
addresses), Received lines of their own relays. This stage removes them from
the top header block, byte-exactly, and records what it removed in the
metadata field ``x_stripped``.

Which Received lines are the donor's is decided by who added them, never by
a count: ``donor_received`` walks them from the top and removes each one
whose ``by`` host is one of the donor's, until the first that records the
message coming in from outside the donor (the spammer's connection to the
donor's MX: evidence) or that a foreign host added. That one and everything
below it stay, even lines naming a donor host: below the entry point the
header is the spammer's, and spammers forge.

Donors whose users forward spam "as attachment" send a wrapper message with
the spam inside as ``message/rfc822`` parts. With ``extract_attached`` every
such part becomes a message of its own, and the wrapper is dropped.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


# -- Received lines: who added them ---------------------------------------------

# Bounds for reading hostile header blocks: at most this many Received fields
# are walked, and at most this much of each is read (the from and by parts
# come first; a by part further in is not trusted to be one).
MAX_RECEIVED_WALK = 100
MAX_RECEIVED_SCAN = 4096
MAX_COMMENT_DEPTH = 20

# Tokens of a Received value: a quoted pair, a comment bracket, the ";"
# before the date, or a run of anything else. Each alternative is a single
# character class, so the scan is linear in the input.
_TOKEN = re.compile(r"\\.|[()]|;|[^\s()\\;]+", re.DOTALL)
# Candidates for IP addresses inside a from part: "[192.0.2.1]",
# "(192.0.2.1)", "[IPv6:2001:db8::1]", "helo=[192.0.2.1]".
_IP_CANDIDATE = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_CLAUSE_ENDS = {"by", "via", "with", "id", "for"}
# A hop from these is a hand-over on the donor's own machine (a content
# filter re-injecting, a local submission). Only the usual loopback
# addresses: other 127/8 ones are in donor_networks when a donor uses them.
_LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ReceivedParts:
    """What one Received field says about its hop (RFC 5321 4.4)."""

    by_host: str | None  # lower case, no trailing dot; None: no by part found
    has_from: bool  # a top-level "from" part (not "(from userid 0)")
    from_ips: tuple[IPAddress, ...]  # every address in the from part


def parse_received(value: bytes) -> ReceivedParts:
    """The by-host and from part of a Received field's value (the bytes
    after the colon, folded or not).

    Comments are skipped (so "(Postfix, from userid 1000)" is no from part
    and Exim's "(helo=by)" no by part), except that the addresses in the
    from part's comments are collected: that is where Postfix, Sendmail and
    Exim put the peer's address. The word after "from" is always the peer's
    name, even when a sender called itself "by". Never raises.
    """
    text = value[:MAX_RECEIVED_SCAN].decode("latin-1")
    depth = 0
    first = True
    clause = ""
    want: str | None = None  # "from-host" or "by-host": the next word is a name
    has_from = False
    from_text: list[str] = []
    by_host = None
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if tok == "(":
            depth += 1
            if depth > MAX_COMMENT_DEPTH:
                break  # not a Received line any MTA wrote
            continue
        if tok == ")":
            depth = max(0, depth - 1)
            continue
        if depth:
            if clause == "from":
                from_text.append(tok)
            continue
        if tok == ";":
            break  # the date follows
        if want == "by-host":
            by_host = tok.lower().rstrip(".")
            break
        if want == "from-host":
            from_text.append(tok)
            want = None
            continue
        low = tok.lower()
        if first and low == "from":
            has_from, clause, want = True, "from", "from-host"
        elif low in _CLAUSE_ENDS:
            clause = low
            if low == "by":
                want = "by-host"
        elif clause == "from":
            from_text.append(tok)
        first = False
    return ReceivedParts(by_host or None, has_from, tuple(_addresses(from_text)))


def _addresses(tokens: list[str]) -> list[IPAddress]:
    out = []
    for tok in tokens:
        for cand in _IP_CANDIDATE.findall(tok.lower().replace("ipv6:", "")):
            try:
                out.append(ipaddress.ip_address(cand))
            except ValueError:
                continue
    return out


class DonorHosts:
    """A feed's donor: its host names and regexps for the by part, and the
    networks its own hosts hand mail over from."""

    def __init__(
        self,
        names: Sequence[str] = (),
        patterns: Sequence[re.Pattern[str]] = (),
        networks: Sequence[str] = (),
    ) -> None:
        self.names = {n.lower().rstrip(".") for n in names}
        self.patterns = list(patterns)
        self.networks = [ipaddress.ip_network(n) for n in networks]
        self._inside = (*_LOOPBACK, *self.networks)

    def __bool__(self) -> bool:
        return bool(self.names or self.patterns)

    def is_donor_host(self, host: str | None) -> bool:
        if host is None or len(host) > 255:
            return False
        return host in self.names or any(p.fullmatch(host) for p in self.patterns)

    def is_inside(self, ip: IPAddress) -> bool:
        mapped = getattr(ip, "ipv4_mapped", None)
        if mapped is not None:
            ip = mapped
        return any(ip in net for net in self._inside)

    def is_donor_hop(self, parts: ReceivedParts) -> bool:
        """A line the donor's systems added on the way out: by a donor
        host, from no network peer (a local hand-over: Postfix's alias
        forwarding, pickup, Sendmail's submission, Exim "with local") or
        from the donor's own network. A line by a donor host from any other
        address is the message's entry into the donor, and not a donor hop.
        """
        if not self.is_donor_host(parts.by_host):
            return False
        return all(self.is_inside(ip) for ip in parts.from_ips)


def _is_received(name: str) -> bool:
    return name.lower() == "received"


@dataclass(frozen=True)
class FieldDecision:
    """One field of the top header block and what stripping does to it."""

    name: str
    start: int
    end: int
    # The config key that removes it: "strip_headers" (the name matched),
    # "strip_received_by" (a donor hop) or "strip_received" (the count);
    # None: it stays.
    rule: str | None


def plan_strip(
    data: bytes,
    patterns: Sequence[re.Pattern[str]],
    received: int = 0,
    donor: DonorHosts | None = None,
) -> list[FieldDecision]:
    """Every field of the top header block, each with the rule that
    removes it (or None).

    - fields whose whole name matches one of ``patterns``;
    - with ``donor``: the Received fields from the top that are donor hops
      (DonorHosts.is_donor_hop), up to the first that is not; it and every
      Received field below it stay;
    - else the first ``received`` Received fields (deprecated).
    """
    spans, _ = mime.field_spans(data)
    walking = donor is not None and bool(donor)
    received_left = 0 if walking else received
    walked = 0
    out = []
    for span in spans:
        rule = None
        if _is_received(span.name):
            if walking:
                assert donor is not None
                walked += 1
                value = data[span.start : span.end].partition(b":")[2]
                if walked <= MAX_RECEIVED_WALK and donor.is_donor_hop(parse_received(value)):
                    rule = "strip_received_by"
                else:
                    walking = False
            elif received_left > 0:
                received_left -= 1
                rule = "strip_received"
        if rule is None and any(p.fullmatch(span.name) for p in patterns):
            rule = "strip_headers"
        out.append(FieldDecision(span.name, span.start, span.end, rule))
    return out


def apply_plan(data: bytes, plan: Sequence[FieldDecision]) -> tuple[bytes, dict[str, int]]:
    """``data`` without the fields the plan removes, and the removed
    field names (as first written) with their counts, in order."""
    removed: dict[str, int] = {}
    spelling: dict[str, str] = {}
    keep_from = 0
    pieces = []
    for d in plan:
        if d.rule is None:
            continue
        name = spelling.setdefault(d.name.lower(), d.name)
        removed[name] = removed.get(name, 0) + 1
        pieces.append(data[keep_from : d.start])
        keep_from = d.end
    if not removed:
        return data, {}
    pieces.append(data[keep_from:])
    return b"".join(pieces), removed


def strip_fields(
    data: bytes,
    patterns: Sequence[re.Pattern[str]],
    received: int = 0,
    donor: DonorHosts | None = None,
) -> tuple[bytes, dict[str, int]]:
    """Remove from the top header block the fields plan_strip marks.

    Whole fields go, with their continuation lines and line end; every
    other byte stays as it was. Returns the new bytes and the removed
    field names (as first written) with their counts, in order.
    """
    return apply_plan(data, plan_strip(data, patterns, received, donor))


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
        received=list(env.received),
    )


# Called with each message the stage strips (before stripping) and the plan:
# ``spamtrap explain`` uses it to show which fields go.
StripObserver = Callable[[Envelope, list[FieldDecision]], None]


class FeedStage:
    name = "feeds"

    def __init__(self, feeds: Sequence[FeedConfig]) -> None:
        self.feeds = {f.id: f for f in feeds}
        self.patterns = {
            f.id: (DEFAULT_PATTERNS if f.strip_headers is None else _compile(f.strip_headers))
            for f in feeds
        }
        self.donors = {
            f.id: DonorHosts(f.strip_received_by, f.strip_received_by_regex, f.donor_networks)
            for f in feeds
        }
        self.observer: StripObserver | None = None

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
                    # Not the donor's Received lines: an attached message's
                    # are the spam's path to the donor's mailbox.
                    self._strip(msg, patterns, 0, None)
                    messages.append(msg)
                return Replace(messages, reason=f"rfc822:{len(messages)}")
        if feed is None:
            self._strip(env, patterns, 0, None)
        else:
            self._strip(env, patterns, feed.strip_received, self.donors[feed.id])
        return None

    def _strip(
        self,
        env: Envelope,
        patterns: Sequence[re.Pattern[str]],
        received: int,
        donor: DonorHosts | None,
    ) -> None:
        # In place: the envelope is this worker's own copy, read from the spool.
        plan = plan_strip(env.data, patterns, received, donor)
        if self.observer is not None:
            self.observer(env, plan)
        data, removed = apply_plan(env.data, plan)
        if removed:
            env.data = data
            env.meta["x_stripped"] = [describe(removed)]


def make(cfg: Config, reactor: Any) -> FeedStage | None:
    if not cfg.feeds:
        return None
    return FeedStage(cfg.feeds)
