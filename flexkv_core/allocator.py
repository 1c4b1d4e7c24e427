"""Fixed-size slot allocator shared by the CPU and SSD tiers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class SlotAllocator:
    """Hands out slot numbers ``0..capacity-1`` in batches; O(1) per slot, double frees are caught.

    Slots never handed out are given in ascending order, freed ones are reused first (last freed, first
    reused): a lightly used SSD file set stays dense and the SSD tier can coalesce neighbouring slots into
    one I/O. State is two arrays (a 4-byte stack of freed slots, a used byte per slot), allocated zeroed so
    untouched pages cost nothing: a Python list of 10M slot numbers would cost ~360 MB.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._used = np.zeros(capacity, np.uint8)
        self._freed = np.zeros(capacity, np.int32)  # stack of freed slots; [0, _nfreed) valid
        self._nfreed = 0
        self._next = 0  # slots >= _next were never handed out
        self._num_used = 0

    @property
    def num_free(self) -> int:
        return self.capacity - self._num_used

    @property
    def num_used(self) -> int:
        return self._num_used

    def alloc(self, n: int) -> np.ndarray:
        """Up to ``n`` free slots (fewer when the tier is full), as an int32 array."""
        n = min(n, self.num_free)
        if n <= 0:
            return np.empty(0, np.int32)
        parts = []
        got = 0
        while got < n and self._nfreed:
            k = min(n - got, self._nfreed)
            cand = self._freed[self._nfreed - k:self._nfreed][::-1]
            self._nfreed -= k
            cand = cand[self._used[cand] == 0]  # skip those take() claimed while they sat on the stack
            parts.append(cand)
            got += cand.size
        while got < n and self._next < self.capacity:
            stop = min(self.capacity, self._next + n - got)
            cand = np.arange(self._next, stop, dtype=np.int32)
            self._next = stop
            cand = cand[self._used[cand] == 0]
            parts.append(cand)
            got += cand.size
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        self._used[out] = 1
        self._num_used += out.size
        return out

    def take(self, slot: int) -> None:
        """Mark a specific slot used (warm restart: the manifest says what lives where)."""
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} is outside 0..{self.capacity - 1}")
        if self._used[slot]:
            raise ValueError(f"slot {slot} is already in use")
        self._used[slot] = 1
        self._num_used += 1

    def free(self, slots: Sequence[int] | np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int32)
        if slots.size == 0:
            return
        if ((slots < 0) | (slots >= self.capacity)).any():
            raise ValueError(f"slots outside 0..{self.capacity - 1}: {slots[(slots < 0) | (slots >= self.capacity)][:4]}")
        not_used = self._used[slots] == 0
        if not_used.any():
            raise ValueError(f"slot {int(slots[not_used][0])} freed twice")
        if slots.size > 1:
            unique, counts = np.unique(slots, return_counts=True)
            if unique.size != slots.size:
                raise ValueError(f"slot {int(unique[counts > 1][0])} freed twice")
        self._used[slots] = 0
        self._freed[self._nfreed:self._nfreed + slots.size] = slots
        self._nfreed += slots.size
        self._num_used -= slots.size
