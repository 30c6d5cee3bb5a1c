"""The attach and resend formats of ``type: forward``, parsed back with
Python's email package; every byte of the message survives."""

from __future__ import annotations

import email
import email.policy
from email.message import Message

from hypothesis import given, settings
from hypothesis import strategies as st

from spamtrap.message import Envelope
from spamtrap.outputs import arf
from spamtrap.outputs.base import OutputItem
from spamtrap.outputs.forward import attach_mail, resend_mail
from spamtrap.smtp_client import dot_stuffed

NOW = 1_800_000_000.0
TEXT = b"From: bot@spam.example\r\nSubject: cheap pills\r\n\r\nbuy\r\n.now\r\n"
REPORT = arf.Report(
    sender="trap@trap.test",
    to=("abuse@partner.test", "spam@other.test"),
    subject_prefix="spamtrap",
    user_agent="spamtrap/0.1.0",
    reporting_mta="trap.test",
    output="partners",
    include_rcpts=False,
    max_original=1 << 20,
)


def item(data: bytes = TEXT, set_name: str = "shared") -> OutputItem:
    meta = {"id": ["18c0.abc.node1"], "peer": ["203.0.113.7 4000"], "rcpt": ["<v@trap.example>"]}
    received = ["from bot ([203.0.113.7])", "by trap.test (spamtrap) with ESMTP id x"]
    received.append("for <v@trap.example>; Fri, 15 Jan 2027 08:00:00 +0000")
    env = Envelope(
        "18c0.abc.node1",
        NOW - 60,
        "bot@spam.example",
        ["v@trap.example"],
        data,
        meta=meta,
        received=received,
    )
    return OutputItem(env, set_name)


def parse(mail: bytes) -> Message:
    return email.message_from_bytes(mail, policy=email.policy.compat32)


def attached(mail: bytes) -> tuple[bytes, bytes]:
    """The attachment's own fields and its body, exactly as sent."""
    boundary = parse(mail).get_boundary()
    assert boundary is not None
    # The header, the note, the attachment and the close delimiter's tail.
    pieces = mail.split(b"\r\n--" + boundary.encode())
    assert len(pieces) == 4 and pieces[3] == b"--\r\n"
    fields, body = pieces[2].removeprefix(b"\r\n").split(b"\r\n\r\n", 1)
    return fields, body


def check_wire(mail: bytes, eight_bit: bool = True) -> None:
    assert b"\n" not in mail.replace(b"\r\n", b"") and b"\r" not in mail.replace(b"\r\n", b"")
    assert max(map(len, mail.split(b"\r\n"))) <= arf.MAX_LINE
    assert eight_bit or mail.isascii()


def test_attach_is_a_new_mail_with_the_message_as_rfc822() -> None:
    it = item()
    mail = attach_mail(it, REPORT, NOW, eight_bit=True)
    check_wire(mail)
    msg = parse(mail)
    assert not msg.defects
    assert msg["From"] == "trap@trap.test"
    assert msg["To"].replace("\r\n", "").split(", ") == list(REPORT.to)
    assert msg["Subject"] == "spamtrap shared: cheap pills"
    assert msg["Message-ID"] == "<18c0.abc.node1.attach.partners@trap.test>"
    assert msg["X-Spamtrap-Id"] == "18c0.abc.node1"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert msg.get_content_type() == "multipart/mixed"
    text, rfc822 = msg.get_payload()
    assert text.get_content_type() == "text/plain"
    assert "18c0.abc.node1" in text.get_payload() and "shared" in text.get_payload()
    assert rfc822.get_content_type() == "message/rfc822"
    inner = rfc822.get_payload()[0]
    assert inner["X-Spamtrap-Id"] == "18c0.abc.node1"  # our metadata block on top
    assert inner["Subject"] == "cheap pills"
    fields, body = attached(mail)
    assert b"Content-Transfer-Encoding: 7bit" in fields
    assert body == it.message()  # the stored message, byte for byte


def test_attach_carries_8bit_as_8bit_or_in_base64_when_the_relay_cannot() -> None:
    it = item("Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode())
    eight = attach_mail(it, REPORT, NOW, eight_bit=True)
    check_wire(eight)
    fields, body = attached(eight)
    assert b"Content-Type: message/rfc822" in fields and b"8bit" in fields
    assert body == it.message()
    seven = attach_mail(it, REPORT, NOW, eight_bit=False)
    check_wire(seven, eight_bit=False)
    part = parse(seven).get_payload()[1]
    assert part.get_content_type() == "application/octet-stream"
    assert part.get_filename() == "18c0.abc.node1.eml"
    assert part.get_payload(decode=True) == it.message()
    subject = email.message_from_bytes(seven, policy=email.policy.default)["Subject"]
    assert subject == "spamtrap shared: caf\u00e9"


def test_attach_sends_what_rfc822_cannot_hold_in_base64() -> None:
    for data in (b"Subject: x\r\n\r\nnul\0byte\r\n", b"Subject: x\r\n\r\n" + b"y" * 2000):
        it = item(data)
        mail = attach_mail(it, REPORT, NOW, eight_bit=True)
        check_wire(mail)
        part = parse(mail).get_payload()[1]
        assert part.get_content_type() == "application/octet-stream"
        assert part.get_payload(decode=True) == it.message()


def test_resend_prepends_a_resent_block_to_the_message_as_stored() -> None:
    it = item(b"From: bot@spam.example\nSubject: lf only\n\nbody\n")
    mail = resend_mail(it, REPORT, NOW)
    check_wire(mail)
    head = mail.split(b"\r\n", 5)
    assert [line.split(b":")[0] for line in head[:5]] == [
        b"Resent-From",
        b"Resent-To",
        b" spam@other.test",  # Resent-To folded, one address a line
        b"Resent-Date",
        b"Resent-Message-ID",
    ]
    msg = parse(mail)
    assert msg["Resent-From"] == "trap@trap.test"
    assert msg["Resent-To"].replace("\r\n", "").split(", ") == list(REPORT.to)
    assert email.utils.parsedate_to_datetime(msg["Resent-Date"]).timestamp() == NOW
    assert msg["Resent-Message-ID"] == "<18c0.abc.node1.resend.partners@trap.test>"
    assert msg["X-Spamtrap-Id"] == "18c0.abc.node1"
    assert msg["Subject"] == "lf only"
    # After the block: the message as stored, its line ends CRLF as SMTP needs.
    assert mail.split(b"Resent-Message-ID: <18c0.abc.node1.resend.partners@trap.test>\r\n")[1] == (
        arf.wire_form(it.message())
    )


def test_a_retry_is_the_same_mail_but_for_its_date() -> None:
    for build in (
        lambda now: attach_mail(item(), REPORT, now, True),
        lambda now: resend_mail(item(), REPORT, now),
    ):
        first, later = build(NOW), build(NOW + 3600)
        assert first != later
        dates = (b"Date:", b"Resent-Date:")
        assert [ln for ln in first.split(b"\r\n") if not ln.startswith(dates)] == [
            ln for ln in later.split(b"\r\n") if not ln.startswith(dates)
        ]


def test_dot_stuffing_doubles_every_leading_dot() -> None:
    assert dot_stuffed(b".a\r\n..b\r\nc.\r\n.\r\n") == b"..a\r\n...b\r\nc.\r\n..\r\n"
    assert dot_stuffed(b"x\r\n") == b"x\r\n"


@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(max_size=4000),
    subject=st.text(max_size=60),
    eight_bit=st.booleans(),
)
def test_any_message_attaches_and_resends_intact(
    data: bytes, subject: str, eight_bit: bool
) -> None:
    it = item(b"Subject: " + subject.encode("utf-8", "surrogatepass") + b"\r\n" + data)
    mail = attach_mail(it, REPORT, NOW, eight_bit)
    check_wire(mail, eight_bit)
    msg = parse(mail)
    assert not msg.defects
    part = msg.get_payload()[1]
    if part.get_content_type() == "message/rfc822":
        assert attached(mail)[1] == arf.wire_form(it.message())
    else:
        assert part.get_payload(decode=True) == it.message()
    resent = resend_mail(it, REPORT, NOW)
    assert resent.endswith(arf.wire_form(it.message()))
    assert parse(resent)["Resent-From"] == "trap@trap.test"
