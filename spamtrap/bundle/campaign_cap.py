"""A set's ``per_campaign_cap``: at most N messages of one campaign per bundle.

The pipeline hands each bundle entry its campaign id (the fifth element of
an :data:`~spamtrap.bundle.file.Item`); the shard writer asks its shard's
:class:`CampaignCap` which entries the bundle keeps, with the shard's lock
held, so the count is exact whatever the threads and however the shards
rotate: it is the bundle's own count, and a new bundle starts from zero.

An entry left out is *sampled out*: it is counted
(``spamtrap_campaign_sampled_out_total{set}``) and its token joins the
bundle's tokens without its bytes, so its message is acknowledged when the
bundle holding its campaign's first N copies is stored, like every other
message of that bundle, and replayed with them if that bundle is lost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any


def campaign_of(item: Sequence[Any]) -> str | None:
    """An item's campaign id, None when it carries none."""
    return item[4] if len(item) > 4 else None


class CampaignCap:
    """The per-campaign counts of one shard's open bundle. Not thread-safe:
    the shard writer calls it with the shard's lock held."""

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError("a campaign cap must be at least 1")
        self.cap = cap
        self._bundle: object = None
        self._counts: Counter[str] = Counter()

    def split(self, bundle: object, items: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """The items ``bundle`` keeps, in order, and the tokens of those it
        leaves out; counts the kept ones against ``bundle``."""
        if bundle is not self._bundle:
            self._bundle = bundle
            self._counts = Counter()
        counts = self._counts
        kept: list[Any] = []
        sampled: list[Any] = []
        for item in items:
            campaign = campaign_of(item)
            if campaign is not None:
                if counts[campaign] >= self.cap:
                    sampled.append(item[2])
                    continue
                counts[campaign] += 1
            kept.append(item)
        return kept, sampled
