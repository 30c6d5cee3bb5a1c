"""Exact dedup per set within a time window.

A dictionary attack sends one message to thousands of trap addresses; a
shared set needs one copy, not thousands. Two messages are copies when they
have the same fingerprint: a hash of

- the body (every byte after the message's header block), and
- the ``Subject`` and ``From`` header fields (unfolded, each name's values
  in order).

Every other header field is ignored: ``Received``, ``Date``,
``Message-ID``, ``To`` and the rest differ between the copies of one
attack, and spamtrap's own ``X-Spamtrap-*`` block and trap-hop ``Received``
line are not part of ``env.data`` at all. Hash the redacted envelope when
the set redacts: copies that differed only in the trap address then match
too, if the addresses have the same length.

The first copy is kept and starts the window; later copies within
``window`` seconds of it are dropped (the window is not extended by the
copies, so a long attack still yields one copy per window). Fingerprints are
64-bit BLAKE2b digests (a false match among a million entries has odds of
about 1 in 30 million) kept in time slices of ``window / SLICES``: one is
forgotten between ``window`` and ``window * (1 + 1/SLICES)`` after it was
recorded. At most ``max_entries`` are kept; beyond that the oldest slice is
dropped first.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from typing import Any

from spamtrap.message import Envelope
from spamtrap.mime import header_fields, split_message

SLICES = 16
MAX_ENTRIES = 1_000_000
FINGERPRINT_FIELDS = ("subject", "from")


def fingerprint(env: Envelope) -> int:
    """The message's dedup fingerprint (see the module docstring)."""
    head, body = split_message(env.data)
    digest = hashlib.blake2b(digest_size=8)
    fields = header_fields(head)
    for name in FINGERPRINT_FIELDS:
        for value in (v for n, v in fields if n == name):
            digest.update(b"%s:%s\0" % (name.encode(), value.encode("utf-8", "surrogateescape")))
        digest.update(b"\0")
    digest.update(body)
    return int.from_bytes(digest.digest(), "big")


class Deduper:
    """Remembers fingerprints for one set. ``clock`` is an IReactorTime."""

    def __init__(self, window: float, clock: Any, max_entries: int = MAX_ENTRIES) -> None:
        if window <= 0:
            raise ValueError("dedup window must be positive")
        self.window = window
        self._clock = clock
        self._max = max_entries
        self._slice = window / SLICES
        # (start time, fingerprints recorded from then on), oldest first
        self._slices: deque[tuple[float, set[int]]] = deque()
        self._size = 0
        # Called from many worker threads at once.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._size

    def seen(self, env: Envelope) -> bool:
        """True if a copy of ``env`` was seen within the window (drop it);
        otherwise remember it and return False. Thread-safe."""
        key = fingerprint(env)  # outside the lock: it reads the whole body
        with self._lock:
            now = self._clock.seconds()
            self._expire(now)
            if any(key in fingerprints for _, fingerprints in self._slices):
                return True
            while self._size >= self._max:
                self._drop_oldest()
            if not self._slices or now >= self._slices[-1][0] + self._slice:
                self._slices.append((now, set()))
            self._slices[-1][1].add(key)
            self._size += 1
            return False

    def _expire(self, now: float) -> None:
        # A slice's entries were all recorded before start + slice length;
        # once that is a whole window ago, none of them can match any more.
        while self._slices and self._slices[0][0] + self._slice <= now - self.window:
            self._size -= len(self._slices.popleft()[1])

    def _drop_oldest(self) -> None:
        # At the cap: the oldest slice goes, or, when a burst filled the cap
        # within one slice, that slice's contents.
        if len(self._slices) > 1:
            self._size -= len(self._slices.popleft()[1])
        else:
            self._size -= len(self._slices[0][1])
            self._slices[0][1].clear()
