"""debian/spamtrap@.service: one spamtrap process per core, for real.

systemd does not run here, so the template is checked twice over: by
``systemd-analyze verify`` (it is a valid unit), and by running its ExecStart
for two instances the way systemd would expand it (specifiers, the
per-instance EnvironmentFile and $SPAMTRAP_ARGS), both sharing one
``reuseport:`` SMTP port and one data directory."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from spamtrap.bundle.mbox import read_mbox
from spamtrap.store import MANIFEST_SUFFIX
from tests.support.node import REPO, TWISTD, RawSMTP, SMTPError, free_port, require_binary
from tests.support.poll import wait_until
from tests.support.systemd_units import SINGLE, TEMPLATE, one, parse_unit, values

HOST = "trapbox"  # stands for %l, the short host name
INSTANCES = ("1", "2")


def expand_specifiers(text: str, instance: str) -> str:
    """The specifiers the template may use; any other one fails the test."""
    known = {"i": instance, "I": instance, "l": HOST, "%": "%"}

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in known, f"unexpected specifier %{m.group(1)} in {text!r}"
        return known[m.group(1)]

    return re.sub(r"%(.)", sub, text)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, the value maybe in double quotes; '#' and ';'
    comments (systemd.exec(5), EnvironmentFile=). Enough for what docs/debian.md
    shows, not every escape systemd knows."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and line[0] not in "#;":
            key, _, value = line.partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            env[key.strip()] = value
    return env


def expand_command(words: list[str], env: dict[str, str]) -> list[str]:
    """systemd's rules: a lone $NAME splits into words, ${NAME} is one word."""
    out: list[str] = []
    for word in words:
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            out += env.get(whole.group(1), "").split()
        else:
            out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return out


def under(root: Path, path: str) -> Path:
    """An absolute path of the real system, moved under a test root."""
    assert path.startswith("/"), path
    return root / path.lstrip("/")


def test_template_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    units = tmp_path / "units"
    units.mkdir()
    template = TEMPLATE.read_text()
    if not Path("/usr/bin/twistd3").exists():
        # verify insists that ExecStart's program exists; python3-twisted
        # provides it. Elsewhere, check everything else with the venv's.
        template = template.replace("/usr/bin/twistd3", str(TWISTD))
    (units / TEMPLATE.name).write_text(template)
    # Conflicts= names the single service: give verify the real one.
    shutil.copy(SINGLE, units)
    # --man=no: man:spamtrap(1) exists only once the package is installed
    # (tests/system/test_debian.py verifies the installed units with it).
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(units / "spamtrap@1.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # Unknown keys and bad values are only warnings: none may name our units.
    assert "spamtrap" not in out, out


def command_for(instance: str, root: Path) -> list[str]:
    """The template's ExecStart for one instance, expanded as systemd would,
    with /usr/bin/twistd3 replaced by the venv's twistd and paths under root."""
    unit = parse_unit(TEMPLATE)
    env: dict[str, str] = {}
    for assignment in values(unit, "Service", "Environment"):
        key, _, value = expand_specifiers(assignment, instance).partition("=")
        env[key] = value
    for ref in values(unit, "Service", "EnvironmentFile"):
        path = under(root, expand_specifiers(ref.removeprefix("-"), instance))
        if path.exists() or not ref.startswith("-"):
            env.update(read_env_file(path))
    args = expand_command(
        shlex.split(expand_specifiers(one(unit, "Service", "ExecStart"), instance)), env
    )
    assert args[0] == "/usr/bin/twistd3", args
    args[0] = str(TWISTD)
    config = args.index("--config") + 1
    args[config] = str(under(root, args[config]))
    return args


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:  # noqa: S310 - loopback only
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def accepted(http_port: int) -> float:
    _, body = http_get(http_port, "/metrics")
    found = re.search(rb"(?m)^spamtrap_messages_accepted_total (\S+)$", body)
    assert found, body[:2000]
    return float(found.group(1))


def wait_for_http(
    port: int, proc: subprocess.Popen[bytes], log: Path, deadline: float = 30
) -> None:
    # Real processes: poll with a deadline, there is no clock to inject.
    def answers() -> bool:
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text(errors='replace')}"
        http_get(port, "/healthz")
        return True

    try:
        wait_until(answers, deadline, retry_on=(OSError,))
    except TimeoutError:
        raise AssertionError(f"no HTTP on {port}:\n{log.read_text(errors='replace')}") from None


def send_one(smtp_port: int, token: str) -> None:
    """One message on a fresh connection: a new source port, so the kernel
    picks a listener afresh."""
    client = RawSMTP("127.0.0.1", smtp_port, timeout=10)
    try:
        client.cmd(b"EHLO bot.example", 250)
        data = f"Subject: template {token}\r\nFrom: <bot@spam.example>\r\n\r\ntoken {token}\r\n"
        client.send(b"bot@spam.example", [b"victim@trap.example"], data.encode())
    finally:
        client.close()


@pytest.mark.slow
def test_two_instances_share_port_and_data_dir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    unit = parse_unit(TEMPLATE)
    data = under(root, "/var/lib/" + one(unit, "Service", "StateDirectory"))
    smtp = free_port()
    http = {i: free_port() for i in INSTANCES}
    # The per-instance files an operator writes (as docs/debian.md shows
    # them): each its own HTTP port.
    for i in INSTANCES:
        env_file = under(root, f"/etc/default/spamtrap@{i}")
        env_file.parent.mkdir(parents=True, exist_ok=True)
        env_file.write_text(
            f'# instance {i}\nSPAMTRAP_ARGS="--http tcp:{http[i]}:interface=127.0.0.1"\n'
        )
    config = under(root, "/etc/spamtrap/spamtrap.yaml")
    config.parent.mkdir(parents=True, exist_ok=True)
    # One config for both; its http.listen is a port nobody checks, so an
    # instance without its own --http would not answer on http[i].
    # STARTTLS is off: it is not what this test is about.
    config.write_text(
        f"data_dir: {data}\n"
        f"smtp:\n  listen: reuseport:{smtp}:interface=127.0.0.1\n  tls: {{enabled: false}}\n"
        f"http:\n  listen: tcp:{free_port()}:interface=127.0.0.1\n"
        "traps: {catch_all: true}\n"
    )

    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {i: tmp_path / f"instance{i}.log" for i in INSTANCES}
    try:
        for i in INSTANCES:
            args = command_for(i, root)
            assert f"--node {HOST}-{i} --http tcp:{http[i]}" in shlex.join(args), args
            with logs[i].open("wb") as out:
                procs[i] = subprocess.Popen(
                    args,
                    cwd=tmp_path,
                    env=dict(os.environ, PYTHONPATH=str(REPO)),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        for i in INSTANCES:
            wait_for_http(http[i], procs[i], logs[i])

        sent: list[str] = []
        counts = {i: 0.0 for i in INSTANCES}

        def both_accepted_one() -> bool:
            nonlocal counts
            token = uuid.uuid4().hex
            send_one(smtp, token)  # OSError, SMTPError: neither instance is listening yet
            sent.append(token)
            counts = {i: accepted(http[i]) for i in INSTANCES}
            return all(counts.values())

        try:
            wait_until(both_accepted_one, 60, interval=0.1, retry_on=(OSError, SMTPError))
        except TimeoutError:
            raise AssertionError(f"after {len(sent)} messages: {counts}") from None
        # Every connection reached one of the two, and only one.
        assert sum(counts.values()) == len(sent), (counts, len(sent))

        for i in INSTANCES:
            procs[i].send_signal(signal.SIGTERM)
        for i in INSTANCES:
            code = procs[i].wait(timeout=120)
            assert code == -signal.SIGTERM, logs[i].read_text(errors="replace")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # The shared local store: bundles of both nodes, each stored once.
    stored: dict[str, list[str]] = {f"{HOST}-{i}": [] for i in INSTANCES}
    bundles = sorted((data / "bundles" / "all").glob("*.mbox.gz"))
    for bundle in bundles:
        node = bundle.name.split(".")[1]
        assert node in stored, bundle.name
        manifest = bundle.with_name(bundle.name.removesuffix(".mbox.gz") + MANIFEST_SUFFIX)
        assert json.loads(manifest.read_text())["node"] == node, manifest
        for _, message in read_mbox(str(bundle)):
            assert f"X-Spamtrap-Node: {node}\n".encode() in message
            stored[node] += re.findall(r"token ([0-9a-f]{32})", message.decode(errors="replace"))
    # Nothing lost and nothing overwritten by the other node's bundle: each
    # node's bundles hold exactly as many messages as that node accepted.
    assert sorted(sum(stored.values(), [])) == sorted(sent)
    for i in INSTANCES:
        assert len(stored[f"{HOST}-{i}"]) == counts[i], (stored, counts)
        # Per-node state, side by side in the one data directory.
        assert (data / "spool" / f"{HOST}-{i}").is_dir()
