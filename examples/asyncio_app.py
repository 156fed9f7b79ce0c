"""An asyncio service whose handler is stampede-safe: 500 concurrent requests, 1 upstream call.

    uv run examples/asyncio_app.py                       # in memory
    uv run examples/asyncio_app.py --redis-url redis://127.0.0.1:6379/0

The same `@cached_stampede_safe` works on ``async def``; with ``--redis-url`` it uses
`AsyncRedisBackend`, so several copies of this service would share one computation.
In a FastAPI app, put the decorator on the function your endpoint awaits.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from stampede_guard import (
    AsyncRedisBackend,
    MemoryBackend,
    StampedeStats,
    cached_stampede_safe,
)

UPSTREAM_SECONDS = 0.2
MAX_REQUESTS = 100_000


async def serve(requests: int, backend: MemoryBackend | AsyncRedisBackend) -> int:
    """Answer *requests* concurrent requests for one product; return the upstream calls."""
    upstream_calls = 0
    stats = StampedeStats()

    @cached_stampede_safe(key="price:{sku}", ttl=60, backend=backend, metrics=stats)
    async def price(sku: str) -> dict[str, object]:
        nonlocal upstream_calls
        upstream_calls += 1
        await asyncio.sleep(UPSTREAM_SECONDS)  # a slow pricing service
        return {"sku": sku, "cents": 1999}

    async def handle_request(sku: str) -> int:
        quote = await price(sku)
        return int(str(quote["cents"]))

    await price.invalidate("SKU-42")  # start cold, as after a deploy
    answers = await asyncio.gather(*(handle_request("SKU-42") for _ in range(requests)))
    snap = stats.snapshot()
    print(f"{'requests':<16}{len(answers):>8}")
    print(f"{'upstream calls':<16}{upstream_calls:>8}")
    print(f"{'cache hits':<16}{snap.hits:>8}")
    print(f"{'average wait':<16}{snap.average_wait_seconds * 1000:>6.0f} ms")
    return upstream_calls


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; exit 1 if the upstream was called more than once."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", "-r", type=int, default=500)
    parser.add_argument("--redis-url", help="use AsyncRedisBackend on this Redis")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be between 1 and {MAX_REQUESTS}")

    async def run() -> int:
        if args.redis_url is None:
            return await serve(args.requests, MemoryBackend())
        backend = AsyncRedisBackend.from_url(args.redis_url, prefix="sg-example")
        try:
            return await serve(args.requests, backend)
        finally:
            await backend.aclose()

    return 0 if asyncio.run(run()) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
