"""Sweep Dynamo's router knobs over several traces and configurations: which defaults should we ship?

    .venv/bin/python bench/trace_replay.py sweep                  # the full sweep (hours on 2 busy cores)
    .venv/bin/python bench/trace_replay.py sweep --quick          # 300 requests per trace, a few knob sets

Knob sets (``--knobs``, see `DEFAULT_KNOBS`) are router settings as configuration suffixes (``1/1``,
``1/1:scale=2``, ``shipped``...). Each is replayed on every trace of ``--traces`` under every setup of
``--setups`` (``tier-aware``, ``shared-node``, ``distributed``...), next to the setup's blind peer (the
router told nothing about our tiers) and the pooled-capacity oracle. Traces are split in two sets: the
knobs are *chosen* on the ``tune`` set and *checked* on the ``holdout`` set (other seeds, other windows,
more load), so that a choice that only fits one trace shows up as a drop on the held-out traces.

Writes ``sweep.csv`` (one row per run), ``sweep.md`` (per knob set: mean and worst ratio to the pooled
oracle, per set and setup) and ``sweep.png`` (the ratio per knob set, one panel per setup). Trace files
it generates go to ``OUT/traces``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import multiprocessing
import statistics
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .options import add_cluster_args, check_cluster_args
from .report import imbalance
from .runner import TimeModel, oracle, parse_config, pooled_capacity, run_config
from .synth import PRESETS, with_overrides, write_trace
from .trace import TraceRequest, load_trace
from .worker import Capacity

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CONVERSATION = REPO.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
DEFAULT_OUT = REPO / "bench" / "results" / "trace_replay" / "sweep"


@dataclass(frozen=True)
class TraceSpec:
    """A trace of the sweep: a file (every-K sample from an offset) or a synthetic preset (seed, overrides)."""

    name: str
    group: str  # "tune" or "holdout"
    path: Path | None = None
    every: int = 1
    offset: int = 0
    preset: str | None = None
    seed: int = 1
    overrides: tuple[str, ...] = ()
    limit: int | None = None  # at most this many requests (the sweep's --limit may cut further)

    def load(self, out: Path, limit: int | None) -> list[TraceRequest]:
        path = self.path
        if self.preset is not None:
            spec = with_overrides(PRESETS[self.preset], list(self.overrides))
            path = write_trace(out / "traces" / f"{self.name}.jsonl", spec, self.seed)
        assert path is not None
        if self.limit is not None:
            limit = self.limit if limit is None else min(limit, self.limit)
        return load_trace(path, every=self.every, offset=self.offset, limit=limit)


#: Tune on the conversation trace and one seed of each synthetic workload; hold out other windows of the
#: conversation trace, other seeds, and the same workloads under twice the load.
TRACES = (
    TraceSpec("conversation", "tune", CONVERSATION, every=6),
    TraceSpec("chat-s1", "tune", preset="chat", seed=1),
    TraceSpec("agent-s1", "tune", preset="agent", seed=1),
    TraceSpec("rag-s1", "tune", preset="rag", seed=1),
    TraceSpec("mixed-s1", "tune", preset="mixed", seed=1),
    TraceSpec("conversation-o3", "holdout", CONVERSATION, every=6, offset=3),
    TraceSpec("conversation-e3", "holdout", CONVERSATION, every=3, offset=1, limit=2000),
    TraceSpec("agent-s2-2x", "holdout", preset="agent", seed=2, overrides=("session_rate=0.5",)),
    TraceSpec("rag-s2", "holdout", preset="rag", seed=2),
    TraceSpec("mixed-s2-2x", "holdout", preset="mixed", seed=2, overrides=("session_rate=1.0",)),
)

#: Router knob sets: Dynamo's defaults first, the host / disk weights on a grid, then the load-vs-cache
#: trade-off (prefill load scale), the GPU credit and the temperature around full tier credit.
DEFAULT_KNOBS = (
    "0.75/0.25", "0.5/0.5", "1/0.5", "1/1",
    "1/1:scale=0.5", "1/1:scale=2", "1/1:scale=4", "1/1:scale=8", "1/0.5:scale=4",
    "1/1:credit=1.5", "1/1:temp=0.1",
)
#: The reference the TTFT column compares against: Dynamo's defaults.
REFERENCE_KNOBS = "0.75/0.25"
QUICK_KNOBS = ("0.75/0.25", "1/0.5", "1/1", "1/1:scale=2")

#: Each setup and the peer a blind router gives it.
BLIND = {"tier-aware": "upstream-events", "shared-node": "shared-node-blind", "distributed": "distributed-blind"}


@dataclass
class SweepRow:
    trace: str
    group: str
    setup: str
    knobs: str  # the knob set, or "blind" for the setup's blind peer
    config: str
    requests: int
    reused: float
    pooled: float
    oracle: float
    of_pooled: float
    routing_loss: float
    remote: float
    prefill_imbalance: float
    decode_imbalance: float
    ttft_mean_s: float
    wall_s: float


#: A replay that fails (the router missing the barrier on an overloaded machine) is run again this often.
RETRIES = 2


def _run_one(job: tuple) -> SweepRow | None:
    trace, setup, knobs, config, requests, capacity, workers, wpn, time_model, pooled, best = job
    for attempt in range(RETRIES + 1):
        try:
            res = run_config(requests, parse_config(config), capacity, num_workers=workers, workers_per_node=wpn,
                             time_model=time_model, progress=False)
            break
        except (TimeoutError, RuntimeError) as exc:
            log.warning("%s on %s failed (attempt %d of %d): %s", config, trace.name, attempt + 1, RETRIES + 1, exc)
    else:
        return None
    t = res.totals
    reused = t.reused / t.prompt
    return SweepRow(trace.name, trace.group, setup, knobs, config, len(requests), reused, pooled, best,
                    reused / pooled if pooled else 1.0, (t.available - t.chosen) / t.prompt, t.remote / t.prompt,
                    imbalance(res.recomputed_per_worker), imbalance(res.decoded_per_worker),
                    statistics.fmean(res.ttft_ms) / 1000, res.wall_s)


def _init_worker(level: str) -> None:
    logging.basicConfig(level=level)


def run_sweep(traces: Sequence[TraceSpec], setups: Sequence[str], knob_sets: Sequence[str], capacity: Capacity,
              workers: int, wpn: int, time_model: TimeModel, out: Path, limit: int | None, jobs: int,
              csv_path: Path, log_level: str = "WARNING", blind: bool = True) -> list[SweepRow]:
    """Every (trace, setup, knob set) plus (``blind``) every (trace, setup)'s blind peer; rows appended to
    ``csv_path`` as they finish. Runs already in ``csv_path`` (an interrupted sweep) are not run again."""
    rows: list[SweepRow] = read_rows([csv_path]) if csv_path.exists() else []
    done_keys = {(r.trace, r.setup, r.knobs) for r in rows}
    if rows:
        print(f"resuming: {len(rows)} replays already in {csv_path}", flush=True)
    todo = []
    for trace in traces:
        requests = trace.load(out, limit)
        pooled_o = oracle(requests, capacity_blocks=pooled_capacity(capacity, workers))
        best = oracle(requests)
        pooled = pooled_o.totals.reused / pooled_o.totals.prompt
        inf = best.totals.reused / best.totals.prompt
        print(f"{trace.name} ({trace.group}): {len(requests)} requests, oracles infinite {inf:.1%} "
              f"pooled {pooled:.1%}", flush=True)
        for setup in setups:
            for knobs in (["blind"] if blind else []) + list(knob_sets):
                config = BLIND[setup] if knobs == "blind" else f"{setup}@{knobs}"
                if (trace.name, setup, knobs) in done_keys:
                    continue
                todo.append((trace, setup, knobs, config, requests, capacity, workers, wpn, time_model, pooled, inf))
    started = time.perf_counter()
    failed: list[str] = []
    new_file = not rows
    with open(csv_path, "w" if new_file else "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(SweepRow.__dataclass_fields__))
        if new_file:
            writer.writeheader()

        def done(row: SweepRow | None, job: tuple) -> None:
            if row is None:
                failed.append(f"{job[3]} on {job[0].name}")
                return
            rows.append(row)
            writer.writerow(asdict(row))
            f.flush()
            total = len(todo) + len(done_keys)
            print(f"  [{len(rows)}/{total} {time.perf_counter() - started:.0f}s] {row.trace} {row.config}: "
                  f"reused {row.reused:.1%}, {row.of_pooled:.3f} of pooled, routing loss {row.routing_loss:.1%}",
                  flush=True)

        if jobs > 1:
            # Fresh processes (spawn): Dynamo's runtime must not inherit a forked copy of another's state.
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                     initargs=(log_level,)) as pool:
                for row, job in zip(pool.map(_run_one, todo), todo):
                    done(row, job)
        else:
            for job in todo:
                done(_run_one(job), job)
    if failed:
        print(f"failed after {RETRIES + 1} attempts ({len(failed)}): {'; '.join(failed)}; run the same command "
              "again to retry them", flush=True)
    return rows


def read_rows(paths: Sequence[Path]) -> list[SweepRow]:
    """Rows of earlier sweeps' CSV files; a later row replaces an earlier one of the same (trace, setup, knobs)."""
    kinds = {"int": int, "float": float, "str": str}  # the field annotations, as strings
    fields = {name: kinds[f.type] for name, f in SweepRow.__dataclass_fields__.items()}
    merged: dict[tuple[str, str, str], SweepRow] = {}
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for rec in csv.DictReader(f):
                row = SweepRow(**{name: kind(rec[name]) for name, kind in fields.items()})
                merged[(row.trace, row.setup, row.knobs)] = row
    return list(merged.values())


def summary(rows: Sequence[SweepRow]) -> list[dict]:
    """Per (setup, knob set): mean and worst ratio to the pooled oracle on each trace group, the smallest
    margin over the blind peer on the same trace, and the mean TTFT relative to Dynamo's defaults."""
    blind = {(r.trace, r.setup): r.of_pooled for r in rows if r.knobs == "blind"}
    ref_ttft = {(r.trace, r.setup): r.ttft_mean_s for r in rows if r.knobs == REFERENCE_KNOBS}
    groups: dict[tuple[str, str], list[SweepRow]] = defaultdict(list)
    for r in rows:
        groups[(r.setup, r.knobs)].append(r)
    out = []
    for (setup, knobs), rs in groups.items():
        entry: dict = {"setup": setup, "knobs": knobs}
        for group in ("tune", "holdout"):
            g = [r for r in rs if r.group == group]
            if g:
                entry[f"{group}_mean"] = statistics.fmean(r.of_pooled for r in g)
                entry[f"{group}_min"] = min(r.of_pooled for r in g)
                entry[f"{group}_over_blind"] = min(r.of_pooled - blind.get((r.trace, setup), 0.0) for r in g)
        entry["imbalance"] = statistics.fmean(r.prefill_imbalance for r in rs)
        entry["decode_imbalance"] = statistics.fmean(r.decode_imbalance for r in rs)
        ratios = [r.ttft_mean_s / ref_ttft[(r.trace, setup)] for r in rs if ref_ttft.get((r.trace, setup))]
        entry["ttft_vs_reference"] = statistics.fmean(ratios) if ratios else float("nan")
        out.append(entry)
    return out


def markdown(rows: Sequence[SweepRow], meta: dict) -> str:
    lines = [f"# Router knob sweep ({meta['command']})", "",
             f"{meta['workers']} workers ({meta['workers_per_node']} per node), GPU/CPU/SSD {meta['capacity']} "
             f"blocks each; {meta['runs']} replays ({sum(r.wall_s for r in rows) / 60:.0f} min of replay). Figures: "
             "reuse as a "
             "fraction of the pooled-capacity oracle's (mean and worst over each trace group); `over blind`: "
             "the smallest margin over the same setup with a router told nothing of our tiers; TTFT: simulated "
             f"mean time to first token over Dynamo's defaults' ({REFERENCE_KNOBS}) on the same trace and setup.",
             "", "| setup | knobs | tune mean | tune worst | holdout mean | holdout worst | over blind (worst) "
             "| imbalance prefill / decode | TTFT vs defaults |", "|---|---|---|---|---|---|---|---|---|"]
    for e in summary(rows):
        lines.append(f"| {e['setup']} | {e['knobs']} | {e.get('tune_mean', float('nan')):.3f} "
                     f"| {e.get('tune_min', float('nan')):.3f} | {e.get('holdout_mean', float('nan')):.3f} "
                     f"| {e.get('holdout_min', float('nan')):.3f} "
                     f"| {min(e.get('tune_over_blind', 9), e.get('holdout_over_blind', 9)):+.3f} "
                     f"| {e['imbalance']:.2f} / {e['decode_imbalance']:.2f} | {e['ttft_vs_reference']:.2f} |")
    lines += ["", "Per trace (reuse % of prompt tokens / fraction of the pooled oracle):", ""]
    traces = list(dict.fromkeys(r.trace for r in rows))
    lines.append("| setup | knobs | " + " | ".join(traces) + " |")
    lines.append("|---|---|" + "---|" * len(traces))
    cell = {(r.setup, r.knobs, r.trace): r for r in rows}
    for setup in dict.fromkeys(r.setup for r in rows):
        for knobs in dict.fromkeys(r.knobs for r in rows):
            vals = [cell.get((setup, knobs, t)) for t in traces]
            lines.append(f"| {setup} | {knobs} | " + " | ".join(
                f"{100 * v.reused:.1f} / {v.of_pooled:.2f}" if v else "" for v in vals) + " |")
    pooled = {r.trace: (r.pooled, r.oracle) for r in rows}
    lines += ["", "Oracles (% of prompt tokens, pooled / infinite): " + "; ".join(
        f"{t} {100 * p:.1f} / {100 * o:.1f}" for t, (p, o) in pooled.items()), ""]
    return "\n".join(lines)


def plot(rows: Sequence[SweepRow], path: Path, title: str) -> None:
    """One panel per setup: the ratio to the pooled oracle per knob set, a line per trace (solid: tune,
    dashed: holdout), the blind router's as the first point, and the 0.9 goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(dict.fromkeys(r.setup for r in rows))
    knobs = list(dict.fromkeys(r.knobs for r in rows))
    traces = list(dict.fromkeys(r.trace for r in rows))
    cell = {(r.setup, r.knobs, r.trace): r for r in rows}
    fig, axes = plt.subplots(len(setups), 1, figsize=(max(8, 0.55 * len(knobs) + 3), 3.3 * len(setups)),
                             sharex=True, squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, setup in zip(axes[:, 0], setups):
        for i, t in enumerate(traces):
            ys = [cell[(setup, k, t)].of_pooled if (setup, k, t) in cell else float("nan") for k in knobs]
            group = next(r.group for r in rows if r.trace == t)
            ax.plot(range(len(knobs)), ys, marker="o", markersize=3, linewidth=1.2, color=colors(i % 10),
                    linestyle="-" if group == "tune" else "--", label=f"{t} ({group})")
        ax.axhline(0.9, color="#c92a2a", linestyle=":", linewidth=1)
        ax.set_ylabel(f"{setup}\nreuse / pooled oracle")
        ax.grid(alpha=0.3)
        ax.set_ylim(top=1.02)
    axes[-1, 0].set_xticks(range(len(knobs)), knobs, rotation=45, ha="right", fontsize=8)
    axes[-1, 0].set_xlabel("router knobs (host/disk weights, then :scale= prefill load scale, :credit= GPU "
                           "overlap credit, :temp= temperature); 'blind': router told nothing of our tiers")
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                      title="trace (set)", title_fontsize=7)
    fig.suptitle("\n".join(textwrap.wrap(title, 100)), fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trace_replay.py sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cluster_args(ap)
    ap.add_argument("--traces", default=",".join(t.name for t in TRACES),
                    help="comma-separated trace names (default: all of %(default)s)")
    ap.add_argument("--setups", default="tier-aware,shared-node,distributed",
                    help=f"comma-separated, of {', '.join(BLIND)} (default: %(default)s)")
    ap.add_argument("--knobs", default=None, help="comma-separated knob sets (default: a grid of 16, see sweep.py)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many requests per trace")
    ap.add_argument("--quick", action="store_true", help="300 requests per trace, 4 knob sets")
    ap.add_argument("--no-blind", action="store_true", help="skip the blind peers (a sweep that adds knob sets)")
    ap.add_argument("--jobs", type=int, default=1, help="replays in parallel (processes; default 1)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    ap.add_argument("--from", dest="sources", type=Path, nargs="+", default=None, metavar="CSV",
                    help="replay nothing: write sweep.md and sweep.png of the rows of these sweep.csv files "
                         "(several sweeps combined; a later row replaces an earlier one of the same trace, "
                         "setup and knobs)")
    args = ap.parse_args(argv)
    check_cluster_args(ap, args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    by_name = {t.name: t for t in TRACES}
    try:
        traces = [by_name[n] for n in args.traces.split(",") if n]
    except KeyError as exc:
        ap.error(f"unknown trace {exc}: one of {', '.join(by_name)}")
    setups = [s for s in args.setups.split(",") if s]
    if bad := [s for s in setups if s not in BLIND]:
        ap.error(f"unknown setup {bad[0]!r}: one of {', '.join(BLIND)}")
    knob_sets = args.knobs.split(",") if args.knobs else list(QUICK_KNOBS if args.quick else DEFAULT_KNOBS)
    for k in knob_sets:
        try:
            parse_config(f"tier-aware@{k}")
        except ValueError as exc:
            ap.error(str(exc))
    limit = 300 if args.quick and args.limit is None else args.limit
    capacity = Capacity(args.gpu_blocks, args.cpu_blocks, args.ssd_blocks)
    time_model = TimeModel(prefill_tokens_per_s=args.prefill_tps, tpot_ms=args.tpot_ms)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.sources:
        rows = read_rows(args.sources)
    else:
        rows = run_sweep(traces, setups, knob_sets, capacity, args.workers, args.workers_per_node, time_model,
                         args.out, limit, args.jobs, args.out / "sweep.csv", args.log_level.upper(),
                         blind=not args.no_blind)
    command = " ".join(["bench/trace_replay.py sweep", *(sys.argv[2:] if argv is None else argv)])
    meta = {"command": command,
            "workers": args.workers, "workers_per_node": args.workers_per_node,
            "capacity": f"{args.gpu_blocks}/{args.cpu_blocks}/{args.ssd_blocks}", "runs": len(rows),
            "wall_s": time.perf_counter() - started}
    (args.out / "sweep.md").write_text(markdown(rows, meta))
    plot(rows, args.out / "sweep.png", f"{meta['command']}: {meta['workers']} workers ({meta['workers_per_node']} "
         f"per node), GPU/CPU/SSD {meta['capacity']} blocks each")
    print((args.out / "sweep.md").read_text())
    if args.sources:
        print(f"sweep report of {len(rows)} replays: {args.out}/sweep.md, {args.out}/sweep.png")
    else:
        print(f"sweep: {len(rows)} replays in {meta['wall_s'] / 60:.1f} min; {args.out}/sweep.{{md,csv,png}}")
    return 0
