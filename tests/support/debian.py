"""Building, installing and starting the .deb in tests (root on a clean
machine only; skipped loudly elsewhere, failing in CI)."""

from __future__ import annotations

import configparser
import grp
import os
import pwd
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.node import REPO

PACKAGE = "spamtrap"


CONFIG = Path("/etc/spamtrap/spamtrap.yaml")


STATE = Path("/var/lib/spamtrap")


# Debian's tools, never the venv's or pyenv's python3 that may come first on PATH.
DEBIAN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}


APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300"]


def run(args: list[str], timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a tool with Debian's environment; fail with its output if it fails."""
    kw.setdefault("env", DEBIAN_ENV)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    assert proc.returncode == 0, (
        f"{shlex.join(args)} exited {proc.returncode}:\n" + (proc.stdout + proc.stderr)[-6000:]
    )
    return proc


def dpkg_status() -> str:
    """'' when dpkg does not know the package, else e.g. 'install ok installed'."""
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", PACKAGE],
        capture_output=True,
        text=True,
        env=DEBIAN_ENV,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else ""


def require_root_on_a_clean_machine() -> None:
    problem = ""
    if os.geteuid() != 0:
        problem = "needs root: it installs and purges the .deb"
    elif dpkg_status() or STATE.exists():
        # Never purge someone's real trap and its data.
        problem = f"{PACKAGE} is installed here or {STATE} exists; `apt-get purge {PACKAGE}` first"
    if problem and os.environ.get("CI"):
        pytest.fail(f"CI must not skip: {problem}")
    if problem:
        pytest.skip(f"SKIPPED LOUDLY: {problem}")


def source_tree(dest: Path) -> Path:
    """The repo's files (tracked and new, never ignored ones such as .venv)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        src = REPO / name
        if src.is_file():  # a tracked file may be deleted in the work tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def read_unit(unit: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(unit)
    return parser


def start_as_unit(
    service: configparser.SectionProxy,
    config: Path,
    smtp: int,
    http: int,
    log: Path,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """The unit's ExecStart as its User=/Group=, as systemd would start it."""
    args = shlex.split(service["ExecStart"])
    assert args[0] == "/usr/bin/twistd3" and "--nodaemon" in args
    assert args[args.index("--config") + 1] == str(CONFIG)
    args[args.index("--config") + 1] = str(config)
    args += ["--smtp", f"tcp:{smtp}:interface=127.0.0.1"]
    args += ["--http", f"tcp:{http}:interface=127.0.0.1", *extra]
    user = pwd.getpwnam(service["User"])
    env = {**DEBIAN_ENV, "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name}
    # Popen's user= rather than runuser: SIGTERM then reaches twistd itself
    # (runuser SIGKILLs its child 2 s after a SIGTERM) and its exit status
    # is the one systemd would see.
    with log.open("wb") as out:
        return subprocess.Popen(
            args,
            cwd="/",
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            user=user.pw_uid,
            group=grp.getgrnam(service["Group"]).gr_gid,
            extra_groups=os.getgrouplist(user.pw_name, user.pw_gid),
        )
