"""The CPU tier's memory: one shared-memory region of fixed-size slots.

The scheduler-side cache *creates* the pool; every TP worker process *attaches* to it by name and copies
its own rank's part of each slot (see `flexkv_core.transfer`). The region is a plain file in /dev/shm,
mapped with ``mmap``:

* no ``multiprocessing.shared_memory``: on Python < 3.13 its resource_tracker registers attachers too,
  unlinks the region when an attacher exits and warns about "leaked shared_memory objects";
* ``mmap`` returns page-aligned memory, so every slot (a multiple of 4096 bytes) is a valid O_DIRECT buffer
  for the SSD tier;
* ``ftruncate`` makes a sparse file: pages are allocated on first touch, so a 16 GiB pool costs nothing
  until it is used (`CpuPool.prefault` touches everything up front, for benchmarks);
* the owner holds an exclusive ``flock`` on the file for as long as it lives. The kernel drops the lock
  when the owner dies, however it dies, so a region nobody holds is *stale*: `CpuPool.create` replaces a
  stale region of the same name, `CpuPool.attach` refuses one (its bytes belong to no index any more),
  and `CpuPool.remove_stale` sweeps those left by crashed owners;
* a stale region still holds its memory until someone removes it, and owners do die without cleaning up
  (vLLM kills its engine core at once on shutdown, whose connector never closes the pool). So each owner
  starts a small *reaper* process in a session of its own, which waits for the owner's lock and removes
  the region when it gets it (`_REAPER`): memory comes back however the owner ended.

On a CUDA machine each worker page-locks the region (`CpuPool.start_pinning`) so that copies to and from
the GPU are DMA. Pinning touches and locks every page, seconds for a large pool, so it runs on a thread of
its own, ``PIN_CHUNK_BYTES`` of whole slots at a time from slot 0 up; `CpuPool.pinned_bytes` says how far
it got, and the cache hands out low slots first, so the first requests rarely wait for it. Every worker
pins the whole region: a slot holds every rank's part side by side (one O_DIRECT transfer, one checksum,
one remote read per slot), so no rank owns a range of its own.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..layout import ALIGN

if TYPE_CHECKING:
    import torch

# torch is imported only where needed (tensor(), pin()): a process that only maps the pool (the CLI, the
# SSD tier's tests) should not pay seconds of torch import.

log = logging.getLogger(__name__)

#: Where the regions live. POSIX shared memory on Linux is exactly a tmpfs mounted here.
SHM_DIR = "/dev/shm"

#: How much of the region one CUDA registration covers (rounded down to whole slots, at least one).
PIN_CHUNK_BYTES = 256 << 20

#: Linux >= 5.14: populate the page tables of a shared mapping for writing, without changing a byte.
_MADV_POPULATE_WRITE = 23

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")


def _path(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"CPU pool name {name!r} is not a valid name: use 1-200 characters of "
                         "letters, digits, '_', '.', '-' (not starting with '.' or '-')")
    return os.path.join(SHM_DIR, name)


# Run as `python -I -S -c _REAPER PATH INODE`: wait for the owner's lock on the region, then remove the
# region if it is still that file (a normal close has removed it already; nothing else touches the name).
# It forks and the parent returns at once, so the reaper is no descendant of the owner: vLLM kills its
# engine core's whole process tree at shutdown, and a child would die with it.
_REAPER = """
import fcntl, os, sys
if os.fork():
    os._exit(0)
path, inode = sys.argv[1], int(sys.argv[2])
try:
    fd = os.open(path, os.O_RDONLY)
except FileNotFoundError:
    sys.exit()
if os.fstat(fd).st_ino == inode:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
"""


def _start_reaper(path: str, fd: int) -> None:
    try:
        # A session of its own: not in the owner's process group either (kill -9 -PGID).
        subprocess.run([sys.executable, "-I", "-S", "-c", _REAPER, path, str(os.fstat(fd).st_ino)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       start_new_session=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("no reaper for CPU pool %s (%s): if this process is killed, the next cache start "
                    "removes the region", path, exc)


def _check_geometry(num_slots: int, slot_bytes: int) -> None:
    if not isinstance(num_slots, int) or num_slots <= 0:
        raise ValueError(f"CPU pool num_slots must be a positive int, got {num_slots!r}")
    if not isinstance(slot_bytes, int) or slot_bytes <= 0 or slot_bytes % ALIGN:
        raise ValueError(f"CPU pool slot_bytes must be a positive multiple of {ALIGN}, got {slot_bytes!r}")


def _owner_alive(path: str) -> bool | None:
    """Whether a live owner holds the region at ``path``; None if there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's lock if it got one
    return False


def _remove_if_stale(path: str) -> bool:
    """Unlink the region at ``path`` if its owner is gone. True if it was removed (or already gone)."""
    try:
        before = os.stat(path)
    except FileNotFoundError:
        return True
    alive = _owner_alive(path)
    if alive:
        return False
    try:
        # Only unlink the very file we probed: a new owner may have replaced it meanwhile.
        if os.stat(path).st_ino == before.st_ino:
            os.unlink(path)
    except FileNotFoundError:
        pass
    return True


@dataclass
class _Pinning:
    """CUDA registrations of one mapping, made by a background thread (`CpuPool.start_pinning`)."""

    chunks: list[tuple[int, int]] = field(default_factory=list)  # (address, bytes) registered, in order
    pinned_bytes: int = 0  # leading bytes of the region registered so far
    done: bool = False  # the thread ended (all pinned, stopped, or failed)
    error: BaseException | None = None
    seconds: float = 0.0  # time the registrations took
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    cond: threading.Condition = field(default_factory=threading.Condition)


@dataclass
class _Mapping:
    """What must be released when a pool goes away (held by the finalizer, not by the pool)."""

    mm: mmap.mmap
    lock_fd: int | None  # the owner's locked descriptor; None for attachers
    path: str | None  # set for the owner, which unlinks the name
    pid: int  # the process that made the mapping: a forked child must not unlink its parent's region
    pinning: _Pinning = field(default_factory=_Pinning)


def _pin_chunks(pin: _Pinning, base: int, nbytes: int, chunk: int, device: int | None) -> None:
    """The pinning thread: register [base, base + nbytes) with CUDA chunk by chunk, lowest first."""
    import torch

    started = time.perf_counter()
    try:
        if device is not None:
            # A new thread's current device is 0: without this, rank 3's process would create a context on
            # GPU 0 just to register host memory.
            torch.cuda.set_device(device)
        cudart = torch.cuda.cudart()
        for offset in range(0, nbytes, chunk):
            if pin.stop.is_set():
                break
            size = min(chunk, nbytes - offset)
            # Portable (1): pinned for every CUDA context of this process, not only the current one.
            err = int(cudart.cudaHostRegister(base + offset, size, 1))
            if err:
                raise RuntimeError(f"cudaHostRegister of {size} B at offset {offset} failed with cudaError {err} "
                                   "(is the memlock limit too low?)")
            with pin.cond:
                pin.chunks.append((base + offset, size))
                pin.pinned_bytes = offset + size
                pin.cond.notify_all()
    except BaseException as exc:  # noqa: BLE001 - reported to whoever waits for the pinning
        pin.error = exc
        log.error("pinning the CPU pool for CUDA failed: %s", exc)
    finally:
        with pin.cond:
            pin.seconds = time.perf_counter() - started
            pin.done = True
            pin.cond.notify_all()


def _unpin(pin: _Pinning) -> None:
    pin.stop.set()
    thread = pin.thread
    if thread is not None and thread is not threading.current_thread():
        thread.join()
    if not pin.chunks:
        return
    import torch

    cudart = torch.cuda.cudart()
    for ptr, _size in pin.chunks:
        err = int(cudart.cudaHostUnregister(ptr))
        if err:
            log.warning("cudaHostUnregister of CPU pool failed with cudaError %d", err)
    pin.chunks.clear()
    pin.pinned_bytes = 0


def _release(m: _Mapping) -> None:
    _unpin(m.pinning)
    if m.path is not None and m.lock_fd is not None and m.pid == os.getpid():
        try:
            if os.stat(m.path).st_ino == os.fstat(m.lock_fd).st_ino:  # still our file under that name
                os.unlink(m.path)
        except FileNotFoundError:
            pass
    try:
        m.mm.close()
    except BufferError:
        # Arrays, tensors or slot memoryviews handed out earlier still point into the mapping. Unmapping
        # now would turn them into dangling pointers; the mapping goes away when the last of them does.
        log.debug("CPU pool %s: views still alive, unmapped when they are released", m.path)
    if m.lock_fd is not None:
        os.close(m.lock_fd)  # releases the owner lock: from now on the name (if still there) is stale
        m.lock_fd = None


class CpuPool:
    """``num_slots`` slots of ``slot_bytes`` bytes in one named shared-memory region.

    Use ``CpuPool.create`` in the process that owns the cache and ``CpuPool.attach`` in the others.
    ``close()`` (or leaving a ``with`` block) unmaps; the owner also removes the name. Views handed out by
    `array`, `tensor` and `slot` should not outlive ``close()``: they stay memory-safe (the mapping lasts
    until the last of them is gone) but no longer belong to any cache.
    """

    def __init__(self, name: str, num_slots: int, slot_bytes: int, mapping: _Mapping) -> None:
        # Use create() or attach(); this only wires up an existing mapping.
        self.name = name
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.nbytes = num_slots * slot_bytes
        self.owner = mapping.path is not None
        self._mapping = mapping
        self._array = np.frombuffer(mapping.mm, dtype=np.uint8).reshape(num_slots, slot_bytes)
        self._tensor: torch.Tensor | None = None
        self._view = memoryview(mapping.mm)
        self._finalizer = weakref.finalize(self, _release, mapping)

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def create(cls, num_slots: int, slot_bytes: int, name: str | None = None) -> CpuPool:
        """Create a new region (the caller owns it). ``name`` defaults to a fresh unique one.

        A region of the same name whose owner is dead is replaced; one with a live owner is an error.
        """
        _check_geometry(num_slots, slot_bytes)
        if name is None:
            name = f"flexkv-{os.getpid()}-{secrets.token_hex(4)}"
        path = _path(name)
        nbytes = num_slots * slot_bytes
        if not os.path.isdir(SHM_DIR):
            raise OSError(f"{SHM_DIR} does not exist: the CPU pool needs POSIX shared memory (Linux)")
        st = os.statvfs(SHM_DIR)
        free = st.f_bavail * st.f_frsize
        if nbytes > free:
            # Touching pages past tmpfs's size kills the process with SIGBUS later: refuse now.
            raise MemoryError(f"CPU pool {name!r} of {nbytes / 2**30:.2f} GiB does not fit in {SHM_DIR} "
                              f"({free / 2**30:.2f} GiB free): lower the CPU cache size or enlarge {SHM_DIR} "
                              "(e.g. docker --shm-size)")

        # Build the file under a hidden temporary name, lock it, and only then give it its real name
        # (link fails if the name exists), so that nobody ever sees our region unlocked.
        tmp = os.path.join(SHM_DIR, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, nbytes)
            while True:
                try:
                    os.link(tmp, path)
                    break
                except FileExistsError:
                    if not _remove_if_stale(path):
                        raise FileExistsError(f"CPU pool {name!r} ({path}) is held by a live owner; "
                                              "pick another name or stop that process") from None
                    log.warning("replaced stale CPU pool %s left by a dead owner", path)
            try:
                mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                os.unlink(path)
                raise
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.unlink(tmp)
        log.info("created CPU pool %s: %d slots of %d B (%.2f GiB)", path, num_slots, slot_bytes,
                 nbytes / 2**30)
        _start_reaper(path, fd)
        return cls(name, num_slots, slot_bytes, _Mapping(mm=mm, lock_fd=fd, path=path, pid=os.getpid()))

    @classmethod
    def attach(cls, name: str, num_slots: int, slot_bytes: int) -> CpuPool:
        """Map the region another process created. Its size must be exactly ``num_slots * slot_bytes``."""
        _check_geometry(num_slots, slot_bytes)
        path = _path(name)
        nbytes = num_slots * slot_bytes
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise FileNotFoundError(f"CPU pool {name!r} not found ({path} does not exist): "
                                    "has its owner created it, on this host?") from None
        try:
            size = os.fstat(fd).st_size
            if size != nbytes:
                raise ValueError(f"CPU pool {name!r} holds {size} bytes, expected {nbytes} "
                                 f"({num_slots} slots x {slot_bytes} B): layouts differ between processes")
            if _owner_alive(path) is False:
                raise FileNotFoundError(f"CPU pool {name!r} ({path}) is stale: its owner has exited")
            mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)  # the mapping keeps the memory; only the owner keeps a (locked) descriptor
        log.debug("attached CPU pool %s", path)
        return cls(name, num_slots, slot_bytes, _Mapping(mm=mm, lock_fd=None, path=None, pid=os.getpid()))

    @staticmethod
    def remove_stale(prefix: str = "flexkv-") -> list[str]:
        """Remove regions named ``prefix*`` whose owner is dead (e.g. killed with SIGKILL). Returns their names."""
        removed = []
        for entry in sorted(os.listdir(SHM_DIR)):
            if entry.startswith(prefix) and _NAME_RE.fullmatch(entry):
                path = os.path.join(SHM_DIR, entry)
                if _owner_alive(path) is False and _remove_if_stale(path):
                    log.warning("removed stale CPU pool %s", path)
                    removed.append(entry)
        return removed

    # -- views --------------------------------------------------------------------------------------------

    def array(self) -> np.ndarray:
        """The whole pool as a uint8 ``(num_slots, slot_bytes)`` array (a view, no copy)."""
        self._check_open()
        return self._array

    def tensor(self) -> torch.Tensor:
        """The whole pool as a torch.uint8 ``(num_slots, slot_bytes)`` CPU tensor sharing the memory."""
        self._check_open()
        if self._tensor is None:
            import torch

            self._tensor = torch.from_numpy(self._array)
        return self._tensor

    def slot(self, i: int) -> memoryview:
        """A writable view of slot ``i``: page-aligned, usable as an O_DIRECT buffer."""
        self._check_open()
        if not 0 <= i < self.num_slots:
            raise IndexError(f"slot {i} outside 0..{self.num_slots - 1} of CPU pool {self.name!r}")
        return self._view[i * self.slot_bytes:(i + 1) * self.slot_bytes]

    def data_ptr(self) -> int:
        """Address of slot 0 in this process."""
        self._check_open()
        return int(self._array.ctypes.data)

    # -- memory -------------------------------------------------------------------------------------------

    def prefault(self) -> None:
        """Allocate and map every page now (benchmarks: keep first-touch page faults out of the timings)."""
        self._check_open()
        try:
            self._mapping.mm.madvise(_MADV_POPULATE_WRITE)
        except OSError:
            # Older kernel. Rewriting one byte per page with itself faults it in without changing data,
            # as long as nobody else writes the pool meanwhile (which is why this is for benchmarks).
            flat = self._array.reshape(-1)[::mmap.PAGESIZE]
            flat[:] = flat

    def start_pinning(self, device: int | None = None, chunk_bytes: int = PIN_CHUNK_BYTES) -> bool:
        """Start registering the region with CUDA (page-locked, DMA-able) on a background thread, whole
        slots at a time from slot 0 up; `pinned_bytes` grows as it goes. ``device``: the CUDA device the
        caller works on. False, doing nothing, without CUDA. Unregistered by `close`."""
        self._check_open()
        import torch

        if not torch.cuda.is_available():
            return False
        pin = self._mapping.pinning
        with pin.cond:
            if pin.thread is None:
                chunk = max(1, chunk_bytes // self.slot_bytes) * self.slot_bytes
                pin.thread = threading.Thread(target=_pin_chunks, name=f"flexkv-pin-{self.name}", daemon=True,
                                              args=(pin, self.data_ptr(), self.nbytes, chunk, device))
                pin.thread.start()
        return True

    @property
    def pinned_bytes(self) -> int:
        """How many leading bytes of the region are registered with CUDA (slots below ``pinned_bytes //
        slot_bytes`` are DMA-able)."""
        return self._mapping.pinning.pinned_bytes

    def wait_pinned(self, nbytes: int | None = None, timeout: float | None = None) -> bool:
        """Wait until the first ``nbytes`` (default: all) are pinned. False on timeout, or if pinning stopped
        short of them; raises what made pinning fail."""
        pin = self._mapping.pinning
        want = self.nbytes if nbytes is None else nbytes
        with pin.cond:
            pin.cond.wait_for(lambda: pin.pinned_bytes >= want or pin.done, timeout)
            if pin.error is not None:
                raise RuntimeError(f"pinning CPU pool {self.name!r} failed: {pin.error}") from pin.error
            return pin.pinned_bytes >= want

    @property
    def pin_seconds(self) -> float:
        """How long pinning took (so far, or in all once it is done)."""
        return self._mapping.pinning.seconds

    def pin(self, device: int | None = None) -> bool:
        """Pin the whole region now (`start_pinning`, then wait). False, doing nothing, without CUDA."""
        if not self.start_pinning(device):
            return False
        if not self.wait_pinned():
            raise RuntimeError(f"pinning CPU pool {self.name!r} stopped before the end")
        return True

    @property
    def pinned(self) -> bool:
        """Whether the whole region is pinned."""
        return self._mapping.pinning.pinned_bytes >= self.nbytes

    # -- lifetime -----------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Unmap (the owner also removes the name). Safe to call more than once."""
        if self._finalizer.alive:
            # Drop our own views first so that they do not keep the mapping alive.
            self._view.release()
            del self._tensor, self._array
            self._finalizer()

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise ValueError(f"CPU pool {self.name!r} is closed")

    def __enter__(self) -> CpuPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "owner" if self.owner else "attached"
        state = "closed" if self.closed else role
        return f"CpuPool({self.name!r}, {self.num_slots} x {self.slot_bytes} B, {state})"
