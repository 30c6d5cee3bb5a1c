"""A real spamd (Debian ``spamd``/``spamassassin``) on loopback, per
docs/recipes.md: the bounce oracle for the agreement test, the integration
tests and the benchmark.

Its site config is the packaged ``*.pre`` files plus a ``local.cf`` that
switches on VBounce's BOUNCE_MESSAGE (which needs some
``welcomelist_bounce_relays``; a host that never occurs does) and switches
off everything that would touch the network or learn: Bayes, RBLs, DNS.
``-L`` (local tests only) as well, so spamd makes no DNS lookups.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.node import free_port, require_binary
from tests.support.poll import wait_until

# use_auto_whitelist (in the recipe) is left out: 4.0 does not load the AWL
# plugin, so spamd only logs that it cannot parse the line.
LOCAL_CF = """\
welcomelist_bounce_relays relay.trap.invalid
use_bayes 0
skip_rbl_checks 1
dns_available no
"""
SITE_PRE = Path("/etc/spamassassin")


@dataclass
class SpamdServer:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    host: str = "127.0.0.1"

    def ping(self, timeout: float = 5) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as s:
                s.sendall(b"PING SPAMC/1.5\r\n\r\n")
                return b" 0 PONG" in s.recv(100)
        except OSError:
            return False

    def log(self) -> str:
        path = self.workdir / "spamd.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def stop(self, timeout: float = 30) -> None:
        # spamd was started in a session of its own: signal its process group,
        # so that no child outlives the test.
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # any child left behind
        except ProcessLookupError:
            pass


def write_siteconfig(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for pre in sorted(SITE_PRE.glob("*.pre")):
        shutil.copy(pre, directory / pre.name)
    (directory / "local.cf").write_text(LOCAL_CF)
    return directory


def start_spamd(
    spamd: str, workdir: Path, children: int = 3, deadline: float = 120
) -> SpamdServer:
    """Start spamd on a free loopback port and wait until it answers PING."""
    site = write_siteconfig(workdir / "site")
    # The children run as nobody (when we are root): they must be able to
    # read the site config.
    for path in (workdir, site, *site.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    port = free_port()
    args = [
        spamd, f"--siteconfigpath={site}", "-L", "-x", "-i", "127.0.0.1", "-p", str(port),
        "--max-children", str(children), "-s", "stderr",
    ]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]
    with open(workdir / "spamd.log", "wb") as logfile:
        proc = subprocess.Popen(
            args, cwd=workdir, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = SpamdServer(proc, port, workdir)
    # Polls a real process: there is no clock to inject across a fork.
    def pong() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"spamd exited with {proc.returncode}:\n{server.log()}")
        return server.ping(timeout=2)

    try:
        wait_until(pong, deadline, "spamd to answer PING", interval=0.2)
    except TimeoutError as e:
        server.stop()
        raise TimeoutError(f"spamd did not answer PING in {deadline}s:\n{server.log()}") from e
    return server


@contextmanager
def running_spamd(
    spamd: str | None = None, workdir: Path | None = None, children: int = 3
) -> Iterator[SpamdServer]:
    """A spamd for the duration of the block (for scripts as well as tests)."""
    spamd = spamd or shutil.which("spamd") or shutil.which("spamd", path="/usr/sbin:/sbin")
    if spamd is None:
        raise FileNotFoundError("spamd is not installed (apt-get install spamassassin spamd)")
    with tempfile.TemporaryDirectory(prefix="spamd-") as tmp:
        server = start_spamd(spamd, workdir or Path(tmp), children)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def spamd_server() -> Iterator[SpamdServer]:
    """A real spamd with 3 children, shared by a test module; skips loudly
    without the Debian packages (fails in CI)."""
    spamd = require_binary("spamd")
    with running_spamd(spamd) as server:
        yield server
