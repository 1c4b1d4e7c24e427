"""Worker-side copies of whole blocks between the engine's KV cache and the shared CPU pool.

Each TP worker process owns one `BlockCopier`. It copies *its own rank's part* of each slot: in a slot,
rank r's plane p lives at ``layout.rank_offset(r) + p * layout.plane_bytes``; the engine side is given as
``layout.num_planes`` plane tensors (layer-major, K then V: plane = layer * kv_planes + k_or_v), each
indexed by engine block id along dim 0, with one block's plane contiguous (``plane_bytes`` bytes).

How the copies are made:

* Planes that live in one storage at a constant distance (vLLM's per-layer ``(2, num_blocks, ...)``
  tensor gives K and V this way) are fused into one strided view, so one copy moves several planes.
* The (source, destination) pairs are sorted by destination and cut into *runs* where both sides are
  consecutive; each run is copied with one operation per fused plane group.
* CPU engine: copies are synchronous numpy slice assignments (one memcpy-like loop per run and group,
  with about a microsecond of overhead each where a torch ``copy_`` costs three to five). No intermediate
  buffer: every byte is read once and written once. A large batch is cut into ``threads`` equal parts
  (default: torch's thread count, as the engine's own kernels use) copied by as many threads: numpy
  releases the GIL while it copies, and one thread copying scattered 32 KiB pieces gets only about half
  of the memory bandwidth that a multi-threaded ``copy_`` gets (bench/bench_cpu_tier.py).
* CUDA engine: the pool is pinned (`CpuPool.pin`), copies are issued with ``non_blocking=True`` on a
  dedicated side stream and one ``torch.cuda.Event`` is recorded per job. Each copy is contiguous on both
  sides (torch stages a non-contiguous host<->device copy through a pageable temporary, which would make it
  synchronous), so runs are split into single blocks unless the views allow more. **This path cannot run on
  the CPU-only development machine: it is written carefully but untested here.**

Completion (CUDA): `CopyJob.done` polls the event. Before the compute stream reads blocks a load wrote,
make it wait: ``job.wait_stream()`` (GPU-side, does not block the host) or ``job.wait()`` (blocks the
host). Before a store's GPU blocks may be freed or overwritten, ``job.done()`` must be True (or call
``job.wait()``). The whole device is never synchronised.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .layout import KVLayout
from .tiers.cpu import CpuPool

log = logging.getLogger(__name__)

#: A CPU batch smaller than this is copied by the calling thread alone: waking other threads costs tens of
#: microseconds, about what 1 MiB of copying takes.
PARALLEL_MIN_BYTES = 4 << 20

_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _helpers() -> concurrent.futures.ThreadPoolExecutor:
    """The process-wide threads that help the calling thread copy (created on first use)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) - 1),
                                                              thread_name_prefix="flexkv-copy")
        return _executor


def _runs(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """``(src0, dst0, length)`` for each maximal stretch where both ``src`` and ``dst`` go up by one."""
    cut = np.flatnonzero((np.diff(dst) != 1) | (np.diff(src) != 1)) + 1
    starts = np.concatenate(([0], cut))
    lengths = np.diff(np.concatenate((starts, [len(dst)])))
    return list(zip(src[starts].tolist(), dst[starts].tolist(), lengths.tolist(), strict=True))


class CopyJob:
    """One batch of block copies. CPU jobs are complete on return; CUDA jobs complete asynchronously."""

    def __init__(self, nbytes: int, num_blocks: int, event: torch.cuda.Event | None = None,
                 device: torch.device | None = None) -> None:
        self.nbytes = nbytes  # bytes moved (this rank's part only)
        self.num_blocks = num_blocks
        self.event = event  # recorded on the copier's side stream after the last copy; None on CPU
        self.device = device  # the CUDA device of the engine planes; None on CPU

    def done(self) -> bool:
        """Whether every copy has finished (never blocks)."""
        return self.event is None or self.event.query()

    def wait(self) -> None:
        """Block the calling thread until every copy has finished."""
        if self.event is not None:
            self.event.synchronize()

    def wait_stream(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait for the copies, without blocking the host."""
        if self.event is not None:
            (stream if stream is not None else torch.cuda.current_stream(self.device)).wait_event(self.event)

    def __repr__(self) -> str:
        return f"CopyJob({self.num_blocks} blocks, {self.nbytes} B, done={self.done()})"


@dataclass(frozen=True)
class _Group:
    """``count`` consecutive planes starting at ``first`` that one strided view covers on both sides."""

    first: int
    count: int
    engine: torch.Tensor  # (num_blocks, count, elems): the engine's planes
    pool: torch.Tensor  # (num_slots, count, elems): this rank's planes in the pool
    engine_np: np.ndarray | None  # the same views as numpy arrays (CPU engine only)
    pool_np: np.ndarray | None
    runs_contiguous: bool  # CUDA: whether a run of several blocks is contiguous on both sides


def _byte_view(plane: torch.Tensor, count: int, delta: int) -> torch.Tensor:
    """``(num_blocks, count, plane_bytes)`` uint8 view of ``count`` planes ``delta`` bytes apart."""
    isz = plane.element_size()
    base = torch.empty(0, dtype=torch.uint8, device=plane.device).set_(plane.untyped_storage())
    per_block = plane[0].numel() * isz
    return base.as_strided((plane.shape[0], count, per_block), (plane.stride(0) * isz, delta, 1),
                           plane.storage_offset() * isz)


def _widen(engine: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reinterpret both byte views as int64 when their alignment allows (fewer, wider elements)."""
    try:
        return engine.view(torch.int64), pool.view(torch.int64)
    except RuntimeError:
        return engine, pool


def _expected_dtype(name: str) -> torch.dtype | None:
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else None  # "fp8" names no single torch dtype


class BlockCopier:
    """Copies whole blocks between one TP rank's engine planes and its part of the CPU pool's slots."""

    def __init__(self, pool: CpuPool, layout: KVLayout, tp_rank: int, planes: Sequence[torch.Tensor],
                 threads: int | None = None) -> None:
        """``threads``: how many threads copy a large CPU batch (default: ``torch.get_num_threads()``)."""
        self.threads = torch.get_num_threads() if threads is None else threads
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        if pool.slot_bytes != layout.slot_bytes:
            raise ValueError(f"CPU pool {pool.name!r} has slots of {pool.slot_bytes} B but the layout needs "
                             f"{layout.slot_bytes} B ({layout})")
        self.pool = pool
        self.layout = layout
        self.tp_rank = tp_rank
        offset = layout.rank_offset(tp_rank)  # validates tp_rank
        planes = list(planes)
        self.num_blocks = self._check_planes(planes)
        self.device = planes[0].device
        self._cuda = self.device.type == "cuda"
        self._stream = None
        if self._cuda:
            if not pool.pin():
                raise RuntimeError("engine planes are on CUDA but CUDA is not available to pin the pool")
            self._stream = torch.cuda.Stream(device=self.device)
        elif self.device.type != "cpu":
            raise ValueError(f"engine planes on device {self.device} are not supported (cpu or cuda)")

        pool_planes = pool.tensor()[:, offset:offset + layout.rank_bytes].unflatten(
            1, (layout.num_planes, layout.plane_bytes))
        self._groups = [self._make_group(planes[first], first, count, step, pool_planes)
                        for first, count, step in self._fuse(planes)]
        log.debug("BlockCopier rank %d: %d engine blocks, %d planes in %d groups, %s", tp_rank,
                  self.num_blocks, layout.num_planes, len(self._groups), self.device)

    # -- setup --------------------------------------------------------------------------------------------

    def _check_planes(self, planes: list[torch.Tensor]) -> int:
        lay = self.layout
        if len(planes) != lay.num_planes:
            raise ValueError(f"got {len(planes)} engine planes, the layout has {lay.num_planes} "
                             f"({lay.num_layers} layers x {lay.kv_planes})")
        expected = _expected_dtype(lay.dtype)
        num_blocks = None
        for i, p in enumerate(planes):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"engine plane {i} is a {type(p).__name__}, not a torch.Tensor")
            if p.dim() < 1 or p.shape[0] == 0:
                raise ValueError(f"engine plane {i} has shape {tuple(p.shape)}: need (num_blocks, ...)")
            if p.device != planes[0].device:
                raise ValueError(f"engine plane {i} is on {p.device}, plane 0 on {planes[0].device}")
            if p.element_size() != lay.itemsize or (expected is not None and p.dtype != expected):
                raise ValueError(f"engine plane {i} has dtype {p.dtype}, the layout says {lay.dtype}")
            per_block = p[0].numel() * p.element_size()
            if per_block != lay.plane_bytes:
                raise ValueError(f"engine plane {i} holds {per_block} B per block (shape {tuple(p.shape)}), "
                                 f"the layout says {lay.plane_bytes} B")
            if not p[0].is_contiguous():
                raise ValueError(f"engine plane {i}: one block's data is not contiguous "
                                 f"(shape {tuple(p.shape)}, strides {p.stride()})")
            if num_blocks is not None and p.shape[0] != num_blocks:
                raise ValueError(f"engine plane {i} has {p.shape[0]} blocks, plane 0 has {num_blocks}")
            num_blocks = p.shape[0]
        assert num_blocks is not None
        return num_blocks

    def _fuse(self, planes: list[torch.Tensor]) -> list[tuple[int, int, int]]:
        """Cut the planes into groups ``(first, count, delta_bytes)`` that one strided view can cover."""
        plane_bytes = self.layout.plane_bytes

        def delta(a: torch.Tensor, b: torch.Tensor) -> int | None:
            if (a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
                    or a.shape != b.shape or a.stride() != b.stride()):
                return None
            d = b.data_ptr() - a.data_ptr()
            if d < plane_bytes:  # planes out of order or overlapping: keep them apart
                return None
            if self._cuda and d != plane_bytes:
                return None  # on CUDA a group must be contiguous per block (see module docstring)
            return d

        groups: list[tuple[int, int, int]] = []
        first = 0
        while first < len(planes):
            count, step = 1, plane_bytes
            if first + 1 < len(planes) and (d := delta(planes[first], planes[first + 1])) is not None:
                step = d
                count = 2
                while (first + count < len(planes)
                       and delta(planes[first + count - 1], planes[first + count]) == step):
                    count += 1
            groups.append((first, count, step))
            first += count
        return groups

    def _make_group(self, plane: torch.Tensor, first: int, count: int, step: int,
                    pool_planes: torch.Tensor) -> _Group:
        engine, pool = _widen(_byte_view(plane, count, step), pool_planes[:, first:first + count])
        group_elems = count * engine.shape[2]
        runs_contiguous = engine.stride(0) == group_elems and pool.stride(0) == group_elems
        return _Group(first, count, engine, pool,
                      None if self._cuda else engine.numpy(), None if self._cuda else pool.numpy(),
                      runs_contiguous)

    # -- copies -------------------------------------------------------------------------------------------

    def to_pool(self, block_ids: Sequence[int], slots: Sequence[int]) -> CopyJob:
        """Store: copy engine blocks ``block_ids[i]`` into pool slots ``slots[i]`` (this rank's part)."""
        src = self._ids(block_ids, self.num_blocks, "engine block id")
        dst = self._ids(slots, self.pool.num_slots, "slot")
        return self._copy(src, dst, to_pool=True)

    def from_pool(self, slots: Sequence[int], block_ids: Sequence[int]) -> CopyJob:
        """Load: copy pool slots ``slots[i]`` (this rank's part) into engine blocks ``block_ids[i]``."""
        src = self._ids(slots, self.pool.num_slots, "slot")
        dst = self._ids(block_ids, self.num_blocks, "engine block id")
        return self._copy(src, dst, to_pool=False)

    @staticmethod
    def _ids(values: Sequence[int], limit: int, what: str) -> np.ndarray:
        ids = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
        if ids.size == 0:
            return np.zeros(0, dtype=np.int64)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise TypeError(f"{what}s must be a 1-D sequence of ints, got {values!r:.200}")
        ids = ids.astype(np.int64, copy=False)
        bad = (ids < 0) | (ids >= limit)
        if bad.any():
            raise IndexError(f"{what} {int(ids[bad][0])} outside 0..{limit - 1}")
        return ids

    def _copy(self, src: np.ndarray, dst: np.ndarray, to_pool: bool) -> CopyJob:
        if len(src) != len(dst):
            raise ValueError(f"{len(src)} sources but {len(dst)} destinations")
        n = len(dst)
        if n == 0:
            return CopyJob(0, 0)
        order = np.argsort(dst, kind="stable")
        src, dst = src[order], dst[order]
        if n > 1 and (np.diff(dst) == 0).any():
            dup = int(dst[1:][np.diff(dst) == 0][0])
            raise ValueError(f"destination {'slot' if to_pool else 'engine block'} {dup} appears twice")
        nbytes = n * self.layout.rank_bytes
        if self._cuda:
            return CopyJob(nbytes, n, self._copy_cuda(_runs(src, dst), to_pool), self.device)
        parts = min(self.threads, n) if nbytes >= PARALLEL_MIN_BYTES else 1
        if parts == 1:
            self._copy_cpu(_runs(src, dst), to_pool)
        else:
            # Equal numbers of blocks per thread; a run crossing a boundary is simply cut in two.
            bounds = [n * i // parts for i in range(parts + 1)]
            work = [_runs(src[a:b], dst[a:b]) for a, b in zip(bounds, bounds[1:])]
            futures = [_helpers().submit(self._copy_cpu, runs, to_pool) for runs in work[1:]]
            try:
                self._copy_cpu(work[0], to_pool)
            finally:
                concurrent.futures.wait(futures)  # never return while a helper still writes
            for f in futures:
                f.result()  # re-raise a helper's error, if any
        return CopyJob(nbytes, n)

    def _copy_cpu(self, runs: list[tuple[int, int, int]], to_pool: bool) -> None:
        for g in self._groups:
            s_arr, d_arr = (g.engine_np, g.pool_np) if to_pool else (g.pool_np, g.engine_np)
            for s0, d0, k in runs:
                d_arr[d0:d0 + k] = s_arr[s0:s0 + k]

    def _copy_cuda(self, runs: list[tuple[int, int, int]], to_pool: bool) -> torch.cuda.Event:
        # Untested here (no GPU on the development machine); kept deliberately plain.
        stream = self._stream
        assert stream is not None
        # Stores read blocks that kernels on the compute stream wrote; loads overwrite blocks the compute
        # stream may have used before they were handed to this request. Either way: order after it.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for g in self._groups:
                s_t, d_t = (g.engine, g.pool) if to_pool else (g.pool, g.engine)
                for s0, d0, k in runs:
                    if k == 1 or g.runs_contiguous:
                        d_t[d0:d0 + k].copy_(s_t[s0:s0 + k], non_blocking=True)
                    else:
                        for j in range(k):
                            d_t[d0 + j].copy_(s_t[s0 + j], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return event
