"""What a store that stalls costs the leader's caller, after its computation.

The fault: with writes paused (`CLIENT PAUSE <ms> WRITE`, as during a failover) while
the leader computed, its caller used to wait the computation plus two socket timeouts: the
store's, then the lock release's. This script pauses writes from inside the
computation, for longer than the socket timeout, and times the caller from the end of
the computation to its return; the release now goes on apart, so the figure should sit
at one socket timeout.

    uv run benchmarks/stalled_store.py [--rounds 10] [--socket-timeout 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import redis

from redis_server import RedisServer
from stampede_guard import RedisBackend, cached_stampede_safe


def main() -> None:
    """Measure, then print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--socket-timeout", type=float, default=0.5)
    args = parser.parse_args()
    timeout: float = args.socket_timeout
    pause_ms = int(timeout * 4 * 1000)  # outlasts the store and the release alike
    after: list[float] = []
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        backend = RedisBackend.from_url(server.url, socket_timeout=timeout)
        computed_at: list[float] = []
        for n in range(args.rounds):

            @cached_stampede_safe(key=f"stall:{n}", backend=backend)
            def compute() -> int:
                admin.client_pause(pause_ms, all=False)
                computed_at.append(time.perf_counter())
                return 1

            compute()
            after.append(time.perf_counter() - computed_at[-1])
            admin.client_unpause()
            sys.stderr.write(f"round {n + 1}/{args.rounds}\r")
        backend.close()
        admin.close()
    sys.stderr.write("\n")
    rows = [
        ("socket timeout", f"{timeout:.3f}"),
        ("caller after the computation, median", f"{statistics.median(after):.3f}"),
        ("caller after the computation, max", f"{max(after):.3f}"),
        (
            "ratio of the median to the socket timeout",
            f"{statistics.median(after) / timeout:.2f}",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    sys.stdout.write(f"{'seconds':<{width}}  value\n")
    for name, value in rows:
        sys.stdout.write(f"{name:<{width}}  {value:>6}\n")


if __name__ == "__main__":
    main()
