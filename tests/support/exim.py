"""A private Exim instance on loopback, for tests that put a real Exim in
front of spamtrap (a donor forwarding its traps).

Debian's ``exim4-daemon-light`` conflicts with the ``postfix`` package as
the system MTA, so it is never installed: ``fetch()`` downloads the .debs
with ``apt-get download`` and unpacks them with ``dpkg-deb -x`` into a
cache directory (``.venv/exim4`` in the repository, or ``$SPAMTRAP_EXIM_DIR``).
Its shared libraries are ones a Debian system has anyway (libc, GnuTLS,
libdb5.3, libpcre2, libidn). Run ``python -m tests.support.exim`` (``make exim``
if the Makefile has the target) to fetch ahead of the tests.

Exim is run as root with ``-C CONFIG -bdf -oX PORT``, listens on 127.0.0.1
only, does no DNS (``host_lookup`` and ``rfc1413_hosts`` empty, a
``manualroute`` router to an IP literal) and keeps spool and logs in its
own directory. One obstacle: Debian builds Exim with its user name compiled
in, and Exim looks ``Debian-exim`` up in the password database before it
reads any configuration, in every process it re-executes. Without the
exim4-base package that user does not exist, and an LD_PRELOAD NSS wrapper
does not help: Exim re-executes itself with a different effective uid, so
the dynamic linker runs it in secure mode and drops LD_PRELOAD. So Exim
runs in a mount namespace of its own (``unshare -m``) in which a private
copy of /etc/passwd and /etc/group, with ``Debian-exim`` as the nobody
user, is bind-mounted over the real ones. Nothing outside that namespace
changes. That needs root (CAP_SYS_ADMIN), as the Postfix tests do.

    with PrivateExim(routers=..., domains="traps.donor.test") as exim:
        ...  # SMTP to 127.0.0.1:exim.port
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.mta import wait_for_banner
from tests.support.node import REPO, free_port, require_binary

PACKAGES = ["exim4-daemon-light", "exim4-base"]
EXIM_USER = "Debian-exim"


def cache_dir() -> Path:
    return Path(os.environ.get("SPAMTRAP_EXIM_DIR") or REPO / ".venv" / "exim4")


def binary_path() -> Path:
    return cache_dir() / "root" / "usr" / "sbin" / "exim4"


def fetch() -> Path:
    """The unpacked exim4 binary, downloading and unpacking it first if needed.

    Raises RuntimeError (with apt-get's words) when it cannot be fetched.
    """
    exim = binary_path()
    if exim.exists():
        return exim
    apt = shutil.which("apt-get")
    dpkg_deb = shutil.which("dpkg-deb")
    if not apt or not dpkg_deb:
        raise RuntimeError("apt-get and dpkg-deb are needed to fetch Exim (a Debian system)")
    base = cache_dir()
    debs = base / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [apt, "download", *PACKAGES], cwd=debs, capture_output=True, text=True, timeout=300
    )
    if r.returncode != 0:
        raise RuntimeError(f"apt-get download {' '.join(PACKAGES)} failed:\n{r.stdout}{r.stderr}")
    # Unpack into a fresh directory and rename it into place: a run killed
    # half-way leaves no half-unpacked tree that looks complete.
    work = Path(tempfile.mkdtemp(prefix="unpack-", dir=base))
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run([dpkg_deb, "-x", str(deb), str(work)], check=True, timeout=120)
    if not (work / "usr" / "sbin" / "exim4").exists():
        raise RuntimeError(f"no usr/sbin/exim4 in {sorted(p.name for p in debs.glob('*.deb'))}")
    shutil.rmtree(base / "root", ignore_errors=True)
    work.rename(base / "root")
    return exim


def require_exim() -> Path:
    """The exim4 binary; skip loudly without it, fail in CI."""
    require_binary("unshare")
    require_binary("mount")
    try:
        exim = fetch()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        msg = f"cannot get Exim: {e}"
        if os.environ.get("CI"):
            pytest.fail(f"CI must not skip: {msg}")
        pytest.skip(f"SKIPPED LOUDLY: {msg}")
    if os.geteuid() != 0:
        msg = "the private Exim needs root (a mount namespace and Exim's -C as root)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must not skip: {msg}")
        pytest.skip(f"SKIPPED LOUDLY: {msg}")
    return exim


def _main_conf(base: Path, exim: Path, hostname: str, domains: str) -> str:
    return f"""\
exim_path = {exim}
exim_user = {EXIM_USER}
exim_group = {EXIM_USER}
primary_hostname = {hostname}
qualify_domain = {hostname}
domainlist local_domains = {domains}
spool_directory = {base}/spool
log_file_path = {base}/log/%slog
local_interfaces = 127.0.0.1
# No DNS, no ident: nothing leaves loopback.
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
never_users =
keep_environment =
acl_smtp_rcpt = acl_check_rcpt

begin acl
acl_check_rcpt:
  accept domains = +local_domains
  deny message = relay not permitted
"""


class PrivateExim:
    """An Exim daemon of its own; use as a context manager or start()/cleanup().

    ``routers`` is the text of the routers section (the donor's redirect
    routers and a manualroute to spamtrap); ``transports`` that of the
    transports section (default: one smtp transport ``remote_smtp``).
    """

    def __init__(
        self,
        routers: str,
        domains: str,
        hostname: str = "mx.donor.test",
        transports: str = "remote_smtp:\n  driver = smtp\n",
        port: int | None = None,
    ) -> None:
        self.exim = require_exim()
        self.port = port or free_port()
        self.hostname = hostname
        # Not under pytest's tmp_path: Exim delivers as the exim user, which
        # must reach the spool, and that tree is private to root.
        self.base = Path(tempfile.mkdtemp(prefix="spamtrap-exim-"))
        self.base.chmod(0o755)
        nobody = pwd.getpwnam("nobody")
        for sub in ("spool", "log"):
            (self.base / sub).mkdir()
            os.chown(self.base / sub, nobody.pw_uid, nobody.pw_gid)
        with open("/etc/passwd") as f:
            passwd = f.read()
        with open("/etc/group") as f:
            group = f.read()
        (self.base / "passwd").write_text(
            passwd.rstrip("\n")
            + f"\n{EXIM_USER}:x:{nobody.pw_uid}:{nobody.pw_gid}:Exim:/nonexistent:"
            + "/usr/sbin/nologin\n"
        )
        (self.base / "group").write_text(group.rstrip("\n") + f"\n{EXIM_USER}:x:{nobody.pw_gid}:\n")
        self.config = self.base / "exim.conf"
        self.config.write_text(
            _main_conf(self.base, self.exim, hostname, domains)
            + "\nbegin routers\n"
            + routers
            + "\nbegin transports\n"
            + transports
            # Retry quickly: a test waits for delivery.
            + "\nbegin retry\n* * F,1m,1s\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        out = []
        for name in ("mainlog", "paniclog", "rejectlog"):
            p = self.base / "log" / name
            if p.exists():
                out.append(f"--- {name}\n" + p.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def _in_namespace(self, *args: str) -> list[str]:
        mounts = (
            f"mount --bind {self.base}/passwd /etc/passwd && "
            f'mount --bind {self.base}/group /etc/group && exec "$@"'
        )
        return ["unshare", "-m", "sh", "-c", mounts, "exim", str(self.exim), *args]

    def check_config(self) -> None:
        r = subprocess.run(
            self._in_namespace("-C", str(self.config), "-bV"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"exim -bV failed ({r.returncode}):\n{r.stdout}{r.stderr}")

    def start(self, deadline: float = 30) -> PrivateExim:
        self.check_config()
        # -bdf: the daemon in the foreground (its pid is ours to stop);
        # -q1s: queue runs every second, for retries.
        args = ["-C", str(self.config), "-bdf", "-oX", str(self.port), "-q1s"]
        self.proc = proc = subprocess.Popen(
            self._in_namespace(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

        def alive() -> None:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise RuntimeError(f"exim exited with {proc.returncode}:\n{out}{self.log()}")

        if wait_for_banner(self.port, deadline, alive):
            return self
        self.stop()
        raise TimeoutError(f"private Exim not answering on port {self.port}:\n{self.log()}")

    def queue_empty(self) -> bool:
        return not any((self.base / "spool" / "input").rglob("*-H"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PrivateExim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


if __name__ == "__main__":
    # Fetch ahead of the tests (a Makefile target can call this).
    try:
        print(fetch())
    except RuntimeError as e:
        print(f"tests.support.exim: {e}", file=sys.stderr)
        sys.exit(1)
