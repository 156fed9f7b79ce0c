"""A half-open pub/sub connection: noticed, replaced, and no waiter pays for it.

A connection black-holed by the network takes what is sent and answers nothing, so no
error ever comes. The listener PINGs a quiet connection and gives up one that leaves a
request unanswered; meanwhile waiters poll instead of each waiting for a SUBSCRIBE
confirmation. Real-server tests go through `Proxy`, which can black-hole the
connections it carries while letting new ones through; the others drive the listener
with a fake connection and a fake clock, so no assertion rests on wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from _proxy import Proxy
from _waiting import Waiting
from stampede_guard import AsyncRedisBackend, RedisBackend, cached_stampede_safe
from stampede_guard.backends.redis import _hub, _listener
from stampede_guard.backends.redis._codec import RedisCodec
from stampede_guard.backends.redis._listener import AsyncListener, Listener

pytestmark = pytest.mark.timeout(30)

BOUND = 10.0  # seconds any wait of these tests may take before it fails

# Waiters that only polled would sleep this long between looks: a waiter that is
# served within BOUND was woken by a notice.
SLOW_POLL: dict[str, Any] = {
    "base_delay": 30,
    "max_delay": 30,
    "wait_timeout": 60,
    "lock_timeout": 60,
}


def until(what: str, check: Callable[[], object]) -> None:
    """Poll *check* until it is true; fail after BOUND seconds."""
    deadline = time.monotonic() + BOUND
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {BOUND}s")
        time.sleep(0.01)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "stampede_guard" and r.levelno >= logging.WARNING
    ]


def pubsub_ports(client: redis.Redis) -> set[int]:
    """The client ports of the server's pub/sub connections."""
    return {
        int(c["addr"].rsplit(":", 1)[1]) for c in client.client_list(_type="pubsub")
    }


def start_leader(
    backend: RedisBackend, key: str, release: threading.Event
) -> threading.Thread:
    """Compute *key* through *backend* in a thread, finishing when *release* is set."""

    @cached_stampede_safe(key=key, backend=backend, ttl=60, lock_timeout=60)
    def lead() -> str:
        release.wait(BOUND)
        return "from-leader"

    thread = threading.Thread(target=lead)
    thread.start()
    return thread


def wait_for_lock(client: redis.Redis, prefix: str) -> None:
    until("the leader's lock", lambda: list(client.scan_iter(match=f"{prefix}:*:l:*")))


def test_a_black_holed_listener_connection_is_replaced_and_notices_wake_waiters_again(
    proxy: Proxy,
    redis_url: str,
    redis_client: redis.Redis,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Black-hole the listener mid-wait: it reconnects, resubscribes, warns once; a notice wakes the waiter."""
    caplog.set_level(logging.INFO, logger="stampede_guard")
    leader_backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    waiter_backend = RedisBackend.from_url(proxy.url(), prefix=redis_prefix)
    release = threading.Event()
    leader = start_leader(leader_backend, "k", release)
    waiting = Waiting()

    @cached_stampede_safe(key="k", backend=waiter_backend, metrics=waiting, **SLOW_POLL)
    def wait() -> str:
        raise AssertionError("the waiter must not compute")

    result: list[str] = []
    waiter = threading.Thread(target=lambda: result.append(wait()))
    try:
        wait_for_lock(redis_client, redis_prefix)
        waiter.start()
        waiting.until_missed()
        until(
            "the waiter's subscription",
            lambda: redis_client.pubsub_channels(f"{redis_prefix}:*"),
        )
        assert proxy.blackhole(pubsub_ports(redis_client)) == 1
        hub = waiter_backend._listener._hub
        until("a reconnection", lambda: hub.reconnects == 1)
        release.set()
        waiter.join(BOUND)
        assert result == ["from-leader"]  # within BOUND, not after a 30 s poll
        assert waiting.waited("value") == 1
        assert len(warnings_of(caplog)) == 1
        assert hub.reconnects == 1
    finally:
        release.set()
        waiter.join(BOUND)
        leader.join(BOUND)
        waiter_backend.close()
        leader_backend.close()


def test_an_asyncio_listener_replaces_a_black_holed_connection_too(
    proxy: Proxy,
    redis_url: str,
    redis_client: redis.Redis,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The asyncio listener, black-holed mid-wait, reconnects and warns once; a notice wakes its waiter."""
    caplog.set_level(logging.INFO, logger="stampede_guard")
    leader_backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    release = threading.Event()
    leader = start_leader(leader_backend, "k", release)
    waiting = Waiting()

    async def scenario() -> tuple[str, int]:
        backend = AsyncRedisBackend.from_url(proxy.url(), prefix=redis_prefix)

        @cached_stampede_safe(key="k", backend=backend, metrics=waiting, **SLOW_POLL)
        async def wait() -> str:
            raise AssertionError("the waiter must not compute")

        hub = backend._listener._hub
        try:
            task = asyncio.create_task(wait())
            await waiting.until_missed_async()
            deadline = time.monotonic() + BOUND
            while not redis_client.pubsub_channels(f"{redis_prefix}:*"):
                assert time.monotonic() < deadline, "no subscription"
                await asyncio.sleep(0.01)
            assert proxy.blackhole(pubsub_ports(redis_client)) == 1
            while hub.reconnects == 0:
                assert time.monotonic() < deadline + BOUND, "no reconnection"
                await asyncio.sleep(0.01)
            release.set()
            return await asyncio.wait_for(task, BOUND), hub.reconnects
        finally:
            await backend.aclose()

    try:
        wait_for_lock(redis_client, redis_prefix)
        assert asyncio.run(scenario()) == ("from-leader", 1)
        assert waiting.waited("value") == 1
        assert len(warnings_of(caplog)) == 1
    finally:
        release.set()
        leader.join(BOUND)
        leader_backend.close()


# --- a fake connection and a fake clock, for the listener alone ---------------------


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakePubSub:
    """A pub/sub connection that answers like Redis, or, once *silent*, not at all."""

    def __init__(self, silent: bool) -> None:
        self.silent = silent
        self.channels: set[str] = set()
        self.inbox: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.sent: list[tuple[str, str]] = []
        self.closed = False

    @property
    def subscribed(self) -> bool:
        return bool(self.channels)

    def _answer(self, kind: str, channel: str | None, data: object) -> None:
        if not self.silent:
            raw = None if channel is None else channel.encode()
            self.inbox.put({"type": kind, "channel": raw, "data": data})

    def subscribe(self, channel: str) -> None:
        self.sent.append(("subscribe", channel))
        self.channels.add(channel)
        self._answer("subscribe", channel, len(self.channels))

    def unsubscribe(self, channel: str) -> None:
        self.sent.append(("unsubscribe", channel))
        self._answer("unsubscribe", channel, 0)

    def ping(self, message: str) -> None:
        self.sent.append(("ping", message))
        self._answer("pong", None, message.encode())

    def get_message(self, timeout: float) -> dict[str, Any] | None:
        try:
            message = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if message["type"] == "unsubscribe":
            self.channels.discard(message["channel"].decode())
        return message

    def close(self) -> None:
        self.closed = True

    def is_closed(self) -> bool:
        return self.closed

    def pings(self) -> int:
        return sum(kind == "ping" for kind, _ in self.sent)

    def subscribes(self) -> set[str]:
        return {channel for kind, channel in self.sent if kind == "subscribe"}


class FakeAsyncPubSub(FakePubSub):
    """`FakePubSub` for the asyncio listener: the same answers, awaited."""

    async def subscribe(self, channel: str) -> None:  # type: ignore[override]
        super().subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:  # type: ignore[override]
        super().unsubscribe(channel)

    async def ping(self, message: str) -> None:  # type: ignore[override]
        super().ping(message)

    async def get_message(  # type: ignore[override]
        self,
        timeout: float,  # noqa: ASYNC109 - redis-py's signature
    ) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:  # the inbox is filled on this loop's thread: look between sleeps
            message = super().get_message(0)
            if message is not None or time.monotonic() >= deadline:
                return message
            await asyncio.sleep(0.005)

    async def aclose(self) -> None:
        self.closed = True


class Connections:
    """The connections a listener opens: silent ones first (as many as *silent*)."""

    def __init__(self, silent: int, kind: type[FakePubSub] = FakePubSub) -> None:
        self.silent, self.kind = silent, kind
        self.opened: list[FakePubSub] = []

    def __call__(self) -> FakePubSub:
        self.opened.append(self.kind(silent=len(self.opened) < self.silent))
        return self.opened[-1]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_listener(connections: Connections, clock: FakeClock) -> Listener:
    return Listener(connections, RedisCodec("t", None), clock=clock)


def subscribe_in_thread(listener: Listener, keys: list[str]) -> list[Any]:
    """Subscribe to each of *keys* in another thread; fail unless all return within BOUND."""
    subscriptions: list[Any] = []
    thread = threading.Thread(
        target=lambda: subscriptions.extend(listener.subscribe(k) for k in keys),
        daemon=True,
    )
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), "a subscriber is still waiting for a confirmation"
    return subscriptions


def test_a_quiet_healthy_connection_is_pinged_and_kept(clock: FakeClock) -> None:
    """With nothing to hear, the listener PINGs every _QUIET seconds; answered, it keeps the connection."""
    connections = Connections(silent=0)
    listener = make_listener(connections, clock)
    try:
        (subscription,) = subscribe_in_thread(listener, ["k"])
        assert subscription.settled.is_set()
        conn = connections.opened[0]
        for n in range(1, 6):  # 5 s in all: more than _QUIET + _DEAD
            clock.advance(_hub.QUIET)
            until(f"ping {n}", lambda: conn.pings() >= n)  # noqa: B023 - called at once
            until(f"pong {n}", lambda: listener._hub.asked is None)
        assert len(connections.opened) == 1
        assert not conn.is_closed()
        assert listener._hub.reconnects == 0
    finally:
        listener.stop()


def test_a_connection_that_stops_answering_is_replaced_within_five_seconds(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Silent after _QUIET (PING) plus _DEAD (no pong): replaced, resubscribed, one warning; 3 s < 5 s."""
    caplog.set_level(logging.INFO, logger="stampede_guard")
    assert _hub.QUIET + _hub.DEAD < 5
    connections = Connections(silent=0)
    listener = make_listener(connections, clock)
    try:
        subscribe_in_thread(listener, ["a", "b"])
        first = connections.opened[0]
        first.silent = True  # black-holed from now on
        clock.advance(_hub.QUIET)
        until("a ping", lambda: first.pings() == 1)
        assert not first.is_closed()  # the pong has _DEAD seconds yet
        clock.advance(_hub.DEAD)
        until("a new connection", lambda: len(connections.opened) == 2)
        until("a reconnection", lambda: listener._hub.reconnects == 1)
        assert first.is_closed()
        assert connections.opened[1].subscribes() == {
            listener._hub.codec.channel("a"),
            listener._hub.codec.channel("b"),
        }
        assert len(warnings_of(caplog)) == 1
    finally:
        listener.stop()


def test_an_unanswered_subscribe_gives_the_connection_up(clock: FakeClock) -> None:
    """A SUBSCRIBE left _DEAD seconds without a reply is enough: no PING needed to decide."""
    connections = Connections(silent=1)
    listener = make_listener(connections, clock)
    try:
        thread = threading.Thread(target=listener.subscribe, args=("k",), daemon=True)
        thread.start()
        until(
            "the SUBSCRIBE", lambda: connections.opened and connections.opened[0].sent
        )
        clock.advance(_hub.DEAD)
        until("a reconnection", lambda: listener._hub.reconnects == 1)
        thread.join(BOUND)
        assert connections.opened[0].pings() == 0
    finally:
        listener.stop()


def test_waiters_arriving_while_the_connection_is_dead_do_not_wait_for_a_confirmation(
    clock: FakeClock, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Known dead: subscribers return at once (no waited-out confirmation); one warning for two dead connections."""
    caplog.set_level(logging.INFO, logger="stampede_guard")
    # A subscriber that waited for its confirmation would outlast BOUND: one that
    # returns was let go by the listener, or never made to wait.
    monkeypatch.setattr(_listener, "_CONFIRM", 10 * BOUND)
    connections = Connections(silent=2)
    listener = make_listener(connections, clock)
    hub = listener._hub
    try:
        first = threading.Thread(
            target=listener.subscribe, args=("first",), daemon=True
        )
        first.start()
        until(
            "the SUBSCRIBE", lambda: connections.opened and connections.opened[0].sent
        )
        clock.advance(_hub.DEAD)  # the listener gives the connection up ...
        first.join(BOUND)
        assert not first.is_alive()  # ... and lets its waiting subscriber go
        until("the second connection", lambda: len(connections.opened) == 2)
        later = subscribe_in_thread(listener, [f"k{i}" for i in range(20)])
        assert all(s.settled.is_set() for s in later)
        assert hub.unconfirmed == 0
        assert hub.reconnects == 0
        until("the SUBSCRIBEs", lambda: len(connections.opened[1].subscribes()) == 21)
        clock.advance(_hub.DEAD)  # the second one is silent too; the third answers
        until("a reconnection", lambda: hub.reconnects == 1)
        assert len(connections.opened[2].subscribes()) == 21
        assert len(warnings_of(caplog)) == 1  # one outage, two dead connections
        after = subscribe_in_thread(listener, ["k0", "new"])
        assert all(s.settled.is_set() for s in after)
    finally:
        listener.stop()


def test_one_unconfirmed_subscribe_spares_the_next_waiters_the_wait(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first subscriber waits out its confirmation; until the server is heard again, later ones do not."""
    monkeypatch.setattr(_listener, "_CONFIRM", 0.05)
    connections = Connections(silent=1)
    listener = make_listener(connections, clock)
    try:
        subscribe_in_thread(listener, ["first"])
        assert listener._hub.unconfirmed == 1
        monkeypatch.setattr(_listener, "_CONFIRM", 10 * BOUND)
        later = subscribe_in_thread(listener, [f"k{i}" for i in range(20)])
        assert all(s.settled.is_set() for s in later)
        assert listener._hub.unconfirmed == 1
    finally:
        listener.stop()


def test_asyncio_waiters_arriving_while_the_connection_is_dead_do_not_wait(
    clock: FakeClock, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The asyncio listener: gives a silent connection up, lets waiters go, warns once, resubscribes."""
    caplog.set_level(logging.INFO, logger="stampede_guard")
    monkeypatch.setattr(_listener, "_CONFIRM", 10 * BOUND)
    connections = Connections(silent=1, kind=FakeAsyncPubSub)
    listener = AsyncListener(connections, RedisCodec("t", None), clock=clock)
    hub = listener._hub

    async def scenario() -> None:
        first = asyncio.create_task(listener.subscribe("first"))
        deadline = time.monotonic() + BOUND
        while not (connections.opened and connections.opened[0].sent):
            assert time.monotonic() < deadline, "no SUBSCRIBE"
            await asyncio.sleep(0.01)
        clock.advance(_hub.DEAD)
        await asyncio.wait_for(first, BOUND)
        later = await asyncio.wait_for(
            asyncio.gather(*(listener.subscribe(f"k{i}") for i in range(20))), BOUND
        )
        assert all(s.settled.is_set() for s in later)
        assert hub.unconfirmed == 0
        while hub.reconnects == 0:
            assert time.monotonic() < deadline + BOUND, "no reconnection"
            await asyncio.sleep(0.01)
        assert len(connections.opened[1].subscribes()) == 21
        await listener.stop()

    asyncio.run(scenario())
    assert len(warnings_of(caplog)) == 1


class CancelSwallowingPubSub(FakeAsyncPubSub):
    """Its first SUBSCRIBE hangs, then loses the cancellation that ends it.

    As Python 3.11's ``wait_for`` does when the cancellation lands just as what it
    awaits finishes: the task goes on as if nothing had happened.
    """

    entered: asyncio.Event

    async def subscribe(self, channel: str) -> None:  # type: ignore[override]
        self.entered.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()  # until cancelled
        await super().subscribe(channel)


@pytest.mark.timeout(30)
def test_stopping_the_asyncio_listener_survives_a_lost_cancellation() -> None:
    """stop() also asks the task to stop: a lost cancellation cannot keep it running."""

    async def main() -> None:
        CancelSwallowingPubSub.entered = asyncio.Event()
        connections = Connections(0, CancelSwallowingPubSub)
        listener = AsyncListener(connections, RedisCodec("t", None))
        waiter = asyncio.create_task(listener.subscribe("k"))
        await asyncio.wait_for(CancelSwallowingPubSub.entered.wait(), BOUND)
        task = listener._task
        assert task is not None
        stopping = asyncio.create_task(listener.stop())
        done, _ = await asyncio.wait({stopping, task}, timeout=BOUND)  # cancels neither
        if stopping not in done:
            task.cancel()  # a second cancellation: so that the test can end
            pytest.fail("stop() hung: the task went on listening")
        assert task.done()
        assert connections.opened[0].closed
        await asyncio.wait_for(waiter, BOUND)  # it polls: no confirmation came

    asyncio.run(main())
