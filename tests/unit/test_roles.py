"""Roles and the queue from the command line, parsed in-process: options,
config errors, passwords kept out of logs, stream entries."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamtrap.config import ConfigError, parse_config
from spamtrap.service.compose import Options
from spamtrap.work import queue_link, queue_source

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
    assert queue_link.describe("rediss://user:secret@10.1.2.3:6380/1") == "rediss://10.1.2.3:6380/1"


@given(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))
def test_stream_ids_round_trip(ms: int, seq: int) -> None:
    assert queue_link.parse_id(queue_link.format_id((ms, seq))) == (ms, seq)


@given(st.lists(st.binary(max_size=8), max_size=8), st.binary())
def test_entry_fields_are_read_whatever_else_they_hold(extra: list[bytes], record: bytes) -> None:
    # Fields come from Redis, written by any client: only ours is read.
    fields = [b"x" + f for f in extra[: len(extra) // 2 * 2]] + [queue_link.RECORD, record]
    assert queue_source._record(fields) == record
    assert queue_source._record(None) is None and queue_source._record([]) is None
    assert queue_source._record([b"other", b"value"]) is None
