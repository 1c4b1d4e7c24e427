"""deploy/grafana/flexkv-dynamo.json: every panel's PromQL names only metrics the code exports.

The exported names are not a list kept here: they come from the code at test time. ``flexkv_*`` from a
`flexkv_core.metrics.CacheMetrics` registered in a fresh registry; ``vllm:flexkv_*`` from our connector's
`flexkv_dynamo.stats.FlexKVPromMetrics` built the way vLLM builds it, in a fresh registry; Dynamo's frontend
series from Dynamo's own generated list of names (``dynamo.prometheus_names``).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "flexkv-dynamo.json"

#: PromQL words that are not metric names (aggregations and functions are recognised by their "(").
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created")}


def sample_names(registry: CollectorRegistry) -> set[str]:
    """The series names a registry exposes, from its families' names and types."""
    return {family.name + suffix for family in registry.collect() for suffix in _SUFFIXES[family.type]}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"[^"]*"', "", expr)  # strings (label values, legend text)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b\d+(\.\d+)?[a-z]*", "", expr)  # numbers and durations (offset 1h)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[match.end():].lstrip()
        if match.group() not in _KEYWORDS and not rest.startswith("("):
            names.add(match.group())
    return names


@functools.cache
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def expressions() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"] if panel["type"] != "row"
            for target in panel["targets"]]


def flexkv_core_names() -> set[str]:
    from flexkv_core.metrics import CacheMetrics

    registry = CollectorRegistry()
    CacheMetrics("test", registry)
    return sample_names(registry)


def dynamo_frontend_names() -> set[str]:
    from dynamo.prometheus_names import frontend_service, name_prefix

    bases = {f"{name_prefix.FRONTEND}_{value}" for key, value in vars(frontend_service).items()
             if key.isupper() and isinstance(value, str) and not key.endswith(("_ENV", "_LABEL"))}
    # The list gives names, not types: a histogram's series carry suffixes.
    return bases | {base + suffix for base in bases for suffix in _SUFFIXES["histogram"]}


def vllm_connector_names() -> set[str]:
    import types

    from flexkv_dynamo.stats import FlexKVPromMetrics

    registry = CollectorRegistry()
    types_in = {cls: functools.partial(cls, registry=registry) for cls in (Gauge, Counter, Histogram)}
    FlexKVPromMetrics(types.SimpleNamespace(kv_transfer_config=None), types_in, ["model_name", "engine"],
                      {0: ["m", "0"]})
    return sample_names(registry)


def test_every_panel_reads_at_least_one_metric_and_ids_are_unique():
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for title, expr in expressions():
        assert metric_names(expr), (title, expr)


def test_the_expression_parser_finds_names_and_only_names():
    expr = ('histogram_quantile(0.95, sum by (le, tier) (rate(flexkv_transfer_seconds_bucket{tier="ssd"}[5m]))) '
            "/ on (job) group_left sum(vllm:flexkv_lookup_tokens_total offset 1h)")
    assert metric_names(expr) == {"flexkv_transfer_seconds_bucket", "vllm:flexkv_lookup_tokens_total"}


def test_flexkv_and_dynamo_series_on_the_dashboard_are_exported():
    known = flexkv_core_names() | dynamo_frontend_names()
    used = {name for _, expr in expressions() for name in metric_names(expr) if not name.startswith("vllm:")}
    assert {n for n in used if n.startswith("flexkv_")}, "the dashboard shows no flexkv_* series"
    assert used <= known, sorted(used - known)


@pytest.mark.slow
def test_vllm_flexkv_series_on_the_dashboard_are_exported():
    known = vllm_connector_names()
    used = {name for _, expr in expressions() for name in metric_names(expr) if name.startswith("vllm:")}
    assert used and used <= known, sorted(used - known)
