"""Scaled out, outputs run on the workers (docs/scaling.md): a listener and
a worker, real twistd processes through a real redis-server, with the same
``outputs:``. The worker's exec output gets every message, from its own
queue; the listener takes mail, logs that it leaves outputs to the workers
and keeps no output queue."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.support.node import CLEAN_EXIT, Node, RawSMTP, health, metric, stored_ids, wait_for
from tests.support.outputs import filed, filer
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - fixture

pytestmark = pytest.mark.needs_debian  # redis-server

MESSAGE = b"From: bot@spam.example\r\nSubject: offer %d\r\n\r\ncheap pills %d\r\n"


def send(node: Node, numbers: range) -> list[str]:
    c = RawSMTP(node.host, node.smtp_port)
    c.cmd(b"EHLO client.example", 250)
    ids = [c.send(b"bot@spam.example", [b"t@trap.example"], MESSAGE % (n, n)) for n in numbers]
    c.close()
    return ids


def test_outputs_run_on_the_worker_not_on_the_listener(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    files = tmp_path / "files"
    config = tmp_path / "spamtrap.yaml"
    config.write_text(
        f"""traps: {{catch_all: true}}
smtp: {{tls: {{enabled: false}}}}
sets:
  all:
    rotate: {{max_age: 1s}}
queue: {{claim_idle: 5s, timeout: 1s, retry_interval: 200ms}}
outputs:
  files:
    type: exec
    sets: [all]
    argv: [{filer(tmp_path, "file.sh", files)}]
"""
    )
    queue = ["--queue", redis_server.url]
    # A data dir each: what the listener keeps on disk shows apart.
    listener = Node(tmp_path / "L", config, extra=["--node", "L", "--role", "listener", *queue])
    worker = Node(tmp_path / "W", config, extra=["--node", "W", "--role", "worker", *queue])
    try:
        listener.start()
        # Before any worker runs: the messages wait in Redis, none is output.
        ids = send(listener, range(10))
        assert int(redis_server.command("XLEN", "spamtrap")) == 10
        worker.start()
        ids += send(listener, range(10, 20))  # and while it runs
        wait_for("every message filed", lambda: filed(files) == set(ids), worker)
        for msg_id in ids:
            head = (files / msg_id).read_bytes().split(b"\n", 1)[0]
            assert head == b"X-Spamtrap-Id: " + msg_id.encode()
        # Each delivered once, by the worker (the hook logs id, set, output).
        log = (tmp_path / "files.log").read_text().splitlines()
        assert sorted(line.split()[0] for line in log) == sorted(ids)
        assert {tuple(line.split()[1:]) for line in log} == {("all", "files")}
        wait_for(
            "the worker's output queue to empty",
            lambda: metric(worker, "spamtrap_output_queue_depth", output="files") == 0,
            worker,
        )
        assert metric(worker, "spamtrap_output_sent_total", output="files") == len(ids)
        assert health(worker)[1]["outputs"] == {"files": 0}
        assert (worker.data_dir / "outputs" / "files" / "W").is_dir()
        # The bundles too are the worker's; Redis holds nothing unprocessed.
        wait_for("the bundles", lambda: sorted(stored_ids(worker.data_dir)) == sorted(ids), worker)
        wait_for("the acks", lambda: int(redis_server.command("XLEN", "spamtrap")) == 0, worker)

        # The listener: took every message, runs no output, says so.
        assert listener.metric("spamtrap_queue_added_total") == len(ids)
        status, body = health(listener)
        assert status == 200 and "outputs" not in body and "outputs_failing" not in body
        assert metric(listener, "spamtrap_output_sent_total") == 0
        _, text = listener.http_get("/metrics")
        assert b'spamtrap_output_queue_depth{output="files"}' not in text
        assert not (listener.data_dir / "outputs").exists()
        assert "outputs: not run by a listener; the workers run them" in listener.log()
        assert "not run by a listener" not in worker.log()
        assert worker.stop() in CLEAN_EXIT, worker.log()
        assert listener.stop() in CLEAN_EXIT, listener.log()
    finally:
        for node in (worker, listener):
            if node.proc is not None and node.proc.poll() is None:
                node.stop(signal.SIGKILL)
