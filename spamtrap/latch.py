"""A failure latch: what health reports while writes fail (a full disk).

The spool's appends and the bundle sets' writes both keep ``(reason,
since)`` from the first failure of an outage until the next success, and
log the outage twice: when it begins and when it ends, never each failure
in between. A latch is safe to use from any thread.
"""

from __future__ import annotations

import threading

from spamtrap.interfaces import ReactorTime


class FailureLatch:
    def __init__(self, clock: ReactorTime) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._failure: tuple[str, float] | None = None

    @property
    def failure(self) -> tuple[str, float] | None:
        """``(reason, since)`` while failing, e.g. ``("No space left on
        device", <clock seconds of the first failure>)``; else None."""
        return self._failure

    def failed(self, reason: str) -> bool:
        """A failure: True when it begins an outage (log it), False while
        one is already latched."""
        with self._lock:
            if self._failure is not None:
                return False
            self._failure = (reason, self._clock.seconds())
            return True

    def succeeded(self) -> tuple[str, float] | None:
        """A success: ``(reason, seconds it lasted)`` when it ends an outage
        (log it), else None. Cheap when nothing is latched."""
        if self._failure is None:
            return None
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is None:
            return None
        reason, since = failure
        return reason, self._clock.seconds() - since
