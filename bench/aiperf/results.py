"""Read aiperf's artifacts and compare configs per slice, as ratios to ``vllm``: tables (markdown, CSV), PNGs.

aiperf writes, per run, ``profile_export_aiperf.json`` (each metric with its unit and avg / p50 / p90
/ p99 ...) and ``profile_export.jsonl`` (one record per request). The driver keeps every run under
``OUT/<slice>/<config>/rep_<r>/aiperf/`` (with ``tiers.json``: what our tiers served during the run);
`discover` finds them, so the report can be rebuilt at any time, and runs made on different days (one
deployment, then another, with ``--url``) land in the same report.

Per slice and config, a statistic is the median over the repeats; a ratio is that median over the same
median of ``vllm`` (the baseline measured in the same run). The goals (`GOALS`) are judged on those
ratios.

A slice of whole conversations mixes first turns (whose prefix no cache holds) with later turns (whose
prefix an earlier turn computed). Besides the goals, the report splits TTFT by turn (`later_turns`) and
counts the later turns a cache served (vLLM's cached-token count covers at least `SERVED_SHARE` of the
prefix an earlier request had), so that what a cache does for the requests it can help is not hidden by
the share of first turns, and a slow hit (queued behind other prefills) is told apart from a miss.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.aiperf.trace import TraceRequest, conversations

log = logging.getLogger(__name__)

SUMMARY_JSON = "profile_export_aiperf.json"
RECORDS_JSONL = "profile_export.jsonl"


class ResultsError(ValueError):
    """An aiperf artifact is missing or not what aiperf 0.13 writes."""


@dataclass(frozen=True)
class MetricSpec:
    key: str  # aiperf's metric tag
    stats: tuple[str, ...]
    label: str
    lower_is_better: bool


#: What the comparison shows, in order.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("time_to_first_token", ("avg", "p50", "p90", "p99"), "TTFT", True),
    MetricSpec("inter_token_latency", ("avg", "p50", "p90", "p99"), "ITL", True),
    MetricSpec("request_latency", ("avg", "p50", "p90", "p99"), "Request latency", True),
    MetricSpec("output_token_throughput", ("avg",), "Output token throughput", False),
    MetricSpec("output_token_throughput_per_user", ("p50", "p90"), "Output tokens/s per user", False),
    MetricSpec("request_throughput", ("avg",), "Request throughput", False),
    MetricSpec("overall_usage_prompt_cache_read_pct", ("avg",), "Prompt tokens read from cache", False),
)


@dataclass
class RunResult:
    """One aiperf run: its summary statistics and its per-request TTFTs (by line of the replayed trace)."""

    config: str
    source: Path
    metrics: dict[str, dict[str, float]]
    units: dict[str, str]
    requests: int
    errors: int
    duration_s: float | None
    ttft_ms: dict[int, float] = field(default_factory=dict)
    cached_tokens: dict[int, float] = field(default_factory=dict)  # prompt tokens vLLM did not compute

    def stat(self, key: str, stat: str) -> float | None:
        value = self.metrics.get(key, {}).get(stat)
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def load_run(config: str, artifact_dir: str | os.PathLike[str]) -> RunResult:
    """Parse one aiperf artifact directory; ResultsError names the file and what is wrong."""
    artifact_dir = Path(artifact_dir)
    summary_path = artifact_dir / SUMMARY_JSON
    if not summary_path.is_file():
        raise ResultsError(f"no aiperf summary at {summary_path}")
    try:
        data = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{summary_path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or "time_to_first_token" not in data:
        raise ResultsError(f"{summary_path}: no time_to_first_token metric; is this aiperf's "
                           f"{SUMMARY_JSON}?")
    metrics: dict[str, dict[str, float]] = {}
    units: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict) and "unit" in value:
            units[key] = str(value["unit"])
            metrics[key] = {k: float(v) for k, v in value.items() if isinstance(v, (int, float))}
    errors = sum(int(e.get("count", 0)) for e in data.get("error_summary") or [] if isinstance(e, dict))
    requests = int(metrics.get("request_count", {}).get("avg", 0))
    duration = metrics.get("benchmark_duration", {}).get("avg")
    ttfts, cached = read_records(artifact_dir / RECORDS_JSONL)
    return RunResult(config, summary_path, metrics, units, requests, errors, duration, ttfts, cached)


def read_records(records_path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Per-request TTFT (ms) and cached prompt tokens of the successful requests in aiperf's records file
    (empty if there is none), keyed by the request's line in the replayed trace: with a fixed schedule
    aiperf makes each line one session, numbered in file order (``session_num``)."""
    ttfts: dict[int, float] = {}
    cached: dict[int, float] = {}
    if not records_path.is_file():
        return ttfts, cached
    with open(records_path) as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            record = json.loads(line)
            metrics = record.get("metrics") or {}
            ttft = metrics.get("time_to_first_token")
            if isinstance(ttft, dict) and isinstance(ttft.get("value"), (int, float)) and not record.get("error"):
                session = int((record.get("metadata") or {}).get("session_num", i))
                ttfts[session] = float(ttft["value"])
                cached[session] = float((metrics.get("usage_prompt_cache_read_tokens") or {}).get("value", 0))
    return ttfts, cached


def later_turns(trace_path: Path) -> dict[int, int] | None:
    """Lines of a replayed hash-id trace that continue an earlier line's conversation (`trace.conversations`),
    each with the number of its leading blocks that earlier lines had: the requests whose prefix a cache can
    hold, and how much of it. None without such a trace (text prompts carry no hash ids)."""
    if not trace_path.is_file():
        return None
    requests = []
    with open(trace_path) as fh:
        for line in fh:
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get("hash_ids"), list):
                return None
            requests.append(TraceRequest(float(record.get("timestamp", 0)), int(record.get("input_length", 1)),
                                         int(record.get("output_length", 0)), tuple(record["hash_ids"])))
    seen: set[int] = set()
    reusable: list[int] = []
    for req in requests:
        n = 0
        while n < len(req.hash_ids) and req.hash_ids[n] in seen:
            n += 1
        reusable.append(n)
        seen.update(req.hash_ids)
    return {i: reusable[i] for group in conversations(requests) for i in group[1:]}


#: A later turn counts as served from a cache when vLLM's cached tokens cover this share of its reusable prefix
#: (vLLM counts whole blocks of its own size, and the chat template shifts the prompt's block boundaries).
SERVED_SHARE = 0.75

#: Configs in this order in tables and plots; the first is the baseline every ratio is taken against.
CONFIG_ORDER = ("vllm", "flexkv", "flexkv-blind")
BASELINE = CONFIG_ORDER[0]
TIERS_JSON = "tiers.json"


@dataclass(frozen=True)
class Goal:
    key: str
    stat: str
    label: str
    limit: float
    lower_is_better: bool

    def met(self, ratio: float | None) -> bool | None:
        if ratio is None:
            return None
        return ratio <= self.limit if self.lower_is_better else ratio >= self.limit

    @property
    def text(self) -> str:
        return f"{'<=' if self.lower_is_better else '>='} {self.limit:g}"


#: The project's goals for a FlexKV deployment, as ratios to plain vLLM measured in the same run.
GOALS = (
    Goal("time_to_first_token", "p50", "TTFT p50", 0.4, True),
    Goal("time_to_first_token", "p90", "TTFT p90", 0.6, True),
    Goal("inter_token_latency", "p50", "ITL p50", 1.03, True),
    Goal("output_token_throughput", "avg", "output throughput", 1.0, False),
)


@dataclass
class SliceRuns:
    """Every run of one slice: config -> its repeats (in order), and the slice's description."""

    name: str
    info: dict[str, object]
    runs: dict[str, list[RunResult]]
    tiers: dict[str, list[dict[str, dict[str, float]]]]  # config -> per repeat: {"hit"|"stored": {tier: n}}
    later: dict[int, int] | None = None  # later turns' trace lines -> blocks an earlier line had (None: unknown)

    def configs(self) -> list[str]:
        return sorted(self.runs, key=_order)

    def median(self, config: str, key: str, stat: str) -> float | None:
        values = [v for r in self.runs.get(config, []) if (v := r.stat(key, stat)) is not None]
        return statistics.median(values) if values else None

    def ratio(self, config: str, key: str, stat: str) -> float | None:
        value, base = self.median(config, key, stat), self.median(BASELINE, key, stat)
        if value is None or not base:
            return None
        return value / base

    def ttfts(self, config: str, *, later_only: bool = False) -> list[float]:
        """Every repeat's per-request TTFTs; ``later_only``: of the later turns alone ([] if unknown)."""
        if later_only and self.later is None:
            return []
        return [t for r in self.runs.get(config, []) for i, t in r.ttft_ms.items()
                if not later_only or i in self.later]

    def turn_ttft_p50(self, config: str, later: bool) -> float | None:
        """TTFT p50 of the first turns (``later=False``) or the later turns, median over the repeats."""
        if self.later is None:
            return None
        p50s = []
        for run in self.runs.get(config, []):
            ttfts = [t for i, t in run.ttft_ms.items() if (i in self.later) == later]
            if ttfts:
                p50s.append(statistics.median(ttfts))
        return statistics.median(p50s) if p50s else None

    def later_served(self, config: str) -> tuple[int, int] | None:
        """(later turns a cache served, later turns) over every repeat: served = vLLM's cached prompt tokens
        cover at least `SERVED_SHARE` of the prefix an earlier request had."""
        block_tokens = self.info.get("block_tokens") if isinstance(self.info, dict) else None
        if self.later is None or not isinstance(block_tokens, int):
            return None
        served = total = 0
        for run in self.runs.get(config, []):
            for i, cached in run.cached_tokens.items():
                if self.later.get(i):
                    total += 1
                    served += cached >= SERVED_SHARE * self.later[i] * block_tokens
        return served, total

    def turn_ratio(self, config: str, later: bool) -> float | None:
        value, base = self.turn_ttft_p50(config, later), self.turn_ttft_p50(BASELINE, later)
        return None if value is None or not base else value / base

    def tier_hits(self, config: str) -> dict[str, float]:
        total: dict[str, float] = {}
        for rep in self.tiers.get(config, []):
            for tier, n in (rep.get("hit") or {}).items():
                total[tier] = total.get(tier, 0.0) + n
        return total


def _order(config: str) -> tuple[int, str]:
    return (CONFIG_ORDER.index(config) if config in CONFIG_ORDER else len(CONFIG_ORDER), config)


def discover(out_dir: str | os.PathLike[str]) -> list[SliceRuns]:
    """Every ``OUT/<slice>/<config>/rep_<r>/aiperf/`` with a summary, grouped by slice (sorted by name)."""
    out_dir = Path(out_dir)
    slices: dict[str, SliceRuns] = {}
    for summary in sorted(out_dir.glob(f"*/*/rep_*/aiperf/{SUMMARY_JSON}")):
        rep_dir = summary.parent.parent
        config, slice_dir = rep_dir.parent.name, rep_dir.parent.parent
        sl = slices.get(slice_dir.name)
        if sl is None:
            info_path = slice_dir / "trace_info.json"
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
            sl = slices[slice_dir.name] = SliceRuns(slice_dir.name, info, {}, {},
                                                    later_turns(slice_dir / "trace.jsonl"))
        sl.runs.setdefault(config, []).append(load_run(config, summary.parent))
        tiers = rep_dir / TIERS_JSON
        sl.tiers.setdefault(config, []).append(json.loads(tiers.read_text()) if tiers.is_file() else {})
    return [slices[name] for name in sorted(slices, key=_slice_key)]


def _slice_key(name: str) -> tuple[int, str]:
    digits = "".join(c for c in name if c.isdigit())
    return (int(digits) if digits else 0, name)


# --- tables --------------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _fmt_ratio(ratio: float | None, goal: Goal | None = None) -> str:
    if ratio is None:
        return "n/a"
    mark = ""
    if goal is not None:
        mark = " ✓" if goal.met(ratio) else " ✗"
    return f"{ratio:.2f}{mark}"


def slice_table(sl: SliceRuns) -> str:
    """One row per config: medians over its repeats, what our tiers served, ratios to vllm with the goals."""
    head = ["config", "runs", "requests ok/err", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms", "ITL p50 ms",
            "output tok/s", "prompt cached %", "blocks from our CPU / SSD",
            "TTFT p50 ms, first / later turns", "later turns served from a cache",
            *[f"{g.label} ratio ({g.text})" for g in GOALS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config in sl.configs():
        runs = sl.runs[config]
        hits = sl.tier_hits(config)
        tiers = (f"{hits.get('cpu', 0):,.0f} / {hits.get('ssd', 0):,.0f}" if config != BASELINE else "-")
        cells = [f"`{config}`", str(len(runs)),
                 f"{sum(r.requests for r in runs)}/{sum(r.errors for r in runs)}",
                 _fmt(sl.median(config, "time_to_first_token", "p50")),
                 _fmt(sl.median(config, "time_to_first_token", "p90")),
                 _fmt(sl.median(config, "time_to_first_token", "p99")),
                 _fmt(sl.median(config, "inter_token_latency", "p50"), 1),
                 _fmt(sl.median(config, "output_token_throughput", "avg"), 2),
                 _fmt(sl.median(config, "overall_usage_prompt_cache_read_pct", "avg"), 1), tiers,
                 f"{_fmt(sl.turn_ttft_p50(config, False))} / {_fmt(sl.turn_ttft_p50(config, True))}",
                 "n/a" if (served := sl.later_served(config)) is None else f"{served[0]} of {served[1]}"]
        cells += ["1 (baseline)" if config == BASELINE else _fmt_ratio(sl.ratio(config, g.key, g.stat), g)
                  for g in GOALS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def goals_table(slices: Sequence[SliceRuns]) -> str:
    """Slice x config rows of the goal ratios: the headline."""
    head = ["slice", "reuse ceiling", "later turns", "config", *[f"{g.label} ({g.text})" for g in GOALS],
            "TTFT p50 of first / later turns"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sl in slices:
        stats = (sl.info.get("stats") or {}) if isinstance(sl.info, dict) else {}
        ceiling = stats.get("block_reuse")
        later = "n/a" if sl.later is None else f"{len(sl.later)} of {stats.get('requests', '?')}"
        for config in sl.configs():
            if config == BASELINE:
                continue
            cells = [sl.name, "n/a" if ceiling is None else f"{100 * float(ceiling):.0f}%", later, f"`{config}`"]
            cells += [_fmt_ratio(sl.ratio(config, g.key, g.stat), g) for g in GOALS]
            cells.append(f"{_fmt_ratio(sl.turn_ratio(config, False))} / "
                         f"{_fmt_ratio(sl.turn_ratio(config, True))}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(slices: Sequence[SliceRuns], path: str | os.PathLike[str]) -> Path:
    """Long format: one line per slice, config, repeat, metric and statistic."""
    path = Path(path)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slice", "config", "repeat", "metric", "stat", "unit", "value"])
        for sl in slices:
            for config in sl.configs():
                for rep, run in enumerate(sl.runs[config]):
                    for spec in METRICS:
                        for stat in spec.stats:
                            value = run.stat(spec.key, stat)
                            if value is not None:
                                writer.writerow([sl.name, config, rep, spec.key, stat, run.units.get(spec.key, ""),
                                                 f"{value:.6g}"])
    return path


# --- plots ---------------------------------------------------------------------------------------

def plot_ratios(slices: Sequence[SliceRuns], path: str | os.PathLike[str]) -> Path:
    """One panel per goal: each slice's ratio to vllm for every other config, the goal as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({c for sl in slices for c in sl.runs if c != BASELINE}, key=_order)
    fig, axes = plt.subplots(1, len(GOALS), figsize=(4.2 * len(GOALS), 4))
    width = 0.8 / max(1, len(configs))
    for ax, goal in zip(axes, GOALS):
        for i, config in enumerate(configs):
            xs = [x + (i - (len(configs) - 1) / 2) * width for x in range(len(slices))]
            ys = [sl.ratio(config, goal.key, goal.stat) or 0.0 for sl in slices]
            ax.bar(xs, ys, width, label=config, color=f"C{i + 1}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.axhline(goal.limit, color="red", linestyle="--", linewidth=1, label=f"goal {goal.text}")
        ax.set_xticks(range(len(slices)), [sl.name for sl in slices])
        ax.set_title(f"{goal.label} / vllm")
    axes[0].set_ylabel("ratio to plain vLLM (same run)")
    axes[0].legend(fontsize=8)
    fig.suptitle("aiperf on Mooncake conversation slices, 2 workers behind Dynamo's KV router")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ttft_cdf(slices: Sequence[SliceRuns], path: str | os.PathLike[str]) -> Path | None:
    """Per slice, the TTFT distribution of every config (all repeats pooled), and dashed that of the later
    turns alone."""
    if not any(sl.ttfts(c) for sl in slices for c in sl.runs):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(slices), figsize=(5.5 * len(slices), 4), squeeze=False)
    for ax, sl in zip(axes[0], slices):
        for config in sl.configs():
            for later_only, style, what in ((False, "-", "requests"), (True, "--", "later turns")):
                xs = sorted(sl.ttfts(config, later_only=later_only))
                if xs:
                    ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", linestyle=style,
                            label=f"{config} ({len(xs)} {what})", color=f"C{_order(config)[0]}")
        ax.set_xscale("log")
        ax.set_xlabel("time to first token (ms, log scale)")
        ax.set_title(sl.name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("fraction of requests")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class Report:
    markdown: Path
    csv: Path
    plots: tuple[Path, ...]


def write_report(slices: Sequence[SliceRuns], out_dir: str | os.PathLike[str], *, preamble: str = "") -> Report:
    """``results.md``, ``results.csv``, ``aiperf_ratios.png`` and ``aiperf_ttft_cdf.png`` in ``out_dir``."""
    if not slices:
        raise ResultsError(f"no aiperf results to report in {out_dir}")
    out_dir = Path(out_dir)
    parts = [preamble, "## Ratios to `vllm` (median over repeats; ✓ meets the goal)\n", goals_table(slices)]
    for sl in slices:
        parts += [f"\n## {sl.name}: {sl.info.get('stats_text', '')}\n", slice_table(sl)]
    md = out_dir / "results.md"
    md.write_text("\n".join(parts))
    csv_path = write_csv(slices, out_dir / "results.csv")
    plots = [plot_ratios(slices, out_dir / "aiperf_ratios.png")]
    cdf = plot_ttft_cdf(slices, out_dir / "aiperf_ttft_cdf.png")
    if cdf is not None:
        plots.append(cdf)
    log.info("wrote %s, %s and %s", md, csv_path, ", ".join(str(p) for p in plots))
    return Report(md, csv_path, tuple(plots))
