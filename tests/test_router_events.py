"""The real Dynamo 1.6.1 KV router reads our tiers' events as we mean them (no engine; see router_harness).

Our publisher plays a vLLM worker's: vLLM's own GPU events (vLLM's hashes and struct fields) plus our
CPU_PINNED / DISK events from `to_vllm_events`, hashed with `engine_hash_to_int`. Every scenario runs
twice: file discovery + zmq event plane (no servers), and etcd + NATS started here on free ports.
All scenarios share one worker, each on tokens of its own; the AllBlocksCleared one wipes the worker
and runs last.
"""

from __future__ import annotations

import itertools

import msgspec
import pytest
from router_harness import (
    Overlap,
    RouterHarness,
    etcd_and_nats,
    missing_server_binaries,
    vllm_block_hashes,
)
from support import LOOPBACK_ENV, patched_environ

from flexkv_core import events as core
from flexkv_core.layout import Tier
from flexkv_dynamo.kv_events import engine_hash_to_int, to_vllm_events

pytestmark = [pytest.mark.dynamo, pytest.mark.slow]

BS = 32  # vLLM's CPU backend wants a multiple of 32; the router takes any size
_token_bases = itertools.count(1)


@pytest.fixture(scope="module")
def vllm_kv():
    return pytest.importorskip("vllm.distributed.kv_events")


@pytest.fixture(
    scope="module",
    params=["file+zmq", pytest.param("etcd+nats", marks=pytest.mark.servers)],
)
def router(request, tmp_path_factory, vllm_kv):
    pytest.importorskip("dynamo.llm")
    workdir = tmp_path_factory.mktemp(request.param.replace("+", "-"))
    loopback = {name: "127.0.0.1" for name in LOOPBACK_ENV}
    if request.param == "file+zmq":
        with patched_environ({**loopback, "DYN_FILE_KV": str(workdir / "discovery")}):
            harness = RouterHarness(block_size=BS, discovery="file", event_plane="zmq")
            try:
                harness.sync()
                yield harness
            finally:
                harness.close()
        return
    missing = missing_server_binaries()
    if missing:
        pytest.skip(f"etcd + NATS variant needs {' and '.join(missing)} on PATH")
    with etcd_and_nats(workdir) as servers:
        with patched_environ({**loopback, "ETCD_ENDPOINTS": servers.etcd_url, "NATS_SERVER": servers.nats_url}):
            harness = RouterHarness(block_size=BS, discovery="etcd", event_plane="nats")
            try:
                harness.sync()
                yield harness
            finally:
                harness.close()


class Prompt:
    """A token sequence of ``n_blocks`` blocks no other scenario uses, with vLLM's hashes for it."""

    def __init__(self, n_blocks: int) -> None:
        start = next(_token_bases) * 100_000
        self.tokens = list(range(start, start + n_blocks * BS))
        self.engine_hashes = vllm_block_hashes(self.tokens, BS)  # request.block_hashes (bytes)
        self.ids = [engine_hash_to_int(h) for h in self.engine_hashes]  # what the core stores

    def block_tokens(self, first: int, last: int) -> list[int]:
        return self.tokens[first * BS : (last + 1) * BS]

    def parent(self, first: int) -> int | None:
        return self.ids[first - 1] if first > 0 else None

    def ours(self, tier: Tier, first: int, last: int) -> core.BlockStored:
        """The core's Stored event for blocks first..last of this prompt in one of our tiers."""
        return core.BlockStored(tier, self.ids[first : last + 1], self.parent(first), self.block_tokens(first, last), BS)

    def removed(self, tier: Tier, *blocks: int) -> core.BlockRemoved:
        return core.BlockRemoved(tier, [self.ids[b] for b in blocks])


def vllm_gpu_stored(vllm_kv, prompt: Prompt, first: int, last: int, medium: str | None = "GPU"):
    """The BlockStored vLLM's block pool publishes when blocks first..last become cached on the GPU."""
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    hashes = prompt.engine_hashes[first : last + 1]
    return vllm_kv.BlockStored(
        block_hashes=[maybe_convert_block_hash(h) for h in hashes],
        parent_block_hash=maybe_convert_block_hash(prompt.engine_hashes[first - 1]) if first else None,
        token_ids=prompt.block_tokens(first, last),
        block_size=BS,
        lora_id=None,
        medium=medium,
        lora_name=None,
        extra_keys=[None] * len(hashes),
        group_idx=0,
    )


def publish_ours(router: RouterHarness, *events: core.CacheEvent) -> None:
    router.publisher.publish(to_vllm_events(events, block_size=BS))


def test_gpu_prefix_continued_by_our_cpu_and_disk_blocks(router, vllm_kv):
    p = Prompt(8)
    router.publisher.publish([vllm_gpu_stored(vllm_kv, p, 0, 1)])
    publish_ours(router, p.ours(Tier.CPU, 2, 4), p.ours(Tier.SSD, 5, 6))
    # Dynamo's own counts are cumulative: host_pinned_blocks = device + host, disk_blocks = all three.
    assert router.wait_overlap(p.tokens, (2, 3, 2)) == Overlap(2, 3, 2, cumulative_host=5, cumulative_disk=7)
    # A request covering only part of it matches only that part.
    assert router.overlap(p.block_tokens(0, 3)).tiers == (2, 2, 0)

    # Eviction of the last CPU block: the host count drops by one, and the DISK blocks chained after
    # it are unreachable, because the router walks one prefix and stops at the first block no tier holds.
    publish_ours(router, p.removed(Tier.CPU, 4))
    router.wait_overlap(p.tokens, (2, 2, 0))

    # A reset: the cache emits Removed for every block it held (then CacheCleared, which maps to
    # nothing). Our tiers are empty again and vLLM's GPU blocks are untouched.
    publish_ours(router, p.removed(Tier.CPU, 2, 3), p.removed(Tier.SSD, 5, 6), core.CacheCleared([Tier.CPU, Tier.SSD]))
    router.wait_overlap(p.tokens, Overlap(2, 0, 0, cumulative_host=2, cumulative_disk=2))


def test_write_through_ssd_copies_count_once_cpu_eviction_moves_them_to_disk(router, vllm_kv):
    p = Prompt(7)
    router.publisher.publish([vllm_gpu_stored(vllm_kv, p, 0, 1)])
    # CPU holds blocks 2-4; the SSD holds copies of 2-6 (written through, CPU already evicted 5-6).
    publish_ours(router, p.ours(Tier.CPU, 2, 4), p.ours(Tier.SSD, 2, 6))
    router.wait_overlap(p.tokens, (2, 3, 2))  # each block counts once, in its best tier
    publish_ours(router, p.removed(Tier.CPU, 3, 4))
    router.wait_overlap(p.tokens, (2, 1, 4))


def test_our_cpu_copies_keep_the_prefix_when_vllm_evicts_its_gpu_blocks(router, vllm_kv):
    p = Prompt(3)
    router.publisher.publish([vllm_gpu_stored(vllm_kv, p, 0, 2)])
    publish_ours(router, p.ours(Tier.CPU, 0, 2))  # offloaded copies of the GPU blocks
    router.wait_overlap(p.tokens, (3, 0, 0))
    router.publisher.publish([vllm_kv.BlockRemoved(block_hashes=[p.ids[b] for b in (0, 1, 2)], medium="GPU")])
    router.wait_overlap(p.tokens, (0, 3, 0))


def test_gpu_events_without_a_medium_count_as_device(router, vllm_kv):
    p = Prompt(2)
    router.publisher.publish([vllm_gpu_stored(vllm_kv, p, 0, 1, medium=None)])
    publish_ours(router, p.ours(Tier.CPU, 1, 1))  # our copy of block 1 changes nothing while the GPU has it
    router.wait_overlap(p.tokens, (2, 0, 0))


def test_upstream_flexkv_style_events_index_nothing(router, vllm_kv):
    """What upstream FlexKV publishes is invisible to the router; we fix it by construction."""
    p = Prompt(4)
    router.publisher.publish([vllm_gpu_stored(vllm_kv, p, 0, 1)])
    router.wait_overlap(p.tokens, (2, 0, 0))

    def event(medium: str, token_ids: list[int]):
        return vllm_kv.BlockStored(
            block_hashes=p.ids[2:4], parent_block_hash=p.ids[1], token_ids=token_ids, block_size=BS,
            lora_id=None, medium=medium, lora_name=None,
        )

    router.publisher.publish([event("CPU_PINNED", [])])  # token_ids=[]: "token_ids too short", dropped
    router.publisher.publish([event("SSD", p.block_tokens(2, 3))])  # a medium Dynamo does not know
    router.publisher.publish([event("cpu", p.block_tokens(2, 3))])  # media are case-sensitive
    router.sync()  # everything published before this probe has been processed
    assert router.overlap(p.tokens).tiers == (2, 0, 0)


def test_one_unknown_event_type_drops_the_whole_batch(router, vllm_kv):
    """Why `to_vllm_events` only ever emits BlockStored / BlockRemoved."""

    class TierMoved(msgspec.Struct, tag=True):  # a type a newer producer might invent
        block_hashes: list[int]

    p = Prompt(2)
    router.publisher.publish([vllm_gpu_stored(vllm_kv, p, 0, 0), TierMoved([p.ids[0]])])
    router.publisher.publish(to_vllm_events([p.ours(Tier.CPU, 1, 1)], block_size=BS))
    router.sync()
    assert router.overlap(p.tokens).tiers == (0, 0, 0)  # the GPU block went down with the unknown event


def test_bytes_block_hashes_drop_the_whole_batch(router, vllm_kv):
    """What vLLM publishes under VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0 (why check_int_block_hashes exists)."""
    p, q = Prompt(1), Prompt(1)
    as_bytes = vllm_gpu_stored(vllm_kv, p, 0, 0)
    as_bytes.block_hashes = p.engine_hashes[:1]
    router.publisher.publish([vllm_gpu_stored(vllm_kv, q, 0, 0), as_bytes])
    router.sync()
    assert router.overlap(q.tokens).tiers == (0, 0, 0)  # q's valid event went down with p's
    assert router.overlap(p.tokens).tiers == (0, 0, 0)


def test_all_blocks_cleared_wipes_the_gpu_index_too(router, vllm_kv):
    """Why a cache reset (CacheCleared) maps to nothing rather than to vLLM's AllBlocksCleared. Runs last:
    it wipes the worker."""
    p = Prompt(3)
    router.publisher.publish([vllm_gpu_stored(vllm_kv, p, 0, 1)])
    publish_ours(router, p.ours(Tier.CPU, 2, 2))
    router.wait_overlap(p.tokens, (2, 1, 0))
    router.publisher.publish([vllm_kv.AllBlocksCleared()])
    router.wait_overlap(p.tokens, (0, 0, 0))
