"""Tags on `RedisBackend` (sync): what a tagged hit costs, and what `invalidate_tag` does.

Run from the repository root::

    uv run --group bench benchmarks/tags.py            # full run, about 1 minute
    uv run --group bench benchmarks/tags.py --quick    # smoke run, about 15 s
    uv run --group bench benchmarks/tags.py --json /tmp/tags.json

What it measures, each part in one spawned process (killed after `CHILD_TIMEOUT_S`):

1. **tagged hit vs untagged hit**: ``@cached_stampede_safe(key="t:{x}", ttl=600,
   tags=("t:{x}",), backend=RedisBackend.from_url(url))`` against the same function
   with ``key="u:{x}"`` and no tags, on one backend, each on a key already stored (and
   already read once by this process, as a hot key is). The two sides alternate in
   slices (ABBA..., 41 of 50 ms per side; 7 of 20 ms with ``--quick``): each side's
   figure is the median of its per-slice time per call, the ratio the median of the
   per-slice-pair ratios (tagged / untagged). Then, for 1,000 hits of each side: the
   requests redis-py wrote (`common.RoundTrips`: round trips, client-side), and the
   commands the server ran (INFO commandstats between CONFIG RESETSTAT and INFO,
   commands inside scripts included), per hit.
2. **invalidate_tag on a tag carried by 1, 1,000 and 10,000 entries**: for each size,
   `REPS` groups of that many entries, each group's entries carrying one tag of its
   own, stored beforehand (batch store scripts, not timed); then each tag is
   invalidated once, timed alone (``time.perf_counter`` around the call), the sizes
   taking turns in a rotating order so that a noisy spell hits every size alike. Also
   per size: the server's commands per invalidation, and whether every entry of the
   group then reads as absent (checked with one batch read after the timing).

Markdown goes to stdout, progress to stderr, JSON to
``benchmarks/results/tags-<stamp>.json`` (and ``--json PATH``). It starts its own
redis-server on a free port (see redis_server.py) and never talks to any other.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import redis

from common import RoundTrips, make_value, report_header, run_in_child, source_summary
from redis_server import RedisServer, command_stats
from run import RESULTS, progress, source_state

HOT = "oslo"  # the argument of every timed hit
COUNTED_HITS = 1000  # hits between CONFIG RESETSTAT and INFO, per side
SIZES = (1, 1_000, 10_000)  # entries carrying the invalidated tag
FILL_CHUNK = 500  # keys per batch script call while storing the entries
CHILD_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class Plan:
    """How long everything runs."""

    slices: int  # per side
    slice_s: float
    reps: int  # invalidations timed per size


FULL = Plan(slices=41, slice_s=0.05, reps=15)
QUICK = Plan(slices=7, slice_s=0.02, reps=3)


@dataclass(slots=True)
class Hits:
    """Tagged against untagged hits: seconds per call, requests and commands per hit."""

    tagged_per_call: list[float] = field(default_factory=list)
    plain_per_call: list[float] = field(default_factory=list)
    tagged: float = 0.0  # median seconds per hit
    plain: float = 0.0
    ratio: float = 0.0  # median of the per-pair ratios, tagged / plain
    tagged_requests: float = 0.0  # per hit
    plain_requests: float = 0.0
    tagged_commands: dict[str, float] = field(default_factory=dict)  # per hit
    plain_commands: dict[str, float] = field(default_factory=dict)
    calls: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Invalidations:
    """`invalidate_tag` timed per number of entries carrying the tag."""

    seconds: dict[int, list[float]] = field(default_factory=dict)
    commands: dict[int, dict[str, float]] = field(default_factory=dict)  # per call
    requests: dict[int, float] = field(default_factory=dict)  # per call
    absent: dict[int, bool] = field(default_factory=dict)  # every entry gone after
    fill_s: float = 0.0


# ---------------------------------------------------------------- tagged hits


def _alternate(
    sides: Sequence[Callable[[str], object]], slices: int, slice_s: float
) -> tuple[list[float], list[float], list[int]]:
    """Run two sides alternately (ABBA...): per-slice seconds per call, calls each."""
    per: tuple[list[float], list[float]] = ([], [])
    calls = [0, 0]
    for i in range(slices):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            fn = sides[side]
            n = 0
            t0 = time.perf_counter()
            end = t0 + slice_s
            while True:
                fn(HOT)
                n += 1
                t = time.perf_counter()
                if t >= end:
                    break
            per[side].append((t - t0) / n)
            calls[side] += n
    return per[0], per[1], calls


def _counted(
    admin: redis.Redis, fn: Callable[[str], object]
) -> tuple[float, dict[str, float]]:
    """Requests written and server commands run per call of *fn*, over COUNTED_HITS."""
    admin.config_resetstat()
    before = RoundTrips.read()
    for _ in range(COUNTED_HITS):
        fn(HOT)
    requests = RoundTrips.read() - before
    stats = command_stats(admin)
    per_hit = {name: n / COUNTED_HITS for name, n in sorted(stats.items())}
    return requests / COUNTED_HITS, per_hit


def measure_hits(url: str, plan: Plan) -> Hits:
    """Part 1 (see the module): tagged and untagged hits, alternating."""
    from stampede_guard import RedisBackend, cached_stampede_safe  # noqa: PLC0415

    backend = RedisBackend.from_url(url)

    def value(x: str) -> dict[str, object]:
        return make_value(f"k:{x}")

    tagged = cast(
        "Callable[[str], object]",
        cached_stampede_safe(key="t:{x}", ttl=600, tags=("t:{x}",), backend=backend)(
            value
        ),
    )
    plain = cast(
        "Callable[[str], object]",
        cached_stampede_safe(key="u:{x}", ttl=600, backend=backend)(value),
    )
    expected = value(HOT)
    for fn in (tagged, plain):
        for _ in range(3):  # stored, then read: this process knows the key is tagged
            if fn(HOT) != expected:
                msg = "a hit returned a wrong value"
                raise RuntimeError(msg)
    gc.collect()
    gc.freeze()
    _alternate((tagged, plain), 2, plan.slice_s)  # warm-up
    result = Hits()
    t, p, result.calls = _alternate((tagged, plain), plan.slices, plan.slice_s)
    result.tagged_per_call, result.plain_per_call = t, p
    result.tagged, result.plain = statistics.median(t), statistics.median(p)
    result.ratio = statistics.median(a / b for a, b in zip(t, p, strict=True))
    admin = redis.Redis.from_url(url)
    result.tagged_requests, result.tagged_commands = _counted(admin, tagged)
    result.plain_requests, result.plain_commands = _counted(admin, plain)
    admin.close()
    backend.close()
    return result


# ---------------------------------------------------------------- invalidations


def _fill(backend: Any, keys: list[str], tag: str) -> None:
    """Store *keys*, each carrying *tag*, as leaders do: lock, then store and unlock."""
    from stampede_guard import Entry  # noqa: PLC0415

    now = time.time()
    for start in range(0, len(keys), FILL_CHUNK):
        chunk = keys[start : start + FILL_CHUNK]
        claims = backend.get_or_lock_many(chunk, "filler", 30)
        items = [
            (key, Entry({"i": start + i}, now, 0.001, (tag,)), 600, claim.ticket)
            for i, (key, claim) in enumerate(zip(chunk, claims, strict=True))
        ]
        stored = backend.set_and_unlock_many(items, "filler")
        if any(entry is None for entry in stored):
            msg = f"an entry carrying {tag!r} was not stored"
            raise RuntimeError(msg)


def _group(size: int, rep: int) -> tuple[str, list[str]]:
    """The tag and keys of repetition *rep*'s group of *size* entries."""
    return f"g{size}r{rep}", [f"g{size}r{rep}:{i}" for i in range(size)]


def _order(rep: int) -> tuple[int, ...]:
    """The sizes in repetition *rep*'s turn: each comes first as often as the others."""
    turn = rep % len(SIZES)
    return SIZES[turn:] + SIZES[:turn]


def measure_invalidations(url: str, plan: Plan) -> Invalidations:
    """Part 2 (see the module): invalidate_tag on tags carried by SIZES entries."""
    from stampede_guard import RedisBackend  # noqa: PLC0415

    backend = RedisBackend.from_url(url)
    admin = redis.Redis.from_url(url)
    result = Invalidations(seconds={size: [] for size in SIZES})
    t0 = time.perf_counter()
    # Stored in the order they are timed in, so that no size is always the most
    # recently written (a colder or warmer part of the server's memory).
    for rep in range(plan.reps):
        for size in _order(rep):
            _fill(backend, *_group(size, rep)[::-1])
    result.fill_s = time.perf_counter() - t0
    backend.invalidate_tag("warm-up")  # loads the script, connects
    gc.collect()
    gc.freeze()
    commands: dict[int, list[dict[str, int]]] = {size: [] for size in SIZES}
    requests: dict[int, list[int]] = {size: [] for size in SIZES}
    for rep in range(plan.reps):
        for size in _order(rep):
            tag, _ = _group(size, rep)
            admin.config_resetstat()
            before = RoundTrips.read()
            start = time.perf_counter()
            backend.invalidate_tag(tag)
            result.seconds[size].append(time.perf_counter() - start)
            requests[size].append(RoundTrips.read() - before)
            commands[size].append(command_stats(admin))
    for size in SIZES:
        names = sorted({name for stats in commands[size] for name in stats})
        result.commands[size] = {
            name: statistics.fmean(s.get(name, 0) for s in commands[size])
            for name in names
        }
        result.requests[size] = statistics.fmean(requests[size])
        result.absent[size] = all(
            all(entry is None for entry in _read_all(backend, _group(size, rep)[1]))
            for rep in range(plan.reps)
        )
    admin.close()
    backend.close()
    return result


def _read_all(backend: Any, keys: list[str]) -> list[object]:
    found: list[object] = []
    for start in range(0, len(keys), FILL_CHUNK):
        found += backend.get_many(keys[start : start + FILL_CHUNK])
    return found


# ---------------------------------------------------------------- processes


def run_child(kind: str, url: str, plan: Plan) -> object:
    """Run one part in a spawned process, killed after CHILD_TIMEOUT_S."""
    measure = measure_hits if kind == "hits" else measure_invalidations
    return run_in_child(measure, url, plan, timeout_s=CHILD_TIMEOUT_S)


# ---------------------------------------------------------------- report


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def _commands(per_call: dict[str, float]) -> str:
    total = sum(per_call.values())
    shown = ", ".join(f"{name} {n:g}" for name, n in per_call.items())
    return f"{total:g} ({shown})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """An aligned Markdown table."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
            + " |"
        )

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [
        line(row) for row in rows
    ]


def markdown(
    meta: dict[str, str], plan: Plan, hits: Hits | str, inv: Invalidations | str
) -> str:
    """Return the header and the two tables, in Markdown."""
    lines = ["# Tags benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", '## Hits: `tags=("t:{x}",)` vs no tags, RedisBackend (sync)', ""]
    if isinstance(hits, str):
        lines.append(f"FAILED: {hits}")
    else:
        lines += _table(
            ("per hit", 'tags=("t:{x}",)', "no tags", "tagged / untagged"),
            [
                (
                    "time, µs (median of slices)",
                    _us(hits.tagged),
                    _us(hits.plain),
                    f"{hits.ratio:.3f}x (median of pairs)",
                ),
                (
                    "round trips (client requests)",
                    f"{hits.tagged_requests:g}",
                    f"{hits.plain_requests:g}",
                    "",
                ),
                (
                    "server commands (scripts' included)",
                    _commands(hits.tagged_commands),
                    _commands(hits.plain_commands),
                    "",
                ),
            ],
        )
        lines += [
            "",
            (
                f"{plan.slices} slices of {plan.slice_s * 1000:.0f} ms per side, "
                f"ABBA; calls: {hits.calls[0]:,} tagged, {hits.calls[1]:,} "
                f"untagged. Counts over {COUNTED_HITS:,} hits per side."
            ),
        ]
    lines += ["", "## `invalidate_tag` by entries carrying the tag", ""]
    if isinstance(inv, str):
        lines.append(f"FAILED: {inv}")
    else:
        base = statistics.median(inv.seconds[SIZES[0]])
        rows = []
        for size in SIZES:
            s = inv.seconds[size]
            rows.append(
                (
                    f"{size:,}",
                    _us(statistics.median(s)),
                    f"{_us(min(s))} - {_us(max(s))}",
                    f"{statistics.median(s) / base:.2f}x",
                    f"{inv.requests[size]:g}",
                    _commands(inv.commands[size]),
                    "yes" if inv.absent[size] else "NO",
                )
            )
        lines += _table(
            (
                "entries",
                "median µs",
                "min - max µs",
                "vs 1 entry",
                "round trips",
                "server commands",
                "all entries absent after",
            ),
            rows,
        )
        lines += [
            "",
            (
                f"{plan.reps} invalidations per size, each of a tag of its own, "
                f"sizes in rotating order; storing the {sum(SIZES) * plan.reps:,} "
                f"entries beforehand took {inv.fill_s:.1f} s (not timed)."
            ),
        ]
    return "\n".join(lines) + "\n"


def _failure(got: object) -> str | None:
    if isinstance(got, (Hits, Invalidations)):
        return None
    text = str(got)
    if "\n" in text:
        progress(text)
    return text.splitlines()[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Measure; print Markdown; write JSON. Exit 1 if a part failed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write JSON here")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    src_start = source_state()
    load_start = os.getloadavg()[:1]
    with RedisServer() as server:
        redis_version = server.version()
        progress(f"redis-server {redis_version} on {server.url} (private)")
        progress(f"stampede_guard: {src_start}")
        progress("[hits] tagged vs untagged ...")
        hits = run_child("hits", server.url, plan)
        if isinstance(hits, Hits):
            progress(
                f"[hits] {_us(hits.tagged)} vs {_us(hits.plain)} µs, "
                f"ratio {hits.ratio:.3f}"
            )
        server.admin.flushall()
        progress(f"[invalidate_tag] {plan.reps} x {SIZES} entries ...")
        inv = run_child("invalidations", server.url, plan)
        if isinstance(inv, Invalidations):
            shown = ", ".join(
                f"{size}: {_us(statistics.median(s))} µs"
                for size, s in inv.seconds.items()
            )
            progress(f"[invalidate_tag] {shown}")
    failures = [f for f in (_failure(hits), _failure(inv)) if f is not None]
    elapsed = time.perf_counter() - t0
    src_end = source_state()
    if source_summary(src_start, src_end).startswith("CHANGED"):
        progress("warning: src/stampede_guard changed during the run")
    meta = report_header(
        "tags.py",
        started=started,
        elapsed=elapsed,
        redis_version=redis_version,
        src=(src_start, src_end),
        load=(load_start, os.getloadavg()[:1]),
    )
    text = markdown(
        meta,
        plan,
        hits if isinstance(hits, Hits) else str(_failure(hits)),
        inv if isinstance(inv, Invalidations) else str(_failure(inv)),
    )
    sys.stdout.write(text)
    sys.stdout.flush()
    payload = json.dumps(
        {
            "meta": meta,
            "plan": dataclasses.asdict(plan),
            "hits": dataclasses.asdict(hits) if isinstance(hits, Hits) else str(hits),
            "invalidations": dataclasses.asdict(inv)
            if isinstance(inv, Invalidations)
            else str(inv),
            "markdown": text,
        },
        indent=1,
    )
    RESULTS.mkdir(exist_ok=True)
    paths = [RESULTS / f"tags-{started.strftime('%Y%m%d-%H%M%S')}.json"]
    if args.json is not None:
        paths.append(args.json)
    for path in paths:
        path.write_text(payload)
    progress(f"done in {elapsed:.0f} s; JSON in {', '.join(map(str, paths))}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
