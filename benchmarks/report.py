"""Turn measurements into medians, target checks and aligned Markdown tables."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from common import HANG_AFTER_S, median
from floor import FloorRow
from hotpath import HotResult, MemResult
from stampede import RunResult

__all__ = ["Agg", "Target", "aggregate", "markdown", "targets"]

SCENARIO_TITLES = {
    "A": "A: threads in one process, one cold key",
    "B": "B: 4 processes x 50 callers (threads for sync peers, tasks for async), one cold key",
    "B250": "B250: 4 processes x 250 callers (threads / tasks), one cold key",
    "C": "C: asyncio tasks in one event loop, one cold key",
    "E": "E: 5 keys x 200 callers each, interleaved, one process",
}


def fmt(value: float | None, *, signed: bool = False) -> str:
    """Format like the anchors: 1,798 / 522 / 29.6 / 1.1 (and '-' for nothing)."""
    if value is None or math.isnan(value):
        return "-"
    big = abs(value) >= 100  # noqa: PLR2004 - formatting threshold
    text = f"{value:,.0f}" if big else f"{value:.1f}"
    return f"+{text}" if signed and value > 0 else text


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: str) -> str:
    """Return an aligned Markdown table; *right* has 'r' or 'l' per column."""
    body = [list(r) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if right[i] == "r" else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if right[i] == "r" else ("-" * (w + 2))
            for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(r) for r in body)])


@dataclass(slots=True)
class Agg:
    """The repetitions of one peer in one configuration, reduced to medians."""

    scenario: str
    compute_s: float
    processes: int
    callers: int
    keys: int
    peer: str
    reps: int = 0
    computations: float = 0.0
    computations_range: tuple[int, int] = (0, 0)
    max_per_key_worst: int = 0
    excess: tuple[float, float, float] | None = None
    lat_cs: tuple[float, float, float] | None = None
    start_spread_ms: float = 0.0
    gc_longest_ms: float = 0.0
    errors: float = 0.0
    errors_worst: int = 0
    reps_with_errors: int = 0
    redis_cmds: float = 0.0
    redis_cmds_worst: int = 0
    round_trips: float = 0.0
    round_trips_max_per_process: float = 0.0
    redis_cpu_ms: float = 0.0
    top_commands: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> str:
        """Return e.g. '4x50' or '1000'."""
        if self.processes > 1:
            return f"{self.processes}x{self.callers // self.processes}"
        return str(self.callers)


def _med3(
    values: list[tuple[float, float, float]],
) -> tuple[float, float, float] | None:
    if not values:
        return None
    return (
        median([v[0] for v in values]),
        median([v[1] for v in values]),
        median([v[2] for v in values]),
    )


def aggregate(runs: Sequence[RunResult]) -> list[Agg]:
    """Group *runs* by configuration and peer (first-seen order); take medians."""
    groups: dict[tuple[Any, ...], list[RunResult]] = {}
    for r in runs:
        groups.setdefault(
            (r.scenario, r.compute_s, r.processes, r.callers, r.keys, r.peer), []
        ).append(r)
    out = []
    for (scenario, compute_s, processes, callers, keys, peer), rs in groups.items():
        a = Agg(scenario, compute_s, processes, callers, keys, peer, reps=len(rs))
        comps = [r.computations for r in rs]
        a.computations = median(comps)
        a.computations_range = (min(comps), max(comps))
        a.max_per_key_worst = max(r.computations_max_per_key for r in rs)
        a.excess = _med3(
            [(e.p50, e.p99, e.max) for r in rs if (e := r.excess_ms) is not None]
        )
        a.lat_cs = _med3(
            [(e.p50, e.p99, e.max) for r in rs if (e := r.lat_cs_ms) is not None]
        )
        a.start_spread_ms = median([r.start_spread_ms for r in rs])
        a.gc_longest_ms = median([r.gc_longest_ms for r in rs])
        a.errors = median([r.errors for r in rs])
        a.errors_worst = max(r.errors for r in rs)
        a.reps_with_errors = sum(1 for r in rs if r.errors)
        a.redis_cmds = median([r.redis_cmds for r in rs])
        a.redis_cmds_worst = max(r.redis_cmds for r in rs)
        a.round_trips = median([r.round_trips for r in rs])
        a.round_trips_max_per_process = median(
            [r.round_trips_max_per_process for r in rs]
        )
        a.redis_cpu_ms = median([r.redis_cpu_ms for r in rs])
        names = {n for r in rs for n in r.cmds_by_name}
        per_name = {n: median([r.cmds_by_name.get(n, 0) for r in rs]) for n in names}
        a.top_commands = dict(sorted(per_name.items(), key=lambda kv: -kv[1])[:4])
        for r in rs:
            if r.failure:
                a.notes.append(f"rep {r.rep}: run failed: {r.failure}")
            if r.hung:
                a.notes.append(
                    f"rep {r.rep}: {r.hung} caller(s) still waiting at "
                    f"compute_s + {HANG_AFTER_S:g} s"
                    + (f", in {r.hung_where}" if r.hung_where else "")
                )
            if r.error_kinds:
                a.notes.append(f"rep {r.rep}: errors {r.error_kinds}")
        out.append(a)
    return out


def _computations(a: Agg) -> str:
    lo, hi = a.computations_range
    text = (
        fmt(a.computations)
        if a.computations != int(a.computations)
        else f"{int(a.computations):,}"
    )
    return text if lo == hi else f"{text} [{lo:,}-{hi:,}]"


def _errors(a: Agg) -> str:
    text = f"{a.errors:g}"
    if a.reps_with_errors:
        text += f" (max {a.errors_worst:,}; {a.reps_with_errors}/{a.reps} reps)"
    return text


def _pct3(v: tuple[float, float, float] | None) -> list[str]:
    return ["-", "-", "-"] if v is None else [fmt(v[0]), fmt(v[1]), fmt(v[2])]


def stampede_table(rows: Sequence[Agg]) -> str:
    """Return the full table of one scenario."""
    headers = [
        "compute_s",
        "callers",
        "peer",
        "computations",
        "excess p50 ms",
        "excess p99 ms",
        "excess max ms",
        "lat-cs p50 ms",
        "lat-cs p99 ms",
        "lat-cs max ms",
        "start spread ms",
        "longest GC pause ms",
        "errors",
        "Redis cmds",
        "cmds/process",
        "round trips",
        "max RT/process",
        "Redis CPU ms",
        "top commands",
    ]
    body = [
        [
            f"{a.compute_s:g}",
            a.shape,
            a.peer,
            _computations(a),
            *_pct3(a.excess),
            *_pct3(a.lat_cs),
            fmt(a.start_spread_ms),
            fmt(a.gc_longest_ms),
            _errors(a),
            f"{a.redis_cmds:,.0f}",
            fmt(a.redis_cmds / a.processes),
            f"{a.round_trips:,.0f}",
            f"{a.round_trips_max_per_process:,.0f}",
            fmt(a.redis_cpu_ms),
            ", ".join(f"{n} {v:,.0f}" for n, v in a.top_commands.items()),
        ]
        for a in rows
    ]
    return table(headers, body, "rrlrrrrrrrrrlrrrrrl")


def excess_key_table(rows: Sequence[Agg]) -> str | None:
    """Return waiter excess p50 / p99 / max per peer for B 4x50 and C 1000."""
    cols: list[tuple[str, str, int]] = []
    for a in rows:
        if (a.scenario, a.callers) in {("B", 200), ("C", 1000)}:
            col = (a.scenario, f"{a.compute_s:g}", a.callers)
            if col not in cols:
                cols.append(col)
    if not cols:
        return None
    peers: list[str] = []
    for a in rows:
        if a.peer not in peers and a.scenario in {"B", "C"}:
            peers.append(a.peer)
    by = {(a.scenario, f"{a.compute_s:g}", a.callers, a.peer): a for a in rows}
    headers = ["peer"] + [
        f"{'B 4x50' if s == 'B' else 'C 1000 tasks'}, {c} s: excess p50 / p99 / max ms"
        for s, c, _n in cols
    ]
    body = []
    for p in peers:
        cells = [p]
        for s, c, n in cols:
            found = by.get((s, c, n, p))
            if found is None or found.excess is None:
                cells.append("-")
            else:
                extra = (
                    ""
                    if found.computations_range == (1, 1)
                    else f" ({_computations(found)} comps)"
                )
                cells.append(" / ".join(fmt(x) for x in found.excess) + extra)
        body.append(cells)
    return table(headers, body, "l" + "r" * len(cols))


@dataclass(frozen=True, slots=True)
class Target:
    """One of stampede_guard's performance targets and what this run measured."""

    name: str
    goal: str
    measured: str
    status: str  # PASS, MISS, n/a


def _find(rows: Sequence[Agg], scenario: str, peer: str, callers: int) -> list[Agg]:
    return [
        a
        for a in rows
        if a.scenario == scenario and a.peer == peer and a.callers == callers
    ]


def targets(
    rows: Sequence[Agg], hot: Sequence[HotResult], mem: Sequence[MemResult]
) -> list[Target]:
    """Check stampede_guard's performance targets (benchmarks/README.md) against this run."""
    out: list[Target] = []
    comp_checks = [
        ("1,000 threads, 1 process: computations", "A", "stampede_guard", 1000),
        ("4 processes x 250 threads: computations", "B250", "stampede_guard", 1000),
        ("1,000 asyncio tasks: computations", "C", "stampede_guard_async", 1000),
        (
            "4 processes x 250 tasks: computations (async)",
            "B250",
            "stampede_guard_async",
            1000,
        ),
    ]
    for name, scenario, peer, n in comp_checks:
        found = _find(rows, scenario, peer, n)
        if not found:
            out.append(Target(name, "exactly 1 in every rep", "not measured", "n/a"))
            continue
        worst = max(a.computations_range[1] for a in found)
        best = min(a.computations_range[0] for a in found)
        errs = sum(a.errors_worst for a in found)
        measured = f"{best}" if best == worst else f"{best}-{worst}"
        computes = ", ".join(f"{a.compute_s:g}" for a in found)
        measured += f" (over {sum(a.reps for a in found)} reps, compute_s {computes})"
        if errs:
            measured += f"; {errs} caller errors"
        ok = best == worst == 1 and not errs
        out.append(
            Target(name, "exactly 1 in every rep", measured, "PASS" if ok else "MISS")
        )
    cmd_checks = [
        (
            "Redis commands, 1,000-thread stampede, 1 process",
            "A",
            "stampede_guard",
            1000,
            1,
        ),
        (
            "Redis commands per process, 4 x 250 threads",
            "B250",
            "stampede_guard",
            1000,
            4,
        ),
        (
            "Redis commands per process, 4 x 250 tasks (async)",
            "B250",
            "stampede_guard_async",
            1000,
            4,
        ),
        (
            "Redis commands, 1,000 tasks, 1 loop (async)",
            "C",
            "stampede_guard_async",
            1000,
            1,
        ),
    ]
    for name, scenario, peer, n, procs in cmd_checks:
        found = _find(rows, scenario, peer, n)
        if not found:
            out.append(Target(name, "<= 10", "not measured", "n/a"))
            continue
        parts = []
        ok = True
        for a in found:
            per_med, per_worst = a.redis_cmds / procs, a.redis_cmds_worst / procs
            ok = ok and per_worst <= 10  # noqa: PLR2004 - the target
            parts.append(
                f"median {fmt(per_med)}, worst {fmt(per_worst)} @ {a.compute_s:g} s"
                f" (round trips of the busiest process: {a.round_trips_max_per_process:g})"
            )
        out.append(Target(name, "<= 10", "; ".join(parts), "PASS" if ok else "MISS"))
    for kind, peer in (("sync", "stampede_guard"), ("async", "stampede_guard_async")):
        rs = [h for h in hot if h.peer == peer and h.failure is None]
        name = f"hot hit path ({kind}): decorated / raw GET+json.loads"
        if not rs:
            out.append(Target(name, ">= 0.95", "not measured", "n/a"))
            continue
        ratio = median([h.ratio for h in rs])
        cmds = median([h.cmds_per_call for h in rs])
        out.append(
            Target(
                name,
                ">= 0.95",
                f"{ratio:.2f} (reps {', '.join(f'{h.ratio:.2f}' for h in rs)}; {cmds:g} cmds/hit)",
                "PASS" if ratio >= 0.95 else "MISS",  # noqa: PLR2004 - the target
            )
        )
    ms = [m for m in mem if m.failure is None]
    name = "hot hit path (memory): decorated / cachetools"
    if ms:
        ratio = median([m.ratio for m in ms])
        out.append(
            Target(
                name,
                ">= 0.5 (within 2x)",
                f"{ratio:.2f} ({median([m.sg_ops for m in ms]):,.0f} vs {median([m.cachetools_ops for m in ms]):,.0f} calls/s)",
                "PASS" if ratio >= 0.5 else "MISS",  # noqa: PLR2004 - the target
            )
        )
    else:
        out.append(Target(name, ">= 0.5", "not measured", "n/a"))
    return out


def hot_table(hot: Sequence[HotResult]) -> str:
    """Return the D table: medians over repetitions, per peer."""
    peers: list[str] = []
    for h in hot:
        if h.peer not in peers:
            peers.append(h.peer)
    body = []
    for p in peers:
        rs = [h for h in hot if h.peer == p and h.failure is None]
        if not rs:
            fails = {h.failure for h in hot if h.peer == p}
            body.append([p, "-", "-", "-", "-", "-", "-", f"failed: {fails}"])
            continue
        names: Counter[str] = Counter()
        for h in rs:
            names.update(h.cmds_by_name)
        per = {n: median([h.cmds_by_name.get(n, 0.0) for h in rs]) for n in names}
        body.append(
            [
                p,
                f"{median([h.peer_ops for h in rs]):,.0f}",
                f"{median([h.raw_ops for h in rs]):,.0f}",
                f"{median([h.ratio for h in rs]):.2f}",
                f"{min(h.ratio for h in rs):.2f}-{max(h.ratio for h in rs):.2f}",
                f"{median([h.cmds_per_call for h in rs]):.2f}",
                f"{median([h.round_trips_per_call for h in rs]):.2f}",
                ", ".join(
                    f"{n} {v:g}" for n, v in sorted(per.items(), key=lambda kv: -kv[1])
                ),
            ]
        )
    return table(
        [
            "peer",
            "calls/s",
            "raw GET+json.loads /s (same run)",
            "ratio peer/raw",
            "ratio range",
            "Redis cmds per call",
            "round trips per call",
            "per-call commands",
        ],
        body,
        "lrrrrrrl",
    )


def mem_table(mem: Sequence[MemResult]) -> str:
    """Return the M table, one row per repetition plus the median."""
    ok = [m for m in mem if m.failure is None]
    body = [
        [
            f"rep {m.rep}",
            f"{m.sg_ops:,.0f}",
            f"{m.cachetools_ops:,.0f}",
            f"{m.ratio:.2f}",
        ]
        for m in ok
    ]
    if ok:
        body.append(
            [
                "**median**",
                f"{median([m.sg_ops for m in ok]):,.0f}",
                f"{median([m.cachetools_ops for m in ok]):,.0f}",
                f"{median([m.ratio for m in ok]):.2f}",
            ]
        )
    body.extend(
        [f"rep {m.rep}", "-", "-", f"failed: {m.failure}"] for m in mem if m.failure
    )
    return table(
        [
            "repetition",
            "stampede_guard (MemoryBackend) calls/s",
            "cachetools TTLCache calls/s",
            "ratio",
        ],
        body,
        "lrrr",
    )


def floor_table(rows: Sequence[FloorRow], samples: int) -> str:
    """Return the round-trip floor table."""
    return table(
        [
            f"measure (sequential, 1 connection, {samples} samples)",
            "p50 us",
            "p99 us",
            "min us",
        ],
        [[r.name, fmt(r.p50_us), fmt(r.p99_us), fmt(r.min_us)] for r in rows],
        "lrrr",
    )


def markdown(
    meta: dict[str, Any],
    *,
    floor: Sequence[FloorRow],
    rows: Sequence[Agg],
    hot: Sequence[HotResult],
    mem: Sequence[MemResult],
    skipped: dict[str, str],
) -> str:
    """Return the whole report."""
    out = [
        f"# stampede_guard benchmark, {meta['started']}",
        "",
        table(
            ["run", "details"],
            [[k, str(v)] for k, v in meta["header"].items()],
            "ll",
        ),
        "",
        "## Targets (stampede_guard)",
        "",
        table(
            ["target", "goal", "measured", "result"],
            [[t.name, t.goal, t.measured, t.status] for t in targets(rows, hot, mem)],
            "llll",
        ),
    ]
    key = excess_key_table(rows)
    if key:
        out += [
            "",
            "## Waiter excess, all peers (medians over repetitions)",
            "",
            "excess = return time - min(start + compute_s, max(start, end of the key's first computation))",
            "",
            key,
        ]
    if floor:
        out += [
            "",
            "## Round-trip floor",
            "",
            floor_table(floor, meta["floor_samples"]),
        ]
    for scenario, title in SCENARIO_TITLES.items():
        srows = [a for a in rows if a.scenario == scenario]
        if not srows:
            continue
        out += ["", f"## {title}", "", stampede_table(srows)]
        notes = [f"- {a.peer} @ {a.compute_s:g} s: {n}" for a in srows for n in a.notes]
        if notes:
            out += ["", *notes]
    if hot:
        out += [
            "",
            "## D: hot hit path on Redis (one caller, key cached)",
            "",
            hot_table(hot),
        ]
    if mem:
        out += ["", "## M: hot hit path in memory (one caller)", "", mem_table(mem)]
    if skipped:
        out += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in skipped.items()]
    return "\n".join(out) + "\n"
