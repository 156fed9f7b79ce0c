"""Steady load on one hot key: how many callers wait on a miss, and what refreshing costs.

    uv run benchmarks/early_refresh.py            # about 40 s: 4 modes x 8 s, memory
    uv run benchmarks/early_refresh.py --seconds 3

Threads call one decorated function continuously (each pausing a little between calls)
for a fixed time. The value lives `--ttl` seconds and takes `--compute` seconds to make.
Plain TTL: every expiry makes the callers of that moment wait for a recomputation.
`stale_ttl`: they get the old value while one caller refreshes. `early_refresh`
(XFetch): the value is refreshed before it expires, so nobody waits and nothing stale is
served. Printed: computations per expiry cycle, callers that waited on a miss, stale
values served, and the p99 / max call latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stampede_guard import MemoryBackend, StampedeStats, cached_stampede_safe


def out(*parts: object, file: object = None) -> None:
    """Write a line of the report (stdout) or of progress (``file=sys.stderr``)."""
    stream = sys.stdout if file is None else sys.stderr
    stream.write(" ".join(map(str, parts)) + "\n")


MODES: dict[str, dict[str, Any]] = {
    "plain ttl": {},
    "stale_ttl": {"stale_ttl": 30.0},
    "early_refresh (beta 1)": {"early_refresh": True},
    "early_refresh (beta 0.5)": {"early_refresh": True, "beta": 0.5},
}


@dataclass
class Row:
    """One mode's figures."""

    mode: str
    calls: int
    computations: int
    cycles: float
    waited_on_miss: int
    stale_served: int
    early_refreshes: int
    p99_ms: float
    max_ms: float


def run(mode: str, options: dict[str, Any], args: argparse.Namespace) -> Row:
    """Run one mode under steady load and return its figures."""
    stats = StampedeStats()
    computations = 0
    guard = threading.Lock()

    def compute() -> float:
        nonlocal computations
        with guard:
            computations += 1
        time.sleep(args.compute)
        return time.time()

    hot = cached_stampede_safe(
        key="hot",
        backend=MemoryBackend(),
        ttl=args.ttl,
        lock_timeout=max(0.5, args.compute * 5),
        metrics=stats,
        stale_ttl=options.get("stale_ttl", 0),
        early_refresh=options.get("early_refresh", False),
        beta=options.get("beta", 1.0),
    )(compute)

    latencies: list[float] = []
    stop = time.monotonic() + args.seconds

    def caller() -> None:
        mine: list[float] = []
        while time.monotonic() < stop:
            started = time.perf_counter()
            hot()
            mine.append(time.perf_counter() - started)
            time.sleep(args.pause)
        with guard:
            latencies.extend(mine)

    hot()  # warm: the first computation is not part of the steady state
    computations = 0
    stats.reset()
    threads = [threading.Thread(target=caller) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snap = stats.snapshot()
    latencies.sort()
    return Row(
        mode=mode,
        calls=len(latencies),
        computations=computations,
        cycles=args.seconds / args.ttl,
        waited_on_miss=snap.lock_waits,
        stale_served=snap.stale_served,
        early_refreshes=snap.early_refreshes,
        p99_ms=latencies[int(len(latencies) * 0.99)] * 1000,
        max_ms=latencies[-1] * 1000,
    )


def main() -> int:
    """Run every mode and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per mode")
    parser.add_argument("--threads", type=int, default=20)
    parser.add_argument(
        "--pause", type=float, default=0.005, help="between a thread's calls"
    )
    parser.add_argument("--ttl", type=float, default=1.0)
    parser.add_argument("--compute", type=float, default=0.1)
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).parent / "results" / "early_refresh.json",
    )
    args = parser.parse_args()
    rows = []
    for mode, options in MODES.items():
        out(f"running {mode} for {args.seconds:.0f} s ...", file=sys.stderr)
        rows.append(run(mode, options, args))
    out(
        f"\nSteady load: {args.threads} threads, one hot key, ttl {args.ttl} s, "
        f"compute {args.compute} s, {args.seconds} s per mode (memory backend)\n"
    )
    header = (
        "mode",
        "calls",
        "computations",
        "per ttl",
        "waited on a miss",
        "stale served",
        "early refreshes",
        "p99 ms",
        "max ms",
    )
    out("| " + " | ".join(header) + " |")
    out("|---|" + "---:|" * (len(header) - 1))
    for r in rows:
        cells = (
            r.mode,
            f"{r.calls:,}",
            str(r.computations),
            f"{r.computations / r.cycles:.2f}",
            str(r.waited_on_miss),
            str(r.stale_served),
            str(r.early_refreshes),
            f"{r.p99_ms:.1f}",
            f"{r.max_ms:.1f}",
        )
        out("| " + " | ".join(cells) + " |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "args": vars(args) | {"json": str(args.json)},
        "rows": [asdict(r) for r in rows],
    }
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
