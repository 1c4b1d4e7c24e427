"""``python -m flexkv_dynamo.demo``: one vLLM engine with FlexKV, a long prompt served three ways.

Everything is embedded, nothing is downloaded: a tiny random Llama is written to a temporary directory,
one vLLM engine starts in this process with our connector (a small CPU tier and an SSD tier, both in
temporary space), and the same long prompt runs

1. cold (computed),
2. after ``reset_prefix_cache()``: vLLM's own prefix cache is empty, the KV comes from our CPU tier,
3. after the CPU tier is emptied too: the KV comes from our SSD tier.

It prints a table (time to first token, whether the output is identical to the cold run, the tokens
vLLM reports as cached, and the tokens each of our tiers served) and exits 1 if any output differs.
About two minutes here, most of it vLLM starting up.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("flexkv_dynamo.demo")

BLOCK_SIZE = 32  # the CPU attention backend needs a multiple of 32


@dataclass
class Timed:
    """One request's result, timed by stepping the engine ourselves."""

    tokens: list[int]
    ttft_s: float  # request added -> first output token
    total_s: float
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
    total = time.perf_counter() - start
    if last is None or ttft is None:
        raise RuntimeError(f"request {request_id} produced no output")
    return Timed(list(last.outputs[0].token_ids), ttft, total, last.num_cached_tokens or 0)


def flexkv_scheduler(llm: Any) -> Any:
    """The scheduler side of our connector in an in-process engine."""
    return llm.llm_engine.engine_core.engine_core.scheduler.connector.scheduler_side


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexkv_dynamo.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="length of the prompt (default 2048)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate (default 16)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    workdir = tempfile.mkdtemp(prefix="fkvdemo", dir="/tmp")  # short: the service socket path is limited
    # The engine runs in this process (so the demo can empty our CPU tier between runs), with a small
    # KV cache and our cache living in the temporary directory.
    os.environ.update({
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "ENABLE_FLEXKV": "1",
        "FLEXKV_CPU_CACHE_GB": "0.25",
        "FLEXKV_SSD_CACHE_GB": "0.5",
        "FLEXKV_SSD_CACHE_DIR": os.path.join(workdir, "ssd"),
        "FLEXKV_SERVER_RECV_PORT": f"ipc://{os.path.join(workdir, 'svc.sock')}",
    })
    llm = None
    try:
        from .tiny_model import make_tiny_model

        model_dir = make_tiny_model(os.path.join(workdir, "model"))
        from vllm import LLM

        from flexkv_core.layout import Tier

        log.info("starting vLLM with FlexKVConnector (about a minute)")
        llm = LLM(model=model_dir, dtype="float32", block_size=BLOCK_SIZE,
                  max_model_len=max(4096, args.prompt_tokens + args.max_tokens + BLOCK_SIZE),
                  max_num_batched_tokens=1024, enable_prefix_caching=True, seed=0,
                  kv_transfer_config={"kv_connector": "FlexKVConnector",
                                      "kv_connector_module_path": "flexkv_dynamo.connector",
                                      "kv_role": "kv_both", "kv_load_failure_policy": "recompute"})
        fk = flexkv_scheduler(llm)
        rng = random.Random(7)
        prompt = [rng.randrange(3, 2003) for _ in range(args.prompt_tokens)]

        rows = []
        cold = None
        for run in ("cold", "CPU tier hit", "SSD tier hit"):
            if run == "CPU tier hit":
                llm.reset_prefix_cache()
            elif run == "SSD tier hit":
                fk.cache.flush(timeout=60)
                dropped = fk.cache.evict_all(Tier.CPU)
                log.info("emptied the CPU tier (%d blocks; their SSD copies stay)", dropped)
                llm.reset_prefix_cache()
            before = fk.cache.stats()["metrics"]["hit_blocks"]
            result = timed_generate(llm, prompt, args.max_tokens, request_id=run)
            after = fk.cache.stats()["metrics"]["hit_blocks"]
            cold = cold or result
            rows.append((run, result, {t: (after[t] - before[t]) * BLOCK_SIZE for t in ("cpu", "ssd")}))
            log.info("%s: TTFT %.1f ms, %d cached tokens", run, result.ttft_s * 1e3, result.num_cached_tokens)
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    header = f"{'run':<14} {'TTFT ms':>8} {'identical':>9} {'cached':>7} {'CPU hit':>8} {'SSD hit':>8}"
    lines = [f"prompt: {args.prompt_tokens} tokens, {args.max_tokens} generated, block size {BLOCK_SIZE}", header,
             "-" * len(header)]
    all_same = True
    for run, result, hit in rows:
        same = result.tokens == cold.tokens
        all_same &= same
        lines.append(f"{run:<14} {result.ttft_s * 1e3:>8.1f} {'yes' if same else 'NO':>9} "
                     f"{result.num_cached_tokens:>7} {hit['cpu']:>8} {hit['ssd']:>8}")
    sys.stdout.write("\n".join(lines) + "\n")
    if not all_same:
        log.error("outputs differ from the cold run: the cache returned wrong KV")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
