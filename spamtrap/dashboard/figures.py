"""What the dashboard shows, as one JSON document.

Almost every figure is read from the node's own Prometheus registry, so the
page and ``/metrics`` cannot disagree; the rest comes from the last-hour
aggregates (:mod:`spamtrap.dashboard.lasthour`) and the last bundles each
set stored. :class:`Dashboard` builds the document at most once a second,
whatever the number of browsers polling it.

Privacy: nothing here carries a trap address, a set's token or the
dashboard's token. A private set appears only in ``private_sets``, as
counts summed over all private sets: no name, no bundle key, no link.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from spamtrap.bundle.manifest import Published
from spamtrap.config import Config
from spamtrap.dashboard.lasthour import DIMENSIONS, LastHour, label, network_of
from spamtrap.intake.parse import dialect_family
from spamtrap.interfaces import Intake, ReactorTime
from spamtrap.message import Envelope, iso_time
from spamtrap.metrics import Metrics
from spamtrap.store.published import download_url

log = Logger()

LAST_BUNDLES = 5  # per public set
TOP_N = 10  # keys per top list
CACHE_SECONDS = 1.0
OUTPUT_PREFIX = "spamtrap_output_"

Samples = dict[str, list[tuple[dict[str, str], float]]]


def read_registry(registry: CollectorRegistry) -> Samples:
    """Every sample of ``registry`` by sample name (``_total`` included,
    ``_created`` left out), with its labels."""
    out: Samples = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _sum(samples: Samples, name: str, **match: str) -> float:
    return sum(
        value
        for labels, value in samples.get(name, ())
        if all(labels.get(k) == v for k, v in match.items())
    )


def _number(value: float) -> int | float:
    return int(value) if value == int(value) else value


class Dashboard:
    """The dashboard's state: fed by the intake (``accepted``), the
    pipeline (``processed``) and the bundle sets (``published``); read by
    the web page through ``document()``."""

    def __init__(
        self, config: Config, metrics: Metrics, clock: ReactorTime, web_served: bool
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._web_served = web_served
        self.last_hour = LastHour(clock)
        self._private = {s.name for s in config.sets if s.private}
        self._public = [s.name for s in config.sets if not s.private]
        self._bundles: dict[str, deque[dict[str, Any]]] = {
            name: deque(maxlen=LAST_BUNDLES) for name in self._public
        }
        self._cached: bytes = b""
        self._cached_at = float("-inf")

    # -- feeding -------------------------------------------------------------

    def counting(self, intake: Intake) -> Intake:
        """``intake`` (where the SMTP session hands over a message at the
        end of DATA, its envelope final), calling :meth:`accepted` once a
        message is durable (its 250)."""
        return _CountingIntake(intake, self)

    def counted(self, result: object, env: Envelope) -> object:
        try:
            self.accepted(env)
        except Exception:  # noqa: BLE001 - the 250 must not depend on the dashboard
            log.failure("dashboard: counting {msg_id} failed", msg_id=env.msg_id)
        return result

    def chained(self, on_published: Callable[[Published], None]) -> Callable[[Published], None]:
        """A BundleSet on_published hook: :meth:`published`, then ``on_published``."""

        def both(published: Published) -> None:
            try:
                self.published(published)
            except Exception:  # noqa: BLE001 - the notice must go out regardless
                log.failure("dashboard: recording a stored bundle failed")
            on_published(published)

        return both

    def accepted(self, env: Envelope) -> None:
        """The intake's hook: ``env`` was answered 250. Runs in the reactor
        thread, once per message: a few dict updates (3 to 6 µs)."""
        meta = env.meta
        keys = []
        helo = meta.get("helo")
        if helo:
            keys.append(("helo", helo[0]))
        dialect = meta.get("dialect")
        if dialect:
            keys.append(("dialect", dialect_family(dialect[0])))
        peer = meta.get("peer")
        network = network_of(peer[0]) if peer else None
        if network is not None:
            keys.append(("peer", network))
        self.last_hour.accepted(keys)

    def processed(self, envs: Iterable[Envelope]) -> None:
        """The pipeline's hook: messages that landed in a set; counts their
        ``campaign`` metadata (when a campaign stage set one)."""
        keys = []
        for env in envs:
            campaign = env.meta.get("campaign")
            if campaign:
                keys.append(("campaign", campaign[0]))
        if keys:
            self.last_hour.count_many(keys)

    def published(self, published: Published) -> None:
        """The bundle sets' on_published hook: remember a public set's
        last bundles (a private set's are never kept)."""
        manifest = published.manifest
        recent = self._bundles.get(manifest.set)
        if recent is None:
            return
        url = download_url(
            manifest.key, published.url, self._config.http.public_url, self._web_served
        )
        recent.appendleft(
            {
                "key": manifest.key,
                "url": url,
                "messages": manifest.messages,
                "size": manifest.size,
                "first_received": manifest.first_received,
                "last_received": manifest.last_received,
            }
        )

    # -- reading -------------------------------------------------------------

    def document(self) -> bytes:
        """The JSON document, rebuilt at most once per CACHE_SECONDS."""
        now = self._clock.seconds()
        if now - self._cached_at >= CACHE_SECONDS or now < self._cached_at:
            self._cached = json.dumps(self.build(now), separators=(",", ":")).encode() + b"\n"
            self._cached_at = now
        return self._cached

    def build(self, now: float) -> dict[str, Any]:
        samples = read_registry(self._metrics.registry)
        cfg = self._config
        per_minute = self.last_hour.per_minute()
        figures: dict[str, int | float | None] = {
            "messages_accepted": _sum(samples, "spamtrap_messages_accepted_total"),
            "messages_rejected": _sum(samples, "spamtrap_messages_rejected_total"),
            "messages_shed": _sum(samples, "spamtrap_spool_shed_total")
            + _sum(samples, "spamtrap_queue_shed_total"),
            "sessions_open": _sum(samples, "spamtrap_smtp_connections_open"),
            "spool_depth": _sum(samples, "spamtrap_spool_depth"),
            "queue_length": _sum(samples, "spamtrap_queue_length") if cfg.queue.url else None,
            "messages_processed": _sum(samples, "spamtrap_messages_processed_total"),
            "intake_last_hour": sum(per_minute),
            "campaigns_tracked": _sum(samples, "spamtrap_campaigns_tracked"),
        }
        return {
            "node": cfg.node,
            "role": cfg.role,
            "generated": iso_time(now),
            "figures": {k: v if v is None else _number(v) for k, v in figures.items()},
            "intake_per_minute": per_minute,
            "verdicts": self._verdicts(samples),
            "sets": [self._set(samples, name) for name in self._public],
            "private_sets": self._private_sets(samples),
            "notices": self._notices(samples),
            "outputs": self._outputs(samples),
            "top": {d: self.last_hour.top(d, TOP_N) for d in DIMENSIONS},
        }

    def _set_figures(self, samples: Samples, names: Iterable[str]) -> dict[str, int | float]:
        def total(metric: str) -> int | float:
            return _number(sum(_sum(samples, metric, set=n) for n in names))

        return {
            "messages": total("spamtrap_set_messages_total"),
            "duplicates": total("spamtrap_set_duplicates_total"),
            "sampled_out": total("spamtrap_campaign_sampled_out_total"),
            "bundles_open": total("spamtrap_bundles_open"),
            "bundles_stored": total("spamtrap_bundles_total"),
            "bundles_waiting": total("spamtrap_bundles_waiting"),
            "bundles_skipped": total("spamtrap_bundles_skipped_total"),
        }

    def _set(self, samples: Samples, name: str) -> dict[str, Any]:
        names = (name,)
        return {
            "name": name,
            **self._set_figures(samples, names),
            "last": list(self._bundles[name]),
        }

    def _private_sets(self, samples: Samples) -> dict[str, Any] | None:
        if not self._private:
            return None
        return {"sets": len(self._private), **self._set_figures(samples, tuple(self._private))}

    def _verdicts(self, samples: Samples) -> list[dict[str, Any]]:
        # Per stage and verdict; the reasons (many, stage-defined) stay in /metrics.
        by: dict[tuple[str, str], float] = {}
        for labels, value in samples.get("spamtrap_filter_verdicts_total", ()):
            key = (labels.get("stage", ""), labels.get("verdict", ""))
            by[key] = by.get(key, 0.0) + value
        return [{"stage": s, "verdict": v, "count": _number(n)} for (s, v), n in sorted(by.items())]

    def _notices(self, samples: Samples) -> list[dict[str, Any]]:
        rows = samples.get("spamtrap_notifications_total", ())
        return sorted(
            (
                {
                    "channel": labels.get("channel", ""),
                    "outcome": labels.get("outcome", ""),
                    "count": _number(value),
                }
                for labels, value in rows
            ),
            key=lambda row: (row["channel"], row["outcome"]),
        )

    def _outputs(self, samples: Samples) -> list[dict[str, Any]]:
        """Per output, every ``spamtrap_output_*`` figure it has (none
        configured: an empty list), by the metric's name without prefix and
        ``_total``: ``sent``, ``failed``, ``queue_depth``... Other labels
        (a failure's reason) are summed over, so nothing but the output's
        name and the numbers reaches the page."""
        by: dict[str, dict[str, float]] = {}
        for name, rows in samples.items():
            if not name.startswith(OUTPUT_PREFIX):
                continue
            column = name[len(OUTPUT_PREFIX) :].removesuffix("_total")
            for labels, value in rows:
                figures = by.setdefault(label(labels.get("output", "")), {})
                figures[column] = figures.get(column, 0.0) + value
        return [
            {"output": output, "figures": {k: _number(v) for k, v in sorted(figures.items())}}
            for output, figures in sorted(by.items())
        ]


class _CountingIntake:
    """An ``Intake`` that tells the dashboard of every message it took."""

    def __init__(self, intake: Intake, dashboard: Dashboard) -> None:
        self._intake = intake
        self._dashboard = dashboard

    def submit(self, env: Envelope, /) -> Deferred[object]:
        d = self._intake.submit(env)
        d.addCallback(self._dashboard.counted, env)
        return d
