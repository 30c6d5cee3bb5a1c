"""The ``spamtrap`` program as users run it: a real process, its exit
status, its output and what happens when its reader goes away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SPAM = (
    b"Return-Path: <winner@bot.example>\r\n"
    b"From: Winner <winner@bot.example>\r\n"
    b"To: Victim <victim@trap.example>\r\n"
    b"Subject: You won\r\n"
    b"\r\n"
    b"Claim it.\r\n"
)


def test_runs_as_a_program() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "spamtrap.cli.main", "check-config", "etc/spamtrap.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("etc/spamtrap.yaml: OK\n")


def test_a_reader_that_went_away_ends_it_quietly() -> None:
    # `spamtrap check-config FILE | head -0`, deterministically: the pipe's
    # read end is closed before spamtrap writes its first byte.
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "spamtrap", "check-config", "etc/spamtrap.yaml"],
            cwd=ROOT,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (141, "")


def test_explain_as_a_real_command(tmp_path: Path) -> None:
    spam = tmp_path / "spam.eml"
    spam.write_bytes(SPAM)
    missing = str(tmp_path / "missing.eml")
    proc = subprocess.run(
        [sys.executable, "-m", "spamtrap.cli.main", "explain", "--json", str(spam), missing],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    (msg,) = doc["messages"]
    assert (msg["file"], msg["verdict"], msg["sets"]) == (str(spam), "keep", ["all"])
    assert "missing.eml: cannot read" in proc.stderr
