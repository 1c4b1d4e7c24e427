"""Events: one per change of what one of our tiers holds.

Contract (what `flexkv_dynamo` and the standalone publisher rely on):

* ``BlockStored(tier, hashes, parent, token_ids)`` is emitted only once the bytes of every block in it
  are readable in that tier. ``token_ids`` holds ``len(block_hashes) * block_size`` tokens, block by
  block; ``parent_block_hash`` is the hash of the block before the first one (None for a root).
* ``BlockRemoved(tier, hashes)`` is emitted when a tier stops holding a block (eviction, failed read,
  checksum mismatch, rollback, reset). Per tier, every stored hash is removed exactly once before it can
  be stored again: Stored and Removed balance.
* ``CacheCleared(tiers)`` follows a reset, *after* the Removed events of everything the reset dropped, so
  a consumer that maps it to a coarse "all cleared" is never needed: the Removed events already say it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import msgspec

from .layout import Tier


class BlockStored(msgspec.Struct, frozen=True, tag=True):
    tier: Tier
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int


class BlockRemoved(msgspec.Struct, frozen=True, tag=True):
    tier: Tier
    block_hashes: list[int]


class CacheCleared(msgspec.Struct, frozen=True, tag=True):
    tiers: list[Tier]


CacheEvent = BlockStored | BlockRemoved | CacheCleared


class EventLog:
    """A thread-safe queue of events, drained by whoever publishes them (the connector's take_events)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._events: list[CacheEvent] = []
        self._listeners: list[Callable[[CacheEvent], None]] = []
        self._lock = threading.Lock()

    def add_listener(self, fn: Callable[[CacheEvent], None]) -> None:
        """Also hand every event to ``fn`` as it happens (e.g. the distributed index publisher).

        Called with the cache's lock held: ``fn`` must only queue, never block.
        """
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[CacheEvent], None]) -> None:
        self._listeners.remove(fn)

    def emit(self, event: CacheEvent) -> None:
        if self.enabled:
            with self._lock:
                self._events.append(event)
        for fn in self._listeners:
            fn(event)

    def drain(self) -> list[CacheEvent]:
        with self._lock:
            events, self._events = self._events, []
        return events

    def __len__(self) -> int:
        return len(self._events)
