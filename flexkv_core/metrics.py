"""Prometheus metrics of one cache, and the same numbers as a plain dict for ``flexkv status``.

Every series carries an ``instance`` label (the cache's endpoint or name), so several caches in one
process (tests, several engines sharing a host process) each have their own series in one registry.
The metric families are created once per registry; `CacheMetrics` is the typed facade a cache calls.

Exposed (all prefixed ``flexkv_``; counters get Prometheus' ``_total`` suffix):

=========================  =========  ==========================================================
name                       type       labels (besides instance)
=========================  =========  ==========================================================
lookups                    counter    (one per lookup call)
lookup_blocks              counter    (blocks asked about)
lookup_found_blocks        counter    (of those, blocks a tier could serve: found / asked = hit ratio)
hit_blocks                 counter    tier
stored_blocks              counter    tier
evicted_blocks             counter    tier
bytes_moved                counter    direction
io_errors                  counter    tier
checksum_failures          counter
used_slots                 gauge      tier
capacity_slots             gauge      tier
pinned_blocks              gauge
transfer_seconds           histogram  direction
=========================  =========  ==========================================================

With metrics disabled (``FLEXKV_ENABLE_METRICS=0``) nothing is registered, but the facade still keeps
its totals, so ``snapshot()`` (and with it ``flexkv status``) works either way.
"""

from __future__ import annotations

import enum
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from .layout import Tier

if TYPE_CHECKING:
    from .config import FlexKVConfig

logger = logging.getLogger(__name__)


class Direction(str, enum.Enum):
    """Which way a transfer moved bytes."""

    ENGINE_TO_CPU = "engine_to_cpu"
    CPU_TO_ENGINE = "cpu_to_engine"
    CPU_TO_SSD = "cpu_to_ssd"
    SSD_TO_CPU = "ssd_to_cpu"
    REMOTE_TO_CPU = "remote_to_cpu"
    CPU_TO_PEER = "cpu_to_peer"  # blocks we lent: a peer read them out of our CPU slots


TIERS = tuple(t.value for t in Tier)
DIRECTIONS = tuple(d.value for d in Direction)

#: Transfers range from one block over shared memory (~100 us) to batches read from SSD (seconds).
TRANSFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class _Families:
    """The metric families of one registry (a name can be registered only once per registry)."""

    lookups: Counter
    lookup_blocks: Counter
    lookup_found_blocks: Counter
    hit_blocks: Counter
    stored_blocks: Counter
    evicted_blocks: Counter
    bytes_moved: Counter
    io_errors: Counter
    checksum_failures: Counter
    used_slots: Gauge
    capacity_slots: Gauge
    pinned_blocks: Gauge
    transfer_seconds: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> _Families:
        i, it, idir = ["instance"], ["instance", "tier"], ["instance", "direction"]
        r = registry
        return cls(
            lookups=Counter("flexkv_lookups", "Lookup calls", i, registry=r),
            lookup_blocks=Counter("flexkv_lookup_blocks", "Blocks asked about by lookups", i, registry=r),
            lookup_found_blocks=Counter("flexkv_lookup_found_blocks", "Leading blocks lookups found loadable",
                                        i, registry=r),
            hit_blocks=Counter("flexkv_hit_blocks", "Blocks served from a tier", it, registry=r),
            stored_blocks=Counter("flexkv_stored_blocks", "Blocks that became readable in a tier", it,
                                  registry=r),
            evicted_blocks=Counter("flexkv_evicted_blocks", "Blocks a tier dropped to make room", it,
                                   registry=r),
            bytes_moved=Counter("flexkv_bytes_moved", "Bytes copied, by direction", idir, registry=r),
            io_errors=Counter("flexkv_io_errors", "Failed reads or writes of a tier", it, registry=r),
            checksum_failures=Counter("flexkv_checksum_failures", "Blocks whose bytes failed their checksum",
                                      i, registry=r),
            used_slots=Gauge("flexkv_used_slots", "Slots holding a block", it, registry=r),
            capacity_slots=Gauge("flexkv_capacity_slots", "Slots a tier has", it, registry=r),
            pinned_blocks=Gauge("flexkv_pinned_blocks", "Blocks pinned by transfers in flight", i, registry=r),
            transfer_seconds=Histogram("flexkv_transfer_seconds", "Duration of one transfer (a batch)", idir,
                                       buckets=TRANSFER_BUCKETS, registry=r),
        )


_families: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()
_exporting: weakref.WeakKeyDictionary[CollectorRegistry, weakref.WeakSet[CacheMetrics]] = (
    weakref.WeakKeyDictionary())
_families_lock = threading.Lock()


def _register(registry: CollectorRegistry, metrics: CacheMetrics) -> _Families:
    """The families of ``registry`` (created on first use); warns when an instance name is taken."""
    with _families_lock:
        fam = _families.get(registry)
        if fam is None:
            fam = _families[registry] = _Families.create(registry)
        exporting = _exporting.setdefault(registry, weakref.WeakSet())
        if any(m.instance == metrics.instance for m in exporting):
            logger.warning("two live caches export metrics as instance=%r: their series are merged; give "
                           "each its own endpoint or name", metrics.instance)
        exporting.add(metrics)
    return fam


def _tier(tier: Tier | str) -> str:
    value = tier.value if isinstance(tier, Tier) else tier
    if value not in TIERS:
        raise ValueError(f"metrics tier {tier!r} is not one of {TIERS}")
    return value


def _direction(direction: Direction | str) -> str:
    value = direction.value if isinstance(direction, Direction) else direction
    if value not in DIRECTIONS:
        raise ValueError(f"metrics direction {direction!r} is not one of {DIRECTIONS}")
    return value


class CacheMetrics:
    """The metrics of one cache: call these from the cache; read `snapshot()` for status.

    ``enabled=False`` (the config's ``enable_metrics``) registers nothing in ``registry``; the totals
    are still kept for `snapshot`. Thread-safe.
    """

    def __init__(self, instance: str, registry: CollectorRegistry = REGISTRY, *, enabled: bool = True) -> None:
        self.instance = instance
        self.enabled = enabled
        self._registry = registry
        self._lock = threading.Lock()
        self._lookups = 0
        self._lookup_blocks = 0
        self._lookup_found = 0
        self._checksum_failures = 0
        self._pinned = 0
        self._hit = dict.fromkeys(TIERS, 0)
        self._stored = dict.fromkeys(TIERS, 0)
        self._evicted = dict.fromkeys(TIERS, 0)
        self._io_errors = dict.fromkeys(TIERS, 0)
        self._used = dict.fromkeys(TIERS, 0)
        self._capacity = dict.fromkeys(TIERS, 0)
        self._bytes = dict.fromkeys(DIRECTIONS, 0)
        self._transfers = dict.fromkeys(DIRECTIONS, 0)
        self._seconds = dict.fromkeys(DIRECTIONS, 0.0)
        self._fam: _Families | None = _register(registry, self) if enabled else None
        if self._fam is not None:
            self._create_series(self._fam)

    def _create_series(self, fam: _Families) -> None:
        # Touch every series once so that they are exported at 0 from the start: a rate() over a series
        # that appears only at its first increment misses that increment.
        for metric, labels in self._series(fam):
            metric.labels(*labels)

    def _series(self, fam: _Families):
        """Every (metric, label values) this instance exports."""
        inst = self.instance
        for m in (fam.lookups, fam.lookup_blocks, fam.lookup_found_blocks, fam.checksum_failures,
                  fam.pinned_blocks):
            yield m, (inst,)
        for m in (fam.hit_blocks, fam.stored_blocks, fam.evicted_blocks, fam.io_errors, fam.used_slots,
                  fam.capacity_slots):
            for tier in TIERS:
                yield m, (inst, tier)
        for m in (fam.bytes_moved, fam.transfer_seconds):
            for direction in DIRECTIONS:
                yield m, (inst, direction)

    # --- recording ----------------------------------------------------------------------------------

    def lookup(self, asked: int, found: int = 0) -> None:
        """One lookup asking about ``asked`` blocks, of which the leading ``found`` can be served."""
        with self._lock:
            self._lookups += 1
            self._lookup_blocks += asked
            self._lookup_found += found
        if self._fam is not None:
            self._fam.lookups.labels(self.instance).inc()
            self._fam.lookup_blocks.labels(self.instance).inc(asked)
            self._fam.lookup_found_blocks.labels(self.instance).inc(found)

    def hit(self, tier: Tier | str, n: int) -> None:
        """``n`` blocks served from ``tier`` (loaded instead of recomputed)."""
        self._count(self._hit, "hit_blocks", _tier(tier), n)

    def stored(self, tier: Tier | str, n: int) -> None:
        self._count(self._stored, "stored_blocks", _tier(tier), n)

    def evicted(self, tier: Tier | str, n: int) -> None:
        self._count(self._evicted, "evicted_blocks", _tier(tier), n)

    def io_error(self, tier: Tier | str, n: int = 1) -> None:
        self._count(self._io_errors, "io_errors", _tier(tier), n)

    def checksum_failure(self, n: int = 1) -> None:
        with self._lock:
            self._checksum_failures += n
        if self._fam is not None:
            self._fam.checksum_failures.labels(self.instance).inc(n)

    def moved(self, direction: Direction | str, nbytes: int, seconds: float | None = None) -> None:
        """One transfer of ``nbytes`` in ``direction``, taking ``seconds`` (if timed: the histogram only sees
        timed transfers, the ``transfers`` count sees them all)."""
        d = _direction(direction)
        with self._lock:
            self._bytes[d] += nbytes
            self._transfers[d] += 1
            if seconds is not None:
                self._seconds[d] += seconds
        if self._fam is not None:
            self._fam.bytes_moved.labels(self.instance, d).inc(nbytes)
            if seconds is not None:
                self._fam.transfer_seconds.labels(self.instance, d).observe(seconds)

    def set_usage(self, tier: Tier | str, used: int, capacity: int) -> None:
        t = _tier(tier)
        with self._lock:
            self._used[t] = used
            self._capacity[t] = capacity
        if self._fam is not None:
            self._fam.used_slots.labels(self.instance, t).set(used)
            self._fam.capacity_slots.labels(self.instance, t).set(capacity)

    def set_pinned(self, n: int) -> None:
        with self._lock:
            self._pinned = n
        if self._fam is not None:
            self._fam.pinned_blocks.labels(self.instance).set(n)

    def _count(self, totals: dict[str, int], family: str, tier: str, n: int) -> None:
        if n < 0:
            raise ValueError(f"metrics {family}: a count cannot go down, got {n}")
        with self._lock:
            totals[tier] += n
        if self._fam is not None:
            getattr(self._fam, family).labels(self.instance, tier).inc(n)

    # --- reading ------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The totals as plain data (msgpack/JSON-ready), the shape ``flexkv status`` renders."""
        with self._lock:
            return {
                "instance": self.instance,
                "lookups": self._lookups,
                "lookup_blocks": self._lookup_blocks,
                "lookup_found_blocks": self._lookup_found,
                "hit_blocks": dict(self._hit),
                "stored_blocks": dict(self._stored),
                "evicted_blocks": dict(self._evicted),
                "io_errors": dict(self._io_errors),
                "checksum_failures": self._checksum_failures,
                "used_slots": dict(self._used),
                "capacity_slots": dict(self._capacity),
                "pinned_blocks": self._pinned,
                "bytes_moved": dict(self._bytes),
                "transfers": dict(self._transfers),
                "transfer_seconds": dict(self._seconds),
            }

    def close(self) -> None:
        """Remove this instance's series from the registry (a closed cache stops being exported)."""
        fam, self._fam = self._fam, None
        if fam is None:
            return
        for metric, labels in self._series(fam):
            metric.remove(*labels)
        with _families_lock:
            _exporting.get(self._registry, weakref.WeakSet()).discard(self)


def make_metrics(config: FlexKVConfig, instance: str, registry: CollectorRegistry = REGISTRY) -> CacheMetrics:
    """The metrics of one cache as the config asks: exported unless ``FLEXKV_ENABLE_METRICS=0``."""
    return CacheMetrics(instance, registry, enabled=config.enable_metrics)


def start_metrics_server(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> Any:
    """Serve ``/metrics`` over HTTP on ``port`` (a daemon thread); returns the server (``.shutdown()``)."""
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as e:
        raise OSError(e.errno, f"cannot serve flexkv metrics on {addr}:{port}: {e.strerror}") from None
    logger.info("flexkv metrics at http://%s:%d/metrics", addr, port)
    return server
