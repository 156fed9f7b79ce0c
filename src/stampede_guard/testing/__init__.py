"""Testing helpers: backend conformance suites and tools for concurrency tests.

* `BackendContract` and `AsyncBackendContract`: pytest suites every backend must pass.
  Subclass one in your tests and define a ``backend`` fixture returning a fresh backend:

  ```python
  import pytest
  from stampede_guard.testing import BackendContract


  class TestMyBackend(BackendContract):
      @pytest.fixture
      def backend(self) -> MyBackend:
          return MyBackend(...)
  ```

* `stampede` (`astampede` inside a running loop): release N callers of a decorated
  function at once, in threads, tasks or processes, and get a `StampedeResult` of
  values, errors and computations, counted by the `counted` wrapper under the
  decorator.
* `joiners` and `wait_for_joiners`: how many callers of a decorated function joined
  the call of a key in progress in this process, to release a computation only once
  every caller shares it.
* `VirtualClock`: time that moves when the test says, for `MemoryBackend`'s expiry and
  the decorator's freshness.
* `stampede_guard.testing.strategies.interleavings` (needs hypothesis, the ``testing``
  extra): lists of `Call`, `Invalidate`, `Refresh` and `Advance` operations, which
  `perform` carries out.

See the "Testing your code" page of the documentation for a complete example.
"""

from __future__ import annotations

from stampede_guard.testing._clock import VirtualClock
from stampede_guard.testing._contract import AsyncBackendContract, BackendContract
from stampede_guard.testing._interleaving import (
    Advance,
    Call,
    Invalidate,
    Operation,
    Refresh,
    perform,
)
from stampede_guard.testing._joiners import joiners, wait_for_joiners
from stampede_guard.testing._stampede import (
    Counted,
    StampedeResult,
    astampede,
    counted,
    counter_of,
    stampede,
)

__all__ = [
    "Advance",
    "AsyncBackendContract",
    "BackendContract",
    "Call",
    "Counted",
    "Invalidate",
    "Operation",
    "Refresh",
    "StampedeResult",
    "VirtualClock",
    "astampede",
    "counted",
    "counter_of",
    "joiners",
    "perform",
    "stampede",
    "wait_for_joiners",
]
