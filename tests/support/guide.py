"""docs/operators-guide.md as tests read it: its marked blocks (see
tests/system/test_newcomer.py) and the config they make."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.node import (
    REPO,
)

GUIDE = REPO / "docs" / "operators-guide.md"


ALERTS = REPO / "docs" / "prometheus-alerts.yml"


MARKED = re.compile(
    r"^<!-- (?P<kind>newcomer|check):(?P<what>[\w-]+)(?: (?P<arg>\S+))? -->\n"
    r"```(?P<lang>\w*)\n(?P<body>.*?)^```$",
    re.M | re.S,
)


YAML_FENCE = re.compile(r"^```yaml$", re.M)


@dataclass
class Block:
    mark: str  # "newcomer:config", "check:config", ...
    arg: str | None
    lang: str
    body: str


def guide_blocks() -> list[Block]:
    text = GUIDE.read_text()
    return [
        Block(f"{m['kind']}:{m['what']}", m["arg"], m["lang"], m["body"])
        for m in MARKED.finditer(text)
    ]


def blocks(mark: str) -> list[Block]:
    found = [b for b in guide_blocks() if b.mark == mark]
    assert found, f"the guide has no {mark} block"
    return found


def merge(into: dict[str, Any], extra: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Snippets add up: mappings merge, lists concatenate, scalars must not clash."""
    for key, value in extra.items():
        old = into.get(key)
        if key not in into:
            into[key] = value
        elif isinstance(old, dict) and isinstance(value, dict):
            merge(old, value, f"{where}{key}.")
        elif isinstance(old, list) and isinstance(value, list):
            into[key] = old + value
        else:
            raise AssertionError(f"guide snippets disagree on {where}{key}: {old!r} / {value!r}")
    return into


@dataclass
class Paths:
    """Where the guide's /etc/spamtrap and /var/lib/spamtrap are in this run."""

    etc: Path
    state: Path

    def map(self, text: str) -> str:
        text = text.replace("/etc/spamtrap/", f"{self.etc}/")
        return text.replace("/var/lib/spamtrap", str(self.state))

    def path(self, guide_path: str) -> Path:
        return Path(self.map(guide_path))


def guide_config(paths: Paths) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    for block in blocks("newcomer:config"):
        merge(cfg, yaml.safe_load(paths.map(block.body)))
    return cfg


@dataclass(frozen=True)
class Names:
    """The names the guide's config uses, read from it."""

    domain: str
    feed_id: str
    feed_address: str
    direct_token: str
    feeds_token: str


def names(cfg: dict[str, Any]) -> Names:
    (domain,) = cfg["traps"]["domains"]
    (feed,) = cfg["feeds"]
    assert set(cfg["sets"]) == {"direct", "feeds"}, "the guide's two sets"
    assert feed["extract_attached"] is True and feed["strip_received_by"] == ["mx.donor.example"]
    return Names(
        domain,
        feed["id"],
        feed["address"],
        cfg["sets"]["direct"]["token"],
        cfg["sets"]["feeds"]["token"],
    )


MINIMAL = {"traps": {"domains": ["trap.example"]}}
