"""The Redis Streams work queue's ids, without a server; the queue itself
against a real redis-server is in tests/integration/test_queue.py."""

from __future__ import annotations

from spamtrap.work.queue_link import format_id, parse_id


def test_ids_round_trip() -> None:
    assert parse_id(b"1700000000000-5") == (1700000000000, 5)
    assert format_id((1700000000000, 5)) == b"1700000000000-5"
