"""Node-shared tiers: one `flexkv serve` owner, several engines attached through FLEXKV_SERVER_RECV_PORT.

Real parts only: the owner is a real `CacheOwner` (in this process, or a real ``flexkv serve`` process
where the test kills it), the engines are real `SharedCache` handles talking to it over ipc, bytes go
through the real shared-memory pool, the SSD tier is real O_DIRECT files. No vLLM engine here: the
end-to-end test with two ``dynamo.vllm`` workers is in tests/test_dynamo_e2e.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import short_tmpdir
from support import wait_for

from flexkv_core.client import CacheClient
from flexkv_core.config import FlexKVConfig
from flexkv_core.events import BlockRemoved, BlockStored
from flexkv_core.hashing import chain_hashes
from flexkv_core.layout import CacheIdentity, KVLayout, Tier
from flexkv_core.shared import CacheOwner, SharedCache, TierMirror
from flexkv_core.tiers.cpu import CpuPool

LAYOUT = KVLayout(num_layers=2, block_size=32, num_kv_heads=2, head_dim=64, dtype="float32")
IDENTITY = CacheIdentity(model="shared-test", layout=LAYOUT)
GiB = 1 << 30


def config(workdir: str, instance_id: int = 0, cpu_blocks: int = 64, ssd_blocks: int = 256) -> FlexKVConfig:
    slot = LAYOUT.slot_bytes
    return FlexKVConfig(cpu_cache_gb=cpu_blocks * slot / GiB, ssd_cache_gb=ssd_blocks * slot / GiB,
                        ssd_cache_dir=(os.path.join(workdir, "ssd"),), enable_metrics=False,
                        server_recv_port=f"ipc://{workdir}/svc.sock", share_server=True, instance_num=2,
                        instance_id=instance_id)


def env_of(cfg: FlexKVConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"FLEXKV_CPU_CACHE_GB": repr(cfg.cpu_cache_gb), "FLEXKV_SSD_CACHE_GB": repr(cfg.ssd_cache_gb),
                "FLEXKV_SSD_CACHE_DIR": cfg.ssd_cache_dir[0], "FLEXKV_SERVER_RECV_PORT": cfg.server_recv_port,
                "FLEXKV_SHARE_SERVER": "1", "FLEXKV_ENABLE_METRICS": "0"})
    return env


def tokens_for(prompt: int, n_blocks: int) -> list[int]:
    return [prompt * 100_000 + i for i in range(n_blocks * LAYOUT.block_size)]


def block_bytes(h: int) -> np.ndarray:
    return np.random.default_rng(h % (1 << 32)).integers(0, 256, LAYOUT.slot_bytes, dtype=np.uint8)


def store(cache: SharedCache, tokens: list[int]) -> list[int]:
    """What an engine's workers do for a store: copy each block's bytes into the slots the plan names."""
    hashes = chain_hashes(tokens, LAYOUT.block_size)
    plan = cache.reserve_store(hashes, None, tokens)
    assert plan.covered == len(hashes)
    pool = CpuPool.attach(cache.pool.name, cache.pool.num_slots, LAYOUT.slot_bytes)
    try:
        for h, slot in zip(plan.block_hashes, plan.slots):
            pool.array()[slot] = block_bytes(h)
    finally:
        pool.close()
    cache.complete_store(plan)
    return hashes


def held(cache: SharedCache, hashes: list[int], tier: Tier = Tier.CPU) -> bool:
    result = cache.lookup(hashes)
    return (result.cpu if tier is Tier.CPU else result.ssd) == len(hashes)


def stored_hashes(events, tier: Tier) -> list[int]:
    return [h for e in events if isinstance(e, BlockStored) and e.tier is tier for h in e.block_hashes]


def removed_hashes(events, tier: Tier) -> list[int]:
    return [h for e in events if isinstance(e, BlockRemoved) and e.tier is tier for h in e.block_hashes]


@pytest.fixture
def workdir():
    d = short_tmpdir("fkvsh")
    yield d
    subprocess.run(["rm", "-rf", d], check=False)


@pytest.fixture
def owner(workdir):
    o = CacheOwner(config(workdir))
    o.start()
    yield o
    o.close()


def test_a_block_stored_by_one_engine_is_loaded_by_another(owner, workdir):
    a = SharedCache(config(workdir, 0), IDENTITY)
    b = SharedCache(config(workdir, 1), IDENTITY)
    try:
        assert a.pool_name == b.pool_name == owner.cache.pool_name
        tokens = tokens_for(1, 6)
        hashes = store(a, tokens)
        wait_for(lambda: held(b, hashes), 10, "engine B's mirror to see engine A's blocks")
        plan = b.prepare_load(hashes)
        assert plan.ready.result(timeout=10) == len(hashes)
        assert plan.tier_hits[Tier.CPU] == len(hashes)
        pool = CpuPool.attach(b.pool.name, b.pool.num_slots, LAYOUT.slot_bytes)
        try:
            for h, slot in zip(plan.block_hashes, plan.slots):
                assert np.array_equal(pool.array()[slot], block_bytes(h)), "bytes differ"
        finally:
            pool.close()
        b.finish_load(plan)
        # Both engines announce the blocks as their own host tier, with the tokens the router hashes.
        for engine in (a, b):
            events = engine.take_events()
            assert stored_hashes(events, Tier.CPU) == hashes
            stored = [e for e in events if isinstance(e, BlockStored) and e.tier is Tier.CPU]
            assert [t for e in stored for t in e.token_ids] == tokens
            assert stored[0].parent_block_hash is None
        wait_for(lambda: owner.status()["tiers"]["cpu"]["pinned_blocks"] == 0, 10, "load pins released")
    finally:
        a.close()
        b.close()


def test_every_engine_balances_stored_and_removed_per_tier(owner, workdir):
    engines = [SharedCache(config(workdir, i), IDENTITY) for i in range(2)]
    try:
        hashes = store(engines[0], tokens_for(2, 5))
        wait_for(lambda: all(held(e, hashes, Tier.SSD) for e in engines), 20, "write-back to SSD seen by all")
        assert owner.cache.evict_all(Tier.CPU) == len(hashes)
        wait_for(lambda: all(e.lookup(hashes).cpu == 0 for e in engines), 10, "CPU eviction seen by all")
        owner.cache.reset()
        wait_for(lambda: all(e.lookup(hashes).total == 0 for e in engines), 10, "reset seen by all")
        for e in engines:
            events = e.take_events()
            for tier in (Tier.CPU, Tier.SSD):
                assert sorted(stored_hashes(events, tier)) == sorted(hashes)
                assert sorted(removed_hashes(events, tier)) == sorted(hashes)
    finally:
        for e in engines:
            e.close()


def test_a_lookup_on_an_attached_engine_costs_no_round_trip(owner, workdir):
    engine = SharedCache(config(workdir, 1), IDENTITY)
    try:
        hashes = store(engine, tokens_for(3, 4))
        wait_for(lambda: held(engine, hashes), 10, "mirror")
        calls: list[str] = []
        real_call = engine._rpc.call

        def counted(method: str, **args: object) -> object:
            calls.append(method)
            return real_call(method, **args)

        engine._rpc.call = counted  # every request of the scheduler thread goes through this client
        assert engine.lookup(hashes).cpu == len(hashes)
        assert calls == []
    finally:
        engine.close()


def test_an_engine_of_another_identity_is_refused_by_name(owner, workdir):
    a = SharedCache(config(workdir, 0), IDENTITY)
    try:
        other = CacheIdentity(model="another-model", layout=LAYOUT)
        with pytest.raises(ValueError, match="another-model.*|.*shared-test"):
            SharedCache(config(workdir, 1), other)
    finally:
        a.close()


def test_mirror_replay_after_a_snapshot_is_idempotent():
    tokens = tokens_for(4, 3)
    hashes = chain_hashes(tokens, LAYOUT.block_size)
    run = BlockStored(tier=Tier.CPU, block_hashes=hashes, parent_block_hash=None, token_ids=tokens,
                      block_size=LAYOUT.block_size)
    mirror = TierMirror()
    out = mirror.apply([BlockStored(tier=Tier.CPU, block_hashes=[hashes[1]], parent_block_hash=hashes[0],
                                    token_ids=tokens[32:64], block_size=32)])
    assert stored_hashes(out, Tier.CPU) == [hashes[1]]
    # The full run replayed: only the blocks around the held one are new, each stretch with its own parent.
    out = mirror.apply([run])
    assert [(e.block_hashes, e.parent_block_hash) for e in out] == [([hashes[0]], None), ([hashes[2]], hashes[1])]
    assert out[1].token_ids == tokens[64:96]
    assert mirror.apply([run]) == []
    assert removed_hashes(mirror.apply([BlockRemoved(tier=Tier.CPU, block_hashes=[hashes[0], 7])]), Tier.CPU) == [hashes[0]]
    # A snapshot that no longer holds hashes[2] but holds hashes[0] again.
    out = mirror.resync([BlockStored(tier=Tier.CPU, block_hashes=hashes[:2], parent_block_hash=None,
                                     token_ids=tokens[:64], block_size=32)])
    assert removed_hashes(out, Tier.CPU) == [hashes[2]]
    assert stored_hashes(out, Tier.CPU) == [hashes[0]]
    assert mirror.lookup(hashes).cpu == 2


# ---- the owner as a process: it dies, it comes back; an engine dies --------------------------------------


def start_owner_process(cfg: FlexKVConfig) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "flexkv_core.cli", "serve"], env=env_of(cfg),
                            start_new_session=True)
    wait_for(lambda: _answers(cfg.server_recv_port), 30, "flexkv serve to answer")
    return proc


def _answers(endpoint: str) -> bool:
    try:
        with CacheClient(endpoint, timeout_s=0.5) as c:
            c.call("whoami")
        return True
    except Exception:  # noqa: BLE001
        return False


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.slow
def test_owner_death_is_a_miss_and_a_restarted_owner_comes_back_warm_and_announced(workdir):
    cfg = config(workdir, 1)
    proc = start_owner_process(cfg)
    engine = SharedCache(cfg, IDENTITY)
    try:
        hashes = store(engine, tokens_for(5, 4))
        wait_for(lambda: held(engine, hashes, Tier.SSD), 20, "write-back to SSD")
        engine.take_events()
        _kill(proc)
        started = time.monotonic()
        wait_for(lambda: not engine.attached, 10, "the engine to notice its owner died")
        noticed = time.monotonic() - started
        print(f"owner death noticed after {noticed:.2f} s")
        assert engine.lookup(hashes).total == 0
        plan = engine.prepare_load(hashes)  # no hang, no error: a miss
        assert plan.ready.result(timeout=1) == 0
        events = engine.take_events()
        for tier in (Tier.CPU, Tier.SSD):
            assert sorted(removed_hashes(events, tier)) == sorted(hashes), "router entries not removed"
        proc = start_owner_process(cfg)  # same SSD directory: a warm restart
        wait_for(lambda: engine.attached and held(engine, hashes, Tier.SSD), 20, "re-attach to the new owner")
        assert sorted(stored_hashes(engine.take_events(), Tier.SSD)) == sorted(hashes)
        plan = engine.prepare_load(hashes)
        assert plan.ready.result(timeout=20) == len(hashes)
        assert plan.tier_hits[Tier.SSD] == len(hashes)
        engine.finish_load(plan)
    finally:
        engine.close()
        _kill(proc)


ENGINE_SCRIPT = textwrap.dedent("""
    import sys, time
    from flexkv_core.config import load_config
    from flexkv_core.hashing import chain_hashes
    from flexkv_core.layout import CacheIdentity, KVLayout
    from flexkv_core.shared import SharedCache
    layout = KVLayout(num_layers=2, block_size=32, num_kv_heads=2, head_dim=64, dtype="float32")
    engine = SharedCache(load_config(), CacheIdentity(model="shared-test", layout=layout))
    hashes = [int(h) for h in sys.argv[1].split(",")]
    load = engine.prepare_load(hashes)
    assert load.ready.result(timeout=20) == len(hashes)
    tokens = list(range(900_000, 900_000 + 2 * 32))
    store = engine.reserve_store(chain_hashes(tokens, 32), None, tokens)
    assert store.block_hashes, "nothing reserved"
    print("holding", flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
def test_an_engine_that_dies_leaks_nothing_in_the_owner(owner, workdir):
    engine = SharedCache(config(workdir, 0), IDENTITY)
    try:
        hashes = store(engine, tokens_for(6, 3))
        wait_for(lambda: held(engine, hashes), 10, "mirror")
        env = env_of(config(workdir, 1))
        env["FLEXKV_INSTANCE_ID"] = "1"
        env["FLEXKV_INSTANCE_NUM"] = "2"
        child = subprocess.Popen([sys.executable, "-c", ENGINE_SCRIPT, ",".join(map(str, hashes))], env=env,
                                 stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert child.stdout.readline().strip() == "holding"
            status = owner.status()
            assert status["tiers"]["cpu"]["pinned_blocks"] == len(hashes)
            assert status["pending_stores"] == 1
        finally:
            _kill(child)
        wait_for(lambda: owner.status()["tiers"]["cpu"]["pinned_blocks"] == 0
                 and owner.status()["pending_stores"] == 0, 10, "the owner to release the dead engine's pins")
        assert [s["instance_id"] for s in owner.status()["shared"]["sessions"]] == [0]
    finally:
        engine.close()


@pytest.mark.slow
def test_instance_zero_starts_the_owner_when_none_serves(workdir):
    cfg = config(workdir, 0)
    engine = SharedCache(cfg, IDENTITY)
    pid = None
    try:
        assert engine.attached
        with CacheClient(cfg.server_recv_port, timeout_s=2) as c:
            pid = c.call("whoami")["pid"]
        assert pid != os.getpid()
        # A session of its own: vLLM's shutdown of the engine (which kills its process tree) spares it.
        assert os.getsid(pid) == pid
        hashes = store(engine, tokens_for(7, 2))
        wait_for(lambda: held(engine, hashes), 10, "mirror")
    finally:
        engine.close()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not _answers(cfg.server_recv_port), 20, "the owner to stop")


# ---- the router sees it -------------------------------------------------------------------------------------


@pytest.mark.dynamo
@pytest.mark.slow
def test_the_router_credits_every_engine_of_the_node_for_the_shared_tiers(owner, workdir, tmp_path):
    """Two engines attached to one owner announce through the real Dynamo KvRouter; the router's per-tier
    overlap of each equals what that engine can load (the shared tiers), not just the engine that stored."""
    import asyncio

    pytest.importorskip("dynamo.llm")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))
    from replay.router import ReplayRouter, RouterKnobs, dynamo_env

    from flexkv_dynamo.kv_events import to_vllm_events

    engines = [SharedCache(config(workdir, i), IDENTITY) for i in range(2)]
    loop = asyncio.new_event_loop()
    try:
        with dynamo_env(tmp_path):
            router = loop.run_until_complete(ReplayRouter.start(2, LAYOUT.block_size, RouterKnobs()))
            try:
                def announce() -> None:
                    for i, engine in enumerate(engines):
                        events = to_vllm_events(engine.take_events(), block_size=LAYOUT.block_size)
                        loop.run_until_complete(router.publish(i, events))

                def overlap(tokens: list[int]) -> dict[int, tuple[int, int]]:
                    rows = loop.run_until_complete(router.overlap(tokens))
                    return {i: (rows[i]["host_pinned_extension_blocks"], rows[i]["disk_extension_blocks"])
                            if i in rows else (0, 0) for i in range(2)}

                tokens = tokens_for(8, 5)
                hashes = store(engines[0], tokens)
                wait_for(lambda: all(held(e, hashes, Tier.SSD) for e in engines), 20, "CPU and SSD copies")
                announce()
                # Both copies are held: the router credits the host tier (the cheaper one) for both engines.
                assert overlap(tokens) == {0: (5, 0), 1: (5, 0)}
                owner.cache.evict_all(Tier.CPU)
                wait_for(lambda: all(e.lookup(hashes).cpu == 0 for e in engines), 10, "CPU eviction")
                announce()
                assert overlap(tokens) == {0: (0, 5), 1: (0, 5)}
                for e in engines:  # and what the router credits is what each engine can load
                    assert e.lookup(hashes).ssd == 5
            finally:
                loop.run_until_complete(router.close())
    finally:
        loop.close()
        for e in engines:
            e.close()
