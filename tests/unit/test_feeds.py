"""Stage "feeds": stripping forwarding fields and extracting attached messages."""

from __future__ import annotations

import base64
import ipaddress
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spamtrap import mime
from spamtrap.config import Config, ConfigError, FeedConfig, parse_config
from spamtrap.filters import Replace, run_stages
from spamtrap.filters.feeds import (
    DEFAULT_STRIP,
    DonorHosts,
    FeedStage,
    attached_messages,
    make,
    parse_received,
    plan_strip,
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


# -- Received lines stripped by who added them ------------------------------------

DONOR = DonorHosts(["mx.donor.example", "relay2.donor.example"], networks=["198.51.100.0/24"])
NO_PATTERNS: list[re.Pattern[str]] = []

# The spammer's own (or forged) line, the one evidence a donor must not lose.
SPAMMER_LINE = (
    b"Received: from [10.9.8.7] (helo=pc) by smtp.bot.example with esmtpa\r\n"
    b"\tid 1qX; Tue, 3 Mar 2026 09:59:59 +0000\r\n"
)
TAIL = b"From: prize@bot.example\r\nSubject: You won\r\n\r\nbody\r\n"


def by_host_strip(data: bytes, donor: DonorHosts = DONOR) -> tuple[bytes, dict[str, int]]:
    return strip_fields(data, NO_PATTERNS, donor=donor)


@pytest.mark.parametrize(
    ("value", "by_host", "has_from", "ips"),
    [
        # Postfix local(8) forwarding an /etc/aliases entry: no from part.
        (
            b" by mx.donor.example (Postfix) id 4F1; Tue, 3 Mar 2026 10:00:02 +0000",
            "mx.donor.example",
            False,
            [],
        ),
        # Postfix pickup: "from userid" is a comment, not a from part.
        (
            b" by mx.donor.example (Postfix, from userid 1000)\r\n\tid 4F2; Tue, 3 Mar 2026",
            "mx.donor.example",
            False,
            [],
        ),
        # Postfix smtpd, HELO an address literal: both addresses are found.
        (
            (
                b" from [127.0.0.1] (unknown [203.0.113.9])\r\n"
                b"\tby MX.Donor.Example. (Postfix) with ESMTP id 9A2"
            ),
            "mx.donor.example",
            True,
            ["127.0.0.1", "203.0.113.9"],
        ),
        # Exim: address first, HELO in the comment.
        (
            (
                b" from [203.0.113.9] (helo=by)\n"
                b"\tby mx.donor.example with esmtp (Exim 4.96)\n"
                b"\t(envelope-from <a@b>) id 1q"
            ),
            "mx.donor.example",
            True,
            ["203.0.113.9"],
        ),
        (
            b" from bot.example ([IPv6:2001:db8::9] helo=bot) by mx.donor.example with esmtp",
            "mx.donor.example",
            True,
            ["2001:db8::9"],
        ),
        # Exim local submission.
        (
            b" from trap by mx.donor.example with local (Exim 4.96) id 1q",
            "mx.donor.example",
            True,
            [],
        ),
        # Sendmail submission and relay.
        (
            b" (from trap@localhost) by mx.donor.example (8.17.1/8.17.1/Submit) id 33A",
            "mx.donor.example",
            False,
            [],
        ),
        (
            (
                b" from bot.example (bot.example [203.0.113.9] (may be forged))\r\n"
                b"\tby mx.donor.example (8.17.1/8.17.1) with ESMTP id 33B"
            ),
            "mx.donor.example",
            True,
            ["203.0.113.9"],
        ),
        # A sender that calls itself "by": the word after "from" is its name.
        (
            b" from by (unknown [203.0.113.9]) by mx.donor.example (Postfix)",
            "mx.donor.example",
            True,
            ["203.0.113.9"],
        ),
        # qmail: no by part at all, or the address without brackets.
        (b" (qmail 1234 invoked by uid 89); 3 Mar 2026 10:00:00 -0000", None, False, []),
        (
            (
                b" from unknown (HELO bot) (203.0.113.9)\r\n"
                b"  by mx.donor.example with SMTP; 3 Mar 2026"
            ),
            "mx.donor.example",
            True,
            ["203.0.113.9"],
        ),
        # Exchange: the by host's own address in its comment is not the peer's.
        (
            (
                b" from EX1.donor.local (10.0.0.1) by EX2.donor.local (10.0.0.2)"
                b" with Microsoft SMTP Server"
            ),
            "ex2.donor.local",
            True,
            ["10.0.0.1"],
        ),
        # Junk.
        (b"", None, False, []),
        (b" by", None, False, []),
        (b" ((((((((((((((((((((((((( by mx.donor.example", None, False, []),
        (b" from x ; by mx.donor.example", None, True, []),
    ],
)
def test_parse_received(value: bytes, by_host: str | None, has_from: bool, ips: list[str]) -> None:
    parts = parse_received(value)
    assert parts.by_host == by_host
    assert parts.has_from == has_from
    assert list(parts.from_ips) == [ipaddress.ip_address(i) for i in ips]


def test_postfix_alias_forward_loses_only_its_own_line() -> None:
    # An /etc/aliases forward on the MX: Postfix's local(8) adds a line of
    # its own on top of the one recording the spammer's connection.
    data = (
        b"Received: by mx.donor.example (Postfix)\r\n\tid 4F1; Tue, 3 Mar 2026 10:00:02 +0000\r\n"
        b"Received: from bot.example (unknown [203.0.113.9])\r\n"
        b"\tby mx.donor.example (Postfix) with ESMTP id 9A2\r\n"
        b"\tfor <trap7@donor.example>; Tue, 3 Mar 2026 10:00:00 +0000\r\n" + SPAMMER_LINE + TAIL
    )
    out, removed = by_host_strip(data)
    assert out == data.replace(
        b"Received: by mx.donor.example (Postfix)\r\n\tid 4F1; Tue, 3 Mar 2026 10:00:02 +0000\r\n",
        b"",
    )
    assert removed == {"Received": 1}


def test_virtual_alias_and_exim_forwards_keep_the_entry_line() -> None:
    # virtual_alias_maps and Exim's redirect router add no line: the top
    # one records the spammer's connection, and it stays.
    for entry in (
        (
            b"Received: from bot.example (unknown [203.0.113.9])\r\n"
            b"\tby mx.donor.example (Postfix) with ESMTP id 9A2\r\n"
        ),
        (
            b"Received: from [203.0.113.9] (helo=bot.example)\r\n"
            b"\tby mx.donor.example with esmtp (Exim 4.96)\r\n"
            b"\tid 1q; Tue, 3 Mar 2026\r\n"
        ),
    ):
        data = entry + SPAMMER_LINE + TAIL
        assert by_host_strip(data) == (data, {})


def test_internal_relays_and_loopback_reinjection_go() -> None:
    data = (
        # an internal relay behind the MX, reached from the MX's network
        b"Received: from mx.donor.example (mx.donor.example [198.51.100.2])\r\n"
        b"\tby relay2.donor.example (Postfix) with ESMTP id 4F1\r\n"
        # a content filter re-injecting over loopback
        b"Received: from localhost (localhost [127.0.0.1])\r\n"
        b"\tby mx.donor.example (Postfix) with ESMTP id 4F0\r\n"
        b"Received: from bot.example (unknown [203.0.113.9])\r\n"
        b"\tby mx.donor.example (Postfix) with ESMTP id 9A2\r\n" + SPAMMER_LINE + TAIL
    )
    out, removed = by_host_strip(data)
    assert removed == {"Received": 2}
    assert out.startswith(b"Received: from bot.example (unknown [203.0.113.9])")
    assert SPAMMER_LINE in out


def test_the_walk_stops_at_the_first_foreign_line_even_if_donor_lines_follow() -> None:
    # Spam forging a line "by" the donor's MX below the entry: evidence, kept.
    forged = b"Received: by mx.donor.example (Postfix) id FORGED; Mon, 2 Mar 2026\r\n"
    data = (
        b"Received: by mx.donor.example (Postfix) id 4F1; Tue, 3 Mar 2026\r\n"
        + SPAMMER_LINE
        + forged
        + TAIL
    )
    out, removed = by_host_strip(data)
    assert removed == {"Received": 1}
    assert out == SPAMMER_LINE + forged + TAIL
    # The same behind an entry line: nothing below the entry is read.
    entry = b"Received: from x (unknown [203.0.113.9]) by mx.donor.example (Postfix) id 9\r\n"
    assert by_host_strip(entry + forged + TAIL) == (entry + forged + TAIL, {})


def test_a_spammer_cannot_pass_for_the_donors_network() -> None:
    # HELO [127.0.0.1] and HELO with the donor's own name: the address
    # the donor's MTA recorded is still outside, so this is the entry.
    for entry in (
        (
            b"Received: from [127.0.0.1] (unknown [203.0.113.9]) by mx.donor.example (Postfix) id"
            b" 9\r\n"
        ),
        (
            b"Received: from mx.donor.example (unknown [203.0.113.9]) by mx.donor.example (Postfix)"
            b" id 9\r\n"
        ),
        b"Received: from [203.0.113.9] (helo=[198.51.100.2]) by mx.donor.example with esmtp\r\n",
        b"Received: from x (unknown [::ffff:203.0.113.9]) by mx.donor.example (Postfix) id 9\r\n",
    ):
        assert by_host_strip(entry + TAIL) == (entry + TAIL, {})
    # ...while an IPv4-mapped loopback peer is a local hand-over.
    local = (
        b"Received: from x (localhost [::ffff:127.0.0.1]) by mx.donor.example (Postfix) id 9\r\n"
    )
    assert by_host_strip(local + SPAMMER_LINE + TAIL) == (SPAMMER_LINE + TAIL, {"Received": 1})


def test_host_regexps_folded_lines_and_bare_lf() -> None:
    donor = DonorHosts(patterns=[re.compile(r"[a-z0-9-]+\.int\.donor\.example", re.IGNORECASE)])
    data = (
        b"X-Top: 1\n"
        b"Received: by\n  Store7.INT.donor.example (Postfix,\n  from userid 0) id 1\n"
        b"Delivered-To: trap@donor.example\n"
        b"Received: from [127.0.0.1] (localhost [127.0.0.1])\n"
        b"\tby gw.int.donor.example with esmtp\n"
        b"Received: from bot (unknown [203.0.113.9]) by gw.int.donor.example with esmtp\n"
        b"Subject: s\n\nReceived: by store7.int.donor.example in the body\n"
    )
    out, removed = strip_fields(data, DEFAULT_PATTERNS_FOR_TEST, donor=donor)
    assert out == (
        b"X-Top: 1\n"
        b"Received: from bot (unknown [203.0.113.9]) by gw.int.donor.example with esmtp\n"
        b"Subject: s\n\nReceived: by store7.int.donor.example in the body\n"
    )
    assert removed == {"Received": 2, "Delivered-To": 1}
    # Regexps match the whole host: a longer name is not the donor's.
    evil = b"Received: by x.int.donor.example.bot.example (Postfix) id 1\n\n"
    assert strip_fields(evil, NO_PATTERNS, donor=donor) == (evil, {})


DEFAULT_PATTERNS_FOR_TEST = [re.compile(p, re.IGNORECASE) for p in DEFAULT_STRIP]


def test_plan_names_the_rule_of_each_removed_field() -> None:
    data = (
        b"Received: by mx.donor.example (Postfix) id 1\r\nDelivered-To: t@donor.example\r\n" + TAIL
    )
    plan = plan_strip(data, DEFAULT_PATTERNS_FOR_TEST, donor=DONOR)
    assert [(d.name, d.rule) for d in plan] == [
        ("Received", "strip_received_by"),
        ("Delivered-To", "strip_headers"),
        ("From", None),
        ("Subject", None),
    ]
    assert b"".join(data[d.start : d.end] for d in plan) == data[: data.index(b"\r\n\r\n") + 2]


def test_the_stage_strips_by_host_per_feed() -> None:
    feeds = [
        FeedConfig(
            id="pf",
            address="pf@feed.example",
            strip_received_by=["mx.donor.example"],
        ),
        FeedConfig(id="plain", address="plain@feed.example"),
    ]
    stage = FeedStage(feeds)
    data = b"Received: by mx.donor.example (Postfix) id 1\r\n" + SPAMMER_LINE + TAIL
    env = envelope(data, feed="pf")
    assert stage(env) is None
    assert env.data == SPAMMER_LINE + TAIL
    assert env.meta["x_stripped"] == ["Received=1"]
    env = envelope(data, feed="plain")
    stage(env)
    assert env.data == data


def test_attached_messages_keep_their_received_lines() -> None:
    feed = FeedConfig(
        id="att",
        address="att@feed.example",
        extract_attached=True,
        strip_received_by=["mx.donor.example"],
    )
    result = FeedStage([feed])(envelope(thunderbird_forward(SPAM_1), feed="att"))
    assert isinstance(result, Replace)
    assert b"by mx.donor.example" in result.messages[0].data


def test_walk_is_bounded() -> None:
    lines = b"Received: by mx.donor.example (Postfix) id 1\r\n" * 150
    out, removed = by_host_strip(lines + TAIL)
    assert removed == {"Received": 100}  # MAX_RECEIVED_WALK; the rest stays
    assert out == b"Received: by mx.donor.example (Postfix) id 1\r\n" * 50 + TAIL


# -- config ---------------------------------------------------------------------


def feed_config(extra: str) -> str:
    return "feeds:\n  - id: d\n    address: d@feed.example\n" + extra


def test_config_reads_the_by_host_keys() -> None:
    cfg = parse_config(
        feed_config(
            "    strip_received_by: [MX.Donor.Example., '[192.0.2.1]']\n"
            "    strip_received_by_regex: '.*\\.int\\.donor\\.example'\n"
            "    donor_networks: [198.51.100.0/24, '2001:db8::/32']\n"
        )
    )
    (feed,) = cfg.feeds
    assert feed.strip_received_by == ["mx.donor.example", "[192.0.2.1]"]
    assert [p.pattern for p in feed.strip_received_by_regex] == [r".*\.int\.donor\.example"]
    assert feed.donor_networks == ["198.51.100.0/24", "2001:db8::/32"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "    strip_received: 1\n    strip_received_by: [mx.donor.example]\n",
            "4: feeds[0].strip_received: give strip_received (a count, deprecated) or",
        ),
        ("    donor_networks: [10.0.0.0/8]\n", "4: feeds[0].donor_networks: donor_networks needs"),
        (
            "    strip_received_by: [user@donor.example]\n",
            "4: feeds[0].strip_received_by[0]: 'user@donor.example' is an address",
        ),
        (
            "    strip_received_by: ['[300.1.1.1]']\n",
            "4: feeds[0].strip_received_by[0]: not an address literal",
        ),
        (
            "    strip_received_by_regex: ['(']\n",
            "4: feeds[0].strip_received_by_regex[0]: bad regular expression",
        ),
        (
            "    strip_received_by: [a]\n    donor_networks: [10.0.0.0/33]\n",
            "5: feeds[0].donor_networks[0]: not a network",
        ),
    ],
)
def test_config_errors_have_line_numbers(extra: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(feed_config(extra))
    got = [i.format("f.yaml") for i in e.value.errors]
    assert any(g.startswith("f.yaml:" + expected) for g in got), got


# -- property: arbitrary header blocks ------------------------------------------

HOSTS = [
    "mx.donor.example",
    "MX.donor.example.",
    "relay2.donor.example",
    "bot.example",
    "by",
    "from",
]
WORDS = st.sampled_from(
    [
        b"from",
        b"by",
        b"with",
        b"id",
        b"for",
        b"via",
        b";",
        b"(",
        b")",
        b"\\",
        b"\\)",
        b"[127.0.0.1]",
        b"[203.0.113.9]",
        b"(unknown [198.51.100.7])",
        b"[::1]",
        b"helo=[10.1.1.1]",
        b"(Postfix, from userid 0)",
        b"esmtp",
        b"\xff\x00",
        b"::ffff:127.0.0.1",
    ]
    + [h.encode() for h in HOSTS]
)
SEPARATORS = st.sampled_from([b" ", b"\t", b"\r\n\t", b"\n ", b"  "])


@st.composite
def received_values(draw: st.DrawFn) -> bytes:
    """Received values: random words, or MTA-like from/by parts with junk."""
    if draw(st.booleans()):
        words = draw(st.lists(st.one_of(WORDS, field_values), max_size=14))
    else:
        words = []
        if draw(st.booleans()):
            words += [b"from", draw(WORDS)]
            words += draw(st.lists(st.sampled_from(PEER_COMMENTS), max_size=2))
        words += [b"by", draw(st.sampled_from(HOSTS)).encode()]
        words += draw(st.lists(st.one_of(WORDS, field_values), max_size=4))
    out = b""
    for w in words:
        out += draw(SEPARATORS) + w
    return out


PEER_COMMENTS = [
    b"(localhost [127.0.0.1])",
    b"(unknown [203.0.113.9])",
    b"([198.51.100.2] helo=mx)",
    b"(mx.donor.example [198.51.100.2])",
    b"([::1])",
    b"(Postfix, from userid 0)",
]


@st.composite
def header_blocks(draw: st.DrawFn) -> bytes:
    nl = draw(st.sampled_from([b"\r\n", b"\n"]))
    fields = []
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.integers(0, 3))
        if kind <= 1:
            name = draw(st.sampled_from([b"Received", b"received", b"RECEIVED"]))
            value = draw(received_values())
        elif kind == 2:
            name, value = (
                draw(st.sampled_from([b"Delivered-To", b"Subject", b"X-Junk"])),
                draw(field_values),
            )
        else:
            fields.append(draw(field_values).replace(b":", b"") + nl)  # a junk line
            continue
        fields.append(name + b":" + value.replace(b"\r\n", nl) + nl)
    body = draw(st.sampled_from([b"", nl + b"Received: by mx.donor.example body" + nl]))
    return b"".join(fields) + body


@given(header_blocks(), st.booleans())
@settings(max_examples=400)
def test_by_host_strip_removes_only_donor_lines_and_nothing_else(
    data: bytes, patterns: bool
) -> None:
    pats = DEFAULT_PATTERNS_FOR_TEST if patterns else NO_PATTERNS
    plan = plan_strip(data, pats, donor=DONOR)
    out, removed = strip_fields(data, pats, donor=DONOR)
    # The output is the input minus the removed fields, exactly.
    expected, pos = b"", 0
    for d in plan:
        if d.rule is not None:
            expected += data[pos : d.start]
            pos = d.end
    assert out == expected + data[pos:]
    assert sum(removed.values()) == sum(1 for d in plan if d.rule)
    received = [d for d in plan if d.name.lower() == "received"]
    by_host = [d for d in received if d.rule == "strip_received_by"]
    # Only a leading run of Received fields goes, and each one's by-host
    # is the donor's, from no address outside the donor's networks.
    assert by_host == received[: len(by_host)]
    for d in by_host:
        parts = parse_received(data[d.start : d.end].partition(b":")[2])
        assert parts.by_host in DONOR.names
        assert all(DONOR.is_inside(ip) for ip in parts.from_ips)
    # Nothing below the top header block is touched.
    _, end = mime.field_spans(data)
    assert out.endswith(data[end:])


@given(st.binary(max_size=600))
@settings(max_examples=300)
def test_parse_received_never_raises(value: bytes) -> None:
    parts = parse_received(value)
    assert parts.by_host is None or 0 < len(parts.by_host) <= len(value)
    data = b"Received:" + value + b"\r\n\r\nbody\r\n"
    out, removed = by_host_strip(data)
    assert out in (data, b"\r\nbody\r\n") or out.endswith(b"body\r\n")
    if removed:
        assert parts.by_host in DONOR.names


def test_a_huge_hostile_received_field_is_read_in_bounded_time() -> None:
    import time

    hostile = b"Received: from " + b"((( [1.1.1.1] \\" * 20000 + b" by mx.donor.example\r\n\r\n"
    many = b"Received: from x (\r\n\t" + b"( by [127.0.0.1] ) " * 20000 + b"\r\n\r\n"
    start = time.process_time()
    for data in (hostile, many):
        out, _ = by_host_strip(data)
        assert out == data  # the by part is past the scanned prefix: kept
    assert time.process_time() - start < 2.0
