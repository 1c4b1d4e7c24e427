"""The SSD tier: fixed-size slots in preallocated files, moved with aligned O_DIRECT I/O on I/O threads.

`SsdStore` does not decide what to keep: the cache's index allocates slot numbers and evicts. The store
moves whole slots between memory buffers and files, verifies every read against the xxh3_64 checksum
taken at write time, and remembers what each slot holds in a manifest (see `manifest.py`) so that a
restart with the same cache identity finds its slots again.

Layout on disk, for directories ``D0..Dn-1``::

    slot s  ->  directory s % n,  local index l = s // n
            ->  file  D/flexkv_ssd_<l // slots_per_file>.bin,  offset (l % slots_per_file) * slot_bytes

Consecutive slot numbers land on different directories (so a batch keeps every device busy) and slots
``s, s+n, s+2n, ...`` sit back to back in one file, so a batch of them is one ``pwritev``/``preadv``.
Each directory is owned by one process at a time (``flock`` on ``<dir>/.flexkv.lock``, holding its pid).
"""

from __future__ import annotations

import concurrent.futures
import enum
import errno
import fcntl
import logging
import mmap
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from ..layout import ALIGN, CacheIdentity
from .manifest import (
    TMP_SUFFIX,
    ManifestContents,
    ManifestHeader,
    ManifestLog,
    SlotRecord,
    check_hash,
    read_manifest,
)

__all__ = [
    "ReadStatus", "SlotRecord", "SsdDirInUse", "SsdDirUnusable", "SsdNoSpace", "SsdStats", "SsdStore",
    "SsdStoreError", "WriteItem",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "flexkv_ssd.manifest"
LOCK_NAME = ".flexkv.lock"
_FILE_RE = re.compile(r"^flexkv_ssd_(\d+)\.bin$")
_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 1024  # buffers per pwritev


#: What may be passed as a slot buffer: anything exporting a contiguous buffer (mmap, memoryview, numpy).
Buffer = memoryview | mmap.mmap | bytearray | bytes


def _file_name(k: int) -> str:
    return f"flexkv_ssd_{k}.bin"


class SsdStoreError(RuntimeError):
    """Base of the errors that make an SSD store unusable at open."""


class SsdDirInUse(SsdStoreError):
    """Another live process owns the directory (its lock is held)."""

    def __init__(self, directory: str, pid: int | None) -> None:
        self.directory = directory
        self.pid = pid
        owner = f"process {pid}" if pid is not None else "another live process (pid not recorded yet)"
        super().__init__(
            f"SSD cache directory {directory} is in use by {owner} (it holds {os.path.join(directory, LOCK_NAME)}); "
            "give each worker its own directory"
        )


class SsdNoSpace(SsdStoreError):
    """The filesystem cannot hold the preallocated slot files."""


class SsdDirUnusable(SsdStoreError):
    """The directory cannot be created, written or locked."""


@dataclass(frozen=True)
class WriteItem:
    """One slot to write: where, what block it holds (for the manifest), and the bytes (slot_bytes long)."""

    slot: int
    block_hash: int
    parent_hash: int | None
    token_ids: bytes  # block_size little-endian uint32 tokens
    buffer: Buffer


class ReadStatus(enum.Enum):
    """What a read did for one slot. Only OK is true: ``all(statuses)`` means every slot arrived intact."""

    OK = "ok"
    MISSING = "missing"  # the slot holds no record (never written, or forgotten)
    IO_ERROR = "io_error"  # the read failed or came up short
    CHECKSUM = "checksum"  # read, but the bytes do not match the checksum taken when they were written

    def __bool__(self) -> bool:
        return self is ReadStatus.OK


@dataclass(frozen=True)
class SsdStats:
    """Counters since open (a snapshot)."""

    slots_written: int = 0
    slots_read: int = 0
    write_failures: int = 0  # I/O errors and short writes
    read_failures: int = 0  # I/O errors, short reads, no record, checksum mismatch
    checksum_mismatches: int = 0
    syscalls: int = 0  # pwritev/preadv calls issued (coalescing makes this smaller than the slot count)
    bounced: int = 0  # slots copied through an aligned bounce buffer (unaligned caller buffer)


def _as_bytes_view(buf: Buffer, slot_bytes: int, what: str, writable: bool) -> memoryview:
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise ValueError(f"{what}: buffer must be C-contiguous")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    if mv.nbytes != slot_bytes:
        raise ValueError(f"{what}: buffer is {mv.nbytes} bytes, a slot is {slot_bytes}")
    if writable and mv.readonly:
        raise ValueError(f"{what}: buffer is read-only, a read needs a writable one")
    return mv


def _aligned(mv: memoryview) -> bool:
    return np.frombuffer(mv, dtype=np.uint8).ctypes.data % ALIGN == 0


@dataclass
class _Run:
    """One syscall: consecutive slots of one file."""

    file: int
    offset: int
    items: list[int]  # indices into the batch, in file order


class _Batch:
    """One write()/read() call: per-item results, completed when its last run is done."""

    def __init__(self, buffers: list[memoryview], n_runs: int, on_complete: Callable[[_Batch], None],
                 initial: list | None = None) -> None:
        self.buffers = buffers
        # Per item: writes start False and become True; reads start with why they failed (ReadStatus).
        self.ok: list = [False] * len(buffers) if initial is None else initial
        self.checksums = [0] * len(buffers)
        self.future: concurrent.futures.Future[list] = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()  # queued I/O cannot be cancelled
        self._remaining = n_runs
        self._lock = threading.Lock()
        self._on_complete = on_complete
        if n_runs == 0:
            self._complete()

    def run_done(self) -> None:
        with self._lock:
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self._complete()

    def _complete(self) -> None:
        try:
            self._on_complete(self)
        except Exception:  # never leave a caller waiting on a future that cannot complete
            logger.exception("SSD store: completing a batch failed")
        self.future.set_result(self.ok)


class SsdStore:
    """Fixed-size slots on local SSDs, striped over ``dirs``, persisted across restarts.

    ``capacity_bytes`` is split into ``num_slots = capacity_bytes // slot_bytes`` slots. Slot files are at
    most ``max_file_bytes`` (rounded down to whole slots) and are preallocated at open. I/O runs on
    ``io_threads`` threads; ``write``/``read`` return futures of per-item success and never block on I/O.

    ``direct_io``: None uses O_DIRECT where the filesystem accepts it (buffered I/O otherwise, with a
    warning); False always uses buffered I/O (data files are fdatasync'ed with the manifest).
    ``sync_interval_s`` bounds how long appended manifest records wait for an fsync; ``max_run_bytes``
    caps one coalesced pwritev/preadv. The manifest log is rewritten compactly once its appends exceed
    both ``compact_after_bytes`` and the size of the live records (amortised O(1) per record).
    """

    def __init__(
        self,
        dirs: Sequence[str],
        capacity_bytes: int,
        slot_bytes: int,
        identity: CacheIdentity,
        max_file_bytes: int,
        io_threads: int = 4,
        *,
        sync_interval_s: float = 5.0,
        max_run_bytes: int = 8 << 20,
        direct_io: bool | None = None,
        compact_after_bytes: int = 64 << 20,
    ) -> None:
        if isinstance(dirs, str):
            raise TypeError(f"dirs must be a sequence of directories, got the string {dirs!r}")
        if not dirs:
            raise ValueError("SsdStore needs at least one directory")
        if slot_bytes <= 0 or slot_bytes % ALIGN:
            raise ValueError(f"slot_bytes must be a positive multiple of {ALIGN}, got {slot_bytes}")
        if capacity_bytes < slot_bytes:
            raise ValueError(f"capacity_bytes {capacity_bytes} is smaller than one slot ({slot_bytes} bytes)")
        if max_file_bytes < slot_bytes:
            raise ValueError(f"max_file_bytes {max_file_bytes} is smaller than one slot ({slot_bytes} bytes)")
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads}")
        if sync_interval_s <= 0:
            raise ValueError(f"sync_interval_s must be > 0, got {sync_interval_s}")
        real = [os.path.realpath(d) for d in dirs]
        if len(set(real)) != len(real):
            raise ValueError(f"SSD cache directories repeat: {list(dirs)}")

        self.dirs = real
        self.identity = identity
        self.slot_bytes = slot_bytes
        self.num_slots = capacity_bytes // slot_bytes
        self.slots_per_file = max_file_bytes // slot_bytes
        self.manifest_path = os.path.join(real[0], MANIFEST_NAME)
        self._block_size = identity.layout.block_size
        self._sync_interval_s = sync_interval_s
        self._compact_after_bytes = compact_after_bytes
        self._compacting = False  # a compaction is queued or running
        self._max_run = max(1, min(max_run_bytes // slot_bytes, _IOV_MAX))

        # Geometry: per directory, the sizes of its files; file ids are global (dir-major).
        self._file_paths: list[str] = []
        self._file_sizes: list[int] = []
        self._file_base: list[int] = []
        self._file_order: list[tuple[int, int]] = []  # (index in its dir, dir): sort key that alternates dirs
        for d_index, d in enumerate(real):
            n_slots = (self.num_slots - d_index + len(real) - 1) // len(real)
            self._file_base.append(len(self._file_paths))
            for k in range(0, -(-n_slots // self.slots_per_file)):
                in_file = min(self.slots_per_file, n_slots - k * self.slots_per_file)
                self._file_paths.append(os.path.join(d, _file_name(k)))
                self._file_order.append((k, d_index))
                self._file_sizes.append(in_file * slot_bytes)

        self._lock_fds: list[int] = []
        self._fds: list[int] = []
        self._closed = False
        try:
            for d in real:
                self._lock_fds.append(_lock_dir(d))
            self._check_space()
            self.direct_io = self._open_files(direct_io is not False)
            header = ManifestHeader(
                fingerprint=identity.fingerprint(), identity=identity.describe(), slot_bytes=slot_bytes,
                dirs=real, slots_per_file=self.slots_per_file,
            )
            _remove_stale_rewrites(self.manifest_path)
            records = self._accept(read_manifest(self.manifest_path), header)
            self._manifest = ManifestLog(self.manifest_path, header, sorted(records.values(), key=_by_slot))
        except BaseException:
            self._release_files()
            raise

        self._records = records  # slot -> what it holds now (written and not forgotten)
        self._recovered = sorted(records.values(), key=_by_slot)
        self._lock = threading.Lock()  # guards _records, _dirty_files, stats; orders manifest frames
        self._dirty_files: set[int] = set()
        self._stats = SsdStats()
        self._local = threading.local()  # per I/O thread: its aligned bounce buffer
        self._pool = concurrent.futures.ThreadPoolExecutor(io_threads, thread_name_prefix="flexkv-ssd-io")
        self._dirty = threading.Event()
        self._closing = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, name="flexkv-ssd-sync", daemon=True)
        self._syncer.start()
        logger.info(
            "SSD store: %d slots of %d bytes in %d files over %s (%s), %d recovered",
            self.num_slots, slot_bytes, len(self._fds), real,
            "O_DIRECT" if self.direct_io else "buffered I/O", len(self._recovered),
        )

    # ----------------------------------------------------------------------------------------- public

    def recovered(self) -> list[SlotRecord]:
        """Slots the manifest held at open for this identity and geometry, by slot number."""
        return list(self._recovered)

    def record(self, slot: int) -> SlotRecord | None:
        """What ``slot`` holds now, or None."""
        with self._lock:
            return self._records.get(slot)

    def records(self, slots: Iterable[int]) -> list[SlotRecord | None]:
        """What each of ``slots`` holds now (one acquisition of the store's lock for the batch)."""
        with self._lock:
            return [self._records.get(s) for s in slots]

    def location(self, slot: int) -> tuple[str, int]:
        """The file and byte offset of ``slot``."""
        self._check_slot(slot, "slot")
        file, offset = self._locate(slot)
        return self._file_paths[file], offset

    def stats(self) -> SsdStats:
        with self._lock:
            return self._stats

    def write(self, items: Sequence[WriteItem]) -> concurrent.futures.Future[list[bool]]:
        """Write whole slots; the future gives per-item success once every item is done.

        A slot is readable (and recorded in the manifest) only once its write succeeded; from the call on,
        its previous content is gone. Buffers must stay untouched until the future completes.
        """
        self._check_open()
        buffers: list[memoryview] = []
        seen: set[int] = set()
        for i, item in enumerate(items):
            what = f"write item {i} (slot {item.slot})"
            self._check_slot(item.slot, what)
            if item.slot in seen:
                raise ValueError(f"{what}: slot {item.slot} appears twice in one write")
            seen.add(item.slot)
            check_hash(f"{what}: block_hash", item.block_hash)
            if item.parent_hash is not None:
                check_hash(f"{what}: parent_hash", item.parent_hash)
            if not isinstance(item.token_ids, bytes) or len(item.token_ids) != self._block_size * 4:
                raise ValueError(
                    f"{what}: token_ids must be {self._block_size * 4} bytes (block_size {self._block_size} "
                    f"uint32 tokens), got {type(item.token_ids).__name__} of {len(item.token_ids)}"
                )
            buffers.append(_as_bytes_view(item.buffer, self.slot_bytes, what, writable=False))
        slots = [item.slot for item in items]
        with self._lock:
            for slot in slots:  # the old content is no longer readable, whatever happens next
                self._records.pop(slot, None)
        runs = self._plan(slots, range(len(slots)))
        batch = _Batch(buffers, len(runs), lambda b: self._commit_write(b, items))
        self._submit(self._write_run, batch, runs)
        return batch.future

    def read(self, items: Sequence[tuple[int, Buffer]]) -> concurrent.futures.Future[list[ReadStatus]]:
        """Read whole slots into the buffers; the future gives each item's `ReadStatus` (OK only if its bytes
        match the checksum taken when they were written)."""
        self._check_open()
        buffers: list[memoryview] = []
        slots: list[int] = []
        for i, (slot, buf) in enumerate(items):
            what = f"read item {i} (slot {slot})"
            self._check_slot(slot, what)
            slots.append(slot)
            buffers.append(_as_bytes_view(buf, self.slot_bytes, what, writable=True))
        with self._lock:
            expected = [self._records.get(slot) for slot in slots]
        present = [i for i, rec in enumerate(expected) if rec is not None]
        for i, rec in enumerate(expected):
            if rec is None:
                logger.debug("SSD read of slot %d: the slot holds nothing", slots[i])
        if len(present) < len(slots):
            with self._lock:
                self._stats = _bump(self._stats, read_failures=len(slots) - len(present))
        runs = self._plan(slots, present)
        initial = [ReadStatus.IO_ERROR if rec is not None else ReadStatus.MISSING for rec in expected]
        batch = _Batch(buffers, len(runs), lambda b: None, initial)
        batch.checksums = [rec.checksum if rec is not None else 0 for rec in expected]
        self._submit(self._read_run, batch, runs, slots)
        return batch.future

    def forget(self, slots: Iterable[int]) -> None:
        """The cache evicted these slots: they hold nothing from now on (also after a restart)."""
        self._check_open()
        slots = list(slots)
        for slot in slots:
            self._check_slot(slot, "forget")
        with self._lock:
            dropped = [s for s in slots if self._records.pop(s, None) is not None]
            self._manifest.forget(dropped)
        if dropped:
            self._pool.submit(self._flush_manifest)

    def close(self) -> None:
        """Finish queued I/O, write the manifest compactly and durably, release the directories."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._closing.set()
        self._dirty.set()
        self._syncer.join()
        try:
            self._sync_data()
            self._compact()
            self._manifest.close()
        finally:
            self._release_files()
        logger.info("SSD store over %s closed with %d slots recorded", self.dirs, len(self._records))

    def __enter__(self) -> SsdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- I/O path

    def _locate(self, slot: int) -> tuple[int, int]:
        n = len(self.dirs)
        local = slot // n
        return (self._file_base[slot % n] + local // self.slots_per_file,
                (local % self.slots_per_file) * self.slot_bytes)

    def _plan(self, slots: list[int], indices: Iterable[int]) -> list[_Run]:
        """Group items into runs of adjacent slots of one file; interleave files so threads spread out."""
        by_file: dict[int, list[tuple[int, int]]] = {}
        for i in indices:
            file, offset = self._locate(slots[i])
            by_file.setdefault(file, []).append((offset, i))
        per_file: list[list[_Run]] = []
        for file in sorted(by_file, key=self._file_order.__getitem__):
            runs: list[_Run] = []
            for offset, i in sorted(by_file[file]):
                last = runs[-1] if runs else None
                if (last is not None and len(last.items) < self._max_run
                        and offset == last.offset + len(last.items) * self.slot_bytes):
                    last.items.append(i)
                else:
                    runs.append(_Run(file, offset, [i]))
            per_file.append(runs)
        # Round-robin over files: the pool takes runs in order, so every file (and device) gets work.
        ordered: list[_Run] = []
        for depth in range(max((len(r) for r in per_file), default=0)):
            ordered.extend(runs[depth] for runs in per_file if depth < len(runs))
        return ordered

    def _submit(self, fn: Callable[..., None], batch: _Batch, runs: list[_Run], *args: object) -> None:
        for run in runs:
            self._pool.submit(fn, batch, run, *args)

    def _bounce(self, n: int) -> memoryview:
        """This thread's page-aligned scratch buffer of at least ``n`` slots."""
        buf = getattr(self._local, "bounce", None)
        if buf is None or len(buf) < n * self.slot_bytes:
            buf = memoryview(mmap.mmap(-1, max(n, self._max_run) * self.slot_bytes))
            self._local.bounce = buf
        return buf

    def _write_run(self, batch: _Batch, run: _Run) -> None:
        try:
            bufs: list[memoryview] = []
            bounced = 0
            for i in run.items:
                mv = batch.buffers[i]
                batch.checksums[i] = xxhash.xxh3_64_intdigest(mv)
                if self.direct_io and not _aligned(mv):
                    scratch = self._bounce(len(run.items))
                    mv = scratch[len(bufs) * self.slot_bytes : (len(bufs) + 1) * self.slot_bytes]
                    mv[:] = batch.buffers[i]
                    bounced += 1
                bufs.append(mv)
            results, calls = self._transfer(run, bufs, write=True)
            for i, ok in zip(run.items, results, strict=True):
                batch.ok[i] = ok
            with self._lock:
                self._dirty_files.add(run.file)
                self._stats = _bump(self._stats, syscalls=calls, bounced=bounced,
                                    slots_written=sum(results), write_failures=len(results) - sum(results))
        except Exception:
            logger.exception("SSD write of %d slots at %s+%d failed", len(run.items),
                             self._file_paths[run.file], run.offset)
        finally:
            batch.run_done()

    def _read_run(self, batch: _Batch, run: _Run, slots: list[int]) -> None:
        try:
            bufs: list[memoryview] = []
            bounced: list[tuple[int, memoryview]] = []
            for i in run.items:
                mv = batch.buffers[i]
                if self.direct_io and not _aligned(mv):
                    scratch = self._bounce(len(run.items))
                    mv = scratch[len(bufs) * self.slot_bytes : (len(bufs) + 1) * self.slot_bytes]
                    bounced.append((i, mv))
                bufs.append(mv)
            results, calls = self._transfer(run, bufs, write=False)
            done = {i for i, ok in zip(run.items, results, strict=True) if ok}
            for i, scratch in bounced:
                if i in done:
                    batch.buffers[i][:] = scratch
            mismatches = 0
            for i in run.items:
                if i not in done:
                    continue
                if xxhash.xxh3_64_intdigest(batch.buffers[i]) == batch.checksums[i]:
                    batch.ok[i] = ReadStatus.OK
                else:
                    batch.ok[i] = ReadStatus.CHECKSUM
                    mismatches += 1
                    path, offset = self.location(slots[i])
                    logger.warning("SSD slot %d (%s at byte %d) fails its checksum: treating it as missing",
                                   slots[i], path, offset)
            good = len(done) - mismatches
            with self._lock:
                self._stats = _bump(self._stats, syscalls=calls, bounced=len(bounced), slots_read=good,
                                    read_failures=len(run.items) - good, checksum_mismatches=mismatches)
        except Exception:
            logger.exception("SSD read of %d slots at %s+%d failed", len(run.items),
                             self._file_paths[run.file], run.offset)
        finally:
            batch.run_done()

    def _transfer(self, run: _Run, bufs: list[memoryview], write: bool) -> tuple[list[bool], int]:
        """One pwritev/preadv for the run; if it fails or comes up short, retry slot by slot, so a bad
        sector fails only its own slot. Returns per-slot success and the number of syscalls."""
        fd = self._fds[run.file]
        op = os.pwritev if write else os.preadv
        expected = len(bufs) * self.slot_bytes
        try:
            n = op(fd, bufs, run.offset)
            error: OSError | None = None
        except OSError as exc:
            n, error = -1, exc
        if n == expected:
            return [True] * len(bufs), 1
        if len(bufs) == 1:
            logger.warning("SSD %s of %s at byte %d failed: %s", "write" if write else "read",
                           self._file_paths[run.file], run.offset,
                           error if error is not None else f"{n} of {expected} bytes transferred")
            return [False], 1
        results, calls = [], 1
        for j, buf in enumerate(bufs):
            ok, c = self._transfer(_Run(run.file, run.offset + j * self.slot_bytes, [run.items[j]]), [buf], write)
            results += ok
            calls += c
        return results, calls

    def _commit_write(self, batch: _Batch, items: Sequence[WriteItem]) -> None:
        """After the data of a write batch is on disk: record it (memory, then manifest) in one frame."""
        done: list[SlotRecord] = []
        failed: list[int] = []
        with self._lock:
            for i, item in enumerate(items):
                if batch.ok[i]:
                    rec = SlotRecord(item.slot, item.block_hash, item.parent_hash, item.token_ids,
                                     batch.checksums[i])
                    self._records[item.slot] = rec
                    done.append(rec)
                else:
                    failed.append(item.slot)
            self._manifest.put(done)
            self._manifest.forget(failed)  # the old record (if any) no longer matches the slot's bytes
        self._flush_manifest()

    def _flush_manifest(self) -> None:
        try:
            self._manifest.flush()
        except OSError:
            logger.exception("SSD manifest %s: append failed; records stay in memory", self.manifest_path)
        self._dirty.set()
        appended = self._manifest.appended_bytes
        with self._lock:
            live = len(self._records) * (self._block_size * 4 + 48)  # ~ bytes per record in the log
            start = not self._compacting and appended > max(self._compact_after_bytes, live)
            self._compacting = self._compacting or start
        if start and not self._closed:
            try:
                self._pool.submit(self._compact)
            except RuntimeError:  # close() is shutting the pool down; it compacts anyway
                pass

    def _compact(self) -> None:
        """Rewrite the manifest as just the live records (runs on an I/O thread, or in close())."""
        def snapshot() -> list[SlotRecord]:
            with self._lock:
                self._manifest.drop_pending()  # their effect is in _records already
                records = list(self._records.values())
                self._compacting = False
            records.sort(key=_by_slot)
            return records

        try:
            self._manifest.rewrite(snapshot)
        except OSError:
            logger.exception("SSD manifest %s: compaction failed; the log keeps growing", self.manifest_path)

    # ------------------------------------------------------------------------------ durability

    def _sync_loop(self) -> None:
        """fsync at most every sync_interval_s, and only after something changed (no polling)."""
        while True:
            self._dirty.wait()
            if self._closing.wait(self._sync_interval_s):
                return
            self._dirty.clear()
            try:
                self._sync_data()
                self._manifest.sync()
            except OSError:
                logger.exception("SSD store: periodic sync failed")

    def _sync_data(self) -> None:
        with self._lock:
            files, self._dirty_files = self._dirty_files, set()
        for f in files:
            os.fdatasync(self._fds[f])

    # ------------------------------------------------------------------------------------- open

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"SsdStore over {self.dirs} is closed")

    def _check_slot(self, slot: object, what: str) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"{what}: slot {slot!r} is outside 0..{self.num_slots - 1}")

    def _check_space(self) -> None:
        """Fail before allocating anything if a filesystem cannot hold its share of the slot files."""
        need: dict[int, int] = {}
        dirs_on: dict[int, list[str]] = {}
        for d_index, d in enumerate(self.dirs):
            dev = os.stat(d).st_dev
            dirs_on.setdefault(dev, []).append(d)
            for f in self._files_in_dir(d_index):
                try:
                    allocated = os.stat(self._file_paths[f]).st_blocks * 512
                except FileNotFoundError:
                    allocated = 0
                need[dev] = need.get(dev, 0) + max(0, self._file_sizes[f] - allocated)
        for dev, bytes_needed in need.items():
            free = _free_bytes(dirs_on[dev][0])
            if bytes_needed > free:
                raise SsdNoSpace(
                    f"not enough space for the SSD cache in {', '.join(dirs_on[dev])}: it needs "
                    f"{bytes_needed} more bytes ({bytes_needed / 2**30:.2f} GiB) but only {free} bytes "
                    f"({free / 2**30:.2f} GiB) are free there; lower the SSD capacity or free space"
                )

    def _open_files(self, want_direct: bool) -> bool:
        """Open and preallocate every slot file; remove files a larger configuration left behind.
        Returns whether O_DIRECT is in use."""
        direct = want_direct and hasattr(os, "O_DIRECT")
        for f, path in enumerate(self._file_paths):
            fd = self._open_one(path, direct)
            if fd is None:  # only the first file can get here: later ones know the answer
                direct = False
                logger.warning(
                    "SSD cache directory %s does not support O_DIRECT: using buffered I/O with fdatasync "
                    "(slower, and it competes for page cache)", os.path.dirname(path))
                fd = self._open_one(path, direct)
            assert fd is not None
            self._fds.append(fd)
            self._preallocate(fd, path, self._file_sizes[f])
        for d_index, d in enumerate(self.dirs):
            keep = self._files_in_dir(d_index)
            for name in os.listdir(d):
                m = _FILE_RE.match(name)
                if m and int(m.group(1)) >= len(keep):
                    os.unlink(os.path.join(d, name))
                    logger.info("SSD store: removed %s (beyond the configured capacity)", name)
        return direct

    def _files_in_dir(self, d_index: int) -> range:
        end = self._file_base[d_index + 1] if d_index + 1 < len(self.dirs) else len(self._file_paths)
        return range(self._file_base[d_index], end)

    def _open_one(self, path: str, direct: bool) -> int | None:
        """Open a slot file; None if ``direct`` and the filesystem refuses O_DIRECT."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                return None
            raise SsdDirUnusable(f"SSD cache file {path} cannot be opened: {exc.strerror}") from exc
        if direct and not _direct_read_works(fd):
            os.close(fd)
            return None
        return fd

    def _preallocate(self, fd: int, path: str, size: int) -> None:
        try:
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                free = _free_bytes(os.path.dirname(path))
                raise SsdNoSpace(
                    f"not enough space for the SSD cache in {os.path.dirname(path)}: {path} needs {size} "
                    f"bytes ({size / 2**30:.2f} GiB) and only {free} bytes ({free / 2**30:.2f} GiB) are free"
                ) from exc
            raise SsdDirUnusable(f"SSD cache file {path} cannot be preallocated: {exc.strerror}") from exc

    def _accept(self, contents: ManifestContents, header: ManifestHeader) -> dict[int, SlotRecord]:
        old = contents.header
        if old is None:
            return {}
        if old.fingerprint != header.fingerprint:
            logger.warning(
                "SSD cache %s was written for a different identity: [%s] (fingerprint %s), this store is "
                "[%s] (fingerprint %s); starting empty", self.manifest_path, old.identity, old.fingerprint,
                header.identity, header.fingerprint)
            return {}
        if (old.slot_bytes, old.dirs, old.slots_per_file) != (header.slot_bytes, header.dirs,
                                                             header.slots_per_file):
            logger.warning("SSD cache %s has a different geometry: was %s, now %s; starting empty",
                           self.manifest_path, old.geometry(), header.geometry())
            return {}
        if contents.ignored_tail_bytes:
            logger.warning("SSD manifest %s: ignored a torn or corrupt tail of %d bytes (records after the "
                           "last complete append are lost)", self.manifest_path, contents.ignored_tail_bytes)
        records = {s: r for s, r in contents.records.items() if s < self.num_slots}
        if len(records) < len(contents.records):
            logger.info("SSD store: dropped %d recorded slots beyond the new capacity",
                        len(contents.records) - len(records))
        return records

    def _release_files(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        for fd in self._lock_fds:
            _unlock_dir(fd)
        self._lock_fds = []


def _by_slot(r: SlotRecord) -> int:
    return r.slot


def _bump(stats: SsdStats, **add: int) -> SsdStats:
    return SsdStats(**{k: v + add.get(k, 0) for k, v in vars(stats).items()})


def _remove_stale_rewrites(manifest_path: str) -> None:
    """A crash during a manifest rewrite leaves its temp file; the manifest itself is still whole."""
    directory, name = os.path.split(manifest_path)
    for entry in os.listdir(directory):
        if entry.startswith(name + TMP_SUFFIX):
            os.unlink(os.path.join(directory, entry))


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _direct_read_works(fd: int) -> bool:
    """Some filesystems accept O_DIRECT at open and refuse the I/O (EINVAL); probe with one aligned read."""
    probe = mmap.mmap(-1, ALIGN)
    try:
        os.preadv(fd, [probe], 0)
        return True
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        probe.close()


def _lock_dir(directory: str) -> int:
    """Take ``<dir>/.flexkv.lock`` (flock, non-blocking) and write our pid in it.

    flock belongs to the open file: the kernel drops it when its owner dies, so a lock left by a dead
    process is simply free, and a live owner is reported at once instead of waiting.
    """
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise SsdDirUnusable(
            f"SSD cache directory {directory} cannot be used: {exc.strerror} ({exc.filename})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd, wait_s=0.2)  # the owner writes its pid right after locking
        os.close(fd)
        raise SsdDirInUse(directory, pid) from None
    previous = _read_pid(fd, wait_s=0)
    if previous is not None and previous != os.getpid():
        logger.warning("SSD cache directory %s: taking over the lock of process %d, which is gone",
                       directory, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _unlock_dir(fd: int) -> None:
    os.ftruncate(fd, 0)  # an empty lock file means a clean shutdown; a stale pid means a crash
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _read_pid(fd: int, wait_s: float) -> int | None:
    deadline = time.monotonic() + wait_s
    while True:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return int(text)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)
