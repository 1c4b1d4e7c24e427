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
  (`TieredCache.reserve_store`: CPU slots, blocks we already hold skipped), which the workers copy from
  the next step on, and (3) ``flush``: stores in flight that read engine blocks vLLM hands out again in
  this step, or whose request was preempted, which the workers finish before the forward pass
  (`flexkv_dynamo.fences`; `flexkv_dynamo.worker` says why fences rather than ``delay_free``).
* ``update_connector_output``: a job all workers reported ends (in job order, so that parents are
  published before the children another job stored): ``complete_store`` publishes the blocks (and
  queues their SSD write-back), ``finish_load`` unpins.
* ``request_finished``: vLLM may free the request's blocks now; its stores in flight are *fenced* (their
  blocks are watched until the stores end). A load still waiting for its SSD staging is cancelled and its
  (empty) job still goes out, because vLLM waits for the worker to report that request.
* ``has_pending_work`` keeps the engine stepping while loads stage or stores are in flight; a reset of our
  tiers (``reset_cache``) rolls back the stores in flight when they end instead of publishing them.
* ``take_events``: the cache's tier events as vLLM ``BlockStored`` / ``BlockRemoved`` (`kv_events`),
  or, after vLLM reset its prefix cache, everything our tiers hold (`note_gpu_resets`); before the first
  request, once a subscriber listens, the announcement of everything our tiers hold (`announce`: the
  engine keeps stepping for it through ``has_pending_push_work``).

No holes: a request's blocks ``[0, stored_upto)`` are always a chain the CPU tier holds or has reserved.
``reserve_store`` may take fewer blocks than offered (no room): ``stored_upto`` then stops at the first
block it could not take (`StorePlan.covered`), and the rest is offered again once more of the request's
blocks complete; a store job that fails moves it back. A block is never announced with its parent
missing from our tiers, so the router never credits a tier no lookup can reach.

Per step this runs on vLLM's scheduler thread, for every running request: the work per request and per
block is kept to a few operations (hashes converted once per request, only the needed part of a block
table read); `bench/bench_scheduler.py` measures it against vLLM's own scheduler work.

Load failures (an SSD read or checksum that fails, a block evicted between lookup and load) become
``failed_block_ids`` of the load job, which the worker reports to vLLM as load errors. vLLM then
recomputes them only if ``kv_load_failure_policy`` is ``"recompute"``; its default, ``"fail"``, fails
the request instead (a warning at start-up says so). A request whose load failed gets no further hits
(vLLM asks again for it; were the failure to repeat, the request would loop through failing loads).
Exceptions of our own code are caught at the connector boundary (`flexkv_dynamo.connector`), which
calls `fail_load` / `abandon_step` here to turn them into load errors.

A loaded request costs one extra engine step (the load runs in a step of its own, after which vLLM
schedules the request): on CPU that step is essentially the copy of the KV bytes.

Tests reach the scheduler side of an in-process engine through vLLM's objects; `live_schedulers` lists
every live one in the process.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_events import AllBlocksCleared

from flexkv_core.cache import LoadPlan, StorePlan, TieredCache
from flexkv_core.config import FlexKVConfig, configure_logging
from flexkv_core.layout import CacheIdentity, KVLayout, Tier
from flexkv_core.metrics import start_metrics_server
from flexkv_core.shared import SharedCache

from .announce import Announcer
from .fences import StoreFences
from .guard import CallbackFailures, FaultInjector
from .kv_events import (
    check_int_block_hashes,
    engine_hash_to_int,
    engine_hashes_to_ints,
    tier_events_enabled,
    to_vllm_events,
)
from .metadata import FlexKVConnectorMetadata, FlexKVWorkerMetadata, LoadJob, PoolInfo, StoreJob
from .stats import HIT_TIERS, FlexKVConnectorStats

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
    hashes: list[int] = field(default_factory=list)  # engine hashes as ints, converted lazily, only grown
    stored_upto: int = 0  # blocks [0, stored_upto) are held or reserved by the CPU tier: a chain, no hole
    store_tried_at: int = 0  # a store that came up short tried up to here: retry once more blocks complete
    lookup_start: int = 0  # first block of the last lookup (vLLM's block-aligned local hit)
    lookup_blocks: int = 0  # blocks that lookup found
    looked_up: bool = False  # a lookup happened since the last allocation (counts lookup_tokens once)
    no_loads: bool = False  # a load of it failed: no more hits for it (vLLM asks again after a failure)

    def int_hashes(self, n: int) -> list[int]:
        """The list of converted hashes, holding at least the first ``min(n, known)`` of them. It is the
        growing list itself, never a copy: callers slice the part they use."""
        block_hashes = self.request.block_hashes
        n = min(n, len(block_hashes))
        if len(self.hashes) < n:
            self.hashes.extend(engine_hashes_to_ints(block_hashes[len(self.hashes):n]))
        return self.hashes


@dataclass
class _Load:
    """A load from update_state_after_alloc until every worker reported its job."""

    req_id: str
    job_id: int
    plan: LoadPlan | None  # None once released early (failed before it went out): the job is all errors
    block_ids: list[int]  # engine block of each block in plan.block_hashes
    missing_block_ids: list[int]  # engine blocks vLLM expects but we cannot deliver (load errors)
    staging: frozenset[int] | None = None  # the plan's hashes while SSD staging may be running
    cancelled: bool = False  # the request ended before the job went out: send it empty
    sent: bool = False  # in a metadata vLLM handed to the workers
    pending_workers: int = 0
    failed: bool = False


@dataclass
class _Store:
    plan: StorePlan
    req_id: str
    start: int  # the chain position of the plan's block 0 (positions are relative to it)
    pending_workers: int
    sent: bool = False
    block_ids: list[int] = field(default_factory=list)  # engine blocks the workers read
    failed: bool = False
    stale: bool = False  # our tiers were reset meanwhile: roll back instead of publishing


class FlexKVScheduler:
    """The scheduler-side connector logic (see the module docstring). One per engine."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, config: FlexKVConfig,
                 *, start_service: bool = True, failures: CallbackFailures | None = None,
                 faults: FaultInjector | None = None) -> None:
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
        shared = config.share_server  # the node's shared tiers, held by a `flexkv serve` owner (flexkv_core.shared)
        if shared and config.enable_distributed:
            raise NotImplementedError("FLEXKV_ENABLE_DISTRIBUTED with FLEXKV_SHARE_SERVER=1 is not supported yet: "
                                      "a shared cache serves the engines of one node")
        # Claim the service endpoint before allocating anything (CPU pool, SSD files): a worker given another
        # live worker's FLEXKV_SERVER_RECV_PORT must fail without touching /dev/shm or the disk. A shared
        # cache's owner serves that endpoint instead.
        self.service = self._claim_service() if start_service and not shared else None
        self.cache: TieredCache | SharedCache
        self._metrics_server = None
        self.failures = failures or CallbackFailures("scheduler")
        self._faults = faults
        self._announcer = Announcer.for_engine(vllm_config, self._events_enabled)  # tiers known before requests
        try:
            if config.enable_metrics and config.metrics_port:  # flexkv_* live in this process only: serve them
                self._metrics_server = start_metrics_server(config.metrics_port, addr=config.node_addr)
            self.cache = SharedCache(config, self.identity) if shared else TieredCache(config, self.identity)
        except BaseException:
            self._stop_metrics_server()
            if self.service is not None:
                self.service.stop()
            raise
        self._requests: dict[str, _Request] = {}
        self._waiting_loads: dict[str, _Load] = {}  # req id -> load not yet sent (staging or cancelled)
        self._loads: dict[int, _Load] = {}  # job id -> load sent to the workers
        self._load_of: dict[str, _Load] = {}  # req id -> its load, waiting or sent, until the job ends
        self._stores: dict[int, _Store] = {}  # job id -> store sent to the workers
        self._own_job_ids = itertools.count(-1, -1)  # ids of load jobs the cache never planned (failures)
        self._fences = StoreFences()  # engine blocks of ended requests that stores in flight still read
        self._stats = FlexKVConnectorStats()
        self._kv_cache_manager: KVCacheManager | None = None
        self._reannounce = False  # vLLM's prefix cache was reset: the router forgot our tiers
        self.node = None  # distributed reuse (FLEXKV_ENABLE_DISTRIBUTED)
        try:
            if config.enable_distributed:
                from flexkv_core.distributed import start_distributed

                self.node = start_distributed(self.cache, config)
            if self.service is not None:
                self.service.handlers.update(self._service_handlers())
        except BaseException:
            if self.node is not None:
                self.node.close()
            self.cache.close()
            self._stop_metrics_server()
            if self.service is not None:
                self.service.stop()
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

    def _fault(self, point: str) -> None:
        if self._faults is not None:
            self._faults.check(point)

    # ---- the service (attach, status) ----------------------------------------------------------------

    def _claim_service(self):
        """Bind FLEXKV_SERVER_RECV_PORT (or fail naming its holder); until `_service_handlers` are added once
        the cache exists it answers ``whoami``, and ``attach`` with no pool (the workers ask again)."""
        from flexkv_core.service import CacheService

        service = CacheService(self.config.server_recv_port, {"attach": lambda: {"pool": None}}, share=False,
                               name="vllm-flexkv-connector")
        service.start()
        if service.attached_to is not None:
            service.stop()
            raise NotImplementedError(
                f"FLEXKV_SERVER_RECV_PORT {self.config.server_recv_port} is served by a shared cache (pid "
                f"{service.attached_to}): set FLEXKV_SHARE_SERVER=1 to use it, or give this engine its own port")
        return service

    def _service_handlers(self) -> dict:
        handlers = {**self.cache.service_handlers(), "in_flight": self.in_flight}
        if self.node is not None:
            handlers["distributed"] = self.node.describe
        return handlers

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
        self._announcer.request_seen()
        st = self._track(request)
        start = num_computed_tokens // self.block_size
        st.lookup_start, st.lookup_blocks, st.looked_up = start, 0, True
        if request.request_id in self._load_of:
            return 0, False  # a load of ours is still in flight for it: never plan a second one
        if st.no_loads:
            # One of its loads failed and vLLM is recomputing: were the failure to repeat (a fault that
            # persists), offering the hit again would loop the request through failing loads forever.
            return 0, False
        hashes = st.int_hashes(len(request.block_hashes))
        if start >= len(hashes):
            return 0, False
        found = self.cache.lookup(hashes[start:]).total
        self._fault("get_num_new_matched_tokens")
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
        for load in self._waiting_loads.values():
            if load.staging is None or load.cancelled:
                continue
            if load.plan is None or load.plan.ready.done():
                load.staging = None  # staged: nothing to check against any more
                continue
            if not load.staging.isdisjoint(hashes):
                return True
        return False

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
        engine_blocks = [b.block_id for b in blocks.blocks[0][start:start + n]]
        if len(engine_blocks) != n:
            raise RuntimeError(f"request {request.request_id}: {n} blocks to load from block {start}, but vLLM "
                               f"allocated {len(engine_blocks)} there")
        plan = self.cache.prepare_load(st.int_hashes(start + n)[start:start + n])
        for tier in HIT_TIERS:  # remote: blocks another node serves, fetched into our CPU tier first
            self._stats.add(f"hit_tokens_{tier}", plan.tier_hits.get(Tier(tier), 0) * self.block_size)
        k = len(plan.block_hashes)
        if k < n:
            log.info("request %s: %d of %d blocks vanished between lookup and load; vLLM recomputes them",
                     request.request_id, n - k, n)
        load = _Load(request.request_id, plan.job_id, plan, engine_blocks[:k], engine_blocks[k:],
                     staging=None if plan.ready.done() else frozenset(plan.block_hashes))
        self._waiting_loads[request.request_id] = self._load_of[request.request_id] = load
        self._fences.loaded_into(engine_blocks)  # written by the load: fenced like any reallocated block
        self._fault("update_state_after_alloc")

    def fail_load(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """``update_state_after_alloc`` failed. vLLM waits for this request's load all the same, so one job
        goes out for it, with every block vLLM expected from us as a load error: vLLM recomputes them."""
        if num_external_tokens <= 0:
            return
        req_id = request.request_id
        load = self._waiting_loads.get(req_id)
        if load is not None:  # planned before the failure: keep its job, deliver nothing
            self._release(load)
            load.missing_block_ids = load.block_ids + load.missing_block_ids
            load.block_ids = []
            return
        st = self._requests.get(req_id)
        start = st.lookup_start if st is not None else 0
        n = -(-num_external_tokens // self.block_size)
        try:
            engine_blocks = [b.block_id for b in blocks.blocks[0][start:start + n]]
        except Exception:  # noqa: BLE001 - then every block of the request: vLLM recomputes it whole
            (engine_blocks, *_) = self._kv_cache_manager.get_block_ids(req_id) if self._kv_cache_manager else ([],)
        load = _Load(req_id, next(self._own_job_ids), None, [], list(engine_blocks))
        self._waiting_loads[req_id] = self._load_of[req_id] = load

    def _no_more_loads(self, req_id: str) -> None:
        st = self._requests.get(req_id)
        if st is not None:
            st.no_loads = True

    def _release(self, load: _Load) -> None:
        """Give the load's plan back to the cache (unpins; safe while staging runs)."""
        plan, load.plan, load.staging = load.plan, None, None
        if plan is not None:
            self.cache.finish_load(plan)

    def _ready_loads(self, pool: str | None) -> list[LoadJob]:
        """Load jobs for every waiting load whose bytes are in CPU slots now (or that was cancelled).
        A load planned against another pool than ``pool`` (a shared cache's owner restarted) is a miss."""
        jobs = []
        for req_id, load in list(self._waiting_loads.items()):
            if load.cancelled or load.plan is None or load.plan.pool != pool:
                usable = 0
            elif load.plan.ready.done():
                try:
                    usable = int(load.plan.ready.result())
                except Exception:  # noqa: BLE001 - any staging failure is a miss, never a hang
                    log.exception("staging the load of request %s failed", req_id)
                    usable = 0
            else:
                continue  # still staging from SSD: the request keeps waiting, the batch does not
            jobs.append(self._send_load(load, usable))
        return jobs

    def _send_load(self, load: _Load, usable: int) -> LoadJob:
        del self._waiting_loads[load.req_id]
        load.staging = None
        failed = load.block_ids[usable:] + load.missing_block_ids
        if failed and not load.cancelled:
            self._stats.add("load_error_blocks", len(failed))
            self._no_more_loads(load.req_id)
        load.pending_workers = self.num_workers
        self._loads[load.job_id] = load
        slots = load.plan.slots[:usable] if load.plan is not None else []
        return LoadJob(load.job_id, load.req_id, load.block_ids[:usable], slots, [] if load.cancelled else failed)

    # ---- stores --------------------------------------------------------------------------------------

    def _store_jobs(self, scheduler_output: SchedulerOutput, pool: str) -> list[StoreJob]:
        # This loop visits every running request on every step: keep it to a few operations each.
        # vLLM advances num_computed_tokens only after building the metadata (as its offloading
        # connector relies on too), so computed + scheduled is what the step leaves computed.
        jobs = []
        bs = self.block_size
        requests = self._requests
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            st = requests.get(req_id)
            if st is None:
                continue
            full = (st.request.num_computed_tokens + num_scheduled) // bs
            if full <= st.stored_upto or full <= st.store_tried_at:
                continue  # nothing completed since we stored (or last tried to)
            # Capped by the known hashes: a speculative or not yet sampled token has no hash, and a block
            # holding one must not be stored.
            full = min(full, len(st.request.block_hashes))
            if full <= st.stored_upto or full <= st.store_tried_at:
                continue
            job = self._store_job(st, full, scheduler_output, pool)
            if job is not None:
                jobs.append(job)
        return jobs

    def _store_job(self, st: _Request, full: int, scheduler_output: SchedulerOutput, pool: str) -> StoreJob | None:
        """Offer blocks [stored_upto, full) of a request to the CPU tier; the job for those it reserved."""
        bs = self.block_size
        request = st.request
        hashes = st.int_hashes(full)
        start = st.stored_upto
        plan = self.cache.reserve_store(hashes[start:full], hashes[start - 1] if start else None,
                                        request.all_token_ids[start * bs:full * bs])
        if not plan.covered and start:
            # The block our chain ends with left every tier meanwhile (evicted): chaining onto it would
            # leave a hole. Offer the request's chain from its root instead (its blocks are all valid).
            start = 0
            plan = self.cache.reserve_store(hashes[:full], None, request.all_token_ids[:full * bs])
        st.stored_upto = start + plan.covered
        if st.stored_upto < full:
            st.store_tried_at = full  # no room for all: try again when the next block completes
        if not plan.block_hashes:
            return None  # held already (or no room at all)
        if plan.pool != pool:  # a shared cache's owner changed under us: these slots are not the workers' pool
            self.cache.complete_store(plan, ok=False)
            st.stored_upto = min(st.stored_upto, start + plan.positions[0])
            return None
        block_ids = self._engine_block_ids(st.request.request_id, [start + p for p in plan.positions],
                                           scheduler_output)
        if block_ids is None:
            self.cache.complete_store(plan, ok=False)
            st.stored_upto = min(st.stored_upto, start + plan.positions[0])
            log.warning("no block table for request %s: its blocks are not stored", request.request_id)
            return None
        self._stores[plan.job_id] = _Store(plan, request.request_id, start, self.num_workers, block_ids=block_ids)
        return StoreJob(plan.job_id, request.request_id, block_ids, list(plan.slots))

    def _engine_block_ids(self, req_id: str, positions: list[int],
                          scheduler_output: SchedulerOutput) -> list[int] | None:
        """The engine blocks at ``positions`` of a request's block table (None if it has no such blocks).
        Reads only those entries: a whole table costs as much as the request is long, on every store."""
        if self._kv_cache_manager is not None:
            (blocks, *_) = self._kv_cache_manager.get_blocks(req_id).blocks
        else:
            state = scheduler_output.kv_connector_block_state
            ids = state.get_block_ids(req_id) if state is not None else None
            if ids is None:
                return None
            return [ids[0][i] for i in positions] if positions[-1] < len(ids[0]) else None
        if positions[-1] >= len(blocks):
            return None
        return [blocks[i].block_id for i in positions]

    def _unwind_store(self, store: _Store) -> None:
        """A store's blocks will not be published: its request offers them again later."""
        st = self._requests.get(store.req_id)
        if st is not None and store.plan.positions:
            st.stored_upto = min(st.stored_upto, store.start + store.plan.positions[0])

    # ---- per step --------------------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> FlexKVConnectorMetadata:
        self.note_gpu_resets()
        if not scheduler_output.total_num_scheduled_tokens:
            self._idle_wait_for_staging()
            self._announcer.idle_tick()
        pool = self.pool_info  # read once: a shared cache's pool can change between two reads
        name = pool.name if pool is not None else None
        loads = self._ready_loads(name)
        stores = self._store_jobs(scheduler_output, name) if name is not None else []
        self._forget(scheduler_output.finished_req_ids)
        flush = self._fences.to_flush(scheduler_output, self._stores)
        meta = FlexKVConnectorMetadata(loads=loads, stores=stores, flush=flush, pool=name)
        self._fault("build_connector_meta")
        self._mark_sent(meta)
        return meta

    def abandon_step(self, scheduler_output: SchedulerOutput) -> FlexKVConnectorMetadata:
        """``build_connector_meta`` failed: the metadata to send instead. Every load not sent yet goes out
        now with all its blocks as load errors (vLLM recomputes them; a load left waiting could wait
        forever if the failure repeats), and every store not sent yet is rolled back."""
        for job_id, store in list(self._stores.items()):
            if not store.sent:
                del self._stores[job_id]
                self._unwind_store(store)
                self._quietly("roll back a store", lambda s=store: self.cache.complete_store(s.plan, ok=False))
        unsent = [load for load in self._loads.values() if not load.sent]
        for load in unsent:
            del self._loads[load.job_id]
            self._waiting_loads[load.req_id] = load
        for load in self._waiting_loads.values():
            self._quietly("release a load", lambda ld=load: self._release(ld))
            load.missing_block_ids = load.block_ids + load.missing_block_ids
            load.block_ids = []
        # Stores in flight may read blocks handed out again in this step: finish them all first.
        meta = FlexKVConnectorMetadata(loads=[self._send_load(load, 0) for load in list(self._waiting_loads.values())],
                                       flush=sorted(self._stores), pool=self.cache.pool_name)
        self._forget(scheduler_output.finished_req_ids or ())
        self._mark_sent(meta)
        return meta

    def _mark_sent(self, meta: FlexKVConnectorMetadata) -> None:
        for job in meta.loads:
            self._loads[job.job_id].sent = True
        for job in meta.stores:
            self._stores[job.job_id].sent = True

    def _forget(self, finished_req_ids: Iterable[str] | None) -> None:
        for req_id in finished_req_ids or ():
            self._requests.pop(req_id, None)

    def _quietly(self, what: str, action: Callable[[], object]) -> None:
        """Run a clean-up step of a failure path; a failure of its own is logged, not raised."""
        try:
            action()
        except Exception:  # noqa: BLE001 - already degrading: the rest of the clean-up must still run
            log.exception("FlexKV: could not %s while recovering from a failure", what)

    def _idle_wait_for_staging(self) -> None:
        """A step with nothing to compute, while loads wait for SSD reads: wait a little for them instead
        of letting the engine spin (on few cores the spinning slows the very reads it waits for)."""
        pending = [load.plan.ready for load in self._waiting_loads.values()
                   if not load.cancelled and load.plan is not None and not load.plan.ready.done()]
        if pending:
            wait_futures(pending, timeout=IDLE_WAIT_S, return_when=FIRST_COMPLETED)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if meta is None:
            return
        if not isinstance(meta, FlexKVWorkerMetadata):
            raise TypeError(f"FlexKV connector got worker metadata of type {type(meta).__name__}")
        # In job order: a job's blocks may chain onto blocks an earlier job of the step stores, and the
        # parents must be published (announced) first.
        for job_id in sorted(meta.done.keys() | meta.failed.keys()):
            job: _Store | _Load | None = self._stores.get(job_id) or self._loads.get(job_id)
            if job is None:
                log.warning("workers reported unknown FlexKV job %d", job_id)
                continue
            job.pending_workers -= meta.done.get(job_id, 0) + meta.failed.get(job_id, 0)
            job.failed |= bool(meta.failed.get(job_id))
            if job.pending_workers > 0:
                continue
            try:
                self._fault("update_connector_output")
                self._end_job(job_id, job)
            except Exception as exc:  # noqa: BLE001 - one job's failure must not strand the others
                self.failures.record("update_connector_output", [job.req_id], exc,
                                     "its job rolled back (a store not published, a load unpinned)")
                self._drop_job(job_id, job)

    def _end_job(self, job_id: int, job: _Store | _Load) -> None:
        if isinstance(job, _Store):
            del self._stores[job_id]
            self._fences.store_ended(job_id, job)
            published = self.cache.complete_store(job.plan, ok=not job.failed and not job.stale)
            if job.failed or published < len(job.plan.block_hashes):
                self._unwind_store(job)
            return
        del self._loads[job_id]
        if self._load_of.get(job.req_id) is job:
            del self._load_of[job.req_id]
        if job.failed:
            self._no_more_loads(job.req_id)
        plan = job.plan
        job.plan = None
        if plan is not None:
            self.cache.finish_load(plan, copied=0 if job.failed else len(job.block_ids))

    def _drop_job(self, job_id: int, job: _Store | _Load) -> None:
        """Forget a job whose completion failed, giving back what it still holds."""
        if isinstance(job, _Store):
            if self._stores.pop(job_id, None) is not None:
                self._fences.store_ended(job_id, job)
                self._unwind_store(job)
                self._quietly("roll back a store", lambda: self.cache.complete_store(job.plan, ok=False))
            return
        self._loads.pop(job_id, None)
        if self._load_of.get(job.req_id) is job:
            del self._load_of[job.req_id]
        self._quietly("release a load", lambda: self._release(job))

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        """vLLM may free the request's blocks now: its stores in flight are fenced from here on (a step that
        hands one of their blocks out again first finishes them). A load not sent yet is cancelled."""
        self._requests.pop(request.request_id, None)
        self._fences.request_ended(request.request_id, self._stores)
        load = self._waiting_loads.get(request.request_id)
        if load is not None and not load.cancelled:
            load.cancelled = True
            self._release(load)  # safe while staging runs: the cache unpins when it ends
        self._fault("request_finished")
        return False, None

    def take_events(self) -> Iterable[KVCacheEvent]:
        # vLLM collects these right after its own events of the step. A reset of vLLM's prefix cache
        # publishes AllBlocksCleared there, which makes Dynamo's router forget our tiers too: follow it
        # with everything we hold (see note_gpu_resets).
        if self._reannounce:
            self._reannounce = False
            events = self.cache.reannounce()
            log.info("vLLM's prefix cache was reset: re-announcing %d tier events to the router", len(events))
        elif self._announcer.due():  # before any request, once a subscriber listens (see announce)
            events = self.cache.reannounce()
            log.info("announcing what our tiers hold to the KV-event subscribers: %d blocks", len(events))
            return Announcer.announcement(to_vllm_events(events, block_size=self.block_size))
        elif self._announcer.holding:
            return ()
        else:
            events = self.cache.take_events()
        self._fault("take_events")
        if not self._events_enabled or not events:
            return ()
        return to_vllm_events(events, block_size=self.block_size)

    def note_gpu_resets(self) -> None:
        """Look for vLLM's own ``AllBlocksCleared`` among the events its block pool has queued for this
        step's batch; one means vLLM's prefix cache was reset since the last batch (any number of times),
        and `take_events` must then re-announce our tiers after it.

        vLLM drains that queue in ``update_from_output`` right after asking the connector for its stats
        (``get_kv_connector_stats``) and right before asking it for its events (``take_events``), so
        looking there (and, for good measure, when planning each step) sees every reset exactly in the
        batch our re-announcement joins."""
        pool = getattr(self._kv_cache_manager, "block_pool", None)
        if pool is None or not getattr(pool, "enable_kv_cache_events", False):
            return
        for event in pool.kv_event_queue:
            if type(event) is AllBlocksCleared:
                self._reannounce = True
                return

    def get_stats(self) -> FlexKVConnectorStats | None:
        self.note_gpu_resets()
        self._fault("get_kv_connector_stats")
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, FlexKVConnectorStats()
        return stats

    def has_pending_work(self) -> bool:
        """Loads waiting for SSD staging need steps to go out, stores in flight steps to start and to be
        reported, and an announcement of our tiers (before the first request, or one still being sent in
        parts) steps to reach the router, even when nothing else runs."""
        self._fault("has_pending_push_work")
        return (bool(self._waiting_loads) or bool(self._stores) or self._announcer.waiting
                or self.cache.reannouncing())

    def reset_cache(self) -> bool:
        self._fault("reset_cache")
        # Stores in flight hold bytes computed before the reset (weights may have changed): they end as
        # rollbacks. Their slots stay reserved until the workers report them: a worker may still write.
        for st in self._stores.values():
            st.stale = True
        self.cache.reset()
        return True

    def in_flight(self) -> dict[str, int]:
        """Jobs not yet over (tests: all zero once the engine is idle)."""
        return {"waiting_loads": len(self._waiting_loads), "loads": len(self._loads),
                "stores": len(self._stores), "requests": len(self._requests)}

    def _stop_metrics_server(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    def shutdown(self) -> None:
        self._stop_metrics_server()
        with _LIVE_LOCK:
            if _LIVE.get(self._live_key) is self:
                del _LIVE[self._live_key]
        if self.service is not None:
            self.service.stop()
            self.service = None
        if self.node is not None:
            self.node.close()
            self.node = None
        # No worker reports anything any more: roll back the stores in flight (the workers stopped before
        # the scheduler, or their copies land in a pool nobody reads again) and unpin loads.
        for st in self._stores.values():
            self.cache.complete_store(st.plan, ok=False)
        for load in [*self._loads.values(), *self._waiting_loads.values()]:
            self._release(load)
        self._stores, self._loads, self._waiting_loads = {}, {}, {}
        self._fences.clear()
        self._load_of = {}
        self.cache.close()
