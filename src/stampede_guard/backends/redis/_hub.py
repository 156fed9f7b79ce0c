"""The pub/sub listeners' shared state and decisions: who listens, and is the line alive.

No I/O: the thread of `Listener` and the task of `AsyncListener` carry out what `Hub`
decides (see ``_listener``), so the two never decide apart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from stampede_guard._near import Near
from stampede_guard.backends.redis._codec import RedisCodec

__all__ = ["DEAD", "QUIET", "Hub", "NearSubscription", "SilentError"]

logger = logging.getLogger("stampede_guard")

QUIET = 1.0  # seconds of silence on a subscribed connection before it is PINGed
DEAD = 2.0  # seconds a PING or (un)SUBSCRIBE may go unanswered: then it is dead


class SilentError(ConnectionError):
    """The pub/sub connection answered nothing for `DEAD` seconds."""


class NearSubscription:
    """The near cache's subscription to its channel: kept while the listener runs.

    Not a waiter: the hub tells the near cache itself when the channel is confirmed,
    lost, or brings a message (see `Hub`); the waiters' calls are no-ops here.
    """

    key = None

    def __init__(self, near: Near) -> None:
        self.near = near
        self.channel = near.channel

    def confirm(self) -> None:
        """Let a waiter go: nobody waits on this one."""

    def deliver(self, notice: object) -> None:
        """Not called: the hub routes this channel's messages to the near cache."""


class Hub:
    """Who listens to which channel, and how the connection is; no I/O, both listeners'.

    The health fields (*heard*, *asked*) are the listener's alone; the rest is shared
    with the waiters, under *mutex*.
    """

    def __init__(self, codec: RedisCodec, clock: Callable[[], float]) -> None:
        self.codec = codec
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new process: another thread may have held the mutex)."""
        self.mutex = threading.Lock()
        self.subscribers: dict[str, set[Any]] = {}
        self.confirmed: set[str] = set()
        self.heard = self.clock()  # when the server last said anything
        self.asked: float | None = None  # first request sent since, still unanswered
        self.trusted = True  # False: new subscribers do not wait for a confirmation
        self.outage: float | None = None  # when the current outage began
        self.reconnects = 0  # outages ended by a connection that answered
        self.unconfirmed = 0  # subscribers that waited out `_CONFIRM`
        self.near: Near | None = None  # the near cache told of its channel, if any

    def keep_near(self, near: Near) -> bool:
        """Subscribe *near*'s channel for good; return whether it needs a SUBSCRIBE."""
        self.near = near
        near.owner = self
        return self.add(NearSubscription(near))

    def stopped(self) -> None:
        """The listener stopped: a near cache is flushed, and asks again when used."""
        with self.mutex:
            near, self.near = self.near, None
            if near is not None:
                self.subscribers.pop(near.channel, None)
                self.confirmed.discard(near.channel)
        if near is not None and near.owner is self:
            near.stopped()

    def add(self, subscription: Any) -> bool:
        """Register *subscription*; return whether its channel needs a SUBSCRIBE.

        It is settled at once (its subscriber need not wait) if its channel is
        confirmed already, or if no confirmation is to be expected.
        """
        with self.mutex:
            subscribers = self.subscribers.setdefault(subscription.channel, set())
            subscribers.add(subscription)
            if subscription.channel in self.confirmed or not self.trusted:
                subscription.confirm()
            return len(subscribers) == 1

    def remove(self, subscription: Any) -> bool:
        """Forget *subscription*; return whether its channel needs an UNSUBSCRIBE."""
        with self.mutex:
            subscribers = self.subscribers.get(subscription.channel)
            if subscribers is None or subscription not in subscribers:
                return False
            subscribers.discard(subscription)
            if subscribers:
                return False
            del self.subscribers[subscription.channel]
            self.confirmed.discard(subscription.channel)
            return True

    def waited_out(self) -> None:
        """A subscriber's SUBSCRIBE went unconfirmed: later ones do not wait for theirs.

        Until the server is heard from again; meanwhile the listener's own check
        decides whether the connection is dead.
        """
        with self.mutex:
            self.trusted = False
            self.unconfirmed += 1

    def route(self, message: dict[str, Any]) -> None:
        """Act on one pub/sub message: a confirmation, or a notice to deliver."""
        self.heard, self.asked = self.clock(), None  # whatever it is, it is an answer
        near = self._our_near()
        if near is not None:
            near.heard(self.heard)
        kind, raw = message["type"], message["channel"]
        channel = raw.decode() if isinstance(raw, bytes) else str(raw)
        subscribers = self._answered(kind, channel)
        if self.near is not None and channel == self.near.channel:
            if near is not None:
                _tell_near(near, kind, message["data"])
        elif kind == "subscribe":
            for subscription in subscribers:
                subscription.confirm()
        elif kind == "message" and subscribers:
            notice = self.codec.notice(subscribers[0].key, message["data"])
            for subscription in subscribers:
                subscription.deliver(notice)

    def _our_near(self) -> Near | None:
        """The near cache, if this hub keeps its subscription (not a replaced one's)."""
        near = self.near
        return near if near is not None and near.owner is self else None

    def _answered(self, kind: str, channel: str) -> list[Any]:
        """The server answered: trust it again; return *channel*'s subscribers."""
        with self.mutex:
            self.trusted = True
            outage, self.outage = self.outage, None
            if outage is not None:
                self.reconnects += 1
            subscribers = list(self.subscribers.get(channel, ()))
            if kind == "subscribe":
                self.confirmed.add(channel)
            renewed = len(self.subscribers)
        if outage is not None:
            logger.info(
                "pub/sub listener reconnected after %.1f s; %d channel(s) resubscribed",
                self.heard - outage,
                renewed,
            )
        return subscribers

    def sent(self, *, anew: bool = False) -> None:
        """Note a request that the server must answer; *anew* after an idle spell."""
        if anew or self.asked is None:
            self.asked = self.clock()

    def ping_due(self) -> bool:
        """Return whether to PING the connection now.

        Raises:
            SilentError: A request has gone `DEAD` seconds unanswered.
        """
        now = self.clock()
        if self.asked is None:
            return now - self.heard >= QUIET
        if now - self.asked >= DEAD:
            raise SilentError
        return False

    def lost(self, error: Exception) -> list[str]:
        """The connection failed or fell silent: log, and return the channels to renew.

        Warns once per outage (a server that stays away fails every retry). The
        subscribers still waiting for a confirmation are let go: it will not come.
        """
        with self.mutex:
            self.confirmed.clear()
            self.trusted = False
            first = self.outage is None
            if first:
                self.outage = self.clock()
            waiting = [s for subs in self.subscribers.values() for s in subs]
            channels = list(self.subscribers)
            near = self.near
        if near is not None and near.owner is self:  # messages may be missed now
            near.flush("lost")
        for subscription in waiting:
            subscription.confirm()
        silent = isinstance(error, SilentError)
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "pub/sub listener %s; reconnecting, waiters poll meanwhile",
            f"heard nothing for {DEAD} s" if silent else "lost its connection",
            exc_info=None if silent else error,
        )
        return channels

    def may_stop(self, *, requests_pending: bool) -> bool:
        """Whether the listener, idle, may stop: nobody listens and nobody asked to.

        Both listeners ask it after a quiet spell and after closing a connection (a
        subscriber may have come meanwhile); the thread asks under its start lock.
        """
        return not requests_pending and not self.subscribers

    def opened(self) -> None:
        """A new connection: nothing asked on it yet."""
        self.heard, self.asked = self.clock(), None


def _tell_near(near: Near, kind: str, data: Any) -> None:
    """Route a message of the near cache's channel: its confirmation, or a changed key."""
    if kind == "subscribe":
        near.subscribed()
    elif kind == "message":
        near.invalidated(
            data if isinstance(data, str) else data.decode(errors="replace")
        )
