"""Near cache coherence across processes: how fast a change reaches them, and staleness.

Run from the repository root::

    uv run --group bench benchmarks/near_coherence.py            # full run, ~2 minutes
    uv run --group bench benchmarks/near_coherence.py --quick    # smoke run, ~45 s
    uv run --group bench benchmarks/near_coherence.py --duration 20 --json /tmp/nc.json
    uv run --group bench benchmarks/near_coherence.py --raw-witness --dump /tmp/nc.pkl

Every process is spawned (multiprocessing ``spawn``) and builds its own
``RedisBackend.from_url(url, prefix=..., near_cache=NearCache(maxsize=10_000, ttl=30,
metrics=hook))``, all on one private redis-server (see redis_server.py), and the one
cached function ``@cached_stampede_safe(key="k:{x}", ttl=900, backend=backend)``. The
function plays a database read: it reads ``db:<x>`` (a plain Redis counter, bumped by
every write below), then sleeps ``--compute-ms`` (1 ms) and returns
``{"key": x, "dbver": <db:x as read>, "by": <pid>, "n": <computation number>, ...}``.

**1. Coherence latency.** One writer and three readers. Per batch of fresh keys the
writer stores every key, the readers read them until their near caches hold them all
(checked with ``backend._near.lookup``) and capture those entries, then the writer
changes each key once (``refresh()`` and ``invalidate()`` alternately, each after an
``INCR db:<x>``, 2 to 8 ms apart) and notes ``time.time()`` the moment the call
returns. Lag = the reader's drop time - the writer's return time, over every reader
and write (negative when the message overtook the writer's own reply).

The reader's drop time is taken in the ``NearCache(metrics=hook)`` hook, on the
`NearInvalidation` of the key: the hook runs in the listener thread right after the
entry was popped from the store, under the near cache's mutex, so from that instant
every lookup in the process misses (reads go to Redis, which holds the change). It is
the moment the process stopped being able to serve the old value, with no sampling
error. A polling thread (every 0.5 ms, ``lookup(key) is not <captured entry>``) is
kept as a cross-check: its time is what another thread of the process saw, later than
the drop by its period plus its own wait for the GIL, an artefact a caller that holds
the GIL would not suffer; the poll also proves the captured entry really went (the
hook alone fires for every message, held key or not). Entries are captured after the
fill, and a drop time earlier than the write's start is counted apart (a leftover
message of the fill), never as a lag. The target, p99 <= 5 ms, is judged on the hook.

Three loads on the readers: none; ``io`` (two threads per reader: ten near hits on
their own keys, one Redis round trip, sleep 1 ms); ``busy`` (two threads per reader
calling the cached function on their own near-cached keys in a tight loop: pure
CPU, the worst case for the GIL, whose switch interval is 5 ms). The writer is left
unloaded, so its return times are not late.

**2. Mixed workload with a staleness checker.** Four processes x ``--threads`` (3)
threads, 1,000 keys drawn Zipf(1.0) (key 0 the hottest), for ``--duration`` seconds
(15; 4 with ``--quick``), every key stored and read once by every process first. Each
operation: 90 % reads (``f(x)``), 5 % ``refresh(x)``, 5 % ``invalidate(x)``; a write
first does ``INCR db:<x>`` (its new number ``n``) and then the cache call, like an
application that changes its database and then its cache. Every read is logged
(wall time it began ``b``, returned ``e``, the value's ``dbver``, which process and
computation made the value, how it was served: near hit, Redis hit, computed in this
call, waited for another process, or joined a computation of its own process); every
write too (start, return ``r``, ``n``, process); and, for both, every script the call
sent (the backend's ``_send`` is wrapped on the instance: operation, times, result,
e.g. "took, ticket ...", "read dbver 145", "None (refused / nothing)"). A `Hit` with
``near=False`` whose read sent no script was served by the near cache too (see
`_classify`). Every computation is logged with its thread and the call it ran in.

The checker's rule. The value's version is the database version it was computed
from, not a counter per computation: two computations that read the same database
state are equally fresh, whichever the library kept (it orders stores by a ticket
taken before each computation; a global counter bumped inside each computation would
call a perfectly valid result older and cry wolf). A write ``(n, r)`` makes every
value with ``dbver < n`` outdated from ``r`` on. A read of ``x`` that began at ``b``
and returned ``dbver = d`` is **stale** if some write of ``x`` with ``n > d`` had
returned before ``b``; its *age* is ``b`` minus the earliest such return. A read that
began before the write returned may return either value (it overlaps the write), so
it is never stale; concurrent writers need no special case (each write's own ``n``
counts from its own return); an invalidation followed by a recomputation is fine,
since that computation read the bumped counter; a value computed during the read
itself read the database after ``b`` and cannot be stale. Counted:

- stale reads beyond the coherence window ``W = 5 ms`` (fixed, the latency target):
  age >= 5 ms. Target 0. The counts for ``W = `` the p99 drop lag measured under the
  ``busy`` load in part 1, and for ``W = `` the p99 of the drop lag inside this
  workload, are shown too, and the ages of all stale reads;
- stale reads within the window (excused: the message may still be in flight);
- own-process stale reads: the outdating write was made by the reading process and
  had returned before the read began, no window (read your writes). Target 0.

Also reported: the drop lag inside this workload, a lower bound per write and other
process (see `_workload_drop_lags`), and the wake-up probe below, summed up.

Every timing error of the logs makes the checker more lenient, never stricter: ``b`` is
stamped before the call and ``r`` after the write's call returned, so a thread
descheduled around its stamps only widens the overlap; a write whose call raised is
not logged and constrains nothing. A stale read therefore really returned a value
computed from the database before a change whose cache call had completed before the
read began.

Every stale read beyond the window and every own-process one is listed with the
evidence: key, process and thread, times, the version returned and the computation
that made it, how it was served, the write that outdated it, the reading process's
`NearInvalidation` times for the key around it, its listener's last message before
and first after the write returned, and two witnesses of that process's scheduling
that do not involve the library: the longest oversleep of a probe thread that sleeps
2 ms in a loop (run in every worker of both parts), and the GC pauses (over 1 ms)
overlapping the interval; in the JSON also the scripts of the read and of the write,
and the key's timeline (every write, computation and script-sending read of the key,
in every process, from 30 ms before the write to 5 ms after the read). Each is given
a cause (see `_cause`): a near hit while the reader had heard no invalidation of the
key since the write began is delivery lag (the listener had not run yet); anything
else is marked "look closer"; so is a caller that joined a flight (a read, wait or
computation) begun by another thread of its process before the write, if the process
had already heard of the key since the write began. ``--dump PATH`` keeps part 2's
raw logs (pickle). ``--raw-witness`` adds, in every part-2 process, a plain redis-py
subscriber to the near cache's channel in a thread of its own (one more thread for
the GIL): it tells when a message reached the process, apart from when the library's
listener handled it (see `_witness_lags`, and the evidence's receipt times).

Markdown goes to stdout, progress to stderr, JSON (every part-1 lag, part-2 counts
and the stale reads) to ``benchmarks/results/near-coherence-<stamp>.json`` and
``--json PATH``. Each worker command is bounded (60 s; part 2: duration + 60 s); a
worker that does not answer in time fails the measurement and is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import multiprocessing as mp
import os
import pickle
import random
import sys
import threading
import time
import traceback
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import accumulate
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis

from common import Pct, pct, report_header, source_summary
from redis_server import RedisServer
from run import RESULTS, progress, source_state

LIVE_WAIT_S = 5.0  # longest wait for a near cache's listener to subscribe
COMMAND_TIMEOUT_S = 60.0  # a worker that does not answer a command in time is killed
POLL_S = 0.0005  # the part-1 polling thread's period
COLLECT_WAIT_S = 1.0  # after a batch, how long readers wait for missing drops
FILL_WAIT_S = 10.0
TARGET_P99_MS = 5.0
WINDOW_S = 0.005  # part 2's coherence window (the latency target)
PROBE_S = 0.002  # the wake-up probe's sleep
PROBE_LOGGED_S = 0.001  # oversleeps and GC pauses longer than this are logged
LOAD_KEYS = 100  # part 1: keys each load thread of a reader reads
LOAD_THREADS = 2
N_KEYS = 1000  # part 2
ZIPF_S = 1.0
P_READ = 0.90
P_REFRESH = 0.05  # the rest (5 %) invalidates
SEED = 20261207
EVIDENCE_SHOWN = 20  # stale reads listed in the Markdown (all of them in the JSON)


@dataclass(frozen=True, slots=True)
class Plan:
    """Sizes and durations of one run."""

    loads: tuple[str, ...]
    batches: int
    batch_keys: int
    pace_s: float  # mean pause between two writes of part 1
    duration_s: float
    threads: int
    compute_s: float


# ---------------------------------------------------------------- worker process


NEAR_SECOND_LOOK = "near hit (backend.get's own lookup)"
NEAR_GET = "get (near cache)"  # a traced backend.get that sent no script
JOINED = "joined a flight of its own process"


def _classify(events: list[Any], ops: list[tuple[Any, ...]]) -> str:
    """How a read was served, from what its thread saw and sent during the call.

    ``RedisBackend.get`` looks in the near cache again before reading Redis (another
    thread may have filled it since the wrapper's own look): its `Hit` says
    ``near=False``, and the traced ``get`` sent no script. A caller that joined a
    flight of its own process (a read, a wait or a computation begun by another
    thread) sends nothing either; it reports the flight's outcome as its own (`Hit`,
    or `Miss` and `LockWait`).
    """
    from stampede_guard.metrics import Hit, LockWait  # noqa: PLC0415

    names = {op[0] for op in ops}
    scripts = bool(names - {NEAR_GET})
    if "computed" in events:
        return "computed"
    for ev in events:
        if type(ev) is Hit:
            if ev.near:
                return "near hit"
            if scripts:
                return "redis hit"
            return NEAR_SECOND_LOOK if NEAR_GET in names else f"{JOINED} (its read hit)"
    if any(type(ev) is LockWait for ev in events):
        if scripts:
            return "waited (other process)"
        return f"{JOINED} (it waited or computed)"
    if events:
        return "miss, other: " + ",".join(sorted({type(e).__name__ for e in events}))
    return JOINED


def _dbver(entry: Any) -> object:
    value = getattr(entry, "value", None)
    return value.get("dbver") if isinstance(value, dict) else value


def _summary(call: Any, got: Any) -> str:
    """A script's result, in a few words (see `Worker._trace_scripts`)."""
    if got is None:
        return "None (refused / nothing)"
    if isinstance(got, tuple):  # a near cache's read: (entry, remaining s, size)
        return f"read dbver {_dbver(got[0])}" if got[0] is not None else "read nothing"
    ticket = getattr(got, "ticket", None)
    if ticket is not None:  # a Claim: the lock's holder
        mine = call.args and str(got) == call.args[0]
        return f"{'took' if mine else 'held by another'}, ticket {ticket}"
    if hasattr(got, "value"):
        return f"entry dbver {_dbver(got)}"
    return repr(got)[:40]


class Worker:
    """One process: a near-cached backend, the cached function, and the commands."""

    def __init__(self, url: str, prefix: str, index: int, compute_s: float) -> None:
        from stampede_guard import (  # noqa: PLC0415
            NearCache,
            RedisBackend,
            cached_stampede_safe,
        )

        self.pid = os.getpid()
        self.index = index
        self.url = url
        self.raw: list[tuple[str, float]] = []  # the raw witness's messages (key, wall)
        self.db = redis.Redis.from_url(url)  # the "database"
        self.invalidations: list[tuple[str, float]] = []  # NearInvalidation (key, wall)
        self.flushes: list[tuple[str, int, float]] = []  # NearFlush (reason, n, wall)
        # x, dbver, wall, n, thread, in which call
        self.computations: list[tuple[int, int, float, int, Any, Any]] = []
        self.tls = threading.local()
        counter = itertools.count(1)
        self.backend = RedisBackend.from_url(
            url,
            prefix=prefix,
            near_cache=NearCache(maxsize=10_000, ttl=30, metrics=self._near_event),
        )
        near = self.backend._near  # noqa: SLF001 - the benchmark inspects it
        if near is None:
            msg = "the backend has no near cache"
            raise RuntimeError(msg)
        self.near = near
        tls, db, pid, computations = self.tls, self.db, self.pid, self.computations
        self._trace_scripts(tls)

        @cached_stampede_safe(
            key="k:{x}", ttl=900, backend=self.backend, metrics=self._call_event
        )
        def value(x: int) -> dict[str, Any]:
            raw = db.get(f"db:{x}")
            dbver = int(raw) if raw is not None else 0
            at = time.time()
            n = next(counter)
            # (x, dbver, db read at, n, thread, in which call)
            computations.append(
                (x, dbver, at, n, getattr(tls, "tid", -1), getattr(tls, "op", "?"))
            )
            seen = getattr(tls, "events", None)
            if seen is not None:
                seen.append("computed")
            if compute_s:
                time.sleep(compute_s)
            return {"key": x, "dbver": dbver, "by": pid, "n": n, "at": at}

        self.value = value
        self._loads: list[threading.Thread] = []
        self._load_calls = [0] * LOAD_THREADS
        self._stop_load = threading.Event()
        self._armed: dict[str, Any] = {}
        self._arm_mark = 0
        self._seen: dict[str, float] = {}
        self._poller: threading.Thread | None = None
        self._stop_poll = threading.Event()
        # Independent witnesses of this process's scheduling: how late a thread that
        # sleeps PROBE_S wakes (oversleeps above PROBE_LOGGED_S), and GC pauses.
        self.oversleeps: list[tuple[float, float]] = []  # (wall at wake-up, excess s)
        self.gc_pauses: list[tuple[float, float]] = []  # (wall at start, seconds)
        self._probe_marks = (0, 0, 0)
        self.probe_wakes = 0
        self._gc_started = 0.0

    def _trace_scripts(self, tls: threading.local) -> None:
        """Note every script a traced call sends: (operation, sent, returned, result).

        Shadows the backend's ``_send`` on this instance (every script goes through
        it); a thread traces only while ``tls.ops`` is a list (part 2's calls).
        """
        send = self.backend._send  # noqa: SLF001 - traced, not changed

        def traced(call: Any) -> Any:
            ops = getattr(tls, "ops", None)
            if ops is None:
                return send(call)
            t0 = time.time()
            try:
                got = send(call)
            except Exception as exc:
                ops.append((call.operation, t0, time.time(), type(exc).__name__))
                raise
            ops.append((call.operation, t0, time.time(), _summary(call, got)))
            return got

        self.backend._send = traced  # type: ignore[method-assign]  # noqa: SLF001
        get = self.backend.get

        def traced_get(key: str) -> Any:
            ops = getattr(tls, "ops", None)
            if ops is None:
                return get(key)
            before, t0 = len(ops), time.time()
            got = get(key)
            if len(ops) == before:  # no script sent: the near cache answered
                ops.append((NEAR_GET, t0, time.time(), f"entry dbver {_dbver(got)}"))
            return got

        self.backend.get = traced_get  # type: ignore[method-assign]

    # -- hooks

    def _near_event(self, event: object) -> None:
        from stampede_guard.metrics import NearFlush, NearInvalidation  # noqa: PLC0415

        if type(event) is NearInvalidation:
            self.invalidations.append((event.key, time.time()))
        elif type(event) is NearFlush:
            self.flushes.append((event.reason, event.entries, time.time()))

    def _call_event(self, event: object) -> None:
        seen = getattr(self.tls, "events", None)
        if seen is not None:
            seen.append(event)

    # -- common

    def ready(self) -> dict[str, Any]:
        """Warm up until the near cache is live; collect and freeze start-up garbage."""
        deadline = time.monotonic() + LIVE_WAIT_S
        self.value(-1 - self.index)
        while not self.near.live and time.monotonic() < deadline:
            time.sleep(0.01)
            self.value(-1 - self.index)
        gc.collect()
        gc.freeze()
        threading.Thread(target=self._probe, daemon=True).start()
        gc.callbacks.append(self._gc_timed)
        return {"pid": self.pid, "live": self.near.live}

    def _probe(self) -> None:
        log, sleep, clock = self.oversleeps, time.sleep, time.perf_counter
        while True:
            t = clock()
            sleep(PROBE_S)
            excess = clock() - t - PROBE_S
            self.probe_wakes += 1
            if excess > PROBE_LOGGED_S:
                log.append((time.time(), excess))

    def _gc_timed(self, phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            took = time.perf_counter() - self._gc_started
            if took > PROBE_LOGGED_S:
                self.gc_pauses.append((time.time() - took, took))

    def mark_probe(self) -> None:
        """Start a window of the scheduling witnesses (see `probe_since_mark`)."""
        self._probe_marks = (
            len(self.oversleeps),
            self.probe_wakes,
            len(self.gc_pauses),
        )

    def probe_since_mark(self) -> dict[str, Any]:
        """Oversleeps and GC pauses since `mark_probe`: the wake-ups, and the late ones."""
        logged, wakes, paused = self._probe_marks
        return {
            "wakes": self.probe_wakes - wakes,
            "late": [e for _, e in self.oversleeps[logged:]],
            "gc max": max((d for _, d in self.gc_pauses[paused:]), default=0.0),
        }

    def close(self) -> None:
        """Stop the load threads and close the clients."""
        self.stop_load()
        self.backend.close()
        self.db.close()

    # -- part 1

    def start_load(self, mode: str) -> int:
        """Start the load threads (*mode*: none, io, busy) on keys of this reader."""
        if mode == "none":
            return 0
        for t in range(LOAD_THREADS):
            keys = [
                1_000_000 + self.index * 10_000 + t * 1000 + j for j in range(LOAD_KEYS)
            ]
            for x in keys:
                self.value(x)
            thread = threading.Thread(
                target=self._load, args=(mode, t, keys), daemon=True
            )
            thread.start()
            self._loads.append(thread)
        return len(self._loads)

    def _load(self, mode: str, slot: int, keys: list[int]) -> None:
        value, stop, calls = self.value, self._stop_load, self._load_calls
        while not stop.is_set():
            if mode == "busy":
                for x in keys:
                    value(x)
                calls[slot] += len(keys)
            else:  # io: a request that reads the cache, then waits on I/O
                for x in keys[:10]:
                    value(x)
                self.db.get("io")
                calls[slot] += 10
                time.sleep(0.001)

    def load_calls(self) -> int:
        """Calls made by the load threads so far."""
        return sum(self._load_calls)

    def stop_load(self) -> None:
        """Stop the load threads (bounded)."""
        self._stop_load.set()
        for thread in self._loads:
            thread.join(5)
        self._loads = []
        self._stop_load = threading.Event()

    def populate(self, keys: list[int]) -> int:
        """Store every key (each is new: the call computes and stores it)."""
        for x in keys:
            self.value(x)
        return len(keys)

    def fill(self, keys: list[int]) -> int:
        """Read *keys* until the near cache holds them all; return how many it lacks."""
        deadline = time.monotonic() + FILL_WAIT_S
        missing = list(keys)
        while missing and time.monotonic() < deadline:
            for x in missing:
                self.value(x)
            missing = [x for x in missing if self.near.lookup(f"k:{x}") is None]
            if missing:
                time.sleep(0.002)
        return len(missing)

    def arm(self, keys: list[int]) -> int:
        """Capture the near entries of *keys* and start watching; return how many lack."""
        found = {f"k:{x}": self.near.lookup(f"k:{x}") for x in keys}
        self._armed = {k: e for k, e in found.items() if e is not None}
        self._arm_mark = len(self.invalidations)
        self._seen = {}
        self._stop_poll = threading.Event()
        self._poller = threading.Thread(
            target=self._poll, args=(dict(self._armed), self._stop_poll), daemon=True
        )
        self._poller.start()
        return len(found) - len(self._armed)

    def _poll(self, pending: dict[str, Any], stop: threading.Event) -> None:
        lookup, seen = self.near.lookup, self._seen
        while pending and not stop.is_set():
            for key in list(pending):
                if lookup(key) is not pending[key]:
                    seen[key] = time.time()
                    del pending[key]
            time.sleep(POLL_S)

    def collect(self) -> dict[str, Any]:
        """Per armed key: the hook's drop time and the poller's; and what went wrong."""
        deadline = time.monotonic() + COLLECT_WAIT_S
        poller = self._poller
        if poller is not None:
            poller.join(max(0.0, deadline - time.monotonic()))
        self._stop_poll.set()
        if poller is not None:
            poller.join(1)
        hooked: dict[str, float] = {}
        for key, at in self.invalidations[self._arm_mark :]:
            if key in self._armed and key not in hooked:
                hooked[key] = at
        back = sum(
            1 for key, entry in self._armed.items() if self.near.lookup(key) is entry
        )
        return {
            "drops": {k: (hooked.get(k), self._seen.get(k)) for k in self._armed},
            "old entry still served": back,
            "flushes": list(self.flushes),
            "live": self.near.live,
        }

    def write(self, keys: list[int], first: int, pace_s: float, seed: int) -> list[Any]:
        """Change every key once, refresh and invalidate alternately; their times."""
        rng = random.Random(seed)  # noqa: S311 - pacing, not secrets
        done = []
        for i, x in enumerate(keys):
            op = "refresh" if (first + i) % 2 == 0 else "invalidate"
            n = self.db.incr(f"db:{x}")
            start = time.time()
            if op == "refresh":
                self.value.refresh(x)
            else:
                self.value.invalidate(x)
            done.append((f"k:{x}", op, n, start, time.time()))
            time.sleep(pace_s * (0.4 + 1.2 * rng.random()))
        return done

    # -- part 2

    def start_witness(self) -> bool:
        """Subscribe a plain redis-py pub/sub, in a thread of its own, to the channel.

        It reads the near cache's channel as the library's listener does
        (``get_message(timeout=0.05)`` in a loop) but does nothing else, so its
        receipt times tell delivery to this process apart from the listener's own
        delays. Returns once it is subscribed.
        """
        channel = self.near.channel
        client = redis.Redis.from_url(self.url)
        pubsub = client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
        pubsub.subscribe(channel)
        subscribed = threading.Event()
        log = self.raw

        def listen() -> None:
            while True:
                message = pubsub.get_message(timeout=0.05)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    subscribed.set()
                elif message["type"] == "message":
                    log.append((message["data"].decode(), time.time()))

        threading.Thread(target=listen, daemon=True).start()
        return subscribed.wait(LIVE_WAIT_S)

    def prefill(self, keys: int) -> int:
        """Read every key once (the first process to get here stores them)."""
        for x in range(keys):
            self.value(x)
        return len(self.near)

    def mixed(
        self, start_at: float, duration_s: float, threads: int, seed: int
    ) -> dict[str, Any]:
        """Run the mixed workload from *start_at* (wall) for *duration_s*; the logs."""
        cum = list(accumulate(1 / (k + 1) ** ZIPF_S for k in range(N_KEYS)))
        logs: list[dict[str, Any]] = []
        workers = []
        stop_at = start_at + duration_s
        for t in range(threads):
            log: dict[str, Any] = {"reads": [], "writes": [], "errors": []}
            logs.append(log)
            rng = random.Random(seed * 1000 + self.index * 100 + t)  # noqa: S311
            thread = threading.Thread(
                target=self._mixed,
                args=(t, rng, cum, start_at, stop_at, log),
                daemon=True,
            )
            thread.start()
            workers.append(thread)
        hung: list[str] = []
        for thread in workers:
            thread.join(max(0.0, stop_at - time.time()) + 30)
            if thread.is_alive():
                frames = sys._current_frames()  # noqa: SLF001 - where it hangs
                frame = frames.get(thread.ident or 0)
                hung.append(
                    "".join(traceback.format_stack(frame)[-6:]) if frame else "?"
                )
        reads = [r for log in logs for r in log["reads"]]
        writes = [w for log in logs for w in log["writes"]]
        errors = [e for log in logs for e in log["errors"]]
        return {
            "pid": self.pid,
            "reads": reads,
            "writes": writes,
            "errors": errors,
            "hung": hung,
            "computations": list(self.computations),
            "invalidations": list(self.invalidations),
            "flushes": list(self.flushes),
            "live": self.near.live,
            "oversleeps": [o for o in self.oversleeps if o[0] >= start_at],
            "probe": self.probe_since_mark(),
            "raw": list(self.raw),
            "gc pauses": [g for g in self.gc_pauses if g[0] >= start_at - 1],
        }

    def _mixed(  # noqa: PLR0917 - one thread's whole context
        self,
        tid: int,
        rng: random.Random,
        cum: list[float],
        start_at: float,
        stop_at: float,
        log: dict[str, Any],
    ) -> None:
        value, tls, db, pid = self.value, self.tls, self.db, self.pid
        reads, writes, errors = log["reads"], log["writes"], log["errors"]
        total = cum[-1]
        kinds: dict[str, str] = {}
        tls.tid = tid
        time.sleep(max(0.0, start_at - time.time()))
        while (now := time.time()) < stop_at:
            x = bisect_left(cum, rng.random() * total)
            u = rng.random()
            try:
                if u < P_READ:
                    tls.events, tls.ops, tls.op = [], [], "read"
                    b = time.time()
                    got = value(x)
                    e = time.time()
                    events, ops = tls.events, tls.ops
                    tls.events = tls.ops = None
                    how = _classify(events, ops)
                    how = kinds.setdefault(how, how)
                    reads.append(
                        (x, b, e, got["dbver"], got["by"], got["n"], how, tid)
                        + ((tuple(ops),) if ops else ())
                    )
                else:
                    op = "refresh" if u < P_READ + P_REFRESH else "invalidate"
                    n = db.incr(f"db:{x}")
                    tls.ops, tls.op = [], op
                    s = time.time()
                    if op == "refresh":
                        got = value.refresh(x)
                        d = got["dbver"]
                    else:
                        value.invalidate(x)
                        d = -1
                    r = time.time()
                    ops, tls.ops = tls.ops, None
                    writes.append((x, op, s, r, n, pid, tid, d, tuple(ops)))
            except Exception as exc:  # noqa: BLE001 - counted and shown
                tls.events = tls.ops = None
                errors.append((x, now, f"{type(exc).__name__}: {exc}"))


def _worker_main(
    url: str, prefix: str, index: int, compute_s: float, conn: Connection
) -> None:
    """A spawned worker: build a `Worker`, then answer commands until 'stop'."""
    try:
        worker = Worker(url, prefix, index, compute_s)
        conn.send(("ok", worker.ready()))
        while True:
            command, args = conn.recv()
            if command == "stop":
                worker.close()
                conn.send(("ok", None))
                break
            try:
                conn.send(("ok", getattr(worker, command)(*args)))
            except Exception:  # noqa: BLE001 - reported to the coordinator
                conn.send(("error", traceback.format_exc()))
    except BaseException:  # noqa: BLE001 - reported to the coordinator
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()
        os._exit(0)


class Workers:
    """Spawned worker processes, each answering commands over a pipe, within bounds."""

    def __init__(self, url: str, prefix: str, count: int, compute_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for index in range(count):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(url, prefix, index, compute_s, theirs),
                daemon=True,
            )
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)
        self.ready = [self._answer(i, COMMAND_TIMEOUT_S) for i in range(count)]
        for i, got in enumerate(self.ready):
            if not got["live"]:
                msg = f"worker {i}: the near cache's listener did not subscribe within {LIVE_WAIT_S:.0f} s"
                raise RuntimeError(msg)

    def _answer(self, i: int, timeout: float) -> Any:
        conn = self.conns[i]
        if not conn.poll(timeout):
            msg = f"worker {i} did not answer within {timeout:.0f} s"
            raise RuntimeError(msg)
        status, got = conn.recv()
        if status != "ok":
            msg = f"worker {i} failed:\n{got}"
            raise RuntimeError(msg)
        return got

    def ask(
        self,
        which: Sequence[int],
        command: str,
        args: Sequence[Any] = (),
        timeout: float = COMMAND_TIMEOUT_S,
    ) -> list[Any]:
        """Send *command* to the workers *which* at once; return their answers."""
        for i in which:
            self.conns[i].send((command, tuple(args)))
        return [self._answer(i, timeout) for i in which]

    def close(self) -> None:
        """Stop every worker; kill any that does not exit in time."""
        for i, conn in enumerate(self.conns):
            try:
                conn.send(("stop", ()))
                self._answer(i, 10)
            except (OSError, EOFError, RuntimeError):
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()


# ---------------------------------------------------------------- part 1


@dataclass(slots=True)
class Coherence:
    """Part 1 under one load: every lag, in seconds."""

    load: str
    writes: int = 0
    hook_lags: list[float] = field(default_factory=list)
    poll_lags: list[float] = field(default_factory=list)
    by_op: dict[str, list[float]] = field(default_factory=dict)
    not_filled: int = 0  # (reader, key) pairs the near cache did not hold when armed
    no_drop: int = 0  # armed pairs whose drop never came (within COLLECT_WAIT_S)
    early_drop: int = 0  # drops before the write began (a leftover message)
    old_served_after: int = 0  # captured entries served again after the drop
    flushes: int = 0
    load_calls_per_s: float = 0.0  # per reader
    wake: dict[str, Any] = field(default_factory=dict)  # readers' wake-up probe
    worst: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None


def _wake_summary(probes: list[dict[str, Any]]) -> dict[str, Any]:
    """p99 and max of the probe's oversleep over processes (only > 1 ms are logged)."""
    wakes = sum(p["wakes"] for p in probes)
    late = sorted((e for p in probes for e in p["late"]), reverse=True)
    rank = math.ceil(0.01 * wakes) - 1
    return {
        "wakes": wakes,
        "over 1 ms": len(late),
        "p99 ms": late[rank] * 1000 if 0 <= rank < len(late) else None,  # None: < 1
        "max ms": late[0] * 1000 if late else None,
        "longest GC ms": max((p["gc max"] for p in probes), default=0.0) * 1000,
    }


def _wake_cells(wake: dict[str, Any]) -> str:
    if not wake:
        return "-"
    p99 = wake["p99 ms"]
    top = wake["max ms"]
    return (
        f"{'< 1' if p99 is None else f'{p99:.1f}'} / "
        f"{'< 1' if top is None else f'{top:.1f}'}"
    )


def measure_coherence(  # noqa: PLR0915 - one linear measurement
    url: str, plan: Plan, load: str, admin: redis.Redis
) -> Coherence:
    """Part 1 under *load*: one writer (worker 0), three readers."""
    result = Coherence(load)
    admin.flushall()
    readers = [1, 2, 3]
    workers: Workers | None = None
    samples: list[tuple[float, float | None, dict[str, Any]]] = []
    try:
        workers = Workers(url, f"nc1{load}", 4, plan.compute_s)
        workers.ask(readers, "start_load", (load,))
        time.sleep(0.2)
        calls0 = sum(workers.ask(readers, "load_calls"))
        workers.ask(readers, "mark_probe")
        t0 = time.perf_counter()
        first = 0
        for batch in range(plan.batches):
            keys = [batch * plan.batch_keys + j for j in range(plan.batch_keys)]
            workers.ask([0], "populate", (keys,))
            time.sleep(0.05)  # the stores' messages reach every listener
            result.not_filled += sum(workers.ask(readers, "fill", (keys,)))
            result.not_filled += sum(workers.ask(readers, "arm", (keys,)))
            (done,) = workers.ask(
                [0], "write", (keys, first, plan.pace_s, SEED + batch)
            )
            first += len(keys)
            collected = workers.ask(readers, "collect")
            by_key = {key: (op, n, s, r) for key, op, n, s, r in done}
            result.writes += len(done)
            for reader, got in zip(readers, collected, strict=True):
                result.old_served_after += got["old entry still served"]
                result.flushes = max(result.flushes, len(got["flushes"]))
                for key, (hooked, polled) in got["drops"].items():
                    op, n, s, r = by_key[key]
                    if hooked is None:
                        result.no_drop += 1
                        continue
                    if hooked < s:
                        result.early_drop += 1
                        continue
                    lag = hooked - r
                    result.hook_lags.append(lag)
                    result.by_op.setdefault(op, []).append(lag)
                    if polled is not None:
                        result.poll_lags.append(polled - r)
                    info = {"reader": reader, "key": key, "op": op, "n": n}
                    samples.append((lag, None if polled is None else polled - r, info))
            progress(
                f"[coherence {load}] batch {batch + 1}/{plan.batches}: "
                f"{result.writes} writes, p99 so far "
                f"{_ms(_p99(pct(result.hook_lags)))} ms"
            )
        elapsed = time.perf_counter() - t0
        calls1 = sum(workers.ask(readers, "load_calls"))
        result.load_calls_per_s = (calls1 - calls0) / elapsed / len(readers)
        probes = workers.ask(readers, "probe_since_mark")
        result.wake = _wake_summary(probes)
    except RuntimeError as exc:
        result.failure = str(exc)
        progress(f"[coherence {load}] FAILED: {exc}")
    finally:
        if workers is not None:
            workers.close()
    samples.sort(key=lambda s: s[0], reverse=True)
    result.worst = [
        {
            **info,
            "lag ms": round(lag * 1000, 3),
            "poll ms": None if p is None else round(p * 1000, 3),
        }
        for lag, p, info in samples[:5]
    ]
    return result


# ---------------------------------------------------------------- part 2


@dataclass(slots=True)
class Staleness:
    """Part 2: counts, and every stale read beyond the window with its evidence."""

    duration_s: float = 0.0
    processes: int = 4
    threads: int = 0
    reads: int = 0
    writes: int = 0
    refreshes: int = 0
    invalidations: int = 0
    computations: int = 0
    errors: int = 0
    hung: int = 0
    flushes: int = 0
    served: dict[str, int] = field(default_factory=dict)
    stale_beyond: int = 0  # age >= WINDOW_S
    stale_beyond_p99: int | None = None  # age >= part 1's busy p99
    p99_window_ms: float | None = None
    stale_within: int = 0
    own_stale: int = 0
    ages_ms: dict[str, int] = field(default_factory=dict)  # every stale read, by age
    stale_ages_ms: list[float] = field(default_factory=list)  # every stale read's
    evidence: list[dict[str, Any]] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    wake: dict[str, Any] = field(default_factory=dict)  # every process's probe
    causes: dict[str, int] = field(default_factory=dict)  # of the evidence's reads
    drop_lag: dict[str, Any] = field(default_factory=dict)  # see _workload_drop_lags
    witness: dict[str, Any] = field(default_factory=dict)  # see _witness_lags
    failure: str | None = None


class _History:
    """The writes of one key (or one key in one process), ordered by return time."""

    __slots__ = ("items", "peak", "returns")

    def __init__(self, writes: list[tuple[Any, ...]]) -> None:
        self.items = sorted(writes, key=lambda w: w[3])
        self.returns = [w[3] for w in self.items]
        self.peak = list(accumulate((w[4] for w in self.items), max))

    def outdated_at(self, dbver: int, before: float) -> int | None:
        """Index of the earliest-returned write with n > dbver, if it returned < before."""
        i = bisect_right(self.peak, dbver)  # peak is non-decreasing
        if i < len(self.items) and self.returns[i] < before:
            return i
        return None


_AGE_BUCKETS = (
    (0.001, "< 1 ms"),
    (0.005, "1-5 ms"),
    (0.02, "5-20 ms"),
    (0.1, "20-100 ms"),
)


def _age_bucket(age: float) -> str:
    for bound, name in _AGE_BUCKETS:
        if age < bound:
            return name
    return ">= 100 ms"


def check(  # noqa: C901, PLR0915 - the checker is one pass over every read
    logs: list[dict[str, Any]], p99_window_s: float | None
) -> Staleness:
    """Apply the staleness rule (see the module) to every read of every process."""
    out = Staleness()
    writes = [w for log in logs for w in log["writes"]]
    by_key: dict[int, list[Any]] = {}
    by_key_pid: dict[tuple[int, int], list[Any]] = {}
    for w in writes:
        by_key.setdefault(w[0], []).append(w)
        by_key_pid.setdefault((w[0], w[5]), []).append(w)
    hist = {k: _History(v) for k, v in by_key.items()}
    own = {k: _History(v) for k, v in by_key_pid.items()}
    computations = {(log["pid"], c[3]): c for log in logs for c in log["computations"]}
    ages: Counter[str] = Counter()
    served: Counter[str] = Counter()
    out.p99_window_ms = None if p99_window_s is None else p99_window_s * 1000
    beyond_p99 = 0
    for log in logs:
        pid = log["pid"]
        witness: _Witness | None = None
        for read in log["reads"]:
            x, b, dbver, by, n, how = (
                read[0],
                read[1],
                read[3],
                read[4],
                read[5],
                read[6],
            )
            served[how] += 1
            h = hist.get(x)
            i = None if h is None else h.outdated_at(dbver, b)
            mine = own.get((x, pid))
            j = None if mine is None else mine.outdated_at(dbver, b)
            if i is None and j is None:
                continue
            age = 0.0
            if i is not None and h is not None:
                age = b - h.returns[i]
                ages[_age_bucket(age)] += 1
                out.stale_ages_ms.append(round(age * 1000, 3))
                if age >= WINDOW_S:
                    out.stale_beyond += 1
                else:
                    out.stale_within += 1
                if p99_window_s is not None and age >= p99_window_s:
                    beyond_p99 += 1
            if j is not None:
                out.own_stale += 1
            if (i is not None and age >= WINDOW_S) or j is not None:
                if witness is None:
                    witness = _Witness(log)
                assert h is not None  # noqa: S101 - j implies a write of x
                out.evidence.append(
                    _evidence(read, witness, h, i, mine, j, computations.get((by, n)))
                )
    out.stale_beyond_p99 = None if p99_window_s is None else beyond_p99
    out.served = dict(served.most_common())
    out.ages_ms = {name: ages[name] for _, name in _AGE_BUCKETS} | {
        ">= 100 ms": ages[">= 100 ms"]
    }
    out.reads = sum(out.served.values())
    out.writes = len(writes)
    out.refreshes = sum(1 for w in writes if w[1] == "refresh")
    out.invalidations = out.writes - out.refreshes
    out.computations = sum(len(log["computations"]) for log in logs)
    out.errors = sum(len(log["errors"]) for log in logs)
    out.error_samples = [e[2] for log in logs for e in log["errors"]][:5]
    out.hung = sum(len(log["hung"]) for log in logs)
    out.flushes = sum(len(log["flushes"]) for log in logs)
    out.wake = _wake_summary([log["probe"] for log in logs])
    out.drop_lag = _workload_drop_lags(logs, writes)
    out.witness = _witness_lags(logs)
    if out.evidence:
        _add_timelines(out.evidence, logs, by_key)
    out.evidence.sort(key=lambda ev: ev["read began"])
    out.causes = dict(Counter(ev["cause"] for ev in out.evidence).most_common())
    return out


TIMELINE_BEFORE_S = 0.03  # before the outdating write began
TIMELINE_AFTER_S = 0.005  # after the stale read returned
TIMELINE_MAX = 80


def _add_timelines(  # noqa: C901 - one pass per kind of record
    evidence: list[dict[str, Any]],
    logs: list[dict[str, Any]],
    writes_by_key: dict[int, list[Any]],
) -> None:
    """Give each stale read the key's history around it, from every process's logs.

    Writes, computations, and the reads that sent a script (not near hits), with
    times in ms from the stale read's start.
    """
    wanted = {int(ev["key"].removeprefix("k:")) for ev in evidence}
    computed: dict[int, list[tuple[Any, ...]]] = {}
    remote: dict[int, list[tuple[Any, ...]]] = {}
    for log in logs:
        pid = log["pid"]
        for c in log["computations"]:
            if c[0] in wanted:
                computed.setdefault(c[0], []).append((pid, *c))
        for r in log["reads"]:
            if r[0] in wanted and len(r) > 8:  # noqa: PLR2004 - it sent scripts
                remote.setdefault(r[0], []).append((pid, *r))
    for ev in evidence:
        x = int(ev["key"].removeprefix("k:"))
        b = ev["read began"]
        first = ev["first outdating write"] or ev["own-process outdating write"]
        since = (first["started"] if first else b) - TIMELINE_BEFORE_S
        until = ev["read returned"] + TIMELINE_AFTER_S

        def ms(t: float, b: float = b) -> float:
            return round((t - b) * 1000, 3)

        rows: list[tuple[float, list[Any]]] = []
        for w in writes_by_key.get(x, []):
            _x, op, ws, wr, n, wpid, wtid, _d, ops = w
            if wr >= since and ws <= until:
                rows.append(
                    (
                        ws,
                        ["write", wpid, wtid, op, n, ms(ws), ms(wr)]
                        + [_op_row(o, b) for o in ops],
                    )
                )
        for pid, _x, dbver, at, n, tid, within in computed.get(x, []):
            if since <= at <= until:
                rows.append((at, ["compute", pid, tid, within, dbver, ms(at), n]))
        for pid, *r in remote.get(x, []):
            rb, re_ = r[1], r[2]
            if re_ >= since and rb <= until:
                rows.append(
                    (
                        rb,
                        ["read", pid, r[7], r[6], r[3], ms(rb), ms(re_)]
                        + [_op_row(o, b) for o in r[8]],
                    )
                )
        rows.sort(key=lambda row: row[0])
        ev["key timeline (ms from the stale read's start)"] = [
            row for _, row in rows[:TIMELINE_MAX]
        ]


def _witness_lags(logs: list[dict[str, Any]]) -> dict[str, Any]:
    """The library's listener against the raw witness of the same process (``--raw-witness``).

    Both read the same channel, so they hear the same messages in the same order once
    both are subscribed: the raw witness's first messages are found in the listener's
    `NearInvalidation` log, and the two are paired one to one from there (until the
    keys disagree). Per pair: the listener's time minus the witness's, in ms.
    """
    diffs: list[float] = []
    paired = unpaired = 0
    for log in logs:
        raw = log.get("raw") or []
        heard = log["invalidations"]
        if len(raw) < 20:  # noqa: PLR2004 - too few to align
            continue
        keys = [k for k, _ in heard]
        head = [k for k, _ in raw[:20]]
        start = next(
            (i for i in range(len(keys) - 19) if keys[i : i + 20] == head), None
        )
        if start is None:
            unpaired += len(raw)
            continue
        mine = 0
        for (key, at), (raw_key, raw_at) in zip(heard[start:], raw, strict=False):
            if key != raw_key:
                break
            diffs.append(at - raw_at)
            mine += 1
        paired += mine
        unpaired += len(raw) - mine
    got = pct(diffs)
    return {
        "paired": paired,
        "unpaired": unpaired,
        "p50 ms": None if got is None else got.p50,
        "p99 ms": None if got is None else got.p99,
        "max ms": None if got is None else got.max,
        "over 5 ms": sum(d > WINDOW_S for d in diffs),
    }


def _workload_drop_lags(
    logs: list[dict[str, Any]], writes: list[tuple[Any, ...]]
) -> dict[str, Any]:
    """Coherence lag inside the workload: a lower bound, per write and other process.

    For each logged write and each other process, the first `NearInvalidation` of the
    key that process heard at or after the write began, minus the write's return. The
    write's own message comes no earlier than its start, so this is never later than
    it; it may be an earlier write's message handled late (then it is earlier).
    """
    heard: dict[int, dict[str, list[float]]] = {}
    for log in logs:
        by_key: dict[str, list[float]] = {}
        for key, at in log["invalidations"]:
            by_key.setdefault(key, []).append(at)
        heard[log["pid"]] = by_key
    lags: list[float] = []
    missing = 0
    for w in writes:
        x, s, r, wpid = w[0], w[2], w[3], w[5]
        for pid, by_key in heard.items():
            if pid == wpid:
                continue
            times = by_key.get(f"k:{x}", [])
            i = bisect_left(times, s)
            if i < len(times):
                lags.append(times[i] - r)
            else:
                missing += 1
    got = pct(lags)
    return {
        "samples": len(lags),
        "missing": missing,
        "p50 ms": None if got is None else got.p50,
        "p99 ms": None if got is None else got.p99,
        "max ms": None if got is None else got.max,
    }


PROBE_WRITE_TO_READ = (
    "probe: longest oversleep overlapping [write returned, read began], ms"
)
PROBE_SILENCE = "probe: longest oversleep during the listener's silence around it, ms"


class _Witness:
    """What one process saw, indexed for the evidence of its stale reads."""

    def __init__(self, log: dict[str, Any]) -> None:
        self.pid = log["pid"]
        self.heard_key: dict[str, list[float]] = {}
        for key, at in log["invalidations"]:
            self.heard_key.setdefault(key, []).append(at)
        self.heard = sorted(at for _, at in log["invalidations"])
        self.oversleeps = log["oversleeps"]  # (wall at wake-up, excess)
        self.gc_pauses = log["gc pauses"]  # (wall at start, seconds)
        self._log = log
        self.raw = log.get("raw") or []
        self._reads: dict[int, list[tuple[Any, ...]]] | None = None

    def leader(self, read: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The read of another thread whose flight *read* joined, if the logs show it.

        It returned the same value (same process and computation), began before
        *read* and had not returned when *read* began; the latest such one.
        """
        x, b, _e, _d, by, n, _how, tid = read[:8]
        if self._reads is None:
            self._reads = {}
            for r in self._log["reads"]:
                self._reads.setdefault(r[0], []).append(r)
        found = [
            r
            for r in self._reads.get(x, [])
            if r[7] != tid and (r[4], r[5]) == (by, n) and r[1] < b <= r[2]
        ]
        return max(found, key=lambda r: r[1]) if found else None

    def around(self, since: float, until: float) -> dict[str, Any]:
        """The listener's messages (any key) around *since*; late wake-ups and GC."""
        i = bisect_right(self.heard, since)
        awake = [
            excess
            for at, excess in self.oversleeps
            if at >= since and at - excess - PROBE_S <= until
        ]
        paused = [d for at, d in self.gc_pauses if at <= until and at + d >= since]
        quiet_from = self.heard[i - 1] if i else since
        quiet_to = self.heard[i] if i < len(self.heard) else until
        asleep = [
            excess
            for at, excess in self.oversleeps
            if at >= quiet_from and at - excess - PROBE_S <= quiet_to
        ]
        return {
            "listener's last message (any key) before the write returned, ms before it": None
            if i == 0
            else round((since - self.heard[i - 1]) * 1000, 3),
            "listener's first message (any key) after the write returned, ms after it": None
            if i == len(self.heard)
            else round((self.heard[i] - since) * 1000, 3),
            PROBE_WRITE_TO_READ: round(max(awake, default=0.0) * 1000, 3),
            "GC pauses overlapping it, ms": [round(d * 1000, 3) for d in paused],
            PROBE_SILENCE: round(max(asleep, default=0.0) * 1000, 3),
        }


LISTENER_LATE = "the reader's listener had not handled the write's message yet"


def _cause(
    how: str,
    heard: list[float],
    first: tuple[Any, ...] | None,
    began: float,
    leader: tuple[Any, ...] | None,
) -> str:
    """Why a read was stale, as far as the logs tell.

    A near hit is explained by delivery lag if the reader heard no invalidation of the
    key between the outdating write's start (its message cannot be sent earlier) and
    the read's start. If it heard one, the message may have been an earlier write's,
    handled late, or the near cache served a value it had been told of: looked at by
    hand. A caller that joined a flight of its own process is told apart by whether
    its flight (*leader*: the read of another thread that returned the same value)
    began before the write returned, and whether the process had heard of the key
    since the write began. Anything else came from Redis or a computation.
    """
    told = first is not None and any(first[2] <= at < began for at in heard)
    if how.startswith(JOINED):
        if leader is None or first is None:
            return f"{how}; its leader not found in the logs: look closer"
        ahead = (first[3] - leader[1]) * 1000
        return (
            f"{how}: thread {leader[7]}'s, begun {ahead:.1f} ms before the write "
            "returned; the reader's listener had "
            + (
                "already handled a message for the key since the write began: "
                "look closer (joins ignore near invalidations)"
                if told
                else "not handled the write's message yet"
            )
        )
    if how not in {"near hit", NEAR_SECOND_LOOK}:
        return f"{how}; not the near cache: look closer"
    if not told:
        return f"{how}; {LISTENER_LATE}"
    return (
        f"{how}; a message for the key was handled after the write began: look closer"
    )


def _op_row(op: tuple[str, float, float, str], b: float) -> list[Any]:
    name, sent, returned, result = op
    return [name, round((sent - b) * 1000, 3), round((returned - b) * 1000, 3), result]


def _evidence(  # noqa: PLR0917 - everything known about one stale read
    read: tuple[Any, ...],
    witness: _Witness,
    h: _History,
    i: int | None,
    mine: _History | None,
    j: int | None,
    computation: tuple[Any, ...] | None,
) -> dict[str, Any]:
    x, b, e, dbver, by, n, how, tid = read[:8]

    def write(w: tuple[Any, ...]) -> dict[str, Any]:
        _x, op, s, r, n_, wpid, wtid, d, ops = w
        return {
            "op": op,
            "n": n_,
            "pid": wpid,
            "thread": wtid,
            "started": s,
            "returned": r,
            "returned ms before the read": round((b - r) * 1000, 3),
            **({"refresh computed dbver": d} if op == "refresh" else {}),
            "scripts (operation, ms from the read's start sent / returned, result)": [
                _op_row(o, b) for o in ops
            ],
        }

    first = (
        h.items[i]
        if i is not None
        else (mine.items[j] if mine and j is not None else None)
    )
    newest = h.items[bisect_left(h.returns, b) - 1]
    since = b if first is None else first[3]
    heard = [
        round((at - b) * 1000, 3)
        for at in witness.heard_key.get(f"k:{x}", [])
        if since - 0.05 <= at <= e + 0.1
    ]
    leader = witness.leader(read) if how.startswith(JOINED) else None
    return {
        "cause": f"own process's write returned before the read; served as {how}"
        if j is not None
        else _cause(
            how,
            witness.heard_key.get(f"k:{x}", []),
            first,
            b,
            leader,
        ),
        "key": f"k:{x}",
        "reader pid": witness.pid,
        "thread": tid,
        "read began": b,
        "read returned": e,
        "read ms": round((e - b) * 1000, 3),
        "served as": how,
        "dbver returned": dbver,
        "value computed by": {
            "pid": by,
            "computation": n,
            "db read at": None if computation is None else computation[2],
            "db read ms before the read": None
            if computation is None
            else round((b - computation[2]) * 1000, 3),
            "thread": None if computation is None else computation[4],
            "in a": None if computation is None else computation[5],
        },
        "read's scripts (operation, ms from the read's start sent / returned, result)": [
            _op_row(o, b)
            for o in (read[8] if len(read) > 8 else ())  # noqa: PLR2004
        ],
        "age ms (read began - first outdating write returned)": None
        if i is None
        else round((b - h.returns[i]) * 1000, 3),
        "first outdating write": None if i is None else write(h.items[i]),
        "newest write returned before the read": write(newest),
        "own-process outdating write": None
        if mine is None or j is None
        else write(mine.items[j]),
        "joined flight's leader (thread, began / returned ms from the read's start, its scripts)": None
        if leader is None
        else [
            leader[7],
            round((leader[1] - b) * 1000, 3),
            round((leader[2] - b) * 1000, 3),
            [_op_row(o, b) for o in (leader[8] if len(leader) > 8 else ())],  # noqa: PLR2004
        ],
        "reader's NearInvalidation of the key, ms from the read's start": heard,
        "reader's raw witness received the key, ms from the read's start": [
            round((at - b) * 1000, 3)
            for key, at in witness.raw
            if key == f"k:{x}" and since - 0.05 <= at <= e + 0.1
        ],
        "reader process": witness.around(since, b),
    }


def measure_staleness(  # noqa: PLR0917 - the run's settings
    url: str,
    plan: Plan,
    admin: redis.Redis,
    p99_window_s: float | None,
    dump: Path | None = None,
    witness: bool = False,  # noqa: FBT001, FBT002
) -> Staleness:
    """Part 2: four processes, the mixed workload, then the checker."""
    admin.flushall()
    workers: Workers | None = None
    try:
        workers = Workers(url, "nc2", 4, plan.compute_s)
        everyone = range(4)
        workers.ask([0], "prefill", (N_KEYS,))
        workers.ask(everyone, "prefill", (N_KEYS,))
        if witness and not all(workers.ask(everyone, "start_witness")):
            msg = "a raw witness did not subscribe"
            raise RuntimeError(msg)  # noqa: TRY301 - reported like any worker's failure
        workers.ask(everyone, "mark_probe")
        start_at = time.time() + 0.5
        progress(
            f"[staleness] {plan.duration_s:.0f} s: 4 processes x {plan.threads} threads"
        )
        logs = workers.ask(
            everyone,
            "mixed",
            (start_at, plan.duration_s, plan.threads, SEED),
            timeout=plan.duration_s + 60,
        )
    except RuntimeError as exc:
        progress(f"[staleness] FAILED: {exc}")
        return Staleness(failure=str(exc))
    finally:
        if workers is not None:
            workers.close()
    if dump is not None:
        with dump.open("wb") as f:
            pickle.dump(logs, f, protocol=pickle.HIGHEST_PROTOCOL)
        progress(f"[staleness] raw logs in {dump}")
    progress(f"[staleness] checking {sum(len(log['reads']) for log in logs):,} reads")
    out = check(logs, p99_window_s)
    out.duration_s = plan.duration_s
    out.threads = plan.threads
    return out


# ---------------------------------------------------------------- report


def _p99(found: Pct | None) -> float | None:
    return None if found is None else found.p99


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _verdict(ok: bool) -> str:  # noqa: FBT001
    return "pass" if ok else "FAIL"


def markdown(
    meta: dict[str, str], plan: Plan, parts: list[Coherence], stale: Staleness
) -> str:
    """Return the header, the two parts' tables and the evidence, in Markdown."""
    lines = ["# Near cache coherence", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in meta.items()]
    lines += [
        "",
        "## 1. Coherence latency (1 writer, 3 readers)",
        "",
        (
            f"{plan.batches} batches x {plan.batch_keys} fresh keys per load; each key "
            "changed once (refresh / invalidate alternately), writes "
            f"{plan.pace_s * 400:.0f}-{plan.pace_s * 1600:.0f} ms apart. Lag = reader's "
            "drop - writer's return (ms): *drop* is the NearInvalidation hook (the entry "
            "is gone from that instant), *poll* a thread polling lookup() every "
            f"{POLL_S * 1000:g} ms. Target: p99 of the drop lag <= {TARGET_P99_MS:g} ms."
        ),
        "",
        (
            "| reader load | load calls/s per reader | wake-up delay p99 / max | samples "
            "| drop p50 | drop p99 | drop max "
            "| poll p50 | poll p99 | poll max | refresh p99 | invalidate p99 "
            "| missing / early / re-served / flushes | target | pass |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for c in parts:
        if c.failure is not None:
            lines.append(
                f"| {c.load} | FAILED: {c.failure.splitlines()[0]} | | | | | | | | | | | | "
                f"p99 <= {TARGET_P99_MS:g} ms | FAIL |"
            )
            continue
        d, p = pct(c.hook_lags), pct(c.poll_lags)
        by = {op: pct(v) for op, v in c.by_op.items()}
        ok = d is not None and d.p99 <= TARGET_P99_MS and c.no_drop == 0
        lines.append(
            f"| {c.load} | {c.load_calls_per_s:,.0f} | {_wake_cells(c.wake)} "
            f"| {len(c.hook_lags)} "
            f"| {_ms(d.p50 if d else None)} | {_ms(d.p99 if d else None)} | {_ms(d.max if d else None)} "
            f"| {_ms(p.p50 if p else None)} | {_ms(p.p99 if p else None)} | {_ms(p.max if p else None)} "
            f"| {_ms(_p99(by.get('refresh')))} "
            f"| {_ms(_p99(by.get('invalidate')))} "
            f"| {c.no_drop + c.not_filled} / {c.early_drop} / {c.old_served_after} / "
            f"{c.flushes} | p99 <= {TARGET_P99_MS:g} ms | {_verdict(ok)} |"
        )
    lines += [
        "",
        (
            "*wake-up delay*: how late a thread of the readers that sleeps "
            f"{PROBE_S * 1000:g} ms wakes (ms, over every wake-up; a witness of the "
            "process's scheduling and GIL, independent of the library). "
            "*missing*: (reader, key) pairs not held when armed or never dropped; *early*: "
            "drops before the write began (excluded); *re-served*: the captured old entry "
            "served again after its drop; *flushes*: NearFlush events."
        ),
        "",
    ]
    for c in parts:
        if c.worst:
            shown = "; ".join(
                f"{w['lag ms']} ms ({w['op']} {w['key']}, reader {w['reader']}, "
                f"poll {w['poll ms']})"
                for w in c.worst[:3]
            )
            lines.append(f"- worst drop lags, {c.load}: {shown}")
    lines += ["", *_staleness_md(stale)]
    return "\n".join(lines) + "\n"


def _staleness_md(s: Staleness) -> list[str]:
    lines = [
        "## 2. Mixed workload and staleness checker",
        "",
        (
            f"4 processes x {s.threads} threads, {N_KEYS:,} keys Zipf({ZIPF_S:g}), "
            f"{P_READ:.0%} reads / {P_REFRESH:.0%} refresh() / "
            f"{1 - P_READ - P_REFRESH:.0%} invalidate(), {s.duration_s:g} s. Stale: "
            "returned a dbver below that of a write of the key that had returned before "
            f"the read began. Window W = {WINDOW_S * 1000:g} ms (the latency target)."
        ),
        "",
    ]
    if s.failure is not None:
        return [*lines, f"FAILED: {s.failure}", ""]
    near = s.served.get("near hit", 0)
    rows = [
        ("reads", f"{s.reads:,} ({s.reads / s.duration_s:,.0f}/s)", "", ""),
        (
            "writes (refresh / invalidate)",
            f"{s.writes:,} ({s.refreshes:,} / {s.invalidations:,})",
            "",
            "",
        ),
        ("computations", f"{s.computations:,}", "", ""),
        ("near hits / reads", f"{near / s.reads:.1%}" if s.reads else "-", "", ""),
        (
            f"stale reads beyond W = {WINDOW_S * 1000:g} ms",
            f"{s.stale_beyond:,}",
            "0",
            _verdict(s.stale_beyond == 0),
        ),
        ("stale reads within W (excused)", f"{s.stale_within:,}", "", ""),
        (
            f"stale reads beyond W = part 1 busy p99 ({_ms(s.p99_window_ms)} ms)",
            "-" if s.stale_beyond_p99 is None else f"{s.stale_beyond_p99:,}",
            "",
            "",
        ),
        (
            (
                "stale reads beyond W = the in-workload drop lag p99 below "
                f"({_ms(s.drop_lag.get('p99 ms'))} ms)"
            ),
            "-"
            if s.drop_lag.get("p99 ms") is None
            else f"{sum(a >= s.drop_lag['p99 ms'] for a in s.stale_ages_ms):,}",
            "",
            "",
        ),
        (
            "own-process stale reads (after its own write returned)",
            f"{s.own_stale:,}",
            "0",
            _verdict(s.own_stale == 0),
        ),
        (
            (
                "drop lag in the workload, p50 / p99 / max (ms; a lower bound, see "
                "_workload_drop_lags)"
            ),
            " / ".join(_ms(s.drop_lag.get(k)) for k in ("p50 ms", "p99 ms", "max ms")),
            "",
            "",
        ),
        *(
            [
                (
                    (
                        "listener's handling - raw witness's receipt, same process, "
                        "p50 / p99 / max (ms); pairs over 5 ms"
                    ),
                    " / ".join(
                        _ms(s.witness.get(k)) for k in ("p50 ms", "p99 ms", "max ms")
                    )
                    + f"; {s.witness['over 5 ms']:,} of {s.witness['paired']:,}",
                    "",
                    "",
                )
            ]
            if s.witness.get("paired")
            else []
        ),
        (
            "wake-up delay of a sleeping thread, p99 / max (ms); longest GC pause",
            f"{_wake_cells(s.wake)}; {s.wake.get('longest GC ms', 0):.1f}",
            "",
            "",
        ),
        (
            "errors / hung threads / NearFlush",
            f"{s.errors} / {s.hung} / {s.flushes}",
            "0 / 0 / 0",
            _verdict(s.errors == 0 and s.hung == 0),
        ),
    ]
    lines += ["| measure | value | target | pass |", "|---|---:|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += [
        "",
        "Reads by how they were served: "
        + ", ".join(f"{k} {v:,}" for k, v in s.served.items()),
        "",
        "Stale reads (any) by age (read began - first outdating write returned): "
        + ", ".join(f"{k} {v:,}" for k, v in s.ages_ms.items()),
        "",
    ]
    if s.error_samples:
        lines += ["Errors, first ones: " + "; ".join(s.error_samples), ""]
    if s.causes:
        lines += [
            "Causes of the stale reads listed below (see `_cause`): "
            + "; ".join(f"{k}: {v:,}" for k, v in s.causes.items()),
            "",
        ]
    if s.evidence:
        lines += [
            (
                f"Stale reads beyond W and own-process stale reads ({len(s.evidence)}; "
                f"first {min(len(s.evidence), EVIDENCE_SHOWN)}, all in the JSON):"
            ),
            "",
        ]
        lines += [
            (
                "| read began (UTC) | key | reader pid/thread | served as | dbver (made by pid, "
                "db read ms before) | age ms | first outdating write (op n pid, ms before) "
                "| listener: last msg before / first after the write returned (ms) "
                "| probe's longest oversleep ms: write to read / listener's silence "
                "| GC ms | cause |"
            ),
            "|---|---|---|---|---|---:|---|---|---:|---|---|",
        ]
        lines += [_evidence_row(ev) for ev in s.evidence[:EVIDENCE_SHOWN]]
        lines.append("")
    return lines


def _evidence_row(ev: dict[str, Any]) -> str:
    made = ev["value computed by"]
    first = ev["first outdating write"] or ev["own-process outdating write"]
    seen = ev["reader process"]
    began = datetime.fromtimestamp(ev["read began"], UTC).strftime("%H:%M:%S.%f")
    age = ev["age ms (read began - first outdating write returned)"]
    cells = [
        began,
        ev["key"],
        f"{ev['reader pid']}/{ev['thread']}",
        ev["served as"],
        f"{ev['dbver returned']} ({made['pid']}, {made['db read ms before the read']})",
        "-" if age is None else f"{age:.1f}",
        (
            f"{first['op']} {first['n']} {first['pid']}, "
            f"{first['returned ms before the read']:.1f}"
        ),
        " / ".join(
            str(v)
            for k, v in seen.items()
            if k.startswith("listener's")  # last before, first after
        ),
        f"{seen[PROBE_WRITE_TO_READ]} / {seen[PROBE_SILENCE]}",
        str(seen["GC pauses overlapping it, ms"]),
        ev["cause"],
    ]
    return "| " + " | ".join(cells) + " |"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Measure; print Markdown; write JSON. Exit 1 if a measurement failed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument(
        "--duration", type=float, default=None, help="part 2 seconds (15; 4 quick)"
    )
    parser.add_argument("--threads", type=int, default=3, help="part 2, per process")
    parser.add_argument(
        "--compute-ms", type=float, default=1.0, help="the function's sleep"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write JSON here")
    parser.add_argument(
        "--raw-witness",
        action="store_true",
        help="part 2: a plain redis-py subscriber per process beside the listener",
    )
    parser.add_argument(
        "--dump",
        type=Path,
        default=None,
        help="write part 2's raw logs here (pickle), for a closer look",
    )
    args = parser.parse_args(argv)
    duration = args.duration if args.duration is not None else (4 if args.quick else 15)
    if not 0 < duration <= 600:  # noqa: PLR2004
        parser.error("--duration must be in (0, 600] seconds")
    plan = Plan(
        loads=("none", "io", "busy"),
        batches=4 if args.quick else 20,
        batch_keys=50,
        pace_s=0.005,
        duration_s=duration,
        threads=args.threads,
        compute_s=args.compute_ms / 1000,
    )
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    src_start = source_state()
    load_start = os.getloadavg()
    with RedisServer() as server:
        redis_version = server.version()
        progress(f"redis-server {redis_version} on {server.url} (private)")
        progress(f"stampede_guard: {src_start}")
        parts = [
            measure_coherence(server.url, plan, load, server.admin)
            for load in plan.loads
        ]
        busy = next((c for c in parts if c.load == "busy" and c.hook_lags), None)
        p99 = None if busy is None else pct(busy.hook_lags).p99 / 1000  # type: ignore[union-attr]
        stale = measure_staleness(
            server.url, plan, server.admin, p99, args.dump, args.raw_witness
        )
    elapsed = time.perf_counter() - t0
    src_end = source_state()
    if source_summary(src_start, src_end).startswith("CHANGED"):
        progress("warning: src/stampede_guard changed during the run")
    meta = report_header(
        "near_coherence.py",
        started=started,
        elapsed=elapsed,
        redis_version=redis_version,
        src=(src_start, src_end),
        load=(load_start, os.getloadavg()),
    )
    text = markdown(meta, plan, parts, stale)
    sys.stdout.write(text)
    sys.stdout.flush()
    summary = {
        c.load: {
            "drop": None if not c.hook_lags else asdict(pct(c.hook_lags)),  # type: ignore[arg-type]
            "poll": None if not c.poll_lags else asdict(pct(c.poll_lags)),  # type: ignore[arg-type]
        }
        for c in parts
    }
    payload = json.dumps(
        _jsonable(
            {
                "meta": meta,
                "plan": asdict(plan),
                "coherence summary ms": summary,
                "coherence": [asdict(c) for c in parts],
                "staleness": asdict(stale),
                "markdown": text,
            }
        ),
        indent=1,
    )
    RESULTS.mkdir(exist_ok=True)
    paths = [RESULTS / f"near-coherence-{started.strftime('%Y%m%d-%H%M%S')}.json"]
    if args.json is not None:
        paths.append(args.json)
    for path in paths:
        path.write_text(payload)
    progress(f"done in {elapsed:.0f} s; JSON in {', '.join(map(str, paths))}")
    failed = stale.failure is not None or any(c.failure is not None for c in parts)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
