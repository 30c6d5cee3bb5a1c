"""systemd unit files of debian/ parsed the way systemd reads them."""

from __future__ import annotations

from pathlib import Path

from tests.support.node import REPO

TEMPLATE = REPO / "debian" / "spamtrap@.service"


SINGLE = REPO / "debian" / "spamtrap.service"


Unit = dict[str, list[tuple[str, str]]]


def parse_unit(path: Path) -> Unit:
    """Sections as ordered (key, value) lists: systemd keys may repeat."""
    unit: Unit = {}
    section: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"continuation lines are not expected: {line}"
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            section.append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, section: str, key: str) -> str:
    (value,) = values(unit, section, key)
    return value


