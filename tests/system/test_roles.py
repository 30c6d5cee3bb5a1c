"""Roles and the queue from the command line: real twistd, real redis-server."""

from __future__ import annotations

import gzip
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamtrap.config import ConfigError, parse_config
from spamtrap.service.compose import Options
from spamtrap.work import queue
from tests.support.node import REPO, TWISTD, Node, RawSMTP, bundles, free_port
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - fixture

CONFIG = """
traps: {catch_all: true}
smtp: {tls: {enabled: false}}
sets:
  all:
    rotate: {max_age: 1s}
queue: {claim_idle: 5s, timeout: 1s, retry_interval: 200ms}
"""


def options(*args: str) -> Options:
    o = Options()
    o.parseOptions(list(args))
    return o


def test_role_and_queue_options() -> None:
    o = options("--role", "listener", "--queue", "redis://u:secret@127.0.0.1:6390/2")
    assert o.config.role == "listener"
    assert o.config.queue.url == "redis://u:secret@127.0.0.1:6390/2"
    assert options().config.role == "all" and options().config.queue.url is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "worker"], "needs a queue"),
        (["--role", "listener"], "needs a queue"),
        (["--role", "boss", "--queue", "redis://127.0.0.1"], "one of all, listener, worker"),
        (["--queue", "http://127.0.0.1:6379"], "expected redis://"),
        (["--queue", "redis://127.0.0.1:6379/x"], "must be a number"),
    ],
)
def test_bad_role_or_queue_is_a_usage_error(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        options(*args)
    assert exit_info.value.code == 1
    assert re.search(message, capsys.readouterr().err)


def test_worker_without_filter_workers_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("traps: {catch_all: true}\nfilters: {workers: 0}\n")
    with pytest.raises(SystemExit) as exit_info:
        options("--config", str(cfg), "--role", "worker", "--queue", "redis://127.0.0.1")
    assert exit_info.value.code == 1
    assert "would process nothing" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("role: listener\n", "role: role 'listener' needs queue.url"),
        ("role: worker\nfilters: {workers: 0}\nqueue: {url: 'redis://h'}\n", "process nothing"),
        ("queue: {url: 'redis://h', password: a, password_file: /x}\n", "not both"),
        ("queue: {url: 'rediss://h:6380', on_unreachable: drop}\n", "known: spool, tempfail"),
        ("queue: {url: 'redis://h', connections: 1}\n", "queue.connections"),
    ],
)
def test_queue_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config("traps: {catch_all: true}\n" + text)


def test_passwords_stay_out_of_logs() -> None:
    assert queue.describe("rediss://user:secret@10.1.2.3:6380/1") == "rediss://10.1.2.3:6380/1"


@given(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))
def test_stream_ids_round_trip(ms: int, seq: int) -> None:
    assert queue.parse_id(queue.format_id((ms, seq))) == (ms, seq)


@given(st.lists(st.binary(max_size=8), max_size=8), st.binary())
def test_entry_fields_are_read_whatever_else_they_hold(extra: list[bytes], record: bytes) -> None:
    # Fields come from Redis, written by any client: only ours is read.
    fields = [b"x" + f for f in extra[: len(extra) // 2 * 2]] + [queue.RECORD, record]
    assert queue._record(fields) == record
    assert queue._record(None) is None and queue._record([]) is None
    assert queue._record([b"other", b"value"]) is None


def until(check: Callable[[], bool], deadline: float = 30) -> None:
    # Polls real processes: there is no clock to inject across a fork.
    end = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.05)


def stored_ids(data_dir: Path) -> list[str]:
    out = []
    for path in bundles(data_dir):
        for line in gzip.decompress(path.read_bytes()).split(b"\n"):
            if line.startswith(b"X-Spamtrap-Id: "):
                out.append(line.split(b": ", 1)[1].strip().decode())
    return out


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
