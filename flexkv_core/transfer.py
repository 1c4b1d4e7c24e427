"""Worker-side copies of whole blocks between the engine's KV cache and the shared CPU pool.

Each TP worker process owns one `BlockCopier`. It copies *its own rank's part* of each slot: in a slot,
rank r's plane p lives at ``layout.rank_offset(r) + p * layout.plane_bytes``; the engine side is given as
``layout.num_planes`` plane tensors (layer-major, K then V: plane = layer * kv_planes + k_or_v), each
indexed by engine block id along dim 0, with one block's plane contiguous (``plane_bytes`` bytes).

**Pieces.** A copy of N blocks is a batch of (destination address, source address, size) *pieces*, built
with numpy in one go and handed to one native call per transfer and direction:

* planes that follow each other in the engine's memory within a block (K then V of one layer in a
  block-major cache, or several layers) are *fused*: one piece per block covers all of them, since the pool
  side is contiguous per block anyway. Other planes are one piece per block each;
* the pieces are ordered by source address (plane by plane when the engine cache is plane-major, block by
  block when it is block-major, slot by slot from the pool), so the source is read as a stream and the
  writes scatter: with cache-bypassing stores a scattered write costs nothing extra, a scattered read
  (a prefetcher restarting at every 4 KiB piece) costs a third of the bandwidth.

**CPU engine.** `flexkv_core.native._copy` (a small C extension built at install time) copies the batch with the
GIL released, a large batch cut over ``threads`` threads. Stores (`to_pool`) run on the copier's helper
thread and return at once: the engine's next step computes while they copy, and `CopyJob.done` says when
they have finished. Loads (`from_pool`) are copied by the calling thread, on all ``threads`` cores, and are
complete on return: a request waits for its load, so the fastest copy is the one made now.

**CUDA engine.** Stores and loads are enqueued on two side streams (`flexkv_core.cuda_batch`: CUDA's batched
memcpy, one driver call per transfer, or a per-piece fallback), each ordered after the work already queued
on the compute stream by an event, never by a host synchronisation; one event per job says when it is
done. Copies need the pool's slots page-locked (`CpuPool.start_pinning`, started by the copier on a
background thread): a job whose slots are not pinned yet is started by the first `CopyJob.done` or
`CopyJob.wait` after they are. **This path cannot run on the CPU-only development machine: it is written
carefully but only ``scripts/gpu_check.sh`` on a GPU machine exercises it.**

Completion: before the compute stream reads blocks a load wrote, ``job.wait_stream()`` (GPU-side) or
``job.done()`` / ``job.wait()`` (host-side). Before a store's source blocks may be freed or overwritten,
``job.done()`` must be True or ``job.wait()`` have returned. The whole device is never synchronised.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .layout import KVLayout
from .tiers.cpu import CpuPool

log = logging.getLogger(__name__)

#: A CPU batch smaller than this is copied by one thread: waking others costs tens of microseconds, about
#: what 1 MiB of copying takes.
PARALLEL_MIN_BYTES = 4 << 20


def _native() -> Any:
    """The compiled batch copy (imported on first CPU copy: a CUDA-only user never needs it)."""
    try:
        from .native import _copy
    except ImportError as exc:
        raise ImportError("flexkv_core.native._copy (the compiled CPU block copy) is not built: install the package "
                          "(`pip install -e .` or scripts/setup.sh), which compiles flexkv_core/native/copy.c") from exc
    return _copy


class CopyJob:
    """One batch of block copies, finished or in flight (see the module docstring)."""

    def __init__(self, nbytes: int, num_blocks: int, *, future: concurrent.futures.Future | None = None,
                 start: Callable[[], Any] | None = None, ready: Callable[[float | None], bool] | None = None,
                 device: torch.device | None = None) -> None:
        self.nbytes = nbytes  # bytes moved (this rank's part only)
        self.num_blocks = num_blocks
        self.device = device  # the CUDA device of the engine planes; None on CPU
        self._future = future  # CPU background copy
        self._start = start  # CUDA: enqueues the copies, returns their completion event
        self._ready = ready  # CUDA: whether the pool slots are pinned (waiting up to the given seconds)
        self._event: torch.cuda.Event | None = None
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._start is None or self._event is not None

    def _try_start(self, timeout: float | None) -> bool:
        with self._lock:
            if self._event is None and self._start is not None and self._ready(timeout):
                self._event = self._start()
            return self.started

    def done(self) -> bool:
        """Whether every copy has finished (never blocks; starts a job whose slots became pinned)."""
        if self._future is not None:
            return self._future.done()
        if not self._try_start(0):
            return False
        return self._event is None or self._event.query()

    def wait(self) -> None:
        """Block the calling thread until every copy has finished; re-raise a failed copy's error."""
        if self._future is not None:
            self._future.result()
            return
        if not self._try_start(None):
            raise RuntimeError("the CPU pool's pinning stopped before this job's slots were pinned")
        if self._event is not None:
            self._event.synchronize()

    def wait_stream(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait for the copies, without blocking the host.
        A job still waiting for pinned slots is waited for on the host first."""
        if self._start is not None and not self._try_start(0):
            self.wait()
        if self._event is not None:
            (stream if stream is not None else torch.cuda.current_stream(self.device)).wait_event(self._event)

    def __repr__(self) -> str:
        return f"CopyJob({self.num_blocks} blocks, {self.nbytes} B, done={self.done()})"


def _finished(nbytes: int, num_blocks: int) -> CopyJob:
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(nbytes)
    return CopyJob(nbytes, num_blocks, future=future)


def _expected_dtype(name: str) -> torch.dtype | None:
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else None  # "fp8" names no single torch dtype


class BlockCopier:
    """Copies whole blocks between one TP rank's engine planes and its part of the CPU pool's slots."""

    def __init__(self, pool: CpuPool, layout: KVLayout, tp_rank: int, planes: Sequence[torch.Tensor],
                 threads: int | None = None, batched: bool | None = None) -> None:
        """``threads``: how many threads copy a large CPU batch (default: ``torch.get_num_threads()``).
        ``batched`` (CUDA): use CUDA's batched memcpy (True: required, False: never, None: where available)."""
        self.threads = torch.get_num_threads() if threads is None else threads
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        if pool.slot_bytes != layout.slot_bytes:
            raise ValueError(f"CPU pool {pool.name!r} has slots of {pool.slot_bytes} B but the layout needs "
                             f"{layout.slot_bytes} B ({layout})")
        self.pool = pool
        # Copies write through raw addresses: this view keeps the mapping alive (a pool closed meanwhile is
        # unmapped only once its views are gone), as self.planes keeps the engine's memory alive.
        self._pool_memory = pool.array()
        self.layout = layout
        self.tp_rank = tp_rank
        rank_offset = layout.rank_offset(tp_rank)  # validates tp_rank
        self.planes = list(planes)  # held: the pieces are raw addresses into them
        self.num_blocks = self._check_planes(self.planes)
        self.device = self.planes[0].device
        self._cuda = self.device.type == "cuda"
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"engine planes on device {self.device} are not supported (cpu or cuda)")
        self._units(rank_offset)
        self._helper: concurrent.futures.ThreadPoolExecutor | None = None
        if self._cuda:
            from .cuda_batch import BatchCopy

            if not pool.start_pinning(self.device.index):
                raise RuntimeError("engine planes are on CUDA but CUDA is not available to pin the pool")
            self._dma = BatchCopy(batched)
            self._store_stream = torch.cuda.Stream(device=self.device)
            self._load_stream = torch.cuda.Stream(device=self.device)
        log.debug("BlockCopier rank %d: %d engine blocks, %d planes in %d pieces per block, %s", tp_rank,
                  self.num_blocks, layout.num_planes, len(self._unit_size), self.device)

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

    def _units(self, rank_offset: int) -> None:
        """Cut the planes into *units*: runs of planes that are one contiguous piece per block on both sides.

        Unit u of engine block b is ``_unit_size[u]`` bytes at ``_unit_engine[u] + b * _unit_stride[u]``
        and at ``_unit_pool[u] + slot * slot_bytes`` in the pool.
        """
        pb = self.layout.plane_bytes
        starts, strides = [], []
        for p in self.planes:
            starts.append(p.data_ptr())
            strides.append(p.stride(0) * p.element_size())
        engine, stride, pool, size = [], [], [], []
        for i in range(len(self.planes)):
            if i and starts[i] == starts[i - 1] + pb and strides[i] == stride[-1] and size[-1] + pb <= stride[-1]:
                size[-1] += pb  # plane i follows plane i - 1 in every block: same piece
                continue
            engine.append(starts[i])
            stride.append(strides[i])
            pool.append(rank_offset + i * pb)
            size.append(pb)
        self._unit_engine = np.array(engine, dtype=np.int64)
        self._unit_stride = np.array(stride, dtype=np.int64)
        self._unit_pool = np.array(pool, dtype=np.int64)
        self._unit_size = np.array(size, dtype=np.int64)
        # Read order of the engine: block-major when a block's units all lie within one block stride of
        # each other (a block-major cache), else unit-major with units by address (a plane-major cache).
        span = int(self._unit_engine.max() - self._unit_engine.min() + self._unit_size.max())
        self._engine_block_major = bool((self._unit_stride >= span).all())
        by_address = np.argsort(self._unit_engine, kind="stable")
        self._units_by_address = tuple(a[by_address] for a in (self._unit_engine, self._unit_stride,
                                                                self._unit_pool, self._unit_size))

    # -- copies -------------------------------------------------------------------------------------------

    def to_pool(self, block_ids: Sequence[int], slots: Sequence[int]) -> CopyJob:
        """Store: copy engine blocks ``block_ids[i]`` into pool slots ``slots[i]`` (this rank's part).
        Returns at once; the job says when the copies are done."""
        src = self._ids(block_ids, self.num_blocks, "engine block id")
        dst = self._ids(slots, self.pool.num_slots, "slot")
        return self._copy(src, dst, to_pool=True)

    def from_pool(self, slots: Sequence[int], block_ids: Sequence[int]) -> CopyJob:
        """Load: copy pool slots ``slots[i]`` (this rank's part) into engine blocks ``block_ids[i]``.
        CPU: done on return; CUDA: in flight on return."""
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

    def pieces(self, src: np.ndarray, dst: np.ndarray, to_pool: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(destination addresses, source addresses, sizes) of copying block/slot ``src[i]`` to ``dst[i]``,
        in source-address order. int64 arrays (addresses fit in 63 bits)."""
        order = np.argsort(src, kind="stable")
        src, dst = src[order], dst[order]
        blocks, slots = (src, dst) if to_pool else (dst, src)
        if to_pool and not self._engine_block_major:
            # Unit-major: a (units, n) grid, each row one unit over all blocks in address order.
            engine0, stride, pool0, size = self._units_by_address
            engine = engine0[:, None] + blocks[None, :] * stride[:, None]
            pool = (self.pool.data_ptr() + pool0)[:, None] + slots[None, :] * self.pool.slot_bytes
            sizes = np.repeat(size, len(blocks))
        else:
            # Block-major: a (n, units) grid, each row one block (or slot) with its units in order.
            engine = self._unit_engine[None, :] + blocks[:, None] * self._unit_stride[None, :]
            pool = (self.pool.data_ptr() + self._unit_pool)[None, :] + slots[:, None] * self.pool.slot_bytes
            sizes = np.tile(self._unit_size, len(blocks))
        engine, pool = engine.reshape(-1), pool.reshape(-1)
        return (pool, engine, sizes) if to_pool else (engine, pool, sizes)

    def _copy(self, src: np.ndarray, dst: np.ndarray, to_pool: bool) -> CopyJob:
        if len(src) != len(dst):
            raise ValueError(f"{len(src)} sources but {len(dst)} destinations")
        n = len(dst)
        if n == 0:
            return _finished(0, 0)
        sorted_dst = np.sort(dst)
        dup = np.flatnonzero(sorted_dst[1:] == sorted_dst[:-1])
        if dup.size:
            raise ValueError(f"destination {'slot' if to_pool else 'engine block'} {int(sorted_dst[dup[0]])} "
                             "appears twice")
        nbytes = n * self.layout.rank_bytes
        d, s, z = self.pieces(src, dst, to_pool)
        if self._cuda:
            slots = dst if to_pool else src
            return self._copy_cuda(d, s, z, nbytes, n, to_pool, (int(slots.max()) + 1) * self.pool.slot_bytes)
        threads = self.threads if nbytes >= PARALLEL_MIN_BYTES else 1
        copy = _native().copy_batch
        if not to_pool:
            copy(d, s, z, threads)
            return _finished(nbytes, n)
        if self._helper is None:
            self._helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flexkv-store")
        # d, s, z live in the closure until the copy ends; the planes and the pool are held by self.
        return CopyJob(nbytes, n, future=self._helper.submit(copy, d, s, z, threads))

    def _copy_cuda(self, d: np.ndarray, s: np.ndarray, z: np.ndarray, nbytes: int, n: int, to_pool: bool,
                   pinned_needed: int) -> CopyJob:
        # Untested here (no GPU on the development machine); checked by scripts/gpu_check.sh.
        from .cuda_batch import SRC_ORDER_ANY, SRC_ORDER_STREAM

        stream = self._store_stream if to_pool else self._load_stream
        order = SRC_ORDER_STREAM if to_pool else SRC_ORDER_ANY  # pool slots a load reads never change meanwhile

        def start() -> torch.cuda.Event:
            # Stores read blocks the compute stream wrote; loads overwrite blocks whose previous owner the
            # compute stream may still read. Either way: after the work queued on it so far.
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self.device))
            stream.wait_event(after)
            self._dma.copy(d, s, z, stream.cuda_stream, order)
            done = torch.cuda.Event()
            done.record(stream)
            return done

        def ready(timeout: float | None) -> bool:
            return self.pool.pinned_bytes >= pinned_needed or self.pool.wait_pinned(pinned_needed, timeout)

        job = CopyJob(nbytes, n, start=start, ready=ready, device=self.device)
        job.done()  # starts it now if its slots are pinned (the usual case)
        return job

    def close(self) -> None:
        """Wait for stores in flight on the helper thread and stop it."""
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None
