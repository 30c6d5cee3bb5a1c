"""A ``task.Clock`` for in-process tests of components that also run work
in real threads (the spool's writer, the filter and store pools).

Timers fire only when the test moves the clock, so no test waits out a
real ``commit``, batch or retry delay. What a pool thread hands back
(``callFromThread``) still goes through the real reactor, since a thread
cannot be driven by a clock; each such result wakes ``settle``, which
waits for it as an event instead of sleeping and polling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock


class ThreadedClock(Clock):
    """Timers under the test's control; the way back from threads real."""

    def __init__(self, reactor: Any = None) -> None:
        super().__init__()
        self._real: Any = reactor if reactor is not None else global_reactor
        self._waiters: list[defer.Deferred[None]] = []

    # IReactorFromThreads, for deferToThreadPool and the spool's writer.
    def callFromThread(self, f: Callable[..., object], *args: object, **kw: object) -> None:
        self._real.callFromThread(self._deliver, f, args, kw)

    def _deliver(self, f: Callable[..., object], args: tuple[object, ...], kw: Any) -> None:
        try:
            f(*args, **kw)
        finally:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    async def settle(
        self,
        done: Callable[[], object],
        what: str = "the condition",
        *,
        step: float = 0.05,
        grace: float = 0.2,
        timeout: float = 30.0,
    ) -> None:
        """Run until ``done()`` holds, alternating two moves: fire the timers
        due within ``step`` seconds of the clock's time (moving the clock to
        the first), then wait for the next result from a thread. The second
        move keeps a polling timer (``Pipeline.drain``) from racing the
        clock ahead while a thread works; if no result comes within
        ``grace`` real seconds and a timer is due, the clock moves again.
        ``timeout`` (real seconds) catches a hung thread, or a condition
        nothing left can make true, and fails naming ``what``."""
        # Typed loosely: Clock's zope-declared methods do not type-check.
        clock: Any = self
        deadline = self._real.seconds() + timeout
        moved = False  # the clock moved since the last thread result
        while not done():
            now = clock.seconds()
            due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= now + step]
            if due and not moved:
                clock.advance(max(0.0, min(due) - now))
                moved = True
                continue
            remaining = deadline - self._real.seconds()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out waiting for {what}; clock at {clock.seconds():.2f}s, "
                    f"timers pending at {sorted(c.getTime() for c in clock.getDelayedCalls())}"
                )
            woken: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(woken)
            woken.addTimeout(min(remaining, grace) if due else remaining, self._real)
            try:
                await woken
            except defer.TimeoutError:
                pass  # checked above: the deadline, or a due timer to fire
            finally:
                if woken in self._waiters:
                    self._waiters.remove(woken)
            moved = False

    async def run(self, d: defer.Deferred[Any], what: str = "the operation") -> Any:
        """``d``'s result, moving the clock and waiting for threads as
        ``settle`` does until it fires."""
        await self.settle(lambda: d.called, what)
        return await d
