"""docs/operators-guide.md checked without running a node: every YAML block
is marked and passes the checker, the rule files parse, the alert rules use
real metrics, the links resolve. The guide followed literally by a real
node: tests/system/test_newcomer.py."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from spamtrap.config import parse_config
from spamtrap.filters.lists import parse_rules
from spamtrap.metrics import Metrics
from tests.support.guide import (
    ALERTS,
    GUIDE,
    MINIMAL,
    YAML_FENCE,
    Paths,
    blocks,
    guide_blocks,
    guide_config,
    merge,
)


def test_every_yaml_block_is_marked_and_checked() -> None:
    marked = [b for b in guide_blocks() if b.lang == "yaml"]
    assert len(marked) == len(YAML_FENCE.findall(GUIDE.read_text())), (
        "every ```yaml block in the guide needs a <!-- newcomer:... --> or <!-- check:... --> mark"
    )
    kinds = {b.mark for b in marked}
    known = {"newcomer:config", "newcomer:file", "newcomer:append"}
    assert kinds <= known | {"check:config", "check:prometheus"}, kinds


def test_guide_config_fragments_pass_the_checker() -> None:
    as_written = Paths(Path("/etc/spamtrap"), Path("/var/lib/spamtrap"))
    parse_config(yaml.safe_dump(guide_config(as_written)), "guide config")
    for block in blocks("check:config"):
        fragment = yaml.safe_load(block.body)
        base = {} if "traps" in fragment or "feeds" in fragment else dict(MINIMAL)
        parse_config(yaml.safe_dump(merge(base, fragment)), "guide fragment")


def test_guide_rule_files_parse() -> None:
    (first,) = blocks("newcomer:file")
    (append,) = blocks("newcomer:append")
    assert first.arg == append.arg
    assert [r.name for r in parse_rules(first.body)] == ["role-accounts"]
    rules = parse_rules(first.body + append.body)
    assert [r.name for r in rules] == ["role-accounts", "retired-jane"]
    # What the guide says they catch, in the form the rcpt metadata has.
    role, jane = rules
    assert role.meta == "rcpt" and role.regex.search("<Postmaster@trap.example>")
    assert not role.regex.search("<postmaster-x@trap.example>")
    assert jane.regex.search("<jane@trap.example>") and not jane.regex.search("<jane@trapxexample>")


def exported_metric_names() -> set[str]:
    out = set()
    for family in Metrics().registry.collect():
        out.add(family.name + "_total" if family.type == "counter" else family.name)
    return out


def test_alert_rules_use_real_metrics_and_match_the_guide() -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    exported = exported_metric_names()
    used = {n for r in rules for n in re.findall(r"\bspamtrap_\w+", r["expr"])}
    assert used and used <= exported, f"not exported by spamtrap.metrics: {used - exported}"
    # The guide's table lists every alert, with its expression.
    text = GUIDE.read_text()
    for rule in rules:
        assert f"| `{rule['alert']}` | `{rule['expr']}`" in text, rule["alert"]
    # ... and the scrape job it shows is the job the rules select.
    (scrape,) = blocks("check:prometheus")
    (job,) = yaml.safe_load(scrape.body)["scrape_configs"]
    assert any(f'job="{job["job_name"]}"' in r["expr"] for r in rules)


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"(?m)^#+ (.*)$", path.read_text())}


def test_guide_links_resolve() -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", GUIDE.read_text())
    assert links
    for link in links:
        target, _, anchor = link.partition("#")
        path = (GUIDE.parent / target).resolve() if target else GUIDE
        assert path.exists(), f"{link}: no such file"
        if anchor:
            assert anchor in anchors(path), f"{link}: no such heading"
