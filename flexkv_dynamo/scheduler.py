"""The scheduler side of the connector: owns the `TieredCache`, plans loads and stores, never copies.

It runs inside vLLM's scheduler (the EngineCore process) and answers vLLM's scheduler-side calls:

* ``get_num_new_matched_tokens``: how many tokens past vLLM's own (GPU) prefix hit our tiers can
  serve, looked up by vLLM's block hashes. A hit is always loaded asynchronously: the request waits in
  ``WAITING_FOR_REMOTE_KVS`` while the batch runs on, and a hit covering the whole prompt is fine
  (vLLM recomputes the last prompt token itself when the load completes).
* ``update_state_after_alloc``: vLLM gave the request engine blocks for the hit; pin the hit in the
  cache (`TieredCache.prepare_load`; blocks found only on SSD are staged into CPU slots by the cache's
  I/O threads).
* ``build_connector_meta``: each step, hand the workers (1) the loads whose bytes are in CPU slots,
  (2) a store job per request for the blocks this step's forward pass completes
  (`TieredCache.reserve_store`: CPU slots, blocks we already hold skipped). See `metadata` for why
  stores need no ``delay_free``.
* ``update_connector_output``: a job all workers reported ends: ``complete_store`` publishes the blocks
  (and queues their SSD write-back), ``finish_load`` unpins.
* ``request_finished``: nothing to keep alive; a load still waiting for its SSD staging is cancelled
  and its (empty) job still goes out, because vLLM waits for the worker to report that request.
* ``take_events``: the cache's tier events as vLLM ``BlockStored`` / ``BlockRemoved`` (`kv_events`).

Load failures (an SSD read or checksum that fails, a block evicted between lookup and load) become
``failed_block_ids`` of the load job, which the worker reports to vLLM as load errors. vLLM then
recomputes them only if ``kv_load_failure_policy`` is ``"recompute"``; its default, ``"fail"``, fails
the request instead (a warning at start-up says so).

A loaded request costs one extra engine step (the load runs in a step of its own, after which vLLM
schedules the request): on CPU that step is essentially the copy of the KV bytes.

Tests reach the scheduler side of an in-process engine through vLLM's objects; `live_schedulers` lists
every live one in the process.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flexkv_core.cache import LoadPlan, StorePlan, TieredCache
from flexkv_core.config import FlexKVConfig, configure_logging
from flexkv_core.layout import CacheIdentity, KVLayout, Tier
from flexkv_core.shared import SharedCache

from .kv_events import check_int_block_hashes, engine_hash_to_int, tier_events_enabled, to_vllm_events
from .metadata import FlexKVConnectorMetadata, FlexKVWorkerMetadata, LoadJob, PoolInfo, StoreJob
from .stats import FlexKVConnectorStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

__all__ = ["FlexKVScheduler", "engine_hash_to_int", "layout_from_vllm", "live_schedulers"]

# engine_hash_to_int (re-exported above, defined in kv_events) is vLLM's own event conversion:
# vllm.v1.core.kv_cache_utils.maybe_convert_block_hash turns a block hash (32 sha256 bytes) into
# int.from_bytes(h, "big") & (2**64 - 1) when VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1 (vLLM's default,
# and what Dynamo expects). The cache is keyed by exactly those ints, so that our tier events name the
# same blocks as vLLM's GPU events and the router chains our tiers onto the GPU prefix.

#: Longest a step with nothing to compute waits for SSD staging (new requests wait at most this long).
IDLE_WAIT_S = 0.002

_LIVE: weakref.WeakValueDictionary[str, FlexKVScheduler] = weakref.WeakValueDictionary()
_LIVE_LOCK = threading.Lock()


def live_schedulers() -> list[FlexKVScheduler]:
    """The scheduler sides alive in this process (an in-process engine: tests, the demo, benchmarks)."""
    with _LIVE_LOCK:
        return list(_LIVE.values())


def layout_from_vllm(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> tuple[KVLayout, str]:
    """Our `KVLayout` (bytes of one block per rank) and the identity's ``extra`` from vLLM's KV config.

    One KV cache group of full attention is supported (dense models; MLA as one plane). Hybrid models
    (sliding window, Mamba) have several groups whose blocks are not one chain: refused, by name.
    """
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        kinds = [type(g.kv_cache_spec).__name__ for g in groups]
        raise NotImplementedError(f"FlexKVConnector supports one KV cache group, this model has {len(groups)} "
                                  f"({kinds}); hybrid models are not supported yet")
    spec = groups[0].kv_cache_spec
    if not isinstance(spec, FullAttentionSpec) or getattr(spec, "sliding_window", None):
        raise NotImplementedError(f"FlexKVConnector supports full attention only, got {spec!r}")
    head_size_v = getattr(spec, "head_size_v", spec.head_size)
    if head_size_v != spec.head_size:
        raise NotImplementedError(f"FlexKVConnector needs equal K and V head sizes, got {spec.head_size} "
                                  f"and {head_size_v}")
    planes = 1 if isinstance(spec, MLAAttentionSpec) else 2
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size != 1:
        raise NotImplementedError("FlexKVConnector does not support pipeline parallelism yet "
                                  f"(pipeline_parallel_size={parallel.pipeline_parallel_size})")
    layout = KVLayout(
        num_layers=len(groups[0].layer_names),
        block_size=spec.block_size,
        num_kv_heads=spec.num_kv_heads,  # per rank: vLLM already divided by the TP size
        head_dim=spec.head_size,
        dtype=str(spec.dtype).removeprefix("torch."),
        kv_planes=planes,
        tp_size=parallel.tensor_parallel_size,
    )
    # A slot holds a block's bytes in the engine's own physical order (see worker.plane_views), which
    # depends on the device's attention backend and vLLM's KV cache layout (e.g. LBHNC), as do the KV
    # cache dtype's bytes: all belong to the identity, so an SSD tier written by one engine
    # configuration is never read by another.
    from vllm.platforms import current_platform

    extra = (f"device={current_platform.device_type};"
             f"kv_cache_layout={getattr(kv_cache_config, 'kv_cache_layout', '?')};"
             f"cache_dtype={vllm_config.cache_config.cache_dtype}")
    return layout, extra


@dataclass
class _Request:
    """What we track of one live request."""

    request: Request
    hashes: list[int] = field(default_factory=list)  # engine hashes as ints, converted lazily
    stored_upto: int = 0  # blocks [0, stored_upto) were offered to the cache already
    lookup_start: int = 0  # first block of the last lookup (vLLM's block-aligned local hit)
    lookup_blocks: int = 0  # blocks that lookup found
    looked_up: bool = False  # a lookup happened since the last allocation (counts lookup_tokens once)

    def hashes_upto(self, n: int) -> list[int]:
        block_hashes = self.request.block_hashes
        n = min(n, len(block_hashes))
        if len(self.hashes) < n:
            self.hashes.extend(engine_hash_to_int(h) for h in block_hashes[len(self.hashes):n])
        return self.hashes[:n]


@dataclass
class _Load:
    """A load from prepare_load until every worker reported its job."""

    req_id: str
    plan: LoadPlan
    block_ids: list[int]  # engine block of each block in plan.block_hashes
    missing_block_ids: list[int]  # engine blocks vLLM expects but prepare_load could not cover
    cancelled: bool = False  # the request ended before the job went out: send it empty
    pending_workers: int = 0
    failed: bool = False


@dataclass
class _Store:
    plan: StorePlan
    pending_workers: int
    failed: bool = False


class FlexKVScheduler:
    """The scheduler-side connector logic (see the module docstring). One per engine."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, config: FlexKVConfig,
                 *, start_service: bool = True) -> None:
        configure_logging(config)
        self.config = config
        layout, extra = layout_from_vllm(vllm_config, kv_cache_config)
        self.block_size = layout.block_size
        self.num_workers = vllm_config.parallel_config.tensor_parallel_size
        model = vllm_config.model_config
        self.identity = CacheIdentity(model=f"{model.model}@{model.revision or 'main'}", layout=layout,
                                      extra=extra)
        policy = getattr(vllm_config.kv_transfer_config, "kv_load_failure_policy", "recompute")
        if policy != "recompute":
            log.warning("kv_load_failure_policy=%r: a failed load from FlexKV (e.g. an SSD read error) fails "
                        "the request; set kv_transfer_config kv_load_failure_policy='recompute' to "
                        "recompute those blocks instead", policy)
        self._events_enabled = tier_events_enabled()
        events_config = getattr(vllm_config, "kv_events_config", None)
        if self._events_enabled and events_config is not None and events_config.enable_kv_cache_events:
            check_int_block_hashes()  # bytes hashes: neither vLLM's nor our events would reach the router
        self.layout = layout
        self.cache: TieredCache | SharedCache
        if config.share_server:
            # The node's shared tiers, held by a `flexkv serve` owner (flexkv_core.shared).
            if config.enable_distributed:
                raise NotImplementedError("FLEXKV_ENABLE_DISTRIBUTED with FLEXKV_SHARE_SERVER=1 is not supported "
                                          "yet: a shared cache serves the engines of one node")
            self.cache = SharedCache(config, self.identity)
            start_service = False  # the owner serves FLEXKV_SERVER_RECV_PORT
        else:
            self.cache = TieredCache(config, self.identity)
        self._requests: dict[str, _Request] = {}
        self._waiting_loads: dict[str, _Load] = {}  # req id -> load not yet sent (staging or cancelled)
        self._loads: dict[int, _Load] = {}  # job id -> load sent to the workers
        self._stores: dict[int, _Store] = {}  # job id -> store sent to the workers
        self._stats = FlexKVConnectorStats()
        self._kv_cache_manager: KVCacheManager | None = None
        self._seen_hash_map: int | None = None  # id() of vLLM's prefix-cache map (see take_events)
        self.service = None
        self.node = None  # distributed reuse (FLEXKV_ENABLE_DISTRIBUTED)
        try:
            if config.enable_distributed:
                from flexkv_core.distributed import start_distributed

                self.node = start_distributed(self.cache, config)
            if start_service:
                self.service = self._start_service()
        except BaseException:
            if self.node is not None:
                self.node.close()
            self.cache.close()
            raise
        with _LIVE_LOCK:
            _LIVE[self._live_key] = self
        log.info("FlexKV connector (scheduler side) ready: %s, pool %s, service %s", self.identity.describe(),
                 self.cache.pool_name, self.service.endpoint if self.service else
                 f"shared at {config.server_recv_port}" if config.share_server else "off")

    @property
    def _live_key(self) -> str:
        return f"{id(self):x}"

    @property
    def pool_info(self) -> PoolInfo | None:
        """The CPU pool the workers copy to and from (None while a shared cache's owner is away)."""
        name = self.cache.pool_name
        if name is None:
            return None
        pool = self.cache.pool
        return PoolInfo(name, pool.num_slots, self.layout.slot_bytes, self.layout)

    # ---- the service (attach, status) ----------------------------------------------------------------

    def _start_service(self):
        from flexkv_core.service import CacheService

        handlers = self.cache.service_handlers()
        if self.node is not None:
            handlers["distributed"] = self.node.describe
        service = CacheService(self.config.server_recv_port, handlers, share=self.config.share_server,
                               name="vllm-flexkv-connector")
        service.start()
        if service.attached_to is not None:
            service.stop()
            raise NotImplementedError(
                f"FLEXKV_SERVER_RECV_PORT {self.config.server_recv_port} is served by a sharing cache (pid "
                f"{service.attached_to}); the vLLM connector cannot share another process's cache yet: give "
                "this engine its own port")
        return service

    def bind_kv_cache_manager(self, manager: KVCacheManager) -> None:
        self._kv_cache_manager = manager

    # ---- lookups and loads ---------------------------------------------------------------------------

    def _track(self, request: Request) -> _Request:
        st = self._requests.get(request.request_id)
        if st is None or st.request is not request:
            st = self._requests[request.request_id] = _Request(request)
        return st

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens past ``num_computed_tokens`` (block-aligned) that our tiers can load, or None to be asked
        again next step. No side effects on the cache (vLLM may ask again when it cannot schedule the
        request yet)."""
        st = self._track(request)
        start = num_computed_tokens // self.block_size
        st.lookup_start, st.lookup_blocks, st.looked_up = start, 0, True
        if request.request_id in self._waiting_loads or any(
                load.req_id == request.request_id for load in self._loads.values()):
            return 0, False  # a load of ours is still in flight for it: never plan a second one
        hashes = st.hashes_upto(len(request.block_hashes))
        if start >= len(hashes):
            return 0, False
        found = self.cache.lookup(hashes[start:]).total
        if found and self._staging_any(hashes[start:start + found]):
            # Another request's load is reading these blocks from SSD right now; a second load could not
            # pin them (the cache stages a block once). Ask vLLM to come back: next step they are in CPU.
            st.looked_up = False
            return None, False
        st.lookup_blocks = found
        if not found:
            return 0, False
        return found * self.block_size, True

    def _staging_any(self, hashes: list[int]) -> bool:
        staging = [load.plan for load in self._waiting_loads.values()
                   if not load.cancelled and not load.plan.ready.done()]
        if not staging:
            return False
        busy = {h for plan in staging for h in plan.block_hashes}
        return not busy.isdisjoint(hashes)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        st = self._track(request)
        if st.looked_up:
            st.looked_up = False
            self._stats.add("lookup_tokens", max(0, request.num_tokens - st.lookup_start * self.block_size))
        if num_external_tokens <= 0:
            return
        if num_external_tokens % self.block_size:
            # Our hits are whole blocks and vLLM only trims them to whole blocks; anything else is a
            # contract change we must not guess about.
            raise RuntimeError(f"vLLM asked request {request.request_id} to load {num_external_tokens} tokens, "
                               f"not a multiple of the block size {self.block_size}")
        n = num_external_tokens // self.block_size
        start = st.lookup_start
        engine_blocks = blocks.get_block_ids()[0][start:start + n]
        if len(engine_blocks) != n:
            raise RuntimeError(f"request {request.request_id}: {n} blocks to load from block {start}, but vLLM "
                               f"allocated {len(engine_blocks)} there")
        plan = self.cache.prepare_load(st.hashes_upto(start + n)[start:])
        for tier in (Tier.CPU, Tier.SSD):
            self._stats.add(f"hit_tokens_{tier.value}", plan.tier_hits.get(tier, 0) * self.block_size)
        k = len(plan.block_hashes)
        if k < n:
            log.info("request %s: %d of %d blocks vanished between lookup and load; vLLM recomputes them",
                     request.request_id, n - k, n)
        self._waiting_loads[request.request_id] = _Load(request.request_id, plan, engine_blocks[:k],
                                                        engine_blocks[k:])

    def _ready_loads(self, pool: str | None) -> list[LoadJob]:
        """Load jobs for every waiting load whose bytes are in CPU slots now (or that was cancelled).
        A load planned against another pool than ``pool`` (a shared cache's owner restarted) is a miss."""
        jobs = []
        for req_id, load in list(self._waiting_loads.items()):
            if load.cancelled or load.plan.pool != pool:
                usable = 0
            elif load.plan.ready.done():
                try:
                    usable = int(load.plan.ready.result())
                except Exception:  # noqa: BLE001 - any staging failure is a miss, never a hang
                    log.exception("staging the load of request %s failed", req_id)
                    usable = 0
            else:
                continue  # still staging from SSD: the request keeps waiting, the batch does not
            del self._waiting_loads[req_id]
            failed = load.block_ids[usable:] + load.missing_block_ids
            if failed and not load.cancelled:
                self._stats.add("load_error_blocks", len(failed))
            load.pending_workers = self.num_workers
            self._loads[load.plan.job_id] = load
            jobs.append(LoadJob(load.plan.job_id, req_id, load.block_ids[:usable], load.plan.slots[:usable],
                                [] if load.cancelled else failed))
        return jobs

    # ---- stores --------------------------------------------------------------------------------------

    def _store_jobs(self, scheduler_output: SchedulerOutput, pool: str | None) -> list[StoreJob]:
        computed: dict[str, int] = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        block_state = scheduler_output.kv_connector_block_state
        jobs = []
        bs = self.block_size
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            st = self._requests.get(req_id)
            if st is None or req_id not in computed:
                continue
            request = st.request
            # Blocks complete once this step ran. Capped by the known hashes: a speculative or not yet
            # sampled token has no hash, and a block holding one must not be stored.
            full = min((computed[req_id] + num_scheduled) // bs, len(request.block_hashes))
            start = st.stored_upto
            if full <= start:
                continue
            hashes = st.hashes_upto(full)
            plan = self.cache.reserve_store(hashes[start:full], hashes[start - 1] if start else None,
                                            request.all_token_ids[start * bs:full * bs])
            # No holes: a block that got no slot stops the chain here; it is offered again next step.
            st.stored_upto = start + plan.covered
            if not plan.block_hashes:
                continue  # held already, or no room
            if plan.pool != pool:  # a shared cache's owner changed under us: these slots are not the pool's
                self.cache.complete_store(plan, ok=False)
                continue
            block_ids = None
            if block_state is not None:
                block_ids = block_state.get_block_ids(req_id)
            if block_ids is None and self._kv_cache_manager is not None:
                block_ids = self._kv_cache_manager.get_block_ids(req_id)
            if block_ids is None:
                self.cache.complete_store(plan, ok=False)
                log.warning("no block table for request %s: its blocks are not stored", req_id)
                continue
            engine_blocks = block_ids[0]
            self._stores[plan.job_id] = _Store(plan, self.num_workers)
            jobs.append(StoreJob(plan.job_id, req_id, [engine_blocks[start + p] for p in plan.positions],
                                 list(plan.slots)))
        return jobs

    # ---- per step --------------------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> FlexKVConnectorMetadata:
        if not scheduler_output.total_num_scheduled_tokens:
            self._idle_wait_for_staging()
        pool = self.pool_info  # read once: a shared cache's pool can change between two reads
        name = pool.name if pool is not None else None
        meta = FlexKVConnectorMetadata(pool=pool, loads=self._ready_loads(name),
                                       stores=self._store_jobs(scheduler_output, name) if pool is not None else [])
        for req_id in scheduler_output.finished_req_ids or ():
            self._requests.pop(req_id, None)
        return meta

    def _idle_wait_for_staging(self) -> None:
        """A step with nothing to compute, while loads wait for SSD reads: wait a little for them instead
        of letting the engine spin (on few cores the spinning slows the very reads it waits for)."""
        pending = [load.plan.ready for load in self._waiting_loads.values()
                   if not load.cancelled and not load.plan.ready.done()]
        if pending:
            wait_futures(pending, timeout=IDLE_WAIT_S, return_when=FIRST_COMPLETED)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if meta is None:
            return
        if not isinstance(meta, FlexKVWorkerMetadata):
            raise TypeError(f"FlexKV connector got worker metadata of type {type(meta).__name__}")
        for job_id in set(meta.done) | set(meta.failed):
            reported = meta.done.get(job_id, 0) + meta.failed.get(job_id, 0)
            job: _Store | _Load | None = self._stores.get(job_id) or self._loads.get(job_id)
            if job is None:
                log.warning("workers reported unknown FlexKV job %d", job_id)
                continue
            job.pending_workers -= reported
            job.failed |= bool(meta.failed.get(job_id))
            if job.pending_workers > 0:
                continue
            if isinstance(job, _Store):
                del self._stores[job_id]
                self.cache.complete_store(job.plan, ok=not job.failed)
            else:
                del self._loads[job_id]
                self.cache.finish_load(job.plan)
                if not job.failed and job.block_ids:
                    self.cache.metrics.moved("cpu_to_engine", len(job.block_ids) * self.layout.slot_bytes)

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        """Nothing of ours holds engine blocks past this point (stores finish within their step), so
        vLLM may free the blocks now. A load that has not gone out yet is cancelled."""
        self._requests.pop(request.request_id, None)
        load = self._waiting_loads.get(request.request_id)
        if load is not None and not load.cancelled:
            load.cancelled = True
            self.cache.finish_load(load.plan)  # safe while staging runs: the cache unpins when it ends
        return False, None

    def take_events(self) -> Iterable[KVCacheEvent]:
        # vLLM collects these right after its own events of the step. A reset of vLLM's prefix cache
        # publishes AllBlocksCleared there, which makes Dynamo's router forget our tiers too: follow it
        # with everything we hold. (A reset gives the block pool a fresh hash map: that is how we see it.)
        if self._gpu_cache_was_reset():
            events = self.cache.reannounce()
            log.info("vLLM's prefix cache was reset: re-announcing %d tier events to the router", len(events))
        else:
            events = self.cache.take_events()
        if not self._events_enabled or not events:
            return ()
        return to_vllm_events(events, block_size=self.block_size)

    def _gpu_cache_was_reset(self) -> bool:
        pool = getattr(self._kv_cache_manager, "block_pool", None)
        if pool is None or not getattr(pool, "enable_kv_cache_events", False):
            return False
        current = id(pool.cached_block_hash_to_block)
        reset, self._seen_hash_map = self._seen_hash_map not in (None, current), current
        return reset

    def get_stats(self) -> FlexKVConnectorStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, FlexKVConnectorStats()
        return stats

    def has_pending_work(self) -> bool:
        """Loads waiting for SSD staging need steps to go out even when nothing else runs."""
        return bool(self._waiting_loads)

    def reset_cache(self) -> bool:
        self.cache.reset()
        return True

    def in_flight(self) -> dict[str, int]:
        """Jobs not yet over (tests: all zero once the engine is idle)."""
        return {"waiting_loads": len(self._waiting_loads), "loads": len(self._loads),
                "stores": len(self._stores), "requests": len(self._requests)}

    def shutdown(self) -> None:
        with _LIVE_LOCK:
            if _LIVE.get(self._live_key) is self:
                del _LIVE[self._live_key]
        if self.service is not None:
            self.service.stop()
            self.service = None
        if self.node is not None:
            self.node.close()
            self.node = None
        self.cache.close()
