"""The composition root as a real ``twistd spamtrap``: a certificate that
cannot be read is one critical log line and exit status 1."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.node import REPO, TWISTD

# -- makeService acquires nothing -------------------------------------------------


# -- the children acquire at start --------------------------------------------------


def test_a_certificate_that_cannot_be_read_is_one_critical_line_and_exit_1(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"traps: {{catch_all: true}}\nsmtp: {{tls: {{certificate: {tmp_path / 'missing.pem'}}}}}\n"
    )
    out = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "--logfile=-", "spamtrap", "--config", str(cfg),
         "--data-dir", str(tmp_path / "d"), "--smtp", "tcp:0:interface=127.0.0.1",
         "--http", "tcp:0:interface=127.0.0.1"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert out.returncode == 1, out
    text = out.stdout + out.stderr
    critical = [ln for ln in text.splitlines() if "#critical]" in ln]
    assert len(critical) == 1, text
    assert critical[0].endswith(f"cannot start: [Errno 2] No such file or directory: "
                                f"'{tmp_path / 'missing.pem'}'; exiting"), text  # fmt: skip
    assert "Traceback" not in text and " started as " not in text, text


# -- options merged into the document ------------------------------------------------


