"""The scheduler side of the connector under vLLM's real scheduler, without an engine (`DryEngine`).

vLLM's `Scheduler` admits, chunks, preempts, aborts and resets for real and calls our connector exactly as
an engine does; only the model and the workers are stand-ins, and a block's content is its hash (a tag)
instead of KV bytes. What is checked, each time in a few seconds:

* every load delivers the block the request needs (`DryEngine.wrong_loads` stays empty), through
  preemption, aborts (also while a load is being staged from SSD) and failed store jobs;
* nothing leaks: no job, pin or slot of ours outlives the requests, and vLLM gets all its blocks back;
* a tier too small for the requests stores a whole prefix of each chain and never announces a block
  whose parent is in none of our tiers (Stored events replayed against what each medium holds);
* resets of vLLM's prefix cache, also two between the same two steps, are followed by the re-announcement
  of our tiers (the router forgets them at vLLM's AllBlocksCleared).

Importing vLLM takes tens of seconds here, hence `slow`; no engine starts.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from support import assert_connector_idle

from flexkv_core.layout import Tier

pytestmark = pytest.mark.slow

BS = 16
VOCAB = range(3, 2003)
SLOT_BYTES = BS * 2 * 64 * 2 * 4  # one layer of the dry engine, 2 KV heads of 64, K and V, float32


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice(VOCAB) for _ in range(n)]


@pytest.fixture
def make_engine() -> Iterator[Any]:
    """Builds DryEngines with a CPU tier (and SSD tier) of so many blocks; closes them after the test."""
    import shutil
    import tempfile

    from flexkv_dynamo.dry_engine import DryEngine

    engines = []

    def make(*, cpu_blocks: int = 512, ssd_blocks: int = 0, **kwargs: Any) -> DryEngine:
        workdir = tempfile.mkdtemp(prefix="fkvd", dir="/tmp")  # ipc socket paths must stay short
        env = {"FLEXKV_CPU_CACHE_GB": str(cpu_blocks * SLOT_BYTES / 2**30),
               "FLEXKV_SSD_CACHE_GB": str(ssd_blocks * SLOT_BYTES / 2**30)}
        eng = DryEngine(block_size=BS, flexkv_env=env, workdir=workdir, num_layers=1, **kwargs)
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.close()
        shutil.rmtree(eng.workdir, ignore_errors=True)


def ints(block_hashes: list[bytes]) -> list[int]:
    from flexkv_dynamo.kv_events import engine_hash_to_int

    return [engine_hash_to_int(h) for h in block_hashes]


def assert_quiescent(eng: Any) -> None:
    assert not eng.scheduler.has_requests()
    assert_connector_idle(eng.flexkv)
    pool = eng.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all but vLLM's null block
    assert eng.wrong_loads == []


def replay(events: list[Any], media: tuple[str, ...] = ("CPU_PINNED", "DISK")) -> dict[str, set[int]]:
    """Replay KV events as Dynamo's router does, checking on the way that every Stored of our media
    chains onto a block one of our media holds, and that Stored and Removed balance per medium."""
    held: dict[str, Counter[int]] = {m: Counter() for m in media}
    for e in events:
        kind = type(e).__name__
        if kind == "AllBlocksCleared":
            for counter in held.values():
                counter.clear()
            continue
        if getattr(e, "medium", None) not in media:
            continue
        if kind == "BlockStored":
            parent = e.parent_block_hash
            assert parent is None or any(held[m][parent] for m in media), \
                f"{e.medium} Stored {e.block_hashes[:3]}... chains onto {parent}, which none of our tiers holds"
            for h in e.block_hashes:
                held[e.medium][h] += 1
                assert held[e.medium][h] == 1, f"{h} stored twice in {e.medium}"
        else:
            for h in e.block_hashes:
                assert held[e.medium][h] == 1, f"{h} removed from {e.medium}, which does not hold it"
                held[e.medium][h] -= 1
    return {m: {h for h, n in c.items() if n} for m, c in held.items()}


def assert_events_match(eng: Any) -> None:
    """After a step that drains the cache's events: the router's view equals what each tier holds."""
    cache = eng.flexkv.cache
    held = replay(eng.events)
    assert held["CPU_PINNED"] == {b.hash for b in cache.index.blocks() if b.ready(Tier.CPU)}
    assert held["DISK"] == {b.hash for b in cache.index.blocks() if b.ready(Tier.SSD)}


def drain(eng: Any) -> None:
    """One more engine step, so that the cache's last events reach vLLM's publisher."""
    eng.flexkv.cache.flush(timeout=30)
    eng.add("drain", [5, 6, 7], 1)
    eng.run()


# ---- the fast paths, independent of vLLM ----------------------------------------------------------------


@pytest.mark.parametrize("length", [32, 16, 8])
def test_fast_hash_conversion_is_vllms(length):
    import hashlib

    from flexkv_dynamo.kv_events import engine_hash_to_int, engine_hashes_to_ints

    hashes = [hashlib.sha256(str(i).encode()).digest()[:length] for i in range(100)]
    assert engine_hashes_to_ints(hashes) == [int.from_bytes(h, "big") & (2**64 - 1) for h in hashes]
    assert engine_hashes_to_ints(hashes[:3]) == [engine_hash_to_int(h) for h in hashes[:3]]
    assert engine_hashes_to_ints([*hashes[:50], 7, *hashes[50:]])[50] == 7  # an int among bytes: per hash
    assert engine_hashes_to_ints([]) == []


# ---- loads deliver the right blocks, nothing leaks ------------------------------------------------------


def test_hits_preemption_and_aborts_deliver_the_right_blocks(make_engine):
    """Shared prefixes, few engine blocks (vLLM preempts), aborts mid-run: every load fills each engine
    block with its own block, and everything is given back."""
    eng = make_engine(num_gpu_blocks=72, max_num_batched_tokens=256)
    shared = [prompt(1, 8 * BS), prompt(2, 5 * BS)]
    prompts = {f"r{i}": shared[i % 2] + prompt(100 + i, 20 + 37 * i) for i in range(12)}
    for rid in ("r0", "r1", "r2", "r3"):
        eng.add(rid, prompts[rid], 4)
    cold = eng.run()
    assert eng.reset_prefix_cache()  # vLLM forgets; our tiers serve the rest
    preempted = set()
    for rid, p in prompts.items():
        eng.add(rid + "'", p, 96)  # six more blocks each while decoding: vLLM runs out and preempts
    aborts = {2: ["r5'"], 4: ["r0'", "r9'"]}
    finished: dict[str, list[int]] = {}
    for step in range(2000):
        if not eng.scheduler.has_requests():
            break
        finished.update(eng.step().finished)
        preempted |= {r.request_id for r in eng.scheduler.requests.values() if r.num_preemptions}
        if step in aborts:
            eng.abort(aborts[step])
    assert preempted, "72 engine blocks should have forced preemptions"
    hits = eng.flexkv.cache.stats()["metrics"]["hit_blocks"]["cpu"]
    assert hits >= 8 + 5, f"the shared prefixes should have been loaded from our CPU tier (hits: {hits})"
    assert set(finished) == {rid + "'" for rid in prompts} - {"r5'", "r0'", "r9'"}
    assert all(len(toks) == 96 for toks in finished.values())
    assert cold.keys() == {"r0", "r1", "r2", "r3"}
    assert_quiescent(eng)


class GatedReads:
    """Holds the SSD tier's reads until `open` (to abort a request while its load is being staged)."""

    def __init__(self, ssd: Any) -> None:
        self._read = ssd.read
        self._gate = threading.Event()
        self.started = 0
        ssd.read = self.read

    def read(self, items: Any) -> Future:
        self.started += 1
        out: Future = Future()

        def run() -> None:
            self._gate.wait(60)
            inner = self._read(items)
            inner.add_done_callback(lambda f: out.set_exception(f.exception()) if f.exception()
                                    else out.set_result(f.result()))

        threading.Thread(target=run, daemon=True).start()
        return out

    def open(self) -> None:
        self._gate.set()


def test_abort_while_a_load_is_staged_from_ssd(make_engine):
    eng = make_engine(cpu_blocks=64, ssd_blocks=256)
    p = prompt(3, 20 * BS + 5)
    eng.add("cold", p, 2)
    eng.run()
    cache = eng.flexkv.cache
    assert cache.flush(timeout=30)
    assert cache.evict_all(Tier.CPU) >= 20  # only SSD holds the prompt now
    assert eng.reset_prefix_cache()
    gate = GatedReads(cache.ssd)
    eng.add("warm", p, 2)
    eng.step()  # admitted: its load is planned, SSD reads held at the gate
    assert gate.started == 1
    assert eng.flexkv.in_flight()["waiting_loads"] == 1
    assert eng.scheduler.requests["warm"].status.name == "WAITING_FOR_REMOTE_KVS"
    eng.abort(["warm"])  # vLLM keeps its blocks until the workers report its (now empty) load
    eng.step()
    gate.open()
    eng.run()
    eng.add("again", p, 2)  # the staged copies were kept (the reads were good): a CPU hit now
    assert eng.run()["again"]
    assert_quiescent(eng)


def test_failed_store_jobs_are_rolled_back_and_stored_later(make_engine):
    """A worker reports a store job failed: nothing of it is announced, and the request offers those
    blocks again once more of its blocks complete, so the chain ends up whole."""
    from flexkv_dynamo.metadata import StoreJob

    eng = make_engine(max_num_batched_tokens=4 * BS)  # a 12-block prompt in three chunks: three store jobs
    failed: list[int] = []

    def fail_second_store(job: Any) -> bool:
        if isinstance(job, StoreJob) and not failed and eng.steps == 1:
            failed.append(job.job_id)
            return True
        return False

    eng.fail_jobs = fail_second_store
    p = prompt(4, 12 * BS + 3)
    request = eng.add("r", p, 40)  # decodes long enough to complete more blocks
    eng.run()
    assert failed
    drain(eng)
    chain = ints(request.block_hashes)
    assert eng.flexkv.cache.lookup(chain).cpu == len(chain), "the chain should be whole in the CPU tier"
    assert_events_match(eng)
    assert_quiescent(eng)


# ---- stores in flight and the blocks vLLM hands out again ----------------------------------------------


def test_a_store_in_flight_is_finished_before_its_blocks_are_overwritten(make_engine):
    """A store job is copied during the step after the one that computed its blocks. Its request may have
    ended meanwhile and vLLM may have handed those blocks to another request, whose forward pass rewrites
    them: the fence (``flush``) makes the worker finish the store before that forward pass, so the CPU tier
    holds the first request's bytes and a later hit loads them (a missing fence stores the second request's
    bytes under the first one's hashes: a wrong load)."""
    eng = make_engine(num_gpu_blocks=17)  # 16 usable blocks (vLLM keeps block 0 as its null block)
    a = prompt(40, 8 * BS)
    eng.add("a", a, 1)  # its prompt and one token: it ends in the step that computes it
    eng.step()
    assert not eng.scheduler.requests, "a should have finished in its first step"
    eng.add("b", prompt(41, 15 * BS), 1)  # needs 15 blocks: most of a's freed blocks
    eng.run()
    again = eng.add("a2", a, 1)  # a's prompt: vLLM's own copy was overwritten, ours is loaded
    eng.run()
    assert eng.flexkv.cache.stats()["metrics"]["hit_blocks"]["cpu"] >= 7, eng.flexkv.cache.stats()["metrics"]
    assert eng.wrong_loads == []
    assert len(again.block_hashes) == 8
    drain(eng)
    assert_quiescent(eng)


# ---- partial reservations leave no hole -------------------------------------------------------------------


def test_a_small_tier_stores_whole_prefixes_and_announces_no_orphan(make_engine):
    eng = make_engine(cpu_blocks=24, num_gpu_blocks=400, max_num_batched_tokens=512)
    partial = []
    reserve = eng.flexkv.cache.reserve_store

    def watch(hashes, parent, tokens):
        plan = reserve(hashes, parent, tokens)
        if plan.covered < len(hashes):
            partial.append((len(hashes), plan.covered))
        return plan

    eng.flexkv.cache.reserve_store = watch
    for i in range(8):  # 8 requests of 12-20 blocks, decoding: far more than 24 slots
        eng.add(f"r{i}", prompt(10 + i, (12 + i) * BS), 3 * BS)
    eng.run()
    drain(eng)
    assert eng.flexkv.cache.stats()["metrics"]["evicted_blocks"]["cpu"] > 0
    assert_events_match(eng)  # replays every Stored against what the tiers hold at that moment
    # Whatever the tier holds is whole prefixes: every block's parent is held too (or it is a root).
    index = eng.flexkv.cache.index
    for b in index.blocks():
        if b.ready(Tier.CPU) and b.parent is not None:
            assert index.get(b.parent) is not None and index.get(b.parent).held(Tier.CPU), "a hole in the CPU tier"
    assert_quiescent(eng)
    assert partial, "no reservation came up short: the test does not test what it says"


def test_a_tier_full_of_pinned_blocks_stops_at_the_first_block_it_cannot_take(make_engine):
    """StorePlan.covered: a request's chain stops at its first block without a slot, nothing past that
    gap is stored, and once there is room the request stores the rest of its chain, gap first."""
    eng = make_engine(cpu_blocks=8, max_num_batched_tokens=6 * BS)
    cache = eng.flexkv.cache
    a = eng.add("a", prompt(20, 6 * BS), 1)
    eng.run()
    chain_a = ints(a.block_hashes)
    assert cache.lookup(chain_a).cpu == 6
    lent = cache.prepare_load(chain_a)  # pinned, as while a peer reads them: not evictable
    b = eng.add("b", prompt(21, 5 * BS), 2 * BS + 2)  # 5 blocks, 2 more while decoding; 2 free slots
    eng.step()  # b's prompt: five blocks offered, two slots
    eng.step()  # its store job is copied during the next step (after the forward pass) and reported
    assert cache.lookup(ints(b.block_hashes)).cpu == 2  # b's first two blocks, nothing past the gap
    assert sum(1 for x in cache.index.blocks() if x.held(Tier.CPU)) == 8
    cache.finish_load(lent)  # a's blocks may go now
    eng.run()  # b decodes: as its next block completes, it offers the gap and what follows again
    chain_b = ints(b.block_hashes)
    assert len(chain_b) == 7
    assert cache.lookup(chain_b).cpu == 7
    drain(eng)
    assert_events_match(eng)
    assert_quiescent(eng)


# ---- resets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resets", [1, 2])
def test_prefix_cache_resets_between_steps_reannounce_our_tiers(make_engine, resets):
    """vLLM's reset publishes AllBlocksCleared, after which Dynamo's router holds nothing of this worker:
    our tiers must be announced again in that same batch. Two resets between two steps give the block
    pool a new hash map twice, and the second often lands at the first one's address (an identity check
    of that map missed most double resets in a trial here); vLLM's own event cannot be missed."""
    eng = make_engine(ssd_blocks=256)
    eng.add("a", prompt(30, 10 * BS + 3), 2)
    eng.add("b", prompt(31, 7 * BS), 2)
    eng.run()
    drain(eng)
    for round_ in range(6):
        before = len(eng.events)
        for _ in range(resets):
            assert eng.reset_prefix_cache()
        drain(eng)
        batch = eng.events[before:]
        kinds = [type(e).__name__ for e in batch]
        assert kinds.count("AllBlocksCleared") == resets
        last_clear = len(kinds) - 1 - kinds[::-1].index("AllBlocksCleared")
        reannounced = {h for e in batch[last_clear:] if getattr(e, "medium", None) == "CPU_PINNED"
                       and type(e).__name__ == "BlockStored" for h in e.block_hashes}
        assert len(reannounced) >= 17, f"round {round_}: our CPU tier was not announced again after the reset"
        assert_events_match(eng)
    assert_quiescent(eng)


def test_reset_with_running_requests(make_engine):
    """reset_prefix_cache(reset_running_requests=True) preempts everything mid-decode; the requests
    resume (loading from our tiers) and the router's view of our tiers is restored."""
    eng = make_engine(max_num_batched_tokens=256)
    for i in range(4):
        eng.add(f"r{i}", prompt(40 + i, 9 * BS), 2 * BS)
    for _ in range(4):
        eng.step()
    assert eng.scheduler.running
    assert eng.scheduler.reset_prefix_cache(reset_running_requests=True)
    finished = eng.run()
    assert len(finished) == 4 and all(len(t) == 2 * BS for t in finished.values())
    drain(eng)
    assert_events_match(eng)
    assert_quiescent(eng)


# ---- a failure of ours at any scheduler-side callback ------------------------------------------------------


SCHEDULER_POINTS = ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
                    "update_connector_output", "request_finished", "take_events", "has_pending_push_work",
                    "get_kv_connector_stats")


@pytest.mark.parametrize("point", SCHEDULER_POINTS)
def test_a_failing_callback_degrades_to_misses(make_engine, monkeypatch, point):
    """While a callback fails every time it is called, requests still finish, loads never deliver a
    wrong block, and once it stops failing the cache serves hits again, with nothing leaked."""
    monkeypatch.setenv("FLEXKV_TEST_FAULTS", "1")
    eng = make_engine(ssd_blocks=256, max_num_batched_tokens=128)
    faults = eng.connector.faults
    a, b = prompt(50, 9 * BS + 3), prompt(51, 6 * BS)
    eng.add("a", a, 3)
    eng.run()
    eng.flexkv.cache.flush(timeout=30)
    eng.flexkv.cache.evict_all(Tier.CPU)  # a's blocks come back through SSD staging
    assert eng.reset_prefix_cache()
    # Failing on every call (a failure that persists must not hang a request either); a failing
    # has_pending_push_work answers "keep stepping", so a bounded run ends only once it stops failing.
    faults.arm(point, times=200 if point == "has_pending_push_work" else 10_000)
    eng.add("a-warm", a, 3 * BS)  # a load (staged) while the callback fails
    eng.add("b-cold", b, 3 * BS)  # stores while it fails
    finished = eng.run(max_steps=1000)
    assert set(finished) == {"a-warm", "b-cold"}
    assert faults.fired[point] >= 1, f"{point} was never called"
    assert eng.connector.failures.total[point] == faults.fired[point]
    faults.disarm()
    eng.run()
    assert eng.reset_prefix_cache()
    hits = eng.flexkv.cache.stats()["metrics"]["hit_blocks"]
    eng.add("a-again", a, 2)
    eng.run()
    after = eng.flexkv.cache.stats()["metrics"]["hit_blocks"]
    assert after["cpu"] + after["ssd"] - hits["cpu"] - hits["ssd"] == 9, "hits did not come back"
    assert_quiescent(eng)
