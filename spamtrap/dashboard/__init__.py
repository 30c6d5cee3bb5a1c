"""The live dashboard: ``GET /dashboard`` (see docs/dashboard.md).

- :mod:`spamtrap.dashboard.lasthour`: the last hour in per-minute buckets
  with capped top-k counters (bounded memory);
- :mod:`spamtrap.dashboard.figures`: :class:`Dashboard`, fed by the intake,
  the pipeline and the bundle sets, and the JSON document built from the
  node's metrics, cached per second;
- :mod:`spamtrap.dashboard.resource`: the page and ``data.json`` as
  twisted.web resources, behind ``http.dashboard``.
"""

from spamtrap.dashboard.figures import Dashboard
from spamtrap.dashboard.resource import make_dashboard_resource

__all__ = ["Dashboard", "make_dashboard_resource"]
