"""Prometheus metrics: what an operator scraping /metrics sees, per cache instance."""

from __future__ import annotations

import socket
import threading
import urllib.request

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flexkv_core.config import FlexKVConfig
from flexkv_core.layout import Tier
from flexkv_core.metrics import CacheMetrics, Direction, make_metrics, start_metrics_server


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    """Every sample of the text exposition, keyed by (name, labels)."""
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return samples(registry)[(name, frozenset(labels.items()))]


def test_recorded_numbers_appear_in_the_exposition():
    reg = CollectorRegistry()
    m = CacheMetrics("ipc:///tmp/a", reg)
    m.lookup(10, 6)
    m.lookup(4)
    m.hit(Tier.CPU, 4)
    m.hit("ssd", 2)
    m.stored(Tier.CPU, 8)
    m.stored(Tier.SSD, 8)
    m.evicted(Tier.CPU, 3)
    m.io_error(Tier.SSD)
    m.checksum_failure(2)
    m.moved(Direction.CPU_TO_SSD, 8 * 2**20, 0.003)
    m.moved("ssd_to_cpu", 2 * 2**20, 0.2)
    m.moved("engine_to_cpu", 4096)  # untimed: bytes only
    m.set_usage(Tier.CPU, 5, 100)
    m.set_pinned(2)

    inst = {"instance": "ipc:///tmp/a"}
    assert value(reg, "flexkv_lookups_total", **inst) == 2
    assert value(reg, "flexkv_lookup_blocks_total", **inst) == 14
    assert value(reg, "flexkv_lookup_found_blocks_total", **inst) == 6
    assert value(reg, "flexkv_hit_blocks_total", tier="cpu", **inst) == 4
    assert value(reg, "flexkv_hit_blocks_total", tier="ssd", **inst) == 2
    assert value(reg, "flexkv_stored_blocks_total", tier="ssd", **inst) == 8
    assert value(reg, "flexkv_evicted_blocks_total", tier="cpu", **inst) == 3
    assert value(reg, "flexkv_io_errors_total", tier="ssd", **inst) == 1
    assert value(reg, "flexkv_checksum_failures_total", **inst) == 2
    assert value(reg, "flexkv_bytes_moved_total", direction="cpu_to_ssd", **inst) == 8 * 2**20
    assert value(reg, "flexkv_bytes_moved_total", direction="engine_to_cpu", **inst) == 4096
    assert value(reg, "flexkv_used_slots", tier="cpu", **inst) == 5
    assert value(reg, "flexkv_capacity_slots", tier="cpu", **inst) == 100
    assert value(reg, "flexkv_pinned_blocks", **inst) == 2
    assert value(reg, "flexkv_transfer_seconds_count", direction="ssd_to_cpu", **inst) == 1
    assert value(reg, "flexkv_transfer_seconds_sum", direction="ssd_to_cpu", **inst) == pytest.approx(0.2)
    assert value(reg, "flexkv_transfer_seconds_bucket", direction="cpu_to_ssd", le="0.005", **inst) == 1
    assert value(reg, "flexkv_transfer_seconds_bucket", direction="cpu_to_ssd", le="0.0025", **inst) == 0
    assert value(reg, "flexkv_transfer_seconds_count", direction="engine_to_cpu", **inst) == 0

    # The human exposition line itself, as an operator greps it.
    text = generate_latest(reg).decode()
    assert 'flexkv_hit_blocks_total{instance="ipc:///tmp/a",tier="cpu"} 4.0' in text


def test_every_series_exists_from_the_start_at_zero():
    # rate() over a series that appears only at its first increment loses that increment.
    reg = CollectorRegistry()
    CacheMetrics("fresh", reg)
    got = samples(reg)
    for tier in ("cpu", "ssd", "remote"):
        assert got[("flexkv_evicted_blocks_total", frozenset({"instance": "fresh", "tier": tier}.items()))] == 0
    for direction in Direction:
        key = ("flexkv_bytes_moved_total", frozenset({"instance": "fresh", "direction": direction.value}.items()))
        assert got[key] == 0


def test_two_instances_in_one_registry_keep_their_own_numbers():
    reg = CollectorRegistry()
    a, b = CacheMetrics("a", reg), CacheMetrics("b", reg)
    a.hit("cpu", 3)
    b.hit("cpu", 40)
    a.set_usage("cpu", 1, 10)
    b.set_usage("cpu", 7, 70)
    assert value(reg, "flexkv_hit_blocks_total", instance="a", tier="cpu") == 3
    assert value(reg, "flexkv_hit_blocks_total", instance="b", tier="cpu") == 40
    assert value(reg, "flexkv_used_slots", instance="a", tier="cpu") == 1
    assert value(reg, "flexkv_capacity_slots", instance="b", tier="cpu") == 70
    assert a.snapshot()["hit_blocks"]["cpu"] == 3 and b.snapshot()["hit_blocks"]["cpu"] == 40


def test_close_removes_only_that_instance():
    reg = CollectorRegistry()
    a, b = CacheMetrics("a", reg), CacheMetrics("b", reg)
    a.hit("cpu", 1)
    b.hit("cpu", 2)
    a.close()
    a.hit("cpu", 5)  # after close: still counted for snapshot, no longer exported
    instances = {dict(labels).get("instance") for _, labels in samples(reg)}
    assert instances == {"b"}
    assert value(reg, "flexkv_hit_blocks_total", instance="b", tier="cpu") == 2
    assert a.snapshot()["hit_blocks"]["cpu"] == 6


def test_disabled_metrics_export_nothing_but_still_count():
    reg = CollectorRegistry()
    m = make_metrics(FlexKVConfig(enable_metrics=False), "off", reg)
    m.hit("cpu", 3)
    m.moved("cpu_to_engine", 100, 0.01)
    m.set_usage("cpu", 2, 9)
    assert generate_latest(reg) == b""
    snap = m.snapshot()
    assert snap["hit_blocks"]["cpu"] == 3 and snap["bytes_moved"]["cpu_to_engine"] == 100
    assert snap["used_slots"]["cpu"] == 2 and snap["capacity_slots"]["cpu"] == 9


def test_enabled_by_config_exports():
    reg = CollectorRegistry()
    make_metrics(FlexKVConfig(), "on", reg).stored("cpu", 2)
    assert value(reg, "flexkv_stored_blocks_total", instance="on", tier="cpu") == 2


def test_snapshot_travels_over_the_wire_unchanged():
    m = CacheMetrics("w", CollectorRegistry())
    m.hit("remote", 1)
    m.moved("remote_to_cpu", 123, 0.5)
    snap = m.snapshot()
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(snap)) == snap
    assert snap["transfers"]["remote_to_cpu"] == 1 and snap["transfer_seconds"]["remote_to_cpu"] == 0.5


@pytest.mark.parametrize("call, bad", [
    (lambda m: m.hit("gpu", 1), "'gpu'"),
    (lambda m: m.moved("cpu_to_gpu", 1), "'cpu_to_gpu'"),
    (lambda m: m.stored("cpu", -1), "-1"),
])
def test_bad_labels_and_negative_counts_are_refused(call, bad):
    m = CacheMetrics("x", CollectorRegistry())
    with pytest.raises(ValueError) as info:
        call(m)
    assert bad in str(info.value)


def test_counting_from_many_threads_loses_nothing():
    reg = CollectorRegistry()
    m = CacheMetrics("t", reg)

    def work():
        for _ in range(5000):
            m.hit("cpu", 1)
            m.moved("engine_to_cpu", 10)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.snapshot()["hit_blocks"]["cpu"] == 20000
    assert value(reg, "flexkv_hit_blocks_total", instance="t", tier="cpu") == 20000
    assert value(reg, "flexkv_bytes_moved_total", instance="t", direction="engine_to_cpu") == 200000


def test_metrics_http_endpoint_serves_the_registry():
    reg = CollectorRegistry()
    CacheMetrics("http", reg).evicted("ssd", 9)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_metrics_server(port, addr="127.0.0.1", registry=reg)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'flexkv_evicted_blocks_total{instance="http",tier="ssd"} 9.0' in body


def test_metrics_http_port_in_use_names_the_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            start_metrics_server(port, addr="127.0.0.1", registry=CollectorRegistry())


def test_the_connectors_hit_counters_have_a_remote_tier():
    """Blocks fetched from another node count as hits of their own: ``vllm:flexkv_hit_tokens{tier="remote"}``
    next to cpu and ssd, and in the hit rate (the end-to-end count is in tests/test_dynamo_ops.py)."""
    pytest.importorskip("vllm")
    from prometheus_client import Counter, Gauge, Histogram
    from vllm.config import KVTransferConfig, VllmConfig

    from flexkv_dynamo.stats import HIT_TIERS, FlexKVConnectorStats, FlexKVPromMetrics

    assert HIT_TIERS == ("cpu", "ssd", "remote")
    stats = FlexKVConnectorStats(data={"lookup_tokens": 100, "hit_tokens_cpu": 10})
    stats.aggregate(FlexKVConnectorStats(data={"hit_tokens_remote": 40, "hit_tokens_ssd": 30}))
    assert stats.reduce()["hit_rate"] == 0.8

    reg = CollectorRegistry()
    bind = {cls: (lambda cls=cls, **kw: cls(registry=reg, **kw)) for cls in (Counter, Gauge, Histogram)}
    config = VllmConfig(kv_transfer_config=KVTransferConfig(
        kv_connector="FlexKVConnector", kv_connector_module_path="flexkv_dynamo.connector", kv_role="kv_both"))
    prom = FlexKVPromMetrics(config, bind, ["engine"], {0: ["0"]})
    prom.observe(stats.data, engine_idx=0)
    for tier, tokens in (("cpu", 10), ("ssd", 30), ("remote", 40)):
        assert value(reg, "vllm:flexkv_hit_tokens_total", engine="0", tier=tier) == tokens
