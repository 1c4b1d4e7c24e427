"""Worker-side block copies: store then load gives back the exact bytes, and touches nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexkv_core.layout import KVLayout
from flexkv_core.tiers.cpu import CpuPool
from flexkv_core.transfer import PARALLEL_MIN_BYTES, BlockCopier

SENTINEL = 0xA5  # what every pool byte holds before a test writes: must survive where nothing was copied


class Engine:
    """An engine KV cache in one of the memory layouts engines use, exposed as the copier's planes."""

    def __init__(self, layout: KVLayout, num_blocks: int, kind: str, fill: bool, seed: int = 0) -> None:
        lay = layout
        dtype = getattr(torch, lay.dtype)
        block = (lay.block_size, lay.num_kv_heads, lay.head_dim)
        if kind == "vllm":  # one (kv_planes, num_blocks, ...) tensor per layer: K = t[0], V = t[1]
            self.tensors = [torch.zeros((lay.kv_planes, num_blocks, *block), dtype=dtype)
                            for _ in range(lay.num_layers)]
            self.planes = [t[k] for t in self.tensors for k in range(lay.kv_planes)]
        elif kind == "flash":  # one (num_blocks, kv_planes, ...) tensor per layer: K and V side by side
            self.tensors = [torch.zeros((num_blocks, lay.kv_planes, *block), dtype=dtype)
                            for _ in range(lay.num_layers)]
            self.planes = [t[:, k] for t in self.tensors for k in range(lay.kv_planes)]
        elif kind == "stacked":  # all layers in one tensor: every plane in one storage
            self.tensors = [torch.zeros((lay.num_layers, lay.kv_planes, num_blocks, *block), dtype=dtype)]
            self.planes = [self.tensors[0][i, k] for i in range(lay.num_layers) for k in range(lay.kv_planes)]
        elif kind == "separate":  # one tensor per plane
            self.tensors = [torch.zeros((num_blocks, *block), dtype=dtype) for _ in range(lay.num_planes)]
            self.planes = list(self.tensors)
        else:
            raise ValueError(kind)
        if fill:
            gen = torch.Generator().manual_seed(seed)
            for t in self.tensors:
                raw = t.view(torch.uint8)
                raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))

    def block_bytes(self, block: int) -> bytes:
        """The block's bytes, plane by plane (compared as raw bytes: random bits include NaNs)."""
        return b"".join(p[block].contiguous().view(torch.uint8).numpy().tobytes() for p in self.planes)


def _pool(layout: KVLayout, num_slots: int) -> CpuPool:
    pool = CpuPool.create(num_slots, layout.slot_bytes)
    pool.array()[:] = SENTINEL
    return pool


def _rank_part(pool: CpuPool, layout: KVLayout, slot: int, rank: int) -> bytes:
    off = layout.rank_offset(rank)
    return pool.array()[slot, off:off + layout.rank_bytes].tobytes()


def _round_trip(layout: KVLayout, kind: str, rank: int, blocks: list[int], slots: list[int],
                num_blocks: int, num_slots: int, threads: int = 1) -> None:
    """Store ``blocks`` into ``slots``, load them back into a zeroed cache; check every byte we can see."""
    src = Engine(layout, num_blocks, kind, fill=True, seed=rank)
    dst = Engine(layout, num_blocks, kind, fill=False)
    with _pool(layout, num_slots) as pool:
        job = BlockCopier(pool, layout, rank, src.planes, threads=threads).to_pool(blocks, slots)
        job.wait()
        assert job.done() and job.num_blocks == len(blocks) and job.nbytes == len(blocks) * layout.rank_bytes

        arr = pool.array()
        off = layout.rank_offset(rank)
        for b, s in zip(blocks, slots, strict=True):
            assert _rank_part(pool, layout, s, rank) == src.block_bytes(b), f"slot {s} after storing {b}"
        untouched = np.ones(num_slots, dtype=bool)
        untouched[slots] = False
        assert (arr[untouched] == SENTINEL).all(), "a slot outside the store was written"
        written = arr[slots]
        assert (written[:, :off] == SENTINEL).all(), "another rank's part was written"
        assert (written[:, off + layout.rank_bytes:] == SENTINEL).all(), "padding or another rank's part"

        BlockCopier(pool, layout, rank, dst.planes, threads=threads).from_pool(slots, blocks).wait()
        for b in range(num_blocks):
            expected = src.block_bytes(b) if b in blocks else bytes(layout.rank_bytes)
            assert dst.block_bytes(b) == expected, f"engine block {b}"


# Odd sizes on purpose: 3 tokens x 3 heads x 5 dims never fills a page, so rank_stride has padding.
LAYOUTS = [
    KVLayout(num_layers=2, block_size=3, num_kv_heads=3, head_dim=5, dtype="bfloat16", tp_size=2),
    KVLayout(num_layers=3, block_size=4, num_kv_heads=2, head_dim=7, dtype="float32", tp_size=1),
    KVLayout(num_layers=1, block_size=16, num_kv_heads=1, head_dim=64, dtype="float16", tp_size=2),
    KVLayout(num_layers=2, block_size=5, num_kv_heads=1, head_dim=3, dtype="float16", tp_size=1, kv_planes=1),
    KVLayout(num_layers=4, block_size=32, num_kv_heads=2, head_dim=64, dtype="bfloat16", tp_size=1),
]


@pytest.mark.parametrize("kind", ["vllm", "flash", "stacked", "separate"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"{lay.dtype}-tp{lay.tp_size}-pb{lay.plane_bytes}")
def test_round_trip_scattered_blocks_and_slots(layout, kind):
    rng = np.random.default_rng(layout.plane_bytes)
    num_blocks, num_slots, n = 23, 19, 11
    blocks = rng.choice(num_blocks, n, replace=False).tolist()
    slots = rng.choice(num_slots, n, replace=False).tolist()
    for rank in range(layout.tp_size):
        _round_trip(layout, kind, rank, blocks, slots, num_blocks, num_slots)


def test_runs_consecutive_on_both_sides_and_partial_runs():
    layout = LAYOUTS[0]
    # One run of 4 on both sides, a run consecutive only in slots, one only in blocks, and singles.
    blocks = [4, 5, 6, 7, 12, 10, 14, 15, 1, 20]
    slots = [0, 1, 2, 3, 4, 5, 9, 11, 17, 16]
    _round_trip(layout, "vllm", 1, blocks, slots, 21, 18)


@pytest.mark.parametrize("threads", [2, 3])
def test_large_batch_split_over_threads(threads):
    # 80 blocks of 64 KiB: above PARALLEL_MIN_BYTES, so the batch is cut into parts copied concurrently;
    # a long run crosses the cuts, the rest is scattered.
    layout = KVLayout(num_layers=2, block_size=16, num_kv_heads=4, head_dim=64, dtype="float32", tp_size=2)
    assert 80 * layout.rank_bytes >= PARALLEL_MIN_BYTES
    rng = np.random.default_rng(threads)
    blocks = list(range(10, 50)) + rng.choice(np.arange(50, 96), 40, replace=False).tolist()
    slots = list(range(0, 40)) + (40 + rng.permutation(50)[:40]).tolist()
    _round_trip(layout, "vllm", 1, blocks, slots, 96, 90, threads=threads)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_random_pairs(data):
    layout = LAYOUTS[0]
    num_blocks = data.draw(st.integers(1, 24), label="num_blocks")
    num_slots = data.draw(st.integers(1, 24), label="num_slots")
    n = data.draw(st.integers(0, min(num_blocks, num_slots)), label="n")
    # Permutations (rather than sampled sets) make long consecutive runs likely as well as scattered ids.
    blocks = data.draw(st.permutations(range(num_blocks)), label="blocks")[:n]
    slots = data.draw(st.permutations(range(num_slots)), label="slots")[:n]
    if data.draw(st.booleans(), label="sorted"):
        blocks, slots = sorted(blocks), sorted(slots)
    kind = data.draw(st.sampled_from(["vllm", "flash", "separate"]), label="kind")
    rank = data.draw(st.integers(0, layout.tp_size - 1), label="rank")
    _round_trip(layout, kind, rank, list(blocks), list(slots), num_blocks, num_slots)


def test_both_ranks_share_slots_without_clobbering():
    layout = LAYOUTS[0]
    engines = [Engine(layout, 8, "vllm", fill=True, seed=r) for r in range(2)]
    with _pool(layout, 6) as pool:
        for r in range(2):
            BlockCopier(pool, layout, r, engines[r].planes).to_pool([1, 2, 7], [5, 0, 3]).wait()
        for r in range(2):
            back = Engine(layout, 8, "vllm", fill=False)
            BlockCopier(pool, layout, r, back.planes).from_pool([5, 0, 3], [1, 2, 7])
            for b in (1, 2, 7):
                assert back.block_bytes(b) == engines[r].block_bytes(b), f"rank {r} block {b}"
        # The padding after each rank's part is still untouched.
        for r in range(2):
            pad = pool.array()[[5, 0, 3], layout.rank_offset(r) + layout.rank_bytes:
                               layout.rank_offset(r) + layout.rank_stride]
            assert (pad == SENTINEL).all()


def test_one_block_into_several_slots_and_id_types():
    layout = LAYOUTS[1]
    src = Engine(layout, 5, "vllm", fill=True)
    with _pool(layout, 4) as pool:
        copier = BlockCopier(pool, layout, 0, src.planes)
        copier.to_pool(np.array([2, 2], dtype=np.int32), torch.tensor([3, 0])).wait()
        assert _rank_part(pool, layout, 3, 0) == _rank_part(pool, layout, 0, 0) == src.block_bytes(2)
        job = copier.to_pool([], [])
        assert job.done() and job.num_blocks == 0


def test_bad_ids_are_refused_by_name():
    layout = LAYOUTS[1]
    src = Engine(layout, 5, "vllm", fill=True)
    with _pool(layout, 4) as pool:
        copier = BlockCopier(pool, layout, 0, src.planes)
        with pytest.raises(IndexError, match="engine block id 5 outside 0..4"):
            copier.to_pool([1, 5], [0, 1])
        with pytest.raises(IndexError, match="slot -1 outside 0..3"):
            copier.from_pool([-1], [0])
        with pytest.raises(ValueError, match="destination slot 2 appears twice"):
            copier.to_pool([0, 1], [2, 2])
        with pytest.raises(ValueError, match="destination engine block 3 appears twice"):
            copier.from_pool([0, 1], [3, 3])
        with pytest.raises(ValueError, match="2 sources but 1 destinations"):
            copier.to_pool([0, 1], [2])
        with pytest.raises(TypeError, match="1-D sequence of ints"):
            copier.to_pool([0.5], [1])
        assert (pool.array() == SENTINEL).all(), "a refused copy wrote something"


def test_bad_planes_are_refused_clearly():
    layout = LAYOUTS[1]  # float32, 3 layers x K/V, 4 x 2 x 7 per plane
    good = Engine(layout, 5, "vllm", fill=False).planes
    with _pool(layout, 4) as pool:
        with pytest.raises(ValueError, match="got 5 engine planes, the layout has 6"):
            BlockCopier(pool, layout, 0, good[:5])
        with pytest.raises(ValueError, match="plane 2 has dtype torch.float16, the layout says float32"):
            BlockCopier(pool, layout, 0, [*good[:2], good[2].half(), *good[3:]])
        with pytest.raises(ValueError, match="plane 0 holds 112 B per block .* says 224 B"):
            BlockCopier(pool, layout, 0, [p[:, :2] for p in good])
        with pytest.raises(ValueError, match="plane 1: one block's data is not contiguous"):
            BlockCopier(pool, layout, 0, [good[0], good[1].transpose(1, 2), *good[2:]])
        with pytest.raises(ValueError, match="plane 3 has 4 blocks, plane 0 has 5"):
            BlockCopier(pool, layout, 0, [*good[:3], good[3][:4], *good[4:]])
        with pytest.raises(ValueError, match="tp_rank 1 outside 0..0"):
            BlockCopier(pool, layout, 1, good)
        with pytest.raises(ValueError, match="threads must be a positive int, got 0"):
            BlockCopier(pool, layout, 0, good, threads=0)
    with CpuPool.create(4, layout.slot_bytes * 2) as wrong, \
            pytest.raises(ValueError, match=f"slots of {layout.slot_bytes * 2} B but the layout needs"):
        BlockCopier(wrong, layout, 0, good)


@pytest.mark.slow
def test_worker_process_stores_owner_loads():
    """The real arrangement: the cache owns the pool, a TP worker process attaches and stores into it."""
    layout = LAYOUTS[0]
    with _pool(layout, 6) as pool:
        code = f"""
            import torch
            from flexkv_core.layout import KVLayout
            from flexkv_core.tiers.cpu import CpuPool
            from flexkv_core.transfer import PARALLEL_MIN_BYTES, BlockCopier
            layout = {layout!r}
            kv = [torch.arange(2 * 4 * 45, dtype=torch.int16).add_(1000 * i).view(torch.bfloat16)
                  .view(2, 4, 3, 3, 5) for i in range(layout.num_layers)]
            with CpuPool.attach({pool.name!r}, 6, layout.slot_bytes) as pool:
                BlockCopier(pool, layout, 1, [t[k] for t in kv for k in range(2)]).to_pool([3, 0], [4, 1]).wait()
        """
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        back = Engine(layout, 4, "vllm", fill=False)
        BlockCopier(pool, layout, 1, back.planes).from_pool([4, 1], [3, 0])
        for b in (3, 0):
            for layer, t in enumerate(back.tensors):
                expected = torch.arange(2 * 4 * 45, dtype=torch.int16).add_(1000 * layer).view(2, 4, 45)[:, b]
                assert torch.equal(t[:, b].reshape(2, 45).view(torch.int16), expected), f"block {b}"
        assert (pool.array()[:, : layout.rank_stride] == SENTINEL).all(), "rank 1 wrote into rank 0's part"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip():
    layout = LAYOUTS[4]
    src = Engine(layout, 16, "vllm", fill=True)
    gpu = [t.cuda() for t in src.tensors]
    gpu_planes = [t[k] for t in gpu for k in range(2)]
    with _pool(layout, 12) as pool:
        copier = BlockCopier(pool, layout, 0, gpu_planes)
        assert pool.pinned
        job = copier.to_pool([3, 9, 10, 11], [7, 2, 3, 4])
        job.wait()
        assert job.done()
        for t in gpu:
            t.zero_()
        job = copier.from_pool([7, 2, 3, 4], [3, 9, 10, 11])
        job.wait_stream()
        torch.cuda.current_stream().synchronize()
        for t, ref in zip(gpu, src.tensors, strict=True):
            for b in (3, 9, 10, 11):
                assert torch.equal(t[:, b].cpu().view(torch.uint8), ref[:, b].view(torch.uint8))
            assert not t[:, 0].view(torch.uint8).any()
