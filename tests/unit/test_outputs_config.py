"""The ``outputs:`` section: kinds picked by ``type``, errors with their lines."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from pathlib import Path

import pytest
import yaml

from spamtrap.config import ConfigError, ConfigIssue, parse_config
from spamtrap.config.schema import OutputConfig
from spamtrap.outputs import exec as exec_kind
from spamtrap.outputs import kinds, settings_class

ROOT = Path(__file__).parents[2]
HEAD = "traps: {catch_all: true}\nsets: {all: {}, private: {private: true}}\n"


def issues(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as e:
        parse_config(HEAD + text, "t.yaml")
    return e.value.errors


def line_of(text: str, needle: str) -> int:
    """The line of ``needle`` in HEAD + text, as the error reports it."""
    lines = (HEAD + text).splitlines()
    return next(i for i, line in enumerate(lines, 1) if needle in line)


def test_an_exec_output_is_built_as_the_kind_settings() -> None:
    cfg = parse_config(
        HEAD
        + """outputs:
  hook:
    type: exec
    sets: [all, private]
    argv: [/bin/cat, -u]
    rate: 2.5
    concurrency: 2
    max_age: 2h
    timeout: 30s
"""
    )
    (out,) = cfg.outputs
    assert isinstance(out, exec_kind.Settings)
    assert (out.name, out.type, out.sets) == ("hook", "exec", ["all", "private"])
    assert out.argv == ["/bin/cat", "-u"]
    assert (out.rate, out.concurrency, out.max_age, out.timeout) == (2.5, 2, 7200.0, 30.0)
    # The common keys' defaults.
    assert (out.max_messages, out.retry_initial, out.retry_max) == (100_000, 5.0, 600.0)
    assert out.line_endings == "unix"


def test_outputs_keep_their_order_and_a_set_may_be_a_single_name() -> None:
    cfg = parse_config(
        HEAD
        + """outputs:
  b: {type: exec, sets: all, argv: [cat]}
  a: {type: exec, sets: [private], argv: [cat]}
"""
    )
    assert [(o.name, o.sets) for o in cfg.outputs] == [("b", ["all"]), ("a", ["private"])]


def test_an_unknown_type_is_an_error_at_its_line_with_a_suggestion() -> None:
    text = "outputs:\n  hook:\n    type: exek\n    sets: [all]\n"
    (issue,) = issues(text)
    assert issue.line == line_of(text, "exek")
    assert issue.path == "outputs.hook.type"
    assert "unknown output type 'exek'; did you mean 'exec'?" in issue.message


def test_a_type_that_names_machinery_is_not_a_kind() -> None:
    (issue,) = issues("outputs:\n  hook:\n    type: runner\n    sets: [all]\n")
    assert "unknown output type 'runner'" in issue.message
    assert "exec" in issue.message  # the known kinds are listed


def test_a_missing_type_is_an_error() -> None:
    (issue,) = issues("outputs:\n  hook:\n    sets: [all]\n")
    assert issue.path == "outputs.hook" and "missing required key 'type'" in issue.message


def test_an_unknown_key_is_an_error_with_a_suggestion() -> None:
    text = "outputs:\n  hook:\n    type: exec\n    sets: [all]\n    argv: [cat]\n    timout: 3\n"
    (issue,) = issues(text)
    assert issue.line == line_of(text, "timout")
    assert "unknown key 'timout'; did you mean 'timeout'?" in issue.message


def test_a_set_that_does_not_exist_is_an_error_at_its_item() -> None:
    text = (
        "outputs:\n  hook:\n    type: exec\n    sets:\n      - all\n      - privat\n"
        "    argv: [cat]\n"
    )
    (issue,) = issues(text)
    assert issue.line == line_of(text, "- privat")
    assert issue.path == "outputs.hook.sets[1]"
    assert "unknown set 'privat'; did you mean 'private'?" in issue.message


def test_sets_and_argv_must_not_be_empty() -> None:
    text = "outputs:\n  hook:\n    type: exec\n    sets: []\n    argv: []\n"
    got = {(i.path, i.line, i.message) for i in issues(text)}
    assert got == {
        ("outputs.hook.sets", line_of(text, "    sets:"), "must not be empty"),
        ("outputs.hook.argv", line_of(text, "argv:"), "must not be empty"),
    }


def test_required_keys_are_named() -> None:
    messages = {i.message for i in issues("outputs:\n  hook: {type: exec}\n")}
    assert messages == {"missing required key 'sets'", "missing required key 'argv'"}


def test_a_command_not_on_path_is_an_error_at_argv(tmp_path: Path) -> None:
    text = "outputs:\n  hook:\n    type: exec\n    sets: [all]\n    argv: [no-such-command-x]\n"
    (issue,) = issues(text)
    assert issue.line == line_of(text, "argv:")
    assert issue.message == "command 'no-such-command-x' is not found on PATH"


def test_a_path_that_is_not_executable_is_an_error(tmp_path: Path) -> None:
    script = tmp_path / "hook.sh"
    script.write_text("#!/bin/sh\n")
    text = f"outputs:\n  hook:\n    type: exec\n    sets: [all]\n    argv: [{script}]\n"
    (issue,) = issues(text)
    assert "is not an executable file" in issue.message
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (out,) = parse_config(HEAD + text).outputs
    assert isinstance(out, exec_kind.Settings) and out.argv == [str(script)]
    os.unlink(script)
    (issue,) = issues(text)
    assert "is not an executable file" in issue.message
    (issue,) = issues(text.replace(str(script), str(tmp_path)))  # a directory
    assert "is not an executable file" in issue.message


def test_common_keys_are_checked_by_their_rules() -> None:
    text = (
        "outputs:\n  hook:\n    type: exec\n    sets: [all]\n    argv: [cat]\n"
        "    rate: -1\n    concurrency: 0\n    max_bytes: lots\n    retry_initial: 1h\n"
        "    retry_max: 1m\n"
    )
    got = {i.path: i.message for i in issues(text)}
    assert set(got) == {
        "outputs.hook.rate",
        "outputs.hook.concurrency",
        "outputs.hook.max_bytes",
    }
    assert "at least 0" in got["outputs.hook.rate"]
    # The cross-check runs once the keys themselves are fine.
    text = "outputs:\n  hook:\n    type: exec\n    sets: [all]\n    argv: [cat]\n"
    (issue,) = issues(text + "    retry_initial: 1h\n    retry_max: 1m\n")
    assert issue.path == "outputs.hook.retry_initial"
    assert issue.line == line_of(text + "    retry_initial: 1h\n", "retry_initial")
    assert "must not be above retry_max (60s)" in issue.message


def test_a_bad_output_name_and_a_duplicate_are_errors() -> None:
    text = "outputs:\n  -bad: {type: exec, sets: all, argv: [cat]}\n"
    assert "bad name '-bad'" in issues(text)[0].message
    text = (
        "outputs:\n  a: {type: exec, sets: all, argv: [cat]}\n"
        "  a: {type: exec, sets: all, argv: [cat]}\n"
    )
    (issue,) = issues(text)
    assert "duplicate name 'a' (first on line" in issue.message


def test_an_output_that_is_not_a_mapping_is_an_error() -> None:
    (issue,) = issues("outputs:\n  hook: [exec]\n")
    assert issue.message == "expected a mapping, got a list"


def test_every_kind_subclasses_output_config_frozen_and_keyword_only() -> None:
    assert "exec" in kinds()
    for kind in kinds():
        cls = settings_class(kind)
        assert issubclass(cls, OutputConfig)
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        assert params.frozen
        assert all(f.kw_only for f in dataclasses.fields(cls))


def _commented_outputs_example() -> str:
    """etc/spamtrap.yaml's commented ``outputs:`` example, uncommented."""
    text = (ROOT / "etc" / "spamtrap.yaml").read_text()
    block = text[text.index("\noutputs: {}\n") :].split("\n")[2:]
    lines = []
    for line in block:
        if not line.startswith("#"):
            break
        lines.append(line[1:])
    return "\n".join(lines)


def _keys_in(example: str) -> set[str]:
    return set(re.findall(r"^ {4}([a-z_]+):", example, re.MULTILINE))


def test_the_example_config_comments_show_every_key_of_every_kind() -> None:
    example = _commented_outputs_example()
    shown = _keys_in(example)
    for kind in kinds():
        fields = {f.name for f in dataclasses.fields(settings_class(kind))} - {"name"}
        assert fields <= shown, f"etc/spamtrap.yaml does not show {kind}'s {fields - shown}"
    # The exec example, as written, is a valid output but for its command.
    doc = yaml.safe_load(example)
    assert doc["local-hook"]["type"] == "exec"


def test_docs_tables_name_every_key_of_every_kind() -> None:
    text = (ROOT / "docs" / "outputs.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)`", text, re.MULTILINE))
    for kind in kinds():
        fields = {f.name for f in dataclasses.fields(settings_class(kind))} - {"name"}
        assert fields <= documented, f"docs/outputs.md does not name {kind}'s {fields - documented}"


@pytest.mark.parametrize("kind", kinds())
def test_every_kind_reports_its_keys_errors_with_lines(kind: str) -> None:
    text = f"outputs:\n  out:\n    type: {kind}\n    sets: [all]\n    bogus_key: 1\n"
    found = [i for i in issues(text) if i.path == "outputs.out.bogus_key"]
    assert [(i.line, i.message.split(" (")[0]) for i in found] == [
        (line_of(text, "bogus_key"), "unknown key 'bogus_key'")
    ]
    # Whatever else the kind requires is named, each with a line.
    assert all(i.line is not None for i in issues(text))
