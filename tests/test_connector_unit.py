"""The connector's pieces that need no engine: KV plane views, metadata aggregation, stats, inert mode.

These import vLLM (tens of seconds on this machine), hence `slow`; they start no engine.
"""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from flexkv_core.layout import KVLayout
from flexkv_core.tiers.cpu import CpuPool
from flexkv_core.transfer import BlockCopier

pytestmark = pytest.mark.slow

B, H, N, D = 12, 2, 32, 64  # blocks, kv heads, block size, head size


def cpu_attn_cache(seed: int) -> torch.Tensor:
    """One layer's KV cache as vLLM's CPU backend allocates it, filled with distinct values."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((B, H, N, 2 * D), generator=g, dtype=torch.float32)


def k_and_v(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as vLLM's CPU attention kernel reads them (cpu_attn.py: view [B, H, 2N, D], split dim 2)."""
    return kv.view(B, H, 2 * N, D).chunk(2, dim=2)


def test_cpu_attn_blocks_round_trip_through_the_pool():
    from flexkv_dynamo.worker import plane_views

    layers = [cpu_attn_cache(0), cpu_attn_cache(1)]
    planes = [p for kv in layers for p in plane_views(kv, num_blocks=B, block_size=N, num_kv_heads=H, head_size=D)]
    layout = KVLayout(num_layers=2, block_size=N, num_kv_heads=H, head_dim=D, dtype="float32")
    with CpuPool.create(8, layout.slot_bytes) as pool:
        BlockCopier(pool, layout, 0, planes).to_pool([3, 7, 8], [5, 0, 1]).wait()

        # A second engine with different contents gets blocks 3, 7, 8 back into blocks 1, 2, 9.
        other = [torch.zeros_like(layers[0]), torch.zeros_like(layers[1])]
        other_planes = [p for kv in other
                        for p in plane_views(kv, num_blocks=B, block_size=N, num_kv_heads=H, head_size=D)]
        BlockCopier(pool, layout, 0, other_planes).from_pool([5, 0, 1], [1, 2, 9]).wait()

    for src, dst in zip(layers, other):
        (k_src, v_src), (k_dst, v_dst) = k_and_v(src), k_and_v(dst)
        for s, d in ((3, 1), (7, 2), (8, 9)):
            assert torch.equal(k_dst[d], k_src[s])  # the kernel sees the same K and V in the new block
            assert torch.equal(v_dst[d], v_src[s])
        untouched = [b for b in range(B) if b not in (1, 2, 9)]
        assert not dst[untouched].any()


def test_plane_views_of_a_kv_major_cache_are_k_and_v():
    from flexkv_dynamo.worker import plane_views

    kv = torch.arange(2 * B * N * H * D, dtype=torch.float32).view(2, B, N, H, D)
    k, v = plane_views(kv, num_blocks=B, block_size=N, num_kv_heads=H, head_size=D)
    assert torch.equal(k[4], kv[0, 4]) and torch.equal(v[4], kv[1, 4])


def test_plane_views_refuse_an_unknown_layout_by_shape():
    from flexkv_dynamo.worker import plane_views

    with pytest.raises(ValueError, match=r"unknown KV cache layout \(12, 2, 32, 100\)"):
        plane_views(torch.zeros(B, H, N, 100), num_blocks=B, block_size=N, num_kv_heads=H, head_size=D)


def test_worker_metadata_aggregates_counts_per_job():
    from flexkv_dynamo.metadata import FlexKVWorkerMetadata

    a = FlexKVWorkerMetadata(done={1: 1, 2: 1})
    b = FlexKVWorkerMetadata(done={1: 1}, failed={2: 1})
    total = a.aggregate(b)
    assert total.done == {1: 2, 2: 1} and total.failed == {2: 1}
    assert FlexKVWorkerMetadata().is_empty() and not total.is_empty()


def test_stats_sum_and_reduce():
    from flexkv_dynamo.stats import FlexKVConnectorStats

    s = FlexKVConnectorStats()
    s.add("lookup_tokens", 100)
    s.add("hit_tokens_cpu", 64)
    s.aggregate(FlexKVConnectorStats(data={"hit_tokens_ssd": 16, "load_bytes": 2**30, "load_seconds": 0.5}))
    reduced = s.reduce()
    assert reduced["hit_rate"] == 0.8
    assert reduced["load_gib_per_s"] == 2.0
    with pytest.raises(KeyError, match="'hits'"):
        s.add("hits", 1)
    assert FlexKVConnectorStats().is_empty() and not s.is_empty()


@pytest.fixture(scope="module")
def vllm_config():
    from vllm.config import KVTransferConfig, VllmConfig

    return VllmConfig(kv_transfer_config=KVTransferConfig(
        kv_connector="FlexKVConnector", kv_connector_module_path="flexkv_dynamo.connector", kv_role="kv_both"))


def test_prometheus_metrics_count_per_tier_and_direction(vllm_config):
    from flexkv_dynamo.stats import FlexKVPromMetrics

    registry = CollectorRegistry()

    def bind(cls):
        return lambda **kw: cls(registry=registry, **kw)

    prom = FlexKVPromMetrics(vllm_config, {Counter: bind(Counter), Gauge: bind(Gauge), Histogram: bind(Histogram)},
                             ["model_name", "engine"], {0: ["tiny", "0"]})
    prom.observe({"hit_tokens_cpu": 64, "hit_tokens_ssd": 32, "load_bytes": 4096}, engine_idx=0)
    prom.observe({"hit_tokens_cpu": 32}, engine_idx=0)
    labels = {"model_name": "tiny", "engine": "0"}
    assert registry.get_sample_value("vllm:flexkv_hit_tokens_total", {**labels, "tier": "cpu"}) == 96
    assert registry.get_sample_value("vllm:flexkv_hit_tokens_total", {**labels, "tier": "ssd"}) == 32
    assert registry.get_sample_value("vllm:flexkv_transfer_bytes_total", {**labels, "direction": "load"}) == 4096


def test_enable_flexkv_off_makes_the_connector_inert(monkeypatch, vllm_config):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from flexkv_dynamo.connector import FlexKVConnector

    monkeypatch.setenv("ENABLE_FLEXKV", "0")
    conn = FlexKVConnector(vllm_config, KVConnectorRole.SCHEDULER, None)
    assert conn.scheduler_side is None
    assert conn.get_num_new_matched_tokens(object(), 0) == (0, False)
    assert conn.build_connector_meta(object()).is_empty()
    assert list(conn.take_events()) == []
