"""The states of a bundle and the one place that moves a bundle between them.

::

     OPEN ──► SEALING ──► READY ──► UPLOADING ──► STORED    (acked, announced)
                            │         │     ▲
                            │ busy,   ▼     │ backoff
                            │ full  RETRY_WAIT
                            ▼
                         SKIPPED                            (acked)

     DROPPED (not acked; the spool replays): from OPEN (write error),
     SEALING (seal error), READY, UPLOADING or RETRY_WAIT (stop cancelled)

- OPEN: in a shard, taking messages (worker threads, under the shard lock).
- SEALING: detached from its shard; the gzip trailer and the fsync are
  queued or running in the store pool.
- READY: sealed, its manifest built; waiting for an upload slot.
- UPLOADING: a ``store.put`` is running.
- RETRY_WAIT: the put failed; a retry is scheduled and the bundle keeps its
  upload slot.
- STORED: object and manifest stored, its messages acknowledged.
- SKIPPED: shed on purpose (``busy``, ``queue-full``, ``backlog-full``); its
  messages are acknowledged all the same.
- DROPPED: given up without acknowledging (a write or seal error, or a
  cancelled stop): the spool replays its messages.

:class:`Lifecycle` makes every move. It refuses moves that are not in
:data:`LEGAL_MOVES`, keeps the per-state counts and the gauges in step, and
is safe to call from any thread: after a bundle leaves OPEN exactly one
thread (first the store pool, then the reactor) owns it.
"""

from __future__ import annotations

import enum
import threading
from typing import Any, Protocol


class BundleState(enum.Enum):
    OPEN = "open"
    SEALING = "sealing"
    READY = "ready"
    UPLOADING = "uploading"
    RETRY_WAIT = "retry_wait"
    STORED = "stored"
    SKIPPED = "skipped"
    DROPPED = "dropped"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


S = BundleState
TERMINAL = frozenset({S.STORED, S.SKIPPED, S.DROPPED})
# States between leaving the shard and an end: what stop() waits for.
IN_FLIGHT = frozenset({S.SEALING, S.READY, S.UPLOADING, S.RETRY_WAIT})
# What spamtrap_bundles_waiting has always counted: finished, not stored yet.
WAITING = frozenset({S.READY, S.UPLOADING, S.RETRY_WAIT})
# Live states, shown by the spamtrap_bundles_state gauge (terminal ones are
# counters: spamtrap_bundles, spamtrap_bundles_skipped, spamtrap_bundles_dropped).
LIVE = (S.OPEN, S.SEALING, S.READY, S.UPLOADING, S.RETRY_WAIT)

LEGAL_MOVES: dict[BundleState, frozenset[BundleState]] = {
    S.OPEN: frozenset({S.SEALING, S.DROPPED}),
    S.SEALING: frozenset({S.READY, S.DROPPED}),
    S.READY: frozenset({S.UPLOADING, S.SKIPPED, S.DROPPED}),
    S.UPLOADING: frozenset({S.STORED, S.RETRY_WAIT, S.DROPPED}),
    S.RETRY_WAIT: frozenset({S.UPLOADING, S.DROPPED}),
    S.STORED: frozenset(),
    S.SKIPPED: frozenset(),
    S.DROPPED: frozenset(),
}


class IllegalMoveError(RuntimeError):
    """A bundle was asked to make a move its lifecycle does not allow: a bug."""

    def __init__(self, set_name: str, key: str, source: BundleState, target: BundleState) -> None:
        allowed = ", ".join(sorted(s.name for s in LEGAL_MOVES[source])) or "none (final)"
        super().__init__(
            f"set {set_name}: bundle {key}: illegal move {source.name} -> {target.name} "
            f"(from {source.name}: {allowed})"
        )
        self.set_name = set_name
        self.key = key
        self.source = source
        self.target = target


class Tracked(Protocol):
    """What the lifecycle needs of a bundle."""

    key: str
    state: BundleState


class Lifecycle:
    """The moves of one set's bundles, their counts and their gauges.

    ``state_gauge`` is the labelled ``spamtrap_bundles_state`` gauge (labels
    ``set`` and ``state``); ``open_gauge`` and ``waiting_gauge`` are children
    bound to the set. Any may be None."""

    def __init__(
        self,
        set_name: str,
        state_gauge: Any = None,
        open_gauge: Any = None,
        waiting_gauge: Any = None,
    ) -> None:
        self.set_name = set_name
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(BundleState, 0)
        self._state_gauges = (
            {s: state_gauge.labels(set=set_name, state=s.value) for s in LIVE}
            if state_gauge is not None
            else {}
        )
        for g in self._state_gauges.values():
            g.set(0)
        self._open_gauge = open_gauge
        self._waiting_gauge = waiting_gauge

    def enter(self, bundle: Tracked) -> None:
        """A new bundle starts OPEN."""
        bundle.state = S.OPEN
        with self._lock:
            self._counts[S.OPEN] += 1
            self._show(S.OPEN)

    def move(self, bundle: Tracked, target: BundleState) -> None:
        """The only way a bundle changes state. Raises IllegalMoveError (and
        changes nothing) unless the move is in LEGAL_MOVES."""
        with self._lock:
            source = bundle.state
            if target not in LEGAL_MOVES[source]:
                raise IllegalMoveError(self.set_name, bundle.key, source, target)
            bundle.state = target
            self._counts[source] -= 1
            self._counts[target] += 1
            self._show(source)
            self._show(target)

    def count(self, *states: BundleState) -> int:
        with self._lock:
            return sum(self._counts[s] for s in states)

    @property
    def in_flight(self) -> int:
        """Bundles out of their shard and not yet at an end."""
        return self.count(*IN_FLIGHT)

    def _show(self, state: BundleState) -> None:
        # With the lock held, so concurrent moves cannot set a stale value.
        gauge = self._state_gauges.get(state)
        if gauge is not None:
            gauge.set(self._counts[state])
        if state is S.OPEN and self._open_gauge is not None:
            self._open_gauge.set(self._counts[S.OPEN])
        if state in WAITING and self._waiting_gauge is not None:
            self._waiting_gauge.set(sum(self._counts[s] for s in WAITING))
