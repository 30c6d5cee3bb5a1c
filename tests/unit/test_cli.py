"""The ``spamtrap`` command line: check-config and the bare command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from spamtrap.cli.main import main

ROOT = Path(__file__).parents[2]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spamtrap.yaml"
    path.write_text(text)
    return str(path)


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        "traps: {domains: [a.example, b.example], patterns: ['^x-']}\n"
        "feeds: [{id: d1, address: d1@a.example}]\n"
        "sets:\n  all: {}\n  spread: {shards: 4}\n",
    )
    assert main(["check-config", path]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{path}: OK",
        "  traps: 2 domains, 0 addresses, 1 pattern; feeds: 1; sets: all, spread (4 shards)",
    ]
    assert err == ""


def test_check_config_lists_every_error_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        "traps:\n"
        "  domains: [trap.example]\n"
        "smtp:\n"
        "  max_message_size: lots\n"
        "  listen: nowhere\n"
        "filters: {workers: -1, max_sise: 1}\n",
    )
    assert main(["check-config", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}:4: smtp.max_message_size: not a size: 'lots' (use e.g. 512, 64KiB, 8MiB, 1GiB)",
        f"{path}:5: smtp.listen: not an endpoint description: 'nowhere' (expected TYPE:ARGS,"
        " e.g. 'tcp:2525' or 'tcp:25:interface=127.0.0.1')",
        f"{path}:6: filters.workers: must be at least 0, got -1",
        f"{path}:6: filters.max_sise: unknown key 'max_sise'; did you mean 'max_size'?",
    ]


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "absent.yaml")
    assert main(["check-config", path]) == 1
    out, err = capsys.readouterr()
    assert err == f"{path}: cannot read: No such file or directory\n"
    assert "Traceback" not in out + err


def test_check_config_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"{tmp_path}: cannot read: Is a directory\n"


def test_no_subcommand_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("usage: spamtrap")


def test_usage_errors_return_2_without_exiting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 2  # FILE missing
    assert main(["no-such-command"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_returns_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "check-config" in capsys.readouterr().out


def test_a_broken_pipe_in_process_returns_141(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class Gone:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Gone())
    assert main(["check-config", write(tmp_path, "traps: {catch_all: true}\n")]) == 141
