"""The worker side of the connector: maps the CPU pool and runs the copies the scheduler names.

Each vLLM worker (one per TP rank) keeps views of its KV cache, one per (layer, K or V) *plane*, and a
`flexkv_core.transfer.BlockCopier` that copies its own rank's part of a block between those views and
the shared CPU pool.

**Set-up, off the request path.** vLLM registers the KV caches of every worker *before* it creates the
scheduler, whose connector owns the cache and its pool (vLLM 0.31 ``EngineCore.__init__``:
``_initialize_kv_caches``, then ``Scheduler(...)``). So ``register_kv_caches`` starts a thread that asks
the cache's service at ``FLEXKV_SERVER_RECV_PORT`` for the pool (``attach``) until it answers, maps the
pool, checks its layout against this worker's KV cache and builds the copier, which on CUDA starts pinning
the pool in the background (`flexkv_core.tiers.cpu.CpuPool.start_pinning`). The per-step metadata
carries no pool facts. Jobs that arrive before the copier is ready wait for it without holding up the
step (stores stay deferred, loads queued; their requests keep waiting), and a copy whose pool slots are
not pinned yet starts as soon as they are. A node's shared cache (``FLEXKV_SHARE_SERVER=1``) gets a new pool
when its owner restarts: each step's metadata names the pool its jobs refer to, and a worker mapped to
another one lets its copies end, fails the jobs of the old pool and attaches again (`_follow_pool`).

**Stores never hold up a step.** vLLM 0.31's own offloading connector is the model:

* ``run_stores`` (vLLM's ``wait_for_save``, after the forward pass) only *records* the step's store
  jobs; ``handle_preemptions`` (the start of the next step, before its forward pass) starts them: on the
  CPU a helper thread copies with the GIL released, on CUDA a side stream waits for the compute stream by
  an event. Each step's answer (``take_worker_meta``) reports the jobs found finished since the last one.
* GPU blocks a store reads are protected by *fences*, not by holding them: the scheduler names in
  ``flush`` the jobs whose blocks vLLM hands out again in this step (or whose request was preempted), and
  ``handle_preemptions`` finishes those before the forward pass can overwrite anything. Fences were picked
  over the alternative, ``request_finished`` asking vLLM to delay freeing the blocks until
  ``finished_sending``: a delayed free keeps a finished request's blocks allocated until a later step
  reports its stores, so vLLM's ``reset_prefix_cache`` fails meanwhile, and in an engine nobody steps
  (offline ``LLM`` between calls) the blocks stay taken; preemption would still need a fence. A fence
  costs nothing unless a just-freed block is reallocated while its store runs, which vLLM's free list
  (freed blocks go to its tail) makes rare.
* Loads: ``start_loads`` (``start_load_kv``, after the forward pass) starts the copies pool -> engine; on
  the CPU they are done on return, on CUDA a load stream runs them; each finished load is reported by
  ``take_finished_loads`` in the step it completes, with its failed blocks in ``take_load_errors``.

How vLLM shapes one layer's KV cache, and so the plane views (`plane_views`):

* CPU attention backend (``CPU_ATTN``, layout LBHNC): ``[num_blocks, num_kv_heads, block_size,
  2 * head_size]``, contiguous, all layers slices of one tensor. Each (block, head) holds ``block_size *
  head_size`` K values followed by as many V values (the kernel views it as ``[B, H, 2 * N, D]`` and
  splits dim 2), so one block of one layer is one contiguous run of K and V rows.
* CUDA backends, by shape: ``[2, B, N, H, D]`` (K/V outermost) or ``[B, 2, N, H, D]`` (K/V per block);
  MLA latent caches ``[B, N, D]`` are a single plane. The CUDA path is written but untested here.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from flexkv_core.config import FlexKVConfig
from flexkv_core.layout import KVLayout

from .metadata import FlexKVConnectorMetadata, FlexKVWorkerMetadata, LoadJob, PoolInfo, StoreJob
from .stats import FlexKVConnectorStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

    from flexkv_core.transfer import BlockCopier, CopyJob

log = logging.getLogger(__name__)

__all__ = ["FlexKVWorker", "plane_views"]

#: How long one ``attach`` request to the cache's service may take before it is sent again.
ATTACH_POLL_S = 2.0
#: Longest a fence waits for the pool to be attached (a store that never started read nothing: it fails).
ATTACH_WAIT_S = 60.0


def plane_views(kv: torch.Tensor, *, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                kv_planes: int = 2) -> list[torch.Tensor]:
    """Views of one layer's KV cache, ``kv_planes`` of them, each indexed by engine block id first, with
    one block's part contiguous (what `flexkv_core.transfer.BlockCopier` wants).

    * Block-major layouts (CPU_ATTN ``[B, H, N, 2D]``, ``[B, 2, N, H, D]``, MLA ``[B, N, D]``): one
      block of the layer is one contiguous run of ``kv_planes * plane`` elements, cut into ``kv_planes``
      equal parts. For CPU_ATTN a part is not "the K plane" (K and V rows alternate per head): a slot
      holds the block's bytes in the engine's own order, and the cache identity names that layout.
    * K/V-major layouts (``[2, B, N, H, D]``): ``kv[0]`` and ``kv[1]``.

    Raises ValueError naming the shape when the layout is neither.
    """
    plane = block_size * num_kv_heads * head_size
    shape = tuple(kv.shape)
    if kv.dim() >= 2 and shape[0] == num_blocks and kv[0].is_contiguous() and kv[0].numel() == kv_planes * plane:
        # (blocks, elements of one block) over the same memory, whatever the block stride (padding).
        flat = kv.as_strided((num_blocks, kv_planes * plane), (kv.stride(0), 1), kv.storage_offset())
        return [flat[:, i * plane:(i + 1) * plane] for i in range(kv_planes)]
    if kv_planes == 2 and kv.dim() >= 2 and shape[0] == 2 and shape[1] == num_blocks and kv[0, 0].numel() == plane:
        return [kv[0], kv[1]]
    raise ValueError(f"unknown KV cache layout {shape} (strides {kv.stride()}) for num_blocks={num_blocks}, "
                     f"block_size={block_size}, num_kv_heads={num_kv_heads}, head_size={head_size}, "
                     f"planes={kv_planes}: FlexKV cannot map it")


@dataclass
class _Running:
    """A store or load job whose copies were started."""

    job: StoreJob | LoadJob
    copy: CopyJob | None  # None: nothing to copy
    started: float


class FlexKVWorker:
    """The worker-side connector logic of one TP rank (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, config: FlexKVConfig) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        from .scheduler import layout_from_vllm

        self.tp_rank = get_tensor_model_parallel_rank()
        group = kv_cache_config.kv_cache_groups[0]
        self.layer_names = list(group.layer_names)  # the scheduler's layout counts layers in this order
        self.spec = group.kv_cache_spec
        self.num_blocks = kv_cache_config.num_blocks
        self.endpoint = config.server_recv_port
        self.layout = layout_from_vllm(vllm_config, kv_cache_config)[0]  # what the pool's layout must be
        self.planes: list[torch.Tensor] = []
        self.pool = None
        self.pool_info: PoolInfo | None = None
        self.copier: BlockCopier | None = None
        self._ready = threading.Condition()  # notified when the copier is built or attaching failed
        self._attach_error: str | None = None
        self._closing = threading.Event()
        self._attach_thread: threading.Thread | None = None
        self._deferred: list[StoreJob] = []  # recorded by run_stores, started by the next step
        self._pool_of: dict[int, str | None] = {}  # job id -> the pool its slots are in, until it starts
        self._stores: dict[int, _Running] = {}  # job id -> store in flight
        self._queued_loads: list[LoadJob] = []  # loads waiting for the copier
        self._loads: list[_Running] = []
        self._finished: set[str] = set()
        self._errors: set[int] = set()
        self._meta = FlexKVWorkerMetadata()
        self._stats = FlexKVConnectorStats()

    # ---- set-up ------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.layer_names if name not in kv_caches]
        if missing:
            raise ValueError(f"FlexKV: vLLM registered no KV cache for layers {missing}")
        planes_per_layer = 1 if type(self.spec).__name__.startswith("MLA") else 2
        self.planes = []
        for name in self.layer_names:
            self.planes.extend(plane_views(kv_caches[name], num_blocks=self.num_blocks,
                                           block_size=self.spec.block_size,
                                           num_kv_heads=self.spec.num_kv_heads, head_size=self.spec.head_size,
                                           kv_planes=planes_per_layer))
        kv = kv_caches[self.layer_names[0]]
        log.info("FlexKV worker rank %d: %d planes of %d layers, KV cache %s %s on %s; attaching to the cache "
                 "at %s in the background", self.tp_rank, len(self.planes), len(self.layer_names), tuple(kv.shape),
                 kv.dtype, kv.device, self.endpoint)
        self._attach_thread = threading.Thread(target=self._attach, name=f"flexkv-attach-{self.tp_rank}",
                                               daemon=True)
        self._attach_thread.start()

    def _attach(self) -> None:
        """The attach thread: wait for the cache's service, map its pool, build the copier."""
        from flexkv_core.client import CacheClient, ServiceUnavailable
        from flexkv_core.tiers.cpu import CpuPool
        from flexkv_core.transfer import BlockCopier

        started = time.monotonic()
        next_note = started + 60
        try:
            with CacheClient(self.endpoint, timeout_s=ATTACH_POLL_S) as client:
                while True:
                    try:
                        answer = client.call("attach")
                        if answer.get("pool") is not None:
                            break
                        raise ServiceUnavailable(self.endpoint, "the shared cache has no pool yet")
                    except ServiceUnavailable:
                        if self._closing.wait(0.05):
                            return
                        if time.monotonic() > next_note:  # vLLM may compile for minutes before the scheduler starts
                            next_note += 60
                            log.info("FlexKV worker rank %d: still waiting for the cache service at %s (%.0f s)",
                                     self.tp_rank, self.endpoint, time.monotonic() - started)
            info = PoolInfo(answer["pool"], answer["num_slots"], answer["slot_bytes"],
                            KVLayout(**answer["layout"]))
            if info.layout != self.layout:
                raise ValueError(f"the cache at {self.endpoint} holds blocks of layout {info.layout}, this worker's "
                                 f"KV cache is {self.layout}: is another engine's cache at that endpoint?")
            pool = CpuPool.attach(info.name, info.num_slots, info.slot_bytes)
            try:
                copier = BlockCopier(pool, info.layout, self.tp_rank, self.planes)
            except BaseException:
                pool.close()
                raise
            with self._ready:
                self.pool, self.pool_info, self.copier = pool, info, copier
                self._ready.notify_all()
            log.info("FlexKV worker rank %d attached to CPU pool %s (%d slots) in %.2f s", self.tp_rank, info.name,
                     info.num_slots, time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - every job of this worker then fails: recomputed, never wrong
            log.exception("FlexKV worker rank %d could not attach to the cache at %s: its copies fail (requests "
                          "are recomputed)", self.tp_rank, self.endpoint)
            with self._ready:
                self._attach_error = f"{type(exc).__name__}: {exc}"
                self._ready.notify_all()

    def fail_attach(self, why: str) -> None:
        """This worker will never map the pool (its KV caches could not be registered): every copy job fails
        at once, as a load error or a failed store, instead of waiting for an attachment that never comes."""
        with self._ready:
            self._attach_error = why
            self._ready.notify_all()

    def _copier(self, timeout: float) -> BlockCopier | None:
        """The copier once attached (waiting up to ``timeout`` seconds); None meanwhile. RuntimeError if
        attaching failed."""
        with self._ready:
            self._ready.wait_for(lambda: self.copier is not None or self._attach_error is not None, timeout)
            if self._attach_error is not None:
                raise RuntimeError(f"FlexKV worker is not attached to its cache: {self._attach_error}")
            return self.copier

    # ---- a shared cache's pool changes when its owner restarts ----------------------------------------

    def _in_our_pool(self, job_id: int) -> bool:
        """Whether a job names slots of the pool this worker has mapped (called once per job, as it starts)."""
        pool = self._pool_of.pop(job_id, None)
        return pool is None or self.pool_info is None or pool == self.pool_info.name

    def _follow_pool(self, pool: str | None) -> None:
        """The scheduler names another pool than ours (a shared cache's owner restarted with a new one): let
        the copies running into the old pool end, unmap it and attach again. Jobs naming the old pool fail
        (`_in_our_pool`); jobs naming the new one wait until the new pool is mapped."""
        with self._ready:
            current = self.pool_info
        if pool is None or current is None or pool == current.name:
            return
        log.warning("FlexKV worker rank %d: the cache's pool is now %s (was %s): its owner restarted; attaching "
                    "again", self.tp_rank, pool, current.name)
        for job_id, run in list(self._stores.items()):
            try:
                if run.copy is not None:
                    run.copy.wait()
            except Exception:  # noqa: BLE001 - reported failed below either way
                pass
            self._end_store(job_id, ok=False)
        for run in self._loads:
            try:
                if run.copy is not None:
                    run.copy.wait()
            except Exception:  # noqa: BLE001
                pass
            self._end_load(run, ok=False)
        self._loads = []
        if self._attach_thread is not None:
            self._attach_thread.join(ATTACH_POLL_S + 1)
        with self._ready:
            copier, old, self.copier, self.pool, self.pool_info = self.copier, self.pool, None, None, None
            self._attach_error = None
        if copier is not None:
            copier.close()
        if old is not None:
            old.close()
        self._attach_thread = threading.Thread(target=self._attach, name=f"flexkv-attach-{self.tp_rank}",
                                               daemon=True)
        self._attach_thread.start()

    # ---- stores ------------------------------------------------------------------------------------

    def run_stores(self, meta: FlexKVConnectorMetadata) -> None:
        """``wait_for_save``: record this step's store jobs; the next step starts them."""
        for job in meta.stores:
            self._pool_of[job.job_id] = meta.pool
        self._deferred.extend(meta.stores)

    def handle_preemptions(self, meta: FlexKVConnectorMetadata) -> None:
        """The start of a step, before its forward pass: start the stores recorded by the last step, then
        finish every store whose engine blocks this step may overwrite (``meta.flush``)."""
        self._follow_pool(meta.pool)
        self._start_deferred(ATTACH_WAIT_S if meta.flush else 0)
        for job_id in meta.flush:
            run = self._stores.get(job_id)
            if run is None:
                continue  # never started (failed at once) or already reported
            try:
                if run.copy is not None:
                    run.copy.wait()
                ok = True
            except Exception:  # noqa: BLE001
                log.exception("FlexKV store job %d (request %s) failed", job_id, run.job.req_id)
                ok = False
            self._end_store(job_id, ok)

    def _start_deferred(self, attach_wait: float) -> None:
        if not self._deferred:
            return
        try:
            copier = self._copier(attach_wait)
        except RuntimeError:
            log.warning("FlexKV: %d store jobs fail: the worker is not attached", len(self._deferred))
            for job in self._deferred:
                self._report(job.job_id, ok=False)
            self._deferred = []
            return
        if copier is None:
            if attach_wait:  # a fence asked for these: they never read anything, so failing them is safe
                for job in self._deferred:
                    self._report(job.job_id, ok=False)
                self._deferred = []
            return  # keep them for the next step
        now = time.perf_counter()
        for job in self._deferred:
            if not self._in_our_pool(job.job_id):
                self._report(job.job_id, ok=False)
                continue
            try:
                copy = copier.to_pool(job.block_ids, job.slots) if job.block_ids else None
            except Exception:  # noqa: BLE001 - a failed store is rolled back by the scheduler
                log.exception("FlexKV store job %d (request %s) could not start", job.job_id, job.req_id)
                self._report(job.job_id, ok=False)
                continue
            self._stores[job.job_id] = _Running(job, copy, now)
        self._deferred = []

    def _poll_stores(self) -> None:
        for job_id, run in list(self._stores.items()):
            try:
                if run.copy is not None and not run.copy.done():
                    continue
                if run.copy is not None:
                    run.copy.wait()  # done: returns at once, re-raising a failed copy's error
                ok = True
            except Exception:  # noqa: BLE001
                log.exception("FlexKV store job %d (request %s) failed", job_id, run.job.req_id)
                ok = False
            self._end_store(job_id, ok)

    def _end_store(self, job_id: int, ok: bool) -> None:
        run = self._stores.pop(job_id)
        self._report(job_id, ok)
        if ok and run.copy is not None:
            self._stats.add("store_blocks", run.copy.num_blocks)
            self._stats.add("store_bytes", run.copy.nbytes)
            self._stats.add("store_seconds", time.perf_counter() - run.started)

    def _report(self, job_id: int, ok: bool) -> None:
        target = self._meta.done if ok else self._meta.failed
        target[job_id] = target.get(job_id, 0) + 1

    # ---- loads -------------------------------------------------------------------------------------

    def start_loads(self, meta: FlexKVConnectorMetadata) -> None:
        """``start_load_kv`` (after the forward pass): start this step's loads."""
        self._follow_pool(meta.pool)
        for job in meta.loads:
            self._pool_of[job.job_id] = meta.pool
        self._queued_loads.extend(meta.loads)
        self._start_loads()

    def _start_loads(self) -> None:
        if not self._queued_loads:
            return
        try:
            copier = self._copier(0)
        except RuntimeError:
            copier = None
            for job in self._queued_loads:
                self._end_load(_Running(job, None, time.perf_counter()), ok=False)
            self._queued_loads = []
        if copier is None:
            return  # their requests keep waiting: the next step tries again
        for job in self._queued_loads:
            started = time.perf_counter()
            if not self._in_our_pool(job.job_id):
                self._end_load(_Running(job, None, started), ok=False)
                continue
            try:
                copy = copier.from_pool(job.slots, job.block_ids) if job.block_ids else None
            except Exception:  # noqa: BLE001 - a failed copy is a load error, never a crash or hang
                log.exception("FlexKV load job %d (request %s) could not start", job.job_id, job.req_id)
                self._end_load(_Running(job, None, started), ok=False)
                continue
            self._loads.append(_Running(job, copy, started))
        self._queued_loads = []

    def _end_load(self, run: _Running, ok: bool) -> None:
        job = run.job
        assert isinstance(job, LoadJob)
        self._finished.add(job.req_id)
        self._errors.update(job.failed_block_ids)
        self._report(job.job_id, ok)
        if not ok:
            self._errors.update(job.block_ids)
            self._stats.add("load_error_blocks", len(job.block_ids))
        elif run.copy is not None:
            self._stats.add("load_blocks", run.copy.num_blocks)
            self._stats.add("load_bytes", run.copy.nbytes)
            self._stats.add("load_seconds", time.perf_counter() - run.started)

    def take_finished_loads(self) -> set[str]:
        """Request ids whose load finished (or failed) since the last call."""
        self._start_loads()
        still = []
        for run in self._loads:
            try:
                if run.copy is not None and not run.copy.done():
                    still.append(run)
                    continue
                if run.copy is not None:
                    run.copy.wait()
                ok = True
            except Exception:  # noqa: BLE001
                log.exception("FlexKV load job %d (request %s) failed", run.job.job_id, run.job.req_id)
                ok = False
            self._end_load(run, ok)
        self._loads = still
        finished, self._finished = self._finished, set()
        return finished

    def take_load_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    # ---- after a failure at the connector boundary (flexkv_dynamo.guard) ------------------------------

    def fail_loads(self, jobs: list[LoadJob]) -> None:
        """Report each of ``jobs`` that is neither queued, running nor reported as finished with every block
        a load error (vLLM waits for every load job's request, and recomputes the failed blocks)."""
        known = ({run.job.job_id for run in self._loads} | {job.job_id for job in self._queued_loads}
                 | self._meta.done.keys() | self._meta.failed.keys())
        for job in jobs:
            if job.job_id not in known:
                self._end_load(_Running(job, None, time.perf_counter()), ok=False)

    def fail_stores(self, jobs: list[StoreJob]) -> None:
        """Report each of ``jobs`` that was neither recorded nor reported as failed (the scheduler rolls it
        back): `run_stores` only records jobs, so none of these has started copying."""
        recorded = {job.job_id for job in self._deferred} | self._stores.keys()
        for job in jobs:
            if job.job_id not in recorded and job.job_id not in self._meta.done and job.job_id not in self._meta.failed:
                self._report(job.job_id, ok=False)

    def drain_stores(self) -> None:
        """``handle_preemptions`` failed, so this step's fences may not have run: finish every store in
        flight before the forward pass can overwrite its blocks, and fail those never started (they read
        nothing; the scheduler rolls them back)."""
        for job_id, run in list(self._stores.items()):
            try:
                if run.copy is not None:
                    run.copy.wait()
                ok = True
            except Exception:  # noqa: BLE001 - reported failed
                ok = False
            self._end_store(job_id, ok)
        for job in self._deferred:
            self._report(job.job_id, ok=False)
        self._deferred = []

    def report_failed(self, job_ids: list[int]) -> None:
        """Report load jobs this worker finished as failed after all: vLLM was told their blocks are
        load errors, and the scheduler must know it too."""
        for job_id in job_ids:
            if self._meta.done.get(job_id):
                self._meta.done[job_id] -= 1
                if not self._meta.done[job_id]:
                    del self._meta.done[job_id]
                self._meta.failed[job_id] = self._meta.failed.get(job_id, 0) + 1

    def abandon_loads(self) -> set[str]:
        """Wait for every running load's copy, end them all (and the queued ones) as failed, and return every
        request id due (vLLM recomputes their blocks: reported in `take_load_errors` of this step)."""
        for run in self._loads:
            try:
                if run.copy is not None:
                    run.copy.wait()  # nothing may still write into the engine blocks once reported
            except Exception:  # noqa: BLE001 - it is reported failed either way
                pass
            self._end_load(run, ok=False)
        for job in self._queued_loads:
            self._end_load(_Running(job, None, time.perf_counter()), ok=False)
        self._loads, self._queued_loads = [], []
        finished, self._finished = self._finished, set()
        return finished

    # ---- reporting -----------------------------------------------------------------------------------

    def take_worker_meta(self) -> FlexKVWorkerMetadata | None:
        self._poll_stores()
        meta, self._meta = self._meta, FlexKVWorkerMetadata()
        return None if meta.is_empty() else meta

    def get_stats(self) -> FlexKVConnectorStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, FlexKVConnectorStats()
        return stats

    def in_flight(self) -> dict[str, int]:
        """Jobs this worker holds (tests: all zero once the engine is idle)."""
        return {"deferred_stores": len(self._deferred), "stores": len(self._stores),
                "queued_loads": len(self._queued_loads), "loads": len(self._loads)}

    def shutdown(self) -> None:
        """Finish what is in flight (bounded), then unmap the pool. Stores never started are dropped: the
        scheduler side rolls back whatever was not reported."""
        self._closing.set()
        for run in [*self._stores.values(), *self._loads]:
            try:
                if run.copy is not None and run.copy.started:  # one not started yet never touched anything
                    run.copy.wait()
            except Exception:  # noqa: BLE001 - shutting down: nothing left to report to
                pass
        self._deferred, self._stores, self._queued_loads, self._loads = [], {}, [], []
        if self._attach_thread is not None:
            self._attach_thread.join(ATTACH_POLL_S + 1)
        with self._ready:
            copier, pool, self.copier, self.pool = self.copier, self.pool, None, None
        if copier is not None:
            copier.close()
        if pool is not None:
            pool.close()
