"""Read aiperf's artifacts for each config and compare them: one table (markdown + CSV) and PNG plots.

aiperf writes, per run, ``profile_export_aiperf.json`` (each metric with its unit and avg / p50 / p90
/ p99 ...) and ``profile_export.jsonl`` (one record per request). The driver keeps one run per config
under ``OUT/<config>/aiperf/``; `discover_runs` finds them, so a table can be rebuilt at any time, and
runs made on different days (a baseline deployment, then a FlexKV one) land in the same table.

The table has one row per metric and statistic, one column per config and, from the second config
on, its change relative to the first (the baseline): negative is better for latencies, positive for
throughput and cache reads.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SUMMARY_JSON = "profile_export_aiperf.json"
RECORDS_JSONL = "profile_export.jsonl"
#: Configs in this order come first in tables and plots; others follow alphabetically.
PREFERRED_ORDER = ("baseline", "flexkv")


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
    """One aiperf run: its summary statistics and its per-request TTFTs."""

    config: str
    source: Path
    metrics: dict[str, dict[str, float]]
    units: dict[str, str]
    requests: int
    errors: int
    duration_s: float | None
    ttft_ms: list[float] = field(default_factory=list)

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
    return RunResult(config, summary_path, metrics, units, requests, errors, duration,
                     read_ttfts(artifact_dir / RECORDS_JSONL))


def read_ttfts(records_path: Path) -> list[float]:
    """Per-request TTFT (ms) of the successful requests in aiperf's records file ([] if there is none)."""
    if not records_path.is_file():
        return []
    ttfts = []
    with open(records_path) as fh:
        for line in fh:
            if not line.strip():
                continue
            record = json.loads(line)
            ttft = (record.get("metrics") or {}).get("time_to_first_token")
            if isinstance(ttft, dict) and isinstance(ttft.get("value"), (int, float)) and not record.get("error"):
                ttfts.append(float(ttft["value"]))
    return ttfts


def _order(config: str) -> tuple[int, str]:
    return (PREFERRED_ORDER.index(config) if config in PREFERRED_ORDER else len(PREFERRED_ORDER), config)


def discover_runs(out_dir: str | os.PathLike[str]) -> list[RunResult]:
    """Every ``OUT/<config>/aiperf/`` with a summary, baseline first."""
    out_dir = Path(out_dir)
    found = sorted((p.parent.parent.name for p in out_dir.glob(f"*/aiperf/{SUMMARY_JSON}")), key=_order)
    return [load_run(config, out_dir / config / "aiperf") for config in found]


# --- the table -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TableRow:
    label: str
    stat: str
    unit: str
    lower_is_better: bool
    values: tuple[float | None, ...]

    def change(self, index: int) -> float | None:
        """Relative change of config ``index`` against config 0, or None when it cannot be computed."""
        base, value = self.values[0], self.values[index]
        if base is None or value is None or base == 0:
            return None
        return (value - base) / abs(base)


def comparison_rows(runs: Sequence[RunResult]) -> list[TableRow]:
    rows = [TableRow("Requests completed", "", "requests", False, tuple(float(r.requests) for r in runs)),
            TableRow("Request errors", "", "requests", True, tuple(float(r.errors) for r in runs))]
    for spec in METRICS:
        unit = next((r.units[spec.key] for r in runs if spec.key in r.units), "")
        for stat in spec.stats:
            values = tuple(r.stat(spec.key, stat) for r in runs)
            if all(v is None for v in values):
                continue
            rows.append(TableRow(spec.label, stat, unit, spec.lower_is_better, values))
    rows.append(TableRow("Benchmark duration", "", "s", True, tuple(r.duration_s for r in runs)))
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3g}"


def _fmt_change(change: float | None) -> str:
    return "n/a" if change is None else f"{100 * change:+.1f}%"


def _header(runs: Sequence[RunResult]) -> list[str]:
    head = ["metric", "stat", "unit", *[r.config for r in runs]]
    head += [f"{r.config} vs {runs[0].config}" for r in runs[1:]]
    return head


def to_markdown(runs: Sequence[RunResult], rows: Sequence[TableRow] | None = None) -> str:
    rows = comparison_rows(runs) if rows is None else rows
    head = _header(runs)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for row in rows:
        cells = [row.label, row.stat, row.unit, *[_fmt(v) for v in row.values]]
        cells += [_fmt_change(row.change(i)) for i in range(1, len(runs))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: str | os.PathLike[str], runs: Sequence[RunResult],
              rows: Sequence[TableRow] | None = None) -> Path:
    rows = comparison_rows(runs) if rows is None else rows
    path = Path(path)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(_header(runs))
        for row in rows:
            changes = [row.change(i) for i in range(1, len(runs))]
            writer.writerow([row.label, row.stat, row.unit,
                             *["" if v is None else f"{v:.6g}" for v in row.values],
                             *["" if c is None else f"{c:.6g}" for c in changes]])
    return path


# --- plots ---------------------------------------------------------------------------------------

def plot_summary(runs: Sequence[RunResult], path: str | os.PathLike[str]) -> Path:
    """Four panels: TTFT, ITL and request latency (p50/p90/p99 bars per config), output throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    stats = ("p50", "p90", "p99")
    width = 0.8 / max(1, len(runs))
    for ax, (key, title) in zip(axes[:3], (("time_to_first_token", "TTFT"), ("inter_token_latency", "ITL"),
                                           ("request_latency", "Request latency"))):
        shown = []
        for i, run in enumerate(runs):
            values = [run.stat(key, s) or 0.0 for s in stats]
            shown += [v for v in values if v > 0]
            xs = [x + (i - (len(runs) - 1) / 2) * width for x in range(len(stats))]
            ax.bar(xs, values, width, label=run.config)
        ax.set_xticks(range(len(stats)), stats)
        ax.set_title(title)
        ax.set_ylabel("ms")
        if shown and max(shown) > 20 * min(shown):  # tails dwarf medians: a log axis shows both
            ax.set_yscale("log")
            ax.set_ylabel("ms (log scale)")
    ax = axes[3]
    ax.bar([r.config for r in runs], [r.stat("output_token_throughput", "avg") or 0.0 for r in runs],
           color=[f"C{i}" for i in range(len(runs))])
    ax.set_title("Output token throughput")
    ax.set_ylabel("tokens/s")
    axes[0].legend()
    fig.suptitle("aiperf on the Mooncake trace (lower latency, higher throughput is better)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ttft_cdf(runs: Sequence[RunResult], path: str | os.PathLike[str]) -> Path | None:
    """Per-request TTFT distribution of each config (None when no run kept per-request records)."""
    if not any(r.ttft_ms for r in runs):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if not run.ttft_ms:
            continue
        xs = sorted(run.ttft_ms)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{run.config} ({len(xs)} requests)")
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT distribution")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
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


def write_report(runs: Sequence[RunResult], out_dir: str | os.PathLike[str], *,
                 preamble: str = "") -> Report:
    """``results.md``, ``results.csv``, ``aiperf_summary.png`` and ``aiperf_ttft_cdf.png`` in ``out_dir``."""
    if not runs:
        raise ResultsError(f"no aiperf results to report in {out_dir}")
    out_dir = Path(out_dir)
    rows = comparison_rows(runs)
    md = out_dir / "results.md"
    md.write_text(preamble + to_markdown(runs, rows))
    csv_path = write_csv(out_dir / "results.csv", runs, rows)
    plots = [plot_summary(runs, out_dir / "aiperf_summary.png")]
    cdf = plot_ttft_cdf(runs, out_dir / "aiperf_ttft_cdf.png")
    if cdf is not None:
        plots.append(cdf)
    log.info("wrote %s, %s and %s", md, csv_path, ", ".join(str(p) for p in plots))
    return Report(md, csv_path, tuple(plots))
