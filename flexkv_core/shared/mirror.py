"""`TierMirror`: an attached engine's local copy of which blocks the node's shared tiers hold.

An engine attached to a shared cache answers lookups from this mirror (microseconds on the scheduler
thread, no round trip to the owner) and announces every change of it as its *own* tier events, so the
router credits every engine of the node for what the shared tiers hold.

The mirror is fed by the owner's event stream (``Stored`` / ``Removed`` per tier, in order) after a
snapshot. Applying an event is idempotent: a Stored for a block already held, or a Removed for one not
held, changes nothing and emits nothing. That is what makes "snapshot, then replay everything since the
sequence number read *before* the snapshot" correct: events that the snapshot already reflects replay as
no-ops or as a Removed+Stored pair that ends in the same state, and the engine's own announcements stay
balanced per tier (every Stored it emits is matched by exactly one Removed before it is stored again).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..events import BlockRemoved, BlockStored, CacheEvent
from ..index import LookupResult
from ..layout import Tier

#: The tiers a shared cache holds, in lookup preference order.
SHARED_TIERS: tuple[Tier, ...] = (Tier.CPU, Tier.SSD)


class TierMirror:
    """Per tier, the set of block hashes the shared cache holds READY. Not thread-safe: the owner of the
    mirror (`SharedCache`) serialises access."""

    def __init__(self) -> None:
        self._held: dict[Tier, set[int]] = {tier: set() for tier in SHARED_TIERS}

    def __len__(self) -> int:
        return len(self._held[Tier.CPU] | self._held[Tier.SSD])

    def count(self, tier: Tier) -> int:
        return len(self._held[tier])

    def holds(self, tier: Tier, block_hash: int) -> bool:
        return block_hash in self._held[tier]

    def lookup(self, block_hashes: Sequence[int]) -> LookupResult:
        """How many leading blocks each tier (and both together) can serve: the same answer the owner's
        index would give, as of the last event applied."""
        cpu_set, ssd_set = self._held[Tier.CPU], self._held[Tier.SSD]
        cpu = ssd = total = 0
        cpu_run = ssd_run = True
        for h in block_hashes:
            in_cpu, in_ssd = h in cpu_set, h in ssd_set
            if not (in_cpu or in_ssd):
                break
            total += 1
            cpu_run = cpu_run and in_cpu
            ssd_run = ssd_run and in_ssd
            cpu += cpu_run
            ssd += ssd_run
        return LookupResult(cpu=cpu, ssd=ssd, total=total)

    def apply(self, events: Iterable[CacheEvent]) -> list[CacheEvent]:
        """Apply the owner's events in order; return the engine's own events for what really changed."""
        out: list[CacheEvent] = []
        for event in events:
            if isinstance(event, BlockStored):
                out.extend(self._store(event))
            elif isinstance(event, BlockRemoved):
                held = self._held.get(event.tier)
                if held is None:
                    continue
                gone = [h for h in event.block_hashes if h in held]
                if gone:
                    held.difference_update(gone)
                    out.append(BlockRemoved(tier=event.tier, block_hashes=gone))
            # CacheCleared: the owner's Removed events before it already said everything.
        return out

    def _store(self, event: BlockStored) -> list[BlockStored]:
        held = self._held.get(event.tier)
        if held is None:
            return []
        hashes = event.block_hashes
        new = [i for i, h in enumerate(hashes) if h not in held]
        if len(new) == len(hashes):
            held.update(hashes)
            return [event]
        # Part of the run is held already (a replay after a snapshot): announce the new blocks only, one
        # Stored per stretch of consecutive positions, each with its exact parent and tokens.
        out = []
        bs = event.block_size
        for run in _stretches(new):
            first, last = run[0], run[-1] + 1
            held.update(hashes[first:last])
            out.append(BlockStored(tier=event.tier, block_hashes=list(hashes[first:last]),
                                   parent_block_hash=hashes[first - 1] if first else event.parent_block_hash,
                                   token_ids=list(event.token_ids[first * bs:last * bs]), block_size=bs))
        return out

    def resync(self, events: Iterable[CacheEvent]) -> list[CacheEvent]:
        """Replace what the mirror holds by a snapshot (``events``: Stored for everything held); return
        the engine's events for the difference (Removed for what went, Stored for what came)."""
        events = list(events)
        now: dict[Tier, set[int]] = {tier: set() for tier in SHARED_TIERS}
        for event in events:
            if isinstance(event, BlockStored) and event.tier in now:
                now[event.tier].update(event.block_hashes)
        out: list[CacheEvent] = []
        for tier, held in self._held.items():
            gone = held - now[tier]
            if gone:
                held.difference_update(gone)
                out.append(BlockRemoved(tier=tier, block_hashes=sorted(gone)))
        out.extend(self.apply(events))
        return out

    def clear(self) -> list[BlockRemoved]:
        """Forget everything (the owner is gone): one Removed per tier for what was announced."""
        out = []
        for tier, held in self._held.items():
            if held:
                out.append(BlockRemoved(tier=tier, block_hashes=sorted(held)))
                held.clear()
        return out


def _stretches(positions: list[int]) -> list[list[int]]:
    """``positions`` (ascending) cut where they stop being consecutive."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs
