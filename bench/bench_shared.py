"""What an engine attached to its node's shared tiers pays on the scheduler thread.

A real `flexkv serve` owner (`CacheOwner`, in a process of its own) and one attached engine
(`SharedCache`): the shared tiers are filled with ``--blocks`` blocks in chains of ``--chain``, then the
engine times, per request of ``--chain`` blocks,

* ``lookup``: answered by the engine's local mirror (goal: <= 50 us per request);
* ``prepare_load + finish_load`` and ``reserve_store + complete_store``: one round trip each to the owner;

next to the same lookup on a private `TieredCache` of the same size in this process (the peer: what an
engine that owns its tiers pays). Run: ``python bench/bench_shared.py [--blocks 20000] [--chain 64]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from flexkv_core.cache import TieredCache
from flexkv_core.client import CacheClient
from flexkv_core.config import FlexKVConfig
from flexkv_core.hashing import chain_hashes
from flexkv_core.layout import CacheIdentity, KVLayout
from flexkv_core.shared import SharedCache

LAYOUT = KVLayout(num_layers=1, block_size=32, num_kv_heads=1, head_dim=32, dtype="float32")
IDENTITY = CacheIdentity(model="bench-shared", layout=LAYOUT)


def _median_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=20_000)
    ap.add_argument("--chain", type=int, default=64)
    ap.add_argument("--reps", type=int, default=500)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="fkvbs", dir="/tmp")
    slot = LAYOUT.slot_bytes
    cfg = FlexKVConfig(cpu_cache_gb=(args.blocks + 1024) * slot / 2**30, ssd_cache_gb=0, enable_metrics=False,
                       server_recv_port=f"ipc://{work}/svc.sock", share_server=True)
    owner = subprocess.Popen([sys.executable, "-m", "flexkv_core.cli", "serve", "--config-stdin"],
                             stdin=subprocess.PIPE, start_new_session=True)
    owner.stdin.write(json.dumps(cfg.to_dict()).encode())
    owner.stdin.close()
    private = TieredCache(cfg.replace(share_server=False, server_recv_port=f"ipc://{work}/own.sock"), IDENTITY)
    engine = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                CacheClient(cfg.server_recv_port, timeout_s=0.5).call("whoami")
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
        engine = SharedCache(cfg, IDENTITY)
        bs = LAYOUT.block_size
        chains = []
        for c in range(args.blocks // args.chain):
            tokens = list(range(c * args.chain * bs, (c + 1) * args.chain * bs))
            hashes = chain_hashes(tokens, bs)
            chains.append(hashes)
            for cache in (engine, private):
                plan = cache.reserve_store(hashes, None, tokens)
                cache.complete_store(plan)
        while engine.lookup(chains[-1]).cpu < args.chain:
            time.sleep(0.01)
        rows = []
        i = 0

        def one(cache):
            nonlocal i
            i += 1
            return cache.lookup(chains[i % len(chains)])

        rows.append(("lookup, attached engine (local mirror)", _median_us(lambda: one(engine), args.reps)))
        rows.append(("lookup, private TieredCache (peer)", _median_us(lambda: one(private), args.reps)))

        def load():
            plan = engine.prepare_load(chains[i % len(chains)])
            plan.ready.result()
            engine.finish_load(plan)

        rows.append(("prepare_load + finish_load (2 round trips)", _median_us(load, args.reps // 5)))
        extra = [list(range(10**8 + k * bs, 10**8 + (k + 1) * bs)) for k in range(args.reps // 5)]

        def store():
            tokens = extra.pop()
            plan = engine.reserve_store(chain_hashes(tokens, bs), None, tokens)
            engine.complete_store(plan)

        rows.append(("reserve_store + complete_store, 1 block", _median_us(store, args.reps // 5)))
        print(f"{args.blocks} blocks in the shared tiers, requests of {args.chain} blocks, median of "
              f"{args.reps} (pid {os.getpid()})")
        for name, us in rows:
            print(f"  {name:<45} {us:9.1f} us/request  {us / args.chain:7.2f} us/block")
        goal = rows[0][1]
        print(f"goal: attached lookup <= 50 us per request: {'met' if goal <= 50 else 'MISSED'} ({goal:.1f} us)")
    finally:
        if engine is not None:
            engine.close()
        private.close()
        owner.terminate()
        owner.wait(timeout=30)
        subprocess.run(["rm", "-rf", work], check=False)


if __name__ == "__main__":
    main()
