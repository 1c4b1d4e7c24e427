"""Prefix index at scale: memory per resident block (RSS growth), inserts, lookups and evictions per second,
against the previous index (one Python object per block, `bench/index_v1.py`) measured in the same run.

    .venv/bin/python bench/bench_index.py --blocks 10000000          # peer at min(blocks, --peer-blocks)
    .venv/bin/python bench/bench_index.py --quick                    # 200k blocks, under a minute
    .venv/bin/python bench/bench_index.py --blocks 1000000 --lock    # + longest cache-lock hold per operation

Method. N blocks are inserted in chains of ``--chain`` (per chain what a store does: `begin_fill` then
`finish_fill`) into an index whose CPU capacity is N. Memory is the growth of the process's resident set
(``/proc/self/statm``) from before the index is created to after the inserts, divided by N: everything the
index costs, as the OS sees it. Each implementation runs in a fresh process (freed memory of one must not
hide the other's). Lookups ask for random whole chains; evictions take victims in batches of 4,096 as an
eviction round does, until ``--evictions`` blocks are gone. Rates are per second of the process's CPU time
(the machine may be shared; wall-clock rates are in the JSON too). Token ids: the old index kept them per
block (``--block-size`` tokens, counted in its bytes); the new one keeps none (the cache keeps
``4 * block_size`` bytes per CPU slot and the SSD manifest per SSD slot), shown as its own line.

``--lock`` adds how long each operation holds the cache's lock while a `TieredCache` holds ``--lock-blocks``
blocks in its CPU tier (slot bytes never touched) with a 16k-slot SSD tier: while anyone holds that lock the
scheduler thread waits. Rounds of lookups, loads, exports, stores (evicting, with write-back) and checksums,
then SSD staging of 200 chains, then the whole re-announcement and distributed-index snapshot walks.
Per operation: the holding thread's CPU time per hold (max and p99: the work done under the lock) and the
wall time (p99 and max: on a shared machine it adds preemption while holding).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
from tqdm import tqdm

from flexkv_core.config import EvictionPolicy
from flexkv_core.layout import Tier

PAGE = os.sysconf("SC_PAGE_SIZE")
HERE = os.path.dirname(os.path.abspath(__file__))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Clock:
    """CPU and wall time of one phase."""

    def __enter__(self) -> Clock:
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.cpu
        self.wall = time.perf_counter() - self.wall


class V2:
    """The index of this checkout (flexkv_core.index)."""

    def __init__(self, n: int, policy: EvictionPolicy, block_size: int) -> None:
        from flexkv_core.index import PrefixIndex

        self.index = PrefixIndex({Tier.CPU: n, Tier.SSD: 0}, policy=policy)

    def insert(self, run: list[int], first_slot: int) -> None:
        rows = self.index.begin_fill(Tier.CPU, run, range(first_slot, first_slot + len(run)), [None, *run[:-1]])
        self.index.finish_fill(Tier.CPU, rows)

    def lookup(self, run: list[int]) -> int:
        return self.index.lookup(run).total

    def evict(self, k: int) -> int:
        victims = self.index.pop_victims(Tier.CPU, k)
        self.index.remove(Tier.CPU, victims)
        return len(victims)


class V1:
    """The previous index (bench/index_v1.py): one object per block, tokens included."""

    def __init__(self, n: int, policy: EvictionPolicy, block_size: int) -> None:
        sys.path.insert(0, HERE)
        from index_v1 import PrefixIndex

        from flexkv_core.events import EventLog

        self.tokens = bytes(4 * block_size)
        self.index = PrefixIndex({Tier.CPU: n, Tier.SSD: 0}, block_size=block_size, events=EventLog(enabled=False),
                                 policy=policy)

    def insert(self, run: list[int], first_slot: int) -> None:
        parent = None
        for slot, h in enumerate(run, first_slot):
            self.index.begin_fill(Tier.CPU, h, slot, parent=parent, tokens=self.tokens)
            parent = h
        self.index.finish_fill(Tier.CPU, run)

    def lookup(self, run: list[int]) -> int:
        return self.index.lookup(run).total

    def evict(self, k: int) -> int:
        victims = self.index.eviction_candidates(Tier.CPU, k)
        self.index.remove(Tier.CPU, [b.hash for b in victims])
        return len(victims)


def bench_one(impl: str, n: int, chain: int, lookups: int, evictions: int, policy: EvictionPolicy,
              block_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, size=n, dtype=np.uint64).tolist()  # Python ints, as the engine gives them
    pyrng = random.Random(seed)
    starts = [pyrng.randrange(0, n // chain) * chain for _ in range(lookups)]
    queries = [hashes[s:s + chain] for s in starts]
    gc.collect()
    base = rss_bytes()
    index = (V2 if impl == "v2" else V1)(n, policy, block_size)
    with Clock() as ins:
        for start in tqdm(range(0, n, chain), desc=f"{impl} insert", unit="chain", mininterval=2, disable=None,
                          file=sys.stderr):
            index.insert(hashes[start:start + chain], start)
    used = rss_bytes() - base
    with Clock() as look:
        found = sum(index.lookup(q) for q in queries)
    assert found == lookups * chain, found
    evictions = min(evictions, n)
    evicted = 0
    with Clock() as ev:
        while evicted < evictions:
            k = index.evict(min(4096, evictions - evicted))
            if not k:
                break
            evicted += k
    return {
        "impl": impl, "policy": policy.value, "resident_blocks": n, "bytes_per_block": used / n,
        "inserts_per_s": n / ins.cpu, "lookup_blocks_per_s": found / look.cpu, "evictions_per_s": evicted / ev.cpu,
        "wall_inserts_per_s": n / ins.wall, "wall_lookup_blocks_per_s": found / look.wall,
        "wall_evictions_per_s": evicted / ev.wall, "evicted": evicted,
    }


def run_in_child(impl: str, n: int, args: argparse.Namespace) -> dict:
    """One implementation in a fresh process (so that neither sees the other's freed memory)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--blocks", str(n), "--chain", str(args.chain),
           "--lookups", str(args.lookups), "--evictions", str(args.evictions), "--policy", args.policy,
           "--block-size", str(args.block_size)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_lock(n: int, seconds: float) -> dict:
    """How long each operation holds the cache's lock, with ``n`` blocks resident (see the module docstring)."""
    import tempfile
    import threading

    from flexkv_core.cache import TieredCache
    from flexkv_core.config import FlexKVConfig
    from flexkv_core.layout import CacheIdentity, KVLayout

    layout = KVLayout(num_layers=1, block_size=16, num_kv_heads=1, head_dim=128, dtype="float16")
    slot = layout.slot_bytes
    ssd_dir = tempfile.mkdtemp(prefix="flexkv-bench-lock-")
    cfg = FlexKVConfig(cpu_cache_gb=n * slot / 2**30, ssd_cache_gb=16384 * slot / 2**30, ssd_cache_dir=(ssd_dir,),
                       enable_metrics=False, evict_ratio=1e-9)  # evict just what is needed
    holds: dict[str, list[tuple[float, float]]] = {}  # op -> (wall, thread CPU) seconds of each hold
    lock = threading.RLock()
    state = threading.local()

    class TimedLock:
        """The cache's lock, timing each outermost hold under the name of the operation that took it."""

        def __enter__(self) -> TimedLock:
            self.acquire()
            return self

        def __exit__(self, *exc: object) -> None:
            self.release()

        def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
            got = lock.acquire(blocking, timeout)
            if got:
                state.depth = getattr(state, "depth", 0) + 1
                if state.depth == 1:
                    state.t0, state.c0 = time.perf_counter(), time.thread_time()
            return got

        def release(self) -> None:
            state.depth -= 1
            if state.depth == 0:
                name = getattr(state, "op", None) or threading.current_thread().name
                if name.startswith("flexkv-ssd-io"):
                    name = "SSD completions (I/O threads)"
                holds.setdefault(name, []).append((time.perf_counter() - state.t0, time.thread_time() - state.c0))
            lock.release()

    cache = TieredCache(cfg, CacheIdentity(model="bench-lock", layout=layout), pool_name=f"flexkv-bench-{os.getpid()}",
                        lock=TimedLock())
    bs = layout.block_size
    rng = np.random.default_rng(1)

    def timed(op: str, fn, *args, **kw):
        state.op = op
        try:
            return fn(*args, **kw)
        finally:
            state.op = None

    def new_chain() -> tuple[list[int], np.ndarray]:
        return rng.integers(0, 2**63, size=64, dtype=np.uint64).tolist(), np.zeros(64 * bs, np.uint32)

    try:
        cache.placement.has_ssd = False  # the fill writes nothing to disk; the measured rounds do
        chains = []
        for _ in tqdm(range(n // 64), desc="fill cache", unit="chain", mininterval=2, disable=None, file=sys.stderr):
            hashes, tokens = new_chain()
            cache.complete_store(cache.reserve_store(hashes, None, tokens))
            chains.append(hashes)
        chains = chains[-1000:]
        cache.placement.has_ssd = True
        holds.clear()
        deadline = time.perf_counter() + seconds
        rounds, recent = 0, []
        while time.perf_counter() < deadline:
            hashes = chains[rounds % len(chains)]
            timed("stats", cache.stats)
            timed("lookup", cache.lookup, hashes)
            plan = timed("prepare_load", cache.prepare_load, hashes)
            timed("finish_load", cache.finish_load, plan)
            grant = timed("export", cache.export, hashes, checksums=False)
            timed("release_export", cache.release_export, grant["job"])
            fresh, tokens = new_chain()
            plan = timed("reserve_store (evicts)", cache.reserve_store, fresh, None, tokens)
            timed("complete_store (+ write-back)", cache.complete_store, plan)
            timed("remember_checksums", cache.remember_checksums, fresh[:32])
            recent.append(fresh)
            rounds += 1
        cache.flush(timeout=120)
        state.op = "evict_all CPU (per chunk)"
        cache.evict_all(Tier.CPU)
        state.op = None
        for hashes in recent[-200:]:  # now on SSD only: loads stage them back
            plan = timed("prepare_load (staging)", cache.prepare_load, hashes)
            plan.ready.result(timeout=60)
            timed("finish_load", cache.finish_load, plan)
        cache.take_events()
        state.op = "reannounce (per chunk)"
        with Clock() as walk:
            events = cache.reannounce()
            while cache.reannouncing():
                events += cache.take_events()
        state.op = "subscribe (per chunk)"
        with Clock() as sub:
            held = cache.subscribe(lambda e: None)
        state.op = None
    finally:
        cache.close()
        import shutil

        shutil.rmtree(ssd_dir, ignore_errors=True)

    def summary(samples: list[tuple[float, float]]) -> dict:
        wall = np.array([w for w, _ in samples]) * 1e6
        cpu = np.array([c for _, c in samples]) * 1e6
        return {"holds": len(samples), "cpu_p50_us": float(np.median(cpu)), "cpu_p99_us": float(np.percentile(cpu, 99)),
                "cpu_max_us": float(cpu.max()), "wall_p99_us": float(np.percentile(wall, 99)),
                "wall_max_us": float(wall.max())}

    return {"lock_blocks": n, "rounds": rounds, "holds": {k: summary(v) for k, v in sorted(holds.items())},
            "reannounce_walk_s": walk.wall, "reannounced_events": len(events), "subscribe_walk_s": sub.wall,
            "subscribed_blocks": len(held)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="200k blocks, peer included (a smoke run)")
    ap.add_argument("--peer-blocks", type=int, default=1_000_000,
                    help="blocks for the previous index (it needs ~600 B and ~50 us of CPU per block)")
    ap.add_argument("--no-peer", action="store_true", help="skip the previous index")
    ap.add_argument("--chain", type=int, default=64, help="blocks per prompt chain")
    ap.add_argument("--lookups", type=int, default=20_000, help="chains looked up")
    ap.add_argument("--evictions", type=int, default=1_000_000, help="blocks evicted")
    ap.add_argument("--policy", default="lru", choices=[p.value for p in EvictionPolicy])
    ap.add_argument("--block-size", type=int, default=32, help="tokens per block")
    ap.add_argument("--lock", action="store_true", help="also measure the longest cache-lock hold per operation")
    ap.add_argument("--lock-blocks", type=int, default=1_000_000)
    ap.add_argument("--lock-seconds", type=float, default=10.0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", choices=["v1", "v2"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = bench_one(args.child, args.blocks, args.chain, args.lookups, args.evictions,
                        EvictionPolicy(args.policy), args.block_size)
        print(json.dumps(res))
        return

    n = 200_000 if args.quick else args.blocks
    rows = [run_in_child("v2", n, args)]
    if not args.no_peer:
        rows.append(run_in_child("v1", min(n, 200_000 if args.quick else args.peer_blocks), args))
    keys = ["resident_blocks", "bytes_per_block", "inserts_per_s", "lookup_blocks_per_s", "evictions_per_s"]
    print(f"{'':<22}" + "".join(f"{r['impl'] + ' (' + ('arrays + C' if r['impl'] == 'v2' else 'objects') + ')':>22}"
                                for r in rows) + ("            v2 / v1" if len(rows) == 2 else ""))
    for k in keys:
        line = f"{k:<22}" + "".join(f"{r[k]:>22,.0f}" for r in rows)
        if len(rows) == 2:
            line += f"{rows[0][k] / rows[1][k]:>19.2f}"
        print(line)
    print(f"token ids: v1 keeps them per block (included above); v2 keeps {4 * args.block_size} B per CPU slot "
          f"in the cache and none for SSD-only blocks (the SSD manifest has them)")
    result = {"index": rows}
    if args.lock:
        lk = bench_lock(200_000 if args.quick else args.lock_blocks, 2.0 if args.quick else args.lock_seconds)
        result["lock"] = lk
        print(f"cache-lock holds per operation, {lk['lock_blocks']:,} blocks resident, {lk['rounds']} rounds "
              "(CPU time of the holding thread; wall time adds whatever preempted it)")
        print(f"  {'operation':<31}{'holds':>7}{'CPU p50':>9}{'CPU p99':>9}{'CPU max':>9}{'wall p99':>10}{'wall max':>10}  (us)")
        for op, h in lk["holds"].items():
            print(f"  {op:<31}{h['holds']:>7}{h['cpu_p50_us']:>9.1f}{h['cpu_p99_us']:>9.1f}{h['cpu_max_us']:>9.1f}"
                  f"{h['wall_p99_us']:>10.1f}{h['wall_max_us']:>10.1f}")
        print(f"  whole re-announcement {lk['reannounce_walk_s']:.2f} s ({lk['reannounced_events']} events), "
              f"subscribe {lk['subscribe_walk_s']:.2f} s ({lk['subscribed_blocks']:,} blocks)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
