"""Fire N concurrent requests at a real, slow weather API, without and with stampede_guard.

The weather API is an HTTP server on a loopback port, started by the demo. It answers
each request after --latency seconds and counts every request it receives. The demo
starts one thread per request, parks them all, and releases them at once, so every
request misses the cache at the same moment. Unprotected (plain cache-aside: get, on a
miss call the API and set), each one calls the API. Protected by @cached_stampede_safe,
one caller per city calls it and the others wait and are served its value.

The report gives the stampede figures (API calls as counted by the server, cache hits,
lock waits and timeouts from StampedeStats, waits from both), checks them against the
targets in docs/quick-reference.md and prices the reduction with a cost example (a
$0.001 API call, 100,000 requests a day).

Exit status: it says whether protection held, and nothing else.

- 0: protection held: in the protected run, no city's API was called more than once
  and every request was answered. The other targets (reduction, hit rate, average
  wait, timeout rate) and any failure in the unprotected comparison run are reported
  in the table and the verdict, but do not change the status. With --no-protection
  there is no protected run to judge: 0 once the run is over.
- 1: protection did not hold: a city's API was called more than once in the
  protected run, or a protected request failed.
- 2: a bad command line, an unreachable Redis, or a load this machine cannot start
  (open-files or thread limits).
- 130: interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis
from demo_load import (
    CITIES,
    PREFIX,
    SPARE_FILES,
    Load,
    Options,
    RunResult,
    close_redis,
    demo_keys,
    flush,
    lock_keys,
    open_files_limit,
    redis_backend,
    run_in_process,
    tuned_for_many_threads,
    value_keys,
)
from demo_processes import run_in_processes
from demo_report import (
    Summary,
    checks,
    plural,
    render_cost,
    render_requests,
    render_table,
    summarize,
)
from demo_weather_api import MAX_CONNECTIONS, WeatherAPI
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.rule import Rule
from rich.table import Table

from stampede_guard import Backend, MemoryBackend, RedisBackend

MAX_REQUESTS = 10_000
MAX_PROCESSES = 32
MAX_LATENCY = 5.0  # seconds; well below the 10 s lock_timeout, which must outlast it
DEFAULT_REQUESTS = 1000
DEFAULT_CITIES = 3
# A metered weather API answers in about this long. It also lets the default run meet
# the targets honestly with the library's default backoff: waiters look again
# 0.1-0.2 s and 0.3-0.5 s after missing, so most see the value at their second look.
DEFAULT_LATENCY = 0.2
PIPED_WIDTH = 100
# Without a terminal (no progress bar), a run says how far it got this often.
PROGRESS_EVERY = 5.0  # seconds
# From this many threads on, starting them takes a noticeable while: say so first.
MANY_THREADS = 1000
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass(frozen=True, slots=True)
class Settings:
    """The command line, checked."""

    requests: int
    cities: tuple[str, ...]
    threads: int
    processes: int
    latency: float
    redis_url: str | None
    runs: tuple[bool, ...]  # protected? for each run, in order
    options: Options
    verbose: int
    interactive: bool
    flush: bool
    notes: tuple[str, ...]


# --- the command line ------------------------------------------------------------------


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            msg = f"{text!r} is not a whole number"
            raise argparse.ArgumentTypeError(msg) from None
        if not low <= value <= high:
            msg = f"{value} is out of range: give {low} to {high}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def _seconds_in(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            msg = f"{text!r} is not a number of seconds"
            raise argparse.ArgumentTypeError(msg) from None
        if not math.isfinite(value) or not low <= value <= high:
            msg = f"{text} is out of range: give {low:g} to {high:g} seconds"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="demo_stampede_prevention.py",
        description=(
            "Fire N concurrent requests for the weather at a real HTTP API that counts "
            "them: once unprotected, once through @cached_stampede_safe. Unprotected, "
            "N requests make N API calls; protected, one per city."
        ),
        epilog=(
            "exit status: 0 when protection held (in the protected run, no city's API "
            "was called more than once and no request failed), 1 when it did not, 2 "
            "for a bad command line, an unreachable Redis or a load this machine "
            "cannot start. Missed targets and failures of the unprotected run are "
            "reported but do not change it; with --no-protection it is 0."
        ),
    )
    add = parser.add_argument
    add(
        "-r",
        "--requests",
        type=_int_in(1, MAX_REQUESTS),
        default=DEFAULT_REQUESTS,
        metavar="N",
        help=f"concurrent requests, 1 to {MAX_REQUESTS} (default: {DEFAULT_REQUESTS})",
    )
    add(
        "-c",
        "--cities",
        type=_int_in(1, len(CITIES)),
        default=DEFAULT_CITIES,
        metavar="N",
        help=f"cities asked for, 1 to {len(CITIES)}, from {', '.join(CITIES)} "
        f"(default: {DEFAULT_CITIES})",
    )
    add(
        "-t",
        "--threads",
        type=_int_in(1, MAX_REQUESTS),
        metavar="N",
        help="worker threads in all (default: one per request, so that every request "
        "is concurrent); with fewer, each thread makes several requests in turn",
    )
    add(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="show request by request who called the API, who waited and how long "
        "(-v: a sample per city, -vv: every request)",
    )
    add(
        "-i",
        "--interactive",
        action="store_true",
        help="explain each phase and wait for Enter before it",
    )
    add(
        "-f",
        "--flush",
        action="store_true",
        help=f"delete the demo's own keys ({PREFIX}:*) from Redis first, so the run "
        "starts cold; nothing else is touched",
    )
    add(
        "--redis-url",
        metavar="URL",
        help="use RedisBackend on this server, e.g. redis://localhost:6379/0 "
        "(default: MemoryBackend, no server needed)",
    )
    add(
        "--processes",
        type=_int_in(1, MAX_PROCESSES),
        default=1,
        metavar="N",
        help="spread the requests over N OS processes sharing the cache (needs "
        "--redis-url; default: 1)",
    )
    add(
        "--latency",
        type=_seconds_in(0, MAX_LATENCY),
        default=DEFAULT_LATENCY,
        metavar="SECONDS",
        help=f"how long the weather API takes per request (default: {DEFAULT_LATENCY})",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--no-protection",
        action="store_true",
        help="run the unprotected load only (N requests, N API calls)",
    )
    mode.add_argument(
        "--protected-only",
        action="store_true",
        help="skip the unprotected run that is made first for comparison",
    )
    add(
        "--base-delay",
        type=_seconds_in(0.001, MAX_LATENCY),
        default=defaults.base_delay,
        metavar="SECONDS",
        help=f"the decorator's first backoff delay (library default: {defaults.base_delay})",
    )
    add(
        "--max-delay",
        type=_seconds_in(0.001, MAX_LATENCY),
        default=defaults.max_delay,
        metavar="SECONDS",
        help=f"the decorator's longest backoff delay (library default: {defaults.max_delay})",
    )
    return parser


def _settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Settings:
    """Check the options against each other; exit with status 2 if they conflict."""
    requests: int = args.requests
    processes: int = args.processes
    notes: list[str] = []
    threads: int = requests if args.threads is None else args.threads
    if threads > requests:
        notes.append(f"--threads {threads} is more than --requests: using {requests}")
        threads = requests
    if processes > 1 and args.redis_url is None:
        parser.error(
            f"--processes {processes} needs --redis-url: Redis is required to share "
            "the cache between processes (MemoryBackend only coordinates the threads "
            "of one process)"
        )
    if processes > threads:
        parser.error(
            f"--processes {processes} is more than the {threads} threads: each "
            "process needs at least one thread (and one request)"
        )
    if args.max_delay < args.base_delay:
        parser.error(
            f"--max-delay {args.max_delay} is shorter than --base-delay "
            f"{args.base_delay}: it caps the backoff, so make it at least as long"
        )
    if args.redis_url is not None and urlsplit(args.redis_url).scheme not in {
        "redis",
        "rediss",
        "unix",
    }:
        parser.error(
            f"--redis-url {_redact(args.redis_url)!r} is not a Redis URL: use "
            "redis://host:port/db, rediss://... or unix:///path"
        )
    if args.flush and args.redis_url is None:
        notes.append("--flush: the in-memory cache is new for every run anyway")
    if args.no_protection:
        runs: tuple[bool, ...] = (False,)
    elif args.protected_only:
        runs = (True,)
    else:
        runs = (False, True)
    return Settings(
        requests=requests,
        cities=CITIES[: min(args.cities, requests)],
        threads=threads,
        processes=processes,
        latency=args.latency,
        redis_url=args.redis_url,
        runs=runs,
        options=Options(base_delay=args.base_delay, max_delay=args.max_delay),
        verbose=args.verbose,
        interactive=args.interactive,
        flush=args.flush,
        notes=tuple(notes),
    )


def _redact(url: str) -> str:
    """Return *url* with its password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class _UsageError(Exception):
    """The command line cannot run on this machine as given (exit status 2)."""


# --- setting up --------------------------------------------------------------------------


def _check_open_files(settings: Settings) -> None:
    """Raise `_UsageError` if this process may not open the sockets the runs need."""
    if False not in settings.runs:
        return  # a protected run makes one API call per city, not one per request
    # An unprotected request holds its HTTP connection open while the API sleeps:
    # a socket per thread on the client's side (in the worker processes, with
    # --processes), and one per connection served on the server's, which serves at
    # most MAX_CONNECTIONS at once (the rest wait in the kernel's accept queue).
    client = 0 if settings.processes > 1 else settings.threads
    needed = client + min(settings.threads, MAX_CONNECTIONS) + SPARE_FILES
    limit = open_files_limit(needed)
    if limit is not None and limit < needed:
        spare = limit - min(settings.threads, MAX_CONNECTIONS) - SPARE_FILES
        most = max(1, spare if client else settings.threads)
        msg = (
            f"{plural(settings.threads, 'concurrent request')} need about "
            f"{needed:,} open files (sockets), but this process may open {limit:,} "
            f"(ulimit -n). Use --threads {most} or fewer, --protected-only, "
            "--processes with Redis, or raise ulimit -n"
        )
        raise _UsageError(msg)


def _backend(settings: Settings, stack: contextlib.ExitStack) -> Backend:
    """Return the cache: a new MemoryBackend, or a RedisBackend that answers PING."""
    if settings.redis_url is None:
        return MemoryBackend()
    where = _redact(settings.redis_url)
    try:
        backend = redis_backend(settings.redis_url)
    except ValueError as exc:
        msg = f"--redis-url {where!r}: {exc}"
        raise _UsageError(msg) from exc
    stack.callback(close_redis, backend)
    try:
        backend.client.ping()
    except redis.RedisError as exc:
        msg = f"cannot reach Redis at {where}: {exc}"
        raise _UsageError(msg) from exc
    return backend


def _prepare_cache(console: Console, settings: Settings, backend: Backend) -> None:
    """Flush the demo's keys if asked; otherwise warn about any left from before."""
    if not isinstance(backend, RedisBackend):
        return
    client = backend.client
    if not isinstance(client, redis.Redis):  # the demo's from_url makes no other kind
        return
    if settings.flush:
        deleted = flush(client)
        console.print(f"--flush: deleted {plural(deleted, 'demo key')} ({PREFIX}:*).")
        return
    keys = demo_keys(client)
    locks = len(lock_keys(keys))
    values = len(value_keys(keys))
    if keys:
        console.print(
            f"[yellow]Warning:[/] Redis already holds "
            f"{plural(values, 'cached value')} and {plural(locks, 'lock')} under "
            f"{PREFIX}:* from an earlier run, so this run starts warm, not with a "
            "stampede. Add --flush to start cold."
        )


def _header(console: Console, settings: Settings, api: WeatherAPI) -> None:
    opts, defaults = settings.options, Options()
    own = (opts.base_delay, opts.max_delay) != (defaults.base_delay, defaults.max_delay)
    n_cities = len(settings.cities)
    if settings.redis_url is None:
        cache = "in memory: a new MemoryBackend, shared by the threads of this process"
    else:
        cache = (
            f"Redis at {escape(_redact(settings.redis_url))}: RedisBackend.from_url(url, "
            f"prefix={PREFIX!r}) in each process, with the library's defaults "
            "(a pool of 100 connections)"
        )
    processes = plural(settings.processes, "process", "processes")
    backoff = "set on the command line" if own else "the library's defaults"
    console.print(
        f"[bold]Cache stampede demo:[/] {plural(settings.requests, 'concurrent request')} "
        f"for the weather in {plural(n_cities, 'city', 'cities')} "
        f"({', '.join(settings.cities)})"
    )
    grid = Table.grid(padding=(0, 2, 0, 0))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row(
        "weather API",
        f"{api.url}/weather: a real HTTP server in this process that counts the "
        f"requests it receives; {settings.latency * 1000:g} ms a request, at most "
        f"{MAX_CONNECTIONS:,} at once (the others wait in the accept queue)",
    )
    grid.add_row("cache", cache)
    grid.add_row(
        "load",
        f"{plural(settings.threads, 'thread')} in {processes}, all released at once",
    )
    grid.add_row(
        "decorator",
        f"ttl={opts.ttl:g}, lock_timeout={opts.lock_timeout:g}, wait_timeout="
        f"{opts.lock_timeout:g}, base_delay={opts.base_delay:g}, max_delay="
        f"{opts.max_delay:g} (seconds), on_timeout='compute': {backoff}",
    )
    for note in settings.notes:
        grid.add_row("note", note)
    console.print(Padding(grid, (0, 0, 0, 2)))


# --- step by step (-i) --------------------------------------------------------------------


class _Pauser:
    """Explain a phase, then wait for Enter if -i is given and stdin is a terminal."""

    def __init__(self, console: Console, *, enabled: bool) -> None:
        self._console = console
        self._enabled = enabled
        self._waits = enabled and sys.stdin is not None and sys.stdin.isatty()
        if enabled and not self._waits:
            console.print(
                "[yellow]-i:[/] stdin is not a terminal, so the phases are explained "
                "without waiting for Enter."
            )

    def __call__(self, title: str, text: str) -> None:
        if not self._enabled:
            return
        self._console.print(Rule(title, align="left"))
        self._console.print(text)
        if self._waits:
            try:
                self._console.input("[dim]Press Enter to continue...[/] ")
            except EOFError:
                self._waits = False


def _explain_setup(settings: Settings, api: WeatherAPI) -> str:
    where = (
        "in this process's memory"
        if settings.redis_url is None
        else "in Redis, shared by every process that uses it"
    )
    return (
        f"The weather API at {api.url} is a real HTTP server. It answers each request "
        f"after {settings.latency:g} s, like a slow, metered API, and counts every "
        "request it receives: that count is the report's 'API calls'. Values are "
        f"cached {where}."
    )


def _explain_run(settings: Settings, *, protected: bool) -> str:
    n, cities = settings.requests, len(settings.cities)
    threads = plural(settings.threads, "thread")
    concurrent = (
        f"{threads} {'is' if settings.threads == 1 else 'are'} started, parked, and "
        "released together"
        if settings.threads == n
        else f"{threads} {'is' if settings.threads == 1 else 'are'} released "
        f"together, and each then makes its share of the {n:,} requests in turn"
    )
    if not protected:
        return (
            f"{concurrent}. Each request runs plain cache-aside code: look in the "
            "cache; on a miss, call the API and store the value. The concurrent "
            "requests all miss at the same moment, so each of them calls the API: "
            f"expect about {plural(min(n, settings.threads), 'API call')}."
        )
    opts = settings.options
    return (
        f"{concurrent}. Each request calls get_weather(city), decorated with "
        "@cached_stampede_safe(key='weather:{city}', ...). Per city, the first "
        "caller to miss takes the lock and calls the API; the others wait until "
        "the value is stored and are served it. They learn of it from a notice, "
        "or at the latest at their next look: the looks back off from "
        f"{opts.base_delay:g} s, doubling up to {opts.max_delay:g} s, with jitter. "
        f"Expect one API call per city: {cities}."
    )


_EXPLAIN_REPORT = (
    "The report gives the stampede figures for each run: API calls as the "
    "server counted them, cache hits, lock waits and timeouts from StampedeStats, "
    "and waits from StampedeStats and from each request's own clock. The last "
    "column checks the targets; then a cost example is priced with "
    "the measured reduction."
)


# --- running -------------------------------------------------------------------------------


def _run_load(
    console: Console, settings: Settings, load: Load, backend: Backend
) -> RunResult:
    name = "protected" if load.protected else "unprotected"
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(f"{name} run", total=load.requests)
        started = time.monotonic()
        said = started

        def on_progress(done: int) -> None:
            nonlocal said
            progress.update(task, completed=done)
            now = time.monotonic()
            # Without a terminal there is no bar: a line every few seconds instead.
            if not console.is_terminal and now - said >= PROGRESS_EVERY:
                said = now
                console.print(
                    f"{name} run: {done:,} of {plural(load.requests, 'request')} "
                    f"done after {now - started:.0f} s"
                )

        if not console.is_terminal and load.threads >= MANY_THREADS:
            console.print(
                f"{name} run: starting {plural(load.threads, 'thread')}, then "
                "releasing them together..."
            )
        try:
            if settings.redis_url is not None and settings.processes > 1:
                return run_in_processes(load, settings.redis_url, on_progress)
            return run_in_process(load, backend, on_progress)
        except RuntimeError as exc:  # could not start its threads, or release them
            raise _UsageError(str(exc)) from exc


def _demo(console: Console, settings: Settings) -> int:
    _check_open_files(settings)
    with contextlib.ExitStack() as stack:
        stack.enter_context(tuned_for_many_threads())
        backend = _backend(settings, stack)
        api = stack.enter_context(WeatherAPI(settings.latency))
        pause = _Pauser(console, enabled=settings.interactive)
        _header(console, settings, api)
        pause("The setup", _explain_setup(settings, api))
        _prepare_cache(console, settings, backend)
        summaries: list[Summary] = []
        results: list[RunResult] = []
        for protected in settings.runs:
            name = "protected" if protected else "unprotected"
            pause(f"The {name} run", _explain_run(settings, protected=protected))
            api.reset()
            load = Load(
                api_url=api.url,
                protected=protected,
                requests=settings.requests,
                cities=settings.cities,
                threads=settings.threads,
                processes=settings.processes,
                options=settings.options,
            )
            result = _run_load(console, settings, load, backend)
            summary = summarize(result, api.calls(), settings.latency, api.errors)
            results.append(result)
            summaries.append(summary)
            failed = f", {summary.failed:,} failed" if summary.failed else ""
            console.print(
                f"{name} run: {plural(summary.requests, 'request')} in "
                f"{summary.wall_seconds:.2f} s, {plural(summary.api_calls, 'API call')}"
                f"{failed}"
            )
        pause("The report", _EXPLAIN_REPORT)
    if settings.verbose:
        for result in results:
            console.print()
            render_requests(console, result, settings.verbose)
    console.print()
    render_table(console, summaries)
    console.print()
    render_cost(console, summaries)
    console.print()
    return _verdict(console, summaries[-1], summaries)


def _verdict(console: Console, last: Summary, summaries: Sequence[Summary]) -> int:
    """Print the verdict, which agrees with the table; return the exit status.

    The status says whether protection held (see the module docstring); a missed
    target is named in the verdict but does not change it, and the unprotected run's
    failures are charged to that run alone.
    """
    for s in summaries:
        if not s.protected and s.failed:
            console.print(
                f"[yellow]Unprotected run:[/] {s.failed:,} of "
                f"{plural(s.requests, 'request')} failed (see the notes above). "
                "That run is the comparison without the decorator: its failures do "
                "not count against protection."
            )
    if not last.protected:
        console.print(
            f"Unprotected: {plural(last.api_calls, 'API call')} for "
            f"{plural(last.requests, 'request')}. Leave out --no-protection to "
            "compare with the decorator (exit status 0: there is no protected run "
            "to judge)."
        )
        return EXIT_OK
    done = (
        f"with protection, {plural(last.requests, 'request')} made "
        f"{plural(last.api_calls, 'API call')}"
    )
    missed = [c for c in checks(last) if not c.passed and not c.protection]
    also = "; ".join(f"{c.name} {c.shown} (target {c.target})" for c in missed)
    if not last.held:
        worst = max(last.calls_per_city, key=last.calls_per_city.__getitem__)
        why = []
        if not last.success:
            most = plural(last.calls_per_city[worst], "API call")
            why.append(f"{worst} got {most}, at most 1 allowed")
        if last.failed:
            why.append(f"{last.failed:,} of them failed")
        console.print(
            f"[bold red]FAILED:[/] protection did not hold: {done}; {'; '.join(why)}."
            + (f" Also missed: {also}." if missed else "")
        )
        return EXIT_FAILED
    held = f"{done}, at most 1 a city, and none failed"
    if not missed:
        console.print(
            f"[bold green]OK:[/] protection held and every target was met: {held}."
        )
        return EXIT_OK
    console.print(
        f"[bold yellow]PROTECTION HELD, {plural(len(missed), 'TARGET').upper()} "
        f"MISSED:[/] {held}, but missed {also}. The exit status is 0: it says only "
        "whether protection held."
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo with the command line *argv*; return the exit status."""
    parser = _parser()
    try:
        settings = _settings(parser, parser.parse_args(argv))
    except SystemExit as exit_:  # --help, or a bad command line (argparse printed it)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPED_WIDTH  # rich's 80 would wrap the tables
    try:
        return _demo(console, settings)
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
