"""The dialect family: what top-N lists (``spamtrap stats``, the dashboard)
count, so that one bot is one entry however many messages and recipients
its sessions carry."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from spamtrap.intake.parse import Dialect, dialect_family
from tests.support.stats import T, message, stats, write_index


def rendered(*commands: tuple[bytes, bytes], flags: tuple[str, ...] = ()) -> str:
    d = Dialect()
    for verb, arg in commands:
        d.command(verb, arg)
    d.flags.update(flags)
    return d.render()


EHLO = (b"EHLO", b"bot.example")
MAIL = (b"MAIL", b"FROM:<a@b.example>")
RCPT = (b"RCPT", b"TO:<x@trap.example>")
DATA = (b"DATA", b"")


def test_later_messages_of_a_session_are_in_the_first_ones_family() -> None:
    first = rendered(EHLO, MAIL, RCPT, DATA)
    third = rendered(EHLO, MAIL, RCPT, DATA, MAIL, RCPT, DATA, MAIL, RCPT, DATA)
    assert first != third
    assert dialect_family(first) == dialect_family(third)


def test_a_run_of_recipients_is_one_token() -> None:
    one = dialect_family(rendered(EHLO, MAIL, RCPT, DATA))
    many = dialect_family(rendered(EHLO, MAIL, *[RCPT] * 40, DATA))
    assert one.count("RCPT") == 1 and "*" not in one
    assert many.count("RCPT") == 1 and "RCPT:" in many and "*," in many


def test_different_bots_stay_apart() -> None:
    helo = dialect_family(rendered((b"HELO", b"bot.example"), MAIL, RCPT, DATA))
    ehlo = dialect_family(rendered(EHLO, MAIL, RCPT, DATA))
    flagged = dialect_family(rendered(EHLO, MAIL, RCPT, DATA, flags=("pipelining",)))
    assert len({helo, ehlo, flagged}) == 3
    assert flagged.endswith(" flags=pipelining")


@given(st.lists(st.sampled_from([EHLO, MAIL, RCPT, DATA, (b"NOOP", b""), (b"RSET", b"")])))
def test_the_family_of_a_family_is_itself(commands: list[tuple[bytes, bytes]]) -> None:
    family = dialect_family(rendered(*commands))
    assert dialect_family(family) == family
    assert len(family) <= len(rendered(*commands)) + 1


def test_stats_counts_families(tmp_path: Path) -> None:
    first = rendered(EHLO, MAIL, RCPT, DATA)
    second = rendered(EHLO, MAIL, RCPT, DATA, MAIL, RCPT, DATA)
    root = tmp_path / "bundles"
    lines = [
        message(T + i, "c1", "bot.example", "192.0.2.1", d)
        for i, d in enumerate([first, second, second])
    ]
    write_index(root, "all", T, lines)
    code, out, _ = stats("--json", str(root))
    assert code == 0
    [period] = json.loads(out)["periods"]
    assert period["dialects"] == [{"value": dialect_family(first), "count": 3}]
