"""The objects `cached_stampede_safe_batch` puts in place of batch functions.

A call, for the ids it is given (repeats served once):

1. Each id's key is read where reading costs no I/O (a memory backend, a near cache).
2. The keys still missing are claimed in this process (`_batch_flights`): keys that
   another call of this process is looking up are joined, not looked up again.
3. The claimed keys are read from the backend in one multi-get; those still missing
   are looked up again and locked in one step, all with one token (the double-check
   of the single decorator, for many keys at once).
4. The function is called ONCE with exactly the ids whose locks this call took; their
   values are stored and the locks released in one step. If it raises, every lock is
   released and nothing is stored.
5. Each id whose lock another caller holds is served by the single decorator's plan:
   wait for its value with notices and backoff, take over if the holder dies, apply
   ``on_timeout`` (computing the id alone, if it comes to that).

Values due for a refresh (``stale_ttl``, ``early_refresh``) are served and refreshed
id by id, as the single decorator refreshes them. Every decision is in ``_batch``;
the call itself is one flow (`_Base._call`), which the two classes below carry out,
each in its own I/O syntax.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, assert_never

from stampede_guard._batch import (
    BatchKeys,
    check_result,
    keys_of,
    sort_claims,
    sort_found,
    stored_form,
    unique,
    value_of,
)
from stampede_guard._batch_flights import AsyncBatchFlights, BatchFlights, Outcome
from stampede_guard._batch_io import (
    aget_many,
    aget_or_lock_many,
    aquietly,
    aset_and_unlock_many,
    aunlock_many,
    get_many,
    get_or_lock_many,
    quietly,
    set_and_unlock_many,
    unlock_many,
)
from stampede_guard._call import serve_due
from stampede_guard._coalesce import Refreshing
from stampede_guard._context import Context
from stampede_guard._drivers import run_async, run_sync
from stampede_guard._entry import Entry
from stampede_guard._errors import BackendError
from stampede_guard._freshness import RefreshDue
from stampede_guard._plan import backend_failed, plan
from stampede_guard._tags import BatchTags
from stampede_guard.metrics import (
    BackendFailed,
    BackendSkipped,
    Computed,
    ComputeError,
    Hit,
    LockAcquired,
    LockWait,
    Miss,
)

__all__ = ["AsyncBatchCached", "BatchCached"]

K = TypeVar("K")
V = TypeVar("V")

logger = logging.getLogger("stampede_guard")

Forms = dict[str, list[Any]]  # key -> its stored form ([value], or [] for no value)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class GetMany:
    """Read *keys*: their entries, or None."""

    keys: list[str]


@dataclass(frozen=True, slots=True)
class LockMany:
    """Look up and lock *keys* with *token* (`whatever_stored`: lock, whatever is there)."""

    keys: list[str]
    token: str
    ttl: float
    whatever_stored: bool = False


@dataclass(frozen=True, slots=True)
class ComputeMany:
    """Call the function with *ids*: what it returns."""

    ids: list[Any]


@dataclass(frozen=True, slots=True)
class StoreMany:
    """Store and release (key, entry, ttl, ticket) *items*: the entries as read."""

    items: list[tuple[str, Entry, float, int | None]]
    token: str


@dataclass(frozen=True, slots=True)
class ReleaseMany:
    """Release *token*'s locks on *keys*; *quietly*: log a failure, never raise it."""

    keys: list[str]
    token: str
    quietly: bool = False


@dataclass(frozen=True, slots=True)
class ServeOne:
    """Serve one key by the single decorator's plan; with *due*, refresh it."""

    key: str
    id_: Any
    due: RefreshDue | None = None


@dataclass(frozen=True, slots=True)
class AwaitFlight:
    """Wait up to *seconds* for a joined flight: its `Outcome`, or None."""

    slot: Any
    seconds: float


BatchOp = (
    GetMany | LockMany | ComputeMany | StoreMany | ReleaseMany | ServeOne | AwaitFlight
)
Flow = Generator[BatchOp, Any, T]


class _Base(Generic[K, V]):
    """What both shells keep: the function, keys, backend, context and flights."""

    def __init__(
        self,
        fn: Callable[..., Any],
        keys: BatchKeys,
        backend: Any,
        context: Context,
        flights: BatchFlights | AsyncBatchFlights,
        *,
        tags: BatchTags | None = None,
    ) -> None:
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]
        self._fn = fn
        self._tags = tags
        self._keys = keys
        self._backend = backend
        self._context = context
        self._name = getattr(fn, "__qualname__", repr(fn))
        self._refreshing = Refreshing()
        self._quick: Callable[[str], Entry | None] | None = getattr(
            backend, "local_read", None
        )
        self._flights = flights
        watch = getattr(backend, "near_watch", None)
        if watch is not None:  # a change heard from elsewhere forgets its flights
            watch(flights)

    # The call, once for both shells: a flow that yields the I/O it needs done
    # (`BatchOp`) and is sent the results; the sync and asyncio shells carry them out.

    def _call(self, ids: Iterable[K]) -> Flow[dict[K, V]]:
        wanted, id_of = self._plan_keys(ids)
        forms, due, left = self._look_here(id_of)
        for key, entry in due.items():
            forms[key] = yield ServeOne(key, id_of[key], entry)
        if left:
            forms.update((yield from self._coalesced(left, id_of)))
        return self._answer(wanted, id_of, forms)

    def _coalesced(self, keys: list[str], id_of: Mapping[str, K]) -> Flow[Forms]:
        """Look up the keys no other call of this process is looking up; join the rest."""
        mine, joined = self._flights.claim(keys)
        forms: Forms = {}
        try:
            forms = (yield from self._remote(mine, id_of)) if mine else {}
        except BaseException as exc:
            for key in mine:
                self._flights.settle(key, Outcome(error=exc))
            raise
        for key in mine:  # settled before any joined one is awaited: no cycles
            self._flights.settle(key, Outcome(form=forms.get(key)))
        for key, slot in joined.items():
            started = self._context.clock()
            outcome = yield AwaitFlight(slot, self._context.policy.wait_timeout)
            form = self._joined(key, outcome, self._context.clock() - started)
            forms[key] = (yield ServeOne(key, id_of[key])) if form is None else form
        return forms

    def _remote(self, keys: list[str], id_of: Mapping[str, K]) -> Flow[Forms]:
        """Steps 3 to 5 of the module's docstring, for *keys*."""
        ctx = self._context
        keys, skipped = self._gate(keys)
        forms = (yield from self._without_cache(skipped, id_of)) if skipped else {}
        if not keys:
            return forms
        try:
            found = sort_found(keys, (yield GetMany(keys)), ctx)
        except BackendError as exc:
            self._failed(keys, exc)
            forms.update((yield from self._without_cache(keys, id_of)))
            return forms
        if found.served or found.due:  # a read that found nothing proves no write works
            self._answered([*found.served, *found.due], stored=False)
        self._hits(found.served, found.due)
        forms.update(found.served)
        for key, entry in found.due.items():
            forms[key] = yield ServeOne(key, id_of[key], entry)
        if not found.missing:
            return forms
        token, ttl = ctx.new_token(), ctx.policy.lock_timeout
        try:
            claims = yield LockMany(found.missing, token, ttl)
        except BackendError as exc:
            self._failed(found.missing, exc)
            forms.update((yield from self._without_cache(found.missing, id_of)))
            return forms
        locked = sort_claims(found.missing, claims, token)
        if locked.foreign:  # lock them whatever is stored: the computation replaces it
            foreign, locked.foreign = locked.foreign, []
            taken = yield LockMany(foreign, token, ttl, whatever_stored=True)
            locked.add(sort_claims(foreign, taken, token))
        self._hits(locked.served)
        self._misses(locked.mine)  # the single plan tells of the others itself
        forms.update(locked.served)
        if locked.mine:
            forms.update((yield from self._lead(locked.mine, token, id_of)))
        # One after another: their holders compute side by side anyway, so the first
        # wait is the long one. Waited for all at once (asyncio), each wait took a
        # connection of its own, hundreds under a stampede, until connecting timed
        # out and the ids were computed again (found by benchmarks/batch.py).
        for key in locked.elsewhere:
            forms[key] = yield ServeOne(key, id_of[key])
        return forms

    def _lead(
        self, mine: dict[str, int | None], token: str, id_of: Mapping[str, K]
    ) -> Flow[Forms]:
        """Compute the ids whose locks this call took, in one call; store; release."""
        ctx = self._context
        if ctx.observed:
            for key in mine:
                ctx.emit(LockAcquired(key))
        ids = [id_of[key] for key in mine]
        started = ctx.clock()
        try:
            result = check_result((yield ComputeMany(ids)), ids, self._name)
        except BaseException as exc:
            self._compute_errors(mine, ctx.clock() - started, exc)
            yield ReleaseMany(list(mine), token, quietly=True)
            raise
        seconds = ctx.clock() - started
        try:
            forms, stores, release = self._entries(mine, id_of, result, seconds)
        except Exception:
            # A ttl function raised or answered no seconds: nothing is stored, and the
            # locks go at once, as after a computation that raised.
            yield ReleaseMany(list(mine), token, quietly=True)
            raise
        try:
            stored = (yield StoreMany(stores, token)) if stores else []
            if release:
                yield ReleaseMany(release, token)
        except BackendError as exc:
            self._failed(list(mine), exc)  # the leases end the locks
            return forms
        self._answered(mine, stored=True)
        _as_read(forms, stores, stored)
        return forms

    def _without_cache(self, keys: list[str], id_of: Mapping[str, K]) -> Flow[Forms]:
        ids = [id_of[key] for key in keys]
        result = check_result((yield ComputeMany(ids)), ids, self._name)
        return {key: stored_form(result, id_of[key]) for key in keys}

    def _invalidated(self, ids: Iterable[K]) -> list[str]:
        return [self._keys(id_) for id_ in unique(ids, self._name)]

    def cache_key(self, id_: K) -> str:
        """Return the cache key of *id_*."""
        return self._keys(id_)

    def _plan_keys(self, ids: Iterable[K]) -> tuple[list[K], dict[str, K]]:
        """Return the ids (no repeats) and the id of each key."""
        wanted = unique(ids, self._name)
        return wanted, keys_of(wanted, self._keys, self._name)

    def _look_here(
        self, keys: Iterable[str]
    ) -> tuple[Forms, dict[str, RefreshDue], list[str]]:
        """Step 1: what reads that cost no I/O found, what is due, what is left."""
        quick, ctx = self._quick, self._context
        if quick is None:
            return {}, {}, list(keys)
        keys = list(keys)
        found = sort_found(keys, [quick(k) for k in keys], ctx)
        self._hits(found.served, found.due, near=self._near())
        return found.served, found.due, found.missing

    def _near(self) -> bool:
        return getattr(self._backend, "near_cache", None) is not None

    def _hits(self, *found: Mapping[str, object], near: bool = False) -> None:
        ctx = self._context
        if ctx.observed:
            for keys in found:
                for key in keys:
                    ctx.emit(Hit(key, near))

    def _misses(self, keys: Iterable[str]) -> None:
        ctx = self._context
        if ctx.observed:
            for key in keys:
                ctx.emit(Miss(key))

    def _answer(
        self, wanted: Sequence[K], id_of: Mapping[str, K], forms: Forms
    ) -> dict[K, V]:
        """The mapping a call returns: every asked id that has a value, in order."""
        by_id = {id_of[key]: form for key, form in forms.items()}
        return {i: by_id[i][0] for i in wanted if by_id.get(i)}

    def _entries(
        self,
        mine: Mapping[str, int | None],
        id_of: Mapping[str, K],
        result: Mapping[Any, Any],
        seconds: float,
    ) -> tuple[Forms, list[tuple[str, Entry, float, int | None]], list[str]]:
        """After a computation: each key's form, the stores to make, the locks to let go."""
        ctx = self._context
        now = ctx.wall_clock()
        forms: Forms = {}
        stores: list[tuple[str, Entry, float, int | None]] = []
        release: list[str] = []
        for key, ticket in mine.items():
            form = stored_form(result, id_of[key])
            forms[key] = form
            if ctx.observed:
                ctx.emit(Computed(key, seconds))
            tags = () if self._tags is None else self._tags.of(id_of[key], form)
            entry = Entry(form, now, seconds, tags)
            ttl = ctx.policy.store_ttl_for(key, entry)  # the batch policy: see _batch
            if ttl is None:
                release.append(key)
            else:
                stores.append((key, entry, ttl, ticket))
        return forms, stores, release

    def _gate(self, keys: list[str]) -> tuple[list[str], list[str]]:
        """Split *keys* into those to look up and those whose circuit is open.

        The breakers are the backend's (one per server): a key of a server that kept
        failing is computed without the cache, as the single decorator's are.
        """
        ctx = self._context
        allowed: list[str] = []
        skipped: list[str] = []
        for key in keys:
            (allowed if ctx.breaker_for(key).allow() else skipped).append(key)
        if ctx.observed:
            for key in skipped:
                ctx.emit(BackendSkipped(key))
        return allowed, skipped

    def _failed(self, keys: Sequence[str], error: BackendError) -> None:
        """The backend failed for *keys* in one call: raise, or report and go on.

        The breaker hears of it once (it was one failure), every key's hook too.
        """
        backend_failed(keys[0], self._context, error, "computing without it")
        if self._context.observed:
            for key in keys[1:]:
                self._context.emit(BackendFailed(key, error))

    def _answered(self, keys: Iterable[str], *, stored: bool) -> None:
        """The backend answered for *keys*: their breakers close (see `CircuitBreaker`)."""
        breakers = {id(b): b for b in map(self._context.breaker_for, keys)}
        for breaker in breakers.values():
            if stored:
                breaker.stored()
            else:
                breaker.succeeded()

    def _compute_errors(
        self, keys: Iterable[str], seconds: float, error: BaseException
    ) -> None:
        ctx = self._context
        if ctx.observed:
            for key in keys:
                ctx.emit(ComputeError(key, seconds, error))

    def _joined(
        self, key: str, outcome: Outcome | None, waited: float
    ) -> list[Any] | None:
        """What a joined flight's *outcome* serves: its form, or None to serve the key alone.

        Reported as the single decorator's joiners report (a `Miss`, then how the
        wait ended). The function's error is shared with the joiners, as there
        (else every joiner would call it again); a flight that timed out or was
        cancelled leaves the key to this call, through the lock (whose plan reports).
        """
        if outcome is None or (outcome.form is None and outcome.error is None):
            return None
        if outcome.error is not None and not isinstance(outcome.error, Exception):
            return None  # cancelled, interrupted: not the function's failure
        ctx = self._context
        if ctx.observed:
            ctx.emit(Miss(key))
            ctx.emit(
                LockWait(key, waited, "value" if outcome.error is None else "error")
            )
        if outcome.error is not None:
            raise outcome.error
        return outcome.form

    def __repr__(self) -> str:
        return f"<stampede-safe batch {self._fn!r} on {self._backend!r}>"


class BatchCached(_Base[K, V]):
    """The object put in place of a sync batch function."""

    def __init__(
        self,
        fn: Callable[..., Any],
        keys: BatchKeys,
        backend: Any,
        context: Context,
        tags: BatchTags | None = None,
    ) -> None:
        super().__init__(fn, keys, backend, context, BatchFlights(), tags=tags)

    def __call__(self, ids: Iterable[K]) -> dict[K, V]:
        flow = self._call(ids)
        result: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = flow.send(result) if error is None else flow.throw(error)
            except StopIteration as stop:
                done: dict[K, V] = stop.value
                return done
            result = error = None
            try:
                result = self._perform(op)
            except BaseException as exc:  # noqa: BLE001 - the flow decides what to do
                error = exc

    def _perform(self, op: BatchOp) -> Any:
        backend = self._backend
        match op:
            case GetMany(keys):
                return get_many(backend, keys)
            case LockMany(keys, token, ttl, whatever_stored):
                if whatever_stored:
                    return [backend.lock(k, token, ttl) for k in keys]
                return get_or_lock_many(backend, keys, token, ttl)
            case ComputeMany(ids):
                return self._fn(ids)
            case StoreMany(items, token):
                return set_and_unlock_many(backend, items, token)
            case ReleaseMany(keys, token, quiet):
                if quiet:
                    return quietly(unlock_many, backend, keys, token)
                return unlock_many(backend, keys, token)
            case ServeOne(key, id_, due):
                return self._one(key, id_, due)
            case AwaitFlight(slot, seconds):
                return BatchFlights.wait(slot, seconds)
            case _:
                assert_never(op)

    def invalidate(self, ids: Iterable[K]) -> None:
        """Delete the cached values of *ids* (final, as the single decorator's)."""
        for key in self._invalidated(ids):
            self._backend.delete(key)
            self._flights.forget(key)

    def _one(self, key: str, id_: K, due: RefreshDue | None) -> list[Any]:
        """Serve one key by the single decorator's plan: wait, take over, or refresh."""
        compute = self._compute_one(id_)
        if due is None:
            value, _ = run_sync(
                plan(key, self._context), self._backend, compute, ctx=self._context
            )
        else:
            steps = serve_due(key, due, self._context, self._refreshing)
            value = run_sync(steps, self._backend, compute, ctx=self._context)
        form = value_of(value)
        return (compute() if due is None else []) if form is None else form

    def _compute_one(self, id_: K) -> Callable[[], list[Any]]:
        def compute() -> list[Any]:
            return stored_form(check_result(self._fn([id_]), [id_], self._name), id_)

        return compute


class AsyncBatchCached(_Base[K, V]):
    """The object put in place of an ``async def`` batch function."""

    def __init__(
        self,
        fn: Callable[..., Any],
        keys: BatchKeys,
        backend: Any,
        context: Context,
        tags: BatchTags | None = None,
    ) -> None:
        super().__init__(fn, keys, backend, context, AsyncBatchFlights(), tags=tags)
        self._background: set[Any] = set()

    async def __call__(self, ids: Iterable[K]) -> dict[K, V]:
        flow = self._call(ids)
        result: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = flow.send(result) if error is None else flow.throw(error)
            except StopIteration as stop:
                done: dict[K, V] = stop.value
                return done
            result = error = None
            try:
                result = await self._perform(op)
            except BaseException as exc:  # noqa: BLE001 - the flow decides what to do
                error = exc

    async def _perform(self, op: BatchOp) -> Any:
        backend = self._backend
        match op:
            case GetMany(keys):
                return await aget_many(backend, keys)
            case LockMany(keys, token, ttl, whatever_stored):
                if whatever_stored:
                    return [await backend.alock(k, token, ttl) for k in keys]
                return await aget_or_lock_many(backend, keys, token, ttl)
            case ComputeMany(ids):
                return await self._fn(ids)
            case StoreMany(items, token):
                return await aset_and_unlock_many(backend, items, token)
            case ReleaseMany(keys, token, quiet):
                if not quiet:
                    return await aunlock_many(backend, keys, token)
                # Even when cancelled: the release must not be cancelled with the caller.
                release = asyncio.ensure_future(
                    aquietly(aunlock_many, backend, keys, token)
                )
                self._background.add(release)
                release.add_done_callback(self._background.discard)
                with contextlib.suppress(BaseException):
                    await asyncio.shield(release)
                return None
            case ServeOne(key, id_, due):
                return await self._one(key, id_, due)
            case AwaitFlight(slot, seconds):
                return await AsyncBatchFlights.wait(slot, seconds)
            case _:
                assert_never(op)

    async def invalidate(self, ids: Iterable[K]) -> None:
        """See `BatchCached.invalidate`."""
        for key in self._invalidated(ids):
            await self._backend.adelete(key)
            self._flights.forget(key)

    async def _one(self, key: str, id_: K, due: RefreshDue | None) -> list[Any]:
        """See `BatchCached._one`."""
        compute = self._compute_one(id_)
        ctx, background = self._context, self._background
        if due is None:
            value, _ = await run_async(
                plan(key, ctx), self._backend, compute, background, ctx=ctx
            )
        else:
            steps = serve_due(key, due, ctx, self._refreshing)
            value = await run_async(steps, self._backend, compute, background, ctx=ctx)
        form = value_of(value)
        return ((await compute()) if due is None else []) if form is None else form

    def _compute_one(self, id_: K) -> Callable[[], Awaitable[list[Any]]]:
        async def compute() -> list[Any]:
            return stored_form(
                check_result(await self._fn([id_]), [id_], self._name), id_
            )

        return compute


def _as_read(
    forms: Forms,
    stores: Sequence[tuple[str, Entry, float, int | None]],
    stored: Sequence[Entry | None],
) -> None:
    """Serve each stored id as every reader decodes it (JSON makes tuples lists)."""
    for (key, _, _, _), entry in zip(stores, stored, strict=True):
        form = None if entry is None else value_of(entry.value)
        if form is not None:
            forms[key] = form
