"""Fault isolation in a real twistd node: a forward output whose relay (a
private Postfix) is down for a while, and an exec output, while mail flows.
Intake, bundles and the exec output go on; the forwards queued meanwhile
arrive once the relay is back, each once per partner, as RFC 5965 reports.
"""

from __future__ import annotations

import email
import signal
import time
from pathlib import Path

import pytest

from tests.integration.test_output_forward import PARTNERS, Partner
from tests.support.node import Node, bundles, free_port
from tests.system.test_outputs import CLEAN_EXIT, filed, filer, health, metric, send, wait_for
from tests.unit.test_arf import check_structure

pytestmark = [pytest.mark.slow, pytest.mark.needs_debian]

DOWNTIME = 20.0  # seconds the relay is down while mail flows
BATCHES = 8  # of 5 messages, spread over the downtime


def test_a_relay_that_is_down_stops_nothing_and_its_forwards_arrive_later(
    tmp_path: Path,
) -> None:
    partner = Partner(port=free_port())  # not started yet: the relay is down
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
  files:
    type: exec
    sets: [all]
    argv: [{filer(tmp_path, "file.sh", files)}]
"""
    )
    node = Node(tmp_path / "data", config).start()
    try:
        down_since = time.monotonic()
        ids: list[str] = []
        for batch in range(BATCHES):
            started = time.monotonic()
            ids += send(node, 5, start=5 * batch)
            # Intake answers at once, whatever the relay does.
            assert time.monotonic() - started < 5, node.log()
            time.sleep(max(0.0, down_since + (batch + 1) * DOWNTIME / BATCHES - time.monotonic()))
        # While the relay was down: the exec output and the bundles went on.
        wait_for("every message filed", lambda: filed(files) == set(ids), node)
        wait_for(
            "the bundles",
            lambda: metric(node, "spamtrap_set_messages_total", set="all") == len(ids),
            node,
        )
        wait_for("a stored bundle", lambda: bundles(node.data_dir), node)
        forward = {"output": "abuse-desks"}
        assert metric(node, "spamtrap_output_sent_total", **forward) == 0
        assert metric(node, "spamtrap_output_failed_total", reason="refused", **forward) >= 3
        assert metric(node, "spamtrap_output_queue_depth", **forward) == len(ids)
        status, body = health(node)
        assert status == 200 and body["status"] == "ok"
        assert list(body["outputs_failing"]) == ["abuse-desks"]  # type: ignore[call-overload]

        # The relay comes back (mail still flowing): everything queued arrives.
        partner.mta.start()
        ids += send(node, 5, start=5 * BATCHES)
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
        wait_for("no failing output", lambda: "outputs_failing" not in health(node)[1], node)
        assert node.stop() in CLEAN_EXIT, node.log()
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.stop(signal.SIGKILL)
        partner.mta.cleanup()
