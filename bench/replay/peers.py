"""Other nodes as a `flexkv_core.remote.RemoteSource`: the ``distributed`` configuration's cross-node reuse.

In a deployment (`flexkv_core.distributed`) each node publishes the blocks its CPU and SSD tiers hold to
Redis, keeps a local snapshot of everyone's, and fetches what only a peer holds over Mooncake's transfer
engine: the peer *exports* the blocks (pins them, staging SSD-only ones into its CPU pool), the fetcher
reads the slots into CPU slots of its own, indexes them as its own CPU blocks (and announces them so),
and releases the export. Here all nodes live in one process, so:

* the snapshot is exact: each node's `replay.worker.NodeTiers.held`, kept from its own events as the
  registry is (CPU or SSD, either counts), read block by block like `GlobalSnapshot.lookup`;
* the transfer is a memory copy between the two nodes' real CPU pools, through the peer's real
  ``TieredCache.export`` / ``release_export`` (so the peer's SSD blocks are really staged, its copies pinned
  and touched, and its events say so), in runs planned like `GlobalSnapshot.plan`.

A remote hit therefore costs what a host hit costs once the fetch landed; how long the fetch took is not
modelled (the replay measures where prompt tokens come from, not latency).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

from flexkv_core.remote import RemoteBlock

if TYPE_CHECKING:
    from .worker import NodeTiers

#: A peer's export pins blocks for this long at most; the replay releases every export at once.
EXPORT_LEASE_S = 30.0


class ReplayPeers:
    """The other nodes of one replay, as seen from node ``self_index`` (set `nodes` once all exist)."""

    def __init__(self, self_index: int) -> None:
        self.self_index = self_index
        self.nodes: list[NodeTiers] = []

    def _peers(self) -> list[NodeTiers]:
        return [n for n in self.nodes if n.index != self.self_index]

    def lookup(self, block_hashes: Sequence[int]) -> int:
        """Leading blocks some other node holds (block by block: one node need not hold them all)."""
        peers = self._peers()
        n = 0
        for h in block_hashes:
            if not any(h in p.held for p in peers):
                break
            n += 1
        return n

    def _plan(self, block_hashes: Sequence[int]) -> list[tuple[NodeTiers, int, int]]:
        """Runs ``(peer, start, stop)`` covering the servable prefix, each from the peer holding the longest
        run from there (fewest round trips)."""
        peers = self._peers()
        runs: list[tuple[NodeTiers, int, int]] = []
        i = 0
        while i < len(block_hashes):
            best, best_stop = None, i
            for p in peers:
                j = i
                while j < len(block_hashes) and block_hashes[j] in p.held:
                    j += 1
                if j > best_stop:
                    best, best_stop = p, j
            if best is None:
                break
            runs.append((best, i, best_stop))
            i = best_stop
        return runs

    def fetch(self, block_hashes: Sequence[int], buffers: Sequence[memoryview]) -> Future[list[RemoteBlock | None]]:
        """Copy each block's slot from the peer that exports it into ``buffers``; done when it returns."""
        hashes = list(block_hashes)
        results: list[RemoteBlock | None] = [None] * len(hashes)
        for peer, start, stop in self._plan(hashes):
            grant = peer.cache.export(hashes[start:stop], lease_s=EXPORT_LEASE_S, checksums=False)
            try:
                for k, slot in enumerate(grant["slots"]):
                    buffers[start + k][:] = peer.cache.pool.slot(slot)
                    results[start + k] = RemoteBlock(grant["parents"][k], grant["tokens"][k])
            finally:
                if grant["job"]:
                    peer.cache.release_export(grant["job"])
            if len(grant["slots"]) < stop - start:
                break  # the cache uses the leading prefix only
        fut: Future[list[RemoteBlock | None]] = Future()
        fut.set_result(results)
        return fut
