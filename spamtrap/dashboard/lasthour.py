"""The dashboard's last-hour aggregates, in bounded memory.

The last hour is a ring of 60 per-minute buckets. Each bucket holds the
messages accepted in that minute and, per dimension (HELO name, SMTP
dialect, peer network, campaign), a :class:`SpaceSaving` counter of at most
``2k`` keys. A bucket is reused (cleared) when its minute comes round
again, so memory never grows with traffic: at most 60 x dimensions x 2k
keys, each of at most :data:`MAX_LABEL` characters.

Space-saving (Metwally et al., 2005) keeps the heaviest keys of a stream
in a fixed number of counters: a new key, with every counter taken, takes
the place of the smallest and inherits its count. Every key seen often
enough in a minute is kept, and no count is too low; a count may be too
high by at most the inherited part (``errors``). Here eviction is batched
(:class:`SpaceSaving`), which keeps the cost per message at a few dict
operations. The hour's top is the sum, per key, of the minutes' counters:
a key too rare to stay in a minute's counters counts only for the minutes
it was kept in.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from spamtrap.interfaces import ReactorTime

MINUTE = 60
MINUTES = 60  # the ring: the last hour
TOP_K = 32  # counters per dimension per minute
MAX_LABEL = 80  # characters of a key kept (a HELO may be 500 bytes)
DIMENSIONS = ("campaign", "dialect", "helo", "peer")

# An address-like word: its local part is masked, so a HELO (or any other
# sender-controlled value) that names a trap address never shows it.
_ADDRESS = re.compile(r"[^\s@<>\"']+@")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"({_OCTET}\.{_OCTET}\.{_OCTET})\.{_OCTET}")


class SpaceSaving:
    """The heaviest keys of a stream in at most ``2 * k`` counters.

    Space-saving with batched eviction: counters are added freely until
    there are 2k, then only the k largest are kept (one sort per k new
    keys instead of a scan for the smallest at every new key). ``floor`` is
    the largest count evicted so far; a new key starts from it, so no count
    is ever too low, and ``errors`` says by how much one may be too high."""

    __slots__ = ("k", "counts", "errors", "floor")

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        self.k = k
        self.counts: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.floor = 0

    def add(self, key: str, n: int = 1) -> None:
        counts = self.counts
        if key in counts:
            counts[key] += n
            return
        floor = self.floor
        counts[key] = floor + n
        if floor:
            self.errors[key] = floor
        if len(counts) >= 2 * self.k:
            self._evict()

    def _evict(self) -> None:
        ranked = sorted(self.counts.items(), key=lambda kv: kv[1], reverse=True)
        self.floor = max(self.floor, ranked[self.k][1])
        self.counts = dict(ranked[: self.k])
        self.errors = {key: e for key, e in self.errors.items() if key in self.counts}

    def clear(self) -> None:
        self.counts.clear()
        self.errors.clear()
        self.floor = 0

    def top(self, n: int) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


class _Minute:
    __slots__ = ("minute", "accepted", "tops")

    def __init__(self, k: int) -> None:
        self.minute = -1
        self.accepted = 0
        self.tops = {d: SpaceSaving(k) for d in DIMENSIONS}

    def reset(self, minute: int) -> None:
        self.minute = minute
        self.accepted = 0
        for counter in self.tops.values():
            counter.clear()


class LastHour:
    """Accepted messages per minute and the top keys of the last hour."""

    def __init__(self, clock: ReactorTime, k: int = TOP_K) -> None:
        self._clock = clock
        self._ring = [_Minute(k) for _ in range(MINUTES)]

    def _now(self) -> int:
        return int(self._clock.seconds() // MINUTE)

    def _bucket(self) -> _Minute:
        minute = self._now()
        bucket = self._ring[minute % MINUTES]
        if bucket.minute != minute:
            bucket.reset(minute)
        return bucket

    def accepted(self, keys: Iterable[tuple[str, str]] = ()) -> None:
        """One message accepted, with its ``(dimension, key)`` pairs."""
        bucket = self._bucket()
        bucket.accepted += 1
        tops = bucket.tops
        for dimension, key in keys:
            if "@" in key or len(key) > MAX_LABEL:
                key = label(key)
            tops[dimension].add(key)

    def count(self, dimension: str, key: str, n: int = 1) -> None:
        """Count ``key`` (sender-controlled text is fine: it is cut to
        MAX_LABEL characters and address local parts are masked)."""
        self._bucket().tops[dimension].add(label(key), n)

    def count_many(self, keys: Iterable[tuple[str, str]]) -> None:
        bucket = self._bucket()
        for dimension, key in keys:
            bucket.tops[dimension].add(label(key))

    def _live(self) -> list[_Minute]:
        oldest = self._now() - MINUTES + 1
        return [b for b in self._ring if b.minute >= oldest]

    def per_minute(self) -> list[int]:
        """Messages accepted in each of the last 60 minutes, oldest first;
        the last is the current (partial) minute."""
        now = self._now()
        counts = [0] * MINUTES
        for b in self._live():
            counts[MINUTES - 1 - (now - b.minute)] = b.accepted
        return counts

    def top(self, dimension: str, n: int = 10) -> list[tuple[str, int]]:
        """The ``n`` heaviest keys of the last hour, heaviest first."""
        total: dict[str, int] = {}
        for b in self._live():
            for key, count in b.tops[dimension].counts.items():
                total[key] = total.get(key, 0) + count
        return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def label(value: str) -> str:
    """A key as shown: address local parts masked, at most MAX_LABEL characters."""
    if "@" in value:
        value = _ADDRESS.sub("*@", value)
    if len(value) > MAX_LABEL:
        value = value[: MAX_LABEL - 1] + "\u2026"
    return value


def network_of(peer: str) -> str | None:
    """The /24 (IPv4) or /48 (IPv6) of a ``peer`` metadata value
    (``"<address> <port>"``); None for anything that is not an address."""
    host = peer.partition(" ")[0]
    v4 = _IPV4.fullmatch(host)
    if v4 is not None:  # the common case, without ipaddress's 20 µs
        return v4.group(1) + ".0/24"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
