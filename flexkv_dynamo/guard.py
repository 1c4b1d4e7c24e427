"""What happens when our own code fails inside a vLLM connector callback: the engine must not notice.

vLLM calls the connector from its scheduler loop and its model runner; an exception escaping one of those
calls aborts every request of the engine, or kills it. So `FlexKVConnector` catches every exception of
its callbacks at its boundary and answers vLLM with a safe degraded value instead (a miss, a load error,
no store, no event: see each callback in `flexkv_dynamo.connector`), never a hang and never wrong bytes.
This module holds the two pieces that boundary uses:

* `CallbackFailures` logs each failure once, naming the callback and the requests involved (with the
  traceback the first time a callback fails, one line afterwards, so that a failure repeated every step
  cannot flood the log), and counts it. The count reaches vLLM's Prometheus endpoint as
  ``vllm:flexkv_connector_errors`` through the connector's stats.
* `FaultInjector` is a test-only switch: with ``FLEXKV_TEST_FAULTS=1`` in the environment where a
  connector is built, that connector gets an injector whose named points (one per callback, see
  `FAULT_POINTS`) can be armed to raise `InjectedFault`; ``FLEXKV_TEST_FAULTS=point,point`` also arms
  those points for good from the start (``register_kv_caches`` runs before a test could arm it).
  Without the variable the connector holds None and each point costs one attribute test.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Mapping

log = logging.getLogger("flexkv_dynamo.connector")

__all__ = ["FAULTS_ENV", "FAULT_POINTS", "CallbackFailures", "FaultInjector", "InjectedFault"]

#: The environment variable that gives a connector a `FaultInjector` (tests only).
FAULTS_ENV = "FLEXKV_TEST_FAULTS"

#: Every point a fault can be injected at: one per connector callback that runs our code.
FAULT_POINTS = (
    # scheduler side
    "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta", "update_connector_output",
    "request_finished", "take_events", "has_pending_push_work", "get_kv_connector_stats", "reset_cache",
    # worker side
    "register_kv_caches", "start_load_kv", "wait_for_save", "get_finished", "get_block_ids_with_load_errors",
    "build_connector_worker_meta",
)

#: Most request ids one log line names.
_MAX_IDS = 8


class InjectedFault(RuntimeError):
    """Raised at an armed fault point (tests only)."""


class FaultInjector:
    """Named points that raise `InjectedFault` while armed. Thread-safe: worker and scheduler sides of
    an in-process engine share nothing else, but tests arm points from their own thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[str, int] = {}
        self.fired: Counter[str] = Counter()

    @staticmethod
    def from_env(env: Mapping[str, str] = os.environ) -> FaultInjector | None:
        raw = env.get(FAULTS_ENV, "0").strip()
        if raw in ("", "0"):
            return None
        points = [] if raw == "1" else [p.strip() for p in raw.split(",") if p.strip()]
        unknown = [p for p in points if p not in FAULT_POINTS]
        if unknown:
            raise ValueError(f"{FAULTS_ENV}={raw!r}: unknown fault points {unknown}; use 1 (tests only: makes "
                             f"fault points armable), or a comma-separated list of {FAULT_POINTS}")
        log.warning("%s=%s: connector fault injection is on (a test-only switch)", FAULTS_ENV, raw)
        injector = FaultInjector()
        for point in points:
            injector.arm(point, times=1 << 62)  # fails on every call, for good
        return injector

    def arm(self, point: str, times: int = 1) -> None:
        """Make the next ``times`` passes through ``point`` raise."""
        if point not in FAULT_POINTS:
            raise ValueError(f"unknown fault point {point!r}; known: {FAULT_POINTS}")
        with self._lock:
            self._armed[point] = self._armed.get(point, 0) + times

    def disarm(self) -> None:
        with self._lock:
            self._armed.clear()

    def armed(self, point: str) -> int:
        with self._lock:
            return self._armed.get(point, 0)

    def check(self, point: str) -> None:
        """Raise `InjectedFault` if ``point`` is armed (and count one pass off)."""
        with self._lock:
            left = self._armed.get(point, 0)
            if left <= 0:
                return
            self._armed[point] = left - 1
            self.fired[point] += 1
        raise InjectedFault(f"fault injected at {point}")


class CallbackFailures:
    """Logs and counts the failures caught at the connector boundary (see the module docstring)."""

    def __init__(self, side: str) -> None:
        self.side = side  # "scheduler" or "worker", for the log
        self._lock = threading.Lock()
        self._seen: set[str] = set()  # callbacks whose traceback was logged already
        self._uncounted = 0  # failures not yet handed to vLLM's stats
        self.total: Counter[str] = Counter()  # failures per callback since start (tests, status)

    def record(self, callback: str, req_ids: Iterable[str], exc: BaseException, degraded: str) -> None:
        """One failure of ``callback`` concerning ``req_ids``, answered to vLLM with ``degraded``."""
        ids = sorted(set(req_ids))
        named = ", ".join(ids[:_MAX_IDS]) + (f" and {len(ids) - _MAX_IDS} more" if len(ids) > _MAX_IDS else "")
        with self._lock:
            first = callback not in self._seen
            self._seen.add(callback)
            self._uncounted += 1
            self.total[callback] += 1
        log.error("FlexKV %s callback %s failed (requests: %s): %s: %s; answered vLLM with %s",
                  self.side, callback, named or "none", type(exc).__name__, exc, degraded,
                  exc_info=exc if first else None)

    def take_count(self) -> int:
        """Failures since the last call (for vLLM's stats, which sum them)."""
        with self._lock:
            n, self._uncounted = self._uncounted, 0
            return n
