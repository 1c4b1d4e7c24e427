"""The worker side of the connector: maps the CPU pool and runs the copies the scheduler names.

Each vLLM worker (one per TP rank) keeps views of its KV cache, one per (layer, K or V) *plane*, and a
`flexkv_core.transfer.BlockCopier` that copies its own rank's part of a block between those views and
the shared CPU pool. It learns the pool's name and layout from the first metadata it is given
(`PoolInfo`) and attaches then.

Timing, per step (see `flexkv_dynamo.metadata` for the contract):

* ``start_loads`` (vLLM's ``start_load_kv``, after the forward pass for asynchronous loads) starts the
  copies pool -> engine; each finished load is reported by ``take_finished_loads`` in the step it
  completes, with its failed blocks in ``take_load_errors`` of the same step.
* ``run_stores`` (``wait_for_save``) copies engine -> pool and returns only once the copies are done,
  so the engine blocks may be reused as soon as the scheduler sees this step's output.

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
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .metadata import FlexKVConnectorMetadata, FlexKVWorkerMetadata, LoadJob, PoolInfo
from .stats import FlexKVConnectorStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger(__name__)

__all__ = ["FlexKVWorker", "plane_views"]


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
class _RunningLoad:
    job: LoadJob
    copy: Any  # flexkv_core.transfer.CopyJob, or None when there is nothing to copy
    started: float
    nbytes: int


class FlexKVWorker:
    """The worker-side connector logic of one TP rank (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self.tp_rank = get_tensor_model_parallel_rank()
        group = kv_cache_config.kv_cache_groups[0]
        self.layer_names = list(group.layer_names)  # the scheduler's layout counts layers in this order
        self.spec = group.kv_cache_spec
        self.num_blocks = kv_cache_config.num_blocks
        self.planes: list[torch.Tensor] = []
        self.pool = None
        self.pool_info: PoolInfo | None = None
        self.copier = None
        self._loads: list[_RunningLoad] = []
        self._finished: set[str] = set()
        self._errors: set[int] = set()
        self._meta = FlexKVWorkerMetadata()
        self._stats = FlexKVConnectorStats()

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
        log.info("FlexKV worker rank %d: %d planes of %d layers, KV cache %s %s on %s", self.tp_rank,
                 len(self.planes), len(self.layer_names), tuple(kv.shape), kv.dtype, kv.device)

    def _ensure_copier(self, info: PoolInfo | None):
        if info is None:
            raise RuntimeError("FlexKV metadata names no CPU pool: is the scheduler side disabled while the "
                               "workers are not?")
        if self.copier is not None and info == self.pool_info:
            return self.copier
        if not self.planes:
            raise RuntimeError("FlexKV worker got copy jobs before vLLM registered its KV caches")
        from flexkv_core.tiers.cpu import CpuPool
        from flexkv_core.transfer import BlockCopier

        if len(self.planes) != info.layout.num_planes:
            raise ValueError(f"FlexKV pool layout has {info.layout.num_planes} planes, this worker's KV cache "
                             f"{len(self.planes)}: scheduler and worker disagree on the model")
        if self.pool is not None:
            self.pool.close()
        self.pool = CpuPool.attach(info.name, info.num_slots, info.slot_bytes)
        if self.planes[0].is_cuda:
            self.pool.pin()  # page-locked once, so copies to and from the GPU are DMA
        self.copier = BlockCopier(self.pool, info.layout, self.tp_rank, self.planes)
        self.pool_info = info
        return self.copier

    # ---- loads -------------------------------------------------------------------------------------

    def start_loads(self, meta: FlexKVConnectorMetadata) -> None:
        for job in meta.loads:
            copy, nbytes = None, 0
            if job.block_ids:  # a job with nothing to copy (a miss, an abort) needs no pool
                try:
                    nbytes = len(job.block_ids) * meta.pool.layout.rank_bytes
                    copy = self._ensure_copier(meta.pool).from_pool(job.slots, job.block_ids)
                except Exception:  # noqa: BLE001 - a failed copy is a load error, never a crash or hang
                    log.exception("FlexKV load job %d (request %s) could not start", job.job_id, job.req_id)
                    self._end_load(_RunningLoad(job, None, time.perf_counter(), 0), ok=False)
                    continue
            self._loads.append(_RunningLoad(job, copy, time.perf_counter(), nbytes))

    def _end_load(self, run: _RunningLoad, ok: bool) -> None:
        job = run.job
        self._finished.add(job.req_id)
        self._errors.update(job.failed_block_ids)
        target = self._meta.done if ok else self._meta.failed
        target[job.job_id] = target.get(job.job_id, 0) + 1
        if not ok:
            self._errors.update(job.block_ids)
            self._stats.add("load_error_blocks", len(job.block_ids))
        elif job.block_ids:
            self._stats.add("load_blocks", len(job.block_ids))
            self._stats.add("load_bytes", run.nbytes)
            self._stats.add("load_seconds", time.perf_counter() - run.started)

    def take_finished_loads(self) -> set[str]:
        """Request ids whose load finished (or failed) since the last call."""
        still = []
        for run in self._loads:
            if run.copy is None:
                self._end_load(run, ok=True)
                continue
            if not run.copy.done():
                still.append(run)
                continue
            try:
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

    # ---- stores ------------------------------------------------------------------------------------

    def run_stores(self, meta: FlexKVConnectorMetadata) -> None:
        if not meta.stores:
            return
        copier = self._ensure_copier(meta.pool)
        started = time.perf_counter()
        running = []
        for job in meta.stores:
            try:
                running.append((job, copier.to_pool(job.block_ids, job.slots)))
            except Exception:  # noqa: BLE001 - a failed store is rolled back by the scheduler
                log.exception("FlexKV store job %d (request %s) could not start", job.job_id, job.req_id)
                self._meta.failed[job.job_id] = self._meta.failed.get(job.job_id, 0) + 1
        blocks = 0
        for job, copy in running:
            try:
                copy.wait()  # the engine may reuse these blocks as soon as this step's output is seen
                self._meta.done[job.job_id] = self._meta.done.get(job.job_id, 0) + 1
                blocks += len(job.block_ids)
            except Exception:  # noqa: BLE001
                log.exception("FlexKV store job %d (request %s) failed", job.job_id, job.req_id)
                self._meta.failed[job.job_id] = self._meta.failed.get(job.job_id, 0) + 1
        if blocks:
            self._stats.add("store_blocks", blocks)
            self._stats.add("store_bytes", blocks * meta.pool.layout.rank_bytes)
            self._stats.add("store_seconds", time.perf_counter() - started)

    # ---- reporting -----------------------------------------------------------------------------------

    def take_worker_meta(self) -> FlexKVWorkerMetadata | None:
        meta, self._meta = self._meta, FlexKVWorkerMetadata()
        return None if meta.is_empty() else meta

    def get_stats(self) -> FlexKVConnectorStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, FlexKVConnectorStats()
        return stats

    def shutdown(self) -> None:
        for run in self._loads:
            if run.copy is not None:
                try:
                    run.copy.wait()
                except Exception:  # noqa: BLE001 - shutting down: nothing left to report to
                    pass
        self._loads = []
        self.copier = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
