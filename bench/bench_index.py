"""Prefix index at scale: inserts and lookups per second with N resident blocks, and bytes per block.

    .venv/bin/python bench/bench_index.py --blocks 1000000 [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
import tracemalloc

from tqdm import tqdm

from flexkv_core.config import EvictionPolicy
from flexkv_core.events import EventLog
from flexkv_core.index import PrefixIndex
from flexkv_core.layout import Tier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--block-size", type=int, default=16, help="tokens per block (stored for Stored events)")
    ap.add_argument("--chain", type=int, default=64, help="blocks per prompt chain")
    ap.add_argument("--lookups", type=int, default=20_000, help="chains looked up")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    n, bs, chain = args.blocks, args.block_size, args.chain
    tokens = bytes(4 * bs)
    rng = random.Random(0)
    hashes = [rng.getrandbits(63) for _ in range(n)]

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = PrefixIndex({Tier.CPU: n, Tier.SSD: 0}, block_size=bs, events=EventLog(enabled=False),
                        policy=EvictionPolicy.LRU)
    t0 = time.perf_counter()
    for start in tqdm(range(0, n, chain), desc="insert", unit="chain", mininterval=1):
        parent = None
        run = hashes[start:start + chain]
        for slot, h in enumerate(run, start):
            index.begin_fill(Tier.CPU, h, slot, parent=parent, tokens=tokens)
            parent = h
        index.finish_fill(Tier.CPU, run)
    insert_s = time.perf_counter() - t0
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()

    starts = [rng.randrange(0, n // chain) * chain for _ in range(args.lookups)]
    t0 = time.perf_counter()
    hit_blocks = 0
    for s in starts:
        hit_blocks += index.lookup(hashes[s:s + chain]).total
    lookup_s = time.perf_counter() - t0
    assert hit_blocks == args.lookups * chain

    t0 = time.perf_counter()
    victims = index.eviction_candidates(Tier.CPU, 10_000)
    index.remove(Tier.CPU, [b.hash for b in victims])
    evict_s = time.perf_counter() - t0

    res = {
        "resident_blocks": len(index),
        "inserts_per_s": n / insert_s,
        "lookup_chains_per_s": args.lookups / lookup_s,
        "lookup_blocks_per_s": hit_blocks / lookup_s,
        "evictions_per_s": len(victims) / evict_s,
        "bytes_per_block": used / n,
        "token_bytes_per_block": 4 * bs,
        "overhead_bytes_per_block": used / n - 4 * bs,
    }
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:<{width}}  {v:,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
