"""Benchmark: worker-side block copies between an engine KV cache and the shared CPU pool (CPU engine).

For each case (a block layout) and each access pattern, N engine blocks are stored into N pool slots
(``to_pool``) and loaded back (``from_pool``), moving at least ``--gib`` GiB per direction. In the same
run, interleaved with those, a single large torch ``copy_`` and a numpy ``copyto`` of the same number of
bytes give the machine's reference bandwidth; the ratio (per round, median over rounds) says how close the
copier gets to a plain memcpy of the same volume.

    .venv/bin/python bench/bench_cpu_tier.py                   # both cases, ~1 GiB per direction
    .venv/bin/python bench/bench_cpu_tier.py --json out.json --rounds 5

The engine cache mimics vLLM: one ``(2, num_blocks, block_size, heads, head_dim)`` tensor per layer, whose
``[0]`` and ``[1]`` are the K and V planes. Data sets are larger than the last-level cache on purpose.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flexkv_core.layout import KVLayout
from flexkv_core.tiers.cpu import CpuPool
from flexkv_core.transfer import BlockCopier

GiB = 2**30

#: name -> (layers, block_size, kv_heads, head_dim, dtype)
CASES = {
    # An 8-KV-head, 128-dim model (Llama-3-8B-like), 16-token blocks: 32 KiB planes, 2 MiB per block.
    "realistic": (32, 16, 8, 128, "bfloat16"),
    # One KV head per rank (e.g. 8 KV heads at TP 8): 4 KiB planes, 256 KiB per block.
    "small-plane": (32, 16, 1, 128, "bfloat16"),
}
PATTERNS = ("scattered", "contiguous")


@dataclass
class Row:
    case: str
    pattern: str
    direction: str
    plane_kib: float
    block_mib: float
    blocks: int
    gib: float
    best_gibs: float
    median_gibs: float
    torch_copy_gibs: float  # median of the reference big copy_, same rounds
    numpy_copy_gibs: float
    ratio: float  # median over rounds of (this / torch copy_ of the same round)
    ratio_numpy: float  # the same against numpy copyto (single-threaded, steadier when cores are shared)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_case(name: str, pattern: str, gib: float, rounds: int, rng: np.random.Generator) -> list[Row]:
    layers, block_size, heads, head_dim, dtype = CASES[name]
    layout = KVLayout(num_layers=layers, block_size=block_size, num_kv_heads=heads, head_dim=head_dim,
                      dtype=dtype)
    n = -(-int(gib * GiB) // layout.rank_bytes)  # blocks moved per direction
    capacity = n + n // 4  # engine blocks and pool slots: room so that scattered ids really scatter
    tdtype = getattr(torch, dtype)
    kv = [torch.empty((2, capacity, block_size, heads, head_dim), dtype=tdtype) for _ in range(layers)]
    for i, t in enumerate(kv):  # distinct, cheap content (touches every page before timing)
        t.view(torch.int16).copy_(torch.arange(t.numel(), dtype=torch.int32).add_(i).to(torch.int16).view(t.shape))
    planes = [t[k] for t in kv for k in range(2)]
    nbytes = n * layout.rank_bytes

    if pattern == "scattered":
        blocks = rng.permutation(capacity)[:n]
        slots = rng.permutation(capacity)[:n]
    else:
        blocks = np.arange(n)
        slots = np.arange(n)
    big_src = torch.ones(nbytes, dtype=torch.uint8)
    big_dst = torch.zeros(nbytes, dtype=torch.uint8)

    with CpuPool.create(capacity, layout.slot_bytes) as pool:
        pool.prefault()
        pool.tensor()[:, : layout.rank_bytes].fill_(0)  # first touch outside the timings
        copier = BlockCopier(pool, layout, 0, planes)
        loaded = [torch.zeros_like(t) for t in kv]
        load_copier = BlockCopier(pool, layout, 0, [t[k] for t in loaded for k in range(2)])
        times: dict[str, list[float]] = {"store": [], "load": [], "torch": [], "numpy": []}
        for _ in tqdm(range(rounds), desc=f"{name}/{pattern}", leave=False, file=sys.stderr):
            times["torch"].append(_timed(lambda: big_dst.copy_(big_src)))
            times["store"].append(_timed(lambda: copier.to_pool(blocks, slots).wait()))
            times["numpy"].append(_timed(lambda: np.copyto(big_dst.numpy(), big_src.numpy())))
            times["load"].append(_timed(lambda: load_copier.from_pool(slots, blocks).wait()))
        for t, back in zip(kv, loaded, strict=True):  # honesty check: the round trip restored the bytes
            idx = torch.from_numpy(blocks)
            if not torch.equal(t[:, idx].view(torch.int16), back[:, idx].view(torch.int16)):  # bytes, not NaNs
                raise AssertionError(f"{name}/{pattern}: round trip changed bytes")

    def gibs(ts: list[float]) -> list[float]:
        return [nbytes / t / GiB for t in ts]

    rows = []
    for direction, key in (("store", "store"), ("load", "load")):
        ratios = [r / ref for r, ref in zip(gibs(times[key]), gibs(times["torch"]), strict=True)]
        ratios_np = [r / ref for r, ref in zip(gibs(times[key]), gibs(times["numpy"]), strict=True)]
        rows.append(Row(name, pattern, direction, layout.plane_bytes / 1024, layout.rank_bytes / 2**20, n,
                        nbytes / GiB, max(gibs(times[key])), statistics.median(gibs(times[key])),
                        statistics.median(gibs(times["torch"])), statistics.median(gibs(times["numpy"])),
                        statistics.median(ratios), statistics.median(ratios_np)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=[*CASES, "all"], default="all")
    ap.add_argument("--pattern", choices=[*PATTERNS, "all"], default="all")
    ap.add_argument("--gib", type=float, default=1.0, help="GiB moved per direction and round (default 1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    cases = list(CASES) if args.case == "all" else [args.case]
    patterns = list(PATTERNS) if args.pattern == "all" else [args.pattern]

    rows: list[Row] = []
    for case in cases:
        for pattern in patterns:
            rows.extend(run_case(case, pattern, args.gib, args.rounds, rng))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, "
          f"{args.gib} GiB per direction. GiB/s: copier best and median, references median; "
          "ratio = median over rounds of copier / torch copy_ (vs np: / numpy copyto) of the same round")
    hdr = (f"{'case':<12} {'pattern':<11} {'dir':<5} {'plane':>7} {'block':>8} {'blocks':>6} "
           f"{'best':>6} {'median':>6} {'copy_':>6} {'numpy':>6} {'ratio':>6} {'vs np':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r.case:<12} {r.pattern:<11} {r.direction:<5} {r.plane_kib:>5.0f}Ki {r.block_mib:>6.2f}Mi "
              f"{r.blocks:>6} {r.best_gibs:>6.2f} {r.median_gibs:>6.2f} {r.torch_copy_gibs:>6.2f} "
              f"{r.numpy_copy_gibs:>6.2f} {r.ratio:>6.2f} {r.ratio_numpy:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "rows": [r.__dict__ for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
