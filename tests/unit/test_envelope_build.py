"""The envelope builder as a pure function: no protocol, no transport, no clock."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spamtrap.intake import relay
from spamtrap.intake.envelope import SessionFacts, Transaction, build_envelope
from spamtrap.message import META_FIELDS, split_block

T0 = 1_700_000_000.0

FACTS = SessionFacts(
    node="n1",
    host="trap.example",
    session_id="s1",
    peer=("192.0.2.7", 40000),
    local=("198.51.100.1", 25),
    proxied_by=None,
    rdns=None,
    helo=b"bot.example",
    esmtp=True,
    started_tls=False,
    tls=None,
    dialect="ehlo",
    connected_at=T0,
    first_command_at=T0 + 0.5,
    data_started_at=T0 + 2.0,
)


def txn(mail_from: bytes = b"bot@spam.example", *rcpts: bytes) -> Transaction:
    t = Transaction(mail_from, ())
    for r in rcpts or (b"a@trap.example",):
        t.rcpts.append((r, ()))
    return t


def test_direct_message_fields_and_received_line() -> None:
    t = txn(b"bot@spam.example", b"a@trap.example", b"b@Other.example")
    t.feed = "f1"
    content = b"Subject: x\r\n\r\nbody\r\n"
    env = build_envelope(FACTS, t, content, "m1", T0 + 3.0)
    m = env.meta
    assert m["id"] == ["m1"] and m["node"] == ["n1"] and m["session"] == ["s1"]
    assert m["peer"] == ["192.0.2.7 40000"] and m["local"] == ["198.51.100.1 25"]
    assert m["helo"] == ["bot.example"] and "relay" not in m and "proxy" not in m
    assert m["rcpt"] == ["<a@trap.example>", "<b@Other.example>"]
    assert m["domain"] == ["trap.example", "other.example"]
    assert m["feed"] == ["f1"] and m["size"] == [str(len(content))]
    assert env.received_at == T0 + 3.0 and env.rcpts == ["a@trap.example", "b@Other.example"]
    assert env.received[0] == "from bot.example (unknown [192.0.2.7])"
    assert env.received[1] == "by trap.example (spamtrap) with ESMTP id m1"
    assert env.received[3].startswith("for <a@trap.example>; ")


def test_same_facts_same_envelope() -> None:
    # Pure: nothing but the arguments decides the result.
    a = build_envelope(FACTS, txn(), b"x\r\n", "m1", T0 + 1)
    b = build_envelope(FACTS, txn(), b"x\r\n", "m1", T0 + 1)
    assert a.meta == b.meta and a.received == b.received


def test_tls_helo_and_proxy_shape_the_record() -> None:
    facts = dataclasses.replace(
        FACTS, esmtp=False, started_tls=True, tls="TLSv1.3 X", proxied_by=("10.0.0.1", 5)
    )
    env = build_envelope(facts, txn(), b"x", "m1", T0 + 1)
    assert env.meta["tls"] == ["TLSv1.3 X"] and env.meta["proxy"] == ["10.0.0.1 5"]
    assert " with SMTPS id " in env.received[1]


def test_xclient_client_replaces_peer_and_local_and_names_the_relay() -> None:
    client = relay.Client(addr="203.0.113.9", port=1234, name="bot.example", helo="bot-helo")
    client.proto, client.destaddr, client.destport = "ESMTP", "198.51.100.77", 25
    facts = dataclasses.replace(
        FACTS, client=client, via="xclient", relay_helo=b"mx.example", helo=b"relay-again"
    )
    m = build_envelope(facts, txn(), b"x", "m1", T0 + 1).meta
    assert m["peer"] == ["203.0.113.9 1234"] and m["local"] == ["198.51.100.77 25"]
    assert m["relay"] == ["192.0.2.7 40000 mx.example xclient"]
    assert m["rdns"] == ["bot.example"] and m["helo"] == ["bot-helo"]


def test_xforward_names_the_relay_by_its_session_helo_and_keeps_local() -> None:
    client = relay.Client(addr="203.0.113.9", port=0, destaddr="198.51.100.77")
    facts = dataclasses.replace(FACTS, client=client, via="xforward", relay_helo=b"ignored")
    m = build_envelope(facts, txn(), b"x", "m1", T0 + 1).meta
    assert m["relay"] == ["192.0.2.7 40000 bot.example xforward"]
    assert m["local"] == ["198.51.100.1 25"] and "helo" not in m


def test_unknown_client_behind_a_relay_keeps_the_peer() -> None:
    facts = dataclasses.replace(FACTS, via="unknown", helo=None)
    m = build_envelope(facts, txn(), b"x", "m1", T0 + 1).meta
    assert m["peer"] == ["192.0.2.7 40000"] and m["relay"] == ["192.0.2.7 40000 - unknown"]


def test_a_transaction_without_recipients_is_refused_loudly() -> None:
    with pytest.raises(ValueError, match="session s1: message m1 has no recipient"):
        build_envelope(FACTS, Transaction(b"x@y", ()), b"x", "m1", T0)


wire = st.binary(max_size=40)
text = st.text(max_size=30)
clients = st.builds(
    relay.Client,
    addr=st.one_of(st.none(), st.sampled_from(["203.0.113.9", "2001:db8::1", ""])),
    port=st.integers(0, 65535),
    name=st.one_of(st.none(), text),
    helo=st.one_of(st.none(), text),
    proto=st.one_of(st.none(), st.sampled_from(["SMTP", "ESMTP", "x\r\ny"])),
    destaddr=st.one_of(st.none(), text),
    destport=st.integers(0, 65535),
)
facts_st = st.builds(
    SessionFacts,
    node=st.just("n1"),
    host=st.just("trap.example"),
    session_id=st.just("s1"),
    peer=st.tuples(text, st.integers(0, 65535)),
    local=st.tuples(text, st.integers(0, 65535)),
    proxied_by=st.one_of(st.none(), st.tuples(text, st.integers(0, 65535))),
    rdns=st.one_of(st.none(), text),
    helo=st.one_of(st.none(), wire),
    esmtp=st.booleans(),
    started_tls=st.booleans(),
    tls=st.one_of(st.none(), text),
    dialect=text,
    connected_at=st.floats(0, 2e9),
    first_command_at=st.one_of(st.none(), st.floats(0, 2e9)),
    data_started_at=st.floats(0, 2e9),
    client=st.one_of(st.none(), clients),
    via=st.sampled_from(["", "xforward", "xclient", "derived", "unknown"]),
    relay_helo=st.one_of(st.none(), wire),
)
transactions = st.builds(
    lambda mail_from, params, rcpts, feed: _txn_of(mail_from, params, rcpts, feed),
    wire,
    st.lists(wire, max_size=3).map(tuple),
    st.lists(st.tuples(wire, st.lists(wire, max_size=2).map(tuple)), min_size=1, max_size=5),
    st.one_of(st.none(), st.just("f1")),
)


def _txn_of(mail_from: bytes, params: Any, rcpts: Any, feed: str | None) -> Transaction:
    t = Transaction(mail_from, params)
    t.rcpts.extend(rcpts)
    t.feed = feed
    return t


@settings(max_examples=300, deadline=None)
@given(facts=facts_st, t=transactions, content=st.binary(max_size=200), now=st.floats(0, 2e9))
def test_builder_never_raises_and_writes_each_field_once(
    facts: SessionFacts, t: Transaction, content: bytes, now: float
) -> None:
    env = build_envelope(facts, t, content, "m1", now)
    for name, values in env.meta.items():
        assert name in META_FIELDS, name
        if name == "rcpt":
            assert len(values) == len(t.rcpts)
        elif name == "domain":
            assert len(values) == len(set(values)) >= 1
        else:
            assert len(values) == 1, (name, values)
    for name in ("id", "node", "session", "peer", "local", "mail_from", "received", "size"):
        assert name in env.meta
    assert ("relay" in env.meta) == bool(facts.via)
    # The block parses back: one Received line of ours, ending the block,
    # whatever bytes the sender or the relay put in a value.
    block, rest = split_block(env.full_bytes())
    assert rest == content
    assert block.count(b"\r\nReceived: ") + block.startswith(b"Received: ") == 1
    for header in (META_FIELDS[n] for n in env.meta if n not in ("rcpt", "domain")):
        assert block.count(f"\n{header}: ".encode()) + block.startswith(f"{header}: ".encode()) == 1
