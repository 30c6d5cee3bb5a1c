"""The hidden-newcomer test: follow docs/operators-guide.md literally.

The configuration is not written here: it is taken from the guide itself,
from the fenced blocks marked with an HTML comment just above them, so the
guide and this test cannot drift apart:

- ``<!-- newcomer:config -->``: YAML merged into the node's config;
- ``<!-- newcomer:file PATH -->`` / ``<!-- newcomer:append PATH -->``: a
  discard-list file, written before the start and appended to later;
- ``<!-- newcomer:sh -->``: the consumer's download script, run as shown;
- ``<!-- check:config -->``: a config fragment that must pass the checker;
- ``<!-- check:prometheus -->``: the scrape job the alert rules rely on.

Every YAML block in the guide must carry one of these marks.

With that config a real ``twistd -n spamtrap`` (in the venv, and from the
installed .deb) gets mail the three ways the guide describes: direct to
the trap domain, through a donor's alias forward, and forwarded as an
rfc822 attachment. Each must land where the guide says. The only things
changed from the guide are the ones a test must change: loopback ports on
the command line, ``http.public_url`` pointing at them, and (in the venv)
``/etc/spamtrap`` and ``/var/lib/spamtrap`` mapped to temporary
directories.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from spamtrap.bundle.mbox import read_mbox
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
from tests.support.guide import (
    Names,
    Paths,
    blocks,
    guide_config,
    names,
)
from tests.support.node import (
    Node,
    RawSMTP,
    free_port,
    require_binary,
    split_metadata,
    wait_for_port,
)
from tests.support.poll import wait_until

CLEAN_EXIT = (0, -signal.SIGTERM)  # twistd re-raises SIGTERM after a clean stop


# -- the guide ----------------------------------------------------------------


# -- the guide's snippets, without running a node -----------------------------


# -- mail the way the guide's donors send it ----------------------------------

SPAM_DATE = b"Date: Sun, 22 Nov 2026 13:31:09 +0000\r\n"


def direct_message(token: str) -> bytes:
    return (
        b'From: "Pharmacy" <deals@pills.example>\r\nTo: someone@trap.example\r\n'
        + f"Subject: newcomer {token}\r\n".encode()
        + SPAM_DATE
        + f"Message-ID: <{token}@pills.example>\r\n\r\ncheap pills {token}\r\n".encode()
    )


@dataclass
class Forwarded:
    """A message as a donor's MTA re-sends it, and what the trap must store of it."""

    data: bytes
    expected: bytes  # the original after spamtrap's metadata block
    stripped: str  # X-Spamtrap-X-Stripped


def alias_forward(token: str) -> Forwarded:
    """After an /etc/aliases expansion on the donor's MX (Postfix).

    Postfix's local(8) adds X-Original-To and Delivered-To and re-submits
    the message, which adds a ``Received: by mx.donor.example (Postfix)``
    line with no ``from`` part: the donor hop the guide's
    ``strip_received_by: [mx.donor.example]`` removes. The MX's own line
    below it records the spammer and stays.
    """
    donor_added = (
        b"X-Original-To: spamtrap@donor.example\r\n"
        b"Delivered-To: spamtrap@donor.example\r\n"
        b"Received: by mx.donor.example (Postfix) id 4Xb1Yz2Kq9z9v;\r\n"
        b"\tSun, 22 Nov 2026 13:31:12 +0000 (UTC)\r\n"
    )
    original = (
        b"Received: from bot.example (unknown [198.51.100.7])\r\n"
        b"\tby mx.donor.example (Postfix) with ESMTP id 4Xb1Yy6Zr1z4w\r\n"
        b"\tfor <spamtrap@donor.example>; Sun, 22 Nov 2026 13:31:10 +0000 (UTC)\r\n"
        b'From: "Lottery" <win@lotto.example>\r\nTo: spamtrap@donor.example\r\n'
        + f"Subject: newcomer {token}\r\n".encode()
        + SPAM_DATE
        + f"Message-ID: <{token}@lotto.example>\r\n\r\nyou won {token}\r\n".encode()
    )
    stripped = "X-Original-To=1, Delivered-To=1, Received=1"
    return Forwarded(donor_added + original, original, stripped)


def attachment_forward(token: str, wrapper_token: str, feed_address: str) -> Forwarded:
    """Thunderbird's "Forward As > As Attachment" of a spam from the donor's mailbox."""
    delivery = (  # added at the final delivery into the donor's mailbox
        b"Return-Path: <sales@watches.example>\r\n"
        b"X-Original-To: jane@donor.example\r\n"
        b"Delivered-To: jane@donor.example\r\n"
    )
    spam = (
        b"Received: from bot2.example (unknown [198.51.100.8])\r\n"
        b"\tby mx1.donor.example (Postfix) with ESMTP id 4Xb2Aa1Bb2z3c\r\n"
        b"\tfor <jane@donor.example>; Sun, 22 Nov 2026 13:29:58 +0000 (UTC)\r\n"
        b"From: sales@watches.example\r\nTo: jane@donor.example\r\n"
        + f"Subject: newcomer {token}\r\n".encode()
        + SPAM_DATE
        + f"Message-ID: <{token}@watches.example>\r\n\r\ncheap watches {token}\r\n".encode()
    )
    boundary = b"------------0aZ9Yb8Xc7Wd6Ve5Uf4Tg3Sh"
    wrapper = (
        b"Received: from [10.1.2.3] (unknown [203.0.113.9])\r\n"
        b"\tby submit.donor.example (Postfix) with ESMTPSA id 4Xb2Cc3Dd4z5e\r\n"
        + f"\tfor <{feed_address}>; Sun, 22 Nov 2026 13:32:40 +0000 (UTC)\r\n".encode()
        + f"Message-ID: <{wrapper_token}@donor.example>\r\n".encode()
        + b"Date: Sun, 22 Nov 2026 14:32:40 +0100\r\nMIME-Version: 1.0\r\n"
        b"User-Agent: Mozilla Thunderbird\r\nContent-Language: en-US\r\n"
        + f"To: {feed_address}\r\n".encode()
        + b"From: Jane Donor <jane@donor.example>\r\n"
        + f"Subject: Fwd: newcomer {token}\r\n".encode()
        + b'Content-Type: multipart/mixed;\r\n boundary="'
        + boundary[2:]
        + b'"\r\n\r\nThis is a multi-part message in MIME format.\r\n'
        + boundary
        + b"\r\nContent-Type: text/plain; charset=UTF-8; format=flowed\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\n"
        + f"spam for the trap {wrapper_token}\r\n\r\n".encode()
        + boundary
        + b'\r\nContent-Type: message/rfc822; name="Cheap watches.eml"\r\n'
        b'Content-Disposition: attachment; filename="Cheap watches.eml"\r\n\r\n'
        + delivery
        + spam
        + b"\r\n"
        + boundary
        + b"--\r\n"
    )
    return Forwarded(wrapper, spam, "Return-Path=1, X-Original-To=1, Delivered-To=1")


# -- a node to run the scenario on --------------------------------------------


class Runner(Protocol):
    @property
    def smtp_port(self) -> int: ...
    @property
    def http_port(self) -> int: ...

    def start(self) -> None: ...
    def send_signal(self, sig: int) -> None: ...
    def stop(self) -> int: ...
    def log(self) -> str: ...


@dataclass
class VenvRunner:
    """``.venv/bin/twistd -n spamtrap --config ...``, as the guide shows for a checkout."""

    node: Node

    @property
    def smtp_port(self) -> int:
        return self.node.smtp_port

    @property
    def http_port(self) -> int:
        return self.node.http_port

    def start(self) -> None:
        self.node.start()

    def send_signal(self, sig: int) -> None:
        assert self.node.proc is not None
        self.node.proc.send_signal(sig)

    def stop(self) -> int:
        return self.node.stop()

    def log(self) -> str:
        return self.node.log()


@dataclass
class UnitRunner:
    """The installed unit's ExecStart, as its User=, with the guide's /etc config."""

    service: Any
    log_path: Path
    smtp_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_as_unit(
            self.service, CONFIG, self.smtp_port, self.http_port, self.log_path
        )
        try:
            wait_for_port("127.0.0.1", self.smtp_port, self.proc)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}\n{self.log()}") from None

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""


def metric(port: int, name: str, **labels: str) -> float:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback only
        body = r.read().decode()
    total = 0.0
    for line in body.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if m is None or m[1] != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m[3])
    return total


def wait_processed(runner: Runner, n: int) -> None:
    # A real process: poll its metrics, there is no clock to inject.
    try:
        wait_until(
            lambda: metric(runner.http_port, "spamtrap_messages_processed_total") >= n,
            30,
            interval=0.02,
        )
    except TimeoutError:
        raise AssertionError(f"{n} messages not processed:\n{runner.log()}") from None


def lists_verdicts(runner: Runner) -> float:
    """Messages the lists stage has seen (one verdict each)."""
    return metric(runner.http_port, "spamtrap_filter_verdicts_total", stage="lists")


def discarded(runner: Runner, rule: str) -> float:
    return metric(
        runner.http_port,
        "spamtrap_filter_verdicts_total",
        stage="lists",
        verdict="discard",
        reason=f"list:{rule}",
    )


@dataclass
class Stored:
    msg_id: str
    meta: dict[str, list[str]]
    original: bytes


def stored(state: Path, set_name: str) -> list[Stored]:
    out = []
    for path in sorted((state / "bundles" / set_name).glob("*.mbox.gz")):
        for _, message in read_mbox(str(path)):
            block, original = split_metadata(message)
            meta: dict[str, list[str]] = {}
            for name, value in re.findall(rb"(?m)^(X-Spamtrap-[\w-]+): (.*?)\r?$", block):
                meta.setdefault(name.decode(), []).append(value.decode())
            out.append(Stored(meta["X-Spamtrap-Id"][0], meta, original))
    return out


def find(messages: list[Stored], token: str) -> list[Stored]:
    return [m for m in messages if token.encode() in m.original]


# -- the scenario ---------------------------------------------------------------


def write_config(paths: Paths, config_path: Path, http_port: int) -> Names:
    cfg = guide_config(paths)
    found = names(cfg)
    # The one setting a loopback test must change: where consumers fetch from.
    cfg["http"]["public_url"] = f"http://127.0.0.1:{http_port}"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    (first,) = blocks("newcomer:file")
    assert first.arg is not None
    rules_path = paths.path(first.arg)
    assert [str(rules_path)] == cfg["filters"]["lists"]["files"]
    rules_path.write_text(first.body)
    rules_path.chmod(0o644)  # the service user reads it
    return found


def retire_jane(runner: Runner, paths: Paths, domain: str) -> list[str]:
    """Append the guide's rule and SIGHUP, as the guide says; probe until it holds.

    Returns the probe tokens; the last one was discarded by the new rule.
    """
    (append,) = blocks("newcomer:append")
    assert append.arg is not None
    with paths.path(append.arg).open("a") as f:
        f.write(append.body)
    runner.send_signal(signal.SIGHUP)
    probes = []
    # A real process: poll its metrics with a deadline, there is no clock to inject.
    deadline = time.monotonic() + 15
    while discarded(runner, "retired-jane") == 0:
        assert time.monotonic() < deadline, f"SIGHUP did not load the rule:\n{runner.log()}"
        seen = lists_verdicts(runner)
        token = uuid.uuid4().hex
        c = RawSMTP("127.0.0.1", runner.smtp_port)
        c.send(b"bot@spam.example", [f"jane@{domain}".encode()], direct_message(token))
        c.close()
        probes.append(token)
        try:  # until the probe met the rules
            left = max(0.0, deadline - time.monotonic())
            wait_until(lambda seen=seen: lists_verdicts(runner) != seen, left, interval=0.02)
        except TimeoutError:
            raise AssertionError(f"probe not processed:\n{runner.log()}") from None
    return probes


def download_like_a_consumer(
    runner: Runner, state: Path, token: str, where: Path, env: dict[str, str] | None
) -> None:
    """The guide's curl script, run as shown, against a restarted node."""
    (script,) = blocks("newcomer:sh")
    where.mkdir()
    env = dict(
        env or os.environ,
        BASE=f"http://127.0.0.1:{runner.http_port}",
        SET="feeds",
        TOKEN=token,
    )
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script.body],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    stored_bundles = sorted((state / "bundles" / "feeds").glob("*.mbox.gz"))
    assert stored_bundles
    assert sorted(p.name for p in where.iterdir()) == [p.name for p in stored_bundles]
    for p in stored_bundles:
        assert (where / p.name).read_bytes() == p.read_bytes()


def run_scenario(
    runner: Runner,
    paths: Paths,
    config_path: Path,
    check_config: list[str],
    tmp: Path,
    env: dict[str, str] | None = None,
) -> None:
    n = write_config(paths, config_path, runner.http_port)
    checked = subprocess.run(
        [*check_config, str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert checked.returncode == 0 and ": OK" in checked.stdout, checked.stdout + checked.stderr

    tokens = {k: uuid.uuid4().hex for k in ("direct", "role", "sales", "jane", "alias", "att")}
    wrapper_token = uuid.uuid4().hex
    alias = alias_forward(tokens["alias"])
    attached = attachment_forward(tokens["att"], wrapper_token, n.feed_address)
    domain = n.domain.encode()
    feed = n.feed_address.encode()

    runner.start()
    try:
        c = RawSMTP("127.0.0.1", runner.smtp_port)
        c.cmd(b"EHLO bot.example", 250)
        # Any other recipient is refused: spamtrap never relays.
        c.cmd(b"MAIL FROM:<bot@spam.example>", 250)
        refused = c.cmd(b"RCPT TO:<someone@elsewhere.example>", 550)
        assert b"5.1.1" in refused
        c.cmd(b"RSET", 250)
        for key, local in (("direct", b"someone"), ("role", b"postmaster"), ("sales", b"sales")):
            c.send(b"bot@spam.example", [local + b"@" + domain], direct_message(tokens[key]))
        c.send(b"bot@spam.example", [b"jane@" + domain], direct_message(tokens["jane"]))
        c.close()
        # The donor's MTAs: the alias forward keeps the original envelope sender,
        # the attachment forward comes from the donor's user.
        c = RawSMTP("127.0.0.1", runner.smtp_port)
        c.cmd(b"EHLO store.donor.example", 250)
        c.send(b"win@lotto.example", [feed], alias.data)
        c.close()
        c = RawSMTP("127.0.0.1", runner.smtp_port)
        c.cmd(b"EHLO submit.donor.example", 250)
        wrapper_id = c.send(b"jane@donor.example", [feed], attached.data)
        c.close()
        accepted = 6
        assert metric(runner.http_port, "spamtrap_messages_accepted_total") == accepted
        wait_processed(runner, accepted)
        assert discarded(runner, "role-accounts") == 1
        assert discarded(runner, "retired-sales") == 1
        probes = retire_jane(runner, paths, n.domain)
    finally:
        rc = runner.stop()
    assert rc in CLEAN_EXIT, runner.log()

    direct, feeds = stored(paths.state, "direct"), stored(paths.state, "feeds")
    everything = direct + feeds
    # 1. Direct mail lands in `direct`, byte for byte; the role account, the
    #    retired addresses and the probe after the SIGHUP land nowhere.
    (got,) = find(direct, tokens["direct"])
    assert got.original == direct_message(tokens["direct"])
    assert "X-Spamtrap-Feed" not in got.meta
    assert got.meta["X-Spamtrap-Rcpt"] == [f"<someone@{n.domain}>"]
    for key in ("role", "sales"):
        assert not find(everything, tokens[key]), key
    assert not find(everything, probes[-1]), "mail to jane@ after the SIGHUP was kept"
    kept_jane = [tokens["jane"], *probes[:-1]]  # before the rule was in effect
    for token in kept_jane:
        assert len(find(direct, token)) == 1, token
    assert len(direct) == 1 + len(kept_jane)

    # 2. The alias forward lands in `feeds`: the donor's delivery fields and
    #    its internal hop are gone, everything else is byte for byte.
    (got,) = find(feeds, tokens["alias"])
    assert got.original == alias.expected
    assert got.meta["X-Spamtrap-Feed"] == [n.feed_id]
    assert got.meta["X-Spamtrap-X-Stripped"] == [alias.stripped]

    # 3. The attachment forward: the attached spam is stored as a message of
    #    its own, stripped, and the wrapper is not stored at all.
    assert not find(everything, wrapper_token), "the wrapper was stored"
    (got,) = find(feeds, tokens["att"])
    assert got.original == attached.expected
    assert got.msg_id == f"{wrapper_id}-1"
    assert got.meta["X-Spamtrap-X-Extracted-From"] == [wrapper_id]
    assert got.meta["X-Spamtrap-Feed"] == [n.feed_id]
    assert got.meta["X-Spamtrap-X-Stripped"] == [attached.stripped]
    assert len(feeds) == 2 and not find(feeds, tokens["direct"])

    # A consumer downloads the set with the guide's script.
    runner.start()
    try:
        download_like_a_consumer(runner, paths.state, n.feeds_token, tmp / "download", env)
    finally:
        rc = runner.stop()
    assert rc in CLEAN_EXIT, runner.log()


@pytest.mark.slow
def test_newcomer_in_a_venv(tmp_path: Path) -> None:
    require_binary("curl")
    paths = Paths(tmp_path / "etc", tmp_path / "data")
    paths.etc.mkdir()
    config = paths.etc / "spamtrap.yaml"
    spamtrap = Path(sys.executable).parent / "spamtrap"
    assert spamtrap.exists(), f"{spamtrap}: the console script; run `make venv`"
    runner = VenvRunner(Node(paths.state, config))
    run_scenario(runner, paths, config, [str(spamtrap), "check-config"], tmp_path)


# -- the same on the installed .deb ---------------------------------------------


@pytest.fixture(scope="session")
def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb built from a copy of the tree, once per session."""
    for tool in ("dpkg-buildpackage", "apt-get", "git", "curl"):
        require_binary(tool)
    require_root_on_a_clean_machine()
    tmp = tmp_path_factory.mktemp("newcomer-deb")
    src = source_tree(tmp / "build" / PACKAGE)
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, timeout=1200)
    (package,) = (tmp / "build").glob(f"{PACKAGE}_*_all.deb")
    return package


@pytest.fixture
def installed(built_deb: Path) -> Iterator[Any]:
    """Install the .deb; yield the unit's [Service]; purge whatever happens.

    Files the test adds to /etc/spamtrap (the guide's lists.yaml) are not
    the package's, so purge leaves them: they are removed here too.
    """
    require_root_on_a_clean_machine()
    etc = CONFIG.parent
    before = set(etc.iterdir()) if etc.is_dir() else set()
    try:
        run([*APT, "install", str(built_deb)])
        files = run(["dpkg", "-L", PACKAGE]).stdout.split()
        (unit,) = [p for p in files if p.endswith("/systemd/system/spamtrap.service")]
        yield read_unit(unit)["Service"]
    finally:
        if dpkg_status():
            subprocess.run(
                [*APT, "purge", PACKAGE], env=DEBIAN_ENV, capture_output=True
            )
        if etc.is_dir():
            for path in set(etc.iterdir()) - before:
                path.unlink()
            if not before:
                etc.rmdir()


@pytest.mark.slow
@pytest.mark.needs_debian
def test_newcomer_on_the_installed_deb(installed: Any, tmp_path: Path) -> None:
    # The guide's paths as they are: /etc/spamtrap and /var/lib/spamtrap.
    paths = Paths(Path("/etc/spamtrap"), STATE)
    runner = UnitRunner(installed, tmp_path / "twistd.log")
    try:
        run_scenario(
            runner, paths, CONFIG, ["spamtrap", "check-config"], tmp_path, DEBIAN_ENV
        )
    finally:
        runner.kill()
