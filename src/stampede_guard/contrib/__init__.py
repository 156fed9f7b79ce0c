"""Metrics hooks for monitoring systems, each in its own module.

- `stampede_guard.contrib.prometheus`: `PrometheusMetrics`, counters and histograms
  in a prometheus-client registry (``pip install "stampede-guard[prometheus]"``).
- `stampede_guard.contrib.opentelemetry`: `OpenTelemetryMetrics`, the same instruments
  on an OpenTelemetry meter (``pip install "stampede-guard[opentelemetry]"``).
- `stampede_guard.contrib.logging`: `LoggingHook`, one log line per event (standard
  library only).

This package imports none of them: import the module you use. A module whose library
is missing raises an ImportError that names the extra to install.
"""
