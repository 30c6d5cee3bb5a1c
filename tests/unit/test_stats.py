"""``spamtrap stats`` over index files: counting, periods, --since, output,
progress, and clear errors (file and line) for bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from spamtrap.cli.main import main
from spamtrap.cli.stats import Progress, StatsError, parse_since
from tests.support.stats import T, message, stats, write_index

HOUR = 3600.0


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "bundles"
    write_index(
        root,
        "all",
        T,
        [message(T + i, "c1", "bot.example", "192.0.2.1") for i in range(3)]
        + [message(T + 10, "c2", "other.example", "192.0.2.2", "d2")],
    )
    write_index(
        root,
        "all",
        T + HOUR,
        [message(T + HOUR + 5, None, "bot.example", "192.0.2.1")]
        + [message(T + 25 * HOUR, "c2", "bot.example", "192.0.2.3")],
    )
    write_index(root, "private", T, [message(T + 1, "c9", "p.example", "198.51.100.1")])
    return root


def test_json_counts_the_top_values_per_hour(store: Path) -> None:
    code, out, err = stats("--json", str(store), "--set", "all")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert (doc["indexes"], doc["messages"], doc["errors"], doc["by"]) == (2, 6, 0, "hour")
    first, second, third = doc["periods"]
    assert first["period"] == "2026-11-23T13" and first["messages"] == 4
    assert first["campaigns"] == [{"value": "c1", "count": 3}, {"value": "c2", "count": 1}]
    assert first["dialects"] == [{"value": "d1", "count": 3}, {"value": "d2", "count": 1}]
    assert first["helos"][0] == {"value": "bot.example", "count": 3}
    assert first["peers"] == [
        {"value": "192.0.2.1", "count": 3},
        {"value": "192.0.2.2", "count": 1},
    ]
    assert second["campaigns"] == [{"value": None, "count": 1}]  # no campaign assigned
    assert third["period"] == "2026-11-24T14"


def test_by_day_since_and_top(store: Path) -> None:
    code, out, _ = stats(
        "--json", "--by", "day", "--top", "1", "--since", "2026-11-23T14", str(store)
    )
    doc = json.loads(out)
    assert code == 0 and doc["since"] == "2026-11-23T14"
    assert [(p["period"], p["messages"]) for p in doc["periods"]] == [
        ("2026-11-23", 1),
        ("2026-11-24", 1),
    ]
    assert all(len(p["helos"]) == 1 for p in doc["periods"])


def test_text_output_names_periods_and_counts(store: Path) -> None:
    code, out, _ = stats(str(store / "private"))  # a set's own directory
    assert code == 0
    assert out.splitlines()[0] == "2026-11-23 13:00Z  1 messages"
    assert "  campaigns         1  c9" in out
    assert "  peers             1  198.51.100.1" in out
    assert out.rstrip().endswith("1 messages in 1 indexes")


def test_a_corrupt_line_is_named_and_the_rest_still_counted(store: Path) -> None:
    bad = write_index(store, "all", T + 2 * HOUR, [message(T, "c1", "h", "p"), b'!{"offset": 1\n'])
    code, out, err = stats("--json", str(store), "--set", "all")
    assert code == 1
    assert f"{bad}:2: not JSON" in err and "Traceback" not in err
    doc = json.loads(out)
    assert doc["errors"] == 1 and doc["indexes"] == 3
    assert doc["messages"] == 7  # the bad index's first line counted, the other two indexes whole


def test_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    code, out, err = stats(str(tmp_path / "nope"))
    assert (code, out) == (2, "")
    assert err == f"spamtrap stats: {tmp_path / 'nope'}: no such directory\n"


def test_an_empty_store_says_so(tmp_path: Path) -> None:
    code, out, err = stats(str(tmp_path))
    assert code == 0 and "no bundle indexes found" in err
    assert out.strip() == "0 messages in 0 indexes"


def test_since_skips_bundles_whose_manifest_ends_before_it(tmp_path: Path) -> None:
    write_index(tmp_path, "all", T, [b"!garbage\n"], last_received="2026-11-23T13:40:00Z")
    write_index(tmp_path, "all", T + HOUR, [message(T + HOUR, "c1", "h", "p")])
    code, out, err = stats("--json", "--since", "2026-11-23T14:00", str(tmp_path))
    assert (code, err) == (0, "")  # the old, damaged index was never read
    assert json.loads(out)["messages"] == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-22", "2026-11-22"),
        ("2026-11-22T13", "2026-11-22T13"),
        ("2026-11-22T13:30:00Z", "2026-11-22T13:30:00"),
        ("90m", "2026-11-23T12:01:15"),
        ("1d", "2026-11-22T13:31:15"),
    ],
)
def test_since_takes_a_time_or_an_age(text: str, expected: str) -> None:
    assert parse_since(text, T) == expected


@pytest.mark.parametrize("text", ["yesterday", "2026-13-45", "24x", "2026-11-22 13:00"])
def test_a_bad_since_is_a_usage_error(text: str, tmp_path: Path) -> None:
    with pytest.raises(StatsError) as e:
        parse_since(text, T)
    assert e.value.usage
    code, _, err = stats("--since", text, str(tmp_path))
    assert code == 2 and err.startswith("spamtrap stats: --since")


def test_progress_shows_only_on_long_runs() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(stream, clock=lambda: now[0])
    progress.step(1, 100, 10)
    now[0] = 1.9
    progress.step(2, 100, 20)
    assert stream.getvalue() == ""  # short runs stay quiet
    now[0] = 2.5
    progress.step(3, 100, 30)
    now[0] = 3.0
    progress.step(4, 100, 40)  # not a terminal: a line every 10 s at most
    assert stream.getvalue() == "spamtrap stats: 3/100 indexes, 30 messages\n"


def test_the_stats_subcommand_is_wired_in(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--json", str(store)]) == 0
    assert json.loads(capsys.readouterr().out)["indexes"] == 3
    assert main(["stats", "--set", "../x", str(store)]) == 2
    assert "invalid set name" in capsys.readouterr().err
