"""The demo's report: the stampede figures, their targets and a cost estimate.

A helper of ``demo_stampede_prevention.py``; it has no command line of its own.
"""

from __future__ import annotations

import collections
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from demo_load import WAITING_ROLES, Record, RunResult
from demo_weather_api import ServerErrors
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from stampede_guard import StatsSnapshot

__all__ = [
    "Check",
    "Summary",
    "checks",
    "plural",
    "render_cost",
    "render_requests",
    "render_table",
    "summarize",
]

# The cost example: a metered weather API at $0.001 a call, 100,000 requests a day.
EXAMPLE_COST_PER_CALL = 0.001
EXAMPLE_REQUESTS_PER_DAY = 100_000
DAYS_PER_YEAR = 365
# An API call that takes this much longer than twice the API's latency, from the
# caller's side, means the callers were starved of CPU, not that the API was slow.
STARVED_MARGIN = 0.05
# -v shows this many requests per city (besides every one that called the API).
SHOWN_PER_CITY = 8


@dataclass(frozen=True, slots=True)
class Summary:
    """The stampede figures for one run.

    API calls are the weather server's own count. For a protected run, hits, lock
    waits, timeouts and the average wait come from `StampedeStats`; the p99 wait and
    the client average are measured by each caller (its call time minus its own API
    call). An unprotected run has no lock, so it has no lock figures.
    """

    name: str
    requests: int
    concurrent: int
    api_calls: int
    calls_per_city: dict[str, int]
    hits: int
    lock_waits: int | None
    average_wait: float | None
    client_average_wait: float | None
    p99_wait: float | None
    timeouts: int | None
    failed: int
    wall_seconds: float
    latency: float
    api_call_seconds: float | None
    stats: StatsSnapshot | None
    errors: dict[str, int]  # the failed requests' errors, "Type: message" to how many
    disconnects: int  # clients the server saw hang up before their answer
    server_errors: dict[str, int]  # what else failed inside the server

    @property
    def protected(self) -> bool:
        """Return whether the run went through the decorator (it has StampedeStats)."""
        return self.stats is not None

    @property
    def reduction_pct(self) -> float:
        """Return ``(requests - api_calls) / requests * 100``, with the server's count."""
        return (self.requests - self.api_calls) / self.requests * 100

    @property
    def hit_rate_pct(self) -> float:
        """Return ``hits / requests * 100``."""
        return self.hits / self.requests * 100

    @property
    def timeout_rate_pct(self) -> float | None:
        """Return ``timeouts / requests * 100`` (None without a lock)."""
        return None if self.timeouts is None else self.timeouts / self.requests * 100

    @property
    def most_calls_for_a_city(self) -> int:
        """Return the largest number of API calls any one city got."""
        return max(self.calls_per_city.values(), default=0)

    @property
    def success(self) -> bool:
        """Return whether no city got more than one API call: the stampede was prevented."""
        return self.most_calls_for_a_city <= 1

    @property
    def held(self) -> bool:
        """Return whether protection held: at most one call a city, no request failed."""
        return self.success and not self.failed


def percentile(values: Sequence[float], pct: float) -> float:
    """Return the nearest-rank *pct* percentile of *values* (not empty)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(
    result: RunResult,
    calls_per_city: dict[str, int],
    latency: float,
    server: ServerErrors | None = None,
) -> Summary:
    """Return the stampede figures for *result*.

    *calls_per_city* is the server's count, *latency* how long it takes to answer,
    and *server* what went wrong inside it during this run.
    """
    records = result.records
    api_calls = [r.compute for r in records if r.compute > 0]
    calls = {city: calls_per_city.get(city, 0) for city in result.load.cities}
    waits = [r.waited for r in records if r.role in WAITING_ROLES]
    stats = result.stats
    return Summary(
        name="protected" if result.load.protected else "unprotected",
        requests=len(records),
        concurrent=min(result.load.threads, len(records)),
        api_calls=sum(calls_per_city.values()),
        calls_per_city=calls,
        hits=stats.hits if stats else sum(r.role == "hit" for r in records),
        lock_waits=stats.lock_waits if stats else None,
        average_wait=stats.average_wait_seconds if stats else None,
        client_average_wait=statistics.fmean(waits) if waits else None,
        p99_wait=percentile(waits, 99) if waits else None,
        timeouts=stats.timeouts if stats else None,
        failed=sum(r.role == "failed" for r in records),
        wall_seconds=result.wall_seconds,
        latency=latency,
        api_call_seconds=statistics.median(api_calls) if api_calls else None,
        stats=stats,
        errors=dict(collections.Counter(r.error for r in records if r.error)),
        disconnects=0 if server is None else server.disconnects,
        server_errors={} if server is None else server.errors(),
    )


# --- formatting -------------------------------------------------------------------------


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """Return ``"1 API call"``, ``"3 API calls"``, ``"1,000 requests"``: *count* and its noun.

    *nouns* is the plural when it is not *noun* with an ``s``.
    """
    word = noun if count == 1 else nouns or f"{noun}s"
    return f"{count:,} {word}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} %"


def ms(seconds: float | None) -> str:
    """Return *seconds* as ``"381 ms"`` (or ``"12.3 s"`` from 10 s on)."""
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds >= 10 else f"{seconds * 1000:,.0f} ms"  # noqa: PLR2004


@dataclass(frozen=True, slots=True)
class _Row:
    """A row of the table: how to show a run's figure, and its target if any.

    A *protection* row is what the exit status judges (at most one API call a city,
    no failed request); the other targets are reported, in the table and in the
    verdict, but do not change the exit status.
    """

    name: str
    show: Callable[[Summary], str]
    target: str = ""
    passes: Callable[[Summary], bool | None] | None = None
    protection: bool = False


@dataclass(frozen=True, slots=True)
class Check:
    """A protected run's figure against its target."""

    name: str
    shown: str
    target: str
    passed: bool
    protection: bool  # True: the exit status depends on it


_ROWS = (
    _Row("requests", lambda s: _count(s.requests)),
    _Row("API calls (server count)", lambda s: _count(s.api_calls)),
    _Row(
        "API call reduction",
        lambda s: _pct(s.reduction_pct),
        "> 90 %",
        lambda s: s.reduction_pct > 90,  # noqa: PLR2004
    ),
    _Row("cache hits", lambda s: _count(s.hits)),
    _Row(
        "cache hit rate",
        lambda s: _pct(s.hit_rate_pct),
        "> 85 %",
        lambda s: s.hit_rate_pct > 85,  # noqa: PLR2004
    ),
    _Row("lock waits", lambda s: _count(s.lock_waits)),
    _Row(
        "average wait",
        lambda s: ms(s.average_wait),
        "< 500 ms",
        lambda s: None if s.lock_waits is None else (s.average_wait or 0) < 0.5,  # noqa: PLR2004
    ),
    _Row("p99 wait", lambda s: ms(s.p99_wait)),
    _Row("timeouts", lambda s: _count(s.timeouts)),
    _Row(
        "timeout rate",
        lambda s: _pct(s.timeout_rate_pct),
        "< 5 %",
        lambda s: None if s.timeout_rate_pct is None else s.timeout_rate_pct < 5,  # noqa: PLR2004
    ),
    _Row(
        "success",
        lambda s: "yes" if s.success else "no",
        "<= 1 call a city",
        lambda s: s.success,
        protection=True,
    ),
    _Row(
        "failed requests",
        lambda s: _count(s.failed),
        "0",
        lambda s: s.failed == 0,
        protection=True,
    ),
    _Row("wall time", lambda s: f"{s.wall_seconds:.2f} s"),
)


def _mark(console: Console, *, passed: bool | None) -> Text:
    if passed is None:
        return Text("")
    fancy = console.encoding.lower().startswith("utf")
    if passed:
        return Text("✓ pass" if fancy else "PASS", style="bold green")
    return Text("✗ FAIL" if fancy else "FAIL", style="bold red")


def checks(summary: Summary) -> list[Check]:
    """Return *summary*'s figures against their targets, as the table marks them."""
    found: list[Check] = []
    for row in _ROWS:
        passed = row.passes(summary) if row.passes else None
        if passed is not None:
            found.append(
                Check(row.name, row.show(summary), row.target, passed, row.protection)
            )
    return found


def render_table(console: Console, summaries: Sequence[Summary]) -> None:
    """Print the stampede figures of each run side by side, a protected one checked.

    Only a protected run has targets: without one (--no-protection) the table shows
    the figures alone.
    """
    checked = summaries[-1] if summaries[-1].protected else None
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("")
    for summary in summaries:
        table.add_column(summary.name, justify="right")
    if checked is not None:
        table.add_column(f"target ({checked.name})")
        table.add_column("")
    for row in _ROWS:
        shown = [row.show(s) for s in summaries]
        passed = row.passes(checked) if row.passes and checked else None
        if checked is None:
            table.add_row(row.name, *shown)
            continue
        table.add_row(
            row.name,
            *shown,
            row.target if passed is not None else "",
            _mark(console, passed=passed),
        )
    console.print(table)
    for summary in summaries:
        per_city = ", ".join(f"{c} {n:,}" for c, n in summary.calls_per_city.items())
        console.print(f"API calls per city, {summary.name}: {per_city}")
    _render_notes(console, summaries)


def _render_notes(console: Console, summaries: Sequence[Summary]) -> None:
    for summary in summaries:
        if summary.client_average_wait is not None:
            console.print(
                f"Waits, {summary.name} run: the average is StampedeStats' "
                "total_wait_seconds / lock_waits; the p99 and the client-side average "
                f"({ms(summary.client_average_wait)}) come from each waiting "
                "request's own clock: its call time minus its own API call, if any."
            )
    for note in _notes(summaries):
        console.print(f"[yellow]Note:[/] {note}")


def _notes(summaries: Sequence[Summary]) -> list[str]:
    """Return what a careful reader should know about these figures."""
    notes: list[str] = []
    for s in summaries:
        stats = s.stats
        if stats is not None and stats.computations != s.api_calls:
            notes.append(
                f"StampedeStats counted {plural(stats.computations, 'computation')} "
                f"in the {s.name} run; the server received "
                f"{plural(s.api_calls, 'request')}."
            )
        if stats is not None and stats.requests != s.requests:
            notes.append(
                f"StampedeStats counted {plural(stats.requests, 'request')} in the "
                f"{s.name} run; the demo made {s.requests:,}."
            )
        if s.api_calls == 0:
            notes.append(
                f"the {s.name} run made no API call: every value was cached already "
                "(a warm cache, not a stampede). Add --flush to start cold."
            )
        elif stats is None and 0 < s.api_calls < s.concurrent:
            found = s.concurrent - s.api_calls
            notes.append(
                f"{found:,} of the {s.concurrent:,} concurrent unprotected requests "
                f"found a value: {'it' if found == 1 else 'they'} reached the cache "
                "only after the first API answers were stored (the threads take turns "
                "on the CPU, and on Redis share a pool of connections). Every one "
                "that missed called the API."
            )
        notes.extend(_failure_notes(s))
    # Only the protected run's waits are checked, so only its API calls matter here.
    for s in summaries:
        took = s.api_call_seconds
        if s.stats is None or took is None or took < 2 * s.latency + STARVED_MARGIN:
            continue
        notes.append(
            f"from the callers' side, the protected run's API calls took {ms(took)} "
            f"(median) for an API that answers in {ms(s.latency)}. The threads were "
            "queueing for the CPU (a Python process runs one thread at a time; "
            f"there are {os.cpu_count()} CPUs here), and the waits above include that "
            "queueing, since a waiter cannot be served before the API call returns. "
            "Spread the load with --processes N --redis-url URL, or use fewer "
            "--threads."
        )
    return notes


def _failure_notes(s: Summary) -> list[str]:
    """Return what failed in run *s*: its requests, and inside the weather API."""
    notes: list[str] = []
    if s.failed:
        common = sorted(s.errors.items(), key=lambda item: -item[1])[:3]
        causes = "; ".join(f"{error} ({n:,})" for error, n in common)
        notes.append(
            f"{s.failed:,} of the {plural(s.requests, s.name + ' request')} "
            f"failed: {causes}. -v shows each one."
        )
    if s.disconnects:
        notes.append(
            f"in the {s.name} run, the weather API saw "
            f"{plural(s.disconnects, 'client')} hang up before "
            f"{'its' if s.disconnects == 1 else 'their'} answer."
        )
    for error, n in sorted(s.server_errors.items(), key=lambda item: -item[1])[:3]:
        notes.append(
            f"in the {s.name} run, the weather API failed to serve "
            f"{plural(n, 'connection')}: {error}."
        )
    return notes


def render_cost(console: Console, summaries: Sequence[Summary]) -> None:
    """Print the cost example, priced with the protected run's reduction."""
    protected = [s for s in summaries if s.stats is not None]
    if not protected:
        console.print(
            "Cost estimate: run with protection to price the example "
            f"({EXAMPLE_REQUESTS_PER_DAY:,} requests a day at ${EXAMPLE_COST_PER_CALL} an "
            "API call)."
        )
        return
    cut = protected[-1].reduction_pct
    console.print(
        f"Cost estimate, for example: {EXAMPLE_REQUESTS_PER_DAY:,} requests a day "
        f"at ${EXAMPLE_COST_PER_CALL} an API call, with this run's reduction ({cut:.1f} %):"
    )
    # Without protection, every request is an API call.
    without = EXAMPLE_REQUESTS_PER_DAY
    with_ = EXAMPLE_REQUESTS_PER_DAY * (1 - cut / 100)
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column()
    for _ in range(3):
        table.add_column(justify="right")
    for name, calls in (("without protection", without), ("with protection", with_)):
        cost = calls * EXAMPLE_COST_PER_CALL
        table.add_row(
            f"  {name}",
            f"{plural(round(calls), 'call')} a day",
            f"${cost:,.2f} a day",
            f"${cost * DAYS_PER_YEAR:,.0f} a year",
        )
    saved = (without - with_) * EXAMPLE_COST_PER_CALL
    table.add_row(
        "  savings",
        f"{plural(round(without - with_), 'fewer call')}",
        f"${saved:,.2f} a day",
        Text(f"${saved * DAYS_PER_YEAR:,.0f} a year", style="bold"),
    )
    console.print(table)


# --- request by request (-v) -------------------------------------------------------------


def _row(record: Record, start: float) -> tuple[str, ...]:
    return (
        f"{record.city} #{record.index}",
        record.worker,
        f"+{ms(record.started - start)}",
        record.role,
        ms(record.waited),
        ms(record.lock_wait),
        ms(record.compute) if record.compute > 0 else "-",
        "-" if record.served_by is None else f"call {record.served_by}",
    )


def render_requests(console: Console, result: RunResult, level: int) -> None:
    """Print who called the API, who waited and how long: with *level* 1, a sample.

    With *level* 1, each city shows every request that called the API and a few of
    the others, then a line about the rest; with 2 or more, every request.
    """
    records = result.records
    if not records:
        return
    start = min(r.started for r in records)
    name = "protected" if result.load.protected else "unprotected"
    table = Table(
        title=f"{name} run, request by request",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
    )
    table.add_column("request", no_wrap=True)
    for column in ("worker", "start"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("role", no_wrap=True)
    for column in ("waited", "lock wait", "API call", "value from"):
        table.add_column(column, justify="right", no_wrap=True)
    hidden: list[str] = []
    for city in result.load.cities:
        mine = sorted((r for r in records if r.city == city), key=lambda r: r.started)
        shown = mine if level >= 2 else _sample(mine)  # noqa: PLR2004
        for record in shown:
            table.add_row(*_row(record, start))
        table.add_section()
        if len(shown) < len(mine):
            hidden.append(f"{city}: {_hidden(mine, shown)}")
    hidden.append(
        "waited: the call's time minus its own API call, by the caller's clock; "
        "lock wait: the same wait as the library measured it (LockWait events)."
    )
    if level < 2:  # noqa: PLR2004
        hidden.append("-vv shows every request.")
    table.caption = "\n".join(hidden)
    table.caption_justify = "left"
    console.print(table)
    for record in records:
        if record.error is not None:
            console.print(
                f"request #{record.index} ({record.city}): {record.error}", markup=False
            )


def _sample(mine: list[Record]) -> list[Record]:
    """Return the requests that called the API or failed, and others spread evenly."""
    busy = [r for r in mine if r.role not in {"hit", "waited"}]
    if len(busy) >= SHOWN_PER_CITY:
        return busy[:SHOWN_PER_CITY]
    rest = [r for r in mine if r.role in {"hit", "waited"}]
    room = SHOWN_PER_CITY - len(busy)
    step = max(1, len(rest) // room)
    return sorted(busy + rest[::step][:room], key=lambda r: r.started)


def _hidden(mine: list[Record], shown: list[Record]) -> str:
    """Describe the requests of one city that -v leaves out."""
    seen = {r.index for r in shown}
    hidden = [r for r in mine if r.index not in seen]
    counts = collections.Counter(r.role for r in hidden)
    parts = ", ".join(f"{n:,} {role}" for role, n in sorted(counts.items()))
    text = f"{len(hidden):,} more not shown ({parts})"
    waits = sorted(r.waited for r in hidden if r.role in WAITING_ROLES)
    if waits:
        median = statistics.median(waits)
        text += f", waits {ms(waits[0])} to {ms(waits[-1])}, median {ms(median)}"
    return text
