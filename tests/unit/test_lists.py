"""Stage "lists": discard rules from the config and from files that reload."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import provider

from spamtrap import testing
from spamtrap.config import Config, ConfigError, ListRule, ListsConfig, parse_config
from spamtrap.filters import Discard
from spamtrap.filters.lists import ListsStage, RuleFileError, make, parse_rules
from spamtrap.message import Envelope


def rule(name: str, regex: str, header: str | None = None, meta: str | None = None) -> ListRule:
    return ListRule(name, re.compile(regex, re.IGNORECASE), header, meta)


def envelope(data: bytes, rcpt: str = "trap@trap.example", **meta: list[str]) -> Envelope:
    return Envelope("m1", 0.0, "a@b.example", [rcpt], data, meta={"rcpt": [f"<{rcpt}>"], **meta})


MESSAGE = (
    b"From: news@news.example.org\r\n"
    b"List-Id: Weekly\r\n <weekly.news.example.org>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"List-Id: body.example\r\n"
)


def test_rules_by_header_and_by_meta() -> None:
    stage = ListsStage(
        [
            rule("retired", r"<old@trap\.example>", meta="rcpt"),
            rule("news-ham", r"weekly\.news\.example\.org", header="list-id"),
            rule("body-is-not-header", r"body\.example", header="List-Id"),
            rule("own-tag", r"^yes$", meta="x_tag"),
        ],
        [],
    )
    assert stage(envelope(MESSAGE)) == Discard("list:news-ham")  # folded value, any case
    assert stage(envelope(b"Subject: x\r\n\r\n", rcpt="OLD@trap.example")) == Discard(
        "list:retired"
    )
    assert stage(envelope(b"Subject: x\r\n\r\nList-Id: body.example\r\n")) is None
    assert stage(envelope(b"Subject: x\r\n\r\n", x_tag=["yes"])) == Discard("list:own-tag")
    assert stage.rules_loaded == 4


def test_make_is_off_without_rules_or_files() -> None:
    assert make(Config(), None) is None


def test_rules_from_the_config_file() -> None:
    cfg = parse_config(
        "traps: {catch_all: true}\n"
        "filters:\n"
        "  lists:\n"
        "    rules:\n"
        "      - {name: retired, meta: rcpt, regex: 'old@'}\n"
    )
    stage = make(cfg, None)
    assert stage is not None
    assert stage(envelope(b"\r\n", rcpt="old@trap.example")) == Discard("list:retired")


# -- files ------------------------------------------------------------------------


def in_this_thread(f: Callable[[], bool]) -> defer.Deferred[bool]:
    return defer.maybeDeferred(f)


@pytest.fixture
def logged() -> Iterator[list[str]]:
    events: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        events.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def write(path: Path, text: str, mtime: int | None = None) -> None:
    path.write_text(text)
    if mtime is not None:
        os.utime(path, ns=(mtime, mtime))


HAM = "- name: ham\n  header: Subject\n  regex: hello\n"
RETIRED = "- name: retired\n  meta: rcpt\n  regex: 'old@'\n"


def watched(tmp_path: Path, text: str) -> tuple[ListsStage, Path, task.Clock]:
    path = tmp_path / "rules.yaml"
    write(path, text, mtime=1_000_000_000_000_000_000)
    lists = ListsConfig(
        rules=[rule("static", "static@", meta="rcpt")], files=[str(path)], reload_interval=10.0
    )
    stage = make(testing.config(filters__lists=lists), None)
    assert isinstance(stage, ListsStage)
    # make() reads no file: the daemon's ListsReloader does, at start, and
    # then watches (tests/unit/test_tap.py).
    assert names(stage) == ["static"] and stage.reloads == 0
    stage.reload()
    clock = task.Clock()
    signal_handler = signal.getsignal(signal.SIGHUP)
    stage.watch(clock, 10.0, clock=clock, run_in_thread=in_this_thread)
    # SIGHUP has one handler, spamtrap.service.startup.SighupHandler's.
    assert signal.getsignal(signal.SIGHUP) is signal_handler
    return stage, path, clock


def names(stage: ListsStage) -> list[str]:
    return [r.name for r in stage.rules]


def test_file_rules_reload_when_the_file_changes(tmp_path: Path) -> None:
    stage, path, clock = watched(tmp_path, HAM)
    assert names(stage) == ["static", "ham"]
    assert stage(envelope(MESSAGE)) == Discard("list:ham")
    before = stage.rules
    write(path, HAM + RETIRED, mtime=1_000_000_001_000_000_000)
    clock.advance(9)
    assert names(stage) == ["static", "ham"]  # not checked yet
    clock.advance(1)
    assert names(stage) == ["static", "ham", "retired"]
    assert stage.rules_loaded == 3 and stage.reloads == 2 and stage.reload_errors == 0
    # Swapped, never changed in place: a worker holding the old tuple sees
    # a consistent list.
    assert [r.name for r in before] == ["static", "ham"]
    stage.unwatch()


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("- name: ham\n  header: Subject\n  regex: '(unclosed'\n", 3, "bad regular expression"),
        ("- name: ham\n  header: Subject\n  regex: x\n  colour: red\n", 4, "unknown key 'colour'"),
        ("- name: ham\n  header: Subject\n  regex: [x\n", 4, "YAML syntax error"),
        ("- name: ham\n  regex: x\n", 1, "needs exactly one of 'header' or 'meta'"),
        ("- name: ham\n  meta: nosuch\n  regex: x\n", 2, "unknown metadata field 'nosuch'"),
        ("- name: ham\n  header: Subject\n", 1, "missing required key 'regex'"),
        ("name: ham\n", 1, "expected a list of rules"),
        (HAM + HAM, 4, "duplicate rule name 'ham' (line 1)"),
        ("- name: ham\n  header: Subject\n  regex: yes\n", 3, "regex: expected a string"),
    ],
)
def test_a_bad_file_keeps_the_old_rules_and_is_logged_with_its_line(
    tmp_path: Path, logged: list[str], text: str, where: int, problem: str
) -> None:
    stage, path, clock = watched(tmp_path, HAM)
    write(path, text, mtime=1_000_000_001_000_000_000)
    clock.advance(10)
    assert names(stage) == ["static", "ham"]
    assert stage.reload_errors == 1
    errors = [e for e in logged if problem in e]
    assert errors, logged
    assert f"{path}:{where}: " in errors[0]
    # Reported once, not at every check; retried when the file changes again.
    clock.advance(30)
    assert stage.reload_errors == 1
    write(path, RETIRED, mtime=1_000_000_002_000_000_000)
    clock.advance(10)
    assert names(stage) == ["static", "retired"]
    stage.unwatch()


def test_a_missing_file_is_an_error_and_keeps_the_rules(tmp_path: Path, logged: list[str]) -> None:
    stage, path, clock = watched(tmp_path, HAM)
    path.unlink()
    clock.advance(10)
    assert names(stage) == ["static", "ham"]
    assert stage.reload_errors == 1
    assert any(f"{path}: cannot read" in e for e in logged)
    stage.unwatch()


def test_reload_soon_reads_even_an_unchanged_looking_file(tmp_path: Path) -> None:
    stage, path, clock = watched(tmp_path, HAM)
    # Same size and mtime: the periodic check cannot see this edit.
    write(path, HAM.replace("hello", "HELLO"), mtime=1_000_000_000_000_000_000)
    clock.advance(10)
    assert stage.rules[1].regex.pattern == "hello"
    stage.reload_soon()  # what SIGHUP does
    assert stage.rules[1].regex.pattern == "HELLO"
    assert stage.reloads == 2
    # unwatch() stops the checks, and reload_soon() does nothing any more.
    stage.unwatch()
    write(path, RETIRED, mtime=1_000_000_003_000_000_000)
    clock.advance(100)
    stage.reload_soon()
    assert names(stage) == ["static", "ham"]


def test_a_failing_reload_does_not_stop_the_loop(tmp_path: Path) -> None:
    stage, path, clock = watched(tmp_path, HAM)

    def broken() -> bool:
        raise OSError("disk on fire")

    stage.check = broken  # type: ignore[method-assign]
    clock.advance(10)
    del stage.check
    write(path, RETIRED, mtime=1_000_000_001_000_000_000)
    clock.advance(10)
    assert names(stage) == ["static", "retired"]
    stage.unwatch()


def test_parse_rules_accepts_an_empty_file() -> None:
    assert parse_rules("", "f.yaml") == []
    assert parse_rules("# only comments\n", "f.yaml") == []


def test_parse_rules_reports_every_problem() -> None:
    with pytest.raises(RuleFileError) as e:
        parse_rules("- {name: a, regex: x}\n- {name: 'b c', header: X, regex: y}\n", "f.yaml")
    assert [line for _, line, _ in e.value.problems] == [1, 2]


def test_a_rule_file_is_checked_by_the_configs_own_declarations() -> None:
    rule_text = "{name: q, hedaer: X-Mailer, regex: y}"
    with pytest.raises(RuleFileError) as e:
        parse_rules(f"- {rule_text}\n", "f.yaml")
    assert str(e.value) == "f.yaml:1: q.hedaer: unknown key 'hedaer'; did you mean 'header'?"
    # The same rule in the config file is refused in the same words.
    with pytest.raises(ConfigError, match="unknown key 'hedaer'; did you mean 'header'"):
        parse_config(f"traps: {{catch_all: true}}\nfilters: {{lists: {{rules: [{rule_text}]}}}}\n")
