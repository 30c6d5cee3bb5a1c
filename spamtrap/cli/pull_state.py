"""spamtrap pull's state file: cursors, verified bundles and what is
unpacked, written atomically, one pull at a time."""

from __future__ import annotations

import calendar
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from typing import Any

from spamtrap.cli.pull_remote import KEY_TIME, PullError
from spamtrap.store import fsync_dir

STATE_VERSION = 1
UNPACK_TARGETS = ("maildir", "mbox", "wire")


class State:
    """What this destination has: per set the newest cursor seen, per key
    the verified bundle and whether it is unpacked. Written atomically."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.cursors: dict[str, str] = {}
        self.bundles: dict[str, dict[str, Any]] = {}
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise PullError(f"state file {path}: {e}")
        cursors = doc.get("cursors", {}) if isinstance(doc, dict) else None
        bundles = doc.get("bundles", {}) if isinstance(doc, dict) else None
        if (
            not isinstance(doc, dict)
            or doc.get("version") != STATE_VERSION
            or not isinstance(cursors, dict)
            or not isinstance(bundles, dict)
            or not all(isinstance(b, dict) for b in bundles.values())
        ):
            raise PullError(f"state file {path}: not a spamtrap pull state (version 1)")
        for key, entry in bundles.items():
            if "unpacked" in entry or "unpack" in entry:
                entry["unpacked"] = _unpacked(entry, f"state file {path}: {key}")
        self.cursors, self.bundles = cursors, bundles

    def save(self) -> None:
        doc = {"version": STATE_VERSION, "cursors": self.cursors, "bundles": self.bundles}
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        directory = os.path.dirname(os.path.abspath(self.path))
        tmp = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(directory)


def _unpacked(entry: dict[str, Any], what: str) -> dict[str, bool]:
    """A bundle's unpack record: target ("mbox", "maildir", "wire") -> done.
    Older state files kept one target: ``"unpack": T, "unpacked": bool``."""
    unpacked = entry.get("unpacked", {})
    if isinstance(unpacked, bool):
        mode = entry.pop("unpack", None)
        unpacked = {mode: unpacked} if isinstance(mode, str) else {}
    if not isinstance(unpacked, dict) or not all(
        m in UNPACK_TARGETS and isinstance(v, bool) for m, v in unpacked.items()
    ):
        raise PullError(
            f"{what}: 'unpacked' is not a map of {', '.join(UNPACK_TARGETS)} to true/false"
        )
    return unpacked


@contextlib.contextmanager
def locked(state_path: str) -> Iterator[None]:
    """One pull per state file: cron runs must not overlap."""
    with open(state_path + ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise PullError(f"another spamtrap pull is using {state_path}")
        yield


def rewind(cursor: str | None, overlap: float) -> str | None:
    """A cursor ``overlap`` seconds before ``cursor`` (a bare time, which
    sorts before every key of that second); None to list from the start."""
    if not cursor:
        return None
    try:
        t = calendar.timegm(time.strptime(cursor[:19], KEY_TIME))
    except ValueError:
        return None
    return time.strftime(KEY_TIME, time.gmtime(max(0, t - overlap)))
