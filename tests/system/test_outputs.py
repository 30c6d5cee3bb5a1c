"""Outputs in a real twistd node: exec commands that file each message and
that hang, metrics and /healthz, a queue bound that sheds its oldest, and
a kill -9 with queued entries that loses nothing."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.support.node import CLEAN_EXIT, Node, RawSMTP, bundles, health, metric, wait_for
from tests.support.outputs import filed, filer, hook

MESSAGE = b"From: spammer@spam.example\r\nSubject: buy %d\r\n\r\ncheap pills %d\r\n"


def send(node: Node, n: int, start: int = 0) -> list[str]:
    c = RawSMTP(node.host, node.smtp_port)
    c.cmd(b"EHLO client.example", 250)
    ids = [
        c.send(b"spammer@spam.example", [b"victim@trap.example"], MESSAGE % (i, i))
        for i in range(start, start + n)
    ]
    c.close()
    return ids


def test_a_blackholed_output_stops_nothing_else(tmp_path: Path) -> None:
    files = tmp_path / "files"
    hang = hook(tmp_path, "hang.sh", "exec sleep 3600\n")
    config = tmp_path / "spamtrap.yaml"
    config.write_text(
        f"""node: n1
traps: {{domains: [trap.example]}}
sets:
  all:
    rotate: {{max_age: 1s}}
outputs:
  files:
    type: exec
    sets: [all]
    argv: [{filer(tmp_path, "file.sh", files)}]
  blackhole:
    type: exec
    sets: [all]
    argv: [{hang}]
    timeout: 1s
    kill_grace: 500ms
    retry_initial: 100ms
    retry_max: 200ms
    concurrency: 1
    max_messages: 5
"""
    )
    node = Node(tmp_path / "data", config).start()
    try:
        started = time.monotonic()
        ids = send(node, 40)
        took = time.monotonic() - started
        # Intake: every message got its 250 at once, whatever the blackhole does.
        assert took < 20, f"40 messages took {took:.1f}s"
        wait_for("every message filed", lambda: filed(files) == set(ids), node)
        for msg_id in ids:
            head = (files / msg_id).read_bytes().split(b"\n", 1)[0]
            assert head == b"X-Spamtrap-Id: " + msg_id.encode()
        assert (files.parent / "files.log").read_text().splitlines()[0].endswith(" all files")
        # Bundles go on too.
        wait_for(
            "the bundles",
            lambda: metric(node, "spamtrap_set_messages_total", set="all") == 40,
            node,
        )
        wait_for("a stored bundle", lambda: bundles(node.data_dir), node)
        assert metric(node, "spamtrap_output_sent_total", output="files") == 40
        assert metric(node, "spamtrap_output_sent_total", output="blackhole") == 0
        # The blackhole: killed at its timeout, retried, its bound sheds the oldest.
        wait_for(
            "three timeouts",
            lambda: metric(node, "spamtrap_output_failed_total", output="blackhole") >= 3,
            node,
        )
        assert metric(
            node, "spamtrap_output_failed_total", output="blackhole", reason="timeout"
        ) == metric(node, "spamtrap_output_failed_total", output="blackhole")
        shed = metric(node, "spamtrap_output_shed_total", output="blackhole")
        depth = metric(node, "spamtrap_output_queue_depth", output="blackhole")
        assert shed >= 40 - 5 - 1 and depth <= 6
        assert shed + depth == 40
        assert metric(node, "spamtrap_output_queue_depth", output="files") == 0
        assert metric(node, "spamtrap_output_oldest_age_seconds", output="blackhole") > 0
        assert metric(node, "spamtrap_output_shed_total", output="files") == 0
        # /healthz names the failing output, and stays 200: intake is fine.
        status, body = health(node)
        assert status == 200 and body["status"] == "ok"
        failing = body["outputs_failing"]
        assert isinstance(failing, dict) and list(failing) == ["blackhole"]
        assert "timeout" in failing["blackhole"]
        assert body["outputs"] == {"files": 0, "blackhole": depth}
        # A clean stop with a send in flight: its grace, then the child is
        # killed and the queue stays on disk.
        started = time.monotonic()
        assert node.stop() in CLEAN_EXIT, node.log()
        assert time.monotonic() - started < 60
        assert "stay queued for the next start" in node.log()
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.stop(signal.SIGKILL)
    assert list((node.data_dir / "outputs" / "blackhole" / "n1").glob("seg-*.log"))


def test_kill_9_loses_nothing_that_was_queued(tmp_path: Path) -> None:
    files = tmp_path / "files"
    flag = tmp_path / "partner-is-up"
    # Until the flag exists the partner is "down": exit 75, retried.
    script = filer(tmp_path, "file.sh", files, extra=f'[ -e "{flag}" ] || exit 75\n')
    config = tmp_path / "spamtrap.yaml"
    config.write_text(
        f"""node: n1
traps: {{domains: [trap.example]}}
sets:
  all:
    rotate: {{max_age: 1s}}
outputs:
  partner:
    type: exec
    sets: [all]
    argv: [{script}]
    retry_initial: 200ms
    retry_max: 500ms
    concurrency: 2
"""
    )
    node = Node(tmp_path / "data", config).start()
    try:
        ids = send(node, 10)
        wait_for(
            "all queued and failing",
            lambda: (
                metric(node, "spamtrap_output_failed_total", output="partner") >= 10
                and metric(node, "spamtrap_output_queue_depth", output="partner") == 10
            ),
            node,
        )
        assert metric(node, "spamtrap_output_failed_total", reason="tempfail") >= 10
        status, body = health(node)
        assert "partner" in body.get("outputs_failing", {})  # type: ignore[operator]
        # Let the bundles be stored, so the intake spool has let go of them:
        # what comes back below comes from the output's own queue.
        wait_for("a stored bundle", lambda: bundles(node.data_dir), node)
        time.sleep(0.5)
        node.stop(signal.SIGKILL)

        flag.touch()
        node = Node(node.data_dir, config, smtp_port=node.smtp_port, http_port=node.http_port)
        node.start()
        wait_for("every message filed", lambda: filed(files) == set(ids), node)
        assert metric(node, "spamtrap_output_queue_recovered_total", output="partner") == 10
        wait_for(
            "the queue to empty",
            lambda: metric(node, "spamtrap_output_queue_depth", output="partner") == 0,
            node,
        )
        # Each delivery, duplicates included, carries the message's own id.
        delivered = [ln.split()[0] for ln in (tmp_path / "files.log").read_text().splitlines()]
        assert set(delivered) == set(ids)
        for msg_id in ids:
            assert (files / msg_id).read_bytes().startswith(b"X-Spamtrap-Id: " + msg_id.encode())
        assert node.stop() in CLEAN_EXIT, node.log()
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.stop(signal.SIGKILL)


def test_a_listener_runs_no_outputs(tmp_path: Path) -> None:
    # Outputs run where the pipeline runs; a listener only takes mail.
    config = tmp_path / "spamtrap.yaml"
    config.write_text(
        """node: n1
traps: {domains: [trap.example]}
outputs:
  files: {type: exec, sets: [all], argv: [cat]}
"""
    )
    node = Node(
        tmp_path / "data", config, extra=["--role", "listener", "--queue", "redis://127.0.0.1:1/0"]
    ).start()
    try:
        status, body = health(node)
        assert "outputs" not in body
        assert not (node.data_dir / "outputs").exists()
    finally:
        node.stop()
