"""Output queue records: a kept copy that is the intake record plus meta
fields is queued as that record and the fields (O2), any other copy whole
(O1); either decodes to the copy the set kept."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamtrap.message import Envelope
from spamtrap.outputs.queue import ItemBase, decode_item, encode_item

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
values = st.lists(text, min_size=1, max_size=3)
metas = st.dictionaries(st.sampled_from(["id", "helo", "peer", "campaign", "x-new"]), values)


@st.composite
def envelopes(draw: Any) -> Envelope:
    return Envelope(
        msg_id=draw(st.text("abc123", min_size=1, max_size=8)),
        received_at=draw(st.floats(0, 2e9)),
        mail_from=draw(text),
        rcpts=draw(st.lists(text, min_size=1, max_size=3)),
        data=draw(st.binary(max_size=200)),
        feed=draw(st.none() | text),
        meta=draw(metas),
        received=draw(st.lists(text, max_size=3)),
    )


# What a stage or a set may do to the decoded envelope before it is kept.
CHANGES = {
    "add a field": lambda e, v: e.meta.__setitem__("campaign-" + str(len(e.meta)), v),
    "change a field in place": lambda e, v: [f.append(v[0]) for f in list(e.meta.values())[:1]],
    "replace a field": lambda e, v: [e.meta.__setitem__(k, v) for k in list(e.meta)[:1]],
    "remove a field": lambda e, v: [e.meta.pop(k) for k in list(e.meta)[:1]],
    "new bytes": lambda e, v: setattr(e, "data", e.data + b"X-Added: 1\r\n"),
    "same bytes, new object": lambda e, v: setattr(e, "data", bytes(bytearray(e.data))),
    "a recipient redacted": lambda e, v: e.rcpts.__setitem__(0, "xxxx@xxxx"),
    "the sender": lambda e, v: setattr(e, "mail_from", e.mail_from + "x"),
    "the Received pieces": lambda e, v: e.received.append("for <x>"),
    "the feed": lambda e, v: setattr(e, "feed", (e.feed or "") + "f"),
    "nothing": lambda e, v: None,
}


@given(envelopes(), st.lists(st.sampled_from(sorted(CHANGES)), max_size=3), values)
def test_every_copy_decodes_to_what_the_set_kept(
    original: Envelope, changes: list[str], value: list[str]
) -> None:
    record = original.to_record()
    env = Envelope.from_record(record)  # as the pipeline reads it
    base = ItemBase(record, env)
    for change in changes:
        CHANGES[change](env, value)
    queued = encode_item("all", env, base)
    set_name, back = decode_item(queued)
    assert set_name == "all"
    assert back == env
    assert back.to_record() == env.to_record()
    meta_only = {"add a field", "change a field in place", "replace a field", "nothing"}
    if set(changes) <= meta_only:
        assert queued.startswith(b"O2 ")
        assert queued.endswith(record)  # the intake's bytes, not encoded again
    elif env.data is not base.data:
        # new bytes, or equal bytes in a new object (CPython shares b""
        # and one-byte strings, which are then the same object: O2 is right)
        assert queued.startswith(b"O1 ")


def test_a_copy_with_a_field_changed_in_place_is_queued_as_it_is() -> None:
    # A stage appending to a list it got from the decoded meta must not be
    # lost: the base keeps copies of the values.
    env = Envelope.from_record(
        Envelope("m1", 1.0, "a@b", ["v@t"], b"x\r\n", meta={"helo": ["h"]}).to_record()
    )
    base = ItemBase(env.to_record(), env)
    env.meta["helo"].append("second")
    _, back = decode_item(encode_item("all", env, base))
    assert back.meta["helo"] == ["h", "second"]


@pytest.mark.parametrize(
    "record",
    [
        b'O2 all\n5\n{"a":',  # cut short
        b"O2 all\nx\n{}",  # no length
        b"O2 all\n2\n[]1\n{}",  # not an object
        b"O3 all\n",  # no such form
    ],
)
def test_a_malformed_record_raises_value_error(record: bytes) -> None:
    with pytest.raises(ValueError):
        decode_item(record)
