"""Lending our blocks to peers: the serving side of distributed reuse.

A peer that wants blocks we hold asks us (through our service, see `flexkv_core.distributed`) to *export* them:
we pin the leading ones we hold (staging SSD-only ones into CPU), tell the peer their CPU slots, parents, token
ids and the xxh3 of each slot's bytes, and keep them pinned until the peer releases them or its lease lapses.
The peer reads the slots itself (Mooncake's transfer engine) and verifies the checksums.

Checksums are kept per CPU slot by `Placement` from the moment they are known: for free from SSD writes and
reads and from verified fetches, otherwise computed once (`remember_checksums`, run by the distributed node in
the background after stores, or the first export) and dropped when the slot gets new content. Hashing runs
outside the cache's lock, on copies the export (or the walk) pins meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from .index import READY
from .layout import Tier
from .plans import LoadPlan

if TYPE_CHECKING:
    from .cache import TieredCache


class Lending:
    def __init__(self, cache: TieredCache) -> None:
        self.cache = cache
        self._exports: dict[int, tuple[LoadPlan, threading.Timer]] = {}  # job -> plan lent, lease timer

    def export(self, block_hashes: Sequence[int], lease_s: float = 30.0, timeout_s: float = 10.0,
               checksums: bool = True) -> dict:
        """Pin the leading blocks we hold (staging SSD-only ones into CPU) so a peer can read their CPU
        slots, for at most ``lease_s`` seconds. Returns the slots, each block's parent and tokens, and
        (if ``checksums``, else None each) an xxh3 of each slot's bytes for the reader to verify."""
        cache = self.cache
        plan = cache.prepare_load(block_hashes, lend=True)
        try:
            n = plan.ready.result(timeout=timeout_s)
        except TimeoutError:
            n = 0
        if n == 0:
            cache.finish_load(plan)
            return {"job": 0, "slots": [], "parents": [], "tokens": [], "checksums": []}
        placement, index = cache.placement, cache.index
        with cache.lock:  # the plan pins these copies: their slots and per-slot data stay put
            rows = plan._rows[:n]
            slots = index.slots(Tier.CPU, rows)
            parents = index.parent_hashes(rows)
            tokens = [t.tobytes() for t in placement.tokens[slots]]
            known = placement.checksum_known[slots].copy() if checksums else np.ones(n, bool)
            sums = placement.checksum[slots].tolist()
        if checksums and not known.all():
            # Hash the unknown ones outside the lock; remember them for the next peer.
            todo = np.flatnonzero(~known)
            computed = [xxhash.xxh3_64_intdigest(cache.pool.slot(int(slots[i]))) for i in todo.tolist()]
            with cache.lock:
                placement.fill_cpu(slots[todo], None, np.array(computed, np.uint64))
            for i, value in zip(todo.tolist(), computed):
                sums[i] = value
        timer = threading.Timer(lease_s, self.release_export, args=(plan.job_id,))
        timer.daemon = True
        with cache.lock:
            self._exports[plan.job_id] = (plan, timer)
        timer.start()
        return {"job": plan.job_id, "slots": slots.tolist(), "parents": parents, "tokens": tokens,
                "checksums": sums if checksums else [None] * n}

    def release_export(self, job: int) -> bool:
        """The peer finished reading (or its lease lapsed): unpin. False if already released."""
        with self.cache.lock:
            entry = self._exports.pop(job, None)
        if entry is None:
            return False
        plan, timer = entry
        timer.cancel()
        self.cache.finish_load(plan)
        return True

    def remember_checksums(self, block_hashes: Sequence[int]) -> int:
        """Compute the checksums of those blocks' CPU copies that have none yet, so that lending them to a
        peer later costs no hashing (a distributed node calls this in the background after stores).
        Skips blocks whose SSD write is in flight: the write computes it. Returns how many it computed."""
        cache = self.cache
        placement, index = cache.placement, cache.index
        with cache.lock:
            rows = index.find(block_hashes)
            rows = rows[rows >= 0]
            rows = rows[index.state(Tier.CPU, rows) == READY]
            rows = rows[~placement.checksum_known[index.slots(Tier.CPU, rows)]]
            rows = rows[index.state(Tier.SSD, rows) != 1]  # FILLING: the write hashes it
            rows = np.unique(rows)
            index.pin(Tier.CPU, rows)  # its bytes stay put while we read them
            slots = index.slots(Tier.CPU, rows)
        sums: list[int] = []
        try:
            for slot in slots.tolist():
                sums.append(xxhash.xxh3_64_intdigest(cache.pool.slot(slot)))
        finally:
            with cache.lock:
                if sums:
                    placement.fill_cpu(slots[:len(sums)], None, np.array(sums, np.uint64))
                index.unpin(Tier.CPU, rows)
        return len(sums)

    def close(self) -> None:
        for job in list(self._exports):
            self.release_export(job)
