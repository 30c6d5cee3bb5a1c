"""RFC 5965 abuse reports, and the MIME pieces every forwarded mail shares.

Everything here is pure: bytes and metadata in, the whole mail out (CRLF
line ends, not yet dot-stuffed; the SMTP client does that).

A report (``multipart/report; report-type=feedback-report``) has three
parts:

1. ``text/plain``: a short note for a person;
2. ``message/feedback-report``: ``Feedback-Type: abuse``, ``User-Agent``,
   ``Version: 1`` and what we know of the message (``Source-IP``,
   ``Arrival-Date``, ``Original-Mail-From``, ``Reported-Domain``,
   ``Reporting-MTA`` and, only for a set that does not redact,
   ``Original-Rcpt-To``);
3. the message: ``message/rfc822`` (our metadata block, the trap-hop
   ``Received:`` line and the message as received), or its header alone as
   ``text/rfc822-headers`` when it is over ``max_original`` bytes or
   cannot travel as ``message/rfc822`` (see :func:`body_encoding`).

``message/rfc822`` may only be sent ``7bit`` or ``8bit`` (RFC 2046 5.2.1:
no base64, no quoted-printable), so what it can carry depends on the
bytes: lines of at most 998 octets and no NUL, and 8-bit bytes only over a
relay that offers 8BITMIME. :func:`body_encoding` decides.
"""

from __future__ import annotations

import binascii
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.header import Header

from spamtrap.message import Envelope, rfc2822_date
from spamtrap.mime import header_fields, split_message

# RFC 5322 2.1.1: a line is at most 998 octets, without its CRLF.
MAX_LINE = 998
# Of the original Subject, at most this many characters go into ours.
MAX_SUBJECT = 200

_LINE_END = re.compile(rb"\r\n|\r|\n")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_ATOM_JUNK = re.compile(r"[^A-Za-z0-9_-]+")
_DOMAIN = re.compile(r"(?=.{1,253}\Z)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]*")
_PATH_CHARS = re.compile(r"[\x21-\x7e]+")  # an address we can write between < and >


# -- the bytes of a part -------------------------------------------------------


def wire_form(data: bytes) -> bytes:
    """``data`` with CRLF line ends throughout, ending with CRLF.

    SMTP carries nothing else (RFC 5321 2.3.8): a bare LF and a bare CR
    each become CRLF, as Python's email package reads them.
    """
    data = _LINE_END.sub(b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def body_encoding(wire: bytes) -> str:
    """``7bit``, ``8bit`` or ``binary`` (a NUL, or a line over 998 octets)
    for bytes in :func:`wire_form`. Only the first two can be sent as
    ``message/rfc822`` over SMTP without BINARYMIME."""
    if b"\0" in wire or max(map(len, wire.split(b"\r\n"))) > MAX_LINE:
        return "binary"
    return "7bit" if wire.isascii() else "8bit"


def fits(wire: bytes, eight_bit: bool) -> str | None:
    """The Content-Transfer-Encoding for ``wire`` as ``message/rfc822``
    over a transport that does (or does not) carry 8-bit bytes, or None
    when it cannot go as ``message/rfc822`` there."""
    encoding = body_encoding(wire)
    if encoding == "7bit" or (encoding == "8bit" and eight_bit):
        return encoding
    return None


def quoted_printable(wire: bytes) -> bytes:
    """``wire`` in quoted-printable (for a text part), CRLF line ends kept."""
    return wire_form(binascii.b2a_qp(wire, quotetabs=False, istext=True, header=False))


def boundary_for(*contents: bytes) -> str:
    """A multipart boundary that occurs in none of ``contents``: derived
    from their hash, which no message can contain without knowing it."""
    digest = hashlib.sha256()
    for content in contents:
        digest.update(hashlib.sha256(content).digest())
    return "=_spamtrap_" + digest.hexdigest()[:40]


def multipart(headers: Sequence[tuple[str, str]], parts: Iterable[bytes], boundary: str) -> bytes:
    """A whole mail: its header fields, then each part (its own header
    fields, a blank line, its body in wire form) between delimiters.

    The CRLF before a delimiter belongs to the delimiter (RFC 2046 5.1.1),
    so one is added after each body: a body keeps its own last line end.
    """
    delimiter = b"--" + boundary.encode("ascii")
    out = [field_line(name, value) for name, value in headers]
    out.append(b"\r\n")
    for part in parts:
        out += [delimiter, b"\r\n", part, b"\r\n"]
    out += [delimiter, b"--\r\n"]
    return b"".join(out)


def part(fields: Sequence[tuple[str, str]], body: bytes) -> bytes:
    return b"".join(field_line(n, v) for n, v in fields) + b"\r\n" + body


def field_line(name: str, value: str) -> bytes:
    """One header field of ours (ASCII; folds already in ``value``)."""
    return f"{name}: {value}\r\n".encode("ascii")


# -- header values --------------------------------------------------------------


def clean_text(value: str, limit: int = MAX_SUBJECT) -> str:
    """``value`` on one line: controls and line ends become a space, runs of
    white space one space, at most ``limit`` characters."""
    text = " ".join(_UNPRINTABLE.sub(" ", value).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def encoded(name: str, value: str) -> str:
    """``value`` for our header field ``name``: as it is when printable
    ASCII (an encoded word in it stays one), else RFC 2047 UTF-8 words,
    folded (RFC 5322 2.2.3) to lines of 78 characters."""
    if value.isascii():
        return value
    folded = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return str(folded)


def original_subject(message: bytes) -> str:
    """The first Subject of the message's top header, unfolded and cleaned
    (8-bit bytes read as UTF-8); "" without one."""
    head, _ = split_message(message)
    value = next((v for n, v in header_fields(head) if n == "subject"), "")
    return clean_text(value)


def subject_line(prefix: str, set_name: str, subject: str) -> str:
    """``<prefix> <set>: <original subject>``, for our Subject field."""
    text = clean_text(f"{prefix} {set_name}: {subject}", limit=MAX_SUBJECT + 100)
    return encoded("Subject", text)


def message_id(msg_id: str, what: str, output: str, hostname: str) -> str:
    """``<id.what.output@host>``: the same for every try of one item, so a
    partner can drop a retry's copy (RFC 5322 3.6.4 dot-atoms only)."""
    atoms = [_ATOM_JUNK.sub("-", p).strip("-") for p in (*msg_id.split("."), what, output)]
    host = hostname.lower().rstrip(".")
    if not _DOMAIN.fullmatch(host):
        host = "localhost"
    return "<{}@{}>".format(".".join(a for a in atoms if a), host)


def address_list(addresses: Sequence[str]) -> str:
    """For To: and Resent-To:, one address a line."""
    return ",\r\n ".join(addresses)


def angle_path(address: str) -> str | None:
    """``<address>`` (``<>`` for the null sender), or None when the address
    holds what a header cannot (controls, spaces, 8-bit) or is too long."""
    if not address:
        return "<>"
    if _PATH_CHARS.fullmatch(address) is None or "<" in address or ">" in address:
        return None
    return f"<{address}>" if len(address) <= 254 else None


# -- what the report says ------------------------------------------------------------


def source_ip(envelope: Envelope) -> str | None:
    """The client that sent the message, when we know it: the peer (the
    original client behind a trusted relay). None for mail that came through
    a feed (the peer is the donor's system), for a relay that did not say who
    its client was (``unknown``: the peer is the relay) and for a peer that
    is not an IP address."""
    if envelope.values("feed"):
        return None
    relay = envelope.values("relay")
    if relay and relay[0].rsplit(" ", 1)[-1] == "unknown":
        return None
    peer = envelope.values("peer")
    if not peer:
        return None
    try:
        ip = ipaddress.ip_address(peer[0].split(" ", 1)[0].strip("[]"))
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def _domain_of(address: str) -> str | None:
    domain = address.rpartition("@")[2].strip().strip("<>").lower().rstrip(".")
    return domain if "@" in address and _DOMAIN.fullmatch(domain) else None


def reported_domains(envelope: Envelope, message: bytes) -> list[str]:
    """The sender's domains: the envelope sender's (not for a feed, where it
    is the donor's) and the From field's; never a domain the message was
    sent to (a spammer forging the trap's own domain, masked or not)."""
    ours = {d.lower() for d in envelope.values("domain")}
    candidates = [] if envelope.values("feed") else [envelope.mail_from]
    head, _ = split_message(message)
    sender = next((v for n, v in header_fields(head) if n == "from"), "")
    found = re.findall(r"[^\s<>\"(),;:]+@[^\s<>\"(),;:]+", sender)
    candidates += found[-1:]
    domains = [d for d in map(_domain_of, candidates) if d is not None and d not in ours]
    return list(dict.fromkeys(domains))


@dataclass(frozen=True)
class Report:
    """Who sends the report to whom, and what it may say."""

    sender: str
    to: Sequence[str]
    subject_prefix: str
    user_agent: str  # e.g. spamtrap/0.1.0 (RFC 5965 3.1: product tokens)
    reporting_mta: str  # our hostname
    output: str  # the output's name, for the Message-ID
    # Original-Rcpt-To only where the set keeps trap addresses as received.
    include_rcpts: bool
    # Over this, the original goes as its header alone.
    max_original: int


def feedback_fields(envelope: Envelope, message: bytes, report: Report) -> list[tuple[str, str]]:
    """The ``message/feedback-report`` fields, required ones first."""
    fields = [
        ("Feedback-Type", "abuse"),
        ("User-Agent", report.user_agent),
        ("Version", "1"),
    ]
    mail_from = angle_path(envelope.mail_from)
    if mail_from is not None:
        fields.append(("Original-Mail-From", mail_from))
    fields.append(("Arrival-Date", rfc2822_date(envelope.received_at)))
    fields.append(("Reporting-MTA", f"dns; {report.reporting_mta}"))
    ip = source_ip(envelope)
    if ip is not None:
        fields.append(("Source-IP", ip))
    if report.include_rcpts:
        for rcpt in envelope.rcpts:
            path = angle_path(rcpt)
            if path is not None and path != "<>":
                fields.append(("Original-Rcpt-To", path))
    fields += [("Reported-Domain", d) for d in reported_domains(envelope, message)]
    return fields


def _note(envelope: Envelope, set_name: str, ip: str | None, whole: bool, size: int) -> bytes:
    source = f"from {ip} " if ip else ""
    lines = [
        "This is an abuse report (RFC 5965) for a message that a spam trap",
        f"received {source}on {rfc2822_date(envelope.received_at)}.",
        "Nobody asked for it: the addresses of a spam trap are never given out.",
        "",
        f"spamtrap message id: {envelope.msg_id}",
        f"set: {set_name}",
    ]
    if not whole:
        lines += ["", f"The message ({size} bytes) is too large or cannot be carried as it is:"]
        lines += ["only its header is attached."]
    return "".join(clean_text(line, 500) + "\r\n" for line in lines).encode("ascii", "replace")


_TEXT_PART = [
    ("Content-Type", 'text/plain; charset="us-ascii"'),
    ("Content-Transfer-Encoding", "7bit"),
]
_REPORT_PART = [("Content-Type", "message/feedback-report"), ("Content-Transfer-Encoding", "7bit")]


def original_part(wire: bytes, eight_bit: bool, max_original: int) -> tuple[bytes, bool]:
    """The report's third part, and whether it holds the whole message:
    ``message/rfc822``, or the header alone as ``text/rfc822-headers``
    (quoted-printable if it cannot go as it is)."""
    encoding = fits(wire, eight_bit) if len(wire) <= max_original else None
    if encoding is not None:
        fields = [("Content-Type", "message/rfc822"), ("Content-Transfer-Encoding", encoding)]
        return part(fields, wire), True
    head, _ = split_message(wire)
    head = wire_form(head) if head else b""
    head_encoding = fits(head, eight_bit) if head else "7bit"
    if head_encoding is None:
        head, head_encoding = quoted_printable(head), "quoted-printable"
    fields = [
        ("Content-Type", 'text/rfc822-headers; charset="utf-8"'),
        ("Content-Transfer-Encoding", head_encoding),
    ]
    return part(fields, head), False


def build_report(
    envelope: Envelope,
    set_name: str,
    message: bytes,
    report: Report,
    now: float,
    eight_bit: bool,
) -> bytes:
    """The whole RFC 5965 report on ``message`` (the message as stored:
    metadata block and original), for a transport that does or does not
    carry 8-bit bytes."""
    third, whole = original_part(wire_form(message), eight_bit, report.max_original)
    note = _note(envelope, set_name, source_ip(envelope), whole, len(message))
    feedback = b"".join(field_line(n, v) for n, v in feedback_fields(envelope, message, report))
    parts = [part(_TEXT_PART, note), part(_REPORT_PART, feedback), third]
    boundary = boundary_for(*parts)
    headers = [
        ("From", report.sender),
        ("To", address_list(report.to)),
        ("Subject", subject_line(report.subject_prefix, set_name, original_subject(message))),
        ("Date", rfc2822_date(now)),
        ("Message-ID", message_id(envelope.msg_id, "arf", report.output, report.reporting_mta)),
        ("MIME-Version", "1.0"),
        (
            "Content-Type",
            f'multipart/report; report-type=feedback-report;\r\n boundary="{boundary}"',
        ),
        ("X-Spamtrap-Id", envelope.msg_id),
        ("Auto-Submitted", "auto-generated"),
    ]
    return multipart(headers, parts, boundary)
