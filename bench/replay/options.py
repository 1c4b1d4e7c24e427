"""Command-line options shared by the replay and the sweep: the simulated cluster and its load."""

from __future__ import annotations

import argparse


def add_cluster_args(ap: argparse.ArgumentParser) -> None:
    """Options shared with the sweep: the simulated cluster and its load."""
    ap.add_argument("--workers", type=int, default=4, help="simulated workers (default 4)")
    ap.add_argument("--workers-per-node", type=int, default=2,
                    help="workers sharing one node's CPU pool and SSD store in shared-node / distributed "
                         "configurations; must divide --workers (default 2: two nodes of two)")
    ap.add_argument("--gpu-blocks", type=int, default=256, help="GPU prefix cache per worker, blocks (default 256)")
    ap.add_argument("--cpu-blocks", type=int, default=1024, help="our CPU tier per worker, blocks (default 1024)")
    ap.add_argument("--ssd-blocks", type=int, default=4096, help="our SSD tier per worker, blocks; 0: none (default 4096)")
    ap.add_argument("--tpot-ms", type=float, default=20.0,
                    help="simulated decode time per output token, for the router's load view (default 20)")
    ap.add_argument("--prefill-tps", type=float, default=10_000.0,
                    help="simulated prefill speed in tokens/s of recomputed prompt (default 10000)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--log-level", default="WARNING", help="Python log level (Dynamo's: DYN_LOG, default error)")


def check_cluster_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.tpot_ms < 0 or args.prefill_tps <= 0:
        ap.error(f"--tpot-ms must be >= 0 and --prefill-tps > 0, got {args.tpot_ms} and {args.prefill_tps}")
    if args.workers < 1 or args.workers_per_node < 1 or args.workers % args.workers_per_node:
        ap.error(f"--workers-per-node ({args.workers_per_node}) must divide --workers ({args.workers}), both >= 1")
