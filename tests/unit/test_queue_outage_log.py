"""How a Redis outage is logged: once when it starts, then with backoff
(1 s, 10 s, 1 min, then every 5 min) with its length, and once when Redis
answers again; never once per probe.

The probe's timer runs on a task.Clock; its Redis call runs at once in the
calling thread (SyncPool), against a client that refuses while "down" the
way redis-py does (redis.ConnectionError).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from twisted.internet import task
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from spamtrap.config import QueueConfig
from spamtrap.metrics import Metrics
from spamtrap.work.queue_link import QueueLink, format_duration
from tests.support.doubles import SyncPool


class InlineReactor:
    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        f(*args, **kwargs)


class StartablePool(SyncPool):
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class Redis:
    """Answers XGROUP CREATE like a real server, or refuses while down."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0

    def execute_command(self, *args: Any) -> Any:
        self.calls += 1
        if self.down:
            raise redis.ConnectionError(
                "Error 111 connecting to 127.0.0.1:6399. Connection refused"
            )
        return b"OK"


@pytest.fixture
def lines() -> Iterator[list[tuple[str, str]]]:
    """(level, text) of every spamtrap.work.queue log event."""
    seen: list[tuple[str, str]] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "spamtrap.work.queue":
            seen.append((event["log_level"].name, formatEvent(event)))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def make_link(server: Redis, clock: task.Clock) -> QueueLink:
    cfg = QueueConfig(url="redis://127.0.0.1:6399/0", retry_interval=1.0)
    link = QueueLink(cfg, Metrics(), InlineReactor(), client=server, clock=clock)
    link.pool = StartablePool()  # type: ignore[assignment]
    return link


def test_an_outage_is_logged_with_backoff_and_its_length(lines: list[tuple[str, str]]) -> None:
    clock, server = task.Clock(), Redis()
    link = make_link(server, clock)
    link.start()
    assert link.up and lines == [("info", "Redis redis://127.0.0.1:6399/0 answers")]
    lines.clear()

    server.down = True
    link.mark_down("add: Connection refused")
    probes_before = server.calls
    for _ in range(1000):  # 1000 s of outage, a probe a second
        clock.advance(1)
    assert server.calls - probes_before == 1000  # it did keep trying every second
    assert not link.up
    url = "redis://127.0.0.1:6399/0"
    assert [text.split(" (")[0] for _, text in lines] == [
        f"Redis {url} unreachable",
        f"Redis {url} still unreachable after 1s",
        f"Redis {url} still unreachable after 10s",
        f"Redis {url} still unreachable after 1m",
        f"Redis {url} still unreachable after 5m",
        f"Redis {url} still unreachable after 10m",
        f"Redis {url} still unreachable after 15m",
    ]
    assert all(level == "warn" for level, _ in lines)
    assert "Connection refused" in lines[1][1]
    lines.clear()

    clock.advance(50)  # 1050 s in: nothing new is due before 20 min
    assert lines == []
    server.down = False
    clock.advance(1)
    assert link.up
    assert lines == [("info", f"Redis {url} answers again after 17m31s unreachable")]
    link.stop()


def test_an_outage_at_start_is_logged_at_once_then_with_backoff(
    lines: list[tuple[str, str]],
) -> None:
    clock, server = task.Clock(), Redis()
    server.down = True
    link = make_link(server, clock)
    link.start()
    assert [level for level, _ in lines] == ["warn"]
    assert "unreachable at start" in lines[0][1]
    for _ in range(70):
        clock.advance(1)
    assert len(lines) == 4  # at start, then after 1 s, 10 s and 1 min
    server.down = False
    clock.advance(1)
    assert lines[-1][1].endswith("answers again after 1m11s unreachable")
    link.stop()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (60, "1m"), (61, "1m1s"), (3600, "1h"), (5400, "1h30m")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
