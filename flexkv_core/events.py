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

`TierEvents` builds them: it observes the index's READY transitions (so the balance holds by construction)
and takes token ids from where the cache keeps them (per CPU slot; per SSD slot in the SSD manifest). It also
re-announces everything the tiers hold, for a consumer that forgot us, a chunk of rows at a time (see
`TierEvents.start_reannounce`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from .layout import Tier

if TYPE_CHECKING:
    from .index import PrefixIndex


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
        self._events: list[CacheEvent | Callable[[], list[CacheEvent]]] = []
        self._listeners: list[Callable[[CacheEvent], None]] = []
        self._lock = threading.Lock()

    def add_listener(self, fn: Callable[[CacheEvent], None]) -> None:
        """Also hand every event to ``fn`` as it happens (e.g. the distributed index publisher).

        Called with the cache's lock held: ``fn`` must only queue, never block.
        """
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[CacheEvent], None]) -> None:
        self._listeners.remove(fn)

    def emit(self, event: CacheEvent, *, queue: bool = True, listeners: bool = True) -> None:
        """Queue ``event`` for `drain` (unless ``queue`` is False) and hand it to the listeners (unless
        ``listeners`` is False)."""
        if self.enabled and queue:
            with self._lock:
                self._events.append(event)
        if listeners:
            for fn in self._listeners:
                fn(event)

    def emit_deferred(self, build: Callable[[], list[CacheEvent]]) -> None:
        """Queue events that ``build`` makes when they are drained (outside the cache's lock): for bulk events
        whose order is fixed now but whose objects are costly (re-announcement). Listeners do not see them."""
        if self.enabled:
            with self._lock:
                self._events.append(build)

    def drain(self) -> list[CacheEvent]:
        with self._lock:
            entries, self._events = self._events, []
        events: list[CacheEvent] = []
        for entry in entries:
            if callable(entry):
                events.extend(entry())
            else:
                events.append(entry)
        return events

    def __len__(self) -> int:
        return len(self._events)


#: Tiers in the index's order (its tier numbers index this tuple).
_TIERS = (Tier.CPU, Tier.SSD)
_CPU, _SSD = 0, 1  # the index's tier numbers
_READY = 2
#: Rows a re-announcement step looks through for READY copies (empty rows cost a vector compare each).
SCAN_ROWS = 8192


@dataclass
class _Walk:
    """A re-announcement in progress: rows below ``cursor`` are announced, and so are ``marked`` ones."""

    cursor: int
    marked: np.ndarray  # bool per row: announced ahead of the cursor (an ancestor of an announced block)

    def walked(self, rows: np.ndarray) -> np.ndarray:
        return (rows < self.cursor) | self.marked[rows]


class TierEvents:
    """The index's observer: READY transitions become Stored / Removed events with the blocks' token ids.

    Token ids come from ``cpu_tokens`` (per CPU slot, valid while a READY copy lives there) or, for a block with
    no CPU copy, from ``ssd_tokens(ssd_slots)`` (the SSD manifest's records). Everything runs under the cache's
    lock.

    Re-announcement (`start_reannounce`, then `advance` until it returns True): a consumer that forgot what our
    tiers hold (vLLM's AllBlocksCleared makes Dynamo's router forget every tier of the worker) gets a Stored for
    every READY copy, parents before children, a chunk of rows at a time so that no single hold of the lock
    walks the whole index. While it runs, an event about a row the walk has not reached yet is not queued (it
    still reaches the listeners): the walk will announce that row's state as it finds it, so every copy is
    announced exactly once and Stored/Removed still balance. A row whose parent lies ahead of the walk announces
    that parent (and its unannounced ancestors) first.
    """

    def __init__(self, log: EventLog, block_size: int) -> None:
        self.log = log
        self.block_size = block_size
        self.index: PrefixIndex | None = None
        self.cpu_tokens: np.ndarray | None = None
        self.ssd_tokens: Callable[[list[int]], list[bytes | None]] = lambda slots: [None] * len(slots)
        self._walk: _Walk | None = None

    def bind(self, index: PrefixIndex, cpu_tokens: np.ndarray,
             ssd_tokens: Callable[[list[int]], list[bytes | None]]) -> None:
        self.index, self.cpu_tokens, self.ssd_tokens = index, cpu_tokens, ssd_tokens

    # ---- IndexObserver -----------------------------------------------------------------------------

    def stored(self, tier: Tier, rows: np.ndarray) -> None:
        t = np.full(len(rows), _TIERS.index(tier), np.uint8)
        events = self._stored_events(t, rows)
        if self._walk is None:
            for event in events:
                self.log.emit(event)
            return
        for event in events:
            self.log.emit(event, queue=False)
        ahead = ~self._walk.walked(rows)
        if ahead.any():
            events = self._stored_events(t[~ahead], rows[~ahead])
        for event in events:
            self.log.emit(event, listeners=False)

    def removed(self, tier: Tier, rows: np.ndarray, hashes: np.ndarray) -> None:
        if self._walk is None:
            self.log.emit(BlockRemoved(tier=tier, block_hashes=hashes.tolist()))
            return
        self.log.emit(BlockRemoved(tier=tier, block_hashes=hashes.tolist()), queue=False)
        walked = self._walk.walked(rows)
        if walked.any():
            self.log.emit(BlockRemoved(tier=tier, block_hashes=hashes[walked].tolist()), listeners=False)

    # ---- re-announcement ---------------------------------------------------------------------------

    @property
    def reannouncing(self) -> bool:
        return self._walk is not None

    def start_reannounce(self) -> None:
        """Drop the queued events (history the walk's snapshot contains) and start the walk at row 0."""
        assert self.index is not None
        self.log.drain()
        self._walk = _Walk(cursor=0, marked=np.zeros(self.index.max_rows, bool))

    def advance(self, max_rows: int) -> bool:
        """Announce the next ``max_rows`` rows holding a READY copy (and the ancestors they need first),
        skipping empty rows quickly. True when the walk is over."""
        w, index = self._walk, self.index
        if w is None:
            return True
        a = w.cursor
        end = index.rows_in_use
        b = min(a + SCAN_ROWS, end)
        span = slice(a, b)
        ready = (index.state(Tier.CPU, span) == _READY) | (index.state(Tier.SSD, span) == _READY)
        rows = (np.flatnonzero(ready & ~w.marked[a:b]) + a).astype(np.int32)
        if rows.size > max_rows:  # stop right after the last row announced now
            rows = rows[:max_rows]
            b = int(rows[-1]) + 1
        parents = index.parents(rows)
        climb = ((parents > rows) & ~w.marked[np.maximum(parents, 0)]).tolist()
        seq: list[int] = []
        marked, parent = w.marked, index.parent_of
        for r, up in zip(rows.tolist(), climb):
            if marked[r]:
                continue  # announced already, as an ancestor of an earlier row
            if up:
                chain = []
                p = parent(r)
                while p > r and not marked[p]:  # ahead of the walk and not announced yet
                    marked[p] = True
                    chain.append(p)
                    p = parent(p)
                seq.extend(reversed(chain))
            seq.append(r)
        w.cursor = b
        if seq:
            order = np.asarray(seq, np.int32)
            # SSD copies first: a CPU block's parent is often on SSD only (a conversation's new turn).
            for t in (_SSD, _CPU):
                held = order[index.state(_TIERS[t], order) == _READY]
                if held.size:  # the events' order is fixed now; their objects are made when drained
                    snapshot = self._snapshot(np.full(held.size, t, np.uint8), held)
                    self.log.emit_deferred(functools.partial(_build_stored, self.block_size, *snapshot))
        if w.cursor >= index.rows_in_use:
            self._walk = None
            return True
        return False

    # ---- building events ---------------------------------------------------------------------------

    def _stored_events(self, tiers: np.ndarray, rows: np.ndarray) -> list[BlockStored]:
        return _build_stored(self.block_size, *self._snapshot(tiers, rows))

    def _snapshot(self, tiers: np.ndarray, rows: np.ndarray) -> tuple:
        """What Stored events of these (tier, row) entries need, copied out of the index (under the lock)."""
        index = self.index
        rows = np.asarray(rows, np.int32)
        parents = index.parents(rows)
        return tiers, rows, parents, index.hashes(rows), index.hashes(parents), self._tokens(tiers, rows)

    def _tokens(self, tiers: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(n, block_size) token ids: from the CPU copy where one is READY, else from the SSD manifest."""
        index = self.index
        out = np.zeros((len(rows), self.block_size), np.uint32)
        in_cpu = index.state(Tier.CPU, rows) == _READY
        if in_cpu.any():
            out[in_cpu] = self.cpu_tokens[index.slots(Tier.CPU, rows[in_cpu])]
        on_ssd = np.flatnonzero(~in_cpu)
        if on_ssd.size:
            records = self.ssd_tokens(index.slots(Tier.SSD, rows[on_ssd]).tolist())
            for i, record in zip(on_ssd.tolist(), records):
                if record is None or len(record) != 4 * self.block_size:
                    raise RuntimeError(f"block {int(index.hashes(rows[i:i + 1])[0]):#x}: no token ids in the SSD manifest")
                out[i] = np.frombuffer(record, "<u4")
        return out


def _build_stored(block_size: int, tiers: np.ndarray, rows: np.ndarray, parents: np.ndarray, hashes: np.ndarray,
                  parent_hashes: np.ndarray, tokens: np.ndarray) -> list[BlockStored]:
    """One Stored per run of entries of one tier whose blocks chain (each one's parent is the previous)."""
    n = len(rows)
    if n == 0:
        return []
    brk = np.ones(n, bool)
    brk[1:] = (parents[1:] != rows[:-1]) | (tiers[1:] != tiers[:-1])
    starts = np.flatnonzero(brk).tolist() + [n]
    hash_list, parent_list, has_parent = hashes.tolist(), parent_hashes.tolist(), (parents >= 0).tolist()
    return [BlockStored(tier=_TIERS[int(tiers[a])], block_hashes=hash_list[a:b],
                        parent_block_hash=parent_list[a] if has_parent[a] else None,
                        token_ids=tokens[a:b].ravel().tolist(), block_size=block_size)
            for a, b in zip(starts, starts[1:])]
