"""The shipped alerting rules and dashboard, checked by promtool on real stampedes' metrics.

Each scenario runs a real stampede in this process with `PrometheusMetrics` on a
registry of its own, then feeds the totals it counted to ``promtool test rules`` as
counters growing at that pace per minute, and checks which alert fires.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from stampede_guard import LockTimeoutError, MemoryBackend, cached_stampede_safe
from stampede_guard.contrib.monitoring import dashboard, rules
from stampede_guard.contrib.monitoring.__main__ import main
from stampede_guard.contrib.prometheus import PrometheusMetrics
from stampede_guard.testing import wait_for_joiners

pytestmark = pytest.mark.timeout(60)

ALERTS = {
    "StampedeGuardLowCallReduction": "warning",
    "StampedeGuardTimeoutRateHigh": "critical",
    "StampedeGuardSlowWaits": "warning",
    "StampedeGuardLowSuccessRate": "critical",
}
CALLERS = 20


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        reason = "promtool is not on PATH (Debian: apt install prometheus)"
        if os.environ.get("STAMPEDE_GUARD_REQUIRE_REDIS") == "1":  # CI: required
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return found


def run_promtool(*args: str) -> str:
    done = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_rules_pass_promtool_check(tmp_path: Path) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(rules())
    assert "SUCCESS: 9 rules found" in run_promtool("check", "rules", str(path))


def test_the_command_prints_the_rules_and_the_dashboard(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["rules"]) == 0
    assert capsys.readouterr().out == rules()
    assert main(["dashboard"]) == 0
    board = json.loads(capsys.readouterr().out)
    assert board["uid"] == "stampede-guard"


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel's query, as a recording rule, passes promtool's parser."""
    board = json.loads(dashboard())
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, panel in enumerate(board["panels"]):
        expr = panel["targets"][0]["expr"].replace("$name", ".*")
        lines += [f"      - record: panel_{n}", f"        expr: {json.dumps(expr)}"]
    path = tmp_path / "panels.yml"
    path.write_text("\n".join(lines) + "\n")
    assert f"SUCCESS: {len(board['panels'])} rules found" in run_promtool(
        "check", "rules", str(path)
    )


# --- Scenarios: real stampedes, and what they should set off -------------------------


def healthy(hook: PrometheusMetrics) -> None:
    """One cold key, CALLERS callers at once, then as many hits."""

    @cached_stampede_safe(key="k", backend=MemoryBackend(), metrics=hook)
    def f() -> int:
        wait_for_joiners(f, CALLERS - 1)
        return 1

    threaded(f, CALLERS)
    for _ in range(CALLERS):
        f()


def every_key_distinct(hook: PrometheusMetrics) -> None:
    """Every request a new key: each one computes (the cache saves nothing)."""

    @cached_stampede_safe(key="k:{n}", backend=MemoryBackend(), metrics=hook)
    def f(n: int) -> int:
        return n

    for n in range(CALLERS):
        f(n)


def waiters_time_out(hook: PrometheusMetrics) -> None:
    """Two processes' worth of callers: the other's leader outlasts their patience."""
    backend = MemoryBackend()
    release = threading.Event()
    backend.get_or_lock("k", "another-process", 30)  # held elsewhere, for long

    @cached_stampede_safe(
        key="k",
        backend=backend,
        metrics=hook,
        wait_timeout=0.05,
        base_delay=0.01,
        max_delay=0.02,
        on_timeout="raise",
    )
    def f() -> int:
        release.wait(5)
        return 1

    for _ in range(CALLERS):
        with pytest.raises(LockTimeoutError):
            f()


def waits_are_slow(hook: PrometheusMetrics) -> None:
    """The computation takes over a second, and CALLERS - 1 callers wait for it."""
    started = threading.Event()

    @cached_stampede_safe(
        key="k", backend=MemoryBackend(), metrics=hook, wait_timeout=10
    )
    def f() -> int:
        started.set()
        wait_for_joiners(f, CALLERS - 1)
        threading.Event().wait(1.2)  # under test: a slow upstream
        return 1

    threaded(f, CALLERS)


def calls_fail(hook: PrometheusMetrics) -> None:
    """The function raises on every key."""

    @cached_stampede_safe(key="k:{n}", backend=MemoryBackend(), metrics=hook)
    def f(n: int) -> int:
        raise RuntimeError(n)

    for n in range(CALLERS):
        with pytest.raises(RuntimeError):
            f(n)


def failures_served(hook: PrometheusMetrics) -> None:
    """One failure, stored by cache_errors and raised to every later caller: hits."""

    @cached_stampede_safe(
        key="k", backend=MemoryBackend(), metrics=hook, cache_errors={OSError: 60.0}
    )
    def f() -> int:
        raise OSError("down")

    for _ in range(CALLERS):
        with pytest.raises(OSError, match="down"):
            f()


def threaded(f: Callable[[], object], callers: int) -> None:
    threads = [threading.Thread(target=f) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)


SCENARIOS: dict[str, tuple[Callable[[PrometheusMetrics], None], set[str]]] = {
    "healthy": (healthy, set()),
    "every_key_distinct": (every_key_distinct, {"StampedeGuardLowCallReduction"}),
    "waiters_time_out": (
        waiters_time_out,
        {"StampedeGuardTimeoutRateHigh", "StampedeGuardLowSuccessRate"},
    ),
    "waits_are_slow": (waits_are_slow, {"StampedeGuardSlowWaits"}),
    # Each failed computation was an upstream call too: nothing was saved.
    "calls_fail": (
        calls_fail,
        {"StampedeGuardLowSuccessRate", "StampedeGuardLowCallReduction"},
    ),
    # One upstream call for CALLERS requests, yet not one of them got a value.
    "failures_served": (failures_served, {"StampedeGuardLowSuccessRate"}),
}


def input_series(registry: CollectorRegistry) -> list[str]:
    """Each counter (and histogram sum and count) as a series growing at its total a minute."""
    lines = []
    for family in registry.collect():
        for sample in family.samples:
            if not sample.name.endswith(("_total", "_sum", "_count")):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            lines += [
                f"      - series: '{sample.name}{{{labels}}}'",
                f"        values: '0+{sample.value:g}x20'",
            ]
    return lines


def without_annotations(text: str) -> str:
    """The rules with their annotations cut: the test checks which alerts fire."""
    return re.sub(r"\n        annotations:\n(?:          .*\n|\n)*", "\n", text)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_each_alert_fires_on_the_stampedes_that_should_set_it_off(
    scenario: str, tmp_path: Path
) -> None:
    run, expected = SCENARIOS[scenario]
    registry = CollectorRegistry()
    run(PrometheusMetrics(name="weather", registry=registry))
    (tmp_path / "rules.yml").write_text(without_annotations(rules()))
    lines = [
        "rule_files: [rules.yml]",
        "evaluation_interval: 1m",
        "tests:",
        "  - interval: 1m",
        "    input_series:",
        *input_series(registry),
        "    alert_rule_test:",
    ]
    for alert, severity in ALERTS.items():
        lines += ["      - eval_time: 15m", f"        alertname: {alert}"]
        if alert in expected:
            lines += [
                "        exp_alerts:",
                f"          - exp_labels: {{severity: {severity}, name: weather}}",
            ]
        else:
            lines.append("        exp_alerts: []")
    path = tmp_path / "test.yml"
    path.write_text("\n".join(lines) + "\n")
    assert "SUCCESS" in run_promtool("test", "rules", str(path))
