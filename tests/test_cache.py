"""TieredCache end to end on CPU: real shared-memory pool, real SSD files, real block copies.

An "engine" here is a set of KV planes (torch tensors shaped like a paged KV cache); the worker-side
BlockCopier moves blocks between it and the pool exactly as a vLLM worker does.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from flexkv_core.cache import TieredCache
from flexkv_core.config import FlexKVConfig
from flexkv_core.events import BlockRemoved, BlockStored, CacheCleared
from flexkv_core.hashing import chain_hashes
from flexkv_core.layout import CacheIdentity, KVLayout, Tier
from flexkv_core.transfer import BlockCopier

LAYOUT = KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype="float16")
IDENTITY = CacheIdentity(model="tiny-test", layout=LAYOUT)
GiB = 2**30


class Engine:
    """A paged KV cache: one tensor per plane, ``num_blocks`` blocks each."""

    def __init__(self, cache: TieredCache, num_blocks: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        shape = (num_blocks, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
        self.planes = [torch.randn(shape, generator=g).to(torch.float16) for _ in range(LAYOUT.num_planes)]
        self.copier = BlockCopier(cache.pool, LAYOUT, 0, self.planes)

    def block(self, i: int) -> list[torch.Tensor]:
        return [p[i].clone() for p in self.planes]

    def wipe(self, ids) -> None:
        for p in self.planes:
            p[list(ids)] = 0


def make_cache(tmp_path, cpu_blocks=32, ssd_blocks=0, identity=IDENTITY, **kw) -> TieredCache:
    slot = LAYOUT.slot_bytes
    cfg = FlexKVConfig(cpu_cache_gb=cpu_blocks * slot / GiB, ssd_cache_gb=ssd_blocks * slot / GiB,
                       ssd_cache_dir=(str(tmp_path / "ssd"),), enable_metrics=False, **kw)
    return TieredCache(cfg, identity, pool_name=f"flexkv-test-{os.getpid()}-{id(cfg)}")


def tokens_for(prompt: int, n_blocks: int) -> list[int]:
    return [prompt * 10_000 + i for i in range(n_blocks * LAYOUT.block_size)]


def store(cache: TieredCache, engine: Engine, tokens: list[int], block_ids: list[int]) -> list[int]:
    hashes = chain_hashes(tokens, LAYOUT.block_size)
    plan = cache.reserve_store(hashes, None, tokens)
    if plan.block_hashes:
        engine.copier.to_pool([block_ids[i] for i in plan.positions], plan.slots).wait()
    cache.complete_store(plan)  # a no-op when there was nothing to copy
    return hashes


def load(cache: TieredCache, engine: Engine, hashes: list[int], block_ids: list[int]) -> int:
    plan = cache.prepare_load(hashes)
    n = plan.ready.result(timeout=30)
    engine.copier.from_pool(plan.slots[:n], block_ids[:n]).wait()
    cache.finish_load(plan)
    return n


def assert_blocks(engine: Engine, block_ids, want) -> None:
    """Engine blocks ``block_ids`` hold exactly the planes in ``want`` (one list of planes per block)."""
    for i, block_id in enumerate(block_ids):
        for got, exp in zip(engine.block(block_id), want[i]):
            assert torch.equal(got, exp)


def store_on_ssd_only(cache: TieredCache, engine: Engine, tokens: list[int], block_ids: list[int]) -> list[int]:
    """Store a prompt, wait for its SSD write-back, then drop its CPU copies."""
    hashes = store(cache, engine, tokens, block_ids)
    assert cache.flush(timeout=10)
    cache.evict_all(Tier.CPU)
    return hashes


class Balance:
    """Stored/Removed bookkeeping per tier, as Dynamo's router keeps it."""

    def __init__(self) -> None:
        self.count: Counter = Counter()
        self.cleared = 0

    def feed(self, events) -> None:
        for ev in events:
            if isinstance(ev, CacheCleared):
                self.cleared += 1
                continue
            sign = 1 if isinstance(ev, BlockStored) else -1
            for h in ev.block_hashes:
                self.count[(ev.tier, h)] += sign
                assert self.count[(ev.tier, h)] in (0, 1), f"unbalanced {ev}"

    def held(self, tier: Tier) -> set[int]:
        return {h for (t, h), n in self.count.items() if t is tier and n == 1}


def assert_quiescent(cache: TieredCache) -> None:
    """No pins left and every used slot is explained by a resident block."""
    s = cache.stats()["tiers"]
    for tier in ("cpu", "ssd"):
        assert s[tier]["pinned_blocks"] == 0
        assert s[tier]["used_slots"] == s[tier]["ready_blocks"]


def test_cpu_round_trip_is_byte_exact(tmp_path):
    with make_cache(tmp_path) as cache:
        engine = Engine(cache)
        tokens = tokens_for(1, 5)
        want = [engine.block(i) for i in range(5)]
        hashes = store(cache, engine, tokens, list(range(5)))
        assert cache.lookup(hashes).cpu == 5
        engine.wipe(range(64))
        assert load(cache, engine, hashes, [10, 11, 12, 13, 14]) == 5
        assert_blocks(engine, range(10, 10 + 5), want)
        assert cache.lookup(chain_hashes(tokens_for(2, 5), LAYOUT.block_size)).total == 0
        assert_quiescent(cache)


def test_stored_events_carry_chain_and_tokens(tmp_path):
    with make_cache(tmp_path) as cache:
        engine = Engine(cache)
        tokens = tokens_for(3, 3)
        hashes = store(cache, engine, tokens, [0, 1, 2])
        (ev,) = cache.take_events()
        assert ev == BlockStored(tier=Tier.CPU, block_hashes=hashes, parent_block_hash=None, token_ids=tokens,
                                 block_size=LAYOUT.block_size)
        # Extending the prompt stores only the new block, chained onto the last one.
        longer = tokens_for(3, 4)
        store(cache, engine, longer, [0, 1, 2, 3])
        (ev,) = cache.take_events()
        assert ev.parent_block_hash == hashes[-1] and ev.token_ids == longer[-LAYOUT.block_size:]


def test_ssd_round_trip_after_cpu_eviction(tmp_path):
    with make_cache(tmp_path, cpu_blocks=8, ssd_blocks=64) as cache:
        engine = Engine(cache)
        bal = Balance()
        tokens = tokens_for(4, 6)
        want = [engine.block(i) for i in range(6)]
        hashes = store(cache, engine, tokens, list(range(6)))
        assert cache.flush(timeout=10)
        bal.feed(cache.take_events())
        assert bal.held(Tier.CPU) == set(hashes) == bal.held(Tier.SSD)
        assert cache.evict_all(Tier.CPU) == 6
        bal.feed(cache.take_events())
        assert bal.held(Tier.CPU) == set()
        r = cache.lookup(hashes)
        assert (r.cpu, r.ssd, r.total) == (0, 6, 6)
        engine.wipe(range(64))
        assert load(cache, engine, hashes, list(range(20, 26))) == 6
        assert_blocks(engine, range(20, 20 + 6), want)
        # Staging made them CPU-resident again, announced as such.
        bal.feed(cache.take_events())
        assert bal.held(Tier.CPU) == set(hashes)
        assert cache.lookup(hashes).cpu == 6
        assert_quiescent(cache)


def test_cpu_pressure_evicts_by_policy_and_demotes_to_ssd(tmp_path):
    with make_cache(tmp_path, cpu_blocks=4, ssd_blocks=64, evict_ratio=0.25) as cache:
        engine = Engine(cache)
        bal = Balance()
        prompts = [chain_hashes(tokens_for(p, 2), LAYOUT.block_size) for p in range(6)]
        for p in range(6):
            store(cache, engine, tokens_for(p, 2), [2 * p, 2 * p + 1])
            cache.flush(timeout=10)
        bal.feed(cache.take_events())
        assert len(bal.held(Tier.CPU)) <= 4
        # Nothing was lost: every prompt is still servable, from CPU or SSD.
        for hashes in prompts:
            assert cache.lookup(hashes).total == 2
        assert bal.held(Tier.SSD) == {h for hs in prompts for h in hs}
        # The most recent prompt is still in CPU under LRU.
        assert cache.lookup(prompts[-1]).cpu == 2
        assert_quiescent(cache)


def test_warm_restart_finds_ssd_blocks_and_other_identity_does_not(tmp_path):
    with make_cache(tmp_path, ssd_blocks=32) as cache:
        engine = Engine(cache, seed=7)
        want = [engine.block(i) for i in range(4)]
        hashes = store(cache, engine, tokens_for(5, 4), [0, 1, 2, 3])
    with make_cache(tmp_path, ssd_blocks=32) as cache:
        events = cache.take_events()
        stored = [h for ev in events if isinstance(ev, BlockStored) and ev.tier is Tier.SSD for h in ev.block_hashes]
        assert stored == hashes  # announced again, parents first
        assert cache.lookup(hashes).ssd == 4
        engine = Engine(cache, seed=99)
        assert load(cache, engine, hashes, [30, 31, 32, 33]) == 4
        assert_blocks(engine, range(30, 30 + 4), want)
    other = CacheIdentity(model="another-model", layout=LAYOUT)
    with make_cache(tmp_path, ssd_blocks=32, identity=other) as cache:
        assert cache.lookup(hashes).total == 0
        assert cache.take_events() == []


def test_corrupted_ssd_slot_is_a_miss_never_wrong_bytes(tmp_path):
    with make_cache(tmp_path, cpu_blocks=8, ssd_blocks=32) as cache:
        engine = Engine(cache)
        want = [engine.block(i) for i in range(4)]
        hashes = store_on_ssd_only(cache, engine, tokens_for(6, 4), [0, 1, 2, 3])
        cache.take_events()
        bad = cache.index.get(hashes[2]).slot_in(Tier.SSD)
        path, offset = cache.ssd.location(bad)
        with open(path, "r+b") as f:
            f.seek(offset + 100)
            f.write(b"\xff" * 64)
        engine.wipe(range(64))
        assert load(cache, engine, hashes, [40, 41, 42, 43]) == 2  # blocks 0-1 usable, 2 corrupt
        assert_blocks(engine, range(40, 40 + 2), want)
        events = cache.take_events()
        removed = [h for ev in events if isinstance(ev, BlockRemoved) and ev.tier is Tier.SSD for h in ev.block_hashes]
        assert removed == [hashes[2]]
        r = cache.lookup(hashes)
        assert r.total == 2  # the chain is broken at the corrupt block
        assert_quiescent(cache)


def test_failed_store_rolls_back_and_announces_nothing(tmp_path):
    with make_cache(tmp_path) as cache:
        tokens = tokens_for(7, 3)
        hashes = chain_hashes(tokens, LAYOUT.block_size)
        plan = cache.reserve_store(hashes, None, tokens)
        assert cache.lookup(hashes).total == 0  # not visible before its bytes are in place
        cache.complete_store(plan, ok=False)
        assert cache.take_events() == []
        assert cache.lookup(hashes).total == 0
        assert cache.stats()["tiers"]["cpu"]["used_slots"] == 0


def test_finish_load_while_staging_releases_everything(tmp_path):
    with make_cache(tmp_path, cpu_blocks=8, ssd_blocks=32) as cache:
        engine = Engine(cache)
        hashes = store_on_ssd_only(cache, engine, tokens_for(8, 4), [0, 1, 2, 3])
        plan = cache.prepare_load(hashes)
        cache.finish_load(plan)  # the request was aborted before its blocks arrived
        assert plan.ready.result(timeout=10) == 4
        assert_quiescent(cache)


def test_reset_removes_everything_then_clears(tmp_path):
    with make_cache(tmp_path, ssd_blocks=32) as cache:
        engine = Engine(cache)
        bal = Balance()
        hashes = store(cache, engine, tokens_for(9, 3), [0, 1, 2])
        cache.flush(timeout=10)
        cache.reset()
        events = cache.take_events()
        assert isinstance(events[-1], CacheCleared)
        bal.feed(events)
        assert bal.held(Tier.CPU) == bal.held(Tier.SSD) == set()
        assert cache.lookup(hashes).total == 0
        assert_quiescent(cache)


def test_cpu_size_too_small_for_one_block_is_a_clear_error(tmp_path):
    cfg = FlexKVConfig(cpu_cache_gb=1e-6, enable_metrics=False)
    with pytest.raises(ValueError, match="FLEXKV_CPU_CACHE_GB"):
        TieredCache(cfg, IDENTITY)


def kv_of(prompt: int, block: int) -> float:
    """Equal tokens give equal KV: the value every plane of (prompt, block) holds in these tests."""
    return float((prompt * 31 + block * 7) % 997) / 8.0


@pytest.mark.slow
def test_concurrent_stores_and_loads_lose_nothing(tmp_path):
    with make_cache(tmp_path, cpu_blocks=24, ssd_blocks=256) as cache:
        engines = [Engine(cache, num_blocks=16, seed=s) for s in range(4)]
        errors: list[BaseException] = []
        loaded = Counter()

        def worker(w: int) -> None:
            try:
                eng = engines[w]
                for rnd in range(25):
                    prompt = (w * 3 + rnd) % 10  # prompts shared between threads
                    for i in range(4):
                        for plane in eng.planes:
                            plane[i] = kv_of(prompt, i)
                    hashes = store(cache, eng, tokens_for(prompt, 4), [0, 1, 2, 3])
                    eng.wipe([8, 9, 10, 11])
                    n = load(cache, eng, hashes, [8, 9, 10, 11])
                    loaded[w] += n
                    for i in range(n):
                        for plane in eng.planes:
                            assert torch.all(plane[8 + i] == kv_of(prompt, i)), (w, rnd, prompt, i)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert sum(loaded.values()) > 0
        assert cache.flush(timeout=30)
        bal = Balance()
        bal.feed(cache.take_events())
        assert_quiescent(cache)
        stats = cache.stats()["tiers"]
        assert len(bal.held(Tier.CPU)) == stats["cpu"]["ready_blocks"]
        assert len(bal.held(Tier.SSD)) == stats["ssd"]["ready_blocks"]


class SameProcessPeer:
    """A RemoteSource reading another in-process cache through its export API (memcpy stands in for the
    network; the distributed tests do the same over Mooncake between processes)."""

    def __init__(self, peer: TieredCache, fail_at: int | None = None) -> None:
        self.peer = peer
        self.fail_at = fail_at

    def lookup(self, block_hashes):
        return self.peer.lookup(block_hashes).total

    def fetch(self, block_hashes, buffers):
        from concurrent.futures import Future

        import xxhash

        from flexkv_core.remote import RemoteBlock

        grant = self.peer.export(block_hashes)
        out = []
        for i, (slot, buf) in enumerate(zip(grant["slots"], buffers)):
            src = self.peer.pool.slot(slot)
            buf[:] = src if i != self.fail_at else bytes(len(src))
            ok = xxhash.xxh3_64_intdigest(buf) == grant["checksums"][i]
            out.append(RemoteBlock(grant["parents"][i], grant["tokens"][i], grant["checksums"][i]) if ok else None)
        out += [None] * (len(block_hashes) - len(out))
        self.peer.release_export(grant["job"])
        fut = Future()
        fut.set_result(out)
        return fut


def test_remote_blocks_extend_the_local_prefix_and_become_local(tmp_path):
    with make_cache(tmp_path / "a") as a, make_cache(tmp_path / "b") as b:
        ea, eb = Engine(a, seed=1), Engine(b, seed=2)
        tokens = tokens_for(11, 6)
        want = [ea.block(i) for i in range(6)]
        hashes = store(a, ea, tokens, list(range(6)))
        store(b, eb, tokens[:2 * LAYOUT.block_size], [0, 1])  # b holds the first two blocks itself
        b.remote = SameProcessPeer(a)
        b.take_events()
        r = b.lookup(hashes)
        assert (r.cpu, r.total, r.remote) == (2, 6, 4)
        eb.wipe(range(64))
        assert load(b, eb, hashes, list(range(10, 16))) == 6
        assert_blocks(eb, range(12, 16), want[2:])  # the fetched ones are a's bytes
        # Kept locally: announced as our CPU blocks, chained onto our own prefix.
        (ev,) = b.take_events()
        assert ev.tier is Tier.CPU and ev.block_hashes == hashes[2:] and ev.parent_block_hash == hashes[1]
        b.remote = None
        assert b.lookup(hashes).cpu == 6
        assert_quiescent(a)
        assert_quiescent(b)


def test_a_failed_remote_block_cuts_the_load_and_leaks_nothing(tmp_path):
    with make_cache(tmp_path / "a") as a, make_cache(tmp_path / "b") as b:
        ea, eb = Engine(a, seed=1), Engine(b, seed=2)
        hashes = store(a, ea, tokens_for(12, 5), list(range(5)))
        b.remote = SameProcessPeer(a, fail_at=3)  # the 4th block arrives corrupt
        b.keep_remote = False
        assert b.lookup(hashes).remote == 5
        assert load(b, eb, hashes, list(range(5))) == 3
        assert b.take_events() == []  # not kept: nothing announced
        assert_quiescent(a)
        assert_quiescent(b)
        assert b.stats()["tiers"]["cpu"]["used_slots"] == 0


def test_a_second_load_joins_a_staging_in_flight(tmp_path):
    with make_cache(tmp_path, cpu_blocks=16, ssd_blocks=32) as cache:
        engine = Engine(cache)
        want = [engine.block(i) for i in range(4)]
        hashes = store_on_ssd_only(cache, engine, tokens_for(13, 4), [0, 1, 2, 3])
        # Hold the SSD reads back until both loads are planned (a read may otherwise finish, and its staging
        # complete, before the second load is planned).
        gate, read = threading.Event(), cache.ssd.read

        def gated_read(items):
            out = Future()

            def later():
                assert gate.wait(10)
                inner = read(items)
                inner.add_done_callback(lambda f: out.set_exception(f.exception()) if f.exception()
                                        else out.set_result(f.result()))

            threading.Thread(target=later, daemon=True).start()
            return out

        cache.ssd.read = gated_read
        first = cache.prepare_load(hashes[:2])  # stages blocks 0-1 from SSD
        second = cache.prepare_load(hashes)  # joins that staging for 0-1, stages 2-3 itself
        rows = cache.index.find(hashes).tolist()
        assert cache.io.staging[rows[0]] == [second] and cache.io.staging[rows[3]] == []
        gate.set()
        assert second.block_hashes == hashes
        assert first.ready.result(timeout=10) == 2 and second.ready.result(timeout=10) == 4
        engine.wipe(range(64))
        engine.copier.from_pool(second.slots, [20, 21, 22, 23]).wait()
        assert_blocks(engine, range(20, 20 + 4), want)
        cache.finish_load(first)
        cache.finish_load(second)
        assert_quiescent(cache)


@pytest.mark.parametrize("seed", range(6))
def test_tiny_tiers_under_pressure_stay_exact(tmp_path, seed):
    """Stores and loads of overlapping prompts into tiers far smaller than the working set: staging,
    demotion and eviction interleave. Every load must return exactly what the lookup promised or less,
    with exact bytes, and the cache must end quiescent."""
    import random

    rng = random.Random(seed)
    with make_cache(tmp_path, cpu_blocks=4, ssd_blocks=6) as cache:
        engine = Engine(cache, num_blocks=16)
        for _ in range(60):
            prompt, n = rng.randrange(8), rng.randint(1, 6)
            tokens = tokens_for(prompt, n)
            hashes = chain_hashes(tokens, LAYOUT.block_size)
            if rng.random() < 0.5:
                for i in range(n):
                    for plane in engine.planes:
                        plane[i] = kv_of(prompt, i)
                store(cache, engine, tokens, list(range(n)))
            else:
                promised = cache.lookup(hashes).total
                engine.wipe(range(8, 14))
                got = load(cache, engine, hashes[:promised], list(range(8, 8 + promised)))
                assert got <= promised
                for i in range(got):
                    for plane in engine.planes:
                        assert torch.all(plane[8 + i] == kv_of(prompt, i))
            if rng.random() < 0.3:
                cache.flush(timeout=10)
        cache.flush(timeout=10)
        assert_quiescent(cache)


def test_staging_never_evicts_the_chain_it_is_loading(tmp_path):
    """Making CPU room for staging demotes a CPU-only block to SSD, which needs SSD room: that SSD
    eviction must not take the SSD-only blocks being staged (found by the trace replay)."""
    with make_cache(tmp_path, cpu_blocks=4, ssd_blocks=4, evict_ratio=0.01) as cache:
        engine = Engine(cache, num_blocks=16)
        want = [engine.block(i) for i in range(4)]
        x = store(cache, engine, tokens_for(20, 4), [0, 1, 2, 3])  # X: CPU and SSD
        assert cache.flush(timeout=10)
        cache.evict_all(Tier.CPU)  # X only on SSD, which is full
        # Y: CPU full of CPU-only blocks. Under load that is write-back lagging behind; here we get the
        # state by holding write-back off while Y is stored.
        cache.placement.has_ssd = False
        store(cache, engine, tokens_for(21, 4), [4, 5, 6, 7])
        cache.placement.has_ssd = True
        promised = cache.lookup(x).total
        assert promised >= 1
        engine.wipe(range(8, 12))
        got = load(cache, engine, x[:promised], list(range(8, 8 + promised)))
        assert got == promised
        assert_blocks(engine, range(8, 8 + got), want)
        assert cache.flush(timeout=10)
        assert_quiescent(cache)


def test_export_checksums_vouch_for_the_cpu_bytes_actually_lent(tmp_path):
    """A block re-stored from the engine while its SSD copy exists may hold other bytes in CPU than on SSD
    (a recomputation, slot padding): an export must not reuse the SSD checksum for it."""
    with make_cache(tmp_path / "a", ssd_blocks=32) as a, make_cache(tmp_path / "b") as b:
        ea, eb = Engine(a, seed=1), Engine(b, seed=2)
        tokens = tokens_for(30, 3)
        hashes = store(a, ea, tokens, [0, 1, 2])
        assert a.flush(timeout=10)
        a.evict_all(Tier.CPU)  # SSD-only now
        for plane in ea.planes:
            plane[0:3] += 1  # the engine recomputed slightly different KV
        store(a, ea, tokens, [0, 1, 2])  # CPU copies from the engine again, SSD copies stay
        want = [ea.block(i) for i in range(3)]
        b.remote = SameProcessPeer(a)
        assert load(b, eb, hashes, [5, 6, 7]) == 3
        assert_blocks(eb, range(5, 5 + 3), want)


def slot_sums(cache: TieredCache, hashes: list[int]) -> list[int]:
    """xxh3 of the CPU slot bytes each block holds now (what a peer reading them would hash)."""
    import xxhash

    return [xxhash.xxh3_64_intdigest(cache.pool.slot(cache.index.get(h).slot_in(Tier.CPU))) for h in hashes]


def lend(cache: TieredCache, hashes: list[int], **kw) -> list:
    grant = cache.export(hashes, **kw)
    cache.release_export(grant["job"])
    return grant["checksums"]


def test_remembered_checksums_are_forgotten_with_the_cpu_copy(tmp_path):
    """Checksums are computed once per CPU copy (ahead of time or by the first export) and reused; a copy
    evicted and stored again from the engine with other bytes gets a new one."""
    with make_cache(tmp_path) as cache:
        engine = Engine(cache, seed=3)
        tokens = tokens_for(40, 4)
        hashes = store(cache, engine, tokens, [0, 1, 2, 3])
        assert cache.remember_checksums(hashes[:2]) == 2
        assert cache.remember_checksums(hashes) == 2  # only the two it did not know
        assert cache.remember_checksums(hashes) == 0
        assert lend(cache, hashes) == slot_sums(cache, hashes)
        assert lend(cache, hashes, checksums=False) == [None] * 4
        cache.evict_all(Tier.CPU)
        for plane in engine.planes:
            plane[0:4] += 1
        store(cache, engine, tokens, [0, 1, 2, 3])
        assert lend(cache, hashes) == slot_sums(cache, hashes)  # the new bytes' checksums
        assert cache.remember_checksums(hashes) == 0  # that export remembered them
        assert_quiescent(cache)


def test_checksums_come_free_with_ssd_writes_and_verified_fetches(tmp_path):
    """The SSD write-back hashes the CPU bytes it writes and a verified fetch knows what it verified: neither
    is hashed again before lending, and what is lent matches the bytes."""
    with make_cache(tmp_path / "a", ssd_blocks=32) as a, make_cache(tmp_path / "b") as b:
        ea, eb = Engine(a, seed=4), Engine(b, seed=5)
        hashes = store(a, ea, tokens_for(41, 3), [0, 1, 2])
        assert a.flush(timeout=10)
        assert a.remember_checksums(hashes) == 0
        assert lend(a, hashes) == slot_sums(a, hashes)
        b.remote = SameProcessPeer(a)
        assert load(b, eb, hashes, [5, 6, 7]) == 3
        assert b.remember_checksums(hashes) == 0
        assert lend(b, hashes) == slot_sums(b, hashes) == slot_sums(a, hashes)
        # Staged back from SSD (verified against its record): known as well.
        a.evict_all(Tier.CPU)
        assert load(a, ea, hashes, [8, 9, 10]) == 3
        assert a.remember_checksums(hashes) == 0
        assert lend(a, hashes) == slot_sums(a, hashes)


# ---- the contract other code relies on: plans, counters -------------------------------------------------


def test_reserve_store_always_plans_and_stops_at_the_first_block_without_room(tmp_path):
    with make_cache(tmp_path, cpu_blocks=6) as cache:
        engine = Engine(cache)
        tokens = tokens_for(50, 4)
        hashes = store(cache, engine, tokens, [0, 1, 2, 3])
        # Everything held: a plan with nothing to copy, all four covered; completing it changes nothing.
        plan = cache.reserve_store(hashes, None, np.asarray(tokens, np.uint32))
        assert (plan.block_hashes, plan.slots, plan.positions, plan.covered) == ([], [], [], 4)
        cache.complete_store(plan)
        cache.complete_store(plan)
        # Pin the four so nothing can be evicted: of a new chain of 5 only 2 blocks fit, the first two.
        pinned = cache.prepare_load(hashes)
        longer = tokens_for(51, 5)
        plan = cache.reserve_store(chain_hashes(longer, LAYOUT.block_size), None, longer)
        assert plan.covered == 2 and plan.positions == [0, 1]
        engine.copier.to_pool([10, 11], plan.slots).wait()
        cache.complete_store(plan)
        (ev,) = [e for e in cache.take_events() if isinstance(e, BlockStored) and e.block_hashes != hashes]
        assert ev.block_hashes == chain_hashes(longer, LAYOUT.block_size)[:2] and ev.parent_block_hash is None
        cache.finish_load(pinned)
        # A chain whose first block is held and second is not: covered counts the held one too.
        mixed = tokens_for(50, 6)
        plan = cache.reserve_store(chain_hashes(mixed, LAYOUT.block_size), None, mixed)
        assert plan.positions[0] == 4 and plan.covered == 6
        cache.complete_store(plan, ok=False)
        assert_quiescent(cache)


def test_load_plans_say_where_each_block_came_from(tmp_path):
    with make_cache(tmp_path / "a", cpu_blocks=16, ssd_blocks=32) as a, make_cache(tmp_path / "b") as b:
        ea = Engine(a)
        tokens = tokens_for(52, 6)
        hashes = store(a, ea, tokens, list(range(6)))
        assert a.flush(timeout=10)
        a.evict_all(Tier.CPU)
        store(a, ea, tokens[:2 * LAYOUT.block_size], [0, 1])  # blocks 0-1 in CPU again, 2-5 on SSD only
        plan = a.prepare_load(hashes[:4])
        assert plan.tier_hits == {Tier.CPU: 2, Tier.SSD: 2, Tier.REMOTE: 0}
        assert plan.ready.result(timeout=10) == 4
        a.finish_load(plan)
        b.remote = SameProcessPeer(a)
        plan = b.prepare_load(hashes)
        assert plan.tier_hits == {Tier.CPU: 0, Tier.SSD: 0, Tier.REMOTE: 6}
        assert plan.ready.result(timeout=10) == 6
        b.finish_load(plan)


def test_counters_count_what_was_delivered_once(tmp_path):
    """A checksum mismatch is a checksum failure (not an I/O error, not a hit); hits and cpu_to_engine bytes
    count the blocks the engine copied, once per load; every transfer is counted, timed or not."""
    slot = LAYOUT.slot_bytes
    with make_cache(tmp_path, cpu_blocks=8, ssd_blocks=32) as cache:
        engine = Engine(cache)
        hashes = store_on_ssd_only(cache, engine, tokens_for(53, 4), [0, 1, 2, 3])
        bad = cache.index.get(hashes[2]).slot_in(Tier.SSD)
        path, offset = cache.ssd.location(bad)
        with open(path, "r+b") as f:
            f.seek(offset + 100)
            f.write(b"\xff" * 64)
        before = cache.stats()["metrics"]
        assert load(cache, engine, hashes, [40, 41, 42, 43]) == 2
        m = cache.stats()["metrics"]
        assert m["checksum_failures"] - before["checksum_failures"] == 1
        assert m["io_errors"]["ssd"] == before["io_errors"]["ssd"]
        assert m["hit_blocks"]["ssd"] - before["hit_blocks"]["ssd"] == 2  # delivered, not the 4 planned
        assert m["bytes_moved"]["cpu_to_engine"] - before["bytes_moved"]["cpu_to_engine"] == 2 * slot
        assert m["transfers"]["cpu_to_engine"] - before["transfers"]["cpu_to_engine"] == 1
        assert m["transfers"]["engine_to_cpu"] >= 1 and m["bytes_moved"]["engine_to_cpu"] == 4 * slot
        # The engine copied only one block of a 2-block load (say its copy failed past it): one is counted.
        plan = cache.prepare_load(hashes[:2])
        assert plan.ready.result(timeout=10) == 2
        cache.finish_load(plan, copied=1)
        m2 = cache.stats()["metrics"]
        assert m2["hit_blocks"]["cpu"] - m["hit_blocks"]["cpu"] == 1
        assert m2["bytes_moved"]["cpu_to_engine"] - m["bytes_moved"]["cpu_to_engine"] == slot
        # A load aborted before its staging ended delivered nothing.
        cache.evict_all(Tier.CPU)
        plan = cache.prepare_load(hashes[:2])
        cache.finish_load(plan, copied=0)
        plan.ready.result(timeout=10)
        m3 = cache.stats()["metrics"]
        assert m3["hit_blocks"] == m2["hit_blocks"] and m3["bytes_moved"]["cpu_to_engine"] == m2["bytes_moved"]["cpu_to_engine"]
        assert_quiescent(cache)


def test_lending_to_a_peer_is_its_own_direction(tmp_path):
    with make_cache(tmp_path / "a") as a, make_cache(tmp_path / "b") as b:
        ea, eb = Engine(a, seed=1), Engine(b, seed=2)
        hashes = store(a, ea, tokens_for(54, 3), [0, 1, 2])
        b.remote = SameProcessPeer(a)
        assert load(b, eb, hashes, [5, 6, 7]) == 3
        lender, borrower = a.stats()["metrics"], b.stats()["metrics"]
        assert lender["bytes_moved"]["cpu_to_peer"] == 3 * LAYOUT.slot_bytes
        assert lender["bytes_moved"]["cpu_to_engine"] == 0 and sum(lender["hit_blocks"].values()) == 0
        assert borrower["hit_blocks"]["remote"] == 3 and borrower["bytes_moved"]["remote_to_cpu"] == 3 * LAYOUT.slot_bytes


# ---- walks over the whole cache, a chunk per hold of the lock ----------------------------------------


class Router:
    """Stored/Removed per tier as Dynamo's router counts them, checking that a Stored block's parent, when the
    cache still holds it, was announced before it."""

    def __init__(self) -> None:
        self.held: Counter = Counter()
        self.order: dict[int, int] = {}

    def feed(self, events) -> None:
        for ev in events:
            if isinstance(ev, CacheCleared):
                continue
            sign = 1 if isinstance(ev, BlockStored) else -1
            for h in ev.block_hashes:
                self.held[(ev.tier, h)] += sign
                assert self.held[(ev.tier, h)] in (0, 1), f"unbalanced {ev}"
                self.order.setdefault(h, len(self.order))
            if isinstance(ev, BlockStored) and ev.parent_block_hash is not None:
                p = ev.parent_block_hash
                assert p in self.order or not any(self.held[(t, p)] for t in Tier), "child announced before its parent"

    def tiers(self, tier: Tier) -> set[int]:
        return {h for (t, h), n in self.held.items() if t is tier and n}


def test_reannouncement_in_chunks_stays_exact_while_the_cache_changes(tmp_path, monkeypatch):
    import flexkv_core.cache as cache_module

    monkeypatch.setattr(cache_module, "REANNOUNCE_ROWS", 3)
    monkeypatch.setattr(cache_module, "REANNOUNCE_BUDGET_S", 0.0)
    with make_cache(tmp_path, cpu_blocks=12, ssd_blocks=48, evict_ratio=0.1) as cache:
        engine = Engine(cache)
        for p in range(8):
            store(cache, engine, tokens_for(60 + p, 4), [0, 1, 2, 3])
            cache.flush(timeout=10)
        cache.take_events()
        router = Router()
        router.feed(cache.reannounce())
        rounds = 0
        while cache.reannouncing():
            # Changes keep coming between chunks: new stores (evicting, demoting), loads staging from SSD.
            p = 70 + rounds
            store(cache, engine, tokens_for(p, 3), [0, 1, 2])
            if rounds % 3 == 0:
                load(cache, engine, chain_hashes(tokens_for(60 + rounds % 8, 4), LAYOUT.block_size), [8, 9, 10, 11])
            router.feed(cache.take_events())
            rounds += 1
        assert rounds > 3, "the walk was not chunked"
        cache.flush(timeout=10)
        router.feed(cache.take_events())
        for tier in (Tier.CPU, Tier.SSD):
            assert router.tiers(tier) == {b.hash for b in cache.index.blocks() if b.ready(tier)}
        assert_quiescent(cache)


def test_subscribe_snapshot_plus_events_gives_the_state(tmp_path, monkeypatch):
    import flexkv_core.cache as cache_module

    with make_cache(tmp_path, cpu_blocks=12, ssd_blocks=48) as cache:
        engine = Engine(cache)
        for p in range(6):
            store(cache, engine, tokens_for(80 + p, 3), [0, 1, 2])
        queued: list = []
        walk = cache._walk_rows

        def walk_with_changes(fn, rows=cache_module.WALK_ROWS):  # a store between every chunk of 2 rows
            def chunk(a, b):
                store(cache, engine, tokens_for(90 + a, 2), [5, 6])
                return fn(a, b)
            return walk(chunk, rows=2)

        monkeypatch.setattr(cache, "_walk_rows", walk_with_changes)
        held = {h: set(t) for h, t in cache.subscribe(queued.append).items()}
        cache.flush(timeout=10)
        for ev in queued:  # what the distributed node does: the snapshot first, then the events in order
            if isinstance(ev, BlockStored):
                for h in ev.block_hashes:
                    held.setdefault(h, set()).add(ev.tier)
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    held.get(h, set()).discard(ev.tier)
        for tier in (Tier.CPU, Tier.SSD):
            assert {h for h, t in held.items() if tier in t} == {b.hash for b in cache.index.blocks() if b.ready(tier)}


def test_reannouncement_announces_a_parent_before_a_child_on_an_earlier_row(tmp_path, monkeypatch):
    """Rows are reused: a chain's first block may sit on a later row than its second one. The walk, which goes
    by rows, must announce that parent first anyway (a router drops a block whose parent it does not know)."""
    import flexkv_core.cache as cache_module

    monkeypatch.setattr(cache_module, "REANNOUNCE_ROWS", 1)
    with make_cache(tmp_path, cpu_blocks=8) as cache:
        engine = Engine(cache)
        store(cache, engine, tokens_for(100, 1), [0])  # row 0
        store(cache, engine, tokens_for(101, 1), [1])  # row 1
        cache.evict_all(Tier.CPU)  # rows 0 then 1 freed: the next block takes row 1, the one after row 0
        hashes = store(cache, engine, tokens_for(102, 2), [2, 3])
        assert cache.index.find(hashes).tolist() == [1, 0]
        cache.take_events()
        router = Router()
        router.feed(cache.reannounce())
        while cache.reannouncing():
            router.feed(cache.take_events())
        assert router.tiers(Tier.CPU) == set(hashes)
        assert list(router.order) == hashes
