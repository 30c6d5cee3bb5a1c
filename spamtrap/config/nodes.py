"""The YAML document as composed nodes that keep their line numbers,
command-line overrides merged into it, and the errors that point into it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import yaml


@dataclass
class ConfigIssue:
    line: int | None  # 1-based; None when the problem has no single place
    path: str  # where in the config, e.g. "sets.private.match[0].regex"
    message: str
    option: str | None = None  # the command-line option the value came from

    def format(self, filename: str) -> str:
        if self.option is not None:
            return f"{self.option}: {self.message}"
        where = filename if self.line is None else f"{filename}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is not valid; ``errors`` lists every problem found."""

    def __init__(self, errors: list[ConfigIssue], filename: str = "<string>") -> None:
        self.errors = errors
        self.filename = filename
        super().__init__("\n".join(issue.format(filename) for issue in errors))


@dataclass(frozen=True)
class Override:
    """A command-line option that sets one key, e.g. ``--queue URL`` sets
    ``queue.url``. Merged into the document before the one validation, so
    the option is checked by the key's own rule; its errors name it."""

    option: str  # "--queue"
    path: str  # "queue.url"
    value: str


class _OptionMark(yaml.Mark):
    """Where a merged-in value came from: an option, not a file line."""

    def __init__(self, option: str) -> None:
        super().__init__(option, 0, 0, 0, None, 0)
        self.option = option


def option_of(node: yaml.Node | None) -> str | None:
    """The command-line option ``node`` was merged in from, if any."""
    mark = node.start_mark if node is not None else None
    return mark.option if isinstance(mark, _OptionMark) else None


def merge_overrides(root: yaml.MappingNode, overrides: Sequence[Override]) -> None:
    """Set each override's key in the composed document, replacing what
    the file gives there and adding the sections it lacks. A section that
    is not a mapping in the file is left as it is: its own error is
    reported, and the option waits until the file is fixed."""
    for o in overrides:
        mark = _OptionMark(o.option)
        *sections, key = o.path.split(".")
        node: yaml.Node = root
        for name in [*sections, key]:
            if not isinstance(node, yaml.MappingNode):
                break
            found = _entry(node, name)
            if name == key:
                value = yaml.ScalarNode(_STR_TAG, o.value, mark, mark)
                if found is None:
                    node.value.append((yaml.ScalarNode(_STR_TAG, key, mark, mark), value))
                else:
                    index = [k for k, _ in node.value].index(found[0])
                    node.value[index] = (found[0], value)
            elif found is None or _is_null(found[1]):
                section = yaml.MappingNode(_MAP_TAG, [], mark, mark)
                if found is None:
                    node.value.append((yaml.ScalarNode(_STR_TAG, name, mark, mark), section))
                else:
                    index = [k for k, _ in node.value].index(found[0])
                    node.value[index] = (found[0], section)
                node = section
            else:
                node = found[1]


_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"


def _compose(text: str, issues: list[ConfigIssue]) -> yaml.MappingNode | None:
    """The root mapping node, or None with the problem added to ``issues``."""
    root = _compose_any(text, issues)
    if root is None:
        return None
    if _is_null(root):
        issues.append(ConfigIssue(None, "", "the file is empty; see etc/spamtrap.yaml"))
        return None
    if not isinstance(root, yaml.MappingNode):
        line = root.start_mark.line + 1
        issues.append(
            ConfigIssue(line, "", f"expected a mapping of sections, got {_node_kind(root)}")
        )
        return None
    return root


def _compose_any(text: str, issues: list[ConfigIssue]) -> yaml.Node | None:
    """The root node (a null scalar for an empty text), or None with the
    YAML problem added to ``issues``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        message = f"YAML syntax error: {e.problem or e.context}"
        if e.problem and e.context and e.context_mark:
            message += f" ({e.context} from line {e.context_mark.line + 1})"
        issues.append(ConfigIssue(mark.line + 1 if mark else None, "", message))
        return None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        issues.append(ConfigIssue(line, "", str(e).splitlines()[0]))
        return None
    except yaml.YAMLError as e:
        issues.append(ConfigIssue(None, "", f"YAML error: {e}"))
        return None
    if root is None:  # no document at all
        root = yaml.ScalarNode("tag:yaml.org,2002:null", "")
    return root


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _node_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "a single value"


def _entry(node: yaml.Node | None, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    """The (key node, value node) of ``key`` in a mapping node, if present."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return k, v
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
