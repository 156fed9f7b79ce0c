"""A module-level decorated function for `stampede(..., using="processes")`.

Spawned children import this module afresh, so it makes its backend on import, from
the environment the test sets before spawning.
"""

from __future__ import annotations

import os
import time

from stampede_guard import RedisBackend, cached_stampede_safe
from stampede_guard.testing import counted

backend = RedisBackend.from_url(
    os.environ["STAMPEDE_GUARD_WORKER_URL"],
    prefix=os.environ["STAMPEDE_GUARD_WORKER_PREFIX"],
)


@cached_stampede_safe(key="report", backend=backend, ttl=60, lock_timeout=10)
@counted
def cold_report() -> str:
    """Take a while, so that every other caller arrives meanwhile."""
    time.sleep(0.5)
    return "the report"
