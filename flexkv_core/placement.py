"""Placement: which block gets which slot of which tier, and which block makes room (the cache's manager).

`Placement` owns the prefix index, the slot allocators of the CPU and SSD tiers, and what the cache keeps per
CPU slot (the block's token ids and, once known, the xxh3 of its bytes). It decides; it moves no bytes:
an SSD copy it reserves (write-back, or demotion of a CPU block that eviction wants gone) becomes a
`WriteJob` that the I/O side (`flexkv_core.staging.TierIO`) carries out and reports back.

Eviction: a tier past ``evict_start_threshold`` frees ``max(what is needed, evict_ratio * capacity)`` slots,
taking victims from the index in policy order (leaves first, never pinned). A CPU victim with no SSD copy
is demoted first (written to SSD, then evicted in a later round, when its copy is READY), unless SSD has no
room: then it is dropped, as it would be without an SSD tier. With ``evict_ratio=0`` a store evicts exactly
what it needs, at O(log n) per victim.

Not thread-safe: every method runs under the cache's lock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .allocator import SlotAllocator
from .config import FlexKVConfig
from .index import READY, IndexObserver, PrefixIndex
from .layout import Tier
from .metrics import CacheMetrics


@dataclass
class WriteJob:
    """SSD copies reserved for CPU blocks (CPU copies pinned meanwhile): everything the writer needs, taken
    under the lock so the writing happens outside it."""

    rows: np.ndarray  # index rows
    hashes: list[int]
    parents: list[int | None]
    ssd_slots: list[int]
    cpu_slots: list[int]
    tokens: np.ndarray  # (n, block_size) uint32, copied


class Placement:
    def __init__(self, config: FlexKVConfig, *, cpu_slots: int, ssd_slots: int, block_size: int,
                 metrics: CacheMetrics, observer: IndexObserver | None = None,
                 forget_ssd: Callable[[np.ndarray], None] | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.block_size = block_size
        self.has_ssd = ssd_slots > 0
        self.index = PrefixIndex({Tier.CPU: cpu_slots, Tier.SSD: ssd_slots}, policy=config.eviction_policy,
                                 hit_reward_seconds=config.hit_reward_seconds, observer=observer)
        self.alloc = {Tier.CPU: SlotAllocator(cpu_slots), Tier.SSD: SlotAllocator(ssd_slots)}
        # Per CPU slot: the token ids of the block it holds (valid while a copy lives there), and the xxh3 of
        # its bytes once known (exports hand it to the peer that verifies what it read).
        self.tokens = np.zeros((cpu_slots, block_size), np.uint32)
        self.checksum = np.zeros(cpu_slots, np.uint64)
        self.checksum_known = np.zeros(cpu_slots, bool)
        # Who carries out the SSD copies reserved here (the cache sets its I/O side; called under the lock).
        self.write_sink: Callable[[WriteJob], None] = self._no_writer
        self._forget_ssd = forget_ssd  # the SSD store forgets what evicted slots held

    # ---- slots -----------------------------------------------------------------------------------

    def allocate(self, tier: Tier, n: int) -> np.ndarray:
        """Up to ``n`` slots of ``tier``, evicting by policy when the tier is past its threshold."""
        alloc = self.alloc[tier]
        if n <= 0:
            return np.empty(0, np.int32)
        start_at = math.floor(self.config.evict_start_threshold * alloc.capacity)
        over = alloc.num_used + n - start_at
        if over > 0 or alloc.num_free < n:
            want = max(over, n - alloc.num_free, math.ceil(self.config.evict_ratio * alloc.capacity))
            self.evict(tier, want)
        return alloc.alloc(n)

    def free(self, tier: Tier, slots: np.ndarray) -> None:
        if len(slots) == 0:
            return
        self.alloc[tier].free(slots)
        if tier is Tier.SSD and self._forget_ssd is not None:
            self._forget_ssd(np.asarray(slots).tolist())

    def fill_cpu(self, slots: np.ndarray, tokens: np.ndarray | None, checksums: np.ndarray | None = None) -> None:
        """New content for CPU ``slots``: its tokens (n, block_size) and, when known, its checksums."""
        if tokens is not None:
            self.tokens[slots] = tokens
        if checksums is None:
            self.checksum_known[slots] = False
        else:
            self.checksum[slots] = checksums
            self.checksum_known[slots] = True

    # ---- eviction --------------------------------------------------------------------------------

    def evict(self, tier: Tier, n: int) -> int:
        """Free up to ``n`` slots of ``tier``. Only leaves are candidates, so evicting a chain's tail makes its
        parent a candidate: go round until enough is free or nothing is left to take. CPU victims without an
        SSD copy are demoted, at most ``n`` per call (each is freed by a later call, once written): the work
        of one call stays proportional to ``n`` even when write-back lags far behind. Returns slots freed."""
        index = self.index
        freed = demoted = 0
        while freed < n:
            victims = index.pop_victims(tier, n - freed)
            if victims.size == 0:
                break
            demote = np.empty(0, np.int32)
            if tier is Tier.CPU and self.has_ssd:
                only_copy = index.state(Tier.SSD, victims) == 0
                demote, victims = victims[only_copy], victims[~only_copy]
                room = max(0, n - demoted)
                if demote.size > room:
                    index.give_back(tier, demote[room:])
                    demote = demote[:room]
            progress = victims.size + demote.size
            if victims.size:
                self.free(tier, index.remove(tier, victims))
                self.metrics.evicted(tier, victims.size)
                freed += victims.size
            if demote.size:
                # Written ones are pinned until on SSD (not offered again in this loop); those SSD has no room
                # for are dropped outright, as they would be without an SSD tier.
                unwritten = self.write_back(demote)
                demoted += demote.size - unwritten.size
                if unwritten.size:
                    self.free(tier, index.remove(tier, unwritten))
                    self.metrics.evicted(tier, unwritten.size)
                    freed += unwritten.size
            if not progress:
                break  # the next candidates are copies to demote, and this call demoted its share
        return freed

    def write_back(self, rows: np.ndarray) -> np.ndarray:
        """Reserve SSD copies of those CPU-ready ``rows`` that have none (their CPU copies pinned until written)
        and queue them for the writer. Returns the rows that needed a copy but got no SSD slot."""
        if not self.has_ssd or rows.size == 0:
            return np.empty(0, np.int32)
        index = self.index
        rows = rows[(index.state(Tier.CPU, rows) == READY) & (index.state(Tier.SSD, rows) == 0)]
        if rows.size == 0:
            return rows
        slots = self.allocate(Tier.SSD, rows.size)
        todo, left = rows[:slots.size], rows[slots.size:]
        if todo.size:
            index.begin_fill_rows(Tier.SSD, todo, slots)
            index.pin(Tier.CPU, todo)  # the writer reads these bytes
            cpu_slots = index.slots(Tier.CPU, todo)
            self.write_sink(WriteJob(rows=todo, hashes=index.hashes(todo).tolist(),
                                     parents=index.parent_hashes(todo), ssd_slots=slots.tolist(),
                                     cpu_slots=cpu_slots.tolist(), tokens=self.tokens[cpu_slots]))
        return left

    @staticmethod
    def _no_writer(job: WriteJob) -> None:
        raise RuntimeError("Placement has an SSD tier but nobody to write to it (write_sink)")

    # ---- whole-tier walks (operators, resets) ----------------------------------------------------

    def remove_unpinned(self, tier: Tier, start: int, stop: int) -> int:
        """Drop every unpinned READY copy of ``tier`` among rows [start, stop). Returns how many."""
        index = self.index
        rows = index.ready_rows(tier, start, stop)
        rows = rows[index.pins(tier, rows) == 0]
        if rows.size:
            self.free(tier, index.remove(tier, rows))
        return int(rows.size)

    def usage(self) -> dict[Tier, tuple[int, int]]:
        return {t: (a.num_used, a.capacity) for t, a in self.alloc.items()}

