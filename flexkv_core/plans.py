"""What the cache hands the engine: a plan of slots to copy into (stores) or out of (loads).

The engine's scheduler gets a plan, its workers copy between their KV cache and the CPU slots the plan names,
and the scheduler tells the cache how it went (`TieredCache.complete_store` / `finish_load`). The fields
without a leading underscore are the contract; the others are the cache's bookkeeping.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .layout import Tier

_NO_ROWS = np.empty(0, np.int32)

#: Where each block of a load comes from (`LoadPlan._source`).
FROM_CPU, FROM_SSD, FROM_REMOTE = 0, 1, 2
SOURCE_TIERS = (Tier.CPU, Tier.SSD, Tier.REMOTE)


@dataclass
class StorePlan:
    """Blocks the engine must copy into CPU slots before `complete_store`.

    ``covered``: how many leading blocks of the chain given to `reserve_store` the CPU tier now holds or has
    reserved; it stops at the first block that got no slot (a later block is never reserved when an earlier
    one could not be). ``block_hashes``/``slots``/``positions`` (index in that chain) may be empty: nothing to
    copy, and `complete_store` of such a plan does nothing.
    """

    job_id: int
    block_hashes: list[int]
    slots: list[int]
    positions: list[int]
    covered: int = 0
    pool: str = ""  # the CPU pool the slots belong to (a shared cache's pool changes when its owner restarts)
    _rows: np.ndarray = field(default_factory=lambda: _NO_ROWS, repr=False)


@dataclass
class LoadPlan:
    """Blocks the engine may copy out of CPU slots once ``ready`` resolves (to the usable count).

    ``tier_hits``: blocks of this plan served from each tier (CPU, SSD, REMOTE) as planned by `prepare_load`;
    once ``ready`` has resolved, counted over the usable prefix only (what was actually delivered).
    """

    job_id: int
    block_hashes: list[int]
    slots: list[int]
    ready: Future = field(default_factory=Future)
    tier_hits: dict[Tier, int] = field(default_factory=lambda: dict.fromkeys(SOURCE_TIERS, 0))
    pool: str = ""  # the CPU pool the slots belong to
    _rows: np.ndarray = field(default_factory=lambda: _NO_ROWS, repr=False)  # rows of the blocks we hold
    _pinned: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)  # CPU pin held, per row
    _source: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8), repr=False)  # FROM_* per block
    _fetch_slots: list[int] = field(default_factory=list, repr=False)  # CPU slots of fetched blocks; -1: indexed
    _limit: int = field(default=1 << 62, repr=False)  # first block whose bytes did not arrive
    _parts: int = field(default=0, repr=False)  # asynchronous parts (SSD staging, remote fetch) running
    _usable: int | None = field(default=None, repr=False)  # set once every part ended
    _finished: bool = field(default=False, repr=False)  # the engine (or a peer) is done with it
    _lent: bool = field(default=False, repr=False)  # an export to a peer, not a load into our engine

    def count_tiers(self, n: int) -> dict[Tier, int]:
        """Blocks per source tier among the first ``n``."""
        counts = np.bincount(self._source[:n], minlength=len(SOURCE_TIERS))
        return {tier: int(c) for tier, c in zip(SOURCE_TIERS, counts)}
