"""Fixed-size slot allocator shared by the CPU and SSD tiers."""

from __future__ import annotations


class OutOfSlots(RuntimeError):
    pass


class SlotAllocator:
    """Hands out slot numbers ``0..capacity-1``; O(1) alloc and free, double frees are caught.

    Low slot numbers are handed out first (a LIFO free list seeded in reverse), which keeps a lightly
    used SSD file set dense and lets the SSD tier coalesce neighbouring slots into one I/O.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._used = bytearray(capacity)
        self._num_used = 0

    @property
    def num_free(self) -> int:
        return self.capacity - self._num_used

    @property
    def num_used(self) -> int:
        return self._num_used

    def alloc(self, n: int) -> list[int]:
        """Up to ``n`` free slots (fewer when the tier is full)."""
        out: list[int] = []
        while len(out) < n and self._free:
            slot = self._free.pop()
            if self._used[slot]:  # taken directly by take() while still on the free list
                continue
            self._used[slot] = 1
            out.append(slot)
        self._num_used += len(out)
        return out

    def take(self, slot: int) -> None:
        """Mark a specific slot used (warm restart: the manifest says what lives where)."""
        if self._used[slot]:
            raise ValueError(f"slot {slot} is already in use")
        self._used[slot] = 1
        self._num_used += 1

    def free(self, slots: list[int] | tuple[int, ...]) -> None:
        for slot in slots:
            if not self._used[slot]:
                raise ValueError(f"slot {slot} freed twice")
            self._used[slot] = 0
            self._free.append(slot)
        self._num_used -= len(slots)
