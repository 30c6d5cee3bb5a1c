"""The optional parts of a node, as SpamtrapService (spamtrap.service.compose)
builds them: the per-message outputs, the live dashboard, the HTTP site,
and the report /healthz gives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.web.server import Site

from spamtrap.bundle.file import iso_utc
from spamtrap.config import Config
from spamtrap.dashboard import Dashboard, make_dashboard_resource
from spamtrap.metrics import Metrics
from spamtrap.outputs.service import Outputs
from spamtrap.store import Store, served_by_web
from spamtrap.web import make_site

if TYPE_CHECKING:
    from collections.abc import Callable

    from spamtrap.service.compose import SpamtrapService

log = Logger()


def outputs_for(cfg: Config, metrics: Metrics, reactor: Any, filters: bool) -> Outputs | None:
    """Per-message outputs run where the pipeline runs (docs/outputs.md);
    their queues open at start, and they stop after the pipeline drained."""
    if filters and cfg.outputs:
        return Outputs(cfg, metrics, reactor)
    if cfg.outputs:
        log.info("outputs: not run by a listener; the workers run them")
    return None


def dashboard_for(cfg: Config, metrics: Metrics, reactor: Any) -> Dashboard | None:
    """The live page (spamtrap/dashboard), fed by the intake, the pipeline
    and the bundle sets; none of it exists with http.dashboard: off."""
    if cfg.http.dashboard == "off":
        return None
    if cfg.http.dashboard == "token" and not cfg.http.dashboard_token:
        log.info("http.dashboard_token is not set: /dashboard answers 403")
    return Dashboard(cfg, metrics, reactor, served_by_web(cfg.store.url))


def site_for(
    store: Store,
    cfg: Config,
    metrics: Metrics,
    health: Callable[[], dict[str, Any]],
    reactor: Any,
    dashboard: Dashboard | None,
) -> Site:
    """Downloads, listings, feeds, /metrics, /healthz and the dashboard."""
    page = None
    if dashboard is not None:
        page = make_dashboard_resource(dashboard, cfg.http.dashboard, cfg.http.dashboard_token)
    return make_site(store, cfg, metrics, health, reactor, page)


def health(node: SpamtrapService) -> dict[str, Any]:
    """``status`` is ok, degraded (with ``problems``: mail is refused or
    lost to a fault the operator must fix) or stopping; /healthz
    answers 503 unless it is ok."""
    problems = []
    failure = node.spool.write_failure
    if failure is not None:
        why, since = failure
        problems.append(f"spool: write failed: {why} since {iso_utc(since)}")
    # Mail still gets 250 (the spool is fine) but stays spooled unstored.
    for name, bundle_set in node.bundles.items():
        failure = bundle_set.write_failure
        if failure is not None:
            why, since = failure
            problems.append(f"bundles: set {name}: write failed: {why} since {iso_utc(since)}")
    status = "stopping" if not node.running else "degraded" if problems else "ok"
    out: dict[str, Any] = {
        "status": status,
        "node": node.cfg.node,
        "role": node.cfg.role,
        "spool_depth": node.spool.depth,
        "smtp_sessions": len(node.smtp_factory.sessions),
    }
    if problems:
        out["problems"] = problems
    if node.link is not None:
        out["queue"] = "up" if node.link.up else "unreachable"
    if node.outputs is not None:
        # Named, not a 503: intake and bundles go on while an output is down.
        out["outputs"] = {name: r.depth for name, r in node.outputs.runners.items()}
        failing = node.outputs.failing()
        if failing:
            out["outputs_failing"] = failing
    return out
