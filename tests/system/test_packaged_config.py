"""The Debian package's conffile works on its own.

debian/make-conffile turns etc/spamtrap.yaml into /etc/spamtrap/spamtrap.yaml
at build time. systemd starts the service on that file right after the
install, so it must make no outside connection: no notification (a webhook
to consumer.example.org is a DNS lookup and an error in the log, list mail
goes to a relay) and no listener but loopback. tests/system/test_debian.py runs the
installed file on bookworm; this runs the same conversion and file here.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from spamtrap.config import Config, load_config
from tests.support.node import REPO, Node, RawSMTP, bundles

EXAMPLE = REPO / "etc" / "spamtrap.yaml"
MAKE_CONFFILE = REPO / "debian" / "make-conffile"
LOOPBACK = re.compile(r"^(tcp6?|reuseport):\d+:(.*:)?interface=(127\.0\.0\.1|\\:\\:1)(:.*)?$")


@pytest.fixture
def packaged(tmp_path: Path) -> Path:
    out = tmp_path / "spamtrap.yaml"
    subprocess.run(
        [sys.executable, str(MAKE_CONFFILE), str(EXAMPLE), str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out


def without_outside(cfg: Config) -> Config:
    """The config with what the conversion changes taken out."""
    return dataclasses.replace(
        cfg,
        smtp=dataclasses.replace(cfg.smtp, listen=[]),
        http=dataclasses.replace(cfg.http, dashboard="token"),
        sets=[
            dataclasses.replace(s, notify=dataclasses.replace(s.notify, mail=[], webhooks=[]))
            for s in cfg.sets
        ],
    )


def test_the_conffile_notifies_nobody_and_listens_on_loopback(packaged: Path) -> None:
    cfg = load_config(str(packaged))
    assert [(s.name, s.notify.mail, s.notify.webhooks) for s in cfg.sets] == [
        (s.name, [], []) for s in cfg.sets
    ]
    for endpoint in cfg.smtp.listen + cfg.http.listen:
        assert LOOPBACK.match(endpoint), endpoint
    assert not cfg.smtp.rdns and cfg.queue.url is None
    assert (cfg.http.dashboard, cfg.http.dashboard_token) == ("token", None)  # closed: 403
    assert not cfg.filters.clamd.enabled and not cfg.filters.spamd.enabled
    # Everything else is the example, and the examples are still shown.
    example = load_config(str(EXAMPLE))
    assert without_outside(cfg) == without_outside(example)
    text = packaged.read_text()
    assert "#   - url: https://consumer.example.org/spamtrap-hook" in text
    assert "# mail: [shared-bundles@lists.trap.example]" in text


def test_the_conffile_runs_without_an_error_or_a_notice(packaged: Path, tmp_path: Path) -> None:
    # Checked first, so that no version of this test ever makes a lookup.
    assert not any(s.notify.mail or s.notify.webhooks for s in load_config(str(packaged)).sets)
    data = tmp_path / "data"
    node = Node(
        data,
        config=packaged,
        extra=["--store", f"file://{tmp_path / 'bundles'}", "--node", "pkgtest"],
    ).start()
    try:
        token = uuid.uuid4().hex
        smtp = RawSMTP(node.host, node.smtp_port)
        smtp.send(b"bot@spam.example", [b"anything@trap.example"],
                  f"Subject: {token}\r\n\r\nbody\r\n".encode())  # fmt: skip
        smtp.close()
        assert node.metric("spamtrap_messages_accepted_total") == 1
    finally:
        assert node.stop() in (0, -15), node.log()
    stored = bundles(tmp_path, "all")
    assert len(stored) == 1 and len(bundles(tmp_path, "shared")) == 1
    log = (data / "twistd.log").read_text()
    problems = [ln for ln in log.splitlines() if re.search(r"#(warn|error|critical)\]", ln)]
    assert problems == [], log
    assert not re.search(r"notif|webhook|relay", log, re.I), log
    assert "stopped cleanly; the spool is empty" in log
