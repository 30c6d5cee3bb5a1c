"""The RFC 5965 report builder, parsed back with Python's email package and
checked against the RFC's structure and field syntax."""

from __future__ import annotations

import dataclasses
import email
import email.policy

from hypothesis import given, settings
from hypothesis import strategies as st

from spamtrap.message import Envelope
from spamtrap.outputs import arf
from tests.support.arf import check_structure, feedback, parse, part_body, raw_bodies

NOW = 1_800_000_000.0
RECEIVED_AT = 1_799_999_000.0
TEXT = b"From: Bot <bot@spam.example>\r\nSubject: cheap pills\r\nTo: v@trap.example\r\n\r\nbuy\r\n"
REPORT = arf.Report(
    sender="reports@trap.test",
    to=("abuse@partner.test", "spam@other.test"),
    subject_prefix="spamtrap",
    user_agent="spamtrap/0.1.0",
    reporting_mta="trap.test",
    output="abuse",
    include_rcpts=True,
    max_original=1 << 20,
)


def envelope(
    data: bytes = TEXT,
    mail_from: str = "bot@spam.example",
    rcpts: tuple[str, ...] = ("v@trap.example",),
    **meta: list[str],
) -> Envelope:
    fields = {
        "id": ["18c0.abc.node1"],
        "peer": ["203.0.113.7 40000"],
        "rcpt": [f"<{r}>" for r in rcpts],
        "domain": sorted({r.rpartition("@")[2] for r in rcpts}),
    }
    fields.update(meta)
    received = ["from bot ([203.0.113.7])", "by trap.test (spamtrap) with ESMTP id x"]
    received.append(f"for <{rcpts[0]}>; Fri, 15 Jan 2027 08:00:00 +0000")
    return Envelope(
        "18c0.abc.node1", RECEIVED_AT, mail_from, list(rcpts), data, meta=fields, received=received
    )


def stored(env: Envelope) -> bytes:
    return env.stored_bytes("wire")


def report_of(env: Envelope, report: arf.Report = REPORT, eight_bit: bool = True) -> bytes:
    return arf.build_report(env, "all", stored(env), report, NOW, eight_bit)


def check_wire(mail: bytes, eight_bit: bool) -> None:
    """What SMTP can carry: CRLF line ends only, lines of at most 998 octets,
    and ASCII unless the relay takes 8-bit."""
    assert mail.endswith(b"\r\n")
    assert b"\n" not in mail.replace(b"\r\n", b"")
    assert b"\r" not in mail.replace(b"\r\n", b"")
    assert max(map(len, mail.split(b"\r\n"))) <= arf.MAX_LINE
    if not eight_bit:
        assert mail.isascii()


def test_a_report_has_rfc5965s_structure_and_our_fields() -> None:
    mail = report_of(envelope())
    check_wire(mail, eight_bit=False)
    msg = check_structure(mail, RECEIVED_AT)
    assert msg["From"] == "reports@trap.test"
    assert msg["To"].replace("\r\n", "").split(", ") == list(REPORT.to)
    assert msg["Subject"] == "spamtrap all: cheap pills"
    assert msg["X-Spamtrap-Id"] == "18c0.abc.node1"
    assert msg["Message-ID"] == "<18c0.abc.node1.arf.abuse@trap.test>"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert feedback(mail) == [
        ("Feedback-Type", "abuse"),
        ("User-Agent", "spamtrap/0.1.0"),
        ("Version", "1"),
        ("Original-Mail-From", "<bot@spam.example>"),
        ("Arrival-Date", "Fri, 15 Jan 2027 07:43:20 GMT"),
        ("Reporting-MTA", "dns; trap.test"),
        ("Source-IP", "203.0.113.7"),
        ("Original-Rcpt-To", "<v@trap.example>"),
        ("Reported-Domain", "spam.example"),
    ]
    note = msg.get_payload()[0].get_payload()
    assert "received from 203.0.113.7 on Fri, 15 Jan 2027 07:43:20 GMT" in note
    assert "18c0.abc.node1" in note


def test_the_third_part_is_the_message_as_stored_byte_for_byte() -> None:
    env = envelope()
    mail = report_of(env)
    raw = raw_bodies(mail)[2]
    assert raw.startswith(b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n")
    # Our metadata block and trap-hop Received line, then the message as received.
    assert part_body(raw) == stored(env)
    attached = parse(mail).get_payload()[2].get_payload()[0]
    assert attached["X-Spamtrap-Id"] == "18c0.abc.node1"
    assert attached["Subject"] == "cheap pills"


def test_original_rcpt_to_only_when_the_report_may_name_the_trap() -> None:
    env = envelope(rcpts=("a@trap.example", "b@trap.example"))
    named = [v for n, v in feedback(report_of(env)) if n == "Original-Rcpt-To"]
    assert named == ["<a@trap.example>", "<b@trap.example>"]
    hidden = dataclasses.replace(REPORT, include_rcpts=False)
    fields = feedback(report_of(env, hidden))
    assert "Original-Rcpt-To" not in dict(fields)
    assert b"a@trap.example" not in part_body(raw_bodies(report_of(env, hidden))[1])


def test_the_null_sender_is_reported_as_an_empty_path() -> None:
    fields = dict(feedback(report_of(envelope(mail_from=""))))
    assert fields["Original-Mail-From"] == "<>"


def test_an_envelope_sender_a_header_cannot_hold_is_left_out() -> None:
    for sender in ("bot @spam.example", "bot\r\nX-Evil: 1@spam.example", "b\u00f6t@spam.example"):
        mail = report_of(envelope(mail_from=sender))
        check_structure(mail, RECEIVED_AT)
        assert "Original-Mail-From" not in dict(feedback(mail))
        assert "X-Evil" not in dict(feedback(mail))


def test_source_ip_is_the_client_and_never_a_relay_or_a_donor() -> None:
    def ip(**meta: list[str]) -> str | None:
        return arf.source_ip(envelope(**meta))

    assert ip() == "203.0.113.7"
    assert ip(peer=["2001:db8::7 25"]) == "2001:db8::7"
    assert ip(peer=["::ffff:198.51.100.9 25"]) == "198.51.100.9"
    # Behind a trusted relay, Peer is the original client when the relay said who.
    assert ip(relay=["127.0.0.1 41000 mx1.relay.test xforward"]) == "203.0.113.7"
    assert ip(relay=["127.0.0.1 41000 mx1.relay.test derived"]) == "203.0.113.7"
    # ... and the relay itself when it did not: that is no source to report.
    assert ip(relay=["127.0.0.1 41000 mx1.relay.test unknown"]) is None
    # Mail through a feed came from the donor's systems.
    assert ip(feed=["donor1"]) is None
    assert ip(peer=["not-an-ip 25"]) is None
    assert ip(peer=[]) is None
    fields = dict(feedback(report_of(envelope(feed=["donor1"]))))
    assert "Source-IP" not in fields


def test_reported_domains_are_the_senders_never_the_traps() -> None:
    data = b'From: "Shop" <news@shop.example>\r\nSubject: x\r\n\r\nbody\r\n'
    assert arf.reported_domains(envelope(data), data) == ["spam.example", "shop.example"]
    # The same domain twice is reported once.
    same = b"From: bot@spam.example\r\n\r\n"
    assert arf.reported_domains(envelope(same), same) == ["spam.example"]
    # A spammer forging the trap's own domain (masked in a redacted copy too).
    forged = b"From: v@trap.example\r\n\r\n"
    env = envelope(forged, mail_from="v@trap.example")
    assert arf.reported_domains(env, forged) == []
    masked = envelope(forged, mail_from="x@xxxx.xxxxxxx", domain=["xxxx.xxxxxxx"])
    assert arf.reported_domains(masked, b"From: x@xxxx.xxxxxxx\r\n\r\n") == []
    # Through a feed the envelope sender is the donor's; the From field counts.
    fed = envelope(data, mail_from="srs0=x@donor.example", feed=["donor1"])
    assert arf.reported_domains(fed, data) == ["shop.example"]
    junk = b"From: <@@>\r\n\r\n"
    assert arf.reported_domains(envelope(junk, mail_from="x@-bad-"), junk) == []


def test_a_large_message_is_reported_by_its_header_alone() -> None:
    env = envelope(TEXT + b"x" * 500 + b"\r\n")
    small = dataclasses.replace(REPORT, max_original=300)
    mail = report_of(env, small)
    msg = check_structure(mail, RECEIVED_AT)
    third = msg.get_payload()[2]
    assert third.get_content_type() == "text/rfc822-headers"
    head = part_body(raw_bodies(mail)[2])
    assert head == stored(env).split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert b"xxxx" not in head
    assert "only its header is attached" in msg.get_payload()[0].get_payload()


def test_a_message_that_cannot_travel_as_rfc822_goes_as_its_header() -> None:
    for body in (b"a\0b\r\n", b"y" * 999 + b"\r\n"):
        env = envelope(TEXT + body)
        mail = report_of(env)
        check_wire(mail, eight_bit=True)
        third = check_structure(mail, RECEIVED_AT).get_payload()[2]
        assert third.get_content_type() == "text/rfc822-headers"


def test_8bit_goes_as_8bit_only_where_the_relay_takes_it() -> None:
    data = "From: bot@spam.example\r\nSubject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()
    env = envelope(data)
    eight = report_of(env, eight_bit=True)
    check_wire(eight, eight_bit=True)
    raw = raw_bodies(eight)[2]
    assert b"Content-Transfer-Encoding: 8bit" in raw and part_body(raw) == stored(env)
    seven = report_of(env, eight_bit=False)
    check_wire(seven, eight_bit=False)
    third = check_structure(seven, RECEIVED_AT).get_payload()[2]
    assert third.get_content_type() == "text/rfc822-headers"
    assert third["Content-Transfer-Encoding"] == "quoted-printable"
    head = third.get_payload(decode=True)
    assert head == stored(env).split(b"\r\n\r\n", 1)[0] + b"\r\n"


def test_the_subject_is_decoded_cleaned_and_encoded_again() -> None:
    data = b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\tpills\r\n\r\n"
    assert arf.original_subject(data) == "=?utf-8?q?caf=C3=A9?= pills"
    raw8 = "Subject: caf\u00e9 \u2014 n\u00f8w\r\n\r\n".encode()
    mail = report_of(envelope(raw8))
    subject = email.message_from_bytes(mail, policy=email.policy.default)["Subject"]
    assert subject == "spamtrap all: caf\u00e9 \u2014 n\u00f8w"
    injected = b"Subject: hi\rBcc: victim@example.com\r\n\r\n"
    msg = parse(report_of(envelope(injected)))
    assert msg["Bcc"] is None
    long = b"Subject: " + b"word " * 400 + b"\r\n\r\n"
    assert len(arf.original_subject(long)) == arf.MAX_SUBJECT


def test_the_message_id_is_the_same_on_every_try_and_a_valid_msg_id() -> None:
    assert (
        arf.message_id("18c.a.n1", "arf", "ab..use", "Trap.Test.")
        == "<18c.a.n1.arf.ab-use@trap.test>"
    )
    assert arf.message_id("x", "arf", "o", "not a host") == "<x.arf.o@localhost>"
    first = parse(report_of(envelope()))["Message-ID"]
    assert parse(report_of(envelope()))["Message-ID"] == first


def test_the_boundary_is_in_no_part() -> None:
    env = envelope(b"Subject: x\r\n\r\n--=_spamtrap_\r\n")
    mail = report_of(env)
    boundary = parse(mail).get_boundary()
    assert boundary is not None and boundary.startswith("=_spamtrap_")
    # Content-Type, three delimiters and the close delimiter: nowhere else.
    assert mail.count(boundary.encode()) == 5
    assert len(raw_bodies(mail)) == 3


def test_wire_form_makes_every_line_end_crlf() -> None:
    assert arf.wire_form(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd\r\n"
    assert arf.wire_form(b"") == b"\r\n"
    assert arf.body_encoding(b"abc\r\n") == "7bit"
    assert arf.body_encoding("\u00e9\r\n".encode()) == "8bit"
    assert arf.body_encoding(b"x" * 998 + b"\r\n") == "7bit"
    assert arf.body_encoding(b"x" * 999 + b"\r\n") == "binary"
    assert arf.body_encoding(b"\0\r\n") == "binary"


header_text = st.text(st.characters(codec="utf-8"), max_size=80)
raw_bytes = st.binary(max_size=3000)


@settings(max_examples=150, deadline=None)
@given(
    subject=header_text,
    sender=header_text,
    body=raw_bytes,
    head=st.lists(st.binary(max_size=300), max_size=5),
    peer=st.sampled_from(["203.0.113.7 1", "2001:db8::1 2", "junk", "", "::ffff:1.2.3.4 0"]),
    mail_from=st.sampled_from(["", "a@b.example", "x y@z", "\u00e9@b.example", "a@b"]),
    eight_bit=st.booleans(),
    include_rcpts=st.booleans(),
    max_original=st.sampled_from([64, 1 << 20]),
)
def test_any_message_makes_a_well_formed_report(
    subject: str,
    sender: str,
    body: bytes,
    head: list[bytes],
    peer: str,
    mail_from: str,
    eight_bit: bool,
    include_rcpts: bool,
    max_original: int,
) -> None:
    data = b"Subject: " + subject.encode() + b"\r\nFrom: " + sender.encode() + b"\r\n"
    data += b"".join(head) + b"\r\n" + body
    env = envelope(data, mail_from=mail_from, peer=[peer] if peer else [])
    report = dataclasses.replace(REPORT, include_rcpts=include_rcpts, max_original=max_original)
    mail = report_of(env, report, eight_bit)
    check_wire(mail, eight_bit)
    msg = check_structure(mail, RECEIVED_AT)
    third = msg.get_payload()[2]
    if third.get_content_type() == "message/rfc822":
        assert part_body(raw_bodies(mail)[2]) == arf.wire_form(stored(env))
    assert ("Original-Rcpt-To" in dict(feedback(mail))) == include_rcpts
