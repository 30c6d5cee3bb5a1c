"""The failure latch the spool and the bundle sets report write outages with."""

from __future__ import annotations

import threading

from twisted.internet import task

from spamtrap.latch import FailureLatch


def test_an_outage_is_reported_when_it_begins_and_when_it_ends() -> None:
    clock = task.Clock()
    clock.advance(100)
    latch = FailureLatch(clock)
    assert latch.failure is None and latch.succeeded() is None
    assert latch.failed("No space left on device") is True  # log this one
    clock.advance(30)
    assert latch.failed("Input/output error") is False  # still the same outage
    assert latch.failure == ("No space left on device", 100.0)
    assert latch.succeeded() == ("No space left on device", 30.0)  # log the end
    assert latch.failure is None and latch.succeeded() is None
    assert latch.failed("again") is True  # a new outage


def test_threads_racing_begin_and_end_one_outage_each() -> None:
    latch = FailureLatch(task.Clock())
    began: list[bool] = []
    start = threading.Barrier(8)

    def fail() -> None:
        start.wait()
        began.append(latch.failed("full"))

    threads = [threading.Thread(target=fail) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert began.count(True) == 1
    ended = [latch.succeeded() for _ in range(3)]
    assert ended[0] is not None and ended[1:] == [None, None]
