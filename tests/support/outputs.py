"""Exec outputs for the tests of a real node: hook scripts, one that files
each message it is given, and what it filed."""

from __future__ import annotations

from pathlib import Path


def hook(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def filer(tmp_path: Path, name: str, into: Path, extra: str = "") -> Path:
    """A hook that files each message as INTO/<SPAMTRAP_ID> (via a temporary
    name, so a file that exists is complete) and logs each delivery."""
    into.mkdir(parents=True, exist_ok=True)
    return hook(
        tmp_path,
        name,
        extra + f'tmp="{into}/.tmp.$$"\ncat > "$tmp" || exit 75\n'
        f'mv "$tmp" "{into}/$SPAMTRAP_ID"\n'
        f'echo "$SPAMTRAP_ID $SPAMTRAP_SET $SPAMTRAP_OUTPUT" >> "{into}.log"\n',
    )


def filed(into: Path) -> set[str]:
    return {p.name for p in into.glob("*") if not p.name.startswith(".")}
