"""Loading: a YAML file or text -> a checked Config, or a ConfigError."""

from __future__ import annotations

import typing
from collections.abc import Sequence

import yaml

from spamtrap.config.filter_schema import ListRule
from spamtrap.config.nodes import (
    ConfigError,
    ConfigIssue,
    Override,
    _compose,
    _compose_any,
    _entry,
    _is_null,
    _node_kind,
    merge_overrides,
)
from spamtrap.config.rules import NO_RULE, _name
from spamtrap.config.schema import Config
from spamtrap.config.walker import _Walker


def load_config(path: str, overrides: Sequence[Override] = ()) -> Config:
    """Read and check a YAML config file, with ``overrides`` merged in
    (see merge_overrides). Raises ConfigError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([ConfigIssue(None, "", f"cannot read: {e.strerror or e}")], path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError([ConfigIssue(line, "", "the file is not UTF-8 text")], path)
    return parse_config(text, path, overrides)


def parse_config(
    text: str, filename: str = "<string>", overrides: Sequence[Override] = ()
) -> Config:
    """Check YAML text, with ``overrides`` merged in, and build a Config.
    Raises ConfigError."""
    walker = _Walker()
    cfg = None
    try:
        root = _compose(text, walker.issues)
        if root is not None:
            merge_overrides(root, overrides)
            cfg = walker.build(Config, root, "")
    except RecursionError:
        # Hostile input (e.g. thousands of nested brackets) must still end
        # as a ConfigError: this is an entry point for bad files.
        walker.issues.append(ConfigIssue(None, "", "the YAML is nested too deeply"))
    if walker.issues or cfg is None:
        walker.issues.sort(key=lambda i: (i.line is None, i.line or 0))
        raise ConfigError(walker.issues, filename)
    return typing.cast(Config, cfg)


# The embedded default (twistd spamtrap without --config), as a document
# the command-line overrides are merged into: it parses to default_config().
DEFAULT_DOCUMENT = "traps: {catch_all: true}\n"


def parse_list_rules(text: str, filename: str = "<string>") -> list[ListRule]:
    """A discard-list file (``filters.lists.files``): a list of the same
    mappings as ``filters.lists.rules``, checked by the same declarations,
    and no two rules of one name. Empty text: no rules. Raises ConfigError."""
    walker = _Walker()
    rules: list[ListRule] = []
    try:
        root = _compose_any(text, walker.issues)
        if root is not None and not _is_null(root):
            if isinstance(root, yaml.SequenceNode):
                for i, item in enumerate(root.value):
                    built = walker.value(ListRule, item, _rule_path(item, i), NO_RULE)
                    if isinstance(built, ListRule):
                        rules.append(built)
                _check_rule_names(walker, rules)
            else:
                walker.error(
                    root,
                    "",
                    f"expected a list of rules ({{name, regex, header|meta}}),"
                    f" got {_node_kind(root)}",
                )
    except RecursionError:
        walker.issues.append(ConfigIssue(None, "", "the YAML is nested too deeply"))
    if walker.issues:
        walker.issues.sort(key=lambda i: (i.line is None, i.line or 0))
        raise ConfigError(walker.issues, filename)
    return rules


def _rule_path(item: yaml.Node, index: int) -> str:
    """Where a rule's problems are: its name when it has a good one (as a
    keyed list's items are named), else its place in the list."""
    found = _entry(item, "name")
    if found is not None and isinstance(found[1], yaml.ScalarNode):
        try:
            return _name(found[1].value)
        except ValueError:
            pass
    return f"[{index}]"


def _check_rule_names(walker: _Walker, rules: list[ListRule]) -> None:
    first: dict[str, int] = {}  # name -> line
    for rule in rules:
        node, path = walker.origin[id(rule)]
        line = node.start_mark.line + 1
        if rule.name in first:
            walker.error(node, path, f"duplicate rule name {rule.name!r} (line {first[rule.name]})")
        else:
            first[rule.name] = line
