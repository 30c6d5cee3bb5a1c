"""A private Postfix instance on loopback, for tests that put a real MTA in
front of spamtrap (MX delegation, alias forwarding).

The instance has its own config_directory, queue_directory and
data_directory in a fresh temporary directory, listens on 127.0.0.1 only,
does no DNS at all (IP literals everywhere, no peer-name lookup) and logs to
a file of its own. It is started with ``postfix -c DIR start`` and stopped
with ``postfix -c DIR stop``; nothing of the machine's own Postfix is used
but the binaries.

    mta = PrivatePostfix(main={"relay_domains": "trap.example",
                               "transport_maps": "inline:{ trap.example=smtp:[127.0.0.1]:2525 }"})
    with mta:
        ...  # SMTP to 127.0.0.1:mta.port

``main`` overrides or adds main.cf parameters; ``master`` adds master.cf
lines (e.g. a second smtpd, or a pipe transport). The defaults relay
nothing and deliver nothing locally.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from tests.support.node import free_port, require_binary
from tests.support.poll import wait_until

# Daemons a relay needs; chroot off (a chroot needs copies of system files).
_MASTER_CF = """\
{port}      inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def wait_for_banner(port: int, deadline: float, alive: Callable[[], None] = lambda: None) -> bool:
    """Whether an SMTP server on 127.0.0.1:``port`` greets with 220 within
    ``deadline`` seconds. ``alive`` raises if the server process died.
    Polls a real process's port: there is no clock to inject across a fork."""
    def greets() -> bool:
        alive()
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(100).startswith(b"220")

    try:
        wait_until(greets, deadline, f"a 220 on port {port}", interval=0.1, retry_on=(OSError,))
    except TimeoutError:
        return False
    return True


def _main_cf(base: Path) -> dict[str, str]:
    return {
        "compatibility_level": "3.6",
        "config_directory": str(base / "etc"),
        "queue_directory": str(base / "queue"),
        "data_directory": str(base / "data"),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "maillog_file": str(base / "maillog"),
        "maillog_file_prefixes": str(base),
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "myhostname": "mx1.relay.test",
        "mydomain": "relay.test",
        "myorigin": "$myhostname",
        "mydestination": "",
        "mynetworks": "127.0.0.0/8",
        "relay_domains": "",
        "relayhost": "",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_recipient_restrictions": "",
        # No DNS anywhere: IP literals for next hops, no client name lookup.
        "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "smtpd_peername_lookup": "no",
        "smtp_tls_security_level": "none",
        "smtpd_tls_security_level": "none",
        "biff": "no",
        "append_dot_mydomain": "no",
        "smtputf8_enable": "no",
        # Retry quickly: a test waits for delivery.
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "smtp_connect_timeout": "5s",
    }


class PrivatePostfix:
    """A Postfix instance of its own; use as a context manager or start()/stop()."""

    def __init__(
        self,
        main: dict[str, str] | None = None,
        master: str = "",
        port: int | None = None,
    ) -> None:
        self.postfix = require_binary("postfix")
        self.port = port or free_port()
        # Not under pytest's tmp_path: Postfix daemons run as the postfix user
        # and must reach the queue, and that tree is private to root.
        self.base = Path(tempfile.mkdtemp(prefix="spamtrap-postfix-"))
        self.base.chmod(0o755)
        self.config_dir = self.base / "etc"
        self.config_dir.mkdir()
        (self.base / "data").mkdir()
        (self.base / "queue").mkdir()
        shutil.chown(self.base / "data", "postfix", "postfix")
        params = _main_cf(self.base)
        params.update(main or {})
        (self.config_dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in params.items()))
        (self.config_dir / "master.cf").write_text(_MASTER_CF.format(port=self.port) + master)
        self.running = False

    @property
    def log_path(self) -> Path:
        return self.base / "maillog"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.postfix, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, MAIL_CONFIG=str(self.config_dir)),
        )

    def start(self, deadline: float = 30) -> PrivatePostfix:
        r = self._run("start")
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        self.running = True
        if wait_for_banner(self.port, deadline):
            return self
        self.stop()
        raise TimeoutError(f"private Postfix not answering on port {self.port}:\n{self.log()}")

    def queue_empty(self) -> bool:
        queue = self.base / "queue"
        return not any(
            p.is_file() for d in ("incoming", "active", "deferred") for p in (queue / d).rglob("*")
        )

    def stop(self) -> None:
        if not self.running:
            return
        pid_file = self.base / "queue" / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        self._run("stop")
        self.running = False
        # master exits asynchronously (and leaves its pid file): wait for it,
        # so that the queue can be removed and the port reused.
        if pid is None:
            return

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        with contextlib.suppress(TimeoutError):  # as before: a master that hangs is left
            wait_until(gone, 30, "postfix's master to exit")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PrivatePostfix:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
