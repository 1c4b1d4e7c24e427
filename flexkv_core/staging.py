"""I/O and staging: the cache's worker side. It moves bytes between the CPU pool, the SSD store and peers, and
applies each transfer's outcome to the index.

* **Write-back** (CPU -> SSD): `Placement` reserves SSD copies and hands over `WriteJob`s; a writer thread
  turns them into SSD writes (so the lock holder only queues), and completions announce the SSD copies.
* **Staging** (SSD -> CPU) of a load's SSD-only blocks into fresh CPU slots, verified against the manifest's
  checksums; other loads may join a staging in flight.
* **Fetches** from peers (`RemoteSource`) into CPU slots, indexed as our own blocks when wanted.

Completions run on I/O threads and apply their results a chunk of blocks per hold of the cache's lock (the
engine's scheduler thread waits whenever another thread holds it). A block whose bytes did not arrive
(I/O error, checksum mismatch, dead peer) is a miss from there on, never wrong bytes; what was reserved for
it is released.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

import numpy as np

from .index import READY
from .layout import Tier
from .metrics import CacheMetrics
from .placement import Placement, WriteJob
from .plans import LoadPlan
from .remote import RemoteBlock, RemoteSource
from .tiers.cpu import CpuPool
from .tiers.ssd import ReadStatus, SsdStore, WriteItem

log = logging.getLogger(__name__)

#: Blocks whose outcome one hold of the lock applies: bounds how long a completion blocks the scheduler.
CHUNK = 32


class TierIO:
    def __init__(self, lock: threading.RLock, placement: Placement, pool: CpuPool, ssd: SsdStore | None,
                 metrics: CacheMetrics, slot_bytes: int, publish_usage: Callable[[], None]) -> None:
        self.lock = lock
        self.placement = placement
        self.index = placement.index
        self.pool = pool
        self.ssd = ssd
        self.metrics = metrics
        self.slot_bytes = slot_bytes
        self.publish_usage = publish_usage
        self.staging: dict[int, list[LoadPlan]] = {}  # row being staged SSD -> CPU -> loads that joined it
        self.pending: set[Future] = set()  # write-backs queued or running (flush waits for them)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="flexkv-writeback") if ssd is not None else None

    # ---- write-back ------------------------------------------------------------------------------

    def enqueue_write(self, job: WriteJob) -> None:
        """Called under the lock by `Placement`: queue only."""
        done: Future = Future()
        self.pending.add(done)
        assert self._writer is not None
        self._writer.submit(self._write, job, done)

    def _write(self, job: WriteJob, done: Future) -> None:
        started = time.perf_counter()
        try:
            items = [WriteItem(slot=s, block_hash=h, parent_hash=p, token_ids=t.tobytes(), buffer=self.pool.slot(c))
                     for s, h, p, t, c in zip(job.ssd_slots, job.hashes, job.parents, job.tokens, job.cpu_slots)]
            fut = self.ssd.write(items)
        except Exception:  # noqa: BLE001 - e.g. the store is closing: the copies stay in CPU only
            log.exception("SSD write-back of %d blocks could not start", len(job.hashes))
            fut = Future()
            fut.set_exception(RuntimeError("write-back not submitted"))
        fut.add_done_callback(lambda f: self._written(job, f, done, started))

    def _written(self, job: WriteJob, fut: Future, done: Future, started: float) -> None:
        ok = np.array([bool(s) for s in _statuses(fut, len(job.hashes))], bool)
        try:
            for a in range(0, len(ok), CHUNK):
                with self.lock:
                    rows, good = job.rows[a:a + CHUNK], ok[a:a + CHUNK]
                    if good.any():
                        self.index.finish_fill(Tier.SSD, rows[good])
                        # The store hashed the (pinned) CPU bytes it wrote: the CPU copies' checksums, for free.
                        cpu_slots = np.asarray(job.cpu_slots[a:a + CHUNK], np.int32)[good]
                        hashes = [h for h, g in zip(job.hashes[a:a + CHUNK], good) if g]
                        records = self.ssd.records(s for s, g in zip(job.ssd_slots[a:a + CHUNK], good) if g)
                        sums = [r.checksum if r is not None and r.block_hash == h else None
                                for h, r in zip(hashes, records)]
                        known = np.array([s is not None for s in sums], bool)
                        if known.any():
                            self.placement.fill_cpu(cpu_slots[known], None,
                                                    np.array([s for s in sums if s is not None], np.uint64))
                        self.metrics.stored(Tier.SSD, int(good.sum()))
                    if not good.all():
                        self.metrics.io_error(Tier.SSD, int((~good).sum()))
                        self.placement.free(Tier.SSD, self.index.abort_fill(Tier.SSD, rows[~good]))
                    self.index.unpin(Tier.CPU, rows)
                    self.publish_usage()
            if not ok.all():
                log.warning("SSD write-back failed for %d of %d blocks; they stay in CPU only", int((~ok).sum()), len(ok))
            if ok.any():
                self.metrics.moved("cpu_to_ssd", int(ok.sum()) * self.slot_bytes, time.perf_counter() - started)
        finally:
            with self.lock:
                self.pending.discard(done)
            done.set_result(None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the write-backs queued so far, completions applied. True if they all finished in time."""
        with self.lock:
            pending = list(self.pending)
        _, not_done = wait_futures(pending, timeout=timeout)
        return not not_done

    # ---- staging SSD -> CPU ----------------------------------------------------------------------

    def stage(self, plan: LoadPlan, rows: np.ndarray, positions: np.ndarray, cpu_slots: np.ndarray,
              ssd_slots: np.ndarray) -> None:
        """Read SSD copies of ``rows`` (at ``positions`` of ``plan``) into their fresh CPU slots. Outside the lock."""
        assert self.ssd is not None
        started = time.perf_counter()
        try:
            fut = self.ssd.read([(s, self.pool.slot(c)) for s, c in zip(ssd_slots.tolist(), cpu_slots.tolist())])
        except Exception:  # noqa: BLE001 - the store is closing: a miss
            log.exception("staging %d blocks from SSD could not start", len(rows))
            fut = Future()
            fut.set_exception(RuntimeError("staging not submitted"))
        fut.add_done_callback(lambda f: self._staged(plan, rows, positions, f, started))

    def _staged(self, plan: LoadPlan, rows: np.ndarray, positions: np.ndarray, fut: Future, started: float) -> None:
        statuses = _statuses(fut, len(rows))
        ok = np.array([s is ReadStatus.OK for s in statuses], bool)
        joiners: list[LoadPlan] = []  # one entry per block another load joined
        try:
            self._apply_staged(plan, rows, positions, ok, joiners)
        except Exception:  # noqa: BLE001 - a bug here must not leave the load waiting forever
            log.exception("applying a staging's outcome failed; the load stops at its first block")
            with self.lock:
                plan._limit = 0
        self._count_reads(statuses, started)
        with self.lock:
            settled = [(p, self.part_done(p)) for p in [plan, *joiners]]
        for p, usable in settled:
            if usable is not None:
                p.ready.set_result(usable)

    def _apply_staged(self, plan: LoadPlan, rows: np.ndarray, positions: np.ndarray, ok: np.ndarray,
                      joiners: list[LoadPlan]) -> None:
        index, placement = self.index, self.placement
        for a in range(0, len(rows), CHUNK):
            with self.lock:
                chunk, good, pos = rows[a:a + CHUNK], ok[a:a + CHUNK], positions[a:a + CHUNK]
                for r, g in zip(chunk.tolist(), good.tolist()):
                    for other in self.staging.pop(r, []):
                        joiners.append(other)
                        if not g:  # the joiner pinned a copy that will never arrive
                            k = int(np.flatnonzero(other._rows == r)[0])
                            index.unpin(Tier.CPU, other._rows[k:k + 1])
                            other._pinned[k] = False
                            other._limit = min(other._limit, k)
                if good.any():
                    # The bytes arrived, verified against the manifest's checksum: take its tokens and checksum.
                    done = chunk[good]
                    records = self.ssd.records(index.slots(Tier.SSD, done).tolist())
                    tokens = np.stack([np.frombuffer(rec.token_ids, "<u4") for rec in records])
                    placement.fill_cpu(index.slots(Tier.CPU, done), tokens,
                                       np.array([rec.checksum for rec in records], np.uint64))
                    index.finish_fill(Tier.CPU, done)
                if not good.all():
                    bad = chunk[~good]
                    index.unpin(Tier.CPU, bad)
                    plan._pinned[pos[~good]] = False
                    plan._limit = min(plan._limit, int(pos[~good].min()))
                    placement.free(Tier.CPU, index.abort_fill(Tier.CPU, bad))
                index.unpin(Tier.SSD, chunk)
                if not good.all():
                    # A failed read or checksum: that SSD copy is gone for good (Removed), a miss from now on.
                    bad = chunk[~good]
                    gone = bad[(index.state(Tier.SSD, bad) == READY) & (index.pins(Tier.SSD, bad) == 0)]
                    if gone.size:
                        placement.free(Tier.SSD, index.remove(Tier.SSD, gone))
                self.publish_usage()

    def _count_reads(self, statuses: list[ReadStatus], started: float) -> None:
        good = sum(s is ReadStatus.OK for s in statuses)
        checksum = sum(s is ReadStatus.CHECKSUM for s in statuses)
        failed = len(statuses) - good - checksum
        if good:
            self.metrics.moved("ssd_to_cpu", good * self.slot_bytes, time.perf_counter() - started)
        if checksum:
            self.metrics.checksum_failure(checksum)
        if failed:
            self.metrics.io_error(Tier.SSD, failed)
        if checksum or failed:
            log.warning("SSD read of %d staged blocks: %d failed their checksum, %d failed to read; recomputing from "
                        "the first", len(statuses), checksum, failed)

    # ---- fetches from peers ----------------------------------------------------------------------

    def fetch(self, plan: LoadPlan, remote: RemoteSource, hashes: list[int], slots: list[int], keep: bool) -> None:
        """Fetch ``hashes`` (the blocks of ``plan`` past its own) into CPU ``slots``. Outside the lock."""
        started = time.perf_counter()
        try:
            fut = remote.fetch(hashes, [self.pool.slot(s) for s in slots])
        except Exception:  # noqa: BLE001 - a broken peer layer is a miss, never a crash
            log.exception("remote fetch could not start")
            fut = Future()
            fut.set_result([None] * len(hashes))
        fut.add_done_callback(lambda f: self._fetched(plan, hashes, f, started, keep))

    def _fetched(self, plan: LoadPlan, hashes: list[int], fut: Future, started: float, keep: bool) -> None:
        try:
            results: list[RemoteBlock | None] = list(fut.result())[:len(hashes)]
        except Exception:  # noqa: BLE001 - any peer failure is a miss
            log.exception("remote fetch failed")
            results = []
        got = next((i for i, blk in enumerate(results) if blk is None), len(results))  # the leading run only
        own = len(plan.block_hashes) - len(hashes)
        try:
            self._apply_fetched(plan, hashes, results, got, own, keep)
        except Exception:  # noqa: BLE001 - a bug here must not leave the load waiting forever
            log.exception("applying a fetch's outcome failed; the load stops at the fetched blocks")
            got = 0
        if got < len(hashes):
            log.warning("remote fetch: %d of %d blocks did not arrive; recomputing from the first", len(hashes) - got,
                        len(hashes))
        if got:
            self.metrics.moved("remote_to_cpu", got * self.slot_bytes, time.perf_counter() - started)
        with self.lock:
            plan._limit = min(plan._limit, own + got)
            usable = self.part_done(plan)
        if usable is not None:
            plan.ready.set_result(usable)

    def _apply_fetched(self, plan: LoadPlan, hashes: list[int], results: list, got: int, own: int,
                       keep: bool) -> None:
        index, placement = self.index, self.placement
        for a in range(0, got, CHUNK):
            with self.lock:
                blocks = results[a:min(got, a + CHUNK)]
                ks = range(a, a + len(blocks))
                rows = index.find([hashes[k] for k in ks])
                held = (rows >= 0) & (index.state(Tier.CPU, np.maximum(rows, 0)) != 0)
                if keep and not held.all():
                    # Now ordinary CPU blocks of ours (announced as such); the plan pins them.
                    take = [k for k, h in zip(ks, held.tolist()) if not h]
                    blks = [results[k] for k in take]
                    slots = np.array([plan._fetch_slots[k] for k in take], np.int32)
                    new = index.begin_fill(Tier.CPU, [hashes[k] for k in take], slots, [b.parent_hash for b in blks])
                    sums = [b.checksum for b in blks]
                    placement.fill_cpu(slots, np.stack([np.frombuffer(b.token_ids, "<u4") for b in blks]))
                    if all(s is not None for s in sums):
                        placement.fill_cpu(slots, None, np.array(sums, np.uint64))
                    index.pin(Tier.CPU, new)
                    index.finish_fill(Tier.CPU, new)
                    for k, r in zip(take, new.tolist()):
                        plan._rows[own + k] = r
                        plan._pinned[own + k] = True
                        plan._fetch_slots[k] = -1
                    placement.write_back(new)

    # ---- a load's life -----------------------------------------------------------------------------

    def part_done(self, plan: LoadPlan) -> int | None:
        """One asynchronous part of a load ended (under the lock). When it was the last, trim the plan to its
        usable prefix (releasing the rest) and return how many blocks are usable."""
        plan._parts -= 1
        if plan._parts:
            return None
        usable = min(plan._limit, len(plan.block_hashes))
        past = plan._pinned.copy()
        past[:usable] = False
        if past.any():  # blocks past the first failure are no use to this load
            self.index.unpin(Tier.CPU, plan._rows[past])
            plan._pinned[past] = False
        own = len(plan.block_hashes) - len(plan._fetch_slots)
        scratch = [s for k, s in enumerate(plan._fetch_slots) if s >= 0 and own + k >= usable]
        if scratch:
            self.placement.free(Tier.CPU, np.array(scratch, np.int32))
            plan._fetch_slots = [s if own + k < usable else -1 for k, s in enumerate(plan._fetch_slots)]
        plan._usable = usable
        plan.tier_hits = plan.count_tiers(usable)
        if plan._finished:
            self.release(plan)
        self.publish_usage()
        return usable

    def release(self, plan: LoadPlan) -> None:
        """The engine (or peer) is done with ``plan``: its pins and scratch slots go (under the lock)."""
        if plan._pinned.any():
            self.index.unpin(Tier.CPU, plan._rows[plan._pinned])
            plan._pinned[:] = False
        scratch = [s for s in plan._fetch_slots if s >= 0]
        if scratch:
            self.placement.free(Tier.CPU, np.array(scratch, np.int32))
            plan._fetch_slots = [-1] * len(plan._fetch_slots)
        self.publish_usage()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)


def _statuses(fut: Future, n: int) -> list:
    """Per-item outcome of an SSD batch; an exception fails the whole batch (never raises here)."""
    try:
        results = list(fut.result())
    except Exception:  # noqa: BLE001 - I/O errors of any kind become misses
        log.exception("SSD batch failed")
        return [ReadStatus.IO_ERROR] * n
    return results
