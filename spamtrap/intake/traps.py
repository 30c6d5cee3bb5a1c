"""Which recipients are traps, and which are feed addresses.

Any other recipient is refused at RCPT with 550: spamtrap never relays.
"""

from __future__ import annotations

from dataclasses import dataclass

from spamtrap.config import FeedConfig, TrapConfig


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    feed: str | None = None


REFUSED = Verdict(False)
TRAP = Verdict(True)


class TrapMatcher:
    def __init__(self, traps: TrapConfig, feeds: list[FeedConfig]) -> None:
        self.catch_all = traps.catch_all
        self.domains = frozenset(d.lower().rstrip(".") for d in traps.domains)
        self.addresses = frozenset(a.lower() for a in traps.addresses)
        self.patterns = list(traps.patterns)
        self.feeds = {f.address.lower(): f.id for f in feeds}

    def classify(self, address: str) -> Verdict:
        """Classify an RCPT TO address (brackets and source route removed)."""
        addr = address.lower()
        feed = self.feeds.get(addr)
        if feed is not None:
            return Verdict(True, feed)
        if self.catch_all or addr in self.addresses:
            return TRAP
        _, at, domain = addr.rpartition("@")
        if at and domain.rstrip(".") in self.domains:
            return TRAP
        if any(p.search(address) for p in self.patterns):
            return TRAP
        return REFUSED
