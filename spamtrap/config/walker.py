"""The walk of a composed YAML document against the declarations.

The YAML is composed into nodes (which keep their line numbers) and walked
against the dataclass fields and their type hints. Each leaf is parsed by
the default parser for its type, or by the rule its field declares
(spamtrap.config.rules.rule). Every problem is collected, so one run of
`spamtrap check-config` shows them all.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

import yaml

from spamtrap.config.checks import CHECKS
from spamtrap.config.nodes import (
    ConfigIssue,
    _entry,
    _is_null,
    _join,
    _node_kind,
    option_of,
)
from spamtrap.config.rules import (
    Parser,
    Rule,
    _boolean,
    _duration,
    _integer,
    _name,
    _regex,
    _Shape,
    _string,
    _unknown,
    rule_of,
)

_DEFAULT_PARSERS: dict[object, Parser] = {
    str: _string,
    bool: _boolean,
    int: _integer(0),
    float: _duration(),  # every float in the config is a duration
    re.Pattern: _regex,
}

_BAD = object()  # a value that failed; the error is already recorded


class _Walker:
    def __init__(self) -> None:
        self.issues: list[ConfigIssue] = []
        self.unknown_keys: list[str] = []  # their paths
        # id(built object) -> (its mapping node, its path), for cross-checks
        self.origin: dict[int, tuple[yaml.Node, str]] = {}
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, node: yaml.Node | None, path: str, message: str) -> None:
        option = option_of(node)
        line = node.start_mark.line + 1 if node is not None and option is None else None
        self.issues.append(ConfigIssue(line, path, message, option))

    def clean(self, path: str) -> bool:
        """No problem was found at or below ``path``.

        Cross-checks run only on clean parts: a value that failed is left out,
        and checking without it would report mistakes the operator never made.
        """
        return not any(
            i.path == path or i.path.startswith((path + ".", path + "[")) for i in self.issues
        )

    def pairs(
        self, node: yaml.MappingNode, path: str, what: str = "key"
    ) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
        """A mapping's entries, reporting duplicate and non-name keys.

        YAML itself lets a later duplicate key silently win; a typo'd copy of
        a section would then replace the real one without a word.
        """
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.error(key_node, path, "merge keys (<<) are not supported")
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.error(key_node, path, f"a key must be a name, got {_node_kind(key_node)}")
                continue
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                self.error(
                    key_node,
                    _join(path, key),
                    f"duplicate {what} {key!r} (first on line {seen[key]})",
                )
                continue
            seen[key] = line
            yield key, key_node, value_node

    def build(
        self, cls: type, node: yaml.Node, path: str, preset: dict[str, object] | None = None
    ) -> object:
        """A dataclass instance from a mapping node (null: all defaults)."""
        preset = preset or {}
        if not isinstance(node, yaml.MappingNode) and not _is_null(node):
            self.error(node, path, f"expected a mapping, got {_node_kind(node)}")
            return _BAD
        hints = _type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in preset}
        values = dict(preset)
        given = set()
        entries = self.pairs(node, path) if isinstance(node, yaml.MappingNode) else iter(())
        for key, key_node, value_node in entries:
            if key not in fields:
                self.error(key_node, _join(path, key), _unknown("key", key, list(fields)))
                self.unknown_keys.append(_join(path, key))
                continue
            given.add(key)
            rule = rule_of(fields[key].metadata)
            value = self.value(hints[key], value_node, _join(path, key), rule)
            if value is not _BAD:
                values[key] = value
        required = [name for name, f in fields.items() if not _has_default(f)]
        for name in required:
            if name not in given:
                self.error(node, path, f"missing required key {name!r}")
        if any(name not in values for name in required):
            return _BAD  # reported above, or where its value failed
        obj: object = cls(**values)
        # A kind's Settings is checked as its base (OutputConfig) too.
        check = next((CHECKS[c] for c in cls.__mro__ if c in CHECKS), None)
        if check is not None:
            completed = check(self, obj, node, path)
            obj = obj if completed is None else completed
        self.origin[id(obj)] = (node, path)
        return obj

    def value(self, hint: object, node: yaml.Node, path: str, rule: Rule) -> object:
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            return self.build(typing.cast(type, hint), node, path)
        if origin is list:
            return self.list(typing.get_args(hint)[0], node, path, rule)
        if origin in (types.UnionType, typing.Union):
            if _is_null(node):
                return None
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
            return self.value(hint, node, path, rule)
        if origin is dict:
            return self.mapping(node, path)
        parse = rule.parse or _DEFAULT_PARSERS[typing.get_origin(hint) or hint]
        try:
            return parse(self.scalar(node))
        except ValueError as e:
            self.error(node, path, str(e))
            return _BAD

    def list(self, item_hint: object, node: yaml.Node, path: str, rule: Rule) -> object:
        if rule.keyed_by:
            return self.keyed_list(item_hint, node, path, rule)
        if _is_null(node):
            items: list[tuple[yaml.Node, str]] = []
        elif isinstance(node, yaml.SequenceNode):
            items = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        elif rule.one_or_many and isinstance(node, yaml.ScalarNode):
            items = [(node, path)]
        else:
            self.error(node, path, f"expected a list, got {_node_kind(node)}")
            return _BAD
        if rule.nonempty and not items:
            self.error(node, path, "must not be empty")
        values = [self.value(item_hint, item, item_path, rule) for item, item_path in items]
        return [v for v in values if v is not _BAD]

    def keyed_list(self, item_hint: object, node: yaml.Node, path: str, rule: Rule) -> object:
        # e.g. sets: {name: {options}} -> [SetConfig(name=name, ...)]
        if _is_null(node):
            entries: list[tuple[str, yaml.Node, yaml.Node]] = []
        elif isinstance(node, yaml.MappingNode):
            entries = list(self.pairs(node, path, what="name"))
        else:
            self.error(
                node, path, f"expected a mapping of names to options, got {_node_kind(node)}"
            )
            return _BAD
        assert rule.keyed_by is not None
        result = []
        for key, key_node, value_node in entries:
            item_path = _join(path, key)
            try:
                name = _name(key)
            except ValueError as e:
                self.error(key_node, item_path, str(e))
                continue
            cls = typing.cast(type, item_hint)  # a keyed list holds dataclasses
            if rule.kind_of is not None:
                kind = self.kind(rule.kind_of, value_node, item_path)
                if kind is None:
                    continue
                cls = kind
            item = self.build(cls, value_node, item_path, {rule.keyed_by: name})
            if item is not _BAD:
                result.append(item)
        if rule.nonempty and not entries:
            self.error(node, path, "must not be empty")
        return result

    def kind(self, kind_of: Callable[[str], type], node: yaml.Node, path: str) -> type | None:
        """The class an item's ``type`` key names (e.g. an output's Settings),
        or None with the problem reported."""
        found = _entry(node, "type")
        if found is None:
            if isinstance(node, yaml.MappingNode) or _is_null(node):
                self.error(node, path, "missing required key 'type'")
            else:
                self.error(node, path, f"expected a mapping, got {_node_kind(node)}")
            return None
        try:
            return kind_of(_name(self.scalar(found[1])))
        except ValueError as e:
            self.error(found[1], _join(path, "type"), str(e))
            return None

    def mapping(self, node: yaml.Node, path: str) -> object:
        """Free-form options (a custom stage's): any YAML mapping, as is."""
        if _is_null(node):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, f"expected a mapping, got {_node_kind(node)}")
            return _BAD
        for _ in self.pairs(node, path):
            pass  # reports duplicate and non-name keys
        try:
            return self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, KeyError, TypeError, OverflowError) as e:
            self.error(node, path, f"cannot read options: {e}")
            return _BAD

    def scalar(self, node: yaml.Node) -> object:
        if not isinstance(node, yaml.ScalarNode):
            return _Shape(_node_kind(node))
        try:
            return self._constructor.construct_object(node)
        # Explicit tags make PyYAML's constructors raise all of these, e.g.
        # "!!bool maybe" is a KeyError and "!!int x" a ValueError.
        except (yaml.YAMLError, ValueError, KeyError, TypeError, OverflowError):
            raise ValueError(f"cannot read {node.value!r} as {node.tag.rsplit(':', 1)[-1]}")


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


@functools.cache
def _type_hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)
