"""Replay a Mooncake trace through the real Dynamo KV router against simulated workers with our real tiers.

    .venv/bin/python bench/trace_replay.py                       # conversation trace, every 6th request
    .venv/bin/python bench/trace_replay.py --every 1 --repeats 1 # all 12,031 requests
    .venv/bin/python bench/trace_replay.py --limit 300 --configs no-offload,tier-aware --out /tmp/replay
    .venv/bin/python bench/trace_replay.py synth --help          # synthetic Mooncake-format traces
    .venv/bin/python bench/trace_replay.py sweep --help          # sweep the router's knobs over traces

No model runs: each worker is a GPU prefix cache (LRU of --gpu-blocks blocks) and reads a real flexkv_core
TieredCache (--cpu-blocks, --ssd-blocks per worker, SSD files in a temp dir), its own or its node's; the
router is Dynamo 1.6.1's KvRouter fed by the KV events the workers publish. Reports, per configuration,
where prompt tokens came from (GPU, CPU, SSD, another node, recomputed), the gap to an oracle with an
infinite shared cache, and the ratio to a pooled-capacity oracle (one LRU of all workers' GPU + CPU + SSD
blocks, perfect routing). See bench/replay/__init__.py for the replay's exact semantics, and
bench/README.md for results.

Configurations (--configs, comma-separated): NAME, NAME@HOST/DISK or NAME@shipped, then optionally
:KEY=VALUE router knobs (scale: --router-prefill-load-scale, credit: --router-kv-overlap-score-credit,
temp: --router-temperature; host, disk). Knobs not given are Dynamo's defaults (host/disk 0.75/0.25);
@shipped takes our deployments' defaults (deploy/lib.sh). NAME one of:
  no-offload         workers have only the GPU cache
  upstream-events    own tiers per worker, announced as upstream FlexKV does: the router drops them
  tier-aware         own tiers per worker, announced with flexkv_dynamo.kv_events (CPU_PINNED / DISK)
  shared-node-blind  one CPU pool + SSD store per node (--workers-per-node), the router told nothing
  shared-node        one CPU pool + SSD store per node, every worker of the node announces it as its own
  distributed-blind  shared-node-blind, and a node fetches what other nodes hold (Redis + Mooncake path)
  distributed        shared-node, and a node fetches what other nodes hold (then announces it as CPU)
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from pathlib import Path

from replay.options import add_cluster_args, check_cluster_args
from replay.report import summarize, write_report
from replay.router import SHIPPED_KNOBS
from replay.runner import (
    DEFAULT_CONFIGS,
    TimeModel,
    node_groups,
    oracle,
    parse_config,
    pooled_capacity,
    run_config,
)
from replay.trace import MOONCAKE_BLOCK_TOKENS, load_trace
from replay.worker import Capacity, EventStyle

log = logging.getLogger("trace_replay")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = REPO.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
DEFAULT_OUT = REPO / "bench" / "results" / "trace_replay"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake-format JSONL (default: %(default)s)")
    ap.add_argument("--every", type=int, default=6, help="keep every K-th request, the published method (default 6)")
    ap.add_argument("--offset", type=int, default=0, help="start the every-K sample at this line (0..K-1, default 0)")
    ap.add_argument("--limit", type=int, default=None, help="replay at most this many requests (after --every)")
    add_cluster_args(ap)
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help="comma-separated NAME[@HOST/DISK|@shipped][:KEY=VALUE...] (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs per configuration; the router breaks ties at random (default 3)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report directory (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    check_cluster_args(ap, args)
    if not args.trace.is_file():
        ap.error(f"trace {args.trace} not found: pass --trace PATH to a Mooncake-format JSONL file")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("sweep", "synth"):
        if argv[0] == "sweep":
            from replay.sweep import main as sweep_main

            return sweep_main(argv[1:])
        from replay.synth import main as synth_main

        return synth_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
        if not configs:
            raise ValueError("--configs names no configuration")
        capacity = Capacity(args.gpu_blocks, args.cpu_blocks, args.ssd_blocks)
        tiered = [c.name for c in configs if c.style is not EventStyle.NONE]
        if tiered and not capacity.cpu_blocks:
            raise ValueError(f"configurations {', '.join(tiered)} need our tiers: --cpu-blocks must be >= 1")
        for c in configs:
            node_groups(args.workers, args.workers_per_node, c.setup)
        requests = load_trace(args.trace, every=args.every, limit=args.limit, offset=args.offset)
    except ValueError as exc:
        print(f"trace_replay: {exc}", file=sys.stderr)
        return 2
    if not requests:
        print(f"trace_replay: no requests in {args.trace}", file=sys.stderr)
        return 2
    time_model = TimeModel(prefill_tokens_per_s=args.prefill_tps, tpot_ms=args.tpot_ms)
    bs = MOONCAKE_BLOCK_TOKENS
    print(f"{len(requests)} requests from {args.trace} (every {args.every} from {args.offset}), {args.workers} "
          f"workers ({args.workers_per_node} per node), GPU/CPU/SSD {args.gpu_blocks}/{args.cpu_blocks}/"
          f"{args.ssd_blocks} blocks of {bs} tokens each")

    best = oracle(requests, bs)
    pooled = oracle(requests, bs, pooled_capacity(capacity, args.workers))
    print(f"  oracles: infinite {best.totals.reused / best.totals.prompt:.1%}, pooled capacity "
          f"({pooled.capacity_blocks:,} blocks) {pooled.totals.reused / pooled.totals.prompt:.1%}", flush=True)
    rows, first_runs = [], []
    started = time.perf_counter()
    for cfg in configs:
        runs = []
        for rep in range(args.repeats):
            run = run_config(requests, cfg, capacity, num_workers=args.workers,
                             workers_per_node=args.workers_per_node, time_model=time_model,
                             progress=not args.no_progress, block_size=bs)
            runs.append(run)
            f = run.totals.fractions()
            print(f"  {cfg.name} #{rep + 1}: GPU {f['gpu']:.1%} CPU {f['cpu']:.1%} SSD {f['ssd']:.1%} "
                  f"remote {f['remote']:.1%} recomputed {f['recomputed']:.1%} in {run.wall_s:.1f}s", flush=True)
        rows.append(summarize(runs, best, pooled))
        first_runs.append(runs[0])
    meta = {
        "trace": str(args.trace), "trace_name": args.trace.name, "every": args.every, "offset": args.offset,
        "limit": args.limit, "requests": len(requests), "prompt_tokens": best.totals.prompt,
        "workers": args.workers, "workers_per_node": args.workers_per_node, "block_tokens": bs,
        "gpu_blocks": args.gpu_blocks, "cpu_blocks": args.cpu_blocks, "ssd_blocks": args.ssd_blocks,
        "pooled_blocks": pooled.capacity_blocks, "repeats": args.repeats, "tpot_ms": args.tpot_ms,
        "prefill_tokens_per_s": args.prefill_tps, "shipped_router_knobs": SHIPPED_KNOBS.frontend_args(),
        "total_wall_s": round(time.perf_counter() - started, 1),
        "command": " ".join(["bench/trace_replay.py", *argv]),
    }
    prompt_series = list(itertools.accumulate(r.input_length for r in requests))
    paths = write_report(args.out, rows, first_runs, best, pooled, prompt_series, meta)
    print(paths["results.md"].read_text().split("\n```")[0])
    print(f"report: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
