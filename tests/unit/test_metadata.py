"""Unforgeable metadata: whatever a sender puts in HELO, MAIL FROM, RCPT TO or
its own header fields stays data inside our header block, never structure.

The property tests drive the real SMTP protocol (StringTransport) up to the
mbox entry a bundle holds, and parse it the way consumers do: Python's
``email`` with ``compat32`` and with ``policy.default``.
"""

from __future__ import annotations

import email
import email.policy
import io
import json
import re
import time
from email.message import Message
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from spamtrap import testing
from spamtrap.bundle import mbox
from spamtrap.config import Condition, Config, ConfigError, SetConfig, load_config
from spamtrap.filters.lists import RuleFileError, load_rule_file
from spamtrap.message import (
    MAX_HEADER_BYTES,
    MAX_SPOOFED,
    META_FIELDS,
    Envelope,
    escape_value,
    spoofed_of,
    unescape_value,
)
from spamtrap.work.collate import Collator
from tests.support.smtp_helpers import Harness

# The machine is shared: slow generation under load is not a failure.
SLOW_OK = [HealthCheck.too_slow]

OURS = {v.lower() for v in META_FIELDS.values()}


def catch_all_config() -> Config:
    cfg = testing.config(
        node="testnode",
        smtp__hostname="trap.test",
        traps__catch_all=True,
        sets=[SetConfig(name="all")],
    )
    return cfg


def session(helo: bytes, mail: bytes, rcpts: list[bytes], body: bytes) -> Envelope | None:
    """One SMTP session with these raw command arguments; the stored envelope."""
    h = Harness(catch_all_config())
    h.send(b"EHLO " + helo + b"\r\n")
    h.send(b"MAIL FROM:" + mail + b"\r\n")
    for r in rcpts:
        h.send(b"RCPT TO:" + r + b"\r\n")
    h.send(b"DATA\r\n")
    h.send(body + b".\r\n")
    return h.submitted[0] if h.submitted else None


def stored_message(env: Envelope, mode: str) -> bytes:
    """The message as a bundle holds it: mbox entry written, then read back."""
    entry = mbox.entry(env.mail_from, env.received_at, env.stored_bytes(mode))
    [(_, message)] = list(mbox.MboxReader(io.BytesIO(entry)))
    return message


def raw(value: str) -> bytes:
    # BytesParser decodes headers as ASCII with surrogateescape; an escape
    # of a C1 control or U+2028/U+2029 unescapes to the character, which
    # the sender sent UTF-8 encoded.
    return value.encode("utf-8", "surrogateescape")


def check_block(env: Envelope, message: bytes, policy: email.policy.Policy) -> Message:
    """Our fields, once each, with values that unescape to the raw ones, then
    exactly one trap-hop Received line."""
    msg = email.message_from_bytes(message, policy=policy)
    items = list(msg.raw_items())
    expected = [
        (header, value) for name, header in META_FIELDS.items() for value in env.values(name)
    ]
    ours = items[: len(expected)]
    assert [n for n, _ in ours] == [h for h, _ in expected]
    for (_, got), (_, want) in zip(ours, expected, strict=True):
        assert raw(unescape_value(got)) == want.encode("utf-8", "surrogateescape")
    # Nothing else anywhere in the message looks like one of our fields.
    names = [n.lower() for n, _ in items]
    for header in OURS:
        assert names.count(header) == sum(1 for h, _ in expected if h.lower() == header)
    assert len(msg.get_all("X-Spamtrap-Peer") or []) == 1
    # Then our Received line: the pieces between our folds unescape to the raw ones.
    name, value = items[len(expected)]
    assert name == "Received"
    assert names.count("received") == 1
    pieces = re.split(r"\r?\n\t", value.rstrip("\r\n"))
    assert [raw(unescape_value(p)) for p in pieces] == [
        p.encode("utf-8", "surrogateescape") for p in env.received_line.split("\r\n\t")
    ]
    assert "\r" not in "".join(v for _, v in ours)
    return msg


# -- the found strings ----------------------------------------------------------


FORGED_HELO = b"evil\rX-Spamtrap-Peer: 203.0.113.66 25"
FORGED_MAIL = b"<a\rX-Spamtrap-Id: forged@spam.example>"
FORGED_RCPTS = [
    b"<v\rX-Spamtrap-Feed: donor1@trap.example>",
    b"<w@trap.example>\rX-Spamtrap-Feed: donor1",
    b"<\x00nul\x7fdel\\back\x1b@trap.example>",
]


@pytest.mark.parametrize("mode", ["unix", "wire"])
@pytest.mark.parametrize("policy", [email.policy.compat32, email.policy.default])
def test_found_forgeries_stay_inside_our_fields(mode: str, policy: email.policy.Policy) -> None:
    env = session(FORGED_HELO, FORGED_MAIL, FORGED_RCPTS, b"Subject: hi\r\n\r\nbody\r\n")
    assert env is not None
    # The envelope keeps the raw values: they are evidence.
    assert env.meta["helo"] == ["evil\rX-Spamtrap-Peer: 203.0.113.66 25"]
    message = stored_message(env, mode)
    msg = check_block(env, message, policy)
    assert msg.get_all("X-Spamtrap-Peer") == ["192.0.2.7 40000"]
    assert len(msg.get_all("X-Spamtrap-Id")) == 1
    assert msg.get_all("X-Spamtrap-Feed") is None
    eol = b"\n" if mode == "unix" else b"\r\n"
    assert b"X-Spamtrap-Helo: evil\\rX-Spamtrap-Peer: 203.0.113.66 25" + eol in message
    assert b"X-Spamtrap-Mail-From: <a\\rX-Spamtrap-Id: forged@spam.example>" + eol in message
    assert b"X-Spamtrap-Rcpt: <v\\rX-Spamtrap-Feed: donor1@trap.example>" + eol in message
    assert b"X-Spamtrap-Rcpt: <\\0nul\\x7fdel\\\\back\\x1b@trap.example>" + eol in message
    assert b"Received: from evil\\rX-Spamtrap-Peer: 203.0.113.66 25 (unknown" in message
    assert b"(envelope-from <a\\rX-Spamtrap-Id: forged@spam.example>)" in message
    # No control byte of a sender's survives in our block.
    block = message[: message.index(b"Subject: hi")]
    assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", block.replace(b"\r\n", b"\n"))


def test_received_pieces_keep_a_fold_sent_inside_a_value() -> None:
    # A relay's HELO holding CR LF TAB (XFORWARD HELO=a+0D+0A+09...) is
    # escaped inside the first piece, not taken for one of our folds.
    env = session(b"a", b"<x@y>", [b"<v@trap.example>"], b"x\r\n")
    assert env is not None
    env.received[0] = env.received[0].replace("from a", "from a\r\n\tfor <x@y>; forged")
    block = env.header_block()
    assert b"Received: from a\\r\\n\\tfor <x@y>; forged (unknown" in block
    assert block.count(b"\r\n\t") == 3
    back = Envelope.from_record(env.to_record())
    assert back.received == env.received and back.header_block() == block


def test_a_spool_record_from_before_the_pieces_still_loads() -> None:
    env = session(b"bot.example", b"<x@y>", [b"<v@trap.example>"], b"x\r\n")
    assert env is not None
    head = json.loads(env.to_record().split(b"\n", 1)[1][: -len(env.data)])
    head["received"] = "\r\n\t".join(head["received"])  # the old form: one string
    raw_head = json.dumps(head).encode()
    old = b"%d\n" % len(raw_head) + raw_head + env.data
    back = Envelope.from_record(old)
    assert back.received == env.received and back.header_block() == env.header_block()


def test_the_spool_record_keeps_raw_values() -> None:
    env = session(FORGED_HELO, FORGED_MAIL, FORGED_RCPTS[:1], b"x\r\n")
    assert env is not None
    back = Envelope.from_record(env.to_record())
    assert back.meta == env.meta and back.received_line == env.received_line
    assert "\r" in back.meta["helo"][0] and "\r" in back.received_line.split("\r\n\t")[0]


# -- escaping -------------------------------------------------------------------


def test_escape_scheme() -> None:
    assert escape_value("plain value <a@b>") == "plain value <a@b>"
    assert escape_value("a\\b") == "a\\\\b"
    assert escape_value("\r\n\t\0") == "\\r\\n\\t\\0"
    assert escape_value("\x01\x1f\x7f") == "\\x01\\x1f\\x7f"
    assert escape_value(" lead") == "\\x20lead"
    assert escape_value("8bit \xe4 \udcff") == "8bit \xe4 \udcff"  # non-ASCII stays
    # C1 controls and the Unicode separators end a line for str.splitlines().
    assert escape_value("a\x85b\x9fc\u2028d\u2029e") == "a\\x85b\\x9fc\\u2028d\\u2029e"
    assert unescape_value("\\u2028\\x85") == "\u2028\x85"


@pytest.mark.parametrize("bad", ["\\", "a\\q", "\\x4", "\\x", "end\\"])
def test_unescape_refuses_escapes_that_are_not_ours(bad: str) -> None:
    with pytest.raises(ValueError, match="bad escape"):
        unescape_value(bad)


@settings(deadline=None, suppress_health_check=SLOW_OK)
@given(
    st.text(
        alphabet=st.characters(codec="utf-8")
        | st.sampled_from("\\\r\n\t\0\x7f \x80\x85\x9f\u2028\u2029\udc85")
    )
)
def test_escape_round_trips_and_is_one_safe_line(value: str) -> None:
    escaped = escape_value(value)
    assert unescape_value(escaped) == value
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", escaped)
    assert len(escaped.splitlines()) <= 1
    assert not escaped.startswith(" ")


def test_header_block_escapes_once() -> None:
    env = session(b"a\\b\rc", b"<x@y>", [b"<v@trap.example>"], b"x\r\n")
    assert env is not None
    once = env.header_block()
    assert b"X-Spamtrap-Helo: a\\\\b\\rc\r\n" in once
    assert env.header_block() == once  # rendering twice changes nothing
    assert env.meta["helo"] == ["a\\b\rc"]


@pytest.mark.parametrize(
    "value", [" lead", "a\\b", "x\u2028y", "\x85", "t\tab", "a: b", ":  b", "plain", ""]
)
def test_each_value_is_escaped_on_its_own(value: str) -> None:
    # header_block checks all values at once for anything to escape: a
    # value in the middle of the block, in a stage's field or in a
    # Received piece is escaped as escape_value() does, and only it.
    received = ["from x", value, "for <v@trap.example>; date"]
    meta = {"id": ["m1"], "helo": [value], "rcpt": ["<v@trap.example>"], "x_note": [value]}
    env = Envelope("m1", 0.0, "b@y", ["v@trap.example"], b"x\r\n", meta=meta, received=received)
    for eol in ("\r\n", "\n"):
        block = env.header_block(eol).decode("utf-8", "surrogateescape")
        esc = escape_value(value)
        assert f"{eol}X-Spamtrap-Helo: {esc}{eol}" in block
        assert f"{eol}X-Spamtrap-X-Note: {esc}{eol}" in block
        assert block.startswith(f"X-Spamtrap-Id: m1{eol}")
        assert f"{eol}Received: from x{eol}\t{esc}{eol}\tfor <v@trap.example>; date{eol}" in block


# -- property: arbitrary HELO, MAIL and RCPT bytes through the protocol ----------

# SMTP commands are split on LF: an argument never holds one.
ARG = st.binary(max_size=60).map(lambda b: b.replace(b"\n", b""))
CONTROLS = st.lists(
    st.sampled_from(
        [b"\r", b"\0", b"\x7f", b"\x1b", b"\\", b"X-Spamtrap-Peer: 1 2", b" "]
        + [b"\xc2\x85", b"\xc2\x9f", b"\xe2\x80\xa8", b"\xe2\x80\xa9"]  # NEL, C1, U+2028/9
    ),
    max_size=6,
).map(b"".join)
FUZZ = st.builds(lambda a, b: a + b, ARG, CONTROLS) | st.builds(lambda a, b: a + b, CONTROLS, ARG)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[*SLOW_OK, HealthCheck.filter_too_much]
)
@given(
    helo=FUZZ,
    mail=FUZZ,
    rcpts=st.lists(FUZZ, min_size=1, max_size=3),
    mode=st.sampled_from(["unix", "wire"]),
)
def test_any_command_bytes_give_one_of_each_field(
    helo: bytes, mail: bytes, rcpts: list[bytes], mode: str
) -> None:
    env = session(helo, mail, rcpts, b"Subject: fuzz\r\n\r\nbody\r\n")
    assume(env is not None)
    assert env is not None
    message = stored_message(env, mode)
    for policy in (email.policy.compat32, email.policy.default):
        check_block(env, message, policy)
    # Read as UTF-8 text, str.splitlines() finds only our own line ends.
    block = env.header_block()
    assert len(block.decode("utf-8", "surrogateescape").splitlines()) == block.count(b"\r\n")


# -- the message's own X-Spamtrap-* fields ----------------------------------------


SPOOFING = (
    b"X-Spamtrap-Feed: donor1\r\n"
    b"Subject: free money\r\n"
    b"x-spamtrap-ID : forged.id\r\n"
    b"Received: from nowhere\r\n"
    b"Reply-To: a@b\rX-SPAMTRAP-PEER: 203.0.113.66 25\r\n"
    b"\r\n"
    b"X-Spamtrap-Node: in the body, not a field\r\n"
)


def test_spoofed_lists_own_fields_in_order_and_keeps_the_bytes() -> None:
    env = session(b"bot.example", b"<b@spam.example>", [b"<v@trap.example>"], SPOOFING)
    assert env is not None
    assert env.spoofed == "X-Spamtrap-Feed, x-spamtrap-ID, X-SPAMTRAP-PEER"
    for mode in ("unix", "wire"):
        message = stored_message(env, mode)
        msg = email.message_from_bytes(message, policy=email.policy.compat32)
        items = list(msg.raw_items())
        n = sum(len(env.values(name)) for name in META_FIELDS)
        assert items[n - 1] == ("X-Spamtrap-Spoofed", env.spoofed)
        assert items[n][0] == "Received"
        # The sender's fields stay, below our Received line, byte for byte.
        assert message.endswith(SPOOFING if mode == "wire" else SPOOFING.replace(b"\r\n", b"\n"))


def test_spoofed_is_computed_on_the_bytes_as_stored() -> None:
    env = session(b"bot.example", b"<b@spam.example>", [b"<v@trap.example>"], SPOOFING)
    assert env is not None and env.spoofed is not None
    # A stage (feed stripping, rfc822 extraction) replaces the bytes.
    env.data = b"Subject: clean\r\n\r\nX-Spamtrap-Feed: body\r\n"
    assert env.spoofed is None and env.values("spoofed") == []
    assert b"X-Spamtrap-Spoofed" not in env.header_block()
    env.data = b"X-Spamtrap-X-Stripped: 1\r\n\r\n"
    assert env.values("spoofed") == ["X-Spamtrap-X-Stripped"]
    # meta cannot override what the bytes say
    env.meta["spoofed"] = ["nothing"]
    assert env.values("spoofed") == ["X-Spamtrap-X-Stripped"]


def test_spoofed_scan_is_bounded_and_capped() -> None:
    names = b"".join(b"X-Spamtrap-F%d: x\r\n" % i for i in range(MAX_SPOOFED + 5))
    listed = spoofed_of(names + b"\r\n").split(", ")
    assert len(listed) == MAX_SPOOFED + 1 and listed[-1] == "(+5 more)"
    far = b"Subject: x\r\n" + b"X-Filler: " + b"a" * MAX_HEADER_BYTES + b"\r\nX-Spamtrap-Id: 1\r\n"
    assert spoofed_of(far) is None
    assert spoofed_of(b"\r\nX-Spamtrap-Id: 1\r\n") is None  # no header section at all
    # A first line that continues our Received field: marked, its name not listed.
    assert spoofed_of(b" X-Spamtrap-Id: continuation\r\n") == "leading-wsp"


def test_spoofed_scan_is_linear_and_cheap_without_the_prefix() -> None:
    # Hostile headers without an empty line: cost at N and 4N lines grows
    # linearly (~4x; a quadratic scan would be ~16x).
    shapes = [b"X-Spamtrap-Ab: c\r\n", b"X-Spamtrap-Ab c\r\n", b"x-SpAmTrAp-", b"\r", b"a\n"]

    def cost(data: bytes) -> float:
        best = float("inf")
        for _ in range(3):  # the best of three: the machine is shared
            start = time.process_time()
            for _ in range(5):
                spoofed_of(data)
            best = min(best, time.process_time() - start)
        return best

    for unit in shapes:
        n = MAX_HEADER_BYTES // 4 // len(unit)
        small, large = cost(unit * n), cost(unit * 4 * n)
        assert large < 8 * small + 0.005, (unit, small, large)
    # The common case (no X-Spamtrap- name at all) is one copy and one search.
    plain = b"Subject: hello\r\n" * (MAX_HEADER_BYTES // 16)
    many = b"X-Spamtrap-Ab: c\r\n" * (MAX_HEADER_BYTES // 18)
    assert spoofed_of(plain) is None and cost(plain) < cost(many)


# A header line ending, an empty line, a header-ish line: the pieces Python's
# email parser cares about.
PIECE = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"\r",
        b"\r\r\n",
        b" ",
        b"\t",
        b":",
        b"X-Spamtrap-Feed",
        b"x-spamtrap-id",
        b"X-Spamtrap-",
        b"Subject",
        b"From ",
        b"a",
        b"\x00",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=SLOW_OK)
@given(data=st.lists(PIECE, max_size=30).map(b"".join), mode=st.sampled_from(["unix", "wire"]))
def test_every_field_a_reader_sees_is_ours_or_listed(data: bytes, mode: str) -> None:
    env = Envelope("m1", 0.0, "", ["v@trap.example"], data, meta={"id": ["m1"]})
    env.received = ["from x (unknown [192.0.2.1])", "by trap.test; date"]
    message = stored_message(env, mode)
    items = list(email.message_from_bytes(message, policy=email.policy.compat32).raw_items())
    past_block = items[2 + (env.spoofed is not None) :]  # Id, Line-Ends, Spoofed
    own = [n for n, _ in past_block if n.lower().startswith("x-spamtrap-")]
    listed = env.spoofed.split(", ") if env.spoofed else []
    # Every X-Spamtrap-* field Python sees past our block is listed, in order.
    it = iter(listed)
    assert all(any(name == n.strip() for n in it) for name in own), (own, listed)


# -- set rules read our metadata only ---------------------------------------------


def test_a_forged_feed_field_does_not_put_a_message_in_a_feed_set() -> None:
    sets = [
        SetConfig("donor1", match=[Condition(re.compile("^donor1$", re.I), meta="feed")]),
        SetConfig("spoofed", match=[Condition(re.compile("feed", re.I), meta="spoofed")]),
    ]
    collator = Collator(sets)
    env = session(b"bot.example", b"<b@spam.example>", [b"<v@trap.example>"], SPOOFING)
    assert env is not None and env.feed is None
    assert collator.sets_for(env) == ["spoofed"]
    env.meta["feed"] = ["donor1"]  # what the SMTP layer sets for mail to a feed address
    assert collator.sets_for(env) == ["donor1", "spoofed"]


@pytest.mark.parametrize(
    ("header", "hint"),
    [
        ("X-Spamtrap-Feed", "meta: feed"),
        ("x-spamtrap-mail-from", "meta: mail_from"),
        ("X-Spamtrap-X-Stripped", "meta: x_stripped"),
        ("X-Spamtrap-Whatever", "'meta:' and a metadata field name"),
    ],
)
def test_a_header_rule_on_our_names_is_refused_with_its_line(
    tmp_path: Path, header: str, hint: str
) -> None:
    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text(
        "traps: {catch_all: true}\n"
        "sets:\n"
        "  donor1:\n"
        "    match:\n"
        f"      - header: {header}\n"
        "        regex: donor1\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg))
    [issue] = e.value.errors
    assert issue.line == 5 and issue.path == "sets.donor1.match[0].header"
    assert "forge" in issue.message and hint in issue.message


def test_a_header_rule_on_other_names_still_loads(tmp_path: Path) -> None:
    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text(
        "traps: {catch_all: true}\n"
        "sets:\n  a: {exclude: [{header: X-Spamtrapped, regex: x}, {header: List-Id, regex: y}]}\n"
    )
    assert [c.header for c in load_config(str(cfg)).sets[0].exclude] == ["X-Spamtrapped", "List-Id"]


def test_lists_rules_refuse_our_names_too(tmp_path: Path) -> None:
    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text(
        "traps: {catch_all: true}\n"
        "filters:\n  lists:\n    rules:\n      - name: retired\n"
        "        header: X-Spamtrap-Rcpt\n        regex: old@\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg))
    assert [(i.line, "meta: rcpt" in i.message) for i in e.value.errors] == [(6, True)]
    rules = tmp_path / "rules.yaml"
    rules.write_text("- {name: retired, header: X-Spamtrap-Rcpt, regex: old@}\n")
    with pytest.raises(RuleFileError) as e2:
        load_rule_file(str(rules))
    assert "meta: rcpt" in str(e2.value)


def test_explain_shows_the_spoofed_fields() -> None:
    from spamtrap.cli import explain

    env = session(b"bot.example", b"<b@spam.example>", [b"<v@trap.example>"], SPOOFING)
    assert env is not None
    report = explain.explain_envelope([], Collator([SetConfig("all")]), env)
    assert report["meta"]["spoofed"] == ["X-Spamtrap-Feed, x-spamtrap-ID, X-SPAMTRAP-PEER"]
    text = explain.format_report({"file": "m.eml", **report})
    assert "  spoofed: X-Spamtrap-Feed, x-spamtrap-ID, X-SPAMTRAP-PEER" in text.splitlines()
    clean = session(b"bot.example", b"<b@spam.example>", [b"<v@trap.example>"], b"S: x\r\n\r\n")
    assert clean is not None
    assert (
        "spoofed" not in explain.explain_envelope([], Collator([SetConfig("all")]), clean)["meta"]
    )
