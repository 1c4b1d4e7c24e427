"""A simulated worker: vLLM's GPU prefix cache (LRU over full blocks) plus our real tiers, no model.

What it keeps real: the KV events. The GPU part emits the ``BlockStored`` / ``BlockRemoved`` (medium
``GPU``) that vLLM's block pool emits when blocks become cached or are evicted; the CPU / SSD part is a
real `flexkv_core.TieredCache` (lookups, loads that stage SSD blocks into CPU slots, stores, write-back
to real files, eviction) whose own events are mapped for the router in one of three styles
(`EventStyle`). What it leaves out: the bytes. The cache runs with a one-byte-per-token layout, so a
block is one 4 KiB slot and a replay of thousands of requests moves a few hundred MiB at most.

Serving one prompt (its full blocks named by chained hashes; vLLM never reuses the block holding the
prompt's last token):

1. the leading blocks the GPU cache holds are served from GPU;
2. from there, the leading blocks our tiers hold are loaded (``lookup`` -> ``prepare_load`` -> ready ->
   ``finish_load``), each counted as a CPU hit or an SSD hit by where it was when the load began;
3. the rest is recomputed;
4. every full block of the prompt becomes cached on the GPU (LRU eviction makes room) and is stored
   into our tiers (``reserve_store`` / ``complete_store``; blocks held already are skipped), and SSD
   write-back is awaited so that every event of this request is out before the next request is routed.
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
    """Where one prompt's prefill tokens came from."""

    prompt_tokens: int
    gpu_tokens: int
    cpu_tokens: int
    ssd_tokens: int

    @property
    def recomputed_tokens(self) -> int:
        return self.prompt_tokens - self.gpu_tokens - self.cpu_tokens - self.ssd_tokens


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


def tier_config(capacity: Capacity, ssd_dir: Path, identity: CacheIdentity) -> FlexKVConfig:
    """The FlexKVConfig of a worker's tiers: capacities given in blocks, converted to the GiB it takes."""
    slot = identity.layout.slot_bytes
    return FlexKVConfig(
        cpu_cache_gb=capacity.cpu_blocks * slot / GiB,
        ssd_cache_gb=capacity.ssd_blocks * slot / GiB,
        ssd_cache_dir=(str(ssd_dir),),
        ssd_io_threads=2,
        enable_metrics=False,  # no Prometheus series for throwaway caches; snapshot() still counts
    )


class SimWorker:
    """One worker: a `GpuPrefixCache`, and a real `TieredCache` unless ``style`` is `EventStyle.NONE`."""

    def __init__(self, index: int, capacity: Capacity, style: EventStyle, workdir: Path,
                 block_size: int = MOONCAKE_BLOCK_TOKENS) -> None:
        self.index = index
        self.style = style
        self.block_size = block_size
        self.gpu = GpuPrefixCache(capacity.gpu_blocks)
        self.load_errors = 0  # loads our cache refused with an exception (counted, served by recomputation)
        self.cache: TieredCache | None = None
        if style is not EventStyle.NONE:
            if capacity.cpu_blocks < 1:
                raise ValueError(f"event style {style.value} needs tiers: cpu_blocks must be >= 1")
            ssd_dir = Path(workdir) / f"worker{index}-ssd"
            ssd_dir.mkdir(parents=True, exist_ok=True)
            identity = tiny_identity(block_size)
            self.cache = TieredCache(tier_config(capacity, ssd_dir, identity), identity)

    def serve(self, tokens: np.ndarray, hashes: Sequence[int]) -> tuple[Served, list[Any]]:
        """Serve one prompt (``hashes`` name its full blocks); returns where its tokens came from and the
        KV events this worker publishes for it, in order."""
        bs = self.block_size
        reusable = min(len(hashes), reusable_blocks(len(tokens), bs))
        gpu_hit = self.gpu.match(hashes[:reusable])
        cpu_hit = ssd_hit = 0
        if self.cache is not None and gpu_hit < reusable:
            cpu_hit, ssd_hit = self._load(hashes[gpu_hit:reusable])

        new, evicted = self.gpu.store(hashes)
        events = gpu_events(hashes, tokens, new, evicted, bs)
        if self.cache is not None:
            plan = self.cache.reserve_store(hashes, None, tokens[:len(hashes) * bs])
            if plan is not None:
                self.cache.complete_store(plan, ok=True)  # the bytes do not matter here: nothing to copy
            if not self.cache.flush(timeout=LOAD_TIMEOUT_S):
                raise TimeoutError(f"worker {self.index}: SSD write-back still running after {LOAD_TIMEOUT_S}s")
            ours = self.cache.take_events()
            if self.style is EventStyle.TIER_AWARE:
                events += to_vllm_events(ours, block_size=bs)
            else:
                events += upstream_events(ours, bs)
        served = Served(len(tokens), gpu_hit * bs, cpu_hit * bs, ssd_hit * bs)
        return served, events

    def reusable_here(self, num_tokens: int, hashes: Sequence[int]) -> int:
        """Leading blocks of a prompt this worker could serve from any tier now (changes nothing)."""
        reusable = min(len(hashes), reusable_blocks(num_tokens, self.block_size))
        hit = self.gpu.match(hashes[:reusable])
        if self.cache is not None and hit < reusable:
            hit += self.cache.lookup(hashes[hit:reusable]).total
        return hit

    def _load(self, hashes: Sequence[int]) -> tuple[int, int]:
        """Load the leading blocks our tiers hold; returns (blocks that were in CPU, blocks read from SSD)."""
        assert self.cache is not None
        found = self.cache.lookup(hashes).total
        if not found:
            return 0, 0
        before = self.cache.metrics.snapshot()["hit_blocks"]
        try:
            plan = self.cache.prepare_load(hashes[:found], use_remote=False)
        except (ValueError, RuntimeError) as exc:
            # A bug of the cache, not of the replay (seen: making room to stage SSD blocks evicted another
            # SSD block of the same chain). A real worker would fail the request; here it is recomputed
            # and counted, so that one bad load does not end a long replay.
            self.load_errors += 1
            log.warning("worker %d: prepare_load of %d blocks failed (%s: %s); recomputing", self.index, found,
                        type(exc).__name__, exc)
            return 0, 0
        try:
            usable = plan.ready.result(timeout=LOAD_TIMEOUT_S)
        finally:
            self.cache.finish_load(plan)
        after = self.cache.metrics.snapshot()["hit_blocks"]
        cpu = after[Tier.CPU.value] - before[Tier.CPU.value]
        ssd = after[Tier.SSD.value] - before[Tier.SSD.value]
        if usable < cpu + ssd:  # a failed SSD read: the blocks past it are recomputed
            log.warning("worker %d: %d of %d blocks loaded", self.index, usable, cpu + ssd)
            cpu = min(cpu, usable)
            ssd = usable - cpu
        return cpu, ssd

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gpu_blocks": len(self.gpu), "load_errors": self.load_errors}
        if self.cache is not None:
            tiers = self.cache.stats()["tiers"]
            out.update(cpu_blocks=tiers["cpu"]["ready_blocks"], ssd_blocks=tiers["ssd"]["ready_blocks"])
        return out

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None

