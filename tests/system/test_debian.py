"""The Debian package, for real: build, lintian, install, run, upgrade, remove, purge.

It proves that spamtrap runs on bookworm's own python3-twisted, python3-treq,
python3-yaml and python3-botocore (``apt-get install ./spamtrap_*.deb`` pulls
them in), not only on the newest releases in the venv. Systemd does not run
in CI, so the unit's ExecStart is run by hand as the unit's User=, the way
systemd would run it.

Needs root and the build tools (Build-Depends in debian/control, lintian,
swaks). It installs and purges the package ``spamtrap`` on this machine and
refuses to run where spamtrap is already installed.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import pwd
import re
import shutil
import signal
import socket
import subprocess
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from spamtrap.bundle.mbox import read_mbox
from spamtrap.store import MANIFEST_SUFFIX
from tests.support.debian import (
    APT,
    CONFIG,
    DEBIAN_ENV,
    PACKAGE,
    STATE,
    dpkg_status,
    read_unit,
    require_root_on_a_clean_machine,
    run,
    source_tree,
    start_as_unit,
)
from tests.support.node import REPO, free_port, require_binary, wait_for_port
from tests.support.poll import wait_until
from tests.support.redis_server import RedisServer

DIST = "/usr/lib/python3/dist-packages"


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def trap_address() -> tuple[str, Path]:
    """A recipient the packaged config traps, and the config file to run with.

    The packaged /etc file itself when it has a trap domain (it does); else a
    copy with one added, in the state directory, where the service user can
    read it and purge removes it.
    """
    cfg = yaml.safe_load(CONFIG.read_text())
    domains = (cfg.get("traps") or {}).get("domains") or []
    if domains:
        return f"anything@{domains[0]}", CONFIG
    cfg.setdefault("traps", {})["domains"] = ["debian-test.trap.example"]
    override = STATE / "test-override.yaml"
    override.write_text(yaml.safe_dump(cfg))
    override.chmod(0o644)
    return "anything@debian-test.trap.example", override


def http_get(port: int, path: str) -> bytes:
    url = f"http://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback only
        body: bytes = response.read()
    return body


def stored_message(token: str) -> tuple[Path, bytes, dict[str, Any]]:
    """The bundle in set 'all' holding the message with this token, the message, the manifest."""
    found = [
        (path, msg)
        for path in sorted((STATE / "bundles" / "all").glob("*.mbox.gz"))
        for _, msg in read_mbox(str(path))
        if token.encode() in msg
    ]
    assert len(found) == 1, f"token in {found} of {list((STATE / 'bundles').rglob('*'))}"
    path, msg = found[0]
    manifest = path.with_name(path.name[: -len(".mbox.gz")] + MANIFEST_SUFFIX)
    return path, msg, json.loads(manifest.read_text())


def test_setup_cfg_lists_every_package() -> None:
    """The wheel, and so the .deb, holds only the packages setup.cfg names."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "spamtrap").rglob("__init__.py")
    }
    assert on_disk - listed == set(), "add these to [options] packages in setup.cfg"
    assert "twisted.plugins" in listed


def build_and_lint(tmp: Path) -> Path:
    """Build the .deb from a copy of the tree (the .deb lands beside it); lintian it."""
    src = source_tree(tmp / "build" / PACKAGE)
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, timeout=1200)
    (deb,) = (tmp / "build").glob(f"{PACKAGE}_*_all.deb")
    (changes,) = (tmp / "build").glob(f"{PACKAGE}_*.changes")
    lint = run(["lintian", "--fail-on", "error", str(changes)])
    assert not [ln for ln in lint.stdout.splitlines() if ln.startswith("E:")], lint.stdout
    return deb


def check_installed_layout() -> configparser.SectionProxy:
    """Files, conffile, user and state dir; returns the unit's [Service]."""
    files = run(["dpkg", "-L", PACKAGE]).stdout.split()
    plugins = f"{DIST}/twisted/plugins"
    assert f"{plugins}/spamtrap_plugin.py" in files
    assert f"{plugins}/spamtrap_endpoints.py" in files
    assert not [f for f in files if f.endswith("dropin.cache")]
    assert f"{DIST}/twisted/__init__.py" not in files
    assert f"{plugins}/__init__.py" not in files
    conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", PACKAGE]).stdout
    assert str(CONFIG) in conffiles
    assert user_exists("spamtrap")
    assert STATE.stat().st_uid == pwd.getpwnam("spamtrap").pw_uid

    (unit,) = [p for p in files if p.endswith("/systemd/system/spamtrap.service")]
    parsed = read_unit(unit)
    for doc in parsed["Unit"]["Documentation"].split():
        assert not doc.startswith("file:") or Path(doc[5:]).is_file(), doc
    service = parsed["Service"]
    assert service["User"] == "spamtrap" and service["StateDirectory"] == "spamtrap"
    if shutil.which("systemd-analyze", path=DEBIAN_ENV["PATH"]):
        checked = run(["systemd-analyze", "verify", unit])
        assert "spamtrap.service" not in checked.stdout + checked.stderr
    return service


def check_template_unit() -> None:
    """spamtrap@.service is shipped as is, and no instance is enabled or started:
    the operator chooses them (docs/debian.md, "Several processes per machine")."""
    files = run(["dpkg", "-L", PACKAGE]).stdout.split()
    (template,) = [p for p in files if p.endswith("/systemd/system/spamtrap@.service")]
    assert Path(template).read_bytes() == (REPO / "debian" / "spamtrap@.service").read_bytes()
    # deb-systemd-helper enables the single service even where systemd does
    # not run; the same mechanism must leave every instance alone.
    wants = Path("/etc/systemd/system")
    assert (wants / "multi-user.target.wants" / "spamtrap.service").is_symlink()
    assert not list(wants.rglob("spamtrap@*")), list(wants.rglob("spamtrap@*"))
    # Nor do the maintainer scripts ever enable, start or stop one.
    for script in ("preinst", "postinst", "prerm", "postrm"):
        path = Path(f"/var/lib/dpkg/info/{PACKAGE}.{script}")
        lines = path.read_text().splitlines() if path.exists() else []
        assert not [ln for ln in lines if "deb-systemd-" in ln and "spamtrap@" in ln], path
    if shutil.which("systemd-analyze", path=DEBIAN_ENV["PATH"]):
        instance = str(Path(template).with_name("spamtrap@1.service"))
        checked = run(["systemd-analyze", "verify", instance])
        assert "spamtrap" not in checked.stdout + checked.stderr


def check_queue_roles(
    service: configparser.SectionProxy, config: Path, rcpt: str, tmp: Path
) -> None:
    """A listener and a worker through a real Redis, on bookworm's
    python3-redis (the oldest redis-py the package accepts)."""
    redis = RedisServer(tmp / "redis").start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        smtp, logs = free_port(), [tmp / "listener.log", tmp / "worker.log"]
        http = [free_port(), free_port()]
        queue = ("--queue", redis.url)
        procs.append(
            start_as_unit(
                service,
                config,
                smtp,
                http[0],
                logs[0],
                ("--role", "listener", "--node", "deb-l", *queue),
            )
        )
        procs.append(start_as_unit(service, config, free_port(), http[1], logs[1],
                                   ("--role", "worker", "--node", "deb-w", *queue)))  # fmt: skip
        try:
            wait_for_port("127.0.0.1", smtp, procs[0])
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}\n{logs[0].read_text(errors='replace')}") from None
        token = uuid.uuid4().hex
        queue_id = send_with_swaks(smtp, rcpt, token)
        assert re.search(rb"(?m)^spamtrap_queue_added_total 1\.0$", http_get(http[0], "/metrics"))
        # Real processes from the .deb: poll the worker's metrics, with a deadline.
        read = re.compile(rb"(?m)^spamtrap_queue_read_total\{how=\"new\"\} 1\.0$")
        try:
            wait_until(lambda: read.search(http_get_or_empty(http[1], "/metrics")), 60)
        except TimeoutError:
            raise AssertionError(logs[1].read_text(errors="replace")) from None
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == -signal.SIGTERM
        bundle, message, _ = stored_message(token)
        assert ".deb-w." in bundle.name
        assert f"X-Spamtrap-Id: {queue_id}\n".encode() in message
        assert int(redis.command("XLEN", "spamtrap")) == 0  # acked and deleted
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        redis.stop()


def http_get_or_empty(port: int, path: str) -> bytes:
    try:
        return http_get(port, path)
    except OSError:
        return b""  # not listening yet


def check_system_python() -> None:
    """The service user's python3 is Debian's, with Debian's Twisted."""
    code = "import spamtrap, twisted; print(spamtrap.__file__, twisted.__version__)"
    probe = run(["runuser", "-u", "spamtrap", "--", "python3", "-c", code], cwd="/")
    path, version = probe.stdout.split()
    assert path == f"{DIST}/spamtrap/__init__.py"
    debian_twisted = run(["dpkg-query", "-W", "-f=${Version}", "python3-twisted"]).stdout
    assert debian_twisted.startswith(version + "-"), (version, debian_twisted)


def send_with_swaks(port: int, rcpt: str, token: str) -> str:
    """One message over STARTTLS (bookworm's pyOpenSSL); returns the queue id."""
    sent = run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--to", rcpt, "--from", "bot@spam.example"]
        + ["--helo", "swaks.example", "--tls", "--timeout", "60"]
        + ["--header", f"Subject: debian {token}", "--body", f"token {token}"]
    ).stdout
    queue_id = re.search(r"<~  250 .*queued as (\S+)", sent)
    assert queue_id, sent
    return queue_id.group(1)


def check_bad_starts(service: configparser.SectionProxy, tmp: Path) -> None:
    """A bad config or an unknown option: the errors, and exit 1 (bookworm's
    twistd3 itself exits 0 after a usage error: systemd would see no failure).
    A port in use: one line, and exit 1."""
    bad = STATE / "test-bad.yaml"
    bad.write_text("traps: {domains: [a.example]}\nsmtp: {max_message_size: lots}\n")
    bad.chmod(0o644)
    cases = [
        (["--config", str(bad)], f"{bad}:2: smtp.max_message_size: not a size: 'lots'"),
        (["--no-such-option"], "option --no-such-option not recognized"),
    ]
    try:
        for extra, error in cases:
            log = tmp / "bad-start.log"
            proc = start_as_unit(service, CONFIG, free_port(), free_port(), log, tuple(extra))
            assert proc.wait(timeout=60) == 1, log.read_text(errors="replace")
            text = log.read_text(errors="replace")
            assert error in text and "Traceback" not in text, text
        # A port in use: one line, no traceback (22.4 added ReactorNotRunning), exit 1.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            log = tmp / "port-in-use.log"
            proc = start_as_unit(service, CONFIG, port, free_port(), log)
            assert proc.wait(timeout=60) == 1, log.read_text(errors="replace")
        text = log.read_text(errors="replace")
        problems = [ln for ln in text.splitlines() if re.search(r"#(warn|error|critical)\]", ln)]
        assert len(problems) == 1 and "Address already in use; exiting" in problems[0], text
        for noise in ("Traceback", "ReactorNotRunning", " started as ", "stopped"):
            assert noise not in text, text
    finally:
        bad.unlink()


def check_packaged_config_stays_local(log: Path, metrics: bytes) -> None:
    """The conffile as installed notifies nobody, so the run on it made no
    DNS lookup and no relay connection, and logged no problem."""
    cfg = yaml.safe_load(CONFIG.read_text())
    for name, options in (cfg.get("sets") or {}).items():
        notify = (options or {}).get("notify") or {}
        assert not notify.get("mail") and not notify.get("webhooks"), name
    for endpoint in cfg["smtp"]["listen"] + [cfg["http"]["listen"]]:
        assert "interface=127.0.0.1" in endpoint, endpoint
    assert not re.search(rb"(?m)^spamtrap_notifications_total\{.*\} [1-9]", metrics), metrics
    text = log.read_text(errors="replace")
    problems = [ln for ln in text.splitlines() if re.search(r"#(warn|error|critical)\]", ln)]
    assert problems == [], text
    assert not re.search(r"notif|webhook|relay|Traceback", text, re.I), text
    assert "stopped cleanly; the spool is empty" in text, text


def changed_package(deb: Path, tmp: Path) -> tuple[Path, str]:
    """The .deb again as a newer version whose conffile changed too (no
    second build): what an upgrade with a new example looks like."""
    root = tmp / "repack"
    run(["dpkg-deb", "-R", str(deb), str(root)])
    control = root / "DEBIAN" / "control"
    version = re.search(r"(?m)^Version: (\S+)$", control.read_text())
    assert version, control.read_text()
    newer = version.group(1) + "+conffile1"
    text = control.read_text()
    control.write_text(text.replace(f"Version: {version.group(1)}", f"Version: {newer}"))
    packaged = root / str(CONFIG).lstrip("/")
    packaged.write_text(packaged.read_text() + "# a change in the newer package\n")
    out = tmp / f"{PACKAGE}_{newer}_all.deb"
    run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(out)])
    return out, newer


def check_conffile_upgrade_recipe(deb: Path, tmp: Path) -> None:
    """docs/debian.md's recipe: a locally changed conffile, a package whose
    conffile changed too; no prompt (stdin is not a terminal), ours kept,
    the package's beside it. Both ways: apt-get, then dpkg -i back."""
    local = f"# changed here {uuid.uuid4().hex}\n"
    CONFIG.write_text(CONFIG.read_text() + local)
    newer, version = changed_package(deb, tmp)
    keep = ["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
    dist = Path(f"{CONFIG}.dpkg-dist")
    for command, newest in (
        ([*APT, *keep, "install", str(newer)], True),
        (["dpkg", "--force-confdef", "--force-confold", "-i", str(deb)], False),
    ):
        run(command, stdin=subprocess.DEVNULL, timeout=600)
        assert dpkg_status() == "install ok installed"
        installed = run(["dpkg-query", "-W", "-f=${Version}", PACKAGE]).stdout
        assert (installed == version) == newest, installed
        assert CONFIG.read_text().endswith(local), "the local change was lost"
        # The package's own version is kept beside it, for a diff.
        assert ("# a change in the newer package" in dist.read_text()) == newest


@pytest.mark.slow
@pytest.mark.needs_debian
def test_deb_builds_installs_runs_on_bookworm_python_and_purges(tmp_path: Path) -> None:
    for tool in ("dpkg-buildpackage", "lintian", "apt-get", "swaks", "git"):
        require_binary(tool)
    require_root_on_a_clean_machine()
    proc: subprocess.Popen[bytes] | None = None
    try:
        deb = build_and_lint(tmp_path)
        run([*APT, "install", str(deb)])
        service = check_installed_layout()
        check_template_unit()
        check_system_python()
        check_bad_starts(service, tmp_path)

        rcpt, config = trap_address()
        smtp, http, log = free_port(), free_port(), tmp_path / "twistd.log"
        proc = start_as_unit(service, config, smtp, http, log)
        try:
            wait_for_port("127.0.0.1", smtp, proc)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}\n{log.read_text(errors='replace')}") from None
        token = uuid.uuid4().hex
        queue_id = send_with_swaks(smtp, rcpt, token)
        # HTTP and bookworm's prometheus-client: the 250 was counted.
        health = json.loads(http_get(http, "/healthz"))
        assert health["status"] == "ok" and health["node"]
        metrics = http_get(http, "/metrics")
        assert re.search(rb"(?m)^spamtrap_messages_accepted_total 1\.0$", metrics), metrics
        # SIGTERM is `systemctl stop`: drain and store, then twistd re-raises
        # SIGTERM, which systemd counts as a clean exit.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == -signal.SIGTERM, log.read_text(errors="replace")
        proc = None
        # The run must have been on the conffile as packaged, or the check
        # below would prove nothing about what users install.
        assert config == CONFIG, f"the packaged {CONFIG} has no trap domain; ran on {config}"
        check_packaged_config_stays_local(log, metrics)

        bundle, message, manifest = stored_message(token)
        assert bundle.stat().st_uid == pwd.getpwnam("spamtrap").pw_uid
        assert manifest["set"] == "all" and manifest["size"] == bundle.stat().st_size
        assert manifest["sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
        assert f"X-Spamtrap-Id: {queue_id}\n".encode() in message
        assert re.search(rb"X-Spamtrap-TLS: TLSv1\.[23] ", message), message[:2000]

        check_queue_roles(service, config, rcpt, tmp_path)

        # Upgrade (a newer version, and back) keeps the data and, with the
        # documented options, a locally changed conffile; remove keeps both.
        check_conffile_upgrade_recipe(deb, tmp_path)
        assert bundle.exists()
        run([*APT, "remove", PACKAGE])
        assert dpkg_status() == "deinstall ok config-files"
        assert bundle.exists() and CONFIG.exists() and user_exists("spamtrap")

        run([*APT, "purge", PACKAGE])
        assert dpkg_status() == ""
        assert not STATE.exists() and not CONFIG.exists() and not user_exists("spamtrap")
        assert not list(CONFIG.parent.glob("spamtrap.yaml.dpkg-*"))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if dpkg_status():
            subprocess.run([*APT, "purge", PACKAGE], env=DEBIAN_ENV, capture_output=True)
