"""``python -m stampede_guard.contrib.monitoring rules|dashboard``: print one of them."""

from __future__ import annotations

import argparse
import sys

from stampede_guard.contrib.monitoring import dashboard, rules


def main(argv: list[str] | None = None) -> int:
    """Print the rules file or the dashboard on standard output."""
    parser = argparse.ArgumentParser(
        prog="python -m stampede_guard.contrib.monitoring",
        description="Print stampede_guard's Prometheus rules or Grafana dashboard.",
    )
    parser.add_argument(
        "what",
        choices=["rules", "dashboard"],
        help="rules: Prometheus alerting rules (YAML); dashboard: Grafana (JSON)",
    )
    args = parser.parse_args(argv)
    sys.stdout.write(rules() if args.what == "rules" else dashboard())
    return 0


if __name__ == "__main__":
    sys.exit(main())
