"""Reading a feedback report (RFC 5965) back: its fields, its parts as
sent, and a check of its structure and field syntax, for the ARF builder's
unit tests and the forward output's tests through a real relay."""

from __future__ import annotations

import email
import email.policy
import ipaddress
import re
from email.message import Message
from email.utils import parsedate_to_datetime

# RFC 5965 3.1-3.3: which fields appear once at most (the rest any number of times).
ONCE = {
    "Feedback-Type",
    "User-Agent",
    "Version",
    "Original-Envelope-Id",
    "Original-Mail-From",
    "Arrival-Date",
    "Reporting-MTA",
    "Source-IP",
    "Incidents",
}
PRODUCT = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(/[!#$%&'*+.^_`|~0-9A-Za-z-]+)?")
DOMAIN = re.compile(r"([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)+[a-z][a-z0-9-]*")
PATH = re.compile(r"<([\x21-\x3b\x3d\x3f-\x7e]+@[a-z0-9.-]+)?>")


def parse(mail: bytes) -> Message:
    return email.message_from_bytes(mail, policy=email.policy.compat32)


def feedback(mail: bytes) -> list[tuple[str, str]]:
    """The message/feedback-report fields, in order, as raw (name, value)."""
    part = parse(mail).get_payload()[1]
    body = part.get_payload()[0]  # the parser reads the fields as a message's
    return [(name, str(value)) for name, value in body.items()]


def raw_bodies(mail: bytes) -> list[bytes]:
    """Each part of the top multipart exactly as sent (its fields and body),
    without the CRLF that belongs to the next delimiter."""
    boundary = parse(mail).get_boundary()
    assert boundary is not None
    pieces = mail.split(b"\r\n--" + boundary.encode())
    return [p.removeprefix(b"\r\n") for p in pieces[1:-1]]


def part_body(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


def check_structure(mail: bytes, received_at: float | None) -> Message:
    """RFC 5965 section 2: the structure of a feedback report (and 3: its
    fields' syntax), for a message received at ``received_at`` (None: any time)."""
    msg = parse(mail)
    assert not msg.defects
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "feedback-report"
    assert msg["MIME-Version"] == "1.0"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts[:2]] == ["text/plain", "message/feedback-report"]
    assert len(parts) == 3
    assert parts[2].get_content_type() in ("message/rfc822", "text/rfc822-headers")
    fields = feedback(mail)
    names = [n for n, _ in fields]
    assert names[:3] == ["Feedback-Type", "User-Agent", "Version"]  # required (3.1)
    for name in ONCE:
        assert names.count(name) <= 1, name
    values = dict(fields)
    assert values["Feedback-Type"] == "abuse"
    assert values["Version"] == "1"
    assert all(PRODUCT.fullmatch(p) for p in values["User-Agent"].split())
    for name, value in fields:
        if name == "Arrival-Date":
            arrived = parsedate_to_datetime(value).timestamp()
            assert received_at is None or arrived == int(received_at)
        elif name == "Source-IP":
            ipaddress.ip_address(value)
        elif name in ("Original-Mail-From", "Original-Rcpt-To"):
            assert PATH.fullmatch(value), value
        elif name == "Reported-Domain":
            assert DOMAIN.fullmatch(value), value
        elif name == "Reporting-MTA":
            assert value.startswith("dns; ")
    # The report part is 7-bit US-ASCII (RFC 5965 3: no internationalised fields).
    assert part_body(raw_bodies(mail)[1]).isascii()
    return msg
