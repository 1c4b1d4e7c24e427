"""The prefix index: which block lives in which of our tiers, in what state, and who may be evicted.

Each block (named by its chained hash) has, per tier, a state:

* ABSENT  - the tier does not hold it;
* FILLING - a slot is reserved and bytes are on their way (invisible to lookups, never evicted);
* READY   - bytes are in place: visible to lookups, announced with a Stored event.

A transfer that reads a READY copy pins it; pinned copies are never evicted. Eviction takes, per tier, READY
unpinned copies that have no child in the same tier (leaves first, so prefixes stay whole), ordered by the
configured policy. The index tells its observer about every READY transition (`IndexObserver`), so the
events built from them (`flexkv_core.events.TierEvents`) balance per tier by construction.

How it is built, and why
------------------------
A node with a few TB of SSD and small blocks holds tens of millions of blocks, and the engine's scheduler
thread runs this code on every step. A Python object per block costs ~600 B and microseconds per touch; a
numpy-only version still pays ~1 us per vector operation, dozens of them per call. So:

* **Rows in arrays.** Each block is a *row* of preallocated numpy arrays owned here: hash, parent row, per
  tier state / slot / pins / children held, hits, and the policy key. They are sized once for the capacity
  and allocated zeroed, so the OS maps a page only when a row on it is first used, and freed rows are reused
  before new ones: memory follows the resident blocks (60-70 B each with the map, measured as RSS growth by
  bench/bench_index.py), not the capacity. Queries and walks read the arrays directly (vectorised).
* **Transitions in C.** `IndexCore` (`flexkv_core/native/index.c`, built at install) applies a batch of
  changes to those arrays in one call: per block a few dozen nanoseconds instead of a few microseconds. It
  also holds the two structures Python cannot make small: the **hash -> row map** (open addressing, 4 B per
  bucket at load <= 0.7, keys read from the hash array, on huge pages when large; a Python dict of ints costs
  ~100 B per entry; a chain's lookups prefetch their buckets so the cache misses overlap) and,
  per tier, the **eviction heap** (an indexed min-heap of exactly the evictable copies: READY, unpinned, no
  child held in that tier). Every change of evictability (ready, pin, unpin, a child arriving or leaving, a
  touch) adds, discards or re-sorts that row in O(log n), so taking n victims costs O(n log N) whatever
  ``evict_ratio`` is: no scan, no lazily invalidated entries, no rebuilds. Each call validates its whole
  batch before changing anything.
* **Parents are rows.** A parent that leaves every tier while a child stays keeps its row as a *ghost* (no
  copy, invisible to lookups) so its child counts survive: stored again, it still goes after its children.
  A ghost is freed with its last child. Each ghost has a held child, so rows <= 2 x capacity.
* **Policy keys** ``(k1, k2)`` per row (both tiers share them), smaller goes first, ties by row:
  lru ``(last_access + hit_reward * hits, 0)``, lfu ``(hits, last_access)``, fifo ``(inserted, 0)``,
  mru ``(-last_access, 0)``, filo ``(-inserted, 0)``, slru ``(0 if hits < 2 else 1, last_access)``.
* **Batches.** Every operation takes a batch (a chain, typically), so Python's overhead is paid per call,
  not per block. A batch names each block once.
* **No tokens here.** A block's token ids (128 B at block size 32) are kept where they are needed: per CPU
  slot by the cache, per SSD slot by the SSD manifest.

The index is not thread-safe: `TieredCache` serialises access with its lock.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .config import EvictionPolicy
from .layout import Tier
from .native import IndexCore

#: Tiers the index tracks, in lookup preference order (the cheapest to load from first).
TIERS: tuple[Tier, ...] = (Tier.CPU, Tier.SSD)
_TI = {tier: i for i, tier in enumerate(TIERS)}
CPU, SSD = _TI[Tier.CPU], _TI[Tier.SSD]

Rows = np.ndarray  # int32 row numbers
_NO_ROWS = np.empty(0, np.int32)


class TierState(enum.IntEnum):
    ABSENT = 0
    FILLING = 1
    READY = 2


ABSENT, FILLING, READY = TierState.ABSENT, TierState.FILLING, TierState.READY


@dataclass
class LookupResult:
    """How many *leading* blocks of a hash chain each tier can serve."""

    cpu: int
    ssd: int
    total: int  # block by block from whichever tier holds it (peers included): what a load can deliver
    remote: int = 0  # of ``total``, blocks past our own prefix that other nodes serve


class IndexObserver(Protocol):
    """Told about every READY transition, synchronously, while the rows still describe the copies."""

    def stored(self, tier: Tier, rows: Rows) -> None:
        """``rows`` just became READY in ``tier`` (in the order given to ``finish_fill``)."""

    def removed(self, tier: Tier, rows: Rows, hashes: np.ndarray) -> None:
        """The blocks in ``rows`` (``hashes``: theirs, uint64) stopped being READY in ``tier``. The rows may
        already be free: use ``hashes``."""


@dataclass(frozen=True)
class BlockView:
    """A snapshot of one block's row, for tests and diagnostics (the index itself keeps no objects)."""

    hash: int
    parent: int | None
    state: tuple[TierState, ...]
    slot: tuple[int, ...]
    pins: tuple[int, ...]

    def held(self, tier: Tier) -> bool:
        """FILLING or READY in ``tier``."""
        return self.state[_TI[tier]] != ABSENT

    def ready(self, tier: Tier) -> bool:
        return self.state[_TI[tier]] == READY

    def slot_in(self, tier: Tier) -> int:
        return self.slot[_TI[tier]] if self.held(tier) else -1

    def pinned(self, tier: Tier) -> bool:
        return self.pins[_TI[tier]] > 0


class PrefixIndex:
    def __init__(self, capacity: dict[Tier, int], *, policy: EvictionPolicy = EvictionPolicy.LRU,
                 hit_reward_seconds: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 observer: IndexObserver | None = None) -> None:
        self.capacity = [int(capacity.get(t, 0)) for t in TIERS]
        self.policy = EvictionPolicy(policy)
        self.clock = clock
        self.observer = observer
        self.max_rows = max(16, 2 * sum(self.capacity))  # blocks + ghosts (see the module docstring)
        n = self.max_rows
        self._hash = np.zeros(n, np.uint64)
        self._parent = np.zeros(n, np.int32)  # parent's row; -1: none; -2: a free row
        self._state = [np.zeros(n, np.uint8) for _ in TIERS]
        self._slot = [np.zeros(n, np.int32) for _ in TIERS]
        self._pins = [np.zeros(n, np.int32) for _ in TIERS]
        self._kids = [np.zeros(n, np.int32) for _ in TIERS]  # children held (FILLING or READY) in that tier
        self._hits = np.zeros(n, np.uint32)
        self._k1 = np.zeros(n, np.float64)
        self._k2 = np.zeros(n, np.float64)
        self._core = IndexCore(
            self.capacity[CPU], self.capacity[SSD], self.policy.value, float(hit_reward_seconds),
            hash=self._hash, parent=self._parent, state_cpu=self._state[CPU], state_ssd=self._state[SSD],
            slot_cpu=self._slot[CPU], slot_ssd=self._slot[SSD], pins_cpu=self._pins[CPU], pins_ssd=self._pins[SSD],
            kids_cpu=self._kids[CPU], kids_ssd=self._kids[SSD], hits=self._hits, k1=self._k1, k2=self._k2)

    # ---- queries ---------------------------------------------------------------------------------

    def counts(self) -> dict:
        """O(1) counters: blocks, rows, mapped, and per tier (CPU, SSD) used, ready, pinned, evictable."""
        return self._core.counts()

    def __len__(self) -> int:
        """Blocks held (FILLING or READY) in at least one tier."""
        return self._core.counts()["blocks"]

    @property
    def rows_in_use(self) -> int:
        """Rows ever handed out: every block (and ghost) has a row below this."""
        return self._core.counts()["rows"]

    def used(self, tier: Tier) -> int:
        return self._core.counts()["used"][_TI[tier]]

    def ready_count(self, tier: Tier) -> int:
        return self._core.counts()["ready"][_TI[tier]]

    def pinned_count(self, tier: Tier) -> int:
        return self._core.counts()["pinned"][_TI[tier]]

    def find(self, hashes: Sequence[int] | np.ndarray, *, prefix: bool = False) -> Rows:
        """Rows of ``hashes``, -1 where unknown; with ``prefix`` only the rows of the leading known ones.
        A known row may hold no copy (a ghost): check `state`."""
        out = np.empty(len(hashes), np.int32)
        n = self._core.find(hashes, out, prefix)
        return out[:n] if prefix else out

    def lookup(self, hashes: Sequence[int] | np.ndarray) -> LookupResult:
        cpu, ssd, total = self._core.lookup(hashes)
        return LookupResult(cpu=cpu, ssd=ssd, total=total)

    def state(self, tier: Tier, rows: Rows) -> np.ndarray:
        return self._state[_TI[tier]][rows]

    def slots(self, tier: Tier, rows: Rows) -> np.ndarray:
        """Slot of each row's copy in ``tier`` (meaningful where the row holds one)."""
        return self._slot[_TI[tier]][rows]

    def pins(self, tier: Tier, rows: Rows) -> np.ndarray:
        return self._pins[_TI[tier]][rows]

    def hashes(self, rows: Rows) -> np.ndarray:
        return self._hash[rows]

    def parents(self, rows: Rows) -> Rows:
        """Each row's parent row (-1: a root)."""
        return self._parent[rows]

    def parent_of(self, row: int) -> int:
        """One row's parent row (-1: a root)."""
        return int(self._parent[row])

    def parent_hashes(self, rows: Rows) -> list[int | None]:
        prow = self._parent[rows]
        hashes = self._hash[prow].tolist()
        return [h if p >= 0 else None for h, p in zip(hashes, prow.tolist())]

    def ready_rows(self, tier: Tier, start: int, stop: int) -> Rows:
        """Rows in [start, stop) holding a READY copy in ``tier`` (for walks over the index in chunks)."""
        stop = min(stop, self.rows_in_use)
        if start >= stop:
            return _NO_ROWS
        return (np.flatnonzero(self._state[_TI[tier]][start:stop] == READY) + start).astype(np.int32)

    def get(self, block_hash: int) -> BlockView | None:
        """A snapshot of one block (None when no tier holds it). For tests and diagnostics."""
        (row,) = self.find([block_hash]).tolist()
        if row < 0 or not self._held_anywhere(row):
            return None
        return self._view(row)

    def blocks(self) -> Iterator[BlockView]:
        """Every block held somewhere. O(rows): for tests and diagnostics, never on a hot path."""
        for row in range(self.rows_in_use):
            if self._held_anywhere(row):
                yield self._view(row)

    def _view(self, row: int) -> BlockView:
        parent = int(self._parent[row])
        return BlockView(
            hash=int(self._hash[row]), parent=int(self._hash[parent]) if parent >= 0 else None,
            state=tuple(TierState(int(s[row])) for s in self._state), slot=tuple(int(s[row]) for s in self._slot),
            pins=tuple(int(p[row]) for p in self._pins))

    def _held_anywhere(self, row: int) -> bool:
        return any(s[row] != ABSENT for s in self._state)

    def check(self) -> None:
        """Verify every invariant the index maintains (tests). O(rows)."""
        counts = self._core.counts()
        n = counts["rows"]
        live = np.ones(n, bool)
        live[self._core.free_rows()] = False
        assert (self._parent[:n][~live] == -2).all(), "free rows are marked free"
        held = np.zeros(n, bool)
        for t in range(len(TIERS)):
            held |= self._state[t][:n] != ABSENT
        assert not (held & ~live).any(), "a free row holds a copy"
        par = self._parent[:n]
        assert int(held.sum()) == counts["blocks"], "block count"
        assert counts["mapped"] == int(live.sum()), "map size"
        for t in range(len(TIERS)):
            st, pins, kids = self._state[t][:n], self._pins[t][:n], self._kids[t][:n]
            expect = np.zeros(n, np.int64)
            mask = live & (st != ABSENT) & (par >= 0)
            np.add.at(expect, par[mask], 1)
            assert (expect == kids).all(), "child counts"
            assert int((st != ABSENT).sum()) == counts["used"][t], "used"
            assert int((st == READY).sum()) == counts["ready"][t], "ready"
            assert int((pins > 0).sum()) == counts["pinned"][t], "pinned"
            assert (pins[st == ABSENT] == 0).all(), "pins on an absent copy"
            evictable = live & (st == READY) & (pins == 0) & (kids == 0)
            assert sorted(self._core.heap_rows(t)) == np.flatnonzero(evictable).tolist(), \
                "the eviction heap holds exactly the evictable copies"
        ghosts = live & ~held
        assert (par[ghosts] == -1).all(), "a ghost keeps no parent link"
        assert ((self._kids[CPU][:n] + self._kids[SSD][:n])[ghosts] > 0).all(), "a ghost without children"
        assert (self.find(self._hash[:n][live]) == np.flatnonzero(live)).all(), "the map finds every row"

    # ---- state changes ---------------------------------------------------------------------------

    def begin_fill(self, tier: Tier, hashes: Sequence[int] | np.ndarray, slots: Sequence[int] | np.ndarray,
                   parents: Sequence[int | None] | None = None) -> Rows:
        """ABSENT -> FILLING into ``slots``, creating rows for blocks the index does not know. ``parents``
        (one per hash, None for a root) is needed for blocks no tier holds yet and ignored for the others.
        Returns the rows."""
        rows = np.empty(len(hashes), np.int32)
        self._core.begin_fill(_TI[tier], hashes, slots, parents, self.clock(), rows)
        return rows

    def begin_fill_rows(self, tier: Tier, rows: Rows, slots: Sequence[int] | np.ndarray) -> None:
        """ABSENT -> FILLING in ``tier`` for blocks another tier holds (write-back, staging)."""
        self._core.begin_fill_rows(_TI[tier], rows, slots)

    def finish_fill(self, tier: Tier, rows: Rows) -> None:
        """FILLING -> READY: the bytes are in place. The observer announces them."""
        if len(rows) == 0:
            return
        self._core.finish_fill(_TI[tier], rows)
        if self.observer is not None:
            self.observer.stored(tier, rows)

    def abort_fill(self, tier: Tier, rows: Rows) -> np.ndarray:
        """FILLING -> ABSENT (the bytes never arrived). No event: nothing was announced. Returns the slots."""
        out = np.empty(len(rows), np.int32)
        self._core.abort_fill(_TI[tier], rows, out)
        return out

    def remove(self, tier: Tier, rows: Rows) -> np.ndarray:
        """READY -> ABSENT (eviction, failed read, reset). The observer announces it. Returns the slots."""
        out = np.empty(len(rows), np.int32)
        if len(rows) == 0:
            return out
        hashes = self._hash[rows]  # rows may be freed and later reused: take the hashes first
        self._core.remove(_TI[tier], rows, out)
        if self.observer is not None:
            self.observer.removed(tier, rows, hashes)
        return out

    def pin(self, tier: Tier, rows: Rows) -> None:
        """One more transfer reads (or writes) these copies: they are not evicted until unpinned."""
        self._core.pin(_TI[tier], rows)

    def unpin(self, tier: Tier, rows: Rows) -> None:
        self._core.unpin(_TI[tier], rows)

    def touch(self, rows: Rows, hit: bool = True) -> None:
        """A use of these blocks: refreshes recency (and frequency on a hit) for every tier holding them."""
        if len(rows):
            self._core.touch(rows, hit, self.clock())

    def give_back(self, tier: Tier, rows: Rows) -> None:
        """Victims taken by `pop_victims` that the caller keeps after all: candidates again."""
        self._core.readd(_TI[tier], rows)

    def pop_victims(self, tier: Tier, n: int) -> Rows:
        """Up to ``n`` evictable copies of ``tier`` in policy order, taken out of the eviction heap. The caller
        removes them, pins them (a copy to demote first: unpinning makes it a candidate again) or gives them
        back (`give_back`)."""
        out = np.empty(max(0, n), np.int32)
        return out[:self._core.pop(_TI[tier], out)] if n > 0 else out


def parents_first(items: Sequence, hash_of: Callable, parent_of: Callable) -> list:
    """``items`` reordered so that each one's parent (when among them) comes before it."""
    by_hash = {hash_of(x): x for x in items}
    order: list = []
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
