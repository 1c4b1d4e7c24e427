"""Decode inter-token latency while long prefills of other requests are stored: FlexKV vs vLLM alone.

    .venv/bin/python bench/bench_itl.py                       # SmolLM2-135M-shaped model, 3 rounds
    .venv/bin/python bench/bench_itl.py --quick               # one short round (a smoke test)
    .venv/bin/python bench/bench_itl.py --model DIR --rounds 5 --json out.json

Two engines run side by side, each in its own engine-core process as a served vLLM runs (one with the
FlexKV connector, one with no connector), on the same model. In each round both get the same workload,
one after the other (the order alternates between rounds, so drift on a shared machine hits both):

* ``--decoders`` requests with short prompts decode for ``--decode-steps`` steps (greedy, no EOS);
* every ``--long-every`` decode steps a request with a fresh ``--long-tokens``-token prompt arrives and
  runs its prefill (one output token). With FlexKV its KV is stored into the CPU tier: those are the
  stores the decoders run beside.

Before that, right after each engine starts, two cold ``--long-tokens`` prompts run one after the other:
the first request's extra latency (its time minus the second's) with FlexKV, less the same with vLLM
alone, is what setting up our side costs the first request (attaching the pool, first touch of its pages;
on a GPU, waiting for the first pinned chunk).

The inter-token latency of the decoders is the time between two of their tokens, taken where the outputs
arrive (``LLMEngine.step``). The headline is the ratio of the median (p50) ITL, FlexKV / vLLM alone, per
round and pooled over rounds (target <= 1.03); p90 and the median over the intervals that contain no prefill
step are shown too. ``--model`` takes any Hugging Face directory vLLM loads; without it the real SmolLM2-135M
(``flexkv_dynamo.models``, when that module is installed) or else a random Llama of SmolLM2-135M's shape
(30 layers, hidden 576, 9 heads, 3 KV heads of 64, 49,152 words) made at run time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("bench_itl")

BLOCK_SIZE = 32
FLEXKV_TRANSFER_CONFIG = {"kv_connector": "FlexKVConnector", "kv_connector_module_path": "flexkv_dynamo.connector",
                          "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}


@dataclass
class Samples:
    itl: list[float] = field(default_factory=list)  # every decoder interval, seconds
    itl_no_prefill: list[float] = field(default_factory=list)  # intervals during which no prefill ran
    long_done: int = 0
    seconds: float = 0.0


def model_dir(args: argparse.Namespace, workdir: str) -> str:
    if args.model:
        return args.model
    try:
        from flexkv_dynamo.models import ensure_model  # the real SmolLM2-135M, where that module exists

        return str(ensure_model())
    except ImportError:
        pass
    from flexkv_dynamo.tiny_model import TinyModelSpec, make_tiny_model

    spec = TinyModelSpec(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                         vocab_words=49152, max_positions=8192)
    log.info("no --model and no flexkv_dynamo.models: a random Llama of SmolLM2-135M's shape")
    return make_tiny_model(os.path.join(workdir, "model"), spec)


def start(model: str, flexkv: bool, workdir: str, args: argparse.Namespace) -> Any:
    from vllm import LLM

    from flexkv_core.config import patched_environ
    from flexkv_dynamo.local_cluster import cpu_share

    # The same cores for both engines, set explicitly: vLLM's automatic binding reserves cores depending on
    # whether a connector is configured, which alone made the two engines' prefills differ by 1.9x here.
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gb),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or cpu_share(0, 1)}
    if flexkv:
        env.update({"ENABLE_FLEXKV": "1", "FLEXKV_CPU_CACHE_GB": str(args.cpu_gb),
                    "FLEXKV_SSD_CACHE_GB": str(args.ssd_gb), "FLEXKV_SSD_CACHE_DIR": os.path.join(workdir, "ssd"),
                    "FLEXKV_SERVER_RECV_PORT": f"ipc://{os.path.join(workdir, 'svc.sock')}"})
    with patched_environ(env):  # the engine-core process inherits them
        return LLM(model=model, dtype="float32", block_size=BLOCK_SIZE, max_model_len=args.max_model_len,
                   max_num_batched_tokens=args.max_batched_tokens, enable_prefix_caching=True, seed=0,
                   kv_transfer_config=FLEXKV_TRANSFER_CONFIG if flexkv else None)


def first_requests(llm: Any, args: argparse.Namespace, vocab: int) -> tuple[float, float]:
    """Latency of the first request after start and of the second (cold prompts, one output token)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    rng = random.Random(7)
    times = []
    for i in range(2):
        start = time.perf_counter()
        engine.add_request(f"first{i}", {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(args.long_tokens)]},
                           params)
        while engine.has_unfinished_requests():
            engine.step()
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def run_workload(llm: Any, tag: str, args: argparse.Namespace, rng: random.Random, vocab: int,
                 decode_steps: int) -> Samples:
    from vllm import SamplingParams

    engine = llm.llm_engine
    decode = SamplingParams(max_tokens=decode_steps + 64, temperature=0.0, ignore_eos=True, detokenize=False)
    prefill = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    decoders = [f"{tag}-d{i}" for i in range(args.decoders)]
    for rid in decoders:
        engine.add_request(rid, {"prompt_token_ids": tokens(args.decode_prompt_tokens)}, decode)
    seen = dict.fromkeys(decoders, 0)
    last: dict[str, float] = {}
    while len(last) < len(decoders):  # every decoder has its first token: from here on, it decodes
        for out in engine.step():
            if out.request_id in seen and out.outputs[0].token_ids:
                seen[out.request_id] = len(out.outputs[0].token_ids)
                last[out.request_id] = time.perf_counter()

    samples = Samples()
    longs: set[str] = set()
    in_prefill = dict.fromkeys(decoders, False)  # a long request was in flight during the current interval
    steps = 0
    start = time.perf_counter()
    while steps < decode_steps:
        if steps % args.long_every == 0 and f"{tag}-l{steps}" not in seen:
            rid = f"{tag}-l{steps}"
            seen[rid] = 0
            longs.add(rid)
            engine.add_request(rid, {"prompt_token_ids": tokens(args.long_tokens)}, prefill)
            in_prefill.update(dict.fromkeys(decoders, True))
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            if out.request_id in longs and out.finished:
                longs.discard(out.request_id)
                samples.long_done += 1
        decoded = False
        for out in outs:
            rid = out.request_id
            n = len(out.outputs[0].token_ids)
            if rid not in last or n <= seen[rid]:
                continue
            gap = (now - last[rid]) / (n - seen[rid])
            samples.itl.extend([gap] * (n - seen[rid]))
            if not in_prefill[rid]:
                samples.itl_no_prefill.extend([gap] * (n - seen[rid]))
            in_prefill[rid] = bool(longs)
            seen[rid], last[rid] = n, now
            decoded = True
        steps += decoded
    samples.seconds = time.perf_counter() - start
    engine.abort_request(decoders)
    deadline = time.monotonic() + 600
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        engine.step()
    return samples


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Hugging Face model directory (default: see above)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decoders", type=int, default=4, help="decoding requests (default 4)")
    ap.add_argument("--decode-prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=240, help="decode steps measured per round")
    ap.add_argument("--long-tokens", type=int, default=2000, help="prompt length of the long requests")
    ap.add_argument("--long-every", type=int, default=24, help="a long request every this many decode steps")
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--kv-cache-gb", type=float, default=2, help="vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--cpu-gb", type=float, default=2, help="FlexKV CPU tier")
    ap.add_argument("--ssd-gb", type=float, default=0, help="FlexKV SSD tier (0: none)")
    ap.add_argument("--quick", action="store_true", help="one short round: --rounds 1 --decode-steps 60")
    ap.add_argument("--json", help="write the samples and ratios here")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.decode_steps = 1, 60
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    workdir = tempfile.mkdtemp(prefix="fkvitl", dir="/tmp")  # short: the service socket path is limited
    engines: dict[str, Any] = {}
    results: dict[str, list[Samples]] = {"flexkv": [], "plain": []}
    try:
        model = model_dir(args, workdir)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model).vocab_size
        first: dict[str, tuple[float, float]] = {}
        engines["plain"] = start(model, False, workdir, args)
        first["plain"] = first_requests(engines["plain"], args, vocab)
        engines["flexkv"] = start(model, True, workdir, args)
        first["flexkv"] = first_requests(engines["flexkv"], args, vocab)
        rng = random.Random(0)
        for name, llm in engines.items():  # warm-up: compilation, first touch of memory
            run_workload(llm, f"warm-{name}", args, rng, vocab, decode_steps=max(8, args.long_every // 2))
        for r in range(args.rounds):
            order = ["plain", "flexkv"] if r % 2 == 0 else ["flexkv", "plain"]
            for name in order:
                s = run_workload(engines[name], f"r{r}-{name}", args, random.Random(1000 + r), vocab,
                                 args.decode_steps)
                results[name].append(s)
                log.info("round %d %s: ITL p50 %.2f ms p90 %.2f ms (%d samples, %d prefills, %.1f s)", r, name,
                         pct(s.itl, 0.5) * 1e3, pct(s.itl, 0.9) * 1e3, len(s.itl), s.long_done, s.seconds)
    finally:
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    def pooled(name: str, attr: str) -> list[float]:
        return [x for s in results[name] for x in getattr(s, attr)]

    ratios = [pct(f.itl, 0.5) / pct(p.itl, 0.5) for f, p in zip(results["flexkv"], results["plain"])]
    extra = {k: (a - b) * 1e3 for k, (a, b) in first.items()}
    print(f"\nFirst request after start, {args.long_tokens}-token prompt (ms): vLLM alone {first['plain'][0] * 1e3:.0f} "
          f"then {first['plain'][1] * 1e3:.0f}; FlexKV {first['flexkv'][0] * 1e3:.0f} then {first['flexkv'][1] * 1e3:.0f}; "
          f"extra latency of FlexKV's first request: {extra['flexkv'] - extra['plain']:+.0f} ms")
    print(f"\nDecode ITL, {args.decoders} decoders, a {args.long_tokens}-token prefill every {args.long_every} decode "
          f"steps, {args.rounds} rounds x {args.decode_steps} steps (ms; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores)")
    print(f"  {'':<24} {'p50':>7} {'p90':>7} {'p50 no prefill':>15}")
    for name, label in (("plain", "vLLM alone"), ("flexkv", "FlexKV")):
        print(f"  {label:<24} {pct(pooled(name, 'itl'), 0.5) * 1e3:7.2f} {pct(pooled(name, 'itl'), 0.9) * 1e3:7.2f} "
              f"{pct(pooled(name, 'itl_no_prefill'), 0.5) * 1e3:15.2f}")
    pooled_ratio = pct(pooled("flexkv", "itl"), 0.5) / pct(pooled("plain", "itl"), 0.5)
    quiet_ratio = pct(pooled("flexkv", "itl_no_prefill"), 0.5) / pct(pooled("plain", "itl_no_prefill"), 0.5)
    print(f"ITL p50 FlexKV / vLLM alone: pooled {pooled_ratio:.3f}, per round "
          f"{' '.join(f'{x:.3f}' for x in ratios)} (median {statistics.median(ratios):.3f}; target <= 1.03); "
          f"intervals with no prefill: {quiet_ratio:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "ratios": ratios, "pooled_ratio": pooled_ratio, "first_requests": first,
                       "no_prefill_ratio": quiet_ratio,
                       "samples": {k: [vars(s) for s in v] for k, v in results.items()}}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
