"""Benchmark: distributed reuse across nodes.

1. **Cross-node fetch throughput.** Node A (a separate process) holds ``--fetch-mib`` MiB of blocks of
   ``--block-mib`` MiB in its CPU tier; node B, in this process, fetches all of them through
   `DistributedNode.fetch` (export RPC, reads over Mooncake's transfer engine on TCP into B's CPU slots,
   xxh3 verification, release), and so does node B' with ``dist_verify`` off (no checksums). In the
   same run, interleaved round by round, this process's own transfer engine reads the same slots of A
   into B's raw (one batch, no RPC, no checks), twice: with the engine's own ``batch_transfer_sync_read``
   (*engine sync*: the engine as shipped, the target's baseline, >= 0.8) and with the non-spinning wait our
   engine process uses (*engine polled*: the stricter baseline, which isolates the cost of our layer).
2. **Hit ratio of global over local reuse** on the Mooncake conversation trace (512-token blocks,
   prefix-chained hash ids), requests assigned to ``--nodes`` nodes (round-robin or random). Each node is
   a real `TieredCache` (tiny 4 KiB slots, ``--capacity`` blocks); a request looks its blocks up, loads
   the prefix it can, and stores the rest. *Local*: each node reuses only what it stored itself.
   *Global*: a node also fetches blocks other nodes hold, through their ``export`` API (an in-process
   memcpy stands in for the network, and peers' holdings are read live: the ideal, zero-lag snapshot),
   and keeps them, as `DistributedNode` does.

    .venv/bin/python bench/bench_distributed.py                        # both parts
    .venv/bin/python bench/bench_distributed.py --part fetch --rounds 7 --json out.json
    .venv/bin/python bench/bench_distributed.py --part trace --nodes 8 --capacity 4000 --assign random
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import xxhash
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexkv_core.cache import TieredCache  # noqa: E402
from flexkv_core.config import FlexKVConfig  # noqa: E402
from flexkv_core.distributed.transfer import _coalesce, free_port  # noqa: E402
from flexkv_core.layout import CacheIdentity, KVLayout  # noqa: E402
from flexkv_core.remote import RemoteBlock  # noqa: E402

MiB, GiB = 2**20, 2**30
TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
PASSWORD = "bench-password"


def fetch_layout(block_mib: float) -> KVLayout:
    """A layout whose slot is ``block_mib`` MiB: 16 planes of 64-token, 8-head, 128-dim fp16 (1 MiB/16)."""
    planes_bytes = int(block_mib * MiB)
    plane = 64 * 8 * 128 * 2
    return KVLayout(num_layers=max(1, planes_bytes // plane // 2), block_size=64, num_kv_heads=8, head_dim=128,
                    dtype="float16")


def make_cache(layout: KVLayout, blocks: int, name: str, **config) -> TieredCache:
    cfg = FlexKVConfig(cpu_cache_gb=blocks * layout.slot_bytes / GiB, enable_metrics=False,
                       server_recv_port=f"ipc://{tempfile.gettempdir()}/flexkv-bench-{os.getpid()}-{name}.sock",
                       **config)
    return TieredCache(cfg, CacheIdentity(model="bench-distributed", layout=layout),
                       pool_name=f"flexkv-bench-{os.getpid()}-{name}")


def fill(cache: TieredCache, hashes: list[int], seed: int) -> None:
    """Store ``hashes`` as one chain whose slots hold random bytes (as if an engine had copied them)."""
    bs = cache.block_size
    plan = cache.reserve_store(hashes, None, [0] * (len(hashes) * bs))
    assert plan is not None and len(plan.slots) == len(hashes), "cache too small for the chain"
    rng = np.random.default_rng(seed)
    for slot in plan.slots:
        view = np.frombuffer(cache.pool.slot(slot), dtype=np.uint8)
        view[:] = rng.integers(0, 256, view.size, dtype=np.uint8)
    cache.complete_store(plan)


# ---- part 1: fetch throughput ------------------------------------------------------------------------


def serve(spec: dict) -> None:
    """Node A: hold the blocks and serve them until stdin closes."""
    from flexkv_core.distributed import start_distributed

    layout = KVLayout(**spec["layout"])
    cache = make_cache(layout, spec["blocks"], "a", **spec["config"])
    fill(cache, spec["hashes"], seed=1)
    node = start_distributed(cache, cache.config)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    sys.stdin.read()
    node.close()
    cache.close()


def bench_fetch(args) -> dict:
    from flexkv_core.client import CacheClient
    from flexkv_core.distributed import start_distributed
    from flexkv_core.distributed.transfer import EngineSettings, MooncakeTransport

    layout = fetch_layout(args.block_mib)
    n = max(1, int(args.fetch_mib * MiB) // layout.slot_bytes)
    hashes = list(range(1000, 1000 + n))
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--requirepass", PASSWORD],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = {"enable_distributed": True, "redis_port": redis_port, "redis_password": PASSWORD,
              "dist_lease_s": 60.0, "dist_snapshot_interval_s": 0.2, "dist_timeout_s": 10.0}
    spec = {"layout": vars(layout), "blocks": n, "hashes": hashes, "config": config}
    server = subprocess.Popen([sys.executable, __file__, "--serve", json.dumps(spec)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    opened: list = []  # closed in reverse order
    try:
        if server.stdout.readline().strip() != "READY":
            raise RuntimeError("node A did not start")
        # Node B fetches with checksums verified (the default); node B' with dist_verify off.
        nodes = {}
        for name, verify in (("b", True), ("b-noverify", False)):
            cache = make_cache(layout, n, name, **config, dist_verify=verify)
            opened.append(cache)
            nodes[name] = start_distributed(cache, cache.config)
            opened.append(nodes[name])
            cache.pool.prefault()
        deadline = time.monotonic() + 30
        while any(node.lookup(hashes) < n for node in nodes.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("node B never saw node A's blocks")
            time.sleep(0.05)
        pool = nodes["b"].cache.pool
        peer = nodes["b"].snapshot.plan(hashes)[0].peer
        # The raw baselines: this process's own engine reading the same slots of A's pool into B's.
        raw = MooncakeTransport(EngineSettings(host="127.0.0.1", timeout_s=10))
        opened.append(raw)
        with CacheClient(peer.service, timeout_s=30) as client:
            grant = client.call("export", block_hashes=hashes, lease_s=600.0, timeout_s=10.0)
            remote = [peer.pool_ptr + s * layout.slot_bytes for s in grant["slots"]]
            local = [pool.data_ptr() + i * layout.slot_bytes for i in range(n)]
            lengths = [layout.slot_bytes] * n
            loc, rem, num = _coalesce(local, remote, lengths)

            def timed(fn) -> float:
                t0 = time.perf_counter()
                fn()
                return time.perf_counter() - t0

            def engine_sync() -> None:  # the engine's own API: one batch, waited for inside the engine
                assert raw._engine.batch_transfer_sync_read(peer.session, loc, rem, num) == 0, "raw read failed"

            def engine_polled() -> None:  # the same bytes, waited for the way our engine process does
                assert raw.read(peer.session, local, remote, lengths), "raw read failed"

            def fetch(node) -> None:
                got = node.fetch(hashes, [node.cache.pool.slot(i) for i in range(n)]).result(timeout=120)
                assert all(b is not None for b in got), "a block did not arrive"

            runs = {"engine_sync": engine_sync, "engine_polled": engine_polled,
                    "node": lambda: fetch(nodes["b"]), "node_noverify": lambda: fetch(nodes["b-noverify"])}
            for fn in runs.values():  # warm-up: connections, page tables on both sides
                fn()
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in tqdm(range(args.rounds), desc="fetch rounds", unit="round"):
                for name, fn in runs.items():  # interleaved: each round sees the same machine
                    times[name].append(timed(fn))
            sum_s = statistics.median(timed(lambda: [xxhash.xxh3_64_intdigest(pool.slot(i)) for i in range(n)])
                                      for _ in range(3))
            checks = [xxhash.xxh3_64_intdigest(pool.slot(i)) for i in range(n)] == grant["checksums"]
            client.call("release_export", job=grant["job"])
        nbytes = n * layout.slot_bytes

        def ratio(a: str, b: str) -> dict:
            r = [x / y for x, y in zip(times[b], times[a])]
            return {"median": statistics.median(r), "min": min(r), "max": max(r)}

        return {
            "blocks": n, "block_bytes": layout.slot_bytes, "bytes": nbytes, "rounds": args.rounds,
            "gib_s": {name: nbytes / statistics.median(t) / GiB for name, t in times.items()},
            "node_vs_engine_sync": ratio("node", "engine_sync"),
            "node_vs_engine_polled": ratio("node", "engine_polled"),
            "node_noverify_vs_engine_polled": ratio("node_noverify", "engine_polled"),
            "xxh3_gib_s": nbytes / sum_s / GiB,
            "bytes_verified": checks, "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
        }
    finally:
        for thing in reversed(opened):
            thing.close()
        if server.poll() is None:
            server.stdin.close()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        redis.kill()
        redis.wait()


# ---- part 2: global vs local hit ratio on the trace -----------------------------------------------------


class PeerCaches:
    """A RemoteSource over other in-process caches' export API (ideal snapshot, memcpy network)."""

    def __init__(self, me: TieredCache, everyone: list[TieredCache]) -> None:
        self.peers = [c for c in everyone if c is not me]

    def _holds(self, cache: TieredCache, h: int) -> bool:
        from flexkv_core.layout import Tier

        b = cache.index.get(h)
        return b is not None and (b.ready(Tier.CPU) or b.ready(Tier.SSD))

    def lookup(self, block_hashes) -> int:
        n = 0
        for h in block_hashes:
            if not any(self._holds(p, h) for p in self.peers):
                break
            n += 1
        return n

    def fetch(self, block_hashes, buffers) -> Future:
        out: list[RemoteBlock | None] = [None] * len(block_hashes)
        i = 0
        while i < len(block_hashes):  # greedy longest run per peer, as GlobalSnapshot.plan does
            best, best_stop = None, i
            for p in self.peers:
                j = i
                while j < len(block_hashes) and self._holds(p, block_hashes[j]):
                    j += 1
                if j > best_stop:
                    best, best_stop = p, j
            if best is None:
                break
            grant = best.export(block_hashes[i:best_stop], lease_s=30.0)
            for k, slot in enumerate(grant["slots"]):
                buffers[i + k][:] = best.pool.slot(slot)
                out[i + k] = RemoteBlock(grant["parents"][k], grant["tokens"][k])
            best.release_export(grant["job"])
            if len(grant["slots"]) < best_stop - i:
                break
            i = best_stop
        fut: Future = Future()
        fut.set_result(out)
        return fut


def replay(requests: list[list[int]], nodes: int, capacity: int, assign: str, use_global: bool,
           seed: int) -> dict:
    layout = KVLayout(num_layers=1, block_size=1, num_kv_heads=1, head_dim=1, dtype="uint8")  # 4 KiB slots
    caches = [make_cache(layout, capacity, f"trace{i}") for i in range(nodes)]
    for c in caches:
        c.events.enabled = False
        if use_global:
            c.remote = PeerCaches(c, caches)
    rng = random.Random(seed)
    total = local_hits = remote_hits = 0
    try:
        label = "global" if use_global else "local"
        for i, hashes in enumerate(tqdm(requests, desc=f"trace ({label}, {nodes} nodes)", unit="req",
                                        mininterval=1)):
            cache = caches[i % nodes if assign == "round-robin" else rng.randrange(nodes)]
            r = cache.lookup(hashes)
            total += len(hashes)
            remote_hits += r.remote
            local_hits += r.total - r.remote
            if r.total:
                plan = cache.prepare_load(hashes[:r.total])
                plan.ready.result()
                cache.finish_load(plan)
            plan = cache.reserve_store(hashes, None, [0] * len(hashes))
            if plan is not None:
                cache.complete_store(plan)
    finally:
        for c in caches:
            c.close()
    return {"blocks": total, "hit_blocks": local_hits + remote_hits, "hit_ratio": (local_hits + remote_hits) / total,
            "local_hit_blocks": local_hits, "remote_hit_blocks": remote_hits}


def bench_trace(args) -> dict:
    requests = [json.loads(line)["hash_ids"] for line in TRACE.open()]
    if args.requests:
        requests = requests[:args.requests]
    # hash ids are small ints (0, 1, ...): fine as block hashes, they are already prefix-chained
    local = replay(requests, args.nodes, args.capacity, args.assign, False, args.seed)
    glob = replay(requests, args.nodes, args.capacity, args.assign, True, args.seed)
    single = replay(requests, 1, args.capacity * args.nodes, args.assign, False, args.seed)
    return {"requests": len(requests), "nodes": args.nodes, "capacity_blocks_per_node": args.capacity,
            "assign": args.assign, "local": local, "global": glob, "one_node_with_all_capacity": single,
            "gain_points": 100 * (glob["hit_ratio"] - local["hit_ratio"]),
            "gain_factor": glob["hit_ratio"] / local["hit_ratio"] if local["hit_ratio"] else None}


def _ratio(r: dict) -> str:
    return f"{r['median']:.2f} (min {r['min']:.2f}, max {r['max']:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("fetch", "trace", "both"), default="both")
    ap.add_argument("--fetch-mib", type=float, default=256, help="bytes fetched per round")
    ap.add_argument("--block-mib", type=float, default=2, help="block (slot) size")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--capacity", type=int, default=8000, help="CPU blocks per node in the trace replay")
    ap.add_argument("--assign", choices=("round-robin", "random"), default="round-robin")
    ap.add_argument("--requests", type=int, default=0, help="replay only the first N requests (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(json.loads(args.serve))
        return
    if shutil.which("redis-server") is None and args.part != "trace":
        sys.exit("redis-server is not on PATH (the fetch part starts its own)")
    results: dict = {}
    if args.part in ("fetch", "both"):
        results["fetch"] = bench_fetch(args)
        f = results["fetch"]
        g = f["gib_s"]
        print(f"fetch: {f['blocks']} blocks x {f['block_bytes'] / MiB:g} MiB = {f['bytes'] / MiB:.0f} MiB per round, "
              f"{f['rounds']} rounds, medians: engine sync read {g['engine_sync']:.2f} GiB/s, engine polled "
              f"{g['engine_polled']:.2f}, DistributedNode.fetch {g['node']:.2f} (without checksums "
              f"{g['node_noverify']:.2f}); fetch / engine sync read: {_ratio(f['node_vs_engine_sync'])}; "
              f"fetch / engine polled: {_ratio(f['node_vs_engine_polled'])}; without checksums / engine polled: "
              f"{_ratio(f['node_noverify_vs_engine_polled'])}; xxh3 {f['xxh3_gib_s']:.1f} GiB/s; bytes verified: "
              f"{f['bytes_verified']}; {f['cpus']} CPUs, load average {f['load_average']:.1f}")
    if args.part in ("trace", "both"):
        results["trace"] = bench_trace(args)
        t = results["trace"]
        print(f"trace: {t['requests']} requests over {t['nodes']} nodes ({t['assign']}), {t['capacity_blocks_per_node']} "
              f"blocks each: local hit ratio {t['local']['hit_ratio']:.3f}, global {t['global']['hit_ratio']:.3f} "
              f"(remote {t['global']['remote_hit_blocks']} of {t['global']['hit_blocks']} hit blocks), gain "
              f"{t['gain_points']:+.1f} points (x{t['gain_factor']:.2f}); one node with all the capacity: "
              f"{t['one_node_with_all_capacity']['hit_ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
