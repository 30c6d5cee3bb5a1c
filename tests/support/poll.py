"""The one way integration and system tests wait for a real server: poll a
condition until it holds or a deadline passes.

Unit tests never wait: they move a ``task.Clock``. A real process or a real
socket has no clock to move, so the tests that drive them poll, always
through these helpers and always with a deadline, so that a condition that
never comes fails the test with what was awaited instead of hanging it.

``wait_until`` blocks (for tests that drive a subprocess from the test's
own thread); ``until`` lets the reactor run while it waits (for tests whose
server runs in-process on the test reactor).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater

INTERVAL = 0.05  # seconds between two looks at a real server


def wait_until(
    check: Callable[[], object],
    deadline: float,
    what: str = "the condition",
    interval: float = INTERVAL,
    *,
    retry_on: tuple[type[BaseException], ...] = (),
) -> float:
    """Poll ``check`` until it is true; the seconds it took.

    A ``check`` that raises one of ``retry_on`` (a server still starting or
    being restarted) counts as false. TimeoutError naming ``what`` once
    ``deadline`` seconds have passed."""
    start = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - start
        except retry_on:
            pass  # not answering yet: ask again
        if time.monotonic() - start > deadline:
            raise TimeoutError(f"{what} not reached in {deadline:g}s")
        time.sleep(interval)


async def until(
    condition: Callable[[], object],
    timeout: float = 5.0,
    what: str = "the condition",
    interval: float = 0.005,
    reactor: Any = None,
    before: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Let the real reactor run until ``condition()`` holds (real I/O only).

    ``before``, if given, is awaited before each look (say, a turn through
    a thread pool, so that the results of the work already in it are in).
    AssertionError naming ``what`` after ``timeout`` seconds."""
    clock: Any = reactor if reactor is not None else _reactor
    deadline = time.monotonic() + timeout
    while True:
        if before is not None:
            await before()
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await deferLater(clock, interval, lambda: None)
