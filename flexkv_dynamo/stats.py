"""The connector's numbers, as vLLM collects them: `FlexKVConnectorStats` and its Prometheus metrics.

vLLM asks the connector for stats each step (``get_kv_connector_stats``, on the workers and on the
scheduler), sums them with ``aggregate``, ships ``to_dict()`` to the front-end process, rebuilds them
there with ``FlexKVConnector.build_kv_connector_stats(data)`` and hands the dict to
`FlexKVPromMetrics.observe` (``/metrics``) and, reduced, to its periodic "KV Transfer metrics" log line.

Scheduler side: tokens served per tier (``cpu``, ``ssd``, and ``remote``: fetched from another node by
distributed reuse) and tokens asked about. Worker side: bytes, seconds and blocks
copied per direction (``load`` = pool -> engine, ``store`` = engine -> pool). The cache's own gauges
(usage, pins, SSD traffic) are exported by `flexkv_core.metrics` under ``flexkv_*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

#: Every key a stats dict may hold; all are sums (counters), so aggregation is addition.
COUNTERS = (
    "lookup_tokens",  # tokens asked about beyond vLLM's own prefix hit
    "hit_tokens_cpu",  # of those, tokens loaded from the CPU tier
    "hit_tokens_ssd",  # ... and from the SSD tier (staged through CPU)
    "hit_tokens_remote",  # ... and from another node (distributed reuse: fetched into CPU, then loaded)
    "load_error_blocks",  # blocks promised to vLLM but not delivered (recomputed)
    "load_blocks", "load_bytes", "load_seconds",
    "store_blocks", "store_bytes", "store_seconds",
    "connector_errors",  # exceptions of ours caught at the connector boundary (flexkv_dynamo.guard)
)


#: The ``tier`` label values of ``vllm:flexkv_hit_tokens`` (one ``hit_tokens_<tier>`` counter each).
HIT_TIERS = ("cpu", "ssd", "remote")


@dataclass
class FlexKVConnectorStats(KVConnectorStats):
    """Counters since the last report. ``data`` maps names from `COUNTERS` to numbers."""

    def __post_init__(self) -> None:
        unknown = set(self.data) - set(COUNTERS)
        if unknown:
            raise ValueError(f"FlexKVConnectorStats got unknown keys {sorted(unknown)}; known: {COUNTERS}")

    def add(self, key: str, value: int | float) -> None:
        if key not in COUNTERS:
            raise KeyError(f"{key!r} is not a FlexKV connector counter; known: {COUNTERS}")
        if value:
            self.data[key] = self.data.get(key, 0) + value

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            self.add(key, value)
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {key: self.data.get(key, 0) for key in COUNTERS}
        asked = out["lookup_tokens"]
        hits = sum(out[f"hit_tokens_{tier}"] for tier in HIT_TIERS)
        out["hit_rate"] = round(hits / asked, 4) if asked else 0.0
        for direction in ("load", "store"):
            seconds = out[f"{direction}_seconds"]
            out[f"{direction}_gib_per_s"] = round(out[f"{direction}_bytes"] / seconds / 2**30, 3) if seconds else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class FlexKVPromMetrics(KVConnectorPromMetrics):
    """``vllm:flexkv_*`` series, one child per engine (vLLM's labels) and tier or direction."""

    def __init__(self, vllm_config: VllmConfig, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        hit = self._counter_cls(name="vllm:flexkv_hit_tokens",
                                documentation="Prompt tokens loaded from a FlexKV tier instead of computed.",
                                labelnames=labelnames + ["tier"])
        lookup = self._counter_cls(name="vllm:flexkv_lookup_tokens",
                                   documentation="Prompt tokens looked up in FlexKV (beyond vLLM's prefix hit).",
                                   labelnames=labelnames)
        errors = self._counter_cls(name="vllm:flexkv_load_error_blocks",
                                   documentation="Blocks FlexKV promised but could not load (recomputed).",
                                   labelnames=labelnames)
        nbytes = self._counter_cls(name="vllm:flexkv_transfer_bytes",
                                   documentation="Bytes copied between vLLM's KV cache and FlexKV's CPU pool.",
                                   labelnames=labelnames + ["direction"])
        seconds = self._counter_cls(name="vllm:flexkv_transfer_seconds",
                                    documentation="Seconds spent copying between vLLM's KV cache and FlexKV.",
                                    labelnames=labelnames + ["direction"])
        failures = self._counter_cls(name="vllm:flexkv_connector_errors",
                                     documentation="Exceptions inside FlexKV's connector callbacks, caught and "
                                                   "answered with a miss or a load error.",
                                     labelnames=labelnames)
        # key in the stats dict -> bound child per engine
        self._children: dict[int, dict[str, Any]] = {}
        for engine, values in per_engine_labelvalues.items():
            self._children[engine] = {
                "lookup_tokens": lookup.labels(*values),
                **{f"hit_tokens_{tier}": hit.labels(*values, tier) for tier in HIT_TIERS},
                "load_error_blocks": errors.labels(*values),
                "load_bytes": nbytes.labels(*values, "load"),
                "store_bytes": nbytes.labels(*values, "store"),
                "load_seconds": seconds.labels(*values, "load"),
                "store_seconds": seconds.labels(*values, "store"),
                "connector_errors": failures.labels(*values),
            }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        children = self._children.get(engine_idx)
        if children is None:
            return
        for key, child in children.items():
            value = transfer_stats_data.get(key, 0)
            if value:
                child.inc(value)
