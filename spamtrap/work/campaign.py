"""Campaigns: every kept message gets ``X-Spamtrap-Campaign: <id>``.

Near-copies (one template, sent with a new Message-ID, To, Date and random
tokens each time) share an id; different campaigns get different ids. The
content is reduced to a MinHash sketch (spamtrap.work.campaign_sketch) and
looked up in a :class:`CampaignIndex` by the sketch's LSH bands: a dict
from band key to campaign, so a lookup costs BANDS dict reads whatever the
number of campaigns remembered.

Of the campaigns that share a band with a message, the one whose first
member's sketch is most like the message's takes it, if they agree on at
least JOIN_SIMILARITY of their bins; otherwise the message starts a
campaign, whose id is derived from its own sketch. Each member adds the
bands it brings, up to MAX_KEYS per campaign, so a campaign that drifts
slowly stays one campaign, and no campaign grows without bound.

Ids: 16 hex digits of a BLAKE2b digest of the first member's sketch. The
sketch depends only on the normalised content, so a restarted node, or
another node, gives the same id whenever its first message of a campaign
normalises like ours did (usual when copies differ only in masked tokens),
and a different one otherwise: ids are stable within a node for the window,
and only often, not always, equal across nodes.

Memory and time are bounded: at most ``campaigns.max_campaigns`` are
remembered, the least recently seen go first, and a campaign not seen for
``campaigns.window`` is forgotten. The index is shared by the pipeline's
threads: the sketch is computed outside its lock, the lookup inside.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from spamtrap.interfaces import ReactorTime
from spamtrap.message import Envelope
from spamtrap.metrics import Metrics
from spamtrap.work.campaign_sketch import BANDS, Sketch, band_keys, message_sketch, similarity

MAX_KEYS = 2 * BANDS  # band keys one campaign may hold
# A message joins a campaign that shares a band with it if its sketch and
# the campaign's first member's agree on JOIN_SIMILARITY of the bins (the
# estimated Jaccard similarity of their word pairs: near-copies measure 0.4
# and more, different templates under 0.2). The CANDIDATES campaigns with
# the most shared bands are compared.
JOIN_SIMILARITY = 0.3
CANDIDATES = 3
ID_BYTES = 8


def campaign_id(s: Sketch) -> str:
    """The id a campaign whose first member has sketch ``s`` gets."""
    digest = hashlib.blake2b(digest_size=ID_BYTES, person=b"spamtrap-camp")
    digest.update(array("I", s).tobytes())
    return digest.hexdigest()


@dataclass(eq=False, slots=True)
class Campaign:
    id: str
    sketch: array[int]  # the first member's, packed
    keys: list[int]  # band keys that point to it
    last_seen: float


@dataclass
class Lookup:
    """What :meth:`CampaignIndex.assign` did with one sketch."""

    campaign: str
    new: bool  # the message started the campaign


@dataclass
class CampaignIndex:
    """Band key -> campaign, bounded in count and age. ``clock`` is an
    IReactorTime (task.Clock in tests). Thread-safe."""

    clock: ReactorTime
    window: float = 86400.0
    max_campaigns: int = 50_000
    _bands: dict[int, Campaign] = field(default_factory=dict, init=False)
    # Least recently seen first.
    _recent: OrderedDict[str, Campaign] = field(default_factory=OrderedDict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    forgotten: int = field(default=0, init=False)  # expired or evicted, ever

    def __post_init__(self) -> None:
        if self.window <= 0 or self.max_campaigns < 1:
            raise ValueError("a campaign index needs a positive window and max_campaigns")

    def __len__(self) -> int:
        return len(self._recent)

    @property
    def band_entries(self) -> int:
        return len(self._bands)

    def assign(self, s: Sketch) -> Lookup:
        """The campaign of a message with sketch ``s`` (see the module
        docstring); the campaign is remembered as seen now."""
        keys = band_keys(s)
        with self._lock:
            now = self.clock.seconds()
            self._expire(now)
            bands = self._bands
            campaign = self._nearest(s, keys)
            new = campaign is None
            if campaign is None:
                campaign = self._start(s, now)
            else:
                self._recent.move_to_end(campaign.id)
            campaign.last_seen = now
            room = MAX_KEYS - len(campaign.keys)
            for key in keys:
                if room <= 0:
                    break
                if key not in bands:
                    bands[key] = campaign
                    campaign.keys.append(key)
                    room -= 1
            return Lookup(campaign.id, new)

    def _nearest(self, s: Sketch, keys: list[int]) -> Campaign | None:
        """Of the campaigns that share a band with ``s``, the one whose first
        member's sketch is most similar to it, if that is similar enough."""
        hits = [c for c in map(self._bands.get, keys) if c is not None]
        if not hits:
            return None
        # Usually every hit is one campaign: no need to count.
        first = hits[0]
        if all(c is first for c in hits):
            candidates = [first]
        else:
            candidates = [c for c, _ in Counter(hits).most_common(CANDIDATES)]
        best, best_similarity = None, JOIN_SIMILARITY
        for campaign in candidates:
            alike = similarity(s, campaign.sketch)
            if alike >= best_similarity:
                best, best_similarity = campaign, alike
        return best

    def _start(self, s: Sketch, now: float) -> Campaign:
        while len(self._recent) >= self.max_campaigns:
            self._forget(next(iter(self._recent.values())))
        cid = campaign_id(s)
        old = self._recent.get(cid)
        if old is not None:
            # The same first sketch again (its bands were taken by others
            # since): one campaign, one id.
            self._forget(old)
        campaign = Campaign(cid, array("I", s), [], now)
        self._recent[cid] = campaign
        return campaign

    def _expire(self, now: float) -> None:
        horizon = now - self.window
        recent = self._recent
        while recent:
            oldest = next(iter(recent.values()))
            if oldest.last_seen > horizon:
                return
            self._forget(oldest)

    def _forget(self, campaign: Campaign) -> None:
        del self._recent[campaign.id]
        bands = self._bands
        for key in campaign.keys:
            if bands.get(key) is campaign:
                del bands[key]
        self.forgotten += 1

    def expire(self) -> None:
        """Forget the campaigns not seen for the window (assign does it too)."""
        with self._lock:
            self._expire(self.clock.seconds())


class CampaignAssigner:
    """Sets ``meta["campaign"]`` on messages, in the pipeline's threads,
    and counts what it did (new campaigns, campaigns remembered)."""

    def __init__(self, index: CampaignIndex, metrics: Metrics) -> None:
        self.index = index
        self._new = metrics.campaigns_new
        self._tracked = metrics.campaigns_tracked

    def assign(self, env: Envelope) -> str:
        """The message's campaign id, also set as its ``campaign`` metadata."""
        result = self.index.assign(message_sketch(env.data))
        env.meta["campaign"] = [result.campaign]
        if result.new:
            self._new.inc()
        self._tracked.set(len(self.index))
        return result.campaign
