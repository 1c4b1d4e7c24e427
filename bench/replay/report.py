"""Tables (markdown, CSV, JSON) and plots (PNG) of trace-replay results.

One row per configuration, averaged over its repeats (Dynamo's router breaks cost ties at random, so
runs of one configuration differ a little; the reused range shows by how much). Columns are fractions
of all prompt (prefill) tokens:

* ``gpu`` / ``cpu`` / ``ssd`` / ``remote``: served from that tier (remote: fetched from another node);
  ``recomputed``: prefilled again;
* ``reused``: their sum; ``oracle``: what an infinite cache shared by all workers would reuse;
  ``pooled``: what one LRU cache of all workers' GPU + CPU + SSD capacity together, with perfect routing,
  reuses (the pooled-capacity oracle); ``of_pooled``: reused / pooled, the figure our goal is set on;
* ``available``: what the best-placed worker could have loaded at each arrival (a router that knew every
  tier and ignored load would reuse this much; available / pooled < 1 is capacity our topology loses to
  duplicates and to split pools);
* ``gap``: oracle - reused, split three ways: ``capacity_loss`` (no worker held the prefix any more:
  oracle - available), ``routing_loss`` (a worker held more of it than the one the router chose:
  available - chosen) and ``load_shortfall`` (the chosen worker held it but could not load all of it,
  e.g. no CPU slot to stage an SSD block into: chosen - reused);
* ``prefill_imbalance`` / ``decode_imbalance``: the busiest worker's recomputed prompt tokens / generated
  tokens over the mean (1.0: even), and
  ``ttft_mean_s`` / ``ttft_p90_s``: the simulated time to first token (queueing for the worker's prefill,
  then the prefill): what a router that chases cache hits may cost in hot spots.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runner import ConfigResult, Oracle

log = logging.getLogger(__name__)

SOURCES = ("gpu", "cpu", "ssd", "remote", "recomputed")
COLORS = {"gpu": "#2b8a3e", "cpu": "#1c7ed6", "ssd": "#f08c00", "remote": "#ae3ec9", "recomputed": "#ced4da"}


@dataclass(frozen=True)
class Row:
    config: str
    style: str
    shared: bool
    remote_fetch: bool
    host_weight: float
    disk_weight: float
    prefill_load_scale: float
    overlap_score_credit: float
    temperature: float
    repeats: int
    gpu: float
    cpu: float
    ssd: float
    remote: float
    recomputed: float
    reused: float
    reused_min: float
    reused_max: float
    oracle: float
    pooled: float
    of_pooled: float
    available: float  # what the best-placed worker could load, summed over requests
    gap: float
    capacity_loss: float
    routing_loss: float
    load_shortfall: float
    prefill_imbalance: float
    decode_imbalance: float
    ttft_mean_s: float
    ttft_p90_s: float
    max_requests_per_worker: int
    min_requests_per_worker: int
    wall_s: float  # mean per repeat
    sync_s: float  # of which waiting for the router to apply events
    load_errors: int  # summed over repeats: loads the cache refused with an exception (recomputed)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def imbalance(per_worker: Sequence[int]) -> float:
    """max / mean of per-worker work (1.0 when even, or when there is none)."""
    mean = statistics.fmean(per_worker) if per_worker else 0.0
    return max(per_worker) / mean if mean else 1.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] if ordered else 0.0


def summarize(runs: Sequence[ConfigResult], oracle: Oracle, pooled: Oracle) -> Row:
    """One configuration's row from its repeats."""
    if not runs:
        raise ValueError("no runs to summarize")
    cfg = runs[0].config
    fr = [r.totals.fractions() for r in runs]
    mean = {k: statistics.fmean(f[k] for f in fr) for k in SOURCES}
    reused = [r.totals.reused / r.totals.prompt for r in runs]
    available = statistics.fmean(r.totals.available / r.totals.prompt for r in runs)
    chosen = statistics.fmean(r.totals.chosen / r.totals.prompt for r in runs)
    o = oracle.totals.reused / oracle.totals.prompt
    p = pooled.totals.reused / pooled.totals.prompt
    r_mean = statistics.fmean(reused)
    k = cfg.knobs
    return Row(
        config=cfg.name, style=cfg.style.value, shared=cfg.setup.shared, remote_fetch=cfg.setup.remote,
        host_weight=k.host, disk_weight=k.disk, prefill_load_scale=k.scale, overlap_score_credit=k.credit,
        temperature=k.temperature, repeats=len(runs), gpu=mean["gpu"], cpu=mean["cpu"], ssd=mean["ssd"],
        remote=mean["remote"], recomputed=mean["recomputed"], reused=r_mean, reused_min=min(reused),
        reused_max=max(reused), oracle=o, pooled=p, of_pooled=r_mean / p if p else 1.0, available=available,
        gap=o - r_mean,
        capacity_loss=o - available, routing_loss=available - chosen, load_shortfall=chosen - r_mean,
        prefill_imbalance=statistics.fmean(imbalance(r.recomputed_per_worker) for r in runs),
        decode_imbalance=statistics.fmean(imbalance(r.decoded_per_worker) for r in runs),
        ttft_mean_s=statistics.fmean(statistics.fmean(r.ttft_ms) for r in runs) / 1000,
        ttft_p90_s=statistics.fmean(percentile(r.ttft_ms, 0.9) for r in runs) / 1000,
        max_requests_per_worker=max(max(r.requests_per_worker) for r in runs),
        min_requests_per_worker=min(min(r.requests_per_worker) for r in runs),
        wall_s=statistics.fmean(r.wall_s for r in runs), sync_s=statistics.fmean(r.sync_s for r in runs),
        load_errors=sum(r.load_errors for r in runs),
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown_table(rows: Sequence[Row]) -> str:
    """The results table: percentages of prompt tokens, wall seconds per repeat."""
    head = ("| configuration | GPU % | CPU % | SSD % | remote % | recomputed % | reused % (min-max) "
            "| of pooled oracle | best worker held, of pooled | gap to infinite pp | = capacity | + routing | + load | imbalance prefill / decode "
            "| TTFT mean / p90 s | requests/worker min-max | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.config} | {_pct(r.gpu)} | {_pct(r.cpu)} | {_pct(r.ssd)} | {_pct(r.remote)} | {_pct(r.recomputed)} "
            f"| {_pct(r.reused)} ({_pct(r.reused_min)}-{_pct(r.reused_max)}) | {r.of_pooled:.2f} | {r.available / r.pooled if r.pooled else 1.0:.2f} | {_pct(r.gap)} "
            f"| {_pct(r.capacity_loss)} | {_pct(r.routing_loss)} | {_pct(r.load_shortfall)} "
            f"| {r.prefill_imbalance:.2f} / {r.decode_imbalance:.2f} | {r.ttft_mean_s:.2f} / {r.ttft_p90_s:.2f} | {r.min_requests_per_worker}-{r.max_requests_per_worker} | {r.wall_s:.1f} |"
        )
    errors = [f"{r.config}: {r.load_errors}" for r in rows if r.load_errors]
    if errors:
        lines += ["", "Loads the cache refused with an exception (recomputed instead), over all repeats: "
                  + "; ".join(errors) + "."]
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].as_dict()))
        writer.writeheader()
        for r in rows:
            writer.writerow(r.as_dict())


def plot_sources(rows: Sequence[Row], path: Path, title: str) -> None:
    """Stacked bars: prompt tokens served from GPU, CPU and SSD per configuration (the rest of each bar's
    100% is recomputed), with the oracle's reuse marked. The axis stops a little past the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.2))
    names = [r.config for r in rows][::-1]
    left = [0.0] * len(rows)
    for src in SOURCES[:-1]:
        vals = [100 * getattr(r, src) for r in rows][::-1]
        ax.barh(names, vals, left=left, color=COLORS[src], label=f"from {src.upper()}", edgecolor="white")
        left = [a + b for a, b in zip(left, vals)]
    oracle = 100 * rows[0].oracle
    pooled = 100 * rows[0].pooled
    ax.axvline(oracle, color="black", linestyle="--", linewidth=1, label=f"oracle (infinite cache) {oracle:.1f}%")
    ax.axvline(pooled, color="black", linestyle=":", linewidth=1.2, label=f"pooled-capacity oracle {pooled:.1f}%")
    ax.axvline(0.9 * pooled, color="#c92a2a", linestyle=":", linewidth=1, label=f"0.9 of pooled {0.9 * pooled:.1f}%")
    for i, r in enumerate(rows[::-1]):
        spread = f" ({100 * r.reused_min:.1f}-{100 * r.reused_max:.1f})" if r.repeats > 1 else ""
        ax.text(100 * r.reused + 0.1, i, f"{100 * r.reused:.1f}%{spread}", va="center", fontsize=8)
    ax.set_xlim(0, oracle * 1.25)
    ax.set_xlabel("% of prompt tokens served from cache (the rest is recomputed)")
    ax.legend(ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=9, pad=40)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_reuse_over_time(runs: Sequence[ConfigResult], oracle: Oracle, pooled: Oracle, prompt_series: Sequence[int],
                         path: Path, title: str) -> None:
    """Cumulative reused fraction of prompt tokens as the trace goes on (first repeat of each config)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = range(1, len(prompt_series) + 1)

    def frac(series: Sequence[int]) -> list[float]:
        return [100 * a / max(b, 1) for a, b in zip(series, prompt_series)]

    ax.plot(x, frac(oracle.reused_series), color="black", linestyle="--", linewidth=1, label="oracle (infinite)")
    ax.plot(x, frac(pooled.reused_series), color="black", linestyle=":", linewidth=1.2, label="pooled-capacity oracle")
    for r in runs:
        ax.plot(x, frac(r.reused_series), linewidth=1.3, label=r.config.name)
    ax.set_xlabel("requests replayed")
    ax.set_ylabel("cumulative % of prompt tokens reused")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, rows: Sequence[Row], first_runs: Sequence[ConfigResult], oracle: Oracle,
                 pooled: Oracle, prompt_series: Sequence[int], meta: dict[str, Any]) -> dict[str, Path]:
    """Write results.md, results.csv, results.json, sources.png and reuse_over_time.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("results.md", "results.csv", "results.json", "sources.png",
                                           "reuse_over_time.png")}
    title = (f"{meta['trace_name']}, every {meta['every']}: {meta['requests']} requests, {meta['workers']} workers "
             f"({meta['workers_per_node']} per node), GPU/CPU/SSD {meta['gpu_blocks']}/{meta['cpu_blocks']}/"
             f"{meta['ssd_blocks']} blocks each")
    write_csv(rows, paths["results.csv"])
    paths["results.json"].write_text(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]}, indent=2))
    plot_sources(rows, paths["sources.png"], title)
    plot_reuse_over_time(first_runs, oracle, pooled, prompt_series, paths["reuse_over_time.png"], title)
    md = [f"# Trace replay: {title}", "",
          "Percent of prompt (prefill) tokens by where they came from. Oracles: infinite (every block seen "
          f"before is reusable) {_pct(rows[0].oracle)} %; pooled capacity (one LRU of all workers' GPU + CPU + SSD "
          f"blocks, {meta['pooled_blocks']:,}, perfect routing) {_pct(rows[0].pooled)} %. `of pooled oracle` = "
          "reused / pooled; `best worker held` = what the best-placed worker could load / pooled (what perfect "
          "routing would reach with this topology). Gap = infinite oracle - reuse (points), split into capacity (no worker held the "
          "prefix any more), routing (another worker held more of it than the chosen one) and load (the chosen "
          "worker held it but could not load all of it). Imbalance: the busiest worker's recomputed prompt tokens / "
          "generated tokens over the mean; TTFT: simulated (waiting for the worker's prefill queue, then prefill at "
          f"{meta['prefill_tokens_per_s']:,.0f} tokens/s). Mean of {rows[0].repeats} repeat(s); wall seconds per repeat.", "",
          markdown_table(rows), "",
          "```", json.dumps(meta, indent=2), "```", "",
          "![sources](sources.png)", "", "![reuse over time](reuse_over_time.png)", ""]
    paths["results.md"].write_text("\n".join(md))
    log.info("report written to %s", out)
    return paths
