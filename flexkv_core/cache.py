"""`TieredCache`: the scheduler-side owner of our tiers.

It holds the prefix index, the CPU pool and the SSD store, plans every movement of bytes, and emits the
events. It never touches engine (GPU) memory: the engine's workers copy between their KV cache and the
CPU pool slots a plan names (see `flexkv_core.transfer.BlockCopier`), then tell the cache how it went.

Block life cycle::

    reserve_store -> (engine copies engine->CPU slot) -> complete_store -> CPU READY -> write-back -> SSD READY
    lookup -> prepare_load (SSD-only blocks staged into CPU slots) -> ready -> (engine copies) -> finish_load

All state changes happen under one lock; SSD I/O runs on the store's threads and re-enters through
completion callbacks. Every failure path returns what it reserved, and a failed read is a miss, never
wrong bytes.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

import xxhash

from .allocator import SlotAllocator
from .config import FlexKVConfig
from .events import BlockRemoved, BlockStored, CacheCleared, CacheEvent, EventLog
from .hashing import tokens_to_bytes
from .index import Block, LookupResult, PrefixIndex, parents_first
from .layout import CacheIdentity, Tier
from .metrics import CacheMetrics, make_metrics
from .remote import RemoteBlock, RemoteSource
from .tiers.cpu import CpuPool
from .tiers.manifest import SlotRecord
from .tiers.ssd import SsdStore, WriteItem

log = logging.getLogger(__name__)

__all__ = ["TieredCache", "LookupResult", "StorePlan", "LoadPlan"]


@dataclass
class StorePlan:
    """Blocks the engine must copy into CPU slots before `complete_store`."""

    job_id: int
    block_hashes: list[int]
    slots: list[int]
    positions: list[int]  # index of each block in the chain given to reserve_store
    covered: int = 0  # leading blocks of that chain the CPU tier now holds or has reserved
    pool: str = ""  # the CPU pool the slots belong to


@dataclass
class LoadPlan:
    """Blocks the engine may copy out of CPU slots once ``ready`` resolves (to the usable count)."""

    job_id: int
    block_hashes: list[int]
    slots: list[int]
    ready: Future = field(default_factory=Future)
    tier_hits: dict[Tier, int] = field(default_factory=dict)  # blocks of this plan served by each tier
    pool: str = ""  # the CPU pool the slots belong to
    _pinned: list[int] = field(default_factory=list, repr=False)  # hashes whose CPU copy this plan pins
    _scratch: list[int] = field(default_factory=list, repr=False)  # CPU slots of fetched blocks not indexed
    _parts: int = field(default=0, repr=False)  # asynchronous parts (SSD staging, remote fetch) running
    _failed: set[int] = field(default_factory=set, repr=False)  # hashes whose bytes did not arrive
    _finished: bool = field(default=False, repr=False)


class TieredCache:
    def __init__(self, config: FlexKVConfig, identity: CacheIdentity, *, pool_name: str | None = None,
                 metrics: CacheMetrics | None = None, remote: RemoteSource | None = None,
                 keep_remote: bool = True) -> None:
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
        self._lock = threading.RLock()
        self._io_done = threading.Condition(self._lock)  # notified when a write-back's completion is applied
        self.events = EventLog()
        # Engines killed with SIGKILL leave their pools in /dev/shm; sweep those of dead owners first.
        CpuPool.remove_stale()
        self.pool = CpuPool.create(cpu_slots, slot_bytes, name=pool_name)
        self.pool_name = self.pool.name
        self.ssd: SsdStore | None = None
        ssd_slots = 0
        try:
            if config.ssd_enabled:
                self.ssd = SsdStore(config.ssd_cache_dir, config.ssd_cache_bytes, slot_bytes, identity,
                                    config.max_file_bytes, io_threads=config.ssd_io_threads)
                ssd_slots = self.ssd.num_slots
        except BaseException:
            self.pool.close()
            raise
        self._alloc = {Tier.CPU: SlotAllocator(cpu_slots), Tier.SSD: SlotAllocator(ssd_slots)}
        self.index = PrefixIndex({Tier.CPU: cpu_slots, Tier.SSD: ssd_slots}, block_size=self.block_size,
                                 events=self.events, policy=config.eviction_policy,
                                 hit_reward_seconds=config.hit_reward_seconds)
        self._jobs = itertools.count(1)
        self._stores: dict[int, StorePlan] = {}
        self._io: set[Future] = set()  # SSD writes in flight (flush waits for them)
        self._exports: dict[int, tuple[LoadPlan, threading.Timer]] = {}  # blocks lent to peers
        # Blocks being staged SSD -> CPU, with the other loads that joined that staging.
        self._staging: dict[int, list[LoadPlan]] = {}
        # xxh3 of CPU copies' slot bytes, where known: exports hand them to the peer that verifies what it
        # read. Learnt for free from SSD writes and reads and from verified fetches, else computed once
        # (`remember_checksums`, or the first export) and kept until that CPU copy is removed.
        self._cpu_sums: dict[int, int] = {}
        self.events.add_listener(self._on_event)
        self.remote = remote
        self.keep_remote = keep_remote  # index fetched blocks as our own CPU blocks (else scratch only)
        self._closed = False
        if self.ssd is not None:
            self._recover(self.ssd.recovered())
        self._publish_usage()
        log.info("tiered cache ready: %s; CPU %d slots of %d B (pool %s), SSD %d slots",
                 identity.describe(), cpu_slots, slot_bytes, self.pool_name, ssd_slots)

    # ---- lookups ---------------------------------------------------------------------------------

    def lookup(self, block_hashes: Sequence[int]) -> LookupResult:
        """How many leading blocks each tier can serve. Changes nothing."""
        with self._lock:
            result = self.index.lookup(block_hashes)
        if self.remote is not None and result.total < len(block_hashes):
            extra = self.remote.lookup(block_hashes[result.total:])
            if extra:
                result = LookupResult(cpu=result.cpu, ssd=result.ssd, total=result.total + extra, remote=extra)
        self.metrics.lookup(len(block_hashes), result.total)
        return result

    # ---- stores ----------------------------------------------------------------------------------

    def reserve_store(self, block_hashes: Sequence[int], parent_hash: int | None,
                      token_ids: Sequence[int]) -> StorePlan | None:
        bs = self.block_size
        if len(token_ids) < len(block_hashes) * bs:
            raise ValueError(f"{len(block_hashes)} blocks need {len(block_hashes) * bs} token ids, "
                             f"got {len(token_ids)}")
        with self._lock:
            wanted: list[tuple[int, int, int | None]] = []  # (position, hash, parent)
            prev = parent_hash
            for i, h in enumerate(block_hashes):
                b = self.index.get(h)
                if b is not None and b.held(Tier.CPU):  # already in (or on its way to) the CPU tier
                    self.index.touch(h, hit=False)
                else:
                    wanted.append((i, h, prev))
                prev = h
            if not wanted:
                return StorePlan(0, [], [], [], covered=len(block_hashes), pool=self.pool_name)
            slots = self._allocate(Tier.CPU, len(wanted))
            # No holes: the chain is covered up to the first block that got no slot.
            covered = wanted[len(slots)][0] if len(slots) < len(wanted) else len(block_hashes)
            if not slots:
                return StorePlan(0, [], [], [], covered=covered, pool=self.pool_name)
            wanted = wanted[:len(slots)]
            for (i, h, parent), slot in zip(wanted, slots):
                self.index.begin_fill(Tier.CPU, h, slot, parent=parent,
                                      tokens=tokens_to_bytes(token_ids[i * bs:(i + 1) * bs]))
            plan = StorePlan(next(self._jobs), [h for _, h, _ in wanted], slots, [i for i, _, _ in wanted],
                             covered=covered, pool=self.pool_name)
            self._stores[plan.job_id] = plan
            return plan

    def complete_store(self, plan: StorePlan, ok: bool = True) -> None:
        """The engine finished copying ``plan`` (``ok``) or gave up: publish or roll back."""
        if not plan.block_hashes:
            return  # nothing was reserved
        with self._lock:
            if self._stores.pop(plan.job_id, None) is None:
                raise ValueError(f"store job {plan.job_id} is not pending")
            if ok:
                self.index.finish_fill(Tier.CPU, plan.block_hashes)
                self.metrics.stored(Tier.CPU, len(plan.block_hashes))
                self.metrics.moved("engine_to_cpu", len(plan.block_hashes) * self.layout.slot_bytes)
                self._write_back([self.index.get(h) for h in plan.block_hashes])
            else:
                self._alloc[Tier.CPU].free(self.index.abort_fill(Tier.CPU, plan.block_hashes))
            self._publish_usage()

    # ---- loads -----------------------------------------------------------------------------------

    def prepare_load(self, block_hashes: Sequence[int], *, use_remote: bool = True) -> LoadPlan:
        """Pin a loadable prefix. SSD-only blocks are read into fresh CPU slots, and blocks only peers hold
        are fetched into fresh CPU slots, both in the background; ``ready`` resolves when all arrived."""
        with self._lock:
            plan = LoadPlan(next(self._jobs), [], [], pool=self.pool_name)
            chain: list[Block] = []
            for h in block_hashes:
                b = self.index.get(h)
                # Loadable: READY in CPU, being staged into CPU by another load (we join it), or READY on
                # SSD with no CPU copy on its way (a copy being *stored* cannot be read yet).
                if b is None or not (b.ready(Tier.CPU) or h in self._staging
                                     or (b.ready(Tier.SSD) and not b.held(Tier.CPU))):
                    break
                chain.append(b)
            # Pin the CPU copies first so that making room for staging cannot evict them.
            for b in chain:
                if b.ready(Tier.CPU) or b.hash in self._staging:
                    self.index.pin(Tier.CPU, b.hash)
                    plan._pinned.append(b.hash)
            missing = [b for b in chain if not b.ready(Tier.CPU) and b.hash not in self._staging]
            # ... and the SSD copies to stage: making CPU room can demote CPU blocks to SSD, whose
            # SSD room must not come from the very blocks we are about to read.
            for b in missing:
                self.index.pin(Tier.SSD, b.hash)
            staging = self._allocate(Tier.CPU, len(missing)) if missing else []
            whole = len(staging) == len(missing)
            if not whole:  # keep the prefix up to the first block we cannot stage
                cut = chain.index(missing[len(staging)])
                for b in chain[cut:]:
                    if b.hash in plan._pinned:
                        self.index.unpin(Tier.CPU, b.hash)
                        plan._pinned.remove(b.hash)
                for b in missing[len(staging):]:
                    self.index.unpin(Tier.SSD, b.hash)
                chain = chain[:cut]
                missing = missing[:len(staging)]
            joined = [b.hash for b in chain if b.hash in self._staging]
            for h in joined:
                self._staging[h].append(plan)
            staged = dict(zip((b.hash for b in missing), staging))
            for b in missing:
                self.index.begin_fill(Tier.CPU, b.hash, staged[b.hash])
                self.index.pin(Tier.CPU, b.hash)
                plan._pinned.append(b.hash)
                self._staging[b.hash] = []
            for b in chain:
                self.index.touch(b.hash)
            # Past our own prefix, peers may continue it: fetch into scratch CPU slots.
            fetch: list[int] = []
            if use_remote and self.remote is not None and whole and len(chain) < len(block_hashes):
                rest = list(block_hashes[len(chain):])
                n = self.remote.lookup(rest)
                plan._scratch = self._allocate(Tier.CPU, n) if n else []
                fetch = rest[:len(plan._scratch)]
            plan.block_hashes = [b.hash for b in chain] + fetch
            plan.slots = [b.slot_in(Tier.CPU) for b in chain] + list(plan._scratch)
            plan.tier_hits = {Tier.CPU: len(chain) - len(missing) - len(joined), Tier.SSD: len(missing) + len(joined),
                              Tier.REMOTE: len(fetch)}
            for tier, n in plan.tier_hits.items():
                self.metrics.hit(tier, n)
            plan._parts = bool(missing) + bool(fetch) + len(joined)
            if not plan._parts:
                plan.ready.set_result(len(chain))
                return plan
            items = [(b.slot_in(Tier.SSD), self.pool.slot(staged[b.hash])) for b in missing]
            buffers = [self.pool.slot(slot) for slot in plan._scratch]
        started = time.perf_counter()
        if missing:
            assert self.ssd is not None
            self.ssd.read(items).add_done_callback(lambda f: self._staged(plan, missing, f, started))
        if fetch:
            assert self.remote is not None
            try:
                fut = self.remote.fetch(fetch, buffers)
            except Exception:  # noqa: BLE001 - a broken peer layer is a miss, never a crash
                log.exception("remote fetch could not start")
                fut = Future()
                fut.set_result([None] * len(fetch))
            fut.add_done_callback(lambda f: self._fetched(plan, fetch, f, started))
        return plan

    def finish_load(self, plan: LoadPlan) -> None:
        """The engine is done with ``plan`` (copied, aborted or failed): release its pins."""
        with self._lock:
            if plan._finished:
                return
            plan._finished = True
            if not plan.ready.done():  # staging still running: _staged releases the pins when it ends
                return
            self.metrics.moved("cpu_to_engine", plan.ready.result() * self.layout.slot_bytes)
            self._release(plan)

    # ---- maintenance -----------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for background SSD write-back, completions applied (indexed, CPU copies unpinned). True if
        everything finished in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            pending = list(self._io)
        done, not_done = wait_futures(pending, timeout=timeout)
        if not_done:
            return False
        # A future is done before its completion callback (`_written`) has run: wait for that too.
        with self._io_done:
            return self._io_done.wait_for(lambda: self._io.isdisjoint(pending),
                                          None if deadline is None else max(0.0, deadline - time.monotonic()))

    def evict_all(self, tier: Tier) -> int:
        """Drop every unpinned READY copy in ``tier`` (operators, tests). Returns how many."""
        with self._lock:
            n = self._remove_all(tier)
            self._publish_usage()
            return n

    def reset(self) -> None:
        """Forget everything not in use: Removed per tier, then CacheCleared."""
        self.flush(timeout=30)
        with self._lock:
            for tier in (Tier.CPU, Tier.SSD):
                self._remove_all(tier)
            self.events.emit(CacheCleared(tiers=[Tier.CPU, Tier.SSD]))
            self._publish_usage()

    def take_events(self) -> list[CacheEvent]:
        return self.events.drain()

    def reannounce(self) -> list[CacheEvent]:
        """Drop the queued events and return instead a Stored for everything each tier holds now. For a
        consumer whose view of us was wiped (vLLM's AllBlocksCleared makes Dynamo forget every tier of the
        worker): the queued events are history that this snapshot already contains."""
        with self._lock:
            self.events.drain()
            return self.snapshot_events()

    def snapshot_events(self) -> list[BlockStored]:
        """A Stored for everything each tier holds now, parents first (queued events stay queued)."""
        with self._lock:
            return [*self.index.stored_events(Tier.CPU), *self.index.stored_events(Tier.SSD)]

    def subscribe(self, listener: Callable[[CacheEvent], None]) -> dict[int, set[Tier]]:
        """Hand every later event to ``listener`` and return what each tier holds now, in one atomic
        step: no change is missed or seen twice (the distributed index publisher starts this way)."""
        with self._lock:
            self.events.add_listener(listener)
            held: dict[int, set[Tier]] = {}
            for b in self.index.blocks():
                tiers = {t for t in (Tier.CPU, Tier.SSD) if b.ready(t)}
                if tiers:
                    held[b.hash] = tiers
            return held

    def unsubscribe(self, listener: Callable[[CacheEvent], None]) -> None:
        with self._lock:
            self.events.remove_listener(listener)

    def stats(self) -> dict:
        with self._lock:
            tiers = {}
            for tier in (Tier.CPU, Tier.SSD):
                tiers[tier.value] = {
                    "capacity_slots": self._alloc[tier].capacity,
                    "used_slots": self._alloc[tier].num_used,
                    "ready_blocks": self.index.ready_count(tier),
                    "pinned_blocks": self.index.pinned_count(tier),
                }
            return {
                "identity": self.identity.describe(),
                "fingerprint": self.identity.fingerprint(),
                "pool": self.pool_name,
                "slot_bytes": self.layout.slot_bytes,
                "blocks": len(self.index),
                "tiers": tiers,
                "pending_stores": len(self._stores),
                "pending_writes": len(self._io),
                "metrics": self.metrics.snapshot(),
            }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for job in list(self._exports):
            self.release_export(job)
        self.flush(timeout=60)
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

    # ---- lending blocks to peers (the serving side of distributed reuse) ---------------------------

    def export(self, block_hashes: Sequence[int], lease_s: float = 30.0, timeout_s: float = 10.0,
               checksums: bool = True) -> dict:
        """Pin the leading blocks we hold (staging SSD-only ones into CPU) so a peer can read their CPU
        slots, for at most ``lease_s`` seconds. Returns the slots, each block's parent and tokens, and
        (if ``checksums``, else None each) an xxh3 of each slot's bytes for the reader to verify."""
        plan = self.prepare_load(block_hashes, use_remote=False)
        try:
            n = plan.ready.result(timeout=timeout_s)
        except TimeoutError:
            n = 0
        if n == 0:
            self.finish_load(plan)
            return {"job": 0, "slots": [], "parents": [], "tokens": [], "checksums": []}
        hashes, slots = plan.block_hashes[:n], plan.slots[:n]
        with self._lock:
            blocks = [self.index.get(h) for h in hashes]
            sums = [self._cpu_sums.get(h) for h in hashes] if checksums else [None] * n
        # The plan pins these copies: hash the unknown ones outside the lock, remember them for the next peer.
        computed = {h: xxhash.xxh3_64_intdigest(self.pool.slot(s))
                    for h, s, c in zip(hashes, slots, sums) if checksums and c is None}
        with self._lock:
            self._cpu_sums.update(computed)
            timer = threading.Timer(lease_s, self.release_export, args=(plan.job_id,))
            timer.daemon = True
            self._exports[plan.job_id] = (plan, timer)
        timer.start()
        return {"job": plan.job_id, "slots": slots, "parents": [b.parent for b in blocks],
                "tokens": [b.tokens for b in blocks], "checksums": [computed.get(h, c) for h, c in zip(hashes, sums)]}

    def remember_checksums(self, block_hashes: Sequence[int]) -> int:
        """Compute the checksums of those blocks' CPU copies that have none yet, so that lending them to a
        peer later costs no hashing (a distributed node calls this in the background after stores).
        Skips blocks whose SSD write is in flight: the write computes it. Returns how many it computed."""
        with self._lock:
            todo = []
            for h in block_hashes:
                b = self.index.get(h)
                if (b is None or not b.ready(Tier.CPU) or h in self._cpu_sums
                        or (b.held(Tier.SSD) and not b.ready(Tier.SSD))):
                    continue
                self.index.pin(Tier.CPU, h)  # its bytes stay put while we read them
                todo.append((h, b.slot_in(Tier.CPU)))
        sums = {}
        try:
            for h, slot in todo:
                sums[h] = xxhash.xxh3_64_intdigest(self.pool.slot(slot))
        finally:
            with self._lock:
                self._cpu_sums.update(sums)
                for h, _ in todo:
                    self.index.unpin(Tier.CPU, h)
        return len(sums)

    def _on_event(self, event: CacheEvent) -> None:
        if isinstance(event, BlockRemoved) and event.tier is Tier.CPU:
            for h in event.block_hashes:
                self._cpu_sums.pop(h, None)

    def _ssd_checksum(self, h: int, ssd_slot: int) -> int | None:
        """The checksum the SSD tier recorded for block ``h`` in ``ssd_slot``."""
        record = self.ssd.record(ssd_slot) if self.ssd is not None else None
        return record.checksum if record is not None and record.block_hash == h else None

    def release_export(self, job: int) -> bool:
        """The peer finished reading (or its lease lapsed): unpin. False if already released."""
        with self._lock:
            entry = self._exports.pop(job, None)
        if entry is None:
            return False
        plan, timer = entry
        timer.cancel()
        self.finish_load(plan)
        return True

    def service_handlers(self) -> dict:
        """Methods a `CacheService` exposes for this cache at FLEXKV_SERVER_RECV_PORT."""
        return {"status": self.stats, "attach": self.attach_info,
                "lookup": lambda block_hashes: vars(self.lookup(block_hashes)),
                "export": self.export, "release_export": self.release_export}

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals (call with the lock held) -------------------------------------------------------

    def _allocate(self, tier: Tier, n: int) -> list[int]:
        """Up to ``n`` slots of ``tier``, evicting by policy when the tier is past its threshold."""
        alloc = self._alloc[tier]
        start_at = math.floor(self.config.evict_start_threshold * alloc.capacity)
        over = alloc.num_used + n - start_at
        if over > 0 or alloc.num_free < n:
            want = max(over, n - alloc.num_free, math.ceil(self.config.evict_ratio * alloc.capacity))
            self._evict(tier, want)
        return alloc.alloc(n)

    def _evict(self, tier: Tier, n: int) -> None:
        """Free up to ``n`` slots of ``tier``. Only leaves are candidates, so evicting a chain's tail makes
        its parent a candidate: go round until enough is free or nothing is left to take."""
        freed = 0
        while freed < n:
            victims, demote = [], []
            for b in self.index.eviction_candidates(tier, n - freed):
                if tier is Tier.CPU and self.ssd is not None and not b.held(Tier.SSD):
                    demote.append(b)  # the only copy: write it to SSD first, evict it in a later round
                else:
                    victims.append(b.hash)
            if victims:
                self._free(tier, self.index.remove(tier, victims))
                self.metrics.evicted(tier, len(victims))
                freed += len(victims)
            if demote:
                # Written ones are pinned until on SSD (not offered again in this loop); those SSD has no
                # room for are evicted outright, as they would be without an SSD tier.
                unwritten = [b.hash for b in self._write_back(demote)]
                if unwritten:
                    self._free(tier, self.index.remove(tier, unwritten))
                    self.metrics.evicted(tier, len(unwritten))
                    freed += len(unwritten)
            if not victims and not demote:
                break

    def _remove_all(self, tier: Tier) -> int:
        victims = [b.hash for b in self.index.blocks() if b.ready(tier) and not b.pinned(tier)]
        if victims:
            self._free(tier, self.index.remove(tier, victims))
        return len(victims)

    def _free(self, tier: Tier, slots: list[int]) -> None:
        self._alloc[tier].free(slots)
        if tier is Tier.SSD and self.ssd is not None:
            self.ssd.forget(slots)

    def _write_back(self, blocks: list[Block | None]) -> list[Block]:
        """Queue SSD copies of CPU-ready blocks that have none; the CPU copy is pinned while it is read.
        Returns the blocks that needed a copy but got no SSD slot."""
        if self.ssd is None:
            return []
        todo = [b for b in blocks if b is not None and b.ready(Tier.CPU) and not b.held(Tier.SSD)]
        if not todo:
            return []
        slots = self._allocate(Tier.SSD, len(todo))
        todo, left = todo[:len(slots)], todo[len(slots):]
        if not todo:
            return left
        items = []
        for b, slot in zip(todo, slots):
            self.index.begin_fill(Tier.SSD, b.hash, slot)
            self.index.pin(Tier.CPU, b.hash)
            items.append(WriteItem(slot=slot, block_hash=b.hash, parent_hash=b.parent, token_ids=b.tokens,
                                   buffer=self.pool.slot(b.slot_in(Tier.CPU))))
        hashes = [b.hash for b in todo]
        started = time.perf_counter()
        fut = self.ssd.write(items)
        self._io.add(fut)
        fut.add_done_callback(lambda f: self._written(hashes, f, started))
        return left

    def _written(self, hashes: list[int], fut: Future, started: float) -> None:
        results = _results(fut, len(hashes))
        with self._lock:
            self._io.discard(fut)
            self._io_done.notify_all()  # flush() sees it once this block has released the lock
            ok = [h for h, good in zip(hashes, results) if good]
            bad = [h for h, good in zip(hashes, results) if not good]
            if ok:
                self.index.finish_fill(Tier.SSD, ok)
                for h in ok:  # written from the CPU copy, which was pinned meanwhile: the same bytes
                    self._remember(h, self._ssd_checksum(h, self.index.get(h).slot_in(Tier.SSD)))
                self.metrics.stored(Tier.SSD, len(ok))
                self.metrics.moved("cpu_to_ssd", len(ok) * self.layout.slot_bytes, time.perf_counter() - started)
            if bad:
                log.warning("SSD write-back failed for %d blocks; they stay in CPU only", len(bad))
                self.metrics.io_error(Tier.SSD, len(bad))
                self._free(Tier.SSD, self.index.abort_fill(Tier.SSD, bad))
            for h in hashes:
                self.index.unpin(Tier.CPU, h)
            self._publish_usage()

    def _staged(self, plan: LoadPlan, missing: list[Block], fut: Future, started: float) -> None:
        results = _results(fut, len(missing))
        with self._lock:
            good = [b.hash for b, ok in zip(missing, results) if ok]
            bad = [b.hash for b, ok in zip(missing, results) if not ok]
            joiners: list[LoadPlan] = []  # one entry per block another load joined
            bad_set = set(bad)
            for b in missing:
                for other in self._staging.pop(b.hash, []):
                    joiners.append(other)
                    if b.hash in bad_set:
                        self.index.unpin(Tier.CPU, b.hash)
                        other._pinned.remove(b.hash)
                        other._failed.add(b.hash)
            if good:
                self.index.finish_fill(Tier.CPU, good)
                for b in missing:  # staged: the SSD bytes, verified against this checksum
                    if b.hash not in bad_set:
                        self._remember(b.hash, self._ssd_checksum(b.hash, b.slot_in(Tier.SSD)))
                self.metrics.moved("ssd_to_cpu", len(good) * self.layout.slot_bytes, time.perf_counter() - started)
            if bad:
                # A failed read or checksum mismatch: that SSD copy is gone for good (Removed), and the
                # block is a miss from there on, never wrong bytes.
                log.warning("SSD read failed for %d of %d staged blocks; recomputing from the first", len(bad),
                            len(missing))
                self.metrics.io_error(Tier.SSD, len(bad))
                for h in bad:
                    self.index.unpin(Tier.CPU, h)
                    plan._pinned.remove(h)
                self._alloc[Tier.CPU].free(self.index.abort_fill(Tier.CPU, bad))
                plan._failed.update(bad)
            for b in missing:
                self.index.unpin(Tier.SSD, b.hash)
            gone = [b.hash for b in missing if b.hash in plan._failed and b.ready(Tier.SSD) and not b.pinned(Tier.SSD)]
            if gone:
                self._free(Tier.SSD, self.index.remove(Tier.SSD, gone))
            done = [(p, self._part_done(p)) for p in [plan, *joiners]]
        for p, usable in done:
            if usable is not None:
                p.ready.set_result(usable)

    def _fetched(self, plan: LoadPlan, hashes: list[int], fut: Future, started: float) -> None:
        try:
            results: list[RemoteBlock | None] = list(fut.result())
        except Exception:  # noqa: BLE001 - any peer failure is a miss
            log.exception("remote fetch failed")
            results = [None] * len(hashes)
        with self._lock:
            got, kept = 0, []
            for h, slot, blk in zip(hashes, list(plan._scratch), results):
                if blk is None:
                    plan._failed.add(h)
                    continue
                got += 1
                existing = self.index.get(h)
                if self.keep_remote and not (existing is not None and existing.held(Tier.CPU)):
                    # Now an ordinary CPU block of ours (and announced as such); the plan pins it.
                    self.index.begin_fill(Tier.CPU, h, slot, parent=blk.parent_hash, tokens=blk.token_ids)
                    self.index.pin(Tier.CPU, h)
                    plan._pinned.append(h)
                    plan._scratch.remove(slot)
                    kept.append(h)
                    self._remember(h, blk.checksum)
            if kept:
                self.index.finish_fill(Tier.CPU, kept)
                self._write_back([self.index.get(h) for h in kept])
            if got:
                self.metrics.moved("remote_to_cpu", got * self.layout.slot_bytes, time.perf_counter() - started)
            if got < len(hashes):
                log.warning("remote fetch: %d of %d blocks did not arrive; recomputing from the first",
                            len(hashes) - got, len(hashes))
            usable = self._part_done(plan)
        if usable is not None:
            plan.ready.set_result(usable)

    def _part_done(self, plan: LoadPlan) -> int | None:
        """One asynchronous part of a load ended. When it was the last, trim the plan to its usable prefix
        (releasing the rest) and return how many blocks are usable."""
        plan._parts -= 1
        if plan._parts:
            return None
        usable = next((i for i, h in enumerate(plan.block_hashes) if h in plan._failed), len(plan.block_hashes))
        # Blocks past the first failure are no use to this load: release them now.
        for h, slot in zip(plan.block_hashes[usable:], plan.slots[usable:]):
            if h in plan._pinned:
                self.index.unpin(Tier.CPU, h)
                plan._pinned.remove(h)
            if slot in plan._scratch:
                self._alloc[Tier.CPU].free([slot])
                plan._scratch.remove(slot)
        if plan._finished:
            self._release(plan)
        self._publish_usage()
        return usable

    def _release(self, plan: LoadPlan) -> None:
        for h in plan._pinned:
            self.index.unpin(Tier.CPU, h)
        plan._pinned.clear()
        if plan._scratch:
            self._alloc[Tier.CPU].free(plan._scratch)
            plan._scratch = []
        self._publish_usage()

    def _recover(self, records: list[SlotRecord]) -> None:
        """Warm restart: re-index what the SSD manifest says we hold (parents before children)."""
        order = parents_first(records, lambda r: r.block_hash, lambda r: r.parent_hash)
        with self._lock:
            for r in order:
                self._alloc[Tier.SSD].take(r.slot)
                self.index.begin_fill(Tier.SSD, r.block_hash, r.slot, parent=r.parent_hash, tokens=r.token_ids)
            self.index.finish_fill(Tier.SSD, [r.block_hash for r in order])
        if order:
            log.info("warm restart: %d blocks found on SSD", len(order))

    def _remember(self, h: int, checksum: int | None) -> None:
        if checksum is not None:
            self._cpu_sums[h] = checksum

    def _publish_usage(self) -> None:
        for tier in (Tier.CPU, Tier.SSD):
            self.metrics.set_usage(tier, self._alloc[tier].num_used, self._alloc[tier].capacity)
        self.metrics.set_pinned(self.index.pinned_count(Tier.CPU) + self.index.pinned_count(Tier.SSD))


def _results(fut: Future, n: int) -> list[bool]:
    """Per-item success of an SSD batch; an exception fails the whole batch (never raises here)."""
    try:
        results = fut.result()
    except Exception:  # noqa: BLE001 - I/O errors of any kind become misses
        log.exception("SSD batch failed")
        return [False] * n
    return list(results)
