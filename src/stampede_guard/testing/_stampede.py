"""Release N callers of a decorated function at once and count what happened.

Computations are counted by `counted`, a wrapper placed *under* the decorator: the
decorator's ``__wrapped__`` leads to it, so `stampede` finds it in this process and,
with processes, each child finds its own copy and reports its count.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import multiprocessing
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any, Literal, ParamSpec, TypeVar, cast

__all__ = [
    "Counted",
    "StampedeResult",
    "astampede",
    "counted",
    "counter_of",
    "stampede",
]

P = ParamSpec("P")
R = TypeVar("R")

Using = Literal["threads", "tasks", "processes"]


class Counted:
    """The number of times a function wrapped by `counted` began to run (thread-safe)."""

    __slots__ = ("_mutex", "calls")

    def __init__(self) -> None:
        self.calls = 0
        self._mutex = threading.Lock()

    def count(self) -> None:
        """Count one run."""
        with self._mutex:
            self.calls += 1


def counted(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap *fn* so that `stampede` can count its runs; apply it under the decorator.

    The wrapper keeps *fn*'s signature, name and kind (a coroutine function stays one),
    so the decorator sees the same function: same keys, same sync or async face.
    Its count is ``counter_of(wrapper).calls``.
    """
    tally = Counted()
    if inspect.iscoroutinefunction(fn):
        run = cast("Callable[P, Awaitable[Any]]", fn)

        @functools.wraps(fn)
        async def counting_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            tally.count()
            return await run(*args, **kwargs)

        counting_async.counted = tally  # type: ignore[attr-defined]
        return cast("Callable[P, R]", counting_async)

    @functools.wraps(fn)
    def counting(*args: P.args, **kwargs: P.kwargs) -> R:
        tally.count()
        return fn(*args, **kwargs)

    counting.counted = tally  # type: ignore[attr-defined]
    return counting


def counter_of(fn: object) -> Counted:
    """Return the `Counted` of the `counted` wrapper under *fn*'s decorators.

    Raises:
        TypeError: If no function down *fn*'s ``__wrapped__`` chain was made by
            `counted`: computations could not be counted.
    """
    seen = fn
    for _ in range(100):
        tally = getattr(seen, "counted", None)
        if isinstance(tally, Counted):
            return tally
        seen = getattr(seen, "__wrapped__", None)
        if seen is None:
            break
    msg = (
        f"{fn!r} has no stampede_guard.testing.counted function under its decorator: "
        "write @cached_stampede_safe(...) above @counted so computations can be counted"
    )
    raise TypeError(msg)


@dataclass(frozen=True, slots=True)
class StampedeResult:
    """What a stampede did.

    Attributes:
        results: What each caller that returned got, in no particular order.
        errors: What each caller that raised raised (across processes: the exception
            if it could be pickled, else a `RuntimeError` naming it).
        computations: How many times the function ran, over every process.
    """

    results: list[Any]
    errors: list[BaseException]
    computations: int


def stampede(
    fn: Callable[..., Any],
    *,
    callers: int = 100,
    using: Using = "threads",
    args: Sequence[object] = (),
    kwargs: Mapping[str, object] | None = None,
    processes: int = 4,
    timeout: float = 30.0,
) -> StampedeResult:
    """Call *fn* from *callers* callers released at once; count results and runs.

    Args:
        fn: A decorated function with a `counted` function under its decorator.
            For ``"tasks"`` a coroutine function; for ``"processes"`` one that
            pickles by name (defined at module level) and whose module makes its
            backend on import (the children import it afresh).
        callers: How many calls, all started before any is let go.
        using: ``"threads"`` of this process, ``"tasks"`` of a new event loop, or
            ``"processes"``: *processes* spawned processes sharing the callers as
            threads, let go together once every thread of every process is ready.
        args: Positional arguments of every call.
        kwargs: Keyword arguments of every call.
        processes: How many processes, with ``using="processes"``.
        timeout: Seconds for the whole stampede; callers still running then fail
            the helper with an `AssertionError`.

    Returns:
        The `StampedeResult`: values, errors and the number of computations.

    Raises:
        TypeError: If *fn* has no `counted` function under it.
        AssertionError: If callers were still running after *timeout* seconds.
    """
    call_kwargs = dict(kwargs or {})
    match using:
        case "threads":
            counter = counter_of(fn)
            before = counter.calls
            results, errors = _threads(
                fn,
                callers=callers,
                args=tuple(args),
                kwargs=call_kwargs,
                timeout=timeout,
            )
            return StampedeResult(results, errors, counter.calls - before)
        case "tasks":
            return asyncio.run(
                astampede(
                    fn, callers=callers, args=args, kwargs=kwargs, timeout=timeout
                )
            )
        case "processes":
            counter_of(fn)  # refuse an uncountable function before spawning anything
            return _processes(
                fn,
                callers=callers,
                processes=processes,
                args=tuple(args),
                kwargs=call_kwargs,
                timeout=timeout,
            )


async def astampede(
    fn: Callable[..., Awaitable[Any]],
    *,
    callers: int = 100,
    args: Sequence[object] = (),
    kwargs: Mapping[str, object] | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 - the same parameter as stampede's
) -> StampedeResult:
    """`stampede` with asyncio tasks of the running loop, for async tests.

    Every task is started and waiting on one event before the event is set.
    """
    counter = counter_of(fn)
    before = counter.calls
    go = asyncio.Event()
    call_kwargs = dict(kwargs or {})

    async def call() -> Any:
        await go.wait()
        return await fn(*args, **call_kwargs)

    tasks = [asyncio.ensure_future(call()) for _ in range(callers)]
    await asyncio.sleep(0)  # each task has run up to its wait on the event
    go.set()
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    assert not pending, f"{len(pending)} of {callers} tasks still running"
    results, errors = [], []
    for task in done:
        exc = task.exception()
        if exc is None:
            results.append(task.result())
        else:
            errors.append(exc)
    return StampedeResult(results, errors, counter.calls - before)


def _threads(
    fn: Callable[..., Any],
    *,
    callers: int,
    args: tuple[object, ...],
    kwargs: dict[str, object],
    timeout: float,
    ready: Callable[[], None] | None = None,
) -> tuple[list[Any], list[BaseException]]:
    """Call *fn* from *callers* threads released by a barrier; *ready* runs first."""
    barrier = threading.Barrier(callers + 1, timeout=timeout)
    results: list[Any] = []
    errors: list[BaseException] = []
    mutex = threading.Lock()

    def call() -> None:
        try:
            barrier.wait()
            value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            with mutex:
                errors.append(exc)
        else:
            with mutex:
                results.append(value)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(callers)]
    for thread in threads:
        thread.start()
    if ready is not None:
        ready()  # every thread is started; the caller may hold us here (processes)
    barrier.wait()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = sum(t.is_alive() for t in threads)
    assert not hung, f"{hung} of {callers} threads still running"
    return results, errors


_Report = tuple[list[Any], list[BaseException], int]


def _by_name(module: str, qualname: str) -> Any:
    """Return the object *qualname* of *module*, importing the module."""
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _name_of(fn: Callable[..., Any]) -> tuple[str, str]:
    """Return where a child process finds *fn*, or raise TypeError if it cannot."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    try:
        found = (
            None if module is None or qualname is None else _by_name(module, qualname)
        )
    except (ImportError, AttributeError):
        found = None
    if found is not fn or module is None or qualname is None:
        msg = (
            f"stampede(using='processes') needs a function defined at module level, "
            f"which each process imports by name; {fn!r} is not"
        )
        raise TypeError(msg)
    return module, qualname


def _child(
    name: tuple[str, str],
    *,
    callers: int,
    args: tuple[object, ...],
    kwargs: dict[str, object],
    timeout: float,
    channels: tuple[Queue[int], ProcessEvent, Queue[_Report]],
) -> None:
    """Run one process's share of a stampede and report it (in a spawned child)."""
    ready, go, reports = channels
    fn = _by_name(*name)
    counter = counter_of(fn)

    def wait_for_go() -> None:
        ready.put(callers)
        go.wait(timeout)

    results, errors = _threads(
        fn,
        callers=callers,
        args=args,
        kwargs=kwargs,
        timeout=timeout,
        ready=wait_for_go,
    )
    reports.put((results, [_picklable(exc) for exc in errors], counter.calls))


def _picklable(exc: BaseException) -> BaseException:
    import pickle  # noqa: PLC0415 - only a child reporting an error needs it

    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own bytes, just made
    except Exception:  # noqa: BLE001 - any exception that does not round-trip
        return RuntimeError(f"{type(exc).__qualname__}: {exc}")
    return exc


def _processes(
    fn: Callable[..., Any],
    *,
    callers: int,
    processes: int,
    args: tuple[object, ...],
    kwargs: dict[str, object],
    timeout: float,
) -> StampedeResult:
    """Spread *callers* over *processes* spawned processes, let go all at once."""
    name = _name_of(fn)  # the function itself need not pickle: children import it
    ctx = multiprocessing.get_context("spawn")  # forking a threaded parent is unsafe
    ready: Queue[int] = ctx.Queue()
    reports: Queue[_Report] = ctx.Queue()
    go = ctx.Event()
    shares = [
        callers // processes + (i < callers % processes) for i in range(processes)
    ]
    children = [
        ctx.Process(
            target=_child,
            args=(name,),
            kwargs={
                "callers": share,
                "args": args,
                "kwargs": kwargs,
                "timeout": timeout,
                "channels": (ready, go, reports),
            },
            daemon=True,
        )
        for share in shares
        if share
    ]
    deadline = time.monotonic() + timeout
    try:
        for child in children:
            child.start()
        for _ in children:
            ready.get(timeout=max(0.0, deadline - time.monotonic()))
        go.set()
        results: list[Any] = []
        errors: list[BaseException] = []
        computations = 0
        for _ in children:
            values, failures, runs = reports.get(
                timeout=max(0.0, deadline - time.monotonic())
            )
            results += values
            errors += failures
            computations += runs
    except queue.Empty:
        msg = f"the {len(children)} processes did not all report within {timeout}s"
        raise AssertionError(msg) from None
    finally:
        for child in children:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
                child.join()
    return StampedeResult(results, errors, computations)
