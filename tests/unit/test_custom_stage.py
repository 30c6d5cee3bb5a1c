"""Operators' own stages: loading by dotted path, and the worked example in docs/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from spamtrap.config import CustomStageConfig, parse_config
from spamtrap.filters import Discard, Route, run_stages
from spamtrap.filters.custom import StageLoadError, load
from spamtrap.filters.registry import build_stages
from spamtrap.message import Envelope
from spamtrap.work.collate import Collator

DOCS = Path(__file__).parents[2] / "docs"


@pytest.fixture(autouse=True)
def docs_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(DOCS))


def envelope(helo: str | None = None, feed: str | None = None) -> Envelope:
    meta = {"id": ["m1"]}
    if helo is not None:
        meta["helo"] = [helo]
    return Envelope("m1", 0.0, "", ["t@trap.example"], b"Subject: x\r\n\r\n", feed, meta)


def example(**options: object) -> object:
    return load(CustomStageConfig("example", "example_stage:make", dict(options)))


@pytest.mark.parametrize(
    ("helo", "tag"),
    [
        ("[192.0.2.1]", "192.0.2.1"),
        ("192.0.2.1", "192.0.2.1"),  # no brackets: bots do this
        ("[IPv6:2001:DB8::1]", "2001:db8::1"),
        ("mail.example.com", None),
        ("[mail.example.com]", None),
        ("", None),
    ],
)
def test_example_tags_ip_literal_helos(helo: str, tag: str | None) -> None:
    stage = example()
    assert callable(stage)
    env = envelope(helo)
    assert stage(env) is None
    assert env.meta.get("x_helo_literal") == ([tag] if tag else None)


def test_example_without_helo_passes() -> None:
    stage = example()
    assert callable(stage)
    env = envelope()
    assert stage(env) is None
    assert "x_helo_literal" not in env.meta


def test_example_routes_feeds_and_discards_probes() -> None:
    stage = example(feed_sets={"donor1": ["donor1"]}, only=True, discard_helo=["Probe.Example"])
    assert callable(stage)
    assert stage(envelope("x.example", feed="donor1")) == Route(["donor1"], only=True)
    assert stage(envelope("x.example", feed="other")) is None
    assert stage(envelope("probe.example", feed="donor1")) == Discard("probe")


def test_example_through_the_config_and_the_stage_runner() -> None:
    cfg = parse_config(
        "traps: {catch_all: true}\n"
        "feeds: [{id: donor1, address: feed1@trap.example}]\n"
        "sets: {all: {}, donor1: {match: [{meta: feed, regex: '^$never'}]}}\n"
        "filters:\n"
        "  order: [size, example, lists]\n"
        "  custom:\n"
        "    example:\n"
        "      callable: example_stage:make\n"
        "      options: {feed_sets: {donor1: [donor1]}}\n"
    )
    stages = build_stages(cfg, None)
    assert [name for name, _ in stages][:2] == ["size", "example"]
    outcome = run_stages(stages, envelope("[198.51.100.3]", feed="donor1"))
    assert outcome.keep
    ((env, route),) = outcome.survivors
    assert env.meta["x_helo_literal"] == ["198.51.100.3"]
    assert route == Route(["donor1"])
    assert Collator(cfg.sets).sets_for(env) == ["all"]  # the route adds donor1


@pytest.mark.parametrize(
    ("path", "options", "message"),
    [
        ("no_such_module:make", {}, "cannot import 'no_such_module': ModuleNotFoundError"),
        ("example_stage:nothing", {}, "'example_stage' has no attribute 'nothing'"),
        ("example_stage:make", {"colour": "red"}, "unexpected keyword argument 'colour'"),
        ("example_stage:make", {"only": "yes"}, "ValueError: only: expected true or false"),
        ("example_stage:ip_literal", {"helo": "x"}, "returned NoneType, not a stage"),
        ("example_stage:__doc__", {}, "is not callable"),
    ],
)
def test_load_errors_name_the_stage_and_path(path: str, options: dict, message: str) -> None:
    with pytest.raises(StageLoadError) as e:
        load(CustomStageConfig("mine", path, options))
    text = str(e.value)
    assert text.startswith(f"custom stage 'mine' ({path}): ")
    assert message in text


def test_a_module_that_fails_on_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_stage.py").write_text("raise RuntimeError('needs a licence key')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(StageLoadError, match="RuntimeError: needs a licence key"):
        load(CustomStageConfig("b", "broken_stage:make", {}))
    sys.modules.pop("broken_stage", None)


def test_dotted_attribute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "classy_stage.py").write_text(
        "class Stages:\n"
        "    @staticmethod\n"
        "    def tagger(value='v'):\n"
        "        def stage(env):\n"
        "            env.meta['x_tag'] = [value]\n"
        "        return stage\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    stage = load(CustomStageConfig("t", "classy_stage:Stages.tagger", {"value": "w"}))
    env = envelope()
    stage(env)
    assert env.meta["x_tag"] == ["w"]
    sys.modules.pop("classy_stage", None)
