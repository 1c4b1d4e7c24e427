"""Operations as the router sees them, with real processes: ``dynamo.frontend --router-mode kv`` (request
migration on) and two ``dynamo.vllm --connector flexkv`` workers on the tiny model, each with a CPU and an
SSD tier and distributed reuse through a real (password-protected) Redis. The tests share the deployment
and run in order, each leaving it as the next expects:

1. remote hits: a prompt one worker holds, asked of the other (pinned with ``nvext.backend_instance_id``),
   is fetched across "nodes" and counted as ``vllm:flexkv_hit_tokens{tier="remote"}`` on the worker's
   Prometheus endpoint; ``flexkv status`` shows the peers and the blocks fetched and lent;
2. a clean worker stop leaves Redis at once (vLLM kills the engine core that holds the node), and after a
   warm restart the worker's SSD blocks are in the router's disk tier before it served any request, equal
   to what its cache holds; the next request for them is routed there;
3. after a frontend restart (kill -9) the router's per-tier overlap equals what the caches hold again;
4. soak (also `slow`): 1,000 concurrent streaming requests, 30 % cancelled by the client mid-stream: every
   request answered or cleanly cancelled, nothing leaked in either worker (pins, reserved slots, jobs,
   /dev/shm);
5. ``kill -9`` of a worker mid-stream costs no failed request: in-flight streams migrate, later requests
   succeed; the time to recover is printed.

`RouterProbe` is a KvRouter of the test's own on the workers' endpoint: what a (re)started frontend knows.
The expected overlaps come from the workers' caches (``lookup`` by vLLM's block hashes).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dynamo_cluster import (
    WORKER_ENDPOINT,
    Proc,
    Workdir,
    cache_call,
    chunk_tokens,
    complete,
    flexkv_status_cli,
    generate_instances,
    stop_all,
    stream,
    wait_until_serving,
    worker_id,
)
from router_harness import NO_OVERLAP, RouterProbe, vllm_block_hashes
from support import (
    BLOCK_SIZE,
    GPU_BLOCKS,
    RedisServer,
    base_env,
    free_port,
    http_json,
    nothing_pending,
    patched_environ,
    tiny_worker_args,
    wait_for,
)

from flexkv_dynamo.launch_args import free_port_block
from flexkv_dynamo.tiny_model import words

# The deployment starts within the first test's time: three engines on two (busy) cores take minutes.
pytestmark = [pytest.mark.engine, pytest.mark.dynamo, pytest.mark.slow, pytest.mark.servers, pytest.mark.timeout(2400)]

#: Long, so that nothing seen here can be the lease lapsing: a node leaves Redis because it said so.
LEASE_S = 60.0
MIGRATION_LIMIT = 3


@dataclass
class Worker:
    index: int
    cache: str  # its FLEXKV_SERVER_RECV_PORT
    system_port: int  # Dynamo's system server: /health, /metrics
    proc: Proc | None = None
    starts: int = 0

    @property
    def id(self) -> int:
        assert self.proc is not None
        return worker_id(self.proc)


@dataclass
class Deployment:
    workdir: Path
    model_dir: str
    env: dict[str, str]
    worker_argv: list[str]
    http_port: int
    redis: RedisServer
    workers: list[Worker] = field(default_factory=list)
    frontend: Proc | None = None
    frontends: int = 0
    model: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def procs(self) -> list[Proc]:
        return [p for p in [self.frontend, *(w.proc for w in self.workers)] if p is not None]

    def start_frontend(self) -> None:
        self.frontends += 1
        self.frontend = Proc.start(
            f"frontend {self.frontends}",
            [sys.executable, "-m", "dynamo.frontend", "--router-mode", "kv", "--http-host", "127.0.0.1",
             "--http-port", str(self.http_port), "--migration-limit", str(MIGRATION_LIMIT)],
            self.env, self.workdir / f"frontend_{self.frontends}.log")

    def start_worker(self, w: Worker) -> None:
        w.starts += 1
        env = {**self.env, "FLEXKV_SERVER_RECV_PORT": w.cache, "DYN_SYSTEM_PORT": str(w.system_port),
               "FLEXKV_SSD_CACHE_DIR": str(self.workdir / f"ssd{w.index}")}
        w.proc = Proc.start(f"worker {w.index} (start {w.starts})", self.worker_argv, env,
                            self.workdir / f"worker_{w.index}_{w.starts}.log")

    def wait_serving(self, timeout: float = 1200) -> None:
        """Until the frontend serves the model and lists every worker as started now (a restarted worker
        comes back under a new id; its predecessor may still be listed for a while)."""
        self.model = wait_until_serving(self.url, self.procs, workers=len(self.workers), timeout=timeout)

        def listed() -> bool:
            ids = {i.get("instance_id") for i in generate_instances(self.url)}
            try:
                return all(w.id in ids for w in self.workers)
            except AssertionError:  # its relay has not logged its id yet
                return False

        wait_for(listed, timeout, f"every worker's current instance in /health:\n{self.logs()}", interval=1)

    def complete(self, prompt: str, max_tokens: int = 4, worker: Worker | None = None) -> dict[str, Any]:
        extra = {} if worker is None else {"nvext": {"backend_instance_id": worker.id}}
        return complete(self.url, self.model, prompt, max_tokens, **extra)

    def decision(self, answer: dict[str, Any]) -> str:
        """The frontend's routing log line for that answer's request."""
        request_id = answer["id"].split("-", 1)[1]
        assert self.frontend is not None
        lines = [line for line in self.frontend.text().splitlines() if "Selected worker" in line and request_id in line]
        assert lines, f"no routing decision logged for {request_id}:\n{self.frontend.tail()}"
        return lines[0]

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)


@pytest.fixture(scope="module")
def deployment(tiny_model_dir):
    pytest.importorskip("dynamo.llm")
    pytest.importorskip("vllm")
    workdir, shim, hook_python, template = Workdir.make("fxops")
    redis = RedisServer().start()
    env = {**base_env(workdir, shim),
           "FLEXKV_CPU_CACHE_GB": "0.25", "FLEXKV_SSD_CACHE_GB": "0.25",
           "FLEXKV_ENABLE_DISTRIBUTED": "1", "FLEXKV_REDIS_PORT": str(redis.port),
           "FLEXKV_REDIS_PASSWORD": redis.password, "FLEXKV_DIST_LEASE_S": str(LEASE_S),
           "FLEXKV_DIST_SNAPSHOT_INTERVAL_S": "0.25"}
    argv = [str(hook_python), "-m", "dynamo.vllm", "--model", tiny_model_dir, "--connector", "flexkv",
            *tiny_worker_args(tiny_model_dir, template)]
    d = Deployment(workdir, tiny_model_dir, env, argv, free_port(), redis)
    try:
        d.start_frontend()
        for i in range(2):
            w = Worker(i, f"ipc://{workdir}/fx{i}", free_port_block())  # Dynamo wants the port below 32768
            d.workers.append(w)
            d.start_worker(w)
        d.wait_serving()
        yield d
    finally:
        stop_all(d.procs)
        redis.kill()
        if not os.environ.get("FKVTEST_KEEP_DIRS"):
            shutil.rmtree(workdir, ignore_errors=True)


def router_of(d: Deployment) -> RouterProbe:
    """A KvRouter of our own on the deployment's workers. Dynamo's runtime reads its discovery directory and
    loopback hosts from the environment when it starts: the deployment's."""
    with patched_environ({k: v for k, v in d.env.items() if k.startswith("DYN_")}):
        return RouterProbe(WORKER_ENDPOINT, BLOCK_SIZE)


@pytest.fixture(scope="module")
def probe(deployment):
    """A router that has followed the workers' events since the deployment came up."""
    p = router_of(deployment)
    yield p
    p.close()


@dataclass
class Prompt:
    """A prompt of whole blocks, the tokens the frontend makes of it, and vLLM's hashes of those."""

    text: str
    tokens: list[int]
    hashes: list[int]
    first: dict[str, Any] = field(default_factory=dict)  # the answer when it was first computed

    @classmethod
    def of(cls, model_dir: str, n_blocks: int, start: int) -> Prompt:
        from transformers import AutoTokenizer

        from flexkv_dynamo.kv_events import engine_hash_to_int

        text = words(n_blocks * BLOCK_SIZE, start=start)
        tokens = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
        hashes = vllm_block_hashes(tokens, BLOCK_SIZE, seed=os.environ.get("PYTHONHASHSEED", "0"))  # as dynamo.vllm
        return cls(text, tokens, [engine_hash_to_int(h) for h in hashes])

    def held(self, w: Worker) -> dict[str, int]:
        """What the worker's cache holds of it: leading blocks per tier (``lookup``)."""
        return cache_call(w.cache, "lookup", block_hashes=self.hashes)


def distributed(w: Worker) -> dict[str, Any]:
    return cache_call(w.cache, "distributed")


def prometheus(w: Worker, name: str, **labels: str) -> float:
    """Sum of a series on the worker's Prometheus endpoint (Dynamo's system server), as a scraper reads it."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{w.system_port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# ---- 1. remote hits ------------------------------------------------------------------------------------


def test_a_prompt_fetched_from_the_other_worker_counts_as_a_remote_hit(deployment, tiny_model_dir):
    d = deployment
    w0, w1 = d.workers
    p = Prompt.of(tiny_model_dir, 6, start=101)
    first = d.complete(p.text, worker=w0)
    assert first["usage"]["prompt_tokens"] == len(p.tokens)
    wait_for(lambda: p.held(w0)["cpu"] == 6, 30, "worker 0 to hold the prompt")
    wait_for(lambda: distributed(w1)["peer_blocks"] >= 6, 30, "worker 1 to see worker 0's blocks")
    before = prometheus(w1, "vllm:flexkv_hit_tokens_total", tier="remote")

    again = d.complete(p.text, worker=w1)  # only worker 0 holds it: worker 1 fetches it
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 6 * BLOCK_SIZE
    wait_for(lambda: prometheus(w1, "vllm:flexkv_hit_tokens_total", tier="remote") - before == 6 * BLOCK_SIZE,
             60, "the remote hit on worker 1's /metrics")
    fetched, lent = flexkv_status_cli(w1.cache)["distributed"], flexkv_status_cli(w0.cache)["distributed"]
    assert fetched["stats"]["fetched_blocks"] >= 6 and lent["stats"]["lent_blocks"] >= 6
    assert lent["node_id"] in fetched["peers"] and fetched["node_id"] in lent["peers"]


# ---- 2. clean stop, warm restart -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def on_ssd(deployment, tiny_model_dir) -> Prompt:
    """A prompt that worker 0 alone holds, written to its SSD tier."""
    p = Prompt.of(tiny_model_dir, 8, start=211)
    p.first = deployment.complete(p.text, worker=deployment.workers[0])
    wait_for(lambda: p.held(deployment.workers[0])["total"] == 8 and
             cache_call(deployment.workers[0].cache, "status")["pending_writes"] == 0, 60, "the SSD write-back")
    return p


def test_a_clean_stop_leaves_redis_and_a_warm_restart_is_routed_before_any_request(deployment, probe, on_ssd, capsys):
    d = deployment
    w0, w1 = d.workers
    node = distributed(w0)["node_id"]
    r = d.redis.client()
    keys = [k for k in r.keys("flexkv:*") if k.decode().endswith(f":{node}")]
    assert len(keys) == 3  # node info, block set, change log

    t0 = time.monotonic()
    w0.proc.stop()  # SIGTERM to the worker's group, as the launchers stop it; vLLM kills the engine core
    wait_for(lambda: r.exists(*keys) == 0, LEASE_S / 4, "worker 0's keys to leave Redis")
    left = time.monotonic() - t0
    wait_for(lambda: node not in distributed(w1)["peers"], 10, "worker 1 to drop worker 0")

    d.start_worker(w0)  # same SSD directory: its blocks are recovered
    d.wait_serving()
    held = on_ssd.held(w0)
    assert (held["cpu"], held["ssd"]) == (0, 8), held  # recovered from SSD; the CPU pool is a new one
    # No request has reached the restarted worker: the router knows its SSD blocks all the same.
    t1 = time.monotonic()
    # Judge the very answer that showed the disk tier: each announcement round is Cleared-then-Stored, and
    # the router applies them one by one, so a query landing between the two sees nothing for a moment.
    seen = wait_for(lambda: (o := probe.overlaps(on_ssd.tokens).get(w0.id, NO_OVERLAP)).disk == 8 and o, 120,
                    f"the router to see worker 0's disk tier\n{d.logs()}")
    announced = time.monotonic() - t1
    assert seen.tiers == (0, 0, 8)
    assert "announcing what our tiers hold" in w0.proc.text()
    assert cache_call(w0.cache, "in_flight")["requests"] == 0  # still no request there

    ssd_hits = cache_call(w0.cache, "status")["metrics"]["hit_blocks"]["ssd"]
    again = d.complete(on_ssd.text)  # routed by the frontend, not pinned
    decision = d.decision(again)
    assert re.search(rf"\bworker_id={w0.id}\b", decision) and re.search(r"\bdisk_blocks=8\b", decision), decision
    assert cache_call(w0.cache, "status")["metrics"]["hit_blocks"]["ssd"] - ssd_hits == 8
    assert again["choices"][0]["text"] == on_ssd.first["choices"][0]["text"]
    with capsys.disabled():
        print(f"\nclean stop: keys left Redis {left:.2f} s after SIGTERM (lease {LEASE_S:g} s); restarted worker's "
              f"SSD blocks in the router {announced:.2f} s after it served")


# ---- 3. frontend restart -------------------------------------------------------------------------------


def test_after_a_frontend_restart_the_router_knows_every_tier_again(deployment, probe, on_ssd, tiny_model_dir):
    d = deployment
    w0, w1 = d.workers
    # Push the prompt out of worker 0's GPU cache (our CPU tier keeps it): the tiers then differ.
    stored = cache_call(w0.cache, "status")["metrics"]["stored_blocks"]["cpu"]
    for k in range(60):
        if cache_call(w0.cache, "status")["metrics"]["stored_blocks"]["cpu"] >= stored + GPU_BLOCKS + 8:
            break
        d.complete(words(8 * BLOCK_SIZE, start=5000 + 37 * k), max_tokens=1, worker=w0)
    held = on_ssd.held(w0)
    assert held["cpu"] == 8, held
    expected = {w0.id: (0, 8, 0), w1.id: (0, 0, 0)}
    wait_for(lambda: {w: o.tiers for w, o in probe.overlaps(on_ssd.tokens).items()} == expected, 30,
             "the live router to see the prompt in worker 0's CPU tier only")

    d.frontend.kill()  # a crash: nothing is handed over
    d.start_frontend()
    d.wait_serving()
    fresh = router_of(d)  # what the new frontend's router knows
    try:
        wait_for(lambda: {w: o.tiers for w, o in fresh.overlaps(on_ssd.tokens).items()} == expected, 60,
                 "a router started after the restart to know every tier")
        other = Prompt.of(tiny_model_dir, 6, start=101)  # test 1's: in both workers' CPU tiers now
        assert {w: o.tiers for w, o in fresh.overlaps(other.tokens).items()} == \
               {w: o.tiers for w, o in probe.overlaps(other.tokens).items()}
    finally:
        fresh.close()
    again = d.complete(on_ssd.text)
    decision = d.decision(again)
    assert re.search(rf"\bworker_id={w0.id}\b", decision) and re.search(r"\bhost_pinned_blocks=8\b", decision), \
        decision


# ---- 4. soak -------------------------------------------------------------------------------------------

SOAK_REQUESTS = 1000
SOAK_CANCELLED = 0.3


async def _soak_one(session: Any, url: str, model: str, prompt: str, max_tokens: int, cancel_after: int | None
                    ) -> str:
    """One streaming request: 'done' (all tokens, finish_reason, [DONE]), 'cancelled' (we hung up after
    ``cancel_after`` chunks) or an error description."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 1}
    chunks, tokens, finished = 0, 0, None
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            return f"HTTP {resp.status}: {(await resp.text())[:200]}"
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return "done" if finished and tokens == max_tokens else f"ended early ({tokens} tokens, {finished})"
            event = json.loads(data)
            if "error" in event:
                return f"error event: {event['error']}"
            for choice in event.get("choices", []):
                chunks += bool(choice.get("text"))
                tokens += chunk_tokens(choice)  # a slow reader gets several tokens in one chunk
                finished = choice.get("finish_reason") or finished
            if cancel_after is not None and chunks >= cancel_after:
                resp.close()  # the client disconnects mid-stream
                return "cancelled"
    return f"stream ended without [DONE] ({chunks} chunks)"


async def _soak(url: str, model: str, n: int, cancelled: float) -> list[str]:
    import aiohttp

    rng = random.Random(7)
    jobs = []
    for i in range(n):
        # Shared prefixes (a few system prompts) with distinct tails: lookups, loads and stores all happen.
        prompt = words(2 * BLOCK_SIZE, start=rng.randrange(8) * 1000) + " " + words(rng.randrange(8, 96), start=3 * i)
        cancel_after = rng.randrange(1, 8) if rng.random() < cancelled else None
        jobs.append((prompt, rng.randrange(8, 24), cancel_after))
    connector = aiohttp.TCPConnector(limit=n)
    timeout = aiohttp.ClientTimeout(total=1200)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return await asyncio.gather(*(_soak_one(session, url, model, *job) for job in jobs), return_exceptions=False)


def shm_pools_of(pid: int) -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"flexkv-{pid}-")}


def test_soak_concurrent_streams_with_cancellations_leak_nothing(deployment, capsys):
    d = deployment
    owners = {w.index: cache_call(w.cache, "whoami")["pid"] for w in d.workers}  # the engine cores
    pools = {w.index: cache_call(w.cache, "status")["pool"] for w in d.workers}
    for w in d.workers:
        assert shm_pools_of(owners[w.index]) == {pools[w.index]}
    t0 = time.monotonic()
    results = asyncio.run(_soak(d.url, d.model, SOAK_REQUESTS, SOAK_CANCELLED))
    took = time.monotonic() - t0
    counts = {k: sum(r == k for r in results) for k in ("done", "cancelled")}
    bad = [r for r in results if r not in counts]
    assert not bad, f"{len(bad)} requests failed, e.g. {bad[:5]}\n{d.logs()}"
    assert counts["cancelled"] >= 0.2 * SOAK_REQUESTS and counts["done"] >= 0.6 * SOAK_REQUESTS

    def quiescent(w: Worker) -> dict[str, Any] | None:
        status = cache_call(w.cache, "status")
        tiers = status["tiers"]
        ok = (cache_call(w.cache, "in_flight") == {"waiting_loads": 0, "loads": 0, "stores": 0, "requests": 0}
              and all(t["pinned_blocks"] == 0 and t["used_slots"] == t["ready_blocks"] for t in tiers.values())
              and nothing_pending(status))
        return status if ok else None

    for w in d.workers:
        wait_for(lambda w=w: quiescent(w), 120, f"worker {w.index} to let go of everything: "
                 f"{cache_call(w.cache, 'in_flight')} {cache_call(w.cache, 'status')['tiers']}")
        assert shm_pools_of(owners[w.index]) == {pools[w.index]}  # no CPU pool but its own in /dev/shm
    assert d.complete(words(40, start=77))["choices"][0]["text"]  # and both still serve
    with capsys.disabled():
        print(f"\nsoak: {SOAK_REQUESTS} concurrent streams in {took:.1f} s: {counts['done']} answered, "
              f"{counts['cancelled']} cancelled by the client, 0 failed; nothing left pinned, reserved or in flight")


# ---- 5. kill -9 of a worker ----------------------------------------------------------------------------


def test_a_killed_worker_costs_no_failed_request(deployment, capsys):
    """``kill -9`` of a worker's whole process group while streams run on both: the frontend migrates the
    dead worker's streams (``--migration-limit``) and routes new requests elsewhere."""
    import concurrent.futures as cf

    d = deployment
    victim, survivor = d.workers
    max_tokens = 200

    def run(i: int) -> tuple[int, float, float]:
        """(tokens streamed, when it started, when it ended)."""
        start = time.monotonic()
        n = sum(chunk_tokens(c["choices"][0]) for c in stream(d.url, d.model, words(64, start=900 + 11 * i),
                                                               max_tokens))
        return n, start, time.monotonic()

    with cf.ThreadPoolExecutor(max_workers=16) as pool:
        before = [pool.submit(run, i) for i in range(8)]
        wait_for(lambda: cache_call(victim.cache, "in_flight")["requests"] > 0, 60, "streams on the victim")
        killed = time.monotonic()
        victim.proc.kill()  # kill -9 of the worker and its engine core
        after: list[cf.Future] = []
        for k in range(12):  # new requests keep coming while the frontend finds out
            after.append(pool.submit(run, 100 + k))
            time.sleep(0.25)
        results = [f.result(timeout=600) for f in before + after]
    assert all(n == max_tokens for n, _, _ in results), [n for n, _, _ in results]  # every stream complete
    wait_for(lambda: len(generate_instances(d.url)) == 1, 120, "the frontend to drop the dead worker")
    gone = time.monotonic() - killed
    slowest_after = max(end - start for _, start, end in results[len(before):])
    typical = sorted(end - start for _, start, end in results[len(before):])[len(after) // 2]
    assert http_json(f"{d.url}/v1/completions", {"model": d.model, "prompt": words(20), "max_tokens": 2})["choices"]
    with capsys.disabled():
        print(f"\nkill -9 of a worker mid-stream: {len(before)} in-flight streams migrated, {len(after)} later "
              f"requests all answered (slowest {slowest_after:.1f} s, median {typical:.1f} s for {max_tokens} "
              f"tokens); the frontend listed the dead worker for {gone:.1f} s")
