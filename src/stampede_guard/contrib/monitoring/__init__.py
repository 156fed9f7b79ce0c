"""Alerting rules and a dashboard for the Prometheus metrics, shipped with the package.

`rules()` returns a Prometheus rules file: recording rules for the call reduction, the
timeout rate, the average wait and the success rate of each decorated function (its
``name`` label), and four alerts on them:

| Alert | Fires when, for 5 minutes | Severity |
|---|---|---|
| `StampedeGuardLowCallReduction` | API call reduction under 80 % | warning |
| `StampedeGuardTimeoutRateHigh` | over 10 % of requests gave up waiting | critical |
| `StampedeGuardSlowWaits` | the average wait is over 1 s | warning |
| `StampedeGuardLowSuccessRate` | under 95 % of requests got a value | critical |

`dashboard()` returns a Grafana dashboard (JSON) of the same figures, and of a near
cache's hit share (near hits out of hits) and flushes by reason. Those two have no
recording rule and no alert: a near cache only saves round trips, and while it is
flushed the calls go to the backend, as they would without it (the figures above
still watch them). Print either from a shell, to put it where Prometheus or Grafana
reads it::

    python -m stampede_guard.contrib.monitoring rules > stampede_guard.rules.yml
    python -m stampede_guard.contrib.monitoring dashboard > stampede_guard.json

Needs nothing but the standard library; the metrics come from
`stampede_guard.contrib.prometheus.PrometheusMetrics` (or an OpenTelemetry-to-Prometheus
exporter, which gives the same names).
"""

from __future__ import annotations

from importlib.resources import files

__all__ = ["dashboard", "rules"]


def rules() -> str:
    """Return the Prometheus alerting and recording rules (YAML)."""
    return files(__name__).joinpath("stampede_guard.rules.yml").read_text("utf-8")


def dashboard() -> str:
    """Return the Grafana dashboard (JSON)."""
    return files(__name__).joinpath("stampede_guard.dashboard.json").read_text("utf-8")
