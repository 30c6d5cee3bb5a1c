"""Roles and the queue from the command line: real twistd, real redis-server."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.node import REPO, TWISTD, Node, RawSMTP, bundles, free_port, stored_ids
from tests.support.poll import wait_until
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - fixture


def until(check: Callable[[], bool], deadline: float = 30) -> None:
    # Polls real processes: there is no clock to inject across a fork.
    wait_until(check, deadline)


def test_listener_and_worker_through_redis(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text(CONFIG)
    data = tmp_path / "data"  # one data dir shared by both processes
    q = ["--queue", redis_server.url]
    listener = Node(data, cfg, extra=["--node", "L", "--role", "listener", *q]).start()
    worker = None
    try:
        smtp = RawSMTP(listener.host, listener.smtp_port)
        ids = [smtp.send(b"bot@example.net", [b"t@trap.example"], b"Subject: %d\r\n\r\nx\r\n" % i)
               for i in range(20)]  # fmt: skip
        smtp.close()
        # No worker yet: the messages wait in the stream, not in a spool.
        assert int(redis_server.command("XLEN", "spamtrap")) == 20
        assert listener.metric("spamtrap_spool_depth") == 0
        assert listener.metric("spamtrap_queue_added_total") == 20
        assert listener.metric('spamtrap_node_info{node="L",queue="redis",role="listener"}') == 1
        worker = Node(data, cfg, extra=["--node", "W", "--role", "worker", *q]).start()
        assert worker.http_get("/healthz")[1].count(b'"role": "worker"') == 1
        # A worker listens for no SMTP.
        with pytest.raises(OSError):
            RawSMTP(worker.host, worker.smtp_port, timeout=2)
        until(lambda: worker.metric("spamtrap_queue_read_total") == 20)
        assert worker.stop() in (0, -15)
        worker = None
        assert sorted(stored_ids(data)) == sorted(ids)
        # Acked and deleted: the stream holds only unprocessed messages.
        assert int(redis_server.command("XLEN", "spamtrap")) == 0
        assert all(".W." in p.name for p in bundles(data))
    finally:
        for node in (worker, listener):
            if node is not None and node.proc is not None and node.proc.poll() is None:
                node.stop()


def test_tempfail_listener_answers_451_while_redis_is_down(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    cfg = tmp_path / "spamtrap.yaml"
    cfg.write_text(CONFIG.replace("timeout: 1s,", "timeout: 1s, on_unreachable: tempfail,"))
    extra = ["--node", "L", "--role", "listener", "--queue", redis_server.url]
    node = Node(tmp_path / "data", cfg, extra=extra).start()
    try:
        redis_server.kill()
        smtp = RawSMTP(node.host, node.smtp_port)
        smtp.cmd(b"MAIL FROM:<bot@example.net>", 250)
        smtp.cmd(b"RCPT TO:<t@trap.example>", 250)
        smtp.cmd(b"DATA", 354)
        assert b"4.3.0 Queue unavailable" in smtp.cmd(b"x\r\n.", 451)
        smtp.close()
        assert node.metric('spamtrap_messages_rejected_total{reason="queue"}') == 1
        assert node.metric("spamtrap_queue_unreachable_total") == 1
        assert node.metric("spamtrap_spool_depth") == 0
        assert b'"queue": "unreachable"' in node.http_get("/healthz")[1]
    finally:
        node.stop()


def test_a_port_in_use_exits_non_zero(tmp_path: Path) -> None:
    # systemd's Restart=on-failure needs a failed start to look failed.
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out = subprocess.run(
            [str(TWISTD), "-n", "--pidfile=", "spamtrap", "--data-dir", str(tmp_path),
             "--smtp", f"tcp:{port}:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1"],
            cwd=REPO, capture_output=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 1, out.stdout.decode(errors="replace")
    assert b"cannot listen" in out.stdout + out.stderr


CONFIG = """
traps: {catch_all: true}
smtp: {tls: {enabled: false}}
sets:
  all:
    rotate: {max_age: 1s}
queue: {claim_idle: 5s, timeout: 1s, retry_interval: 200ms}
"""
