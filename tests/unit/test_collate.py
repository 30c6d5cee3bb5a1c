"""Set rules and filter stages."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from spamtrap.config import Condition, SetConfig
from spamtrap.filters import Discard, run_stages
from spamtrap.filters.size import SizeStage
from spamtrap.message import Envelope
from spamtrap.work.collate import Collator, message_headers


def env(data: bytes = b"Subject: hello\r\n\r\nbody\r\n", **meta: list[str]) -> Envelope:
    return Envelope(
        msg_id="id1",
        received_at=0.0,
        mail_from="a@b",
        rcpts=["v@trap.example"],
        data=data,
        meta={"rcpt": ["<v@trap.example>"], **meta},
    )


def cond(regex: str, header: str | None = None, meta: str | None = None) -> Condition:
    return Condition(re.compile(regex, re.I), header=header, meta=meta)


def test_set_without_rules_takes_everything() -> None:
    assert Collator([SetConfig("all")]).sets_for(env()) == ["all"]


def test_private_and_shared_sets_by_recipient() -> None:
    private = cond(r"@private\.example>", meta="rcpt")
    c = Collator(
        [
            SetConfig("all"),
            SetConfig("private", match=[private]),
            SetConfig("shared", exclude=[private]),
        ]
    )
    assert c.sets_for(env(rcpt=["<x@private.example>"])) == ["all", "private"]
    assert c.sets_for(env(rcpt=["<x@public.example>"])) == ["all", "shared"]


def test_header_conditions_and_and_semantics() -> None:
    s = SetConfig("viagra", match=[cond("pills", header="subject"), cond("^bot", meta="helo")])
    c = Collator([s])
    assert c.sets_for(env(b"Subject: cheap PILLS\r\n\r\nx\r\n", helo=["bot.example"])) == ["viagra"]
    assert c.sets_for(env(b"Subject: cheap PILLS\r\n\r\nx\r\n", helo=["mx.example"])) == []
    assert c.sets_for(env(b"Subject: hello\r\n\r\npills\r\n", helo=["bot.example"])) == []


def test_headers_are_unfolded_and_lenient() -> None:
    h = message_headers(
        b"Subject : folded\r\n\tline\r\nX-Bad\r\nTo: a\r\nTo: b\r\n\r\nSubject: body"
    )
    assert h["subject"] == ["folded line"]
    assert h["to"] == ["a", "b"]
    assert "x-bad" not in h


@given(st.binary(max_size=2000))
def test_header_parser_never_raises(data: bytes) -> None:
    for name, values in message_headers(data).items():
        assert name == name.lower()
        assert all(isinstance(v, str) for v in values)


def test_size_stage_and_runner() -> None:
    stages = [("size", SizeStage(10))]
    assert run_stages(stages, env(b"short\r\n")).keep
    out = run_stages(stages, env(b"x" * 11))
    assert not out.keep and out.stage == "size" and out.reason == "too-large"


def test_a_stage_that_raises_does_not_lose_the_message() -> None:
    def broken(e: Envelope) -> Discard | None:
        raise ValueError("bug")

    out = run_stages([("broken", broken), ("size", SizeStage(100))], env())
    assert out.keep
    assert [(v.stage, v.verdict) for v in out.verdicts] == [("broken", "error"), ("size", "pass")]
