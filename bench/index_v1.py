"""The prefix index as it was before the array-backed rewrite (main at 5e95e44): one Python object per block
and a lazily-invalidated heapq. Kept only as the in-run peer of bench/bench_index.py; nothing else imports it.
"""

# ruff: noqa

from __future__ import annotations

import enum
import heapq
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from flexkv_core.config import EvictionPolicy
from flexkv_core.events import BlockRemoved, BlockStored, EventLog
from flexkv_core.layout import Tier

#: Tiers the index tracks, in lookup preference order (the cheapest to load from first).
TIERS: tuple[Tier, ...] = (Tier.CPU, Tier.SSD)
_TI = {tier: i for i, tier in enumerate(TIERS)}
T = TypeVar("T")


class TierState(enum.IntEnum):
    ABSENT = 0
    FILLING = 1
    READY = 2


class Block:
    """One block and its copies. Plain class with __slots__: a million of these must stay small."""

    __slots__ = ("hash", "parent", "tokens", "slot", "state", "pins", "version",
                 "last_access", "inserted", "hits")

    def __init__(self, block_hash: int, parent: int | None, tokens: bytes, now: float) -> None:
        self.hash = block_hash
        self.parent = parent
        self.tokens = tokens  # uint32 little-endian token ids of this block (for Stored events)
        n = len(TIERS)
        self.slot = [-1] * n
        self.state = [TierState.ABSENT] * n
        self.pins = [0] * n
        self.version = [0] * n  # bumps invalidate stale eviction-heap entries
        self.last_access = now
        self.inserted = now
        self.hits = 0

    def held(self, tier: Tier) -> bool:
        """FILLING or READY in ``tier``."""
        return self.state[_TI[tier]] != TierState.ABSENT

    def ready(self, tier: Tier) -> bool:
        return self.state[_TI[tier]] == TierState.READY

    def slot_in(self, tier: Tier) -> int:
        return self.slot[_TI[tier]]

    def pinned(self, tier: Tier) -> bool:
        return self.pins[_TI[tier]] > 0

    def token_list(self) -> list[int]:
        import numpy as np

        return np.frombuffer(self.tokens, dtype="<u4").tolist()


@dataclass(frozen=True)
class LookupResult:
    """How many *leading* blocks of a hash chain each tier can serve."""

    cpu: int
    ssd: int
    total: int  # block by block from whichever tier holds it (peers included): what a load can deliver
    remote: int = 0  # of ``total``, blocks past our own prefix that other nodes serve


def _policy_key(policy: EvictionPolicy, hit_reward: float) -> Callable[[Block], tuple[float, float]]:
    """Smaller keys are evicted first."""
    if policy == EvictionPolicy.LRU:
        return lambda b: (b.last_access + hit_reward * b.hits, 0.0)
    if policy == EvictionPolicy.LFU:
        return lambda b: (float(b.hits), b.last_access)
    if policy == EvictionPolicy.FIFO:
        return lambda b: (b.inserted, 0.0)
    if policy == EvictionPolicy.MRU:
        return lambda b: (-b.last_access, 0.0)
    if policy == EvictionPolicy.FILO:
        return lambda b: (-b.inserted, 0.0)
    if policy == EvictionPolicy.SLRU:
        # Two segments: blocks hit at most once (probation) go before blocks hit again (protected).
        return lambda b: (0.0 if b.hits < 2 else 1.0, b.last_access)
    raise ValueError(f"unknown eviction policy {policy!r}")


class PrefixIndex:
    def __init__(self, capacity: dict[Tier, int], *, block_size: int, events: EventLog,
                 policy: EvictionPolicy = EvictionPolicy.LRU, hit_reward_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.block_size = block_size
        self.capacity = [capacity.get(t, 0) for t in TIERS]
        self.events = events
        self.clock = clock
        self._key = _policy_key(policy, hit_reward_seconds)
        self._blocks: dict[int, Block] = {}
        self._used = [0] * len(TIERS)  # FILLING + READY copies per tier
        self._ready = [0] * len(TIERS)
        self._pinned = [0] * len(TIERS)  # copies with pins > 0
        self._heaps: list[list[tuple[tuple[float, float], int, int, int]]] = [[] for _ in TIERS]
        self._seq = itertools.count()
        # parent hash -> per-tier count of its children held (FILLING or READY) in that tier. Kept apart from
        # the entries because a parent may leave the index (or arrive later) while its children stay.
        self._kids: dict[int, list[int]] = {}

    # ---- queries ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, block_hash: int) -> Block | None:
        return self._blocks.get(block_hash)

    def blocks(self) -> Iterable[Block]:
        return self._blocks.values()

    def used(self, tier: Tier) -> int:
        return self._used[_TI[tier]]

    def ready_count(self, tier: Tier) -> int:
        return self._ready[_TI[tier]]

    def pinned_count(self, tier: Tier) -> int:
        return self._pinned[_TI[tier]]

    def lookup(self, hashes: Sequence[int]) -> LookupResult:
        cpu = ssd = total = 0
        cpu_run = ssd_run = True
        c, s = _TI[Tier.CPU], _TI[Tier.SSD]
        for h in hashes:
            b = self._blocks.get(h)
            if b is None:
                break
            in_cpu, in_ssd = b.state[c] == TierState.READY, b.state[s] == TierState.READY
            if not (in_cpu or in_ssd):
                break
            total += 1
            cpu_run = cpu_run and in_cpu
            ssd_run = ssd_run and in_ssd
            cpu += cpu_run
            ssd += ssd_run
        return LookupResult(cpu=cpu, ssd=ssd, total=total)

    # ---- state changes ---------------------------------------------------------------------------

    def begin_fill(self, tier: Tier, block_hash: int, slot: int, *, parent: int | None = None,
                   tokens: bytes = b"") -> Block:
        """ABSENT -> FILLING into ``slot``. Creates the entry when the block is new."""
        t = _TI[tier]
        if self._used[t] >= self.capacity[t]:
            raise RuntimeError(f"{tier.name} tier is full ({self.capacity[t]} slots)")
        b = self._blocks.get(block_hash)
        if b is None:
            if len(tokens) != self.block_size * 4:
                raise ValueError(f"block {block_hash:#x}: need {self.block_size} tokens, got {len(tokens) // 4}")
            b = Block(block_hash, parent, tokens, self.clock())
            self._blocks[block_hash] = b
        elif b.state[t] != TierState.ABSENT:
            raise RuntimeError(f"block {block_hash:#x} is already held in {tier.name}")
        b.state[t] = TierState.FILLING
        b.slot[t] = slot
        self._used[t] += 1
        self._child_changed(b, t, +1)
        return b

    def finish_fill(self, tier: Tier, hashes: Sequence[int]) -> None:
        """FILLING -> READY: the bytes are in place. Emits Stored, one event per run of chained blocks."""
        t = _TI[tier]
        done: list[Block] = []
        for h in hashes:
            b = self._blocks[h]
            if b.state[t] != TierState.FILLING:
                raise RuntimeError(f"block {h:#x} is not filling in {tier.name}")
            b.state[t] = TierState.READY
            self._ready[t] += 1
            self._maybe_candidate(b, t)
            done.append(b)
        self._emit_stored(tier, done)

    def abort_fill(self, tier: Tier, hashes: Sequence[int]) -> list[int]:
        """FILLING -> ABSENT (the bytes never arrived). No event: nothing was announced. Returns slots."""
        t = _TI[tier]
        slots = []
        for h in hashes:
            b = self._blocks[h]
            if b.state[t] != TierState.FILLING:
                raise RuntimeError(f"block {h:#x} is not filling in {tier.name}")
            slots.append(self._drop(b, t))
        return slots

    def remove(self, tier: Tier, hashes: Sequence[int]) -> list[int]:
        """READY -> ABSENT (eviction, failed read, reset). Emits one Removed. Returns the freed slots."""
        t = _TI[tier]
        slots, removed = [], []
        for h in hashes:
            b = self._blocks[h]
            if b.state[t] != TierState.READY:
                raise RuntimeError(f"block {h:#x} is not ready in {tier.name}")
            if b.pins[t]:
                raise RuntimeError(f"block {h:#x} is pinned in {tier.name}")
            self._ready[t] -= 1
            removed.append(h)
            slots.append(self._drop(b, t))
        if removed:
            self.events.emit(BlockRemoved(tier=tier, block_hashes=removed))
        return slots

    def pin(self, tier: Tier, block_hash: int) -> None:
        t = _TI[tier]
        b = self._blocks[block_hash]
        if b.pins[t] == 0:
            self._pinned[t] += 1
        b.pins[t] += 1

    def unpin(self, tier: Tier, block_hash: int) -> None:
        t = _TI[tier]
        b = self._blocks.get(block_hash)
        if b is None or b.pins[t] <= 0:
            raise RuntimeError(f"block {block_hash:#x} is not pinned in {tier.name}")
        b.pins[t] -= 1
        if b.pins[t] == 0:
            self._pinned[t] -= 1
            self._maybe_candidate(b, t)

    def touch(self, block_hash: int, hit: bool = True) -> None:
        """A use of the block: refreshes recency (and frequency on a hit) for every tier holding it."""
        b = self._blocks.get(block_hash)
        if b is None:
            return
        b.last_access = self.clock()
        b.hits += hit
        for t in range(len(TIERS)):
            self._maybe_candidate(b, t)

    def eviction_candidates(self, tier: Tier, n: int) -> list[Block]:
        """Up to ``n`` evictable copies in policy order, taken off the candidate heap.

        The caller removes them (or, when it must demote a copy first, pins it; unpinning later makes it a
        candidate again).
        """
        t = _TI[tier]
        heap = self._heaps[t]
        out: list[Block] = []
        while heap and len(out) < n:
            _, _, h, version = heapq.heappop(heap)
            b = self._blocks.get(h)
            if b is not None and b.version[t] == version and self._evictable(b, t):
                b.version[t] += 1  # handed out: its heap entry is consumed
                out.append(b)
        return out

    # ---- internals -------------------------------------------------------------------------------

    def _evictable(self, b: Block, t: int) -> bool:
        if b.state[t] != TierState.READY or b.pins[t]:
            return False
        kids = self._kids.get(b.hash)
        return kids is None or kids[t] == 0

    def _maybe_candidate(self, b: Block, t: int) -> None:
        if not self._evictable(b, t):
            return
        b.version[t] += 1
        heap = self._heaps[t]
        heapq.heappush(heap, (self._key(b), next(self._seq), b.hash, b.version[t]))
        if len(heap) > 4 * self._ready[t] + 1024:
            self._rebuild_heap(t)

    def _rebuild_heap(self, t: int) -> None:
        heap = []
        for b in self._blocks.values():
            if self._evictable(b, t):
                b.version[t] += 1
                heap.append((self._key(b), next(self._seq), b.hash, b.version[t]))
        heapq.heapify(heap)
        self._heaps[t] = heap

    def _drop(self, b: Block, t: int) -> int:
        slot = b.slot[t]
        b.state[t] = TierState.ABSENT
        b.slot[t] = -1
        b.version[t] += 1
        self._used[t] -= 1
        self._child_changed(b, t, -1)
        if not any(b.state):
            del self._blocks[b.hash]
        return slot

    def _child_changed(self, child: Block, t: int, delta: int) -> None:
        if child.parent is None:
            return
        kids = self._kids.get(child.parent)
        if kids is None:
            kids = self._kids[child.parent] = [0] * len(TIERS)
        kids[t] += delta
        if kids[t] == 0:
            if not any(kids):
                del self._kids[child.parent]
            parent = self._blocks.get(child.parent)
            if parent is not None:
                self._maybe_candidate(parent, t)

    def stored_events(self, tier: Tier) -> list[BlockStored]:
        """Stored events for everything READY in ``tier``, parents first: a re-announcement for a
        consumer that lost track (the router after a reset that wiped more than the engine's GPU tier)."""
        t = _TI[tier]
        ready = [b for b in self._blocks.values() if b.state[t] == TierState.READY]
        return self._stored_runs(tier, parents_first(ready, lambda b: b.hash, lambda b: b.parent))

    def _emit_stored(self, tier: Tier, blocks: list[Block]) -> None:
        for event in self._stored_runs(tier, blocks):
            self.events.emit(event)

    def _stored_runs(self, tier: Tier, blocks: list[Block]) -> list[BlockStored]:
        """One Stored per run of blocks that chain (each one's parent is the previous one)."""
        runs: list[list[Block]] = []
        for b in blocks:
            if runs and b.parent == runs[-1][-1].hash:
                runs[-1].append(b)
            else:
                runs.append([b])
        events = []
        for run in runs:
            tokens: list[int] = []
            for b in run:
                tokens.extend(b.token_list())
            events.append(BlockStored(tier=tier, block_hashes=[b.hash for b in run],
                                      parent_block_hash=run[0].parent, token_ids=tokens,
                                      block_size=self.block_size))
        return events


def parents_first(items: Iterable[T], hash_of: Callable[[T], int], parent_of: Callable[[T], int | None]) -> list[T]:
    """``items`` reordered so that each one's parent (when among them) comes before it."""
    by_hash = {hash_of(x): x for x in items}
    order: list[T] = []
    seen: set[int] = set()
    for x in by_hash.values():
        stack = []
        while x is not None and hash_of(x) not in seen:
            stack.append(x)
            seen.add(hash_of(x))
            parent = parent_of(x)
            x = by_hash.get(parent) if parent is not None else None
        order.extend(reversed(stack))
    return order
