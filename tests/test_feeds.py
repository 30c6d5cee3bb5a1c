"""Stage "feeds": stripping forwarding fields and extracting attached messages."""

from __future__ import annotations

import base64
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from spamtrap.config import Config, FeedConfig
from spamtrap.filters import Replace, run_stages
from spamtrap.filters.feeds import (
    DEFAULT_STRIP,
    FeedStage,
    attached_messages,
    make,
    strip_fields,
)
from spamtrap.message import Envelope

FEEDS = [
    FeedConfig(id="alias", address="alias@feed.example", strip_received=2),
    FeedConfig(id="attach", address="attach@feed.example", extract_attached=True),
    FeedConfig(id="exact", address="exact@feed.example", extract_attached=True, strip_headers=[]),
    FeedConfig(
        id="spamhdr",
        address="spamhdr@feed.example",
        strip_headers=[re.compile(r"X-Spam-.*", re.IGNORECASE)],
    ),
]
STAGE = FeedStage(FEEDS)


def envelope(data: bytes, feed: str | None = "alias") -> Envelope:
    meta = {"id": ["w1"], "rcpt": ["<alias@feed.example>"], "peer": ["192.0.2.7 4567"]}
    if feed:
        meta["feed"] = [feed]
    return Envelope("w1", 1000.0, "donor@donor.example", ["alias@feed.example"], data, feed, meta)


# What an /etc/aliases forward from a Postfix donor looks like: their two
# relays on top, their delivery fields, then the path the spam really took.
ALIAS_FORWARD = (
    b"Received: by relay2.donor.example (Postfix) id 4F1; Tue, 3 Mar 2026 10:00:02 +0000\r\n"
    b"Received: from mx.donor.example (mx.donor.example [198.51.100.2])\r\n"
    b"\tby relay2.donor.example (Postfix) with ESMTP id 4F1\r\n"
    b"\tfor <alias@feed.example>; Tue, 3 Mar 2026 10:00:01 +0000\r\n"
    b"Delivered-To: trap7@donor.example\r\n"
    b"X-Original-To: trap7@donor.example\r\n"
    b"Received: from bot.example (unknown [203.0.113.9])\r\n"
    b"\tby mx.donor.example (Postfix) with SMTP id 9A2\r\n"
    b"\tfor <trap7@donor.example>; Tue, 3 Mar 2026 10:00:00 +0000\r\n"
    b"X-Forwarded-For: trap7@donor.example alias@feed.example\r\n"
    b"delivered-to: second@donor.example\r\n"
    b"From: Winner <prize@bot.example>\r\n"
    b"To: trap7@donor.example\r\n"
    b"X-Spam-Status: No, score=-1.0\r\n"
    b"Subject: You won\r\n"
    b"\r\n"
    b"Delivered-To: this line is in the body and stays\r\n"
    b"Received: so does this one\r\n"
)


def test_strips_forwarding_fields_and_donor_received_lines() -> None:
    env = envelope(ALIAS_FORWARD)
    assert STAGE(env) is None
    assert env.data == (
        b"Received: from bot.example (unknown [203.0.113.9])\r\n"
        b"\tby mx.donor.example (Postfix) with SMTP id 9A2\r\n"
        b"\tfor <trap7@donor.example>; Tue, 3 Mar 2026 10:00:00 +0000\r\n"
        b"From: Winner <prize@bot.example>\r\n"
        b"To: trap7@donor.example\r\n"
        b"X-Spam-Status: No, score=-1.0\r\n"
        b"Subject: You won\r\n"
        b"\r\n"
        b"Delivered-To: this line is in the body and stays\r\n"
        b"Received: so does this one\r\n"
    )
    assert env.meta["x_stripped"] == [
        "Received=2, Delivered-To=2, X-Original-To=1, X-Forwarded-For=1"
    ]


def test_bare_lf_messages_stay_bare_lf() -> None:
    data = ALIAS_FORWARD.replace(b"\r\n", b"\n")
    env = envelope(data)
    STAGE(env)
    assert b"\r" not in env.data
    assert env.data.startswith(b"Received: from bot.example (unknown [203.0.113.9])\n\tby mx")
    assert b"Delivered-To: trap7" not in env.data
    assert env.data.endswith(
        b"\n\nDelivered-To: this line is in the body and stays\nReceived: so does this one\n"
    )


def test_per_feed_patterns_replace_the_defaults() -> None:
    env = envelope(ALIAS_FORWARD, feed="spamhdr")
    STAGE(env)
    assert b"X-Spam-Status" not in env.data
    assert b"Delivered-To: trap7" in env.data  # not in this feed's list
    assert env.meta["x_stripped"] == ["X-Spam-Status=1"]


def test_nothing_to_strip_leaves_the_envelope_alone() -> None:
    data = b"From: a@b.example\r\nSubject: hi\r\n\r\nbody\r\n"
    env = envelope(data)
    assert STAGE(env) is None
    assert env.data is data
    assert "x_stripped" not in env.meta


def test_messages_without_a_feed_pass_untouched() -> None:
    env = envelope(ALIAS_FORWARD, feed=None)
    assert STAGE(env) is None
    assert env.data == ALIAS_FORWARD
    assert "x_stripped" not in env.meta


def test_a_feed_no_longer_configured_still_gets_the_default_strip() -> None:
    env = envelope(ALIAS_FORWARD, feed="gone")
    assert STAGE(env) is None
    assert b"Delivered-To: trap7" not in env.data
    assert env.data.count(b"Received: ") == 4  # strip_received is per feed


def test_strip_fields_keeps_the_rest_byte_exact() -> None:
    data = b"A: 1\r\nResent-From: x\r\n  folded\r\nB: 2\r\n\r\nResent-From: body\r\n"
    patterns = [re.compile(p, re.IGNORECASE) for p in DEFAULT_STRIP]
    out, removed = strip_fields(data, patterns)
    assert out == b"A: 1\r\nB: 2\r\n\r\nResent-From: body\r\n"
    assert removed == {"Resent-From": 1}
    # Patterns match the whole name, not a part of it.
    out, removed = strip_fields(b"Not-Delivered-To: x\r\n\r\n", patterns)
    assert removed == {}


def test_make_is_off_without_feeds() -> None:
    assert make(Config(), None) is None
    cfg = Config(feeds=FEEDS)
    assert isinstance(make(cfg, None), FeedStage)


# -- rfc822 extraction ---------------------------------------------------------

SPAM_1 = (
    b"Return-Path: <prize@bot.example>\r\n"
    b"Delivered-To: trap7@donor.example\r\n"
    b"Received: from bot.example (unknown [203.0.113.9])\r\n"
    b"\tby mx.donor.example (Postfix) with SMTP id 9A2; Tue, 3 Mar 2026 10:00:00 +0000\r\n"
    b"From: Winner <prize@bot.example>\r\n"
    b"To: trap7@donor.example\r\n"
    b"Subject: You won\r\n"
    b"Message-ID: <1@bot.example>\r\n"
    b"\r\n"
    b"Claim your prize now.\r\n"
)
SPAM_2 = (
    b"Received: from [198.51.100.77] by mx.donor.example; Tue, 3 Mar 2026 09:00:00 +0000\r\n"
    b"From: pharmacy@pills.example\r\n"
    b"Subject: cheap\r\n"
    b'Content-Type: multipart/alternative; boundary="inner"\r\n'
    b"\r\n"
    b"--inner\r\nContent-Type: text/plain\r\n\r\npills\r\n"
    b"--inner\r\nContent-Type: text/html\r\n\r\n<b>pills</b>\r\n"
    b"--inner--\r\n"
)


def thunderbird_forward(*attached: bytes, boundary: bytes = b"XoIAb3NMW3vdQNe0Oy1C3zcA") -> bytes:
    """Thunderbird's "Forward As > Attachment" (no transfer encoding)."""
    out = [
        b"Received: from [192.168.1.20] by smtp.donor.example; Tue, 3 Mar 2026 11:00:00 +0000\r\n"
        b"Message-ID: <a1b2@donor.example>\r\n"
        b"Date: Tue, 3 Mar 2026 11:00:00 +0000\r\n"
        b"MIME-Version: 1.0\r\n"
        b"User-Agent: Mozilla Thunderbird\r\n"
        b"From: Donor <donor@donor.example>\r\n"
        b"To: attach@feed.example\r\n"
        b"Subject: Fwd: spam\r\n"
        b"Content-Type: multipart/mixed;\r\n"
        b' boundary="------------BOUNDARY"\r\n'
        b"\r\n"
        b"This is a multi-part message in MIME format.\r\n"
        b"--------------BOUNDARY\r\n"
        b"Content-Type: text/plain; charset=UTF-8; format=flowed\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n"
        b"\r\n"
        b"more spam for the trap\r\n"
        b"\r\n"
    ]
    for i, msg in enumerate(attached):
        out.append(
            b"--------------BOUNDARY\r\n"
            b"Content-Type: message/rfc822; charset=UTF-8;\r\n"
            b' name="spam%d.eml"\r\n'
            b"Content-Disposition: attachment;\r\n"
            b' filename="spam%d.eml"\r\n'
            b"\r\n" % (i, i) + msg + b"\r\n"
        )
    out.append(b"--------------BOUNDARY--\r\n")
    return b"".join(out).replace(b"BOUNDARY", boundary)


def outlook_forward(msg: bytes) -> bytes:
    """Outlook.com-style: the attached message base64-encoded."""
    return (
        b"From: Donor <donor@donor.example>\r\n"
        b"To: attach@feed.example\r\n"
        b"Subject: FW: spam\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="_004_DB9PR_"\r\n'
        b"\r\n"
        b"--_004_DB9PR_\r\n"
        b'Content-Type: text/plain; charset="us-ascii"\r\n'
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"\r\n"
        b"see attached=20\r\n"
        b"\r\n"
        b"--_004_DB9PR_\r\n"
        b'Content-Type: message/rfc822; name="You won.eml"\r\n'
        b'Content-Disposition: attachment; filename="You won.eml"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n" + base64.encodebytes(msg).replace(b"\n", b"\r\n") + b"\r\n--_004_DB9PR_--\r\n"
    )


def delivery_fields_removed(msg: bytes) -> bytes:
    """SPAM_1 as it should come out: the donor's mailbox fields gone."""
    return msg.replace(b"Return-Path: <prize@bot.example>\r\n", b"").replace(
        b"Delivered-To: trap7@donor.example\r\n", b""
    )


def test_thunderbird_attachments_are_extracted_byte_exact() -> None:
    wrapper = envelope(thunderbird_forward(SPAM_1, SPAM_2), feed="exact")
    result = STAGE(wrapper)
    assert isinstance(result, Replace)
    assert result.reason == "rfc822:2"
    first, second = result.messages
    # The CRLF before the next delimiter belongs to the delimiter: the
    # message itself ends with the CRLF of its own last line.
    assert first.data == SPAM_1
    assert second.data == SPAM_2
    assert [m.msg_id for m in result.messages] == ["w1-1", "w1-2"]
    for m in result.messages:
        assert m.meta["id"] == [m.msg_id]
        assert m.meta["x_extracted_from"] == ["w1"]
        assert m.feed == "exact"
        assert m.meta["feed"] == ["exact"]
        assert m.meta["peer"] == ["192.0.2.7 4567"]
        assert (m.mail_from, m.rcpts, m.received_at) == (
            "donor@donor.example",
            ["alias@feed.example"],
            1000.0,
        )
    # Copies, not shared lists: a later stage tagging one touches no other.
    first.meta["peer"].append("x")
    first.rcpts.append("y")
    assert wrapper.meta["peer"] == ["192.0.2.7 4567"] and second.rcpts == ["alias@feed.example"]


def test_extracted_messages_lose_the_donors_delivery_fields() -> None:
    result = STAGE(envelope(thunderbird_forward(SPAM_1), feed="attach"))
    assert isinstance(result, Replace)
    (msg,) = result.messages
    assert msg.data == delivery_fields_removed(SPAM_1)
    assert msg.meta["x_stripped"] == ["Return-Path=1, Delivered-To=1"]


def test_base64_attached_message_is_decoded() -> None:
    result = STAGE(envelope(outlook_forward(SPAM_2), feed="exact"))
    assert isinstance(result, Replace)
    assert [m.data for m in result.messages] == [SPAM_2]


def test_missing_final_line_end_is_added_in_the_message_style() -> None:
    crlf = b"Subject: no line end\r\n\r\nlast line"
    lf = b"Subject: no line end\n\nlast line"
    assert attached_messages(thunderbird_forward(crlf)) == [crlf + b"\r\n"]
    assert attached_messages(b"Content-Type: message/rfc822\n\n" + lf) == [lf + b"\n"]


def test_nested_attached_messages_up_to_three_levels() -> None:
    level3 = b"Subject: level 3\r\n\r\nspam\r\n"
    level4 = b"Subject: level 4\r\n\r\ndeepest\r\n"
    level3_holding_4 = b"Subject: level 3\r\nContent-Type: message/rfc822\r\n\r\n" + level4
    level2 = thunderbird_forward(level3_holding_4, boundary=b"two")
    level1 = thunderbird_forward(level2, level3, boundary=b"one")
    found = attached_messages(thunderbird_forward(level1))
    # Each attached message is kept whole, and the ones inside it are
    # extracted as well, up to the third level: level 4 stays inside level 3.
    assert found == [level1, level2, level3_holding_4, level3]
    assert level4 not in found


def test_a_wrapper_without_attached_messages_stays_and_is_stripped() -> None:
    data = b"Delivered-To: x@donor.example\r\nSubject: plain forward\r\n\r\nspam\r\n"
    env = envelope(data, feed="attach")
    assert STAGE(env) is None
    assert env.data == b"Subject: plain forward\r\n\r\nspam\r\n"


def test_empty_attached_parts_are_not_messages() -> None:
    env = envelope(thunderbird_forward(b"", b"\r\n"), feed="attach")
    assert STAGE(env) is None


def test_extracted_messages_go_through_the_later_stages() -> None:
    seen: list[str] = []

    def later(env: Envelope) -> None:
        seen.append(env.msg_id)

    outcome = run_stages(
        [("feeds", STAGE), ("later", later)],
        envelope(thunderbird_forward(SPAM_1, SPAM_2), feed="attach"),
    )
    assert outcome.keep
    assert seen == ["w1-1", "w1-2"]
    assert [m.msg_id for m, _ in outcome.survivors] == ["w1-1", "w1-2"]


# -- property: generated wrappers give back every attached message ---------------

# Some of them are the donor's delivery fields that the default list strips.
field_names = st.sampled_from(
    [b"Subject", b"From", b"X-Mailer", b"Received", b"To", b"Delivered-To", b"x-original-to"]
)
DELIVERY_FIELDS = (b"Delivered-To", b"x-original-to")
field_values = st.binary(max_size=30).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"-", b"")
)
line_texts = st.binary(max_size=40).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"-", b"")
)


@st.composite
def spam_messages(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A message, and the same without the donor's delivery fields."""
    nl = draw(st.sampled_from([b"\r\n", b"\n"]))
    fields = draw(st.lists(st.tuples(field_names, field_values), min_size=1, max_size=6))
    body = nl + nl.join(draw(st.lists(line_texts, max_size=6))) + nl
    head = b"".join(name + b": " + value + nl for name, value in fields)
    kept = b"".join(
        name + b": " + value + nl for name, value in fields if name not in DELIVERY_FIELDS
    )
    return head + body, kept + body


@given(
    st.lists(spam_messages(), min_size=1, max_size=5),
    st.lists(line_texts, max_size=3),
    st.booleans(),
    st.sampled_from(["exact", "attach"]),
)
@settings(max_examples=150)
def test_every_generated_attached_message_comes_back_exact(
    messages: list[tuple[bytes, bytes]], notes: list[bytes], encode: bool, feed: str
) -> None:
    boundary = b"=_wrap_="
    parts = [b"Content-Type: text/plain\r\n\r\n" + b"\r\n".join(notes)]
    for msg, _ in messages:
        if encode:
            head = b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            parts.append(head + base64.encodebytes(msg))
        else:
            parts.append(b"Content-Type: message/rfc822\r\n\r\n" + msg)
    data = (
        b'Subject: Fwd\r\nContent-Type: multipart/mixed; boundary="'
        + boundary
        + b'"\r\n\r\n'
        + b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
        + b"--"
        + boundary
        + b"--\r\n"
    )
    result = STAGE(envelope(data, feed=feed))
    assert isinstance(result, Replace)
    # Feed "exact" strips nothing; "attach" the default list: every other
    # byte stays, in either case.
    expected = [whole if feed == "exact" else stripped for whole, stripped in messages]
    assert [m.data for m in result.messages] == expected
    assert [m.msg_id for m in result.messages] == [f"w1-{i}" for i in range(1, len(messages) + 1)]
