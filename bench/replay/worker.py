"""Simulated workers: vLLM's GPU prefix cache (LRU over full blocks) per worker, and our real tiers per node.

What it keeps real: the KV events. The GPU part emits the ``BlockStored`` / ``BlockRemoved`` (medium
``GPU``) that vLLM's block pool emits when blocks become cached or are evicted; the CPU / SSD part is a
real `flexkv_core.TieredCache` (lookups, loads that stage SSD blocks into CPU slots, stores, write-back
to real files, eviction, fetches from other nodes) whose own events are mapped for the router in one of
three styles (`EventStyle`). What it leaves out: the bytes. The cache runs with a one-byte-per-token
layout, so a block is one 4 KiB slot and a replay of thousands of requests moves a few hundred MiB at most.

Tiers belong to a `NodeTiers`: one per worker (private tiers), or one per node shared by its workers
(``shared-node``: one CPU pool and one SSD store of the node's summed capacity, and every worker of the
node announces their blocks as its own host / disk tier). With ``remote``, a node fetches from the others
what they hold past its own prefix (`replay.peers`, as the Redis + Mooncake path does): the fetched
blocks land in its CPU tier and are announced from there.

Serving one prompt (its full blocks named by chained hashes; vLLM never reuses the block holding the
prompt's last token):

1. the leading blocks the worker's GPU cache holds are served from GPU;
2. from there, the leading blocks its node's tiers hold are loaded (``lookup`` -> ``prepare_load`` ->
   ready -> ``finish_load``), each counted as a CPU, SSD or remote hit by where it was when the load began;
3. the rest is recomputed;
4. every full block of the prompt becomes cached on the GPU (LRU eviction makes room) and is stored
   into the node's tiers (``reserve_store`` / ``complete_store``; blocks held already are skipped), and
   SSD write-back is awaited so that every event of this request is out before the next request is routed.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from flexkv_core.cache import TieredCache
from flexkv_core.config import FlexKVConfig, GiB
from flexkv_core.events import BlockRemoved as CoreRemoved
from flexkv_core.events import BlockStored as CoreStored
from flexkv_core.events import CacheEvent
from flexkv_core.layout import CacheIdentity, KVLayout, Tier
from flexkv_core.remote import RemoteSource
from flexkv_dynamo.kv_events import MEDIUM_GPU, to_vllm_events

from .trace import MOONCAKE_BLOCK_TOKENS, reusable_blocks

log = logging.getLogger(__name__)

#: How long a load may wait for SSD staging before the worker gives up (a stuck read is a bug here).
LOAD_TIMEOUT_S = 60.0


class EventStyle(str, enum.Enum):
    """What the router learns about a worker's CPU / SSD tiers."""

    NONE = "none"  # the worker has no tiers: GPU events only
    UPSTREAM = "upstream"  # tiers, announced as upstream FlexKV does: the router drops every one
    TIER_AWARE = "tier-aware"  # tiers, announced by `flexkv_dynamo.kv_events.to_vllm_events`


@dataclass(frozen=True)
class Capacity:
    """Blocks each tier of one worker holds (``cpu_blocks == 0`` means no tiers of ours at all)."""

    gpu_blocks: int
    cpu_blocks: int
    ssd_blocks: int

    def __post_init__(self) -> None:
        if self.gpu_blocks < 1:
            raise ValueError(f"gpu_blocks must be >= 1, got {self.gpu_blocks}")
        if self.cpu_blocks < 0 or self.ssd_blocks < 0:
            raise ValueError(f"cpu_blocks and ssd_blocks must be >= 0, got {self.cpu_blocks} and {self.ssd_blocks}")
        if self.ssd_blocks and not self.cpu_blocks:
            raise ValueError(f"ssd_blocks={self.ssd_blocks} needs a CPU tier (cpu_blocks > 0): SSD hits are "
                             "staged through CPU slots")


@dataclass(frozen=True)
class Served:
    """Where one prompt's prefill tokens came from (``remote``: fetched from another node's tiers)."""

    prompt_tokens: int
    gpu_tokens: int
    cpu_tokens: int
    ssd_tokens: int
    remote_tokens: int = 0

    @property
    def recomputed_tokens(self) -> int:
        return self.prompt_tokens - self.gpu_tokens - self.cpu_tokens - self.ssd_tokens - self.remote_tokens


class GpuPrefixCache:
    """The set of full blocks vLLM keeps cached on the GPU, evicted least recently used first.

    vLLM frees a finished request's blocks tail first, so a prefix outlives its continuations: here a
    served chain is made most recent from its last block to its first, and a block is therefore never
    more recent than its parent (eviction never leaves a hole in a cached prefix).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"GPU capacity must be >= 1 block, got {capacity}")
        self.capacity = capacity
        self._lru: OrderedDict[int, None] = OrderedDict()  # first = least recently used

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._lru

    def blocks(self) -> list[int]:
        """The cached blocks, least recently used first."""
        return list(self._lru)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` are cached."""
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        return n

    def store(self, hashes: Sequence[int]) -> tuple[list[int], list[int]]:
        """Cache the chain ``hashes`` (its head if it is longer than the cache) and make it most recent.

        Returns (positions in ``hashes`` that became cached, hashes evicted to make room), in the order
        vLLM would report them.
        """
        chain = list(hashes[: self.capacity])
        keep = set(chain)
        new = [i for i, h in enumerate(chain) if h not in self._lru]
        evicted: list[int] = []
        overflow = len(self._lru) + len(new) - self.capacity
        if overflow > 0:
            for h in self._lru:  # oldest first; never a block of the chain being stored
                if h not in keep:
                    evicted.append(h)
                    if len(evicted) == overflow:
                        break
            for h in evicted:
                del self._lru[h]
        for h in reversed(chain):
            self._lru[h] = None
            self._lru.move_to_end(h)
        return new, evicted


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs [start, end) of sorted positions."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def gpu_events(hashes: Sequence[int], tokens: np.ndarray, new: list[int], evicted: list[int],
               block_size: int) -> list[Any]:
    """vLLM's events for one step of its block pool: the evictions, then the newly cached blocks."""
    from vllm.distributed.kv_events import BlockRemoved, BlockStored

    out: list[Any] = []
    if evicted:
        out.append(BlockRemoved(block_hashes=list(evicted), medium=MEDIUM_GPU))
    for start, end in _runs(new):
        out.append(BlockStored(
            block_hashes=list(hashes[start:end]),
            parent_block_hash=hashes[start - 1] if start else None,
            token_ids=tokens[start * block_size:end * block_size].tolist(),
            block_size=block_size, lora_id=None, medium=MEDIUM_GPU, lora_name=None,
            extra_keys=[None] * (end - start), group_idx=0,
        ))
    return out


#: The media upstream FlexKV names its tiers by; Dynamo 1.6.1 knows "CPU" but not "SSD".
UPSTREAM_MEDIUM = {Tier.CPU: "CPU", Tier.SSD: "SSD"}


def upstream_hash(block_hash: int) -> int:
    """A stand-in for upstream FlexKV's own XXH64 block hashes, which are not vLLM's."""
    return xxhash.xxh64_intdigest(block_hash.to_bytes(8, "little"))


def upstream_events(events: Sequence[CacheEvent], block_size: int) -> list[Any]:
    """Our tiers' events as upstream FlexKV publishes them today: its own hashes, no parent, no tokens,
    medium "CPU" / "SSD". Dynamo indexes none of it ("token_ids too short", unknown medium)."""
    from vllm.distributed.kv_events import BlockRemoved, BlockStored

    out: list[Any] = []
    for e in events:
        if isinstance(e, CoreStored) and e.tier in UPSTREAM_MEDIUM:
            out.append(BlockStored(block_hashes=[upstream_hash(h) for h in e.block_hashes], parent_block_hash=None,
                                   token_ids=[], block_size=block_size, lora_id=None,
                                   medium=UPSTREAM_MEDIUM[e.tier], lora_name=None))
        elif isinstance(e, CoreRemoved) and e.tier in UPSTREAM_MEDIUM:
            out.append(BlockRemoved(block_hashes=[upstream_hash(h) for h in e.block_hashes],
                                    medium=UPSTREAM_MEDIUM[e.tier]))
    return out


def tiny_identity(block_size: int = MOONCAKE_BLOCK_TOKENS) -> CacheIdentity:
    """A cache identity whose block is one byte per token: one 4 KiB slot per block of up to 4096 tokens."""
    layout = KVLayout(num_layers=1, block_size=block_size, num_kv_heads=1, head_dim=1, dtype="uint8", kv_planes=1)
    return CacheIdentity(model="trace-replay", layout=layout)


def tier_config(cpu_blocks: int, ssd_blocks: int, ssd_dir: Path, identity: CacheIdentity) -> FlexKVConfig:
    """The FlexKVConfig of one node's tiers: capacities given in blocks, converted to the GiB it takes."""
    slot = identity.layout.slot_bytes
    return FlexKVConfig(
        cpu_cache_gb=cpu_blocks * slot / GiB,
        ssd_cache_gb=ssd_blocks * slot / GiB,
        ssd_cache_dir=(str(ssd_dir),),
        ssd_io_threads=2,
        enable_metrics=False,  # no Prometheus series for throwaway caches; snapshot() still counts
    )


#: Bits of `NodeTiers.held`: what a node advertises to the others (the distributed registry's view).
HELD_BITS = {Tier.CPU: 1, Tier.SSD: 2}


class NodeTiers:
    """Our tiers on one node: a real `TieredCache` that the node's ``workers`` (indices) all read and
    all announce, of ``len(workers)`` times the per-worker CPU and SSD capacity."""

    def __init__(self, index: int, workers: Sequence[int], capacity: Capacity, workdir: Path,
                 block_size: int = MOONCAKE_BLOCK_TOKENS, remote: RemoteSource | None = None) -> None:
        if capacity.cpu_blocks < 1:
            raise ValueError("our tiers need cpu_blocks >= 1")
        self.index = index
        self.workers = list(workers)
        self.block_size = block_size
        self.load_errors = 0  # loads our cache refused with an exception (counted, served by recomputation)
        # What this node holds in CPU or SSD, hash -> HELD_BITS, kept from its own events as a node's
        # registry entry is: the other nodes' `replay.peers` look blocks up here.
        self.held: dict[int, int] = {}
        ssd_dir = Path(workdir) / f"node{index}-ssd"
        ssd_dir.mkdir(parents=True, exist_ok=True)
        identity = tiny_identity(block_size)
        n = len(self.workers)
        self.cache = TieredCache(tier_config(capacity.cpu_blocks * n, capacity.ssd_blocks * n, ssd_dir, identity),
                                 identity, remote=remote)
        self.cache.events.add_listener(self._on_event)

    def _on_event(self, event: CacheEvent) -> None:  # under the cache's lock: only bookkeeping
        bit = HELD_BITS.get(getattr(event, "tier", None))
        if bit is None:
            return
        if isinstance(event, CoreStored):
            for h in event.block_hashes:
                self.held[h] = self.held.get(h, 0) | bit
        elif isinstance(event, CoreRemoved):
            for h in event.block_hashes:
                left = self.held.get(h, 0) & ~bit
                if left:
                    self.held[h] = left
                else:
                    self.held.pop(h, None)

    def lookup(self, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` this node can deliver (from other nodes too, if remote). Changes nothing."""
        return self.cache.lookup(hashes).total if hashes else 0

    def load(self, hashes: Sequence[int], worker: int) -> tuple[int, int, int]:
        """Load the leading blocks our tiers (and, if remote, other nodes) hold; returns how many were in
        CPU, read from SSD, and fetched from another node."""
        found = self.lookup(hashes)
        if not found:
            return 0, 0, 0
        before = self.cache.metrics.snapshot()["hit_blocks"]
        try:
            plan = self.cache.prepare_load(hashes[:found])
        except (ValueError, RuntimeError) as exc:
            # A bug of the cache, not of the replay (seen: making room to stage SSD blocks evicted another
            # SSD block of the same chain). A real worker would fail the request; here it is recomputed
            # and counted, so that one bad load does not end a long replay.
            self.load_errors += 1
            log.warning("node %d (worker %d): prepare_load of %d blocks failed (%s: %s); recomputing", self.index,
                        worker, found, type(exc).__name__, exc)
            return 0, 0, 0
        try:
            usable = plan.ready.result(timeout=LOAD_TIMEOUT_S)
        finally:
            self.cache.finish_load(plan)
        after = self.cache.metrics.snapshot()["hit_blocks"]
        got = [after.get(t.value, 0) - before.get(t.value, 0) for t in (Tier.CPU, Tier.SSD, Tier.REMOTE)]
        if usable < sum(got):  # a failed read or fetch: the blocks past it are recomputed
            log.warning("node %d (worker %d): %d of %d blocks loaded", self.index, worker, usable, sum(got))
            left = usable
            for i, n in enumerate(got):
                got[i] = min(n, left)
                left -= got[i]
        return got[0], got[1], got[2]

    def store(self, hashes: Sequence[int], tokens: np.ndarray) -> None:
        """Store the prompt's full blocks (those not held already) and wait for SSD write-back."""
        plan = self.cache.reserve_store(hashes, None, tokens[:len(hashes) * self.block_size])
        if plan is not None:
            self.cache.complete_store(plan, ok=True)  # the bytes do not matter here: nothing to copy
        self.flush()

    def flush(self) -> None:
        if not self.cache.flush(timeout=LOAD_TIMEOUT_S):
            raise TimeoutError(f"node {self.index}: SSD write-back still running after {LOAD_TIMEOUT_S}s")

    def take_events(self) -> list[CacheEvent]:
        return self.cache.take_events()

    def holdings(self) -> dict[Tier, set[int]]:
        """The blocks each tier holds ready now, from the cache's index (for checks, not the hot path)."""
        self.flush()  # no write-back in flight: the index does not change while we read it
        blocks = list(self.cache.index.blocks())
        return {t: {b.hash for b in blocks if b.ready(t)} for t in (Tier.CPU, Tier.SSD)}

    def stats(self) -> dict[str, Any]:
        tiers = self.cache.stats()["tiers"]
        return {"cpu_blocks": tiers["cpu"]["ready_blocks"], "ssd_blocks": tiers["ssd"]["ready_blocks"],
                "load_errors": self.load_errors}

    def close(self) -> None:
        self.cache.events.remove_listener(self._on_event)
        self.cache.close()


def map_events(events: Sequence[CacheEvent], style: EventStyle, block_size: int) -> list[Any]:
    """Our tiers' events as a worker announces them in ``style``."""
    if style is EventStyle.TIER_AWARE:
        return to_vllm_events(events, block_size=block_size)
    if style is EventStyle.UPSTREAM:
        return upstream_events(events, block_size)
    return []


class SimWorker:
    """One worker: its own `GpuPrefixCache`, and the `NodeTiers` it reads (None: GPU only)."""

    def __init__(self, index: int, gpu_blocks: int, tiers: NodeTiers | None,
                 block_size: int = MOONCAKE_BLOCK_TOKENS) -> None:
        self.index = index
        self.block_size = block_size
        self.gpu = GpuPrefixCache(gpu_blocks)
        self.tiers = tiers

    def serve(self, tokens: np.ndarray, hashes: Sequence[int]) -> tuple[Served, list[Any]]:
        """Serve one prompt (``hashes`` name its full blocks); returns where its tokens came from and this
        worker's GPU events for it, in order. Our tiers' events are the node's (`NodeTiers.take_events`)."""
        bs = self.block_size
        reusable = min(len(hashes), reusable_blocks(len(tokens), bs))
        gpu_hit = self.gpu.match(hashes[:reusable])
        cpu = ssd = remote = 0
        if self.tiers is not None and gpu_hit < reusable:
            cpu, ssd, remote = self.tiers.load(hashes[gpu_hit:reusable], self.index)
        new, evicted = self.gpu.store(hashes)
        events = gpu_events(hashes, tokens, new, evicted, bs)
        if self.tiers is not None:
            self.tiers.store(hashes, tokens)
        return Served(len(tokens), gpu_hit * bs, cpu * bs, ssd * bs, remote * bs), events

    def reusable_here(self, num_tokens: int, hashes: Sequence[int]) -> int:
        """Leading blocks of a prompt this worker could serve from any tier now (changes nothing)."""
        reusable = min(len(hashes), reusable_blocks(num_tokens, self.block_size))
        hit = self.gpu.match(hashes[:reusable])
        if self.tiers is not None and hit < reusable:
            hit += self.tiers.lookup(hashes[hit:reusable])
        return hit

    def held_prefix(self, hashes: Sequence[int]) -> tuple[int, int]:
        """(leading blocks on the GPU, leading blocks on the GPU or in our node's own CPU / SSD): what the
        router should credit this worker with (other nodes' blocks are never announced as ours)."""
        gpu = self.gpu.match(hashes)
        total = gpu
        if self.tiers is not None and gpu < len(hashes):
            found = self.tiers.cache.lookup(hashes[gpu:])
            total += found.total - found.remote  # other nodes' blocks are not ours
        return gpu, total
