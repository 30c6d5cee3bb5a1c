"""Loading: a YAML file or text -> a checked Config, or a ConfigError."""

from __future__ import annotations

import typing
from collections.abc import Sequence

from spamtrap.config.nodes import ConfigError, ConfigIssue, Override, _compose, merge_overrides
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
