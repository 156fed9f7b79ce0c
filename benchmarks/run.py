"""Benchmark stampede_guard against its peers on a private Redis.

Run from the repository root::

    uv run --group bench benchmarks/run.py            # full run, about 6-8 minutes
    uv run --group bench benchmarks/run.py --quick    # smoke run, about 1 minute

Markdown goes to stdout, a progress line per measurement to stderr, and JSON to
``benchmarks/results/<stamp>.json`` and ``latest.json``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import report_header, source_summary
from floor import FloorRow, measure_floor
from hotpath import HotJob, HotResult, MemJob, MemResult, run_hot, run_memory
from peers import DEFAULT_PEERS, PEERS, skip_reason
from redis_server import RedisServer
from report import aggregate, markdown, targets
from stampede import RunResult, Shape, run_stampede

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ALL_SCENARIOS = ("A", "B", "B250", "C", "D", "M", "E")


@dataclass(frozen=True, slots=True)
class Plan:
    """Sizes and durations of one run."""

    reps: int
    shapes: dict[str, list[Shape]]
    hot_slices: int
    hot_slice_s: float
    mem_reps: int
    mem_slices: int
    mem_slice_s: float
    floor_samples: int


def make_plan(*, quick: bool, reps: int | None) -> Plan:
    """Return the full plan, or the ~1 minute smoke plan with *quick*."""
    computes = [0.1] if quick else [0.1, 1.0]
    heavy = [0.1] if quick else [1.0]  # the 1,000-caller target checks
    shapes = {
        "A": [Shape("A", 1, 1000, 1, c) for c in heavy],
        "B": [Shape("B", 4, 50, 1, c) for c in computes],
        "B250": [Shape("B250", 4, 250, 1, c) for c in heavy],
        "C": [Shape("C", 1, 1000, 1, c) for c in computes],
        "E": [Shape("E", 1, 1000, 5, 0.1)],
    }
    n = reps if reps is not None else (1 if quick else 3)
    return Plan(
        reps=n,
        shapes=shapes,
        hot_slices=4 if quick else 10,
        hot_slice_s=0.04 if quick else 0.05,
        mem_reps=max(n, 3 if quick else 5),
        mem_slices=6 if quick else 10,
        mem_slice_s=0.03 if quick else 0.05,
        floor_samples=300 if quick else 2000,
    )


def applies(scenario: str, peer: str) -> bool:
    """Return whether *peer* takes part in *scenario*."""
    info = PEERS[peer]
    if scenario == "A":
        return info.kind == "sync"
    if scenario == "C":
        return info.kind == "async"
    if scenario in {"B", "B250", "D"}:
        return info.uses_redis  # the memory backend cannot coordinate processes
    return scenario == "E"


def parse_scenarios(text: str) -> list[str]:
    """Parse ``A,B,B250`` or ``ABCE`` into scenario names."""
    out: list[str] = []
    for token in (t.strip() for t in text.split(",")):
        names = [token] if token in ALL_SCENARIOS else list(token)
        for name in names:
            if name not in ALL_SCENARIOS:
                msg = f"unknown scenario {name!r} (choose from {', '.join(ALL_SCENARIOS)})"
                raise argparse.ArgumentTypeError(msg)
            if name not in out:
                out.append(name)
    return out


def parse_peers(text: str) -> list[str]:
    """Parse a comma-separated peer list ('all' adds the in-memory peers)."""
    if text == "all":
        return list(PEERS)
    out = [t.strip() for t in text.split(",") if t.strip()]
    for name in out:
        if name not in PEERS:
            msg = f"unknown peer {name!r} (choose from {', '.join(PEERS)} or 'all')"
            raise argparse.ArgumentTypeError(msg)
    return out


def progress(text: str) -> None:
    """Write one progress line to stderr."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def source_state() -> str:
    """Return the git commit and a digest of ``src/stampede_guard`` as it is on disk.

    The digest covers the files themselves, so an edit made while the benchmark
    runs (the library is measured as it is in this working tree) shows up as a
    change between the start and the end of the run.
    """
    src = HERE.parent / "src" / "stampede_guard"
    digest = hashlib.blake2b(digest_size=6)
    for path in sorted(src.rglob("*.py")):
        digest.update(path.relative_to(src).as_posix().encode())
        digest.update(path.read_bytes())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from PATH
            capture_output=True,
            text=True,
            check=True,
            cwd=HERE,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
            cwd=HERE.parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"not a git checkout, src digest {digest.hexdigest()}"
    changes = " + uncommitted changes" if dirty else ""
    return f"commit {head}{changes}, src digest {digest.hexdigest()}"


def _run_stampedes(
    scenario: str, plan: Plan, peers: Sequence[str], server: RedisServer
) -> list[RunResult]:
    runs: list[RunResult] = []
    shapes = plan.shapes[scenario]
    mine = [p for p in peers if applies(scenario, p)]
    total = plan.reps * len(shapes) * len(mine)
    done = 0
    for rep in range(1, plan.reps + 1):
        shift = (rep - 1) % max(1, len(mine))
        order = mine[shift:] + mine[:shift]  # vary which peer runs first
        for shape in shapes:
            for peer in order:
                r = run_stampede(peer, shape, rep, server.url, server.admin)
                runs.append(r)
                done += 1
                ex = r.excess_ms
                progress(
                    f"[{scenario} {done}/{total}] {shape.label()} c={shape.compute_s:g}s "
                    f"rep {rep}/{plan.reps} {peer}: computations {r.computations}, "
                    f"excess p50/max {ex.p50 if ex else float('nan'):.1f}/"
                    f"{ex.max if ex else float('nan'):.1f} ms, cmds {r.redis_cmds}, "
                    f"errors {r.errors}{' FAILED: ' + r.failure if r.failure else ''} "
                    f"({r.wall_s:.1f} s)"
                )
    return runs


def _run_hot(plan: Plan, peers: Sequence[str], url: str) -> list[HotResult]:
    out: list[HotResult] = []
    mine = [p for p in peers if applies("D", p)]
    for rep in range(1, plan.reps + 1):
        shift = (rep - 1) % max(1, len(mine))
        for peer in mine[shift:] + mine[:shift]:
            h = run_hot(HotJob(peer, url, rep, plan.hot_slices, plan.hot_slice_s))
            out.append(h)
            progress(
                f"[D] rep {rep}/{plan.reps} {peer}: {h.peer_ops:,.0f} calls/s vs raw "
                f"{h.raw_ops:,.0f} = {h.ratio:.2f}, {h.cmds_per_call:g} cmds/call"
                + (f" FAILED: {h.failure}" if h.failure else "")
            )
    return out


def _run_memory(plan: Plan) -> list[MemResult]:
    out: list[MemResult] = []
    for rep in range(1, plan.mem_reps + 1):
        m = run_memory(MemJob(rep, plan.mem_slices, plan.mem_slice_s))
        out.append(m)
        progress(
            f"[M] rep {rep}/{plan.mem_reps}: stampede_guard {m.sg_ops:,.0f} vs "
            f"cachetools {m.cachetools_ops:,.0f} calls/s = {m.ratio:.2f}"
            + (f" FAILED: {m.failure}" if m.failure else "")
        )
    return out


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass(slots=True)
class Measured:
    """Everything one run measured."""

    redis_version: str = ""
    source_at_start: str = ""
    source_at_end: str = ""
    floor: list[FloorRow] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)
    hot: list[HotResult] = field(default_factory=list)
    mem: list[MemResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def measure(plan: Plan, scenarios: Sequence[str], wanted: Sequence[str]) -> Measured:
    """Start a private Redis, run *scenarios* with the *wanted* peers, stop it."""
    got = Measured(source_at_start=source_state())
    peers: list[str] = []
    for p in wanted:
        reason = skip_reason(p)
        if reason is None:
            peers.append(p)
        else:
            got.skipped[p] = reason
            progress(f"skipping {p}: {reason}")
    with RedisServer() as server:
        got.redis_version = server.version()
        progress(f"redis-server {got.redis_version} on {server.url} (private)")
        progress(f"stampede_guard: {got.source_at_start}")
        got.floor = measure_floor(server.url, plan.floor_samples)
        for scenario in scenarios:
            if scenario == "D":
                got.hot = _run_hot(plan, peers, server.url)
            elif scenario == "M":
                reason = skip_reason("stampede_guard") or skip_reason(
                    "stampede_guard_mem"
                )
                if reason is None:
                    got.mem = _run_memory(plan)
                else:
                    got.skipped["M"] = reason
            else:
                got.runs += _run_stampedes(scenario, plan, peers, server)
    got.source_at_end = source_state()
    if source_summary(got.source_at_start, got.source_at_end).startswith("CHANGED"):
        progress("warning: src/stampede_guard changed during the run")
    return got


def header(
    plan: Plan, got: Measured, started: datetime, elapsed: float
) -> dict[str, str]:
    """Return the report's header: when, where, what, and how often."""
    return report_header(
        "run.py",
        started=started,
        elapsed=elapsed,
        redis_version=got.redis_version,
        src=(got.source_at_start, got.source_at_end),
        repetitions=(
            f"{plan.reps} per configuration (M: {plan.mem_reps}), repetition-major; "
            "tables show medians"
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit code."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 1 minute smoke run")
    parser.add_argument(
        "--scenarios",
        type=parse_scenarios,
        default=list(ALL_SCENARIOS),
        help="comma-separated subset of A,B,B250,C,D,M,E (default: all)",
    )
    parser.add_argument(
        "--peers",
        type=parse_peers,
        default=list(DEFAULT_PEERS),
        help=f"comma-separated peers, or 'all' (default: {','.join(DEFAULT_PEERS)})",
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the JSON here"
    )
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")

    plan = make_plan(quick=args.quick, reps=args.reps)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    got = measure(plan, args.scenarios, args.peers)
    elapsed = time.perf_counter() - t0

    meta: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "stamp": started.strftime("%Y%m%d-%H%M%S"),
        "floor_samples": plan.floor_samples,
        "header": header(plan, got, started, elapsed),
    }
    rows = aggregate(got.runs)
    text = markdown(
        meta, floor=got.floor, rows=rows, hot=got.hot, mem=got.mem, skipped=got.skipped
    )
    sys.stdout.write(text)
    sys.stdout.flush()

    data = {
        "meta": meta,
        "plan": _jsonable(plan),
        "targets": _jsonable(targets(rows, got.hot, got.mem)),
        "aggregates": _jsonable(rows),
        "measured": _jsonable(got),
        "markdown": text,
    }
    RESULTS.mkdir(exist_ok=True)
    payload = json.dumps(data, indent=1)
    paths = [RESULTS / f"{meta['stamp']}.json", RESULTS / "latest.json"]
    if args.json is not None:
        paths.append(args.json)
    for path in paths:
        path.write_text(payload)
    progress(f"done in {elapsed:.0f} s; JSON in {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
