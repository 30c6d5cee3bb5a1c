"""Unix line ends in bundles, and the exact wire bytes rebuilt from them:
the classification, both set modes and the config, in memory. The consumers
(mailbox, formail, mutt, SpamAssassin, gzip) read a real node's bundles in
tests/system/test_line_ends.py."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task

from spamtrap import testing
from spamtrap.bundle import mbox
from spamtrap.config import ConfigError, SetConfig, load_config
from spamtrap.message import Envelope, line_ends_of, split_block, wire_bytes
from spamtrap.metrics import Metrics
from spamtrap.work.collate import Collator
from spamtrap.work.pipeline import Pipeline

# The machine is shared: slow generation under load is not a failure.
SLOW_OK = [HealthCheck.too_slow]


RECEIVED = (
    "from bot.example (unknown [192.0.2.7])\r\n\tby trap.test (spamtrap) with ESMTP id m1\r\n"
    "\t(envelope-from <b@spam.example>)\r\n\tfor <v@trap.example>; Thu, 01 Jan 1970 00:00:00 GMT"
)


def envelope(data: bytes) -> Envelope:
    meta = {"id": ["m1"], "node": ["n1"], "rcpt": ["<v@trap.example>"]}
    pieces = RECEIVED.split("\r\n\t")
    rcpts = ["v@trap.example"]
    return Envelope("m1", 0.0, "b@spam.example", rcpts, data, meta=meta, received=pieces)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"Subject: a\r\n\r\nbody\r\n", "crlf"),
        (b"Subject: a\r\n\r\nbare\rcr\r\n", "crlf"),  # a CR alone is not a line end
        (b"Subject: a\n\nbody\n", "lf"),
        (b"Subject: a\n\nbody\r\n", "mixed"),
        (b"no line end", "none"),
        (b"", "none"),
    ],
)
def test_line_ends_are_classified(data: bytes, kind: str) -> None:
    assert line_ends_of(data) == kind
    assert envelope(data).values("line_ends") == [kind]


def test_unix_stores_a_crlf_message_with_lf_and_lf_metadata() -> None:
    data = b"Subject: a\r\nX-Long: folded\r\n\tvalue\r\n\r\nbody\r\nFrom me\r\n"
    env = envelope(data)
    stored = env.stored_bytes("unix")
    assert b"\r" not in stored
    block, message = split_block(stored)
    assert message == data.replace(b"\r\n", b"\n")
    assert b"X-Spamtrap-Line-Ends: crlf\n" in block
    assert b"\n\tby trap.test (spamtrap)" in block and block.endswith(b"GMT\n")
    assert wire_bytes(stored) == data
    # mboxrd quoting still applies, after the conversion
    entry = mbox.entry(env.mail_from, env.received_at, stored)
    assert b"\n>From me\n" in entry and b"\r" not in entry
    [(_, back)] = list(mbox.MboxReader(io.BytesIO(entry)))
    assert wire_bytes(back) == data


def test_wire_keeps_todays_bytes() -> None:
    env = envelope(b"Subject: a\r\n\r\nbody\r\n")
    stored = env.stored_bytes("wire")
    assert stored == env.full_bytes() == env.header_block() + env.data
    block, message = split_block(stored)
    assert message == env.data and block.count(b"\n") == block.count(b"\r\n")
    assert b"X-Spamtrap-Line-Ends: crlf\r\n" in block
    assert wire_bytes(stored) == env.data  # a CRLF block: nothing to convert


@pytest.mark.parametrize(
    "data",
    [b"Subject: a\n\nbare lf\n", b"Subject: a\n\nline\r\nmixed\n", b"no line end", b""],
)
def test_other_messages_are_stored_as_sent_in_both_modes(data: bytes) -> None:
    env = envelope(data)
    for mode, eol in (("unix", b"\n"), ("wire", b"\r\n")):
        stored = env.stored_bytes(mode)
        block, message = split_block(stored)
        assert message == data
        assert block.startswith(b"X-Spamtrap-Id: m1" + eol)
        assert block.count(b"\n") == len(block.split(eol)) - 1  # every block line ends in eol
        assert wire_bytes(stored) == data


def test_a_message_stored_before_line_ends_existed_rebuilds_as_is() -> None:
    old = b"X-Spamtrap-Id: m1\r\nReceived: from x\r\n\tby y; date\r\nSubject: a\r\n\r\nb\r\n"
    assert wire_bytes(old) == b"Subject: a\r\n\r\nb\r\n"


@pytest.mark.parametrize(
    "stored",
    [b"Subject: not ours\r\n\r\n", b"X-Spamtrap-Id: m1\nSubject: x\n\n", b"X-Spamtrap-Id: m1"],
)
def test_wire_bytes_refuses_what_spamtrap_did_not_store(stored: bytes) -> None:
    with pytest.raises(ValueError, match="Received|line end"):
        wire_bytes(stored)


def test_the_message_own_fields_below_our_received_stay_message() -> None:
    data = b"X-Spamtrap-Line-Ends: lf\r\nReceived: from forged\r\n\r\nbody\r\n"
    stored = envelope(data).stored_bytes("unix")
    assert split_block(stored)[1] == data.replace(b"\r\n", b"\n")
    assert wire_bytes(stored) == data


# Line-end-heavy bytes: CR, LF, CRLF, CRCRLF, "From " lines, 8-bit junk;
# and pieces that look like our Received's continuations, possibly first
# (a message starting with a TAB or space continues our field for readers).
WIRE = st.lists(
    st.sampled_from(
        [
            b"\r\n",
            b"\n",
            b"\r",
            b"\r\r\n",
            b"From x",
            b">From ",
            b"a",
            b"\x00",
            b"\xff",
            b"\t",
            b" ",
            b"\tfor <x@y>; date",
            b"\tfrom forged (x [6.6.6.6])",
        ]
    )
    | st.binary(max_size=8),
    max_size=40,
).map(b"".join)


@pytest.mark.parametrize("mode", ["unix", "wire"])
@pytest.mark.parametrize("lead", [b"\t", b" ", b"\tfor <v@trap.example>; x"])
def test_a_message_starting_with_whitespace_keeps_its_first_line(mode: str, lead: bytes) -> None:
    data = lead + b"from forged (x [6.6.6.6])\r\nSubject: a\r\n\r\nbody\r\n"
    env = envelope(data)
    stored = env.stored_bytes(mode)
    converted = data.replace(b"\r\n", b"\n") if mode == "unix" else data
    assert split_block(stored)[1] == converted
    assert wire_bytes(stored) == data
    # Readers take the first line for part of our Received: Spoofed says so.
    assert env.values("spoofed") == ["leading-wsp"]
    assert b"X-Spamtrap-Spoofed: leading-wsp" in stored


@settings(max_examples=300, deadline=None, suppress_health_check=SLOW_OK)
@given(data=WIRE, mode=st.sampled_from(["unix", "wire"]))
def test_the_wire_bytes_are_always_rebuilt(data: bytes, mode: str) -> None:
    env = envelope(data)
    stored = env.stored_bytes(mode)
    assert wire_bytes(stored) == data
    converted = mode == "unix" and env.line_ends == "crlf"
    assert split_block(stored)[1] == (data.replace(b"\r\n", b"\n") if converted else data)
    # through an mbox entry, as a bundle holds it (SMTP data ends with a line end)
    data += b"\r\n"
    env = envelope(data)
    entry = mbox.entry(env.mail_from, env.received_at, env.stored_bytes(mode))
    [(_, back)] = list(mbox.MboxReader(io.BytesIO(entry)))
    assert wire_bytes(back) == data


def test_line_endings_config(tmp_path: Path) -> None:
    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text(
        "traps: {catch_all: true}\nsets:\n  a: {}\n  b: {line_endings: wire}\n  c:\n"
        "    line_endings: dos\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg))
    [issue] = e.value.errors
    assert (issue.line, issue.path) == (6, "sets.c.line_endings")
    assert "unknown value 'dos'" in issue.message and "unix, wire" in issue.message
    cfg.write_text("traps: {catch_all: true}\nsets:\n  a: {}\n  b: {line_endings: wire}\n")
    assert [s.line_endings for s in load_config(str(cfg)).sets] == ["unix", "wire"]
    assert SetConfig("x").line_endings == "unix"


class _Entry:
    key = (0, 1)


def test_decide_renders_each_distinct_copy_once() -> None:
    cfg = testing.config(
        node="n1",
        traps__domains=["trap.example"],
        sets=[
            SetConfig("u1"),
            SetConfig("u2"),
            SetConfig("w", line_endings="wire"),
            SetConfig("r", redact_trap_addresses=True),
            SetConfig("rw", redact_trap_addresses=True, line_endings="wire"),
        ],
    )
    p = Pipeline(None, [], Collator(cfg.sets), {}, Metrics(), task.Clock(), None, 0, cfg)
    data = b"To: v@trap.example\r\nSubject: a\r\n\r\nhello v@trap.example\r\n"
    adds: dict[str, list[Any]] = {}
    p._decide(_Entry(), envelope(data).to_record(), adds)
    entries = {name: items[0][0] for name, items in adds.items()}
    assert entries["u1"] is entries["u2"]  # converted once, shared
    assert len({id(e) for e in entries.values()}) == 4
    messages = {n: next(iter(mbox.MboxReader(io.BytesIO(e))))[1] for n, e in entries.items()}
    assert b"\r" not in messages["u1"] and b"\r" not in messages["r"]
    assert wire_bytes(messages["u1"]) == wire_bytes(messages["w"]) == data
    redacted = wire_bytes(messages["r"])
    assert redacted == wire_bytes(messages["rw"]) and len(redacted) == len(data)
    assert b"v@trap.example" not in redacted
