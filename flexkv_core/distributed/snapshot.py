"""This node's local copy of the global index: which live peer holds which blocks.

Lookups (on the scheduler's hot path) read only this snapshot, never the network. A background thread
calls `GlobalSnapshot.refresh` every ``dist_snapshot_interval_s``: it asks Redis which nodes are alive,
follows each live peer's change log (or reloads its set when the peer re-registered), and drops peers
whose liveness key expired. So a peer's new blocks become visible within one interval (plus its
publishing delay), and a dead peer disappears within its lease plus one interval.

A peer whose fetch just failed is *suspect*: left out of lookups for a while (a lease), so requests stop
planning fetches from a node that is not answering even before its lease runs out in Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .registry import NodeInfo, Registry

log = logging.getLogger(__name__)

__all__ = ["GlobalSnapshot", "PeerView", "Run"]


@dataclass
class PeerView:
    info: NodeInfo
    blocks: set[int]
    last_id: str  # last log entry applied to ``blocks``


@dataclass(frozen=True)
class Run:
    """Blocks ``start:stop`` of a request, all held by ``peer``."""

    peer: NodeInfo
    start: int
    stop: int


@dataclass
class GlobalSnapshot:
    self_id: str
    slot_bytes: int  # peers with another slot size (impossible under one fingerprint) are ignored
    peers: dict[str, PeerView] = field(default_factory=dict)
    refreshed_at: float = 0.0  # time.monotonic() of the last successful refresh (0: never)
    _suspect: dict[str, float] = field(default_factory=dict)  # node id -> monotonic time it is trusted again
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- reading (any thread, no network) ----------------------------------------------------------

    def lookup(self, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of ``block_hashes`` some live peer holds (block by block: one peer
        need not hold them all)."""
        with self._lock:
            sets = self._trusted_sets()
            n = 0
            for h in block_hashes:
                if not any(h in s for s in sets):
                    break
                n += 1
            return n

    def plan(self, block_hashes: Sequence[int]) -> list[Run]:
        """Split the servable prefix into runs, each from the peer holding the longest run from there
        (fewest round trips)."""
        with self._lock:
            views = [v for v in self.peers.values() if self._trusted(v.info.node_id)]
            runs: list[Run] = []
            i = 0
            while i < len(block_hashes):
                best, best_stop = None, i
                for v in views:
                    j = i
                    while j < len(block_hashes) and block_hashes[j] in v.blocks:
                        j += 1
                    if j > best_stop:
                        best, best_stop = v, j
                if best is None:
                    break
                runs.append(Run(best.info, i, best_stop))
                i = best_stop
            return runs

    def suspect(self, node_id: str, for_s: float) -> None:
        with self._lock:
            self._suspect[node_id] = time.monotonic() + for_s

    def peer_ids(self) -> list[str]:
        with self._lock:
            return sorted(self.peers)

    def block_count(self) -> int:
        with self._lock:
            return sum(len(v.blocks) for v in self.peers.values())

    def clear(self) -> None:
        with self._lock:
            self.peers = {}
            self.refreshed_at = 0.0

    # ---- refreshing (the node's sync thread; raises redis errors) ----------------------------------

    def refresh(self, registry: Registry) -> None:
        live = {nid: info for nid, info in registry.live_nodes().items()
                if nid != self.self_id and info.slot_bytes == self.slot_bytes}
        with self._lock:
            known = dict(self.peers)
        fresh: dict[str, PeerView] = {}
        for nid, info in live.items():
            view = known.get(nid)
            if view is not None and view.info.epoch == info.epoch:
                changes = registry.changes_since(nid, view.last_id)
                if changes is not None:
                    with self._lock:  # small: apply in place rather than copy a big set
                        for added, removed in changes.batches:
                            view.blocks.update(added)
                            view.blocks.difference_update(removed)
                        view.last_id = changes.last_id
                    fresh[nid] = view
                    continue
                log.debug("peer %s: change log trimmed past what we saw, reloading its blocks", nid)
            epoch, blocks, last_id = registry.load_blocks(nid)
            if epoch is None:  # expired between the two reads
                continue
            if epoch != info.epoch:  # re-registered between the two reads: its info changed too
                info = registry.live_nodes().get(nid)
                if info is None or info.epoch != epoch:
                    continue  # still moving; next refresh
            fresh[nid] = PeerView(info, blocks, last_id)
            if view is None:
                log.info("peer %s joined: %d blocks (service %s, session %s)", nid, len(blocks), info.service,
                         info.session)
        with self._lock:
            for nid in self.peers.keys() - fresh.keys():
                log.info("peer %s left (its lease expired or it unregistered)", nid)
            self.peers = fresh
            self.refreshed_at = time.monotonic()

    # ---- internals (lock held) ---------------------------------------------------------------------

    def _trusted(self, node_id: str) -> bool:
        until = self._suspect.get(node_id)
        if until is None:
            return True
        if time.monotonic() >= until:
            del self._suspect[node_id]
            return True
        return False

    def _trusted_sets(self) -> list[set[int]]:
        return [v.blocks for v in self.peers.values() if self._trusted(v.info.node_id)]
