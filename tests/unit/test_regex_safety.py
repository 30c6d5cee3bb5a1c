"""Operator regexps: catastrophic shapes are refused at load, with the line."""

from __future__ import annotations

import re
import time

import pytest

from spamtrap.config import ConfigError, parse_config
from spamtrap.filters.lists import MAX_VALUE_CHARS, ListsStage, RuleFileError, parse_rules
from spamtrap.message import Envelope
from spamtrap.regex_safety import UnsafePatternError, check

REFUSED = [
    (r"(a+)+", "(a+)+"),
    (r"^(\d+)+$", r"(\d+)+"),
    (r"(a|a)*", "*"),
    (r"(.*)*", "(.*)*"),
    (r"(\s*x?)*", r"(\s*x?)*"),
    (r"(a*b*)*", "(a*b*)*"),
    (r"(.*,)+x", "(.*,)+"),
    (r"(\w+\s?)+$", r"(\w+\s?)+"),
    (r"(?:[a-z]+|\d+)*\.", r"(?:[a-z]+|\d+)*"),
    (r"(a{1,2})+", "(a{1,2})+"),
    (r"(a?)*", "(a?)*"),
    (r"\s*\s*", r"\s*\s*"),
    (r".*.*=", ".*.*"),
    (r"x\w+\d*\w+", r"\w+\d*"),
    (r"(x+x+)+y", "x+x+"),
]
ACCEPTED = [
    r"<old-trap@trap\.example>",
    r"news\.example\.org",
    r"@private\.trap\.example$",
    r"(?:[a-z0-9-]+\.)+example\.com",
    r".*foo.*",
    r"\w+@\w+",
    r"(?:\d{1,3}\.){3}\d{1,3}",
    r"(\S+\s+)*x",
    r"^(?:(?!foo).)*$",
    r"cheap\s+watches",
    r"(a++)+",
    r"(?>a+)+",
    r"X-Forwarded-.*",
    r"(?:foo|bar)+",
    r"[a-z]+(?:-[a-z]+)*",
    r"^\s*$",
    r"^[^@]+@[^@]+$",
]


@pytest.mark.parametrize(("pattern", "shown"), REFUSED)
def test_catastrophic_shapes_are_refused(pattern: str, shown: str) -> None:
    with pytest.raises(UnsafePatternError) as e:
        check(pattern, re.IGNORECASE)
    assert shown in str(e.value)


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_ordinary_patterns_are_accepted(pattern: str) -> None:
    check(pattern, re.IGNORECASE)


@pytest.mark.parametrize(("pattern", "_shown"), [*REFUSED[:3], *REFUSED[4:6]])
def test_refused_shapes_really_are_slow(pattern: str, _shown: str) -> None:
    # The refusals are not theoretical: 28 characters already cost more than
    # a linear search of a mebibyte (or the group would be refused for nothing).
    rx = re.compile(pattern)
    hostile = {"(a|a)*": "a" * 24 + "!"}.get(pattern, None)
    subjects = [hostile] if hostile else ["a" * 24 + "!", "1" * 24 + "!", " " * 24 + "!"]
    slowest = 0.0
    for s in subjects:
        started = time.process_time()
        rx.fullmatch(s)
        slowest = max(slowest, time.process_time() - started)
    linear = re.compile(r"cheap\s+watches")
    started = time.process_time()
    linear.search("a" * (1 << 20))
    assert slowest > time.process_time() - started


def test_a_set_condition_is_refused_with_its_line() -> None:
    text = (
        "traps: {catch_all: true}\nsets:\n  bad:\n    match:\n"
        "      - header: Subject\n        regex: '(a+)+$'\n"
    )
    with pytest.raises(ConfigError) as e:
        parse_config(text, "spamtrap.yaml")
    message = str(e.value)
    assert message.startswith("spamtrap.yaml:6: sets.bad.match[0].regex:"), message
    assert "(a+)+" in message and "overlap" in message


def test_strip_headers_and_list_rules_in_the_config_are_checked() -> None:
    text = (
        "feeds:\n  - id: d1\n    address: d1@feeds.trap.example\n"
        "    strip_headers: ['X-Ok-.*', '(X-.*)*']\n"
        "filters:\n  lists:\n    rules:\n"
        "      - {name: r1, header: From, regex: '\\s*\\s*@x'}\n"
    )
    with pytest.raises(ConfigError) as e:
        parse_config(text, "c.yaml")
    lines = str(e.value).splitlines()
    assert any(line.startswith("c.yaml:4: feeds") and "(X-.*)*" in line for line in lines), lines
    assert any(line.startswith("c.yaml:8: filters.lists.rules") for line in lines), lines


def test_a_rule_file_refuses_a_catastrophic_rule_with_its_line() -> None:
    text = (
        "- name: ok\n  header: Subject\n  regex: 'cheap'\n"
        "- name: slow\n  meta: rcpt\n  regex: '(\\w+\\s?)+$'\n"
    )
    with pytest.raises(RuleFileError) as e:
        parse_rules(text, "rules.yaml")
    # The regex's own line, under the rule's name.
    assert e.value.problems[0][:2] == ("rules.yaml", 6)
    assert e.value.problems[0][2].startswith("slow.regex: ")
    assert r"(\w+\s?)+" in e.value.problems[0][2]


def test_a_quadratic_but_accepted_rule_sees_a_bounded_value() -> None:
    # r"\w+@x" is accepted but quadratic when unanchored: the stage cuts
    # each value to MAX_VALUE_CHARS, so a 256 KiB From costs milliseconds.
    (rule,) = parse_rules("- name: q\n  header: From\n  regex: '\\w+@x'\n")
    stage = ListsStage([rule], [])
    data = b"From: " + b"a" * (256 * 1024) + b"\r\n\r\nbody"
    env = Envelope("m", 0.0, "a@b.example", ["t@trap.example"], data)
    started = time.process_time()
    assert stage(env) is None
    assert time.process_time() - started < 0.1
    near = b"From: " + b"a" * (MAX_VALUE_CHARS - 10) + b"@x\r\n\r\n"
    assert stage(Envelope("m", 0.0, "", [], near)) is not None
