"""``python -m flexkv_dynamo.demo``: a multi-turn chat behind Dynamo's KV router, its history served by our tiers.

What it starts (and stops, also on Ctrl-C): Dynamo's frontend with ``--router-mode kv`` and two
``python -m dynamo.vllm --connector flexkv`` workers serving the real model (SmolLM2-135M-Instruct, see
`flexkv_dynamo.models`), with file discovery and Dynamo's ZMQ event plane on loopback (no etcd, no NATS).
Each worker has a small vLLM KV cache (the "GPU" tier: on this machine vLLM keeps it in host memory), a
CPU tier and an SSD tier.

Then a user chats about a document (the Apache License that ships with the model) through the
OpenAI-compatible endpoint, each turn sending the whole conversation, while other users' long prompts
(fillers, two at a time so that both workers get them) push the conversation out of the workers' caches:

1. turn 1: nothing is cached: computed;
2. other users' prompts fill both GPU caches; turn 2: its history comes back from our CPU tier;
3. more prompts overflow the CPU tiers as well; turn 3: its history comes back from our SSD tier;
4. turn 4 right after: vLLM's own prefix cache (GPU).

Per turn it prints the worker the router chose, where the prompt's tokens came from (GPU = vLLM's prefix
cache, CPU and SSD = our tiers, counted by each worker's cache service, recomputed = the rest), the time to
first token seen by the client (streaming), and the answer. Then every cache is emptied (Dynamo's
``/engine/flush_cache``, which also empties our tiers) before each turn is served again cold, and the two
are printed side by side. Exit status 1 if an answer differs from its cold run, or if our tiers served
nothing. A few minutes here, most of it two vLLM engines starting on two cores.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .local_cluster import ClusterError, LocalCluster, Worker, WorkerKind, get_json
from .models import GGUF_DISTRIBUTION, KV_BYTES_PER_TOKEN, MODEL_NAME, ModelPrepError, ensure_model

log = logging.getLogger("flexkv_dynamo.demo")

BLOCK_SIZE = 32  # vLLM's CPU attention backend needs a multiple of 32
MAX_MODEL_LEN = 2048
#: vLLM's KV cache per worker, in blocks: the least that holds one request of MAX_MODEL_LEN tokens, so
#: that a couple of other prompts push a conversation out of it.
GPU_BLOCKS = MAX_MODEL_LEN // BLOCK_SIZE + 4
FILLER_TOKENS = 1800  # about 56 blocks
#: Our CPU tier holds this many fillers' worth of blocks: one filler per worker leaves the conversation in
#: it, FILLERS_TO_OVERFLOW_CPU per worker push it out to SSD only.
CPU_TIER_FILLERS = 2.5
FILLERS_TO_OVERFLOW_CPU = 3
SSD_GB = 1.0
ANSWER_TOKENS = 40

QUESTIONS = (
    "In one sentence: what does this license let me do with the software?",
    "What does it say about patents?",
    "Can I use the Apache name or logo?",
    "Is there any warranty?",
)
#: Which source each turn's history is expected to come from (the demo reports any difference).
EXPECTED = ("computed", "CPU", "SSD", "GPU")


# ---- the conversation's material -----------------------------------------------------------------------


def license_text() -> str:
    """Sections 2-9 of the Apache License 2.0 shipped with the model's package, whitespace folded."""
    text = importlib.metadata.distribution(GGUF_DISTRIBUTION).read_text("LICENSE") or ""
    start, end = text.find("2. Grant of Copyright License"), text.find("END OF TERMS AND CONDITIONS")
    if start < 0 or end < 0:
        raise RuntimeError(f"{GGUF_DISTRIBUTION}'s LICENSE is not the Apache License 2.0 this demo quotes")
    return re.sub(r"\s+", " ", text[start:end]).strip()


def filler_text(k: int, words: list[str], tokens: int) -> str:
    """Another user's long prompt, unlike every other (its first block differs, so nothing is shared)."""
    start = (k * 97) % len(words)
    count = int(tokens * 0.75)  # this text has about 1.3 tokens per word
    return f"Request {k} from another user. Summarise: " + " ".join(
        words[(start + i) % len(words)] for i in range(count))


# ---- one streamed chat request -------------------------------------------------------------------------


@dataclass
class Reply:
    text: str
    ttft_s: float  # request sent -> first content token received (what a user waits for)
    prompt_tokens: int
    cached_tokens: int  # vLLM's count: its own prefix hits plus what a connector loaded
    worker_id: int | None


def chat(url: str, model: str, messages: list[dict[str, str]], max_tokens: int, timeout: float = 600.0) -> Reply:
    """One streamed, greedy chat completion through the frontend, timed from the client's side."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "nvext": {"extra_fields": ["worker_id"]}}
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"chat request failed: HTTP {resp.status}: {resp.read()[:500]!r}")
        text, ttft, usage, worker = [], None, {}, None
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text.append(piece)
            usage = chunk.get("usage") or usage
            ids = (chunk.get("nvext") or {}).get("worker_id") or {}
            worker = ids.get("decode_worker_id", worker)
    finally:
        conn.close()
    if ttft is None:
        raise RuntimeError("the chat request streamed no content")
    details = usage.get("prompt_tokens_details") or {}
    return Reply("".join(text), ttft, int(usage.get("prompt_tokens", 0)), int(details.get("cached_tokens") or 0),
                 worker)


# ---- where a prompt's tokens came from -----------------------------------------------------------------


def tier_hits(worker: Worker) -> dict[str, int]:
    """Blocks each of our tiers has served so far on this worker, from its cache service (`flexkv status`)."""
    from flexkv_core.client import CacheClient

    assert worker.cache_endpoint is not None
    with CacheClient(worker.cache_endpoint, timeout_s=10) as client:
        hits = client.call("status")["metrics"]["hit_blocks"]
    return {"cpu": int(hits.get("cpu", 0)), "ssd": int(hits.get("ssd", 0))}


@dataclass
class Turn:
    number: int
    question: str
    reply: Reply
    worker: int | None  # index of the worker the router chose
    sources: dict[str, int]  # tokens: GPU, CPU, SSD, recomputed
    cold: Reply | None = None

    @property
    def main_source(self) -> str:
        reused = {k: v for k, v in self.sources.items() if k != "recomputed"}
        best = max(reused, key=lambda k: reused[k])
        return best if reused[best] >= BLOCK_SIZE else "computed"


@dataclass
class Demo:
    cluster: LocalCluster
    model: str
    document: str
    say: Callable[[str], None]
    messages: list[dict[str, str]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    fillers_sent: int = 0

    def worker_index(self, instance_id: int | None) -> int | None:
        for worker in self.cluster.workers:
            if instance_id is not None and worker.instance_id() == instance_id:
                return worker.index
        return None

    def ask(self, number: int, question: str) -> Turn:
        content = question if self.messages else f"Here is a license:\n\n{self.document}\n\n{question}"
        self.messages.append({"role": "user", "content": content})
        before = [tier_hits(w) for w in self.cluster.workers]
        reply = chat(self.cluster.url, self.model, self.messages, ANSWER_TOKENS)
        after = [tier_hits(w) for w in self.cluster.workers]
        self.messages.append({"role": "assistant", "content": reply.text})
        cpu = sum(a["cpu"] - b["cpu"] for a, b in zip(after, before)) * BLOCK_SIZE
        ssd = sum(a["ssd"] - b["ssd"] for a, b in zip(after, before)) * BLOCK_SIZE
        sources = {"GPU": max(0, reply.cached_tokens - cpu - ssd), "CPU": cpu, "SSD": ssd,
                   "recomputed": reply.prompt_tokens - reply.cached_tokens}
        turn = Turn(number, question, reply, self.worker_index(reply.worker_id), sources)
        self.turns.append(turn)
        self.say(describe_turn(turn))
        return turn

    def push_out(self, per_worker: int, why: str, words: list[str]) -> None:
        """Other users' prompts, two at a time (the router spreads concurrent requests over both workers),
        until every worker has served ``per_worker`` of them."""
        workers = len(self.cluster.workers)
        served = [0] * workers
        sent = 0
        with ThreadPoolExecutor(max_workers=workers) as pool:
            while min(served) < per_worker and sent < 3 * per_worker * workers:
                batch = list(range(self.fillers_sent, self.fillers_sent + workers))
                self.fillers_sent += workers
                sent += workers
                replies = list(pool.map(lambda k: chat(self.cluster.url, self.model, [
                    {"role": "user", "content": filler_text(k, words, FILLER_TOKENS)}], 1), batch))
                for reply in replies:
                    index = self.worker_index(reply.worker_id)
                    if index is not None:
                        served[index] += 1
        self.say(f"\n... other users sent {sent} long prompts ({why}); workers served {served}")

    def serve_cold(self) -> None:
        """Each turn again after every cache was emptied: the cold reference."""
        self.say("\n... emptying every cache (Dynamo's /engine/flush_cache on each worker, which also empties "
                 "our tiers), then serving each turn again cold")
        for turn in self.turns:
            for worker in self.cluster.workers:
                answer = get_json(f"http://127.0.0.1:{worker.system_port}/engine/flush_cache", {}, timeout=120)
                if answer.get("status") != "ok":
                    raise RuntimeError(f"flush_cache on worker {worker.index}: {answer}")
            history = self.messages[: 2 * turn.number - 1]
            turn.cold = chat(self.cluster.url, self.model, history, ANSWER_TOKENS)


def describe_turn(turn: Turn) -> str:
    s = turn.sources
    where = "worker ?" if turn.worker is None else f"worker {turn.worker}"
    return (f"\nturn {turn.number}: {turn.question}\n"
            f"  router chose {where}; prompt {turn.reply.prompt_tokens:,} tokens: GPU {s['GPU']:,} | "
            f"CPU {s['CPU']:,} | SSD {s['SSD']:,} | recomputed {s['recomputed']:,}\n"
            f"  TTFT {turn.reply.ttft_s * 1e3:,.0f} ms\n"
            f"  answer: {turn.reply.text.strip()!r}")


def summary(turns: list[Turn]) -> tuple[str, bool]:
    """The side-by-side table, and whether every answer equals its cold run."""
    head = (f"{'turn':<5} {'worker':>6} {'history from':<12} {'prompt':>7} {'GPU':>6} {'CPU':>6} {'SSD':>6} "
            f"{'recomp.':>7} {'TTFT ms':>8} {'cold ms':>8} {'speed-up':>8}  same answer as cold")
    lines = [head, "-" * len(head)]
    same_all = True
    for t in turns:
        cold = t.cold or t.reply
        same = t.reply.text == cold.text
        same_all &= same
        s = t.sources
        lines.append(f"{t.number:<5} {'?' if t.worker is None else t.worker:>6} {t.main_source:<12} "
                     f"{t.reply.prompt_tokens:>7,} {s['GPU']:>6,} {s['CPU']:>6,} {s['SSD']:>6,} {s['recomputed']:>7,} "
                     f"{t.reply.ttft_s * 1e3:>8,.0f} {cold.ttft_s * 1e3:>8,.0f} {cold.ttft_s / t.reply.ttft_s:>7.1f}x  "
                     f"{'yes' if same else 'NO'}")
    for t in turns:
        if t.cold is not None and t.cold.text != t.reply.text:
            lines.append(f"turn {t.number} differs:\n  cached: {t.reply.text!r}\n  cold:   {t.cold.text!r}")
    return "\n".join(lines), same_all


# ---- main ---------------------------------------------------------------------------------------------


def worker_env(cpu_blocks: int) -> dict[str, str]:
    cpu_gb = cpu_blocks * BLOCK_SIZE * KV_BYTES_PER_TOKEN / 2**30
    return {"VLLM_CPU_KVCACHE_SPACE": "1", "FLEXKV_CPU_CACHE_GB": f"{cpu_gb:.4f}"}


def worker_args() -> list[str]:
    return ["--block-size", str(BLOCK_SIZE), "--max-model-len", str(MAX_MODEL_LEN),
            "--num-gpu-blocks-override", str(GPU_BLOCKS), "--enforce-eager", "--dtype", "float32",
            "--distributed-executor-backend", "uni"]


def run(workdir: Path, say: Callable[[str], None], ready_timeout_s: float) -> int:
    model_dir = str(ensure_model())
    document = license_text()
    words = document.split()
    filler_blocks = FILLER_TOKENS // BLOCK_SIZE
    cpu_blocks = int(CPU_TIER_FILLERS * filler_blocks)
    say(f"model {MODEL_NAME} ({model_dir}); per worker: vLLM cache {GPU_BLOCKS} blocks of {BLOCK_SIZE} tokens, "
        f"our CPU tier {cpu_blocks} blocks, SSD tier {SSD_GB:g} GiB")
    with LocalCluster(workdir) as cluster:
        cluster.start_frontend()
        for _ in range(2):
            cluster.start_worker(model_dir, WorkerKind.FLEXKV, count=2, args=worker_args(),
                                 env=worker_env(cpu_blocks), ssd_gb=SSD_GB)
        say(f"starting Dynamo's frontend (KV router) and two dynamo.vllm --connector flexkv workers "
            f"(logs: {workdir}; a few minutes on two cores)")
        started = time.monotonic()
        served = cluster.wait_ready(ready_timeout_s, progress=lambda state: log.info("%s", state))
        say(f"serving after {time.monotonic() - started:.0f} s at {cluster.url}")

        demo = Demo(cluster, served, document, say)
        demo.ask(1, QUESTIONS[0])
        demo.push_out(1, "they take both workers' vLLM caches; our CPU tiers keep the conversation", words)
        demo.ask(2, QUESTIONS[1])
        demo.push_out(FILLERS_TO_OVERFLOW_CPU, "they overflow our CPU tiers too; the SSD tiers keep it", words)
        demo.ask(3, QUESTIONS[2])
        demo.ask(4, QUESTIONS[3])
        demo.serve_cold()

    table, same = summary(demo.turns)
    say("\n" + table)
    served_by_tiers = sum(t.sources["CPU"] + t.sources["SSD"] for t in demo.turns)
    for turn, expected in zip(demo.turns, EXPECTED):
        if turn.main_source != expected:
            log.warning("turn %d's history came mostly from %s, not %s as planned (routing or eviction went "
                        "otherwise on this run)", turn.number, turn.main_source, expected)
    if not same:
        log.error("an answer differs from its cold run: the cache returned wrong KV")
        return 1
    if not served_by_tiers:
        log.error("our tiers served no token: the conversation was never loaded from CPU or SSD")
        return 1
    say("\nevery answer is identical to its cold run")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexkv_dynamo.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="logs and SSD files (default: a temporary directory, "
                        "removed at the end)")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the workers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Ctrl-C and SIGTERM (a CI timeout, `kill`) unwind: the cluster's context manager stops every process.
    # SIGINT explicitly too: a shell starts background jobs with it ignored, and Python then keeps it so.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def say(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="flexkv_demo_"))
    try:
        return run(workdir, say, args.ready_timeout)
    except (ClusterError, ModelPrepError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.warning("interrupted: everything the demo started is stopped")
        return 130
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif os.path.isdir(workdir):
            log.info("logs kept in %s", workdir)


if __name__ == "__main__":
    sys.exit(main())
