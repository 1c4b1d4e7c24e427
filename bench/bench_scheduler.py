"""What the connector costs vLLM's scheduler thread: µs per block of each operation, the whole per-step
overhead with many running requests, and how long other threads of the cache block that thread.

    .venv/bin/python bench/bench_scheduler.py [--quick] [--parts 1,2,3,4] [--compare REF] [--json out.json]

vLLM's real scheduler drives our real connector (FlexKVConnector -> FlexKVScheduler -> TieredCache) with
no model (`flexkv_dynamo.dry_engine.DryEngine`: vLLM Requests with vLLM's block hashes, real admission,
chunked prefill, prefix cache and KV events; stand-ins only for the model and the workers). Four parts:

1. **Per block**, with ``--requests`` requests of ``--blocks`` blocks each (10,000 by default): a cold
   prefill in one step (store planning = ``build_connector_meta``, store completion =
   ``update_connector_output``), then vLLM's prefix cache reset and the same prompts again (lookup =
   ``get_num_new_matched_tokens``, load planning = ``update_state_after_alloc``, load completion, and
   store planning over blocks the tier holds already). Each is the time of the connector callback per
   block, and of that the time spent inside the `TieredCache` call (the rest is the scheduler side's).
2. **Per step**, ``--running`` requests decoding (prompts of ``--prompt`` tokens sharing half of them, so
   each request stores a block every ``block_size`` steps): all connector callbacks of a step against
   vLLM's own scheduler work in the same steps (``schedule`` + ``update_from_output`` without ours).
3. **Blocking**: part 2 again with an SSD tier (write-backs complete on its I/O threads), ``flexkv
   status`` queries and peer exports (``export`` / ``release_export``) arriving over the cache's real
   service endpoint from other threads. The cache lock is timed: how long each acquisition by the
   scheduler thread waited (p50 / p99 / max), how long the other threads held it, and the step time
   against part 2.

4. **A failed SSD staging**: a load of ``--blocks`` SSD-only blocks whose first block fails its checksum
   (bytes flipped on disk); the I/O thread's completion releases the whole load under the cache lock.
   How long it holds the lock, and how long the scheduler thread waits.

``--parts 1,2,3,4`` picks parts. ``--compare REF`` runs the same on REF's flexkv_core / flexkv_dynamo (extracted with ``git archive``, the
harness copied in) in a subprocess, and prints both with their ratio. Figures on a busy machine are
preliminary: compare only figures of one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flexkv_core.layout import Tier

REPO = Path(__file__).resolve().parent.parent

#: Scheduler-side callbacks vLLM makes on the connector (all of them run on the scheduler thread).
CALLBACKS = ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
             "update_connector_output", "request_finished", "take_events", "get_kv_connector_stats",
             "has_pending_push_work")
#: TieredCache methods the scheduler side calls, and how many blocks each call concerns.
CACHE_CALLS: dict[str, Callable[[tuple, Any], int]] = {
    "lookup": lambda args, result: len(args[0]),
    "prepare_load": lambda args, result: len(args[0]),
    "reserve_store": lambda args, result: len(args[0]),
    "complete_store": lambda args, result: len(args[0].block_hashes),
    "finish_load": lambda args, result: len(args[0].block_hashes),
}


class Timers:
    """Per wrapped method since the last `reset`: calls, wall seconds, CPU seconds of the calling thread
    (what the scheduler thread itself spent: other processes and threads of a busy machine do not count
    in it), and for cache calls the blocks they concerned."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.blocks: Counter[str] = Counter()

    def wrap(self, obj: Any, name: str, blocks: Callable[[tuple, Any], int] | None = None) -> None:
        fn = getattr(obj, name)
        wall, cpu, calls, counted = self.wall, self.cpu, self.calls, self.blocks
        clock, thread_clock = time.perf_counter, time.thread_time

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0, c0 = clock(), thread_clock()
            result = fn(*args, **kwargs)
            cpu[name] += thread_clock() - c0
            wall[name] += clock() - t0
            calls[name] += 1
            if blocks is not None:
                counted[name] += blocks(args, result)
            return result

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()
        self.calls.clear()
        self.blocks.clear()

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {"wall": dict(self.wall), "cpu": dict(self.cpu), "calls": dict(self.calls),
                "blocks": dict(self.blocks)}


class TimedLock:
    """Stands in for the cache's lock: the same RLock, with every outermost acquisition timed (how long
    the scheduler thread waited; how long any other thread held it, by thread name)."""

    def __init__(self, lock: Any, scheduler_thread: int) -> None:
        self._lock = lock
        self._scheduler = scheduler_thread
        self._local = threading.local()
        self.waits: list[float] = []  # scheduler thread: seconds waited per acquisition
        self.holds: dict[str, list[float]] = defaultdict(list)  # other threads: seconds held
        self.holds_cpu: dict[str, list[float]] = defaultdict(list)  # ... of which the holder ran (CPU)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        depth = getattr(self._local, "depth", 0)
        t0 = time.perf_counter()
        ok = self._lock.acquire(blocking, timeout)
        if ok:
            if depth == 0:
                now = time.perf_counter()
                self._local.since = now
                self._local.cpu_since = time.thread_time()
                if threading.get_ident() == self._scheduler:
                    self.waits.append(now - t0)
            self._local.depth = depth + 1
        return ok

    def release(self) -> None:
        depth = self._local.depth - 1
        self._local.depth = depth
        if depth == 0 and threading.get_ident() != self._scheduler:
            name = threading.current_thread().name.rstrip("0123456789_-")
            self.holds[name].append(time.perf_counter() - self._local.since)
            self.holds_cpu[name].append(time.thread_time() - self._local.cpu_since)
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __getattr__(self, name: str) -> Any:  # Condition() asks RLocks for _is_owned & co.
        return getattr(self._lock, name)


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 2003) for _ in range(n)]


def make_engine(args: argparse.Namespace, workdir: str, *, blocks: int, batched: int, model_len: int,
                cpu_gb: float, ssd_gb: float = 0.0) -> Any:
    from flexkv_dynamo.dry_engine import DryEngine

    env = {"FLEXKV_CPU_CACHE_GB": str(cpu_gb), "FLEXKV_SSD_CACHE_GB": str(ssd_gb), "FLEXKV_SSD_IO_THREADS": "2",
           "FLEXKV_ENABLE_METRICS": "1", "FLEXKV_LOG_LEVEL": "WARNING"}
    eng = DryEngine(block_size=args.block_size, num_gpu_blocks=blocks, max_num_seqs=max(args.running, 8),
                    max_num_batched_tokens=batched, max_model_len=model_len, flexkv_env=env, workdir=workdir,
                    tags=False, keep_events=False, num_layers=1)
    return eng


def instrument(eng: Any) -> Timers:
    timers = Timers()
    for name in CALLBACKS:
        timers.wrap(eng.connector, name)
    for name, count in CACHE_CALLS.items():
        timers.wrap(eng.flexkv.cache, name, count)
    return timers


# ---- part 1: per block ------------------------------------------------------------------------------


def part_per_block(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """Each round: fresh prompts cold, then warm (see the module docstring); the figure of an operation is
    its best round (a busy machine only ever makes a round slower)."""
    bs, n, reqs = args.block_size, args.blocks, args.requests
    tokens = n * bs + bs // 2  # n full blocks and a partial one
    slot_bytes = bs * 2 * 64 * 2 * 4  # one layer, 2 KV heads of 64, K and V, float32
    cpu_gb = (reqs + 1) * (n + 8) * slot_bytes / 2**30  # room for one round: no eviction in the figures
    eng = make_engine(args, os.path.join(workdir, "p1"), blocks=reqs * (n + 8) + 64, batched=tokens + 64,
                      model_len=tokens + 64, cpu_gb=cpu_gb)
    rounds: list[dict[str, Any]] = []
    try:
        timers = instrument(eng)
        rng = random.Random(1)
        # Warm up every code path once on a small request (first calls import and allocate).
        small = prompt(rng, 4 * bs)
        eng.add("warm0", small, 1)
        eng.run()
        eng.reset_prefix_cache()
        eng.add("warm1", small, 1)
        eng.run()

        def run_phase() -> dict[str, Any]:
            timers.reset()
            steps = 0
            while eng.scheduler.has_requests():
                eng.step()
                steps += 1
            return {"steps": steps, **timers.snapshot()}

        for r in range(args.rounds):
            prompts = {f"big{r}.{i}": prompt(rng, tokens) for i in range(reqs)}
            # Cold: every prompt computed in one step; its blocks planned for storing, then completed.
            for rid, p in prompts.items():
                eng.add(rid + "-cold", p, 1)
            cold = run_phase()
            # Warm: vLLM forgets, our CPU tier does not: lookups hit, the loads are planned and completed,
            # and the store planning walks blocks the tier holds already.
            assert eng.reset_prefix_cache()
            for rid, p in prompts.items():
                eng.add(rid + "-warm", p, 1)
            warm = run_phase()
            assert eng.flexkv.in_flight()["loads"] == 0
            rounds.append({"cold": cold, "warm": warm})
            eng.flexkv.cache.evict_all(Tier.CPU)  # room for the next round
    finally:
        eng.close()

    def per_block(phase: str, callback: str, cache_call: str) -> dict[str, float]:
        best: dict[str, float] | None = None
        for rnd in rounds:
            ph = rnd[phase]
            blocks = ph["blocks"].get(cache_call, 0)
            if not blocks:
                continue
            fig = {"cpu_us": ph["cpu"].get(callback, 0.0) / blocks * 1e6,
                   "cache_cpu_us": ph["cpu"].get(cache_call, 0.0) / blocks * 1e6,
                   "wall_us": ph["wall"].get(callback, 0.0) / blocks * 1e6, "blocks": blocks}
            if best is None or fig["cpu_us"] < best["cpu_us"]:
                best = fig
        return best or {"cpu_us": float("nan"), "cache_cpu_us": float("nan"), "wall_us": float("nan"), "blocks": 0}

    ops = {
        "lookup (hit)": per_block("warm", "get_num_new_matched_tokens", "lookup"),
        "load planning": per_block("warm", "update_state_after_alloc", "prepare_load"),
        "load completion": per_block("warm", "update_connector_output", "finish_load"),
        "store planning": per_block("cold", "build_connector_meta", "reserve_store"),
        "store completion": per_block("cold", "update_connector_output", "complete_store"),
        # The warm phase's build_connector_meta sends the load jobs, then offers the held blocks for storing.
        "store planning (held)": per_block("warm", "build_connector_meta", "reserve_store"),
    }
    return {"blocks_per_request": n, "requests": reqs, "rounds": args.rounds, "ops": ops}


# ---- parts 2 and 3: per step, and blocking ------------------------------------------------------------


def part_per_step(args: argparse.Namespace, workdir: str, *, loaded: bool) -> dict[str, Any]:
    bs, running = args.block_size, args.running
    decode = args.decode_steps
    # Part 3 decodes for at least --blocking-seconds, so that the other threads get going.
    budget = 4 * decode if loaded else decode
    per_req_blocks = (args.prompt + budget + 2 * bs) // bs + 1
    slot_bytes = bs * 2 * 64 * 2 * 4
    cpu_gb = max(0.05, running * per_req_blocks * slot_bytes / 2**30)
    eng = make_engine(args, os.path.join(workdir, "p3" if loaded else "p2"), blocks=running * per_req_blocks + 64,
                      batched=args.batched, model_len=args.prompt + budget + 4 * bs, cpu_gb=cpu_gb,
                      ssd_gb=2 * cpu_gb if loaded else 0.0)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    counts: Counter[str] = Counter()
    lock: TimedLock | None = None
    try:
        timers = instrument(eng)
        rng = random.Random(2)
        shared = prompt(rng, args.prompt // 2)
        requests = [eng.add(f"r{i}", shared + prompt(rng, args.prompt - len(shared)), budget + 2 * bs)
                    for i in range(running)]
        # Prefill until every request decodes (one token per step each).
        for _ in range(10_000):
            eng.step()
            if all(r.num_computed_tokens >= r.num_prompt_tokens for r in requests):
                break
        if loaded:
            lock = TimedLock(eng.flexkv.cache.lock, threading.get_ident())
            eng.flexkv.cache.lock = lock
            from flexkv_dynamo.kv_events import engine_hash_to_int

            chain = [engine_hash_to_int(h) for h in requests[0].block_hashes[:args.prompt // bs]]
            endpoint = eng.env["FLEXKV_SERVER_RECV_PORT"]
            threads = [threading.Thread(target=status_loop, args=(endpoint, args.status_hz, stop, counts), daemon=True),
                       threading.Thread(target=export_loop, args=(endpoint, chain, args.export_hz, stop, counts),
                                        daemon=True)]
            for t in threads:
                t.start()
        steps: list[dict[str, Any]] = []
        gc_clock = GcClock()
        deadline = time.monotonic() + (args.blocking_seconds if loaded else 0.0)
        while len(steps) < decode or (time.monotonic() < deadline and len(steps) < budget):
            timers.reset()
            out = eng.step()
            ours = sum(timers.wall.get(name, 0.0) for name in CALLBACKS)
            ours_cpu = sum(timers.cpu.get(name, 0.0) for name in CALLBACKS)
            steps.append({"connector_s": ours, "vllm_s": out.schedule_s + out.update_s - ours,
                          "connector_cpu_s": ours_cpu, "vllm_cpu_s": out.schedule_cpu_s + out.update_cpu_s - ours_cpu,
                          "stores": timers.blocks.get("reserve_store", 0), "gc_s": gc_clock.take(),
                          "breakdown": {k: round(v * 1e6) for k, v in timers.wall.items()}})
        gc_clock.close()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        eng.close()
    ours = [s["connector_s"] for s in steps]
    vllm = [s["vllm_s"] for s in steps]
    ours_cpu = [s["connector_cpu_s"] for s in steps]
    vllm_cpu = [s["vllm_cpu_s"] for s in steps]
    result: dict[str, Any] = {
        "running": running, "steps": len(steps),
        "connector_cpu_us_mean": statistics.fmean(ours_cpu) * 1e6,
        "connector_cpu_us_p99": pct(ours_cpu, 0.99) * 1e6,
        "vllm_cpu_us_mean": statistics.fmean(vllm_cpu) * 1e6,
        "ratio_cpu": statistics.fmean(ours_cpu) / statistics.fmean(vllm_cpu),
        "connector_us_mean": statistics.fmean(ours) * 1e6, "connector_us_p99": pct(ours, 0.99) * 1e6,
        "vllm_us_mean": statistics.fmean(vllm) * 1e6,
        "blocks_stored_per_step": statistics.fmean(s["stores"] for s in steps),
        "gc_ms_per_step_max": max(s["gc_s"] for s in steps) * 1e3,
    }
    worst = max(steps, key=lambda s: s["connector_s"])
    result["worst_step"] = {"connector_ms": worst["connector_s"] * 1e3, "gc_ms": worst["gc_s"] * 1e3,
                            "wall_us_by_call": worst["breakdown"]}
    if lock is not None:
        result["scheduler_lock_waits"] = len(lock.waits)
        result["wait_us_p50"] = pct(lock.waits, 0.50) * 1e6
        result["wait_us_p99"] = pct(lock.waits, 0.99) * 1e6
        result["wait_us_max"] = max(lock.waits, default=0.0) * 1e6
        result["holds_us_p99"] = {name: pct(h, 0.99) * 1e6 for name, h in lock.holds.items()}
        result["holds_us_max"] = {name: max(h) * 1e6 for name, h in lock.holds.items()}
        result["holds_cpu_us_max"] = {name: max(h) * 1e6 for name, h in lock.holds_cpu.items()}
        result["background_calls"] = dict(counts)
    return result


def part_failed_staging(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """A load of ``--blocks`` SSD-only blocks whose first block fails its checksum (its bytes flipped on
    disk): the SSD completion releases the whole load under the cache lock, on an I/O thread, while the
    scheduler thread goes on with 16 decoding requests. How long the lock is held then, and how long the
    scheduler thread waits for it."""
    bs, n = args.block_size, args.blocks
    tokens = n * bs + bs // 2
    slot_bytes = bs * 2 * 64 * 2 * 4
    room = n + 16 * 16 + 64  # the load, and 16 other requests of up to 13 blocks
    eng = make_engine(args, os.path.join(workdir, "p4"), blocks=room, batched=tokens + 64, model_len=tokens + 64,
                      cpu_gb=room * slot_bytes / 2**30, ssd_gb=room * slot_bytes / 2**30)
    try:
        from flexkv_dynamo.kv_events import engine_hash_to_int

        cache = eng.flexkv.cache
        p = prompt(random.Random(4), tokens)
        request = eng.add("cold", p, 1)
        eng.run()
        assert cache.flush(timeout=600)
        cache.evict_all(Tier.CPU)
        first = cache.index.get(engine_hash_to_int(request.block_hashes[0]))
        path, offset = cache.ssd.location(first.slot_in(Tier.SSD))
        with open(path, "r+b") as fh:  # the first block's SSD copy fails its checksum
            fh.seek(offset + 64)
            fh.write(b"\xff" * 64)
        assert eng.reset_prefix_cache()
        lock = TimedLock(cache.lock, threading.get_ident())
        cache.lock = lock
        rng = random.Random(5)
        for i in range(16):  # other requests decode meanwhile: each step stores some of their blocks
            eng.add(f"busy{i}", prompt(rng, 4 * bs + i), 8 * bs)
        eng.add("warm", p, 1)
        eng.run()
    finally:
        eng.close()
    io = [h for name, holds in lock.holds.items() if "ssd" in name for h in holds]
    io_cpu = [h for name, holds in lock.holds_cpu.items() if "ssd" in name for h in holds]
    return {"blocks": n, "io_hold_ms_max": max(io, default=0.0) * 1e3,
            "io_hold_cpu_ms_max": max(io_cpu, default=0.0) * 1e3,
            "scheduler_wait_ms_max": max(lock.waits, default=0.0) * 1e3,
            "scheduler_wait_us_p99": pct(lock.waits, 0.99) * 1e6}


def status_loop(endpoint: str, hz: float, stop: threading.Event, counts: Counter[str]) -> None:
    from flexkv_core.client import CacheClient

    with CacheClient(endpoint, timeout_s=30) as client:
        while not stop.wait(1 / hz):
            client.call("status")
            counts["status"] += 1


def export_loop(endpoint: str, chain: list[int], hz: float, stop: threading.Event, counts: Counter[str]) -> None:
    """A peer reading our blocks: export (pins them, checksums), then release."""
    from flexkv_core.client import CacheClient

    with CacheClient(endpoint, timeout_s=30) as client:
        while not stop.wait(1 / hz):
            lent = client.call("export", block_hashes=chain, lease_s=30.0)
            if lent["job"]:
                client.call("release_export", job=lent["job"])
            counts["export"] += 1


# ---- reporting ---------------------------------------------------------------------------------------


class GcClock:
    """Seconds the garbage collector ran (on whichever thread triggered it) since the last `take`."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="fkvbs", dir="/tmp")
    parts = {int(p) for p in args.parts.split(",")}
    try:
        result: dict[str, Any] = {}
        if 1 in parts:
            result["per_block"] = part_per_block(args, workdir)
        if 2 in parts:
            result["per_step"] = part_per_step(args, workdir, loaded=False)
        if 3 in parts:
            result["blocking"] = part_per_step(args, workdir, loaded=True)
        if 4 in parts:
            result["failed_staging"] = part_failed_staging(args, workdir)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_ref(ref: str, argv: list[str]) -> dict[str, Any]:
    """This benchmark on REF's packages, in a subprocess."""
    tree = tempfile.mkdtemp(prefix="fkvref", dir="/tmp")
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "flexkv_core", "flexkv_dynamo"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        harness = Path(tree, "flexkv_dynamo", "dry_engine.py")
        if not harness.exists():
            shutil.copy(REPO / "flexkv_dynamo" / "dry_engine.py", harness)
        out = Path(tree, "result.json")
        env = dict(os.environ, PYTHONPATH=tree)
        subprocess.run([sys.executable, __file__, *argv, "--json", str(out)], check=True, env=env)
        return json.loads(out.read_text())
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def report(result: dict[str, Any], ref: dict[str, Any] | None, ref_name: str) -> None:
    if "per_block" in result:
        report_per_block(result, ref, ref_name)
    for key, title in (("per_step", "2. per step"), ("blocking", "3. other threads at work")):
        if key in result:
            report_per_step(result[key], (ref or {}).get(key), ref_name, title)
    if "blocking" in result:
        report_blocking(result, ref, ref_name)
    if "failed_staging" in result:
        f = result["failed_staging"]
        r = (ref or {}).get("failed_staging")
        print(f"\n4. a failed SSD staging of {f['blocks']} blocks: the I/O thread held the cache lock "
              f"{f['io_hold_ms_max']:.1f} ms at most (running {f.get('io_hold_cpu_ms_max', float('nan')):.1f} ms of "
              f"it); the scheduler thread waited {f['scheduler_wait_ms_max']:.1f} ms "
              f"at most (p99 {f['scheduler_wait_us_p99']:.0f} µs)"
              + (f"   ({ref_name}: held {r['io_hold_ms_max']:.1f} ms running "
                 f"{r.get('io_hold_cpu_ms_max', float('nan')):.1f}, waited {r['scheduler_wait_ms_max']:.1f} ms)"
                 if r else ""))


def report_per_block(result: dict[str, Any], ref: dict[str, Any] | None, ref_name: str) -> None:
    pb = result["per_block"]
    print(f"\n1. per block: {pb['requests']} requests of {pb['blocks_per_request']} blocks, best of {pb['rounds']} "
          "rounds; CPU µs of the scheduler thread per block in the callback, of that inside TieredCache; wall µs")
    head = f"{'operation':<24}{'cpu':>8}{'in cache':>10}{'wall':>8}"
    if ref:
        head += f"{ref_name + ' cpu':>18}{'in cache':>10}{'new/ref':>9}"
    print(head)
    for op, v in pb["ops"].items():
        line = f"{op:<24}{v['cpu_us']:>8.2f}{v['cache_cpu_us']:>10.2f}{v['wall_us']:>8.2f}"
        if ref:
            r = ref["per_block"]["ops"].get(op)
            if r:
                line += f"{r['cpu_us']:>18.2f}{r['cache_cpu_us']:>10.2f}{v['cpu_us'] / r['cpu_us']:>9.2f}"
        print(line)


def report_per_step(s: dict[str, Any], ref: dict[str, Any] | None, ref_name: str, title: str) -> None:
    print(f"\n{title}: {s['running']} running requests, {s['steps']} decode steps, "
          f"{s['blocks_stored_per_step']:.1f} blocks stored per step")
    rows = [("connector CPU µs/step mean", "connector_cpu_us_mean"),
            ("connector CPU µs/step p99", "connector_cpu_us_p99"),
            ("vLLM scheduler CPU µs/step mean", "vllm_cpu_us_mean"), ("connector / vLLM (CPU)", "ratio_cpu"),
            ("connector wall µs/step mean", "connector_us_mean"), ("connector wall µs/step p99", "connector_us_p99"),
            ("GC ms in one step, max", "gc_ms_per_step_max")]
    for label, k in rows:
        line = f"  {label:<34}{s[k]:>10.2f}"
        if ref and k in ref:
            line += f"   {ref_name}: {ref[k]:>10.2f}"
        print(line)
    w = s["worst_step"]
    calls = ", ".join(f"{k} {v / 1e3:.1f}" for k, v in sorted(w["wall_us_by_call"].items(), key=lambda kv: -kv[1])[:5])
    print(f"  slowest step: {w['connector_ms']:.1f} ms in the connector (GC {w['gc_ms']:.1f} ms): {calls} (ms wall)")


def report_blocking(result: dict[str, Any], ref: dict[str, Any] | None, ref_name: str) -> None:
    b = result["blocking"]
    print(f"\n  scheduler thread's waits for the cache lock: {b['scheduler_lock_waits']} acquisitions, "
          f"p50 {b['wait_us_p50']:.1f} µs, p99 {b['wait_us_p99']:.1f} µs, max {b['wait_us_max']:.1f} µs"
          + (f"   ({ref_name}: p99 {ref['blocking']['wait_us_p99']:.1f} µs, max {ref['blocking']['wait_us_max']:.1f})"
             if ref else ""))
    for name, p99 in sorted(b["holds_us_p99"].items()):
        cpu = b.get("holds_cpu_us_max", {}).get(name, float("nan"))
        print(f"  held by {name or '?'}: p99 {p99:.1f} µs, max {b['holds_us_max'][name]:.1f} µs "
              f"(of which the holder ran {cpu:.1f} µs)")
    if "per_step" in result:
        print(f"  background calls: {b['background_calls']}; connector wall time per step vs part 2: "
              f"{b['connector_us_mean'] / result['per_step']['connector_us_mean']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes, incl. vLLM's import)")
    ap.add_argument("--blocks", type=int, help="blocks per request in part 1 (default 10000; quick 2000)")
    ap.add_argument("--requests", type=int, help="requests in part 1 (default 4; quick 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of part 1 (the best counts)")
    ap.add_argument("--running", type=int, default=256, help="running requests in parts 2 and 3")
    ap.add_argument("--prompt", type=int, help="prompt tokens in parts 2 and 3 (default 1024; quick 512)")
    ap.add_argument("--decode-steps", type=int, help="measured decode steps (default 64; quick 32)")
    ap.add_argument("--batched", type=int, default=16384, help="vLLM's max_num_batched_tokens in parts 2, 3")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--status-hz", type=float, default=200.0, help="status queries per second in part 3")
    ap.add_argument("--export-hz", type=float, default=50.0, help="exports per second in part 3")
    ap.add_argument("--blocking-seconds", type=float, default=10.0, help="least duration of part 3's decode")
    ap.add_argument("--parts", default="1,2,3,4", help="which parts to run (comma-separated)")
    ap.add_argument("--compare", metavar="REF", help="also run REF's code (a git revision) and compare")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    args.blocks = args.blocks or (2000 if args.quick else 10_000)
    args.requests = args.requests or (2 if args.quick else 4)
    args.prompt = args.prompt or (512 if args.quick else 1024)
    args.decode_steps = args.decode_steps or (32 if args.quick else 64)

    ref = None
    if args.compare:
        argv = [a for a in sys.argv[1:] if not a.startswith("--compare") and a != args.compare]
        if "--json" in argv:
            i = argv.index("--json")
            del argv[i:i + 2]
        ref = run_ref(args.compare, argv)
    result = run_all(args)
    result["args"] = vars(args)
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "ref": ref}, indent=1, default=str))
    report(result, ref, args.compare or "")


if __name__ == "__main__":
    main()
