"""The near cache: hits from this process's memory, kept coherent with Redis.

A Redis backend made with ``near_cache=NearCache(...)`` keeps the entries it reads in
a bounded store (`BoundedStore`) and answers later reads of them with no round trip.
Coherence comes from invalidation messages, not from Redis's server-assisted client
tracking: every store and invalidation script of this library also publishes the
cache key it changed on one channel per prefix (``<prefix>:near``), and the backend's
one pub/sub listener, which waiters already share, subscribes to it. Why not
``CLIENT TRACKING``: with ``BCAST`` and our key layout (``<prefix>:{tag}:v:<key>``) a
prefix cannot single out values, so every lock taken and released would invalidate
too; its RESP2 form needs a second connection kept open for the tracking state (per
node, on a cluster); and messages of our own go through the pub/sub connection whose
health the listener already watches (`Hub`), on Redis 6 and 7, Valkey, Sentinel and
Cluster alike (a classic ``PUBLISH`` reaches every node of a cluster). What it does not
see: writes made around the library (a ``DEL`` by hand, ``FLUSHALL``, an eviction by
``maxmemory``); the near entry's own ``ttl`` bounds those.

Safety, decided here for both backends:

- A near entry lives until the earlier of its ``ttl`` and the entry's remaining time
  in Redis (``PTTL``, read with the value, counted from before the read was sent).
- A read may only fill the near cache if nothing changed its key since the read
  began. Every invalidation (received, or made by this process) takes a number from
  one sequence and is remembered by key; a read notes the sequence when it starts,
  and its entry is refused if its key's last invalidation is later. Without this, a
  read sent before another process's write could land after that write's message,
  and the old value would stay.
- While the listener is not subscribed on a healthy connection (not yet, or lost, or
  found silent by `Hub`), the near cache is empty and refuses entries: reads go to
  Redis. Losing the connection flushes it, since messages may have been missed.
- A write by this process drops its own near copy before it is sent and again after
  it returns, so the writer never serves the old value after its write or
  invalidation returns (read your writes), whatever the message's delay.
- A forked child starts with an empty near cache (``os.register_at_fork``).
- A tag's invalidation (a message naming the tag) drops the entries held that carry
  it, found by an index of the tags of what was admitted, and refuses the entries
  carrying it that reads begun before bring back (tags are remembered by number as
  keys are). It also forgets every in-process flight: a read in flight may be of a
  value carrying the tag, which cannot be known before it lands.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Protocol

from stampede_guard._bounded import BoundedStore, check_maxbytes, check_maxsize
from stampede_guard._entry import Entry
from stampede_guard._tags import TAG_MESSAGE
from stampede_guard.metrics import (
    NearEviction,
    NearFlush,
    NearInvalidation,
    NearMetricsHook,
    safe_emitter,
)

__all__ = ["Near", "NearCache", "Writing", "check_near_cache"]

# Invalidations remembered by key, for reads in flight (see the module). A read that
# began before the oldest one forgotten is refused: safe, and rare at this size.
_REMEMBERED = 4096


@dataclass(frozen=True, slots=True)
class NearCache:
    """Keep entries read from Redis in this process too; serve them with no round trip.

    Pass it to `RedisBackend.from_url` (or `from_sentinel`, or the constructor, and
    their `AsyncRedisBackend` twins). Misses, stores and locks go to Redis as before;
    a hit on a key this process read recently is a dictionary lookup. A store, refresh
    or invalidation of a key in any process sharing the Redis and prefix drops the
    key from every process's near cache within milliseconds, and the writing process
    never serves the old value after its write returns. See docs/near-cache.md.

    Values are the decoded objects themselves, shared by every caller in the process:
    treat them as read-only (copying each hit would cost more than the hit).

    Args:
        maxsize: Most entries held; the least recently used goes first.
        ttl: Longest a near entry is served without asking Redis, in seconds (also
            never longer than the entry's remaining time in Redis). It bounds what
            the invalidation messages cannot see: writes made around this library.
        maxbytes: Most bytes held, counted as the size of the stored payloads; None
            for no limit but *maxsize*.
        admission: Once full, let a new key in only when it is read a second time
            while still remembered (among the last *maxsize* keys refused): keys
            read once do not push out hot ones. On a Zipf trace, 77.5 % hits instead
            of plain LRU's 73.5 % (docs/near-cache.md); a refused read costs one
            more read from Redis later. False: plain LRU.
        metrics: Receives `NearEviction`, `NearInvalidation` and `NearFlush` (near
            hits are `Hit` events with ``near=True``, sent to each function's hook).
    """

    maxsize: int = 10_000
    ttl: float = 30.0
    maxbytes: int | None = None
    admission: bool = True
    metrics: NearMetricsHook | None = None

    def __post_init__(self) -> None:
        check_maxsize(self.maxsize, "NearCache")
        check_maxbytes(self.maxbytes, "NearCache")
        admission: object = self.admission
        if not isinstance(admission, bool):
            msg = f"NearCache: admission={admission!r} must be True (a new key gets in on its second read once the cache is full) or False (plain LRU)"
            raise TypeError(msg)
        ttl: object = self.ttl
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
            msg = f"NearCache: ttl must be a number of seconds, not {type(ttl).__qualname__}"
            raise TypeError(msg)
        if not math.isfinite(ttl) or not 0.001 <= ttl <= 24 * 3600:  # noqa: PLR2004
            msg = f"NearCache: ttl={ttl!r} is out of range: give a finite number of seconds from 0.001 to 86400 (a day); it bounds staleness from writes the near cache cannot hear of"
            raise ValueError(msg)
        metrics: object = self.metrics
        if metrics is not None and not callable(metrics):
            msg = f"NearCache: metrics={self.metrics!r} is not callable: give a hook taking NearEviction, NearInvalidation and NearFlush events (see stampede_guard.metrics.NearMetricsHook), such as a StampedeStats"
            raise TypeError(msg)


FlushReason = Literal["lost", "stopped", "fork"]


class Forgets(Protocol):
    """A decorated function's in-process flights (`_coalesce`): forgetting a key's."""

    def forget(self, key: str) -> None: ...
    def forget_all(self) -> None: ...


def check_near_cache(value: object, builder: str) -> NearCache | None:
    """Return *value* if it is a `NearCache` or None, else raise TypeError."""
    if value is None or isinstance(value, NearCache):
        return value
    msg = f"{builder}: near_cache={value!r} is not a NearCache; pass near_cache=NearCache(maxsize=10_000, ttl=30)"
    raise TypeError(msg)


class Near:
    """One backend's near cache (see the module): the store and the decisions."""

    def __init__(
        self, config: NearCache, channel: str, silence: float = math.inf
    ) -> None:
        self.config = config
        self.channel = channel  # where the library's scripts announce changed keys
        # When the listener last heard from the server (`heard`), and how long it may
        # be silent before nothing is served: a listener that cannot run (an event
        # loop paused between `run_until_complete` calls, a starved thread) leaves
        # messages unread, so what is held may be old.
        self._heard = [0.0]
        self._silence = silence
        self._emit = safe_emitter(config.metrics)
        self._observed = config.metrics is not None
        self._store: BoundedStore[str, Entry] = BoundedStore(
            config.maxsize,
            maxbytes=config.maxbytes,
            on_evict=self._evicted if self._observed else None,
            admission=config.admission,
        )
        # The in-process flights of every function on this backend (`watch`).
        self._watchers: weakref.WeakSet[Forgets] = weakref.WeakSet()
        #: The hot path: the live near entry of a key, or None.
        self.lookup = self._store.reader(self._heard, silence)
        self.clock = time.monotonic  # the store's clock, on which deadlines run
        self._start()
        _EVERY.add(self)

    def _start(self) -> None:
        self._mutex = threading.Lock()
        self._seq = 0  # one number per invalidation, connection change or flush
        self._forgotten = 0  # reads begun before this cannot be judged: refused
        self._recent: OrderedDict[str, int] = OrderedDict()  # key -> its last number
        self._tag_recent: OrderedDict[str, int] = OrderedDict()  # the same, by tag
        self._tagged: dict[str, set[str]] = {}  # tag -> keys admitted carrying it
        self._indexed = 0  # keys in `_tagged`, counted with repeats
        self.live = False  # subscribed on a connection that is trusted
        self.wanted = False  # the listener has been asked to subscribe
        # The listener's hub that keeps the subscription. Only it may flush: a
        # listener replaced (a new event loop's) may stop after its successor
        # subscribed, and its flush would leave the near cache off for good.
        self.owner: object = None

    def __len__(self) -> int:
        return len(self._store)

    @property
    def evictions(self) -> int:
        """Entries dropped to make room so far."""
        return self._store.evictions

    def begin(self) -> int | None:
        """Note the start of a read from Redis: its number, or None if it may not fill."""
        return self._seq if self.live else None

    def admit(
        self,
        key: str,
        entry: Entry,
        start: int,
        *,
        began: float,
        remote_ttl: float | None,
        weight: int,
    ) -> None:
        """Keep *entry*, read by a read that began at *start* (see `begin`), if allowed.

        *began* is when the read was sent (the store's monotonic clock) and
        *remote_ttl* the entry's remaining seconds in Redis then (None: no expiry).
        """
        ttl = self.config.ttl
        if remote_ttl is not None:
            if remote_ttl <= 0:
                return
            ttl = min(ttl, remote_ttl)
        with self._mutex:
            if (
                not self.live
                or start < self._forgotten
                or self._recent.get(key, 0) > start
                or (entry.tags and self._tag_changed(entry.tags, start))
            ):
                return
            if self._store.put(key, entry, began + ttl, weight) and entry.tags:
                self._index(key, entry.tags)

    def _tag_changed(self, tags: tuple[str, ...], start: int) -> bool:
        """Whether one of *tags* was invalidated after a read that began at *start*."""
        recent = self._tag_recent
        return any(recent.get(tag, 0) > start for tag in tags)

    def _index(self, key: str, tags: tuple[str, ...]) -> None:
        """Note that *key* is held carrying *tags* (under the mutex).

        Keys dropped or evicted stay in the index until their tag is invalidated
        (then only those still carrying it are dropped), or until the index outgrows
        twice what is held: then it is rebuilt from what is held.
        """
        for tag in tags:
            self._tagged.setdefault(tag, set()).add(key)
        self._indexed += len(tags)
        if self._indexed > 2 * (len(self._store) + _REMEMBERED):
            rebuilt: dict[str, set[str]] = {}
            for tag, keys in self._tagged.items():
                held = {k for k in keys if self._carries(k, tag)}
                if held:
                    rebuilt[tag] = held
            self._tagged = rebuilt
            self._indexed = sum(map(len, rebuilt.values()))

    def _carries(self, key: str, tag: str) -> bool:
        held = self._store.peek(key)
        return held is not None and tag in held[0].tags

    def drop(self, key: str) -> None:
        """Forget *key*: it changed (or is being changed) since anything read of it."""
        with self._mutex:
            self._remember(self._recent, key)
            self._store.pop(key)

    def _remember(self, recent: OrderedDict[str, int], name: str) -> None:
        """Give *name* (a key, or a tag) a new number in *recent* (under the mutex).

        The oldest names are forgotten past `_REMEMBERED`; reads begun before their
        number can no longer be judged, so they are refused (`_forgotten`).
        """
        self._seq += 1
        recent[name] = self._seq
        recent.move_to_end(name)
        while len(recent) > _REMEMBERED:
            _, number = recent.popitem(last=False)
            self._forgotten = max(self._forgotten, number)

    def invalidated(self, key: str) -> None:
        """A message said *key* changed (in any process, this one included).

        The flights of *key* in this process are forgotten too: a read begun before
        the change may still be in flight, and a caller arriving now must not join
        it and be served what this process already knows is old.
        """
        if key.startswith(TAG_MESSAGE):
            self.tag_invalidated(key[len(TAG_MESSAGE) :])
            return
        self.drop(key)
        with self._mutex:
            watchers = list(self._watchers)
        for flights in watchers:
            flights.forget(key)
        if self._observed:
            self._emit(NearInvalidation(key))

    def tag_invalidated(self, tag: str) -> None:
        """A message said *tag* was invalidated (in any process, this one included).

        The entries held that carry it are dropped, and reads begun before that bring
        one back are refused (see the module). Every in-process flight is forgotten.
        """
        with self._mutex:
            self._remember(self._tag_recent, tag)
            keys = self._tagged.pop(tag, set())
            self._indexed -= len(keys)
            dropped = [key for key in keys if self._carries(key, tag)]
            for key in dropped:
                self._remember(self._recent, key)
                self._store.pop(key)
            watchers = list(self._watchers)
        for flights in watchers:
            flights.forget_all()
        if self._observed:
            for key in dropped:
                self._emit(NearInvalidation(key))

    def watch(self, flights: Forgets) -> None:
        """Forget *flights* of a key whenever a message says it changed."""
        with self._mutex:
            self._watchers.add(flights)

    def subscribed(self) -> None:
        """The listener is subscribed on a connection it trusts: entries may come in.

        Reads begun before now are refused: they may predate messages that were
        missed while there was no subscription. What is held is dropped too: a
        confirmation after the first means a new connection, and the client may have
        reconnected by itself (redis-py's pub/sub retries a dropped connection and
        resubscribes without telling the listener), missing messages meanwhile.
        """
        self._start_over("lost", live=True)

    def heard(self, now: float) -> None:
        """The listener heard from the server at *now* (a message, a pong, anything).

        After a silence longer than allowed, what is held is dropped: the listener
        did not run (or the server did not answer) for that long, and messages may
        wait unread behind this one, about keys read meanwhile.
        """
        gap = now - self._heard[0]
        self._heard[0] = now
        if gap > self._silence and len(self._store):
            self._start_over("lost")

    def flush(self, reason: FlushReason) -> None:
        """Drop everything and refuse entries until `subscribed` (see `NearFlush`)."""
        self._start_over(reason, live=False)

    def _start_over(self, reason: FlushReason, *, live: bool | None = None) -> None:
        """Drop everything held, and refuse what reads begun before now bring back.

        *live*, if given, is whether entries may come in from now on. Reported when
        something was dropped, or when the near cache goes off (once per outage:
        the listener's retries find it off already).
        """
        with self._mutex:
            was_live = self.live
            if live is not None:
                self.live = live
            self._seq += 1
            self._forgotten = self._seq
            dropped = self._store.clear()
            self._tagged, self._indexed = {}, 0
        if self._observed and (dropped or (was_live and not self.live)):
            self._emit(NearFlush(reason, dropped))

    def stopped(self) -> None:
        """The listener stopped (closed, or its event loop ended): ask again later."""
        self.flush("stopped")
        self.wanted = False

    def forked(self) -> None:
        """In a forked child: start empty, with a mutex of its own."""
        dropped = len(self._store)
        self._store.reset()
        self._start()
        if self._observed and dropped:
            self._emit(NearFlush("fork", dropped))

    def _evicted(self, key: str) -> None:
        self._emit(NearEviction(key))


class Writing:
    """Around a write by this process: drop *key*'s near copy before and after it.

    After: a read that began before the write returned cannot fill the near cache
    with what it read (see `Near.admit`), so the writer reads its own write. Also
    after a write that failed: it may have been applied all the same.
    """

    __slots__ = ("key", "near")

    def __init__(self, near: Near, key: str) -> None:
        self.near, self.key = near, key

    def __enter__(self) -> None:
        self.near.drop(self.key)

    def __exit__(self, *exc_info: object) -> None:
        self.near.drop(self.key)


_EVERY: weakref.WeakSet[Near] = weakref.WeakSet()


def _after_fork() -> None:
    for near in list(_EVERY):
        near.forked()


os.register_at_fork(after_in_child=_after_fork)
