"""The native bounce/backscatter detector: rules, quality bar, robustness."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spamtrap import testing
from spamtrap.config import default_config
from spamtrap.filters import Discard
from spamtrap.filters.bounce import BounceStage, classify, make
from spamtrap.message import Envelope
from tests.support.corpus import envelope_sender, load_message, require_bounces


def msg(headers: str, body: str = "Hello.\r\n") -> bytes:
    return (headers.strip("\n").replace("\n", "\r\n") + "\r\n\r\n" + body).encode("utf-8")


def env(data: bytes, mail_from: str = "sender@example.org") -> Envelope:
    return Envelope("m1", 0.0, mail_from, ["trap@trap.example"], data)


PLAIN_SPAM = msg(
    "From: Deals <deals@shop.example>\nTo: trap@trap.example\nSubject: Cheap watches",
    "Buy now, delivery in 2 days! Your order will be delivered to your door.\r\n",
)


# -- the stage -----------------------------------------------------------------


def test_make_follows_the_config() -> None:
    cfg = default_config()
    assert isinstance(make(cfg, None), BounceStage)
    cfg = testing.config(cfg, filters__bounce__enabled=False)
    assert make(cfg, None) is None


def test_stage_discards_with_the_reason() -> None:
    stage = BounceStage()
    dsn = msg(
        "From: MAILER-DAEMON@mx.example\nSubject: x\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"',
        "--b\r\nContent-Type: text/plain\r\n\r\nfailed\r\n--b--\r\n",
    )
    assert stage(env(dsn, "")) == Discard("dsn")
    assert stage(env(PLAIN_SPAM)) is None


# -- rules, one family at a time ---------------------------------------------------


@pytest.mark.parametrize(
    ("report_type", "reason"),
    [
        ("delivery-status", "dsn"),
        ("feedback-report", "arf"),
        ("disposition-notification", "mdn"),
        ("something-else", "bounce:report"),
    ],
)
def test_multipart_report(report_type: str, reason: str) -> None:
    data = msg(
        "From: a@b.example\nSubject: hi\nContent-Type: multipart/report;\n"
        f' report-type="{report_type}"; boundary=x',
        "--x\r\nContent-Type: text/plain\r\n\r\nreport\r\n--x--\r\n",
    )
    assert classify(data, "a@b.example") == reason


@pytest.mark.parametrize(
    ("part_type", "reason"),
    [
        ("message/delivery-status", "dsn"),
        ("message/global-delivery-status", "dsn"),
        ("message/feedback-report", "arf"),
        ("message/disposition-notification", "mdn"),
    ],
)
def test_report_part_inside_multipart_mixed(part_type: str, reason: str) -> None:
    # OpenSMTPD and others send DSNs as multipart/mixed.
    data = msg(
        "From: someone@example.net\nSubject: Nyaan\nContent-Type: multipart/mixed; boundary=zz",
        "--zz\r\nContent-Type: text/plain\r\n\r\nHello.\r\n"
        f"--zz\r\nContent-Type: {part_type}\r\n\r\nReporting-MTA: x\r\n--zz--\r\n",
    )
    assert classify(data, "someone@example.net") == reason


def test_dsn_fields_in_plain_text() -> None:
    data = msg(
        "From: x@example.net\nSubject: status",
        "Hello\r\n\r\nReporting-MTA: dns; mx.example.net\r\nFinal-Recipient: rfc822; a@b\r\n",
    )
    assert classify(data, "x@example.net") == "dsn"


@pytest.mark.parametrize(
    "subject",
    [
        "Undelivered Mail Returned to Sender",
        "Mail delivery failed: returning message to sender",
        "Delivery Status Notification (Failure)",
        "Returned mail: see transcript for details",
        "failure notice",
        "Undeliverable: hello",
        "Warning: could not send message for past 4 hours",
        "Unzustellbar: Hallo",
        "Non remis : Bonjour",
        "Недоставленное сообщение",
        "=?UTF-8?B?44Oh44OD44K744O844K444KS6YWN5L+h44Gn44GN44G+44Gb44KT44CC?=",
    ],
)
def test_bounce_subjects(subject: str) -> None:
    data = msg(f"From: someone@example.net\nSubject: {subject}")
    assert classify(data, "someone@example.net") == "bounce:subject"


def test_bare_undeliverable_subject_is_not_enough() -> None:
    # spam-2 00825: spam with the subject "Undeliverable   JPTJ".
    data = msg("From: x@example.com\nSubject: Undeliverable                  JPTJ")
    assert classify(data, "x@example.com") is None


@pytest.mark.parametrize(
    "headers",
    [
        "Auto-Submitted: auto-replied",
        "Auto-Submitted: auto-generated",
        "X-Autoreply: yes",
        "X-Autorespond: Hello",
        "Precedence: auto_reply",
    ],
)
def test_rfc3834_and_autoreply_headers(headers: str) -> None:
    data = msg(f"From: kijitora@example.net\nSubject: Nyaan\n{headers}")
    assert classify(data, "kijitora@example.net") == "autoreply"


def test_auto_submitted_no_is_not_an_autoreply() -> None:
    data = msg("From: kijitora@example.net\nSubject: Nyaan\nAuto-Submitted: no")
    assert classify(data, "kijitora@example.net") is None


@pytest.mark.parametrize(
    "subject",
    [
        "Out of Office: your mail",
        "Automatic reply: Hello",
        "Auto-Reply: Hello",
        "Hello (auto-reply)",
        "Abwesenheitsnotiz: Hallo",
        "Réponse automatique : Bonjour",
        "=?iso-8859-1?q?R=E9ponse_automatique_d'absence_du_bureau?=",
        "Risposta automatica: Ciao",
        "Respuesta automática: Hola",
        "Automatisch antwoord: Hallo",
        "Autosvar: Hej",
        "自動応答: こんにちは",
    ],
)
def test_out_of_office_subjects(subject: str) -> None:
    data = msg(f"From: someone@example.net\nSubject: {subject}")
    assert classify(data, "someone@example.net") == "autoreply"


@pytest.mark.parametrize(
    "headers",
    [
        "Message-Id: <1034.56.abcd@host.example.org-tmda-confirm>",
        "X-Spamarrest-noauth: 1",
        "X-Boxtrapper: abc",
        "From: Boxbe <notification@boxbe.com>",
    ],
)
def test_challenge_response_headers(headers: str) -> None:
    data = msg(f"Subject: Re: hello\n{headers}")
    assert classify(data, "x@example.org") == "challenge"


def test_challenge_response_body() -> None:
    data = msg(
        "From: kijitora@example.org\nSubject: Re: hello",
        "Your message attached below is being held because the address has not been\r\n"
        "verified. To release your message for delivery, please reply.\r\n",
    )
    assert classify(data, "kijitora@example.org") == "challenge"


@pytest.mark.parametrize(
    ("subject", "body"),
    [
        ("Virus Alert", "hello"),
        ("Warning: E-mail viruses detected", "hello"),
        ("Notice", "A VIRUS (W32/Netsky) was found in a message you sent to trap@x.\r\n"),
        ("Notice", "The message you sent to trap@x contained a virus and was deleted.\r\n"),
        ("Hello", "The infected attachment has been removed.\r\n"),
    ],
)
def test_virus_notices(subject: str, body: str) -> None:
    data = msg(f"From: Antivirus <av@example.org>\nSubject: {subject}", body)
    assert classify(data, "av@example.org") == "virus-notice"


@pytest.mark.parametrize(
    ("sender", "reason"),
    [
        ("Mail Delivery Subsystem <MAILER-DAEMON@mx.example.org>", "bounce:from-daemon"),
        ("MAILER-DAEMON <>", "bounce:from-daemon"),
        ("postmaster@example.org", "bounce:from-daemon"),  # SpamAssassin's form
    ],
)
def test_daemon_senders(sender: str, reason: str) -> None:
    data = msg(f"From: {sender}\nSubject: Nyaan")
    assert classify(data, "x@example.org") == reason


def test_failed_recipients_header() -> None:
    data = msg("From: x@example.org\nSubject: Nyaan\nX-Failed-Recipients: a@b.example")
    assert classify(data, "x@example.org") == "bounce:header"


def test_amazon_ses_notification() -> None:
    data = msg(
        "From: SES <no-reply@sns.amazonaws.com>\nSubject: AWS Notification Message",
        '{"Type" : "Notification", "Message" : "{\\"notificationType\\":\\"Bounce\\"}"}\r\n',
    )
    assert classify(data, "0101@us-west-2.amazonses.com") == "bounce:body"


NULL_SENDER_SPAM = msg(
    'From: "" <>\nReply-To: "" <>\nSubject: READ---SHIPPING INSTRUCTIONS',
    "to remove your address print remove in subject line\r\n",
)


def test_null_sender_alone_is_not_enough() -> None:
    # spam-2 00030 and 00114 look like this; SpamAssassin flags them.
    assert classify(NULL_SENDER_SPAM, "") is None
    assert classify(PLAIN_SPAM, "") is None


def test_null_sender_with_a_returned_message_is_a_bounce() -> None:
    data = msg(
        "From: someone@example.net\nSubject: Nyaan\nContent-Type: multipart/mixed; boundary=q",
        "--q\r\nContent-Type: text/plain\r\n\r\nSorry.\r\n"
        "--q\r\nContent-Type: message/rfc822\r\n\r\nFrom: trap@trap.example\r\n"
        "Subject: hi\r\n\r\nhi\r\n--q--\r\n",
    )
    assert classify(data, "") == "bounce:null-sender"
    assert classify(data, "someone@example.net") is None


def test_null_sender_with_weak_phrases_is_a_bounce() -> None:
    data = msg(
        "From: someone@example.net\nSubject: Mail",
        "Your mail sent on Thu could not be delivered.\r\n550 5.1.1 User unknown\r\n",
    )
    assert classify(data, "") == "bounce:null-sender"
    # Return-Path: <> written by the final MTA is the same evidence.
    assert classify(b"Return-Path: <>\r\n" + data, None) == "bounce:null-sender"
    assert classify(data, "someone@example.net") is None


def test_postmaster_with_weak_phrases_is_a_bounce() -> None:
    data = msg(
        'From: "Postmaster" <postmaster@example.net>\nSubject: Mail',
        "Your message could not be delivered: mailbox full.\r\n",
    )
    assert classify(data, "x@example.net") == "bounce:daemon-sender"
    # spam-2 01379: spam from a "postmaster" address, with nothing bounce-like.
    spam = msg('From: "Paul Thomas" <postmaster@topsitez.us>\nSubject: Hi', "Visit us!\r\n")
    assert classify(spam, "postmaster@topsitez.us") is None


def test_base64_text_is_decoded_when_the_sender_looks_like_a_mail_system() -> None:
    text = base64.b64encode(b"This is the mail system at host mx.example.net.\r\n").decode()
    data = msg(
        "From: someone@example.net\nSubject: x\nContent-Type: multipart/mixed; boundary=q",
        f"--q\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n{text}\r\n"
        "--q--\r\n",
    )
    assert classify(data, "") == "bounce:body"


def test_single_part_quoted_printable_body_is_decoded() -> None:
    data = msg(
        "From: x@example.net\nSubject: x\nContent-Transfer-Encoding: quoted-printable",
        "This is the mail sys=\r\ntem at host mx.example.net.\r\n",
    )
    assert classify(data, "x@example.net") == "bounce:body"


def test_phrases_beyond_the_scan_limit_are_not_seen() -> None:
    # Bounded work: only the first SCAN_BYTES of text are scanned.
    data = msg(
        "From: x@example.net\nSubject: x",
        "padding line\r\n" * 2000 + "This is the mail system at host mx.\r\n",
    )
    assert classify(data, "x@example.net") is None


# -- quality bar ---------------------------------------------------------------


def test_real_bounces_are_discarded() -> None:
    files = require_bounces()
    assert len(files) >= 300
    misses = []
    for path in files:
        data = load_message(path)
        if classify(data, envelope_sender(data)) is None:
            misses.append(path.name)
    caught = len(files) - len(misses)
    print(f"\nbounces: {caught}/{len(files)} discarded ({100 * caught / len(files):.1f}%)")
    assert caught >= 0.99 * len(files), f"{len(misses)} bounces kept: {misses}"


# -- robustness ----------------------------------------------------------------

HEADER_NAMES = [
    "From",
    "Subject",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Return-Path",
    "Auto-Submitted",
    "Precedence",
    "X-Failed-Recipients",
    "Message-Id",
    "X-Mailer",
]
CONTENT_TYPES = [
    "multipart/mixed; boundary=b",
    "multipart/report; report-type=delivery-status; boundary=b",
    "multipart/alternative; boundary=",
    "multipart/mixed",
    "message/rfc822",
    "message/delivery-status",
    "text/plain; charset=bogus",
    "text/html",
    'multipart/x; boundary="b',
]


@st.composite
def mime_messages(draw: st.DrawFn) -> bytes:
    """Messages built from MIME-ish pieces, often broken on purpose."""
    pieces = st.one_of(
        st.sampled_from(
            [
                b"--b\r\n",
                b"--b--\r\n",
                b"\r\n",
                b"\r\n\r\n",
                b"\0",
                b"=?utf-8?b?###?=",
                b"Content-Type: multipart/mixed; boundary=b\r\n",
                b"Content-Type: message/rfc822\r\n",
                b"Content-Transfer-Encoding: base64\r\n",
                b"Content-Transfer-Encoding: quoted-printable\r\n",
                b"=\r\n",
                b"=ZZ",
                b"@@@@",
                b"This is the mail system at host ",
                b"Final-Recipient: rfc822;",
                b"\xff\xfe",
                b"Subject: =?x?q?=E9?=\r\n",
                b"Received: from x\r\n",
            ]
        ),
        st.binary(max_size=40),
    )
    headers = draw(
        st.lists(
            st.tuples(
                st.sampled_from(HEADER_NAMES),
                st.one_of(st.sampled_from(CONTENT_TYPES), st.text(max_size=40)),
            ),
            max_size=8,
        )
    )
    head = b"".join(
        n.encode() + b": " + v.encode("utf-8", "surrogatepass") + b"\r\n" for n, v in headers
    )
    body = b"".join(draw(st.lists(pieces, max_size=60)))
    return head + b"\r\n" + body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000), st.one_of(st.none(), st.just(""), st.text(max_size=20)))
def test_arbitrary_bytes_never_raise(data: bytes, mail_from: str | None) -> None:
    result = classify(data, mail_from)
    assert result is None or isinstance(result, str)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mime_messages(), st.sampled_from(["", "x@example.org", None]))
def test_malformed_mime_never_raises(data: bytes, mail_from: str | None) -> None:
    result = classify(data, mail_from)
    assert result is None or isinstance(result, str)


def test_many_tiny_parts_and_deep_nesting_are_bounded() -> None:
    tiny = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(10000))
    many = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + tiny + b"--b--\r\n"
    assert classify(many, "") is None
    deep = b""
    for i in range(200):
        deep = b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) + deep
    assert classify(deep, "") is None
