"""`TieredCache`: the scheduler-side owner of our tiers, and the one API the engine connector talks to.

It never touches engine (GPU) memory: the engine's workers copy between their KV cache and the CPU pool slots
a plan names (see `flexkv_core.transfer.BlockCopier`), then tell the cache how it went.

Block life cycle::

    reserve_store -> (engine copies engine->CPU slot) -> complete_store -> CPU READY -> write-back -> SSD READY
    lookup -> prepare_load (SSD-only blocks staged into CPU slots) -> ready -> (engine copies) -> finish_load

The cache is split like vLLM's offloading manager and workers, one idea per module:

* `placement.Placement` (with `index.PrefixIndex`): what lives where, which slot a block gets, who makes room;
* `staging.TierIO`: the bytes moving between CPU, SSD and peers, and what their completions change;
* `events.TierEvents`: the Stored / Removed events those changes produce, and re-announcement;
* `exports.Lending`: lending our blocks to peers (distributed reuse);
* this module: the plans (`plans.py`) and the lock that makes it all one consistent state.

Every change happens under one lock, which the engine's scheduler thread takes on every step: nobody else
may hold it for long. Work that grows with the size of the cache (status, resets, re-announcement, the
distributed index's snapshot) walks the rows a chunk at a time; I/O completions apply a chunk of blocks per
hold; only the calling thread's own batch (a request's chain) is ever done in one hold.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from .config import FlexKVConfig
from .events import CacheCleared, CacheEvent, EventLog, TierEvents
from .exports import Lending
from .index import ABSENT, FILLING, READY, LookupResult, parents_first
from .layout import CacheIdentity, Tier
from .metrics import CacheMetrics, make_metrics
from .placement import Placement
from .plans import FROM_CPU, FROM_REMOTE, FROM_SSD, LoadPlan, StorePlan
from .remote import RemoteSource
from .staging import TierIO
from .tiers.cpu import CpuPool
from .tiers.manifest import SlotRecord
from .tiers.ssd import SsdStore

log = logging.getLogger(__name__)

__all__ = ["LoadPlan", "LookupResult", "StorePlan", "TieredCache"]

#: Rows one hold of the lock covers in walks over the whole index (resets, evict_all: Removed events).
WALK_ROWS = 256
#: Rows per hold when the distributed index's snapshot is taken (hashes copied out).
SUBSCRIBE_ROWS = 4096
#: Rows a re-announcement covers per hold of the lock (it copies token ids out).
REANNOUNCE_ROWS = 32
#: Scheduler-thread time one `take_events` call spends continuing a re-announcement.
REANNOUNCE_BUDGET_S = 0.005
#: Usage gauges are refreshed at most this often (and by every `stats()`).
USAGE_EVERY_S = 0.05


class TieredCache:
    def __init__(self, config: FlexKVConfig, identity: CacheIdentity, *, pool_name: str | None = None,
                 metrics: CacheMetrics | None = None, remote: RemoteSource | None = None,
                 keep_remote: bool = True, lock: threading.RLock | None = None) -> None:
        self.config = config
        self.identity = identity
        self.layout = identity.layout
        self.block_size = self.layout.block_size
        slot_bytes = self.layout.slot_bytes
        cpu_slots = config.cpu_cache_bytes // slot_bytes
        if cpu_slots < 1:
            raise ValueError(f"FLEXKV_CPU_CACHE_GB={config.cpu_cache_gb} holds no block of {slot_bytes} bytes "
                             f"({identity.describe()}); allowed: at least {slot_bytes / 2**30:.6f}")
        self.metrics = metrics or make_metrics(config, instance=pool_name or config.server_recv_port)
        self.lock = lock if lock is not None else threading.RLock()  # tests and benchmarks may pass their own
        self.events = EventLog()
        # Engines killed with SIGKILL leave their pools in /dev/shm; sweep those of dead owners first.
        CpuPool.remove_stale()
        self.pool = CpuPool.create(cpu_slots, slot_bytes, name=pool_name)
        self.pool_name = self.pool.name
        self.ssd: SsdStore | None = None
        try:
            if config.ssd_enabled:
                self.ssd = SsdStore(config.ssd_cache_dir, config.ssd_cache_bytes, slot_bytes, identity,
                                    config.max_file_bytes, io_threads=config.ssd_io_threads)
        except BaseException:
            self.pool.close()
            raise
        ssd_slots = self.ssd.num_slots if self.ssd is not None else 0
        self.tier_events = TierEvents(self.events, self.block_size)
        self.placement = Placement(config, cpu_slots=cpu_slots, ssd_slots=ssd_slots, block_size=self.block_size,
                                   metrics=self.metrics, observer=self.tier_events,
                                   forget_ssd=self.ssd.forget if self.ssd is not None else None)
        self.index = self.placement.index
        self.tier_events.bind(self.index, self.placement.tokens, self._ssd_tokens)
        self.io = TierIO(self.lock, self.placement, self.pool, self.ssd, self.metrics, slot_bytes, self._publish_usage)
        self.placement.write_sink = self.io.enqueue_write
        self.lending = Lending(self)
        self._jobs = itertools.count(1)
        self._stores: dict[int, StorePlan] = {}
        self.remote = remote
        self.keep_remote = keep_remote  # index fetched blocks as our own CPU blocks (else scratch only)
        self._closed = False
        self._usage_at = 0.0
        if self.ssd is not None:
            self._recover(self.ssd.recovered())
        self._publish_usage(force=True)
        log.info("tiered cache ready: %s; CPU %d slots of %d B (pool %s), SSD %d slots",
                 identity.describe(), cpu_slots, slot_bytes, self.pool_name, ssd_slots)

    # ---- lookups ---------------------------------------------------------------------------------

    def lookup(self, block_hashes: Sequence[int]) -> LookupResult:
        """How many leading blocks each tier can serve. Changes nothing."""
        with self.lock:
            result = self.index.lookup(block_hashes)
        if self.remote is not None and result.total < len(block_hashes):
            extra = self.remote.lookup(block_hashes[result.total:])
            if extra:
                result = LookupResult(cpu=result.cpu, ssd=result.ssd, total=result.total + extra, remote=extra)
        self.metrics.lookup(len(block_hashes), result.total)
        return result

    # ---- stores ----------------------------------------------------------------------------------

    def reserve_store(self, block_hashes: Sequence[int], parent_hash: int | None,
                      token_ids: Sequence[int] | np.ndarray) -> StorePlan:
        """CPU slots for the blocks of a chain the CPU tier does not hold yet (``parent_hash``: the block before
        the first one). Stops at the first block that gets no slot: see `StorePlan.covered`."""
        n, bs = len(block_hashes), self.block_size
        if len(token_ids) < n * bs:
            raise ValueError(f"{n} blocks need {n * bs} token ids, got {len(token_ids)}")
        keys = _as_hashes(block_hashes)
        tokens = np.asarray(token_ids[:n * bs], dtype=np.uint32).reshape(n, bs)
        with self.lock:
            index = self.index
            guard = np.empty(0, np.int32)
            if parent_hash is not None:
                guard = index.find([parent_hash])
                if guard[0] < 0 or not self._held(guard)[0]:
                    # The parent is in none of our tiers: blocks chained onto it could never be loaded.
                    return StorePlan(next(self._jobs), [], [], [], covered=0, pool=self.pool_name)
            rows = index.find(keys)
            held = rows >= 0
            held[held] = index.state(Tier.CPU, rows[held]) != ABSENT  # in, or on its way to, the CPU tier
            keep = rows[held]
            if keep.size:
                # Refreshed, and pinned so that making room for the rest cannot evict them.
                index.touch(keep, hit=False)
                index.pin(Tier.CPU, keep)
            want = np.flatnonzero(~held)
            # Making room may evict: pin the parent's ready copies meanwhile, so the chain keeps its first link.
            pinned = {tier: guard[index.state(tier, guard) == READY] for tier in (Tier.CPU, Tier.SSD)}
            for tier, prow in pinned.items():
                index.pin(tier, prow)
            slots = self.placement.allocate(Tier.CPU, want.size)
            for tier, prow in pinned.items():
                index.unpin(tier, prow)
            covered = n if slots.size == want.size else int(want[slots.size])
            want = want[:slots.size]
            new = np.empty(0, np.int32)
            if want.size:
                parents = keys[np.maximum(want - 1, 0)].tolist()
                if want[0] == 0:
                    parents[0] = parent_hash
                new = index.begin_fill(Tier.CPU, keys[want], slots, parents)
                self.placement.fill_cpu(slots, tokens[want])
            if keep.size:
                index.unpin(Tier.CPU, keep)
            plan = StorePlan(next(self._jobs), keys[want].tolist(), slots.tolist(), want.tolist(), covered=covered,
                             pool=self.pool_name, _rows=new)
            if want.size:
                self._stores[plan.job_id] = plan
            self._publish_usage()
            return plan

    def complete_store(self, plan: StorePlan, ok: bool = True) -> int:
        """The engine finished copying ``plan`` (``ok``) or gave up: publish or roll back. A block is published
        only if its parent is stored in one of our tiers by then (another job storing the parent may have
        failed, or not finished yet): it
        and the rest of the plan are rolled back otherwise, so no announced block lacks its parent. Returns how
        many leading blocks of the plan were published."""
        if not plan.block_hashes:
            return 0
        with self.lock:
            if self._stores.pop(plan.job_id, None) is None:
                raise ValueError(f"store job {plan.job_id} is not pending")
            rows = plan._rows
            good = self._publishable(rows, plan.positions) if ok else 0
            if good:
                self.index.finish_fill(Tier.CPU, rows[:good])
                self.metrics.stored(Tier.CPU, good)
                self.metrics.moved("engine_to_cpu", good * self.layout.slot_bytes)
                self.placement.write_back(rows[:good])
            if good < rows.size:
                self.placement.free(Tier.CPU, self.index.abort_fill(Tier.CPU, rows[good:]))
            self._publish_usage()
            return good

    def _held(self, rows: np.ndarray) -> np.ndarray:
        """Per row: is the block in (or on its way to) one of our tiers?"""
        return (self.index.state(Tier.CPU, rows) != ABSENT) | (self.index.state(Tier.SSD, rows) != ABSENT)

    def _publishable(self, rows: np.ndarray, positions: list[int]) -> int:
        """How many leading blocks of a store have their parent stored (READY in a tier). A block right after the previous one of
        the plan chains onto it; the others chain onto a block that was held at reserve time and may have
        failed to arrive since."""
        pos = np.asarray(positions)
        first = np.ones(rows.size, bool)
        first[1:] = pos[1:] != pos[:-1] + 1
        at = np.flatnonzero(first)
        prow = self.index.parents(rows[at])
        ok = prow < 0
        # READY, not merely held: a parent still on its way (another store in flight, possibly completing
        # later, possibly failing) would be announced after its child, and the router drops such a child.
        ok[~ok] = ((self.index.state(Tier.CPU, prow[~ok]) == READY) | (self.index.state(Tier.SSD, prow[~ok]) == READY))
        bad = at[~ok]
        return int(bad[0]) if bad.size else int(rows.size)

    # ---- loads -----------------------------------------------------------------------------------

    def prepare_load(self, block_hashes: Sequence[int], *, use_remote: bool = True, lend: bool = False) -> LoadPlan:
        """Pin a loadable prefix. SSD-only blocks are read into fresh CPU slots, and blocks only peers hold
        are fetched into fresh CPU slots, both in the background; ``ready`` resolves when all arrived.
        ``lend``: the plan serves a peer (`export`), not our engine."""
        with self.lock:
            plan, stage, fetch = self._plan_load(block_hashes, use_remote and not lend, lend)
        if stage is not None:
            self.io.stage(plan, *stage)
        if fetch is not None:
            self.io.fetch(plan, self.remote, *fetch)
        return plan

    def _plan_load(self, block_hashes: Sequence[int], use_remote: bool, lend: bool) -> tuple:
        index, io = self.index, self.io
        plan = LoadPlan(next(self._jobs), [], [], pool=self.pool_name, _lent=lend)
        rows = index.find(block_hashes, prefix=True)
        cpu = index.state(Tier.CPU, rows)
        # Loadable: READY in CPU, being staged into CPU by another load (we join it), or READY on SSD with no
        # CPU copy on its way (a copy being *stored* cannot be read yet).
        joining = np.zeros(rows.size, bool)
        if io.staging:
            for i in np.flatnonzero(cpu == FILLING).tolist():
                joining[i] = int(rows[i]) in io.staging
        loadable = (cpu == READY) | joining | ((cpu == ABSENT) & (index.state(Tier.SSD, rows) == READY))
        n = int(loadable.argmin()) if not loadable.all() else rows.size
        rows, cpu, joining = rows[:n], cpu[:n], joining[:n]
        in_cpu = (cpu == READY) | joining
        # Pin the CPU copies first so that making room for staging cannot evict them ...
        index.pin(Tier.CPU, rows[in_cpu])
        missing = np.flatnonzero(~in_cpu)
        # ... and the SSD copies to stage: making CPU room can demote CPU blocks to SSD, whose SSD room must not
        # come from the very blocks we are about to read.
        index.pin(Tier.SSD, rows[missing])
        slots = self.placement.allocate(Tier.CPU, missing.size)
        whole = slots.size == missing.size
        if not whole:  # keep the prefix up to the first block we cannot stage
            cut = int(missing[slots.size])
            index.unpin(Tier.CPU, rows[cut:][in_cpu[cut:]])
            index.unpin(Tier.SSD, rows[missing[slots.size:]])
            rows, in_cpu, joining, missing = rows[:cut], in_cpu[:cut], joining[:cut], missing[:slots.size]
        for r in rows[joining].tolist():
            io.staging[r].append(plan)
        if missing.size:
            staged = rows[missing]
            index.begin_fill_rows(Tier.CPU, staged, slots)
            index.pin(Tier.CPU, staged)
            for r in staged.tolist():
                io.staging[r] = []
        index.touch(rows)
        own = rows.size
        # Past our own prefix, peers may continue it: fetch into fresh CPU slots.
        fetch_hashes: list[int] = []
        if use_remote and self.remote is not None and whole and own < len(block_hashes):
            rest = list(block_hashes[own:])
            k = self.remote.lookup(rest)
            scratch = self.placement.allocate(Tier.CPU, k) if k else np.empty(0, np.int32)
            fetch_hashes = rest[:scratch.size]
            plan._fetch_slots = scratch.tolist()
        total = own + len(fetch_hashes)
        plan.block_hashes = [int(h) for h in block_hashes[:own]] + fetch_hashes
        plan.slots = index.slots(Tier.CPU, rows).tolist() + plan._fetch_slots
        plan._rows = np.concatenate([rows, np.full(len(fetch_hashes), -1, np.int32)])
        plan._pinned = np.concatenate([np.ones(own, bool), np.zeros(len(fetch_hashes), bool)])
        plan._source = np.full(total, FROM_REMOTE, np.uint8)
        plan._source[:own] = np.where(in_cpu & ~joining, FROM_CPU, FROM_SSD)
        plan.tier_hits = plan.count_tiers(total)
        plan._parts = bool(missing.size) + bool(fetch_hashes) + int(joining.sum())
        self._publish_usage()
        if not plan._parts:
            plan._usable = total
            plan.ready.set_result(total)
        stage = None
        if missing.size:
            staged = rows[missing]
            stage = (staged, missing, slots, index.slots(Tier.SSD, staged))
        fetch = (fetch_hashes, plan._fetch_slots, self.keep_remote) if fetch_hashes else None
        return plan, stage, fetch

    def finish_load(self, plan: LoadPlan, copied: int | None = None) -> None:
        """The engine is done with ``plan`` (copied, aborted or failed): release its pins. ``copied``: how many
        leading blocks the engine actually copied (default: every usable one; 0 for an abort or a failed copy),
        which is what the hit and byte counters count."""
        with self.lock:
            if plan._finished:
                return
            plan._finished = True
            if plan._usable is None:  # still staging: the pins go when it ends; nothing was delivered
                return
            n = plan._usable if copied is None else max(0, min(copied, plan._usable))
            if n and plan._lent:
                self.metrics.moved("cpu_to_peer", n * self.layout.slot_bytes)
            elif n:
                self.metrics.moved("cpu_to_engine", n * self.layout.slot_bytes)
                for tier, count in plan.count_tiers(n).items():
                    if count:
                        self.metrics.hit(tier, count)
            self.io.release(plan)

    # ---- maintenance -----------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for background SSD write-back, completions applied (indexed, CPU copies unpinned). True if
        everything finished in time."""
        return self.io.flush(timeout)

    def evict_all(self, tier: Tier) -> int:
        """Drop every unpinned READY copy in ``tier`` (operators, tests). Returns how many. Walks the index a
        chunk of rows per hold of the lock."""
        return self._walk_rows(lambda a, b: self.placement.remove_unpinned(tier, a, b))

    def reset(self) -> None:
        """Forget everything not in use: Removed per tier, then CacheCleared."""
        self.flush(timeout=30)
        for tier in (Tier.CPU, Tier.SSD):
            self.evict_all(tier)
        with self.lock:
            self.events.emit(CacheCleared(tiers=[Tier.CPU, Tier.SSD]))
            self._publish_usage()

    def _walk_rows(self, fn: Callable[[int, int], int], rows: int = WALK_ROWS) -> int:
        done, start = 0, 0
        while True:
            with self.lock:
                end = self.index.rows_in_use
                if start >= end:
                    self._publish_usage(force=True)
                    return done
                done += fn(start, min(start + rows, end))
            start += rows

    # ---- events ----------------------------------------------------------------------------------

    def take_events(self) -> list[CacheEvent]:
        """The events since the last call (a re-announcement in progress goes on for a few ms first)."""
        if self.tier_events.reannouncing:
            self._continue_reannounce(REANNOUNCE_BUDGET_S)
        return self.events.drain()

    def reannounce(self) -> list[CacheEvent]:
        """Drop the queued events and announce instead everything each tier holds now, parents first. For a
        consumer whose view of us was wiped (vLLM's AllBlocksCleared makes Dynamo forget every tier of the
        worker): the queued events are history that this snapshot contains. A large cache is announced over
        several calls: this one returns the first part, `take_events` the rest (`reannouncing` says whether
        more is coming), each change in between reported exactly once."""
        with self.lock:
            self.tier_events.start_reannounce()
        return self.take_events()

    def snapshot_events(self) -> list[CacheEvent]:
        """A Stored for everything each tier holds now, parents first, in one hold of the lock (queued events
        stay queued; a re-announcement in progress goes on untouched). For a shared cache's owner, whose engines
        each start their own view from a snapshot."""
        scratch = TierEvents(EventLog(), self.block_size)
        scratch.bind(self.index, self.placement.tokens, self._ssd_tokens)
        with self.lock:
            scratch.start_reannounce()
            while not scratch.advance(1 << 30):
                pass
            return scratch.log.drain()

    def reannouncing(self) -> bool:
        return self.tier_events.reannouncing

    def _continue_reannounce(self, budget_s: float) -> None:
        """At least one chunk, then more until the walk ends or ``budget_s`` is spent."""
        deadline = time.perf_counter() + budget_s
        while True:
            with self.lock:
                done = self.tier_events.advance(REANNOUNCE_ROWS)
            if done or time.perf_counter() >= deadline:
                return

    def subscribe(self, listener: Callable[[CacheEvent], None]) -> dict[int, set[Tier]]:
        """Hand every later event to ``listener`` and return what each tier holds (block hash -> tiers).

        The snapshot is read a chunk of rows per hold of the lock while events keep flowing to the listener:
        applying the snapshot first and then the listener's events in order gives the cache's state (a Stored
        or Removed the snapshot already reflects is a no-op on a set)."""
        parts: list[tuple[Tier, np.ndarray]] = []

        def chunk(a: int, b: int) -> int:  # under the lock: copy the hashes out, nothing more
            for tier in (Tier.CPU, Tier.SSD):
                parts.append((tier, self.index.hashes(self.index.ready_rows(tier, a, b))))
            return 0

        with self.lock:
            self.events.add_listener(listener)
        self._walk_rows(chunk, rows=SUBSCRIBE_ROWS)
        held: dict[int, set[Tier]] = {}
        for tier, hashes in parts:
            for h in hashes.tolist():
                held.setdefault(h, set()).add(tier)
        return held

    def unsubscribe(self, listener: Callable[[CacheEvent], None]) -> None:
        with self.lock:
            self.events.remove_listener(listener)

    # ---- status ----------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counters of the tiers and the metrics' totals. O(1): safe to call while the engine runs."""
        with self.lock:
            self._publish_usage(force=True)
            counts = self.index.counts()
            usage = self.placement.usage()
            pending_stores, pending_writes = len(self._stores), len(self.io.pending)
        tiers = {}
        for i, tier in enumerate((Tier.CPU, Tier.SSD)):
            tiers[tier.value] = {"capacity_slots": usage[tier][1], "used_slots": usage[tier][0],
                                 "ready_blocks": counts["ready"][i], "pinned_blocks": counts["pinned"][i]}
        return {
            "identity": self.identity.describe(),
            "fingerprint": self.identity.fingerprint(),
            "pool": self.pool_name,
            "slot_bytes": self.layout.slot_bytes,
            "blocks": counts["blocks"],
            "tiers": tiers,
            "pending_stores": pending_stores,
            "pending_writes": pending_writes,
            "metrics": self.metrics.snapshot(),
        }

    def tokens_of(self, block_hash: int, tier: Tier) -> list[int] | None:
        """The token ids of a block READY in ``tier`` (None if it is not). For tests and diagnostics."""
        with self.lock:
            rows = self.index.find([block_hash])
            if rows[0] < 0 or self.index.state(tier, rows)[0] != READY:
                return None
            if tier is Tier.CPU:
                return self.placement.tokens[self.index.slots(tier, rows)[0]].tolist()
            (data,) = self._ssd_tokens([int(self.index.slots(tier, rows)[0])])
        return np.frombuffer(data, "<u4").tolist() if data is not None else None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.lending.close()
        self.flush(timeout=60)
        self.io.close()
        if self.ssd is not None:
            self.ssd.close()
        self.pool.close()
        self.metrics.close()

    def attach_info(self) -> dict:
        """What a worker process needs to map the CPU pool (served as the `attach` method)."""
        lay = self.layout
        return {"pool": self.pool_name, "num_slots": self.pool.num_slots, "slot_bytes": lay.slot_bytes,
                "layout": {"num_layers": lay.num_layers, "block_size": lay.block_size,
                           "num_kv_heads": lay.num_kv_heads, "head_dim": lay.head_dim, "dtype": lay.dtype,
                           "kv_planes": lay.kv_planes, "tp_size": lay.tp_size},
                "fingerprint": self.identity.fingerprint()}

    # ---- lending blocks to peers (the serving side of distributed reuse; see exports.py) ------------

    def export(self, block_hashes: Sequence[int], lease_s: float = 30.0, timeout_s: float = 10.0,
               checksums: bool = True) -> dict:
        return self.lending.export(block_hashes, lease_s=lease_s, timeout_s=timeout_s, checksums=checksums)

    def release_export(self, job: int) -> bool:
        return self.lending.release_export(job)

    def remember_checksums(self, block_hashes: Sequence[int]) -> int:
        return self.lending.remember_checksums(block_hashes)

    export.__doc__ = Lending.export.__doc__
    release_export.__doc__ = Lending.release_export.__doc__
    remember_checksums.__doc__ = Lending.remember_checksums.__doc__

    def service_handlers(self) -> dict:
        """Methods a `CacheService` exposes for this cache at FLEXKV_SERVER_RECV_PORT."""
        return {"status": self.stats, "attach": self.attach_info,
                "lookup": lambda block_hashes: vars(self.lookup(block_hashes)),
                "export": self.export, "release_export": self.release_export}

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals -------------------------------------------------------------------------------

    def _ssd_tokens(self, ssd_slots: list[int]) -> list[bytes | None]:
        records = self.ssd.records(ssd_slots) if self.ssd is not None else [None] * len(ssd_slots)
        return [r.token_ids if r is not None else None for r in records]

    def _recover(self, records: list[SlotRecord]) -> None:
        """Warm restart: re-index what the SSD manifest says we hold (announced parents before children)."""
        good, seen, dropped = [], set(), []
        for r in records:
            if r.block_hash in seen or r.block_hash < 0 or (r.parent_hash is not None and r.parent_hash < 0):
                dropped.append(r.slot)  # not a block hash this cache could have written
            else:
                seen.add(r.block_hash)
                good.append(r)
        if dropped:
            log.warning("warm restart: ignoring %d SSD records with repeated or negative block hashes", len(dropped))
            self.ssd.forget(dropped)
        order = parents_first(good, lambda r: r.block_hash, lambda r: r.parent_hash)
        with self.lock:
            for r in order:
                self.placement.alloc[Tier.SSD].take(r.slot)
            rows = self.index.begin_fill(Tier.SSD, [r.block_hash for r in order], [r.slot for r in order],
                                         [r.parent_hash for r in order])
            self.index.finish_fill(Tier.SSD, rows)
        if order:
            log.info("warm restart: %d blocks found on SSD", len(order))

    def _publish_usage(self, force: bool = False) -> None:
        """Usage gauges, at most every USAGE_EVERY_S (a Prometheus update costs microseconds; stores call this
        on every step)."""
        now = time.monotonic()
        if not force and now - self._usage_at < USAGE_EVERY_S:
            return
        self._usage_at = now
        for tier, (used, capacity) in self.placement.usage().items():
            self.metrics.set_usage(tier, used, capacity)
        counts = self.index.counts()
        self.metrics.set_pinned(counts["pinned"][0] + counts["pinned"][1])


def _as_hashes(hashes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Block hashes as uint64 (the engine's hashes as vLLM converts them: ints in [0, 2**64))."""
    if isinstance(hashes, np.ndarray) and hashes.dtype == np.uint64:
        return hashes
    try:
        return np.asarray(hashes, dtype=np.uint64)
    except (OverflowError, ValueError, TypeError):
        bad = next((h for h in hashes if not (isinstance(h, int | np.integer) and 0 <= h < 2**64)), hashes)
        raise ValueError(f"block hash {bad!r} is not an int in [0, 2**64)") from None
