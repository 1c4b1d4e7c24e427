"""Batched host<->device copies on a CUDA stream: one driver call for a whole batch of pieces.

`BatchCopy.copy` takes three uint64 arrays (destination addresses, source addresses, byte counts) and
enqueues every piece on a stream:

* **batched** (CUDA driver 12.8 or newer): one ``cuMemcpyBatchAsync`` call for the whole batch, the API
  vLLM's own CPU offloading uses. It is reached through the driver library (``libcuda.so.1``, present on
  every machine with an NVIDIA driver) and ``cuGetProcAddress`` with the 12.8 ABI, so neither CUDA's Python
  bindings nor a particular toolkit are needed: only what torch itself runs on.
* **fallback** (older drivers, or ``batched=False``): one ``cuMemcpyAsync`` per piece, in a Python loop.
  Slower for many small pieces, obviously correct, and the reference the batched path is checked against.

Both are asynchronous with respect to the host as long as the host side is page-locked (the CPU pool is
registered with CUDA, `flexkv_core.tiers.cpu.CpuPool.start_pinning`); the caller orders the stream and
records its completion event. Host addresses are valid device-side addresses under CUDA's unified
addressing (every 64-bit platform), so one call serves both directions.

**This module cannot run on the CPU-only development machine**: it is written from the CUDA driver API's
documented signatures and checked by ``scripts/gpu_check.sh`` on a GPU machine.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["BatchCopy", "SRC_ORDER_ANY", "SRC_ORDER_STREAM"]

#: CUmemcpySrcAccessOrder. STREAM: the source is read in stream order (it may still be written by work
#: queued before the copy: device blocks a store reads). ANY: the source may be read as soon as the call
#: is made (only for sources that no queued work changes: pool slots a load reads).
SRC_ORDER_STREAM = 1
SRC_ORDER_ANY = 3

_CUDA_12_8 = 12080


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    """CUmemcpyAttributes (CUDA 12.8): type 0 in the location hints means "no hint"."""

    _fields_ = [("srcAccessOrder", ctypes.c_uint), ("srcLocHint", _MemLocation), ("dstLocHint", _MemLocation),
                ("flags", ctypes.c_uint)]


# CUresult cuMemcpyBatchAsync(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count,
#     CUmemcpyAttributes *attrs, size_t *attrsIdxs, size_t numAttrs, size_t *failIdx, CUstream hStream)
_BATCH_FN = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p)

_driver: ctypes.CDLL | None = None


def _load_driver() -> ctypes.CDLL:
    global _driver
    if _driver is None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuMemcpyAsync.restype = ctypes.c_uint
        lib.cuMemcpyAsync.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        lib.cuGetErrorString.restype = ctypes.c_uint
        lib.cuGetErrorString.argtypes = [ctypes.c_uint, ctypes.POINTER(ctypes.c_char_p)]
        _driver = lib
    return _driver


def _error(lib: ctypes.CDLL, code: int) -> str:
    text = ctypes.c_char_p()
    if lib.cuGetErrorString(code, ctypes.byref(text)) == 0 and text.value:
        return f"CUDA error {code}: {text.value.decode()}"
    return f"CUDA error {code}"


def _resolve_batch(lib: ctypes.CDLL):
    """``cuMemcpyBatchAsync`` with the 12.8 signature, or None when the driver has no such entry point."""
    pfn = ctypes.c_void_p()
    try:
        get = lib.cuGetProcAddress_v2  # CUDA >= 12.0 drivers; the v1 symbol lacks the status argument
        get.restype = ctypes.c_uint
        get.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint64,
                        ctypes.POINTER(ctypes.c_int)]
        status = ctypes.c_int()
        err = get(b"cuMemcpyBatchAsync", ctypes.byref(pfn), _CUDA_12_8, 0, ctypes.byref(status))
    except AttributeError:
        return None
    if err != 0 or not pfn.value:
        return None
    return _BATCH_FN(pfn.value)


class BatchCopy:
    """Enqueues batches of (dst, src, size) pieces on CUDA streams (see the module docstring).

    ``batched``: True requires ``cuMemcpyBatchAsync`` (RuntimeError without it), False always uses the
    per-piece fallback, None (default) uses the batched call where the driver has it.
    """

    def __init__(self, batched: bool | None = None) -> None:
        self._lib = _load_driver()
        self._batch = _resolve_batch(self._lib) if batched is not False else None
        if batched and self._batch is None:
            raise RuntimeError("cuMemcpyBatchAsync is not available (needs an NVIDIA driver for CUDA 12.8 or newer)")
        if self._batch is None and batched is None:
            log.info("cuMemcpyBatchAsync not available: block copies use one cuMemcpyAsync per piece")
        self._attrs = {order: _MemcpyAttributes(srcAccessOrder=order) for order in (SRC_ORDER_STREAM, SRC_ORDER_ANY)}

    @property
    def batched(self) -> bool:
        return self._batch is not None

    def copy(self, dst: np.ndarray, src: np.ndarray, sizes: np.ndarray, stream: int, src_order: int) -> None:
        """Enqueue ``sizes[i]`` bytes from ``src[i]`` to ``dst[i]`` for every i on ``stream`` (a raw
        ``cudaStream_t``, e.g. ``torch.cuda.Stream.cuda_stream``; never the legacy default stream). The
        arrays are uint64 (or int64) and only need to live until this call returns."""
        n = len(sizes)
        if n == 0:
            return
        dst = np.ascontiguousarray(dst, dtype=np.uint64)
        src = np.ascontiguousarray(src, dtype=np.uint64)
        sizes = np.ascontiguousarray(sizes, dtype=np.uint64)
        if self._batch is not None:
            attrs = self._attrs[src_order]
            attr_idx = ctypes.c_size_t(0)  # the one attribute applies from piece 0 on
            fail_idx = ctypes.c_size_t(0)
            err = self._batch(dst.ctypes.data, src.ctypes.data, sizes.ctypes.data, n, ctypes.byref(attrs),
                              ctypes.byref(attr_idx), 1, ctypes.byref(fail_idx), ctypes.c_void_p(stream))
            if err != 0:
                raise RuntimeError(f"cuMemcpyBatchAsync of {n} pieces failed at piece {fail_idx.value}: "
                                   f"{_error(self._lib, err)}")
            return
        handle = ctypes.c_void_p(stream)
        for d, s, z in zip(dst.tolist(), src.tolist(), sizes.tolist()):
            err = self._lib.cuMemcpyAsync(d, s, z, handle)
            if err != 0:
                raise RuntimeError(f"cuMemcpyAsync of {z} B from {s:#x} to {d:#x} failed: {_error(self._lib, err)}")
