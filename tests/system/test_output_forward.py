"""Fault isolation in a real twistd node: a forward output whose relay (a
private Postfix) is down for a while, a pyzor output reporting to a real
pyzord and an exec output, while mail flows. Intake, bundles, the Pyzor
reports and the exec output go on; the forwards queued meanwhile arrive
once the relay is back, each once per partner, as RFC 5965 reports; and
`pyzor check` counts each message once.
"""

from __future__ import annotations

import email
import re
import signal
import time
from pathlib import Path

import pytest

from tests.support.arf import check_structure
from tests.support.node import (
    CLEAN_EXIT,
    Node,
    RawSMTP,
    bundles,
    free_port,
    health,
    metric,
    wait_for,
)
from tests.support.outputs import filed, filer
from tests.support.partner import PARTNERS, Partner
from tests.support.pyzord import PyzordServer, spam

pytestmark = [pytest.mark.slow, pytest.mark.needs_debian]

DOWNTIME = 20.0  # seconds the relay is down while mail flows
BATCHES = 8  # of 5 messages, spread over the downtime


def message(n: int) -> bytes:
    """A message of its own body (so of its own Pyzor digest), CRLF throughout."""
    return re.sub(rb"\r?\n", b"\r\n", spam(n))


def send(node: Node, numbers: range) -> list[str]:
    """One SMTP session, each message answered 250 (or the test fails)."""
    c = RawSMTP(node.host, node.smtp_port)
    c.cmd(b"EHLO client.example", 250)
    ids = [c.send(b"bot@spam.example", [b"victim@trap.example"], message(n)) for n in numbers]
    c.close()
    return ids


def test_a_relay_that_is_down_stops_nothing_and_its_forwards_arrive_later(
    tmp_path: Path,
) -> None:
    partner = Partner(port=free_port())  # not started yet: the relay is down
    pyzord = PyzordServer(tmp_path / "pyzord")  # its port is chosen; started below
    files = tmp_path / "files"
    config = tmp_path / "spamtrap.yaml"
    config.write_text(
        f"""node: n1
traps: {{domains: [trap.example]}}
smtp: {{hostname: trap.test}}
relay: {{host: 127.0.0.1, port: {partner.port}, sender: trap@trap.test}}
sets:
  all:
    rotate: {{max_age: 1s}}
outputs:
  abuse-desks:
    type: forward
    sets: [all]
    to: [{", ".join(PARTNERS)}]
    format: arf
    timeout: 5s
    retry_initial: 500ms
    retry_max: 2s
  pyzor-reports:
    type: pyzor
    sets: [all]
    servers: ["{pyzord.address}"]
    timeout: 2s
  files:
    type: exec
    sets: [all]
    argv: [{filer(tmp_path, "file.sh", files)}]
"""
    )
    forward, pyzor = {"output": "abuse-desks"}, {"output": "pyzor-reports"}
    node = Node(tmp_path / "data", config)
    try:
        pyzord.start()
        node.start()
        down_since = time.monotonic()
        ids: list[str] = []
        for batch in range(BATCHES):
            started = time.monotonic()
            ids += send(node, range(5 * batch, 5 * batch + 5))
            # Intake answers at once, whatever the relay does.
            assert time.monotonic() - started < 5, node.log()
            # The Pyzor reports go on during the outage, batch after batch.
            wait_for(
                f"the reports of batch {batch}",
                lambda: metric(node, "spamtrap_output_sent_total", **pyzor) == len(ids),  # noqa: B023
                node,
                timeout=15,
            )
            assert metric(node, "spamtrap_output_sent_total", **forward) == 0
            time.sleep(max(0.0, down_since + (batch + 1) * DOWNTIME / BATCHES - time.monotonic()))
        # While the relay was down: the exec output and the bundles went on.
        wait_for("every message filed", lambda: filed(files) == set(ids), node)
        wait_for(
            "the bundles",
            lambda: metric(node, "spamtrap_set_messages_total", set="all") == len(ids),
            node,
        )
        wait_for("a stored bundle", lambda: bundles(node.data_dir), node)
        assert metric(node, "spamtrap_output_sent_total", **forward) == 0
        assert metric(node, "spamtrap_output_failed_total", reason="refused", **forward) >= 3
        assert metric(node, "spamtrap_output_queue_depth", **forward) == len(ids)
        status, body = health(node)
        assert status == 200 and body["status"] == "ok"
        assert list(body["outputs_failing"]) == ["abuse-desks"]  # type: ignore[call-overload]

        # The relay comes back (mail still flowing): everything queued arrives.
        partner.mta.start()
        ids += send(node, range(5 * BATCHES, 5 * BATCHES + 5))
        wait_for(
            "the queued forwards",
            lambda: metric(node, "spamtrap_output_sent_total", **forward) == len(ids),
            node,
            timeout=90,
        )
        wait_for(
            "delivery to every partner",
            lambda: all(len(partner.delivered(a)) >= len(ids) for a in PARTNERS),
            node,
        )
        for address in PARTNERS:
            reports = partner.delivered(address)
            got = [email.message_from_bytes(m)["X-Spamtrap-Id"] for m in reports]
            assert sorted(got) == sorted(ids)  # each once: none lost, none twice
            for mail in reports:
                check_structure(mail, received_at=None)
        assert metric(node, "spamtrap_output_queue_depth", **forward) == 0
        assert metric(node, "spamtrap_output_shed_total", **forward) == 0
        wait_for("the exec output", lambda: filed(files) == set(ids), node)
        # Pyzor: every message reported once, none failed, none retried;
        # `pyzor check` counts each once.
        wait_for(
            "the last reports",
            lambda: metric(node, "spamtrap_output_sent_total", **pyzor) == len(ids),
            node,
        )
        assert metric(node, "spamtrap_output_failed_total", **pyzor) == 0
        assert metric(node, "spamtrap_output_queue_depth", **pyzor) == 0
        assert pyzord.usage() == [("anonymous", 200)] * len(ids)
        assert pyzord.check([message(n) for n in range(len(ids))]) == [(1, 0)] * len(ids)
        wait_for("no failing output", lambda: "outputs_failing" not in health(node)[1], node)
        assert node.stop() in CLEAN_EXIT, node.log()
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.stop(signal.SIGKILL)
        partner.mta.cleanup()
        pyzord.stop()
