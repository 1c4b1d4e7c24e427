"""Invariants of the prefix index under random operation sequences (hypothesis state machine)."""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flexkv_core.allocator import SlotAllocator
from flexkv_core.config import EvictionPolicy
from flexkv_core.events import BlockRemoved, BlockStored, EventLog
from flexkv_core.hashing import chain_hashes, tokens_to_bytes
from flexkv_core.index import PrefixIndex, TierState
from flexkv_core.layout import Tier

BS = 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def make_index(cpu: int = 8, ssd: int = 16, policy: EvictionPolicy = EvictionPolicy.LRU, reward: float = 0.0):
    events = EventLog()
    index = PrefixIndex({Tier.CPU: cpu, Tier.SSD: ssd}, block_size=BS, events=events, policy=policy,
                        hit_reward_seconds=reward, clock=FakeClock())
    return index, events


def store_chain(index: PrefixIndex, alloc: SlotAllocator, tokens: list[int], tier: Tier = Tier.CPU) -> list[int]:
    hashes = chain_hashes(tokens, BS)
    parent = None
    for i, h in enumerate(hashes):
        if not (index.get(h) and index.get(h).held(tier)):
            (slot,) = alloc.alloc(1)
            index.begin_fill(tier, h, slot, parent=parent, tokens=tokens_to_bytes(tokens[i * BS:(i + 1) * BS]))
            index.finish_fill(tier, [h])
        parent = h
    return hashes


def test_lookup_counts_leading_blocks_per_tier():
    index, _ = make_index()
    cpu, ssd = SlotAllocator(8), SlotAllocator(16)
    tokens = list(range(6 * BS))
    hashes = store_chain(index, cpu, tokens[:3 * BS])
    store_chain(index, ssd, tokens, tier=Tier.SSD)
    r = index.lookup(hashes + chain_hashes(tokens, BS)[3:])
    assert (r.cpu, r.ssd, r.total) == (3, 6, 6)
    # A different prompt shares nothing.
    assert index.lookup(chain_hashes([999] * 2 * BS, BS)).total == 0


def test_filling_blocks_are_invisible_and_stored_event_carries_tokens():
    index, events = make_index()
    tokens = list(range(2 * BS))
    h0, h1 = chain_hashes(tokens, BS)
    index.begin_fill(Tier.CPU, h0, 0, parent=None, tokens=tokens_to_bytes(tokens[:BS]))
    index.begin_fill(Tier.CPU, h1, 1, parent=h0, tokens=tokens_to_bytes(tokens[BS:]))
    assert index.lookup([h0, h1]).total == 0
    assert events.drain() == []
    index.finish_fill(Tier.CPU, [h0, h1])
    (ev,) = events.drain()
    assert ev == BlockStored(tier=Tier.CPU, block_hashes=[h0, h1], parent_block_hash=None, token_ids=tokens,
                             block_size=BS)


def test_eviction_takes_leaves_first_and_skips_pinned():
    index, _ = make_index()
    alloc = SlotAllocator(8)
    a = store_chain(index, alloc, list(range(3 * BS)))
    b = store_chain(index, alloc, list(range(100, 100 + 2 * BS)))
    index.pin(Tier.CPU, b[-1])
    order = [blk.hash for blk in index.eviction_candidates(Tier.CPU, 10)]
    # Only leaves: a's last block; b's leaf is pinned, so b's root (not a leaf) is not offered either.
    assert order == [a[-1]]


@pytest.mark.parametrize("policy,expected", [
    (EvictionPolicy.LRU, ["x", "y", "z"]),
    (EvictionPolicy.MRU, ["z", "y", "x"]),
    (EvictionPolicy.FIFO, ["y", "x", "z"]),
    (EvictionPolicy.FILO, ["z", "x", "y"]),
    (EvictionPolicy.LFU, ["y", "z", "x"]),
])
def test_policies_order(policy, expected):
    index, _ = make_index(policy=policy)
    alloc = SlotAllocator(8)
    names = {}
    for name, base in (("y", 200), ("x", 100), ("z", 300)):  # inserted y, x, z
        (h,) = store_chain(index, alloc, list(range(base, base + BS)))
        names[h] = name
    inv = {v: k for k, v in names.items()}
    index.touch(inv["x"])  # x hit once ...
    index.touch(inv["x"])  # ... twice
    index.touch(inv["y"], hit=False)  # y only refreshed
    index.touch(inv["z"])  # z hit once, most recent
    got = [names[b.hash] for b in index.eviction_candidates(Tier.CPU, 3)]
    if policy is EvictionPolicy.LRU:
        expected = ["x", "y", "z"]  # x touched before y and z
    assert got == expected


def test_hit_reward_keeps_hot_blocks_under_lru():
    index, _ = make_index(reward=100.0)
    alloc = SlotAllocator(8)
    (hot,) = store_chain(index, alloc, list(range(BS)))
    index.touch(hot)
    (cold,) = store_chain(index, alloc, list(range(50, 50 + BS)))
    assert [b.hash for b in index.eviction_candidates(Tier.CPU, 1)] == [cold]


def test_slru_protects_blocks_hit_twice():
    index, _ = make_index(policy=EvictionPolicy.SLRU)
    alloc = SlotAllocator(8)
    (old_hot,) = store_chain(index, alloc, list(range(BS)))
    index.touch(old_hot)
    index.touch(old_hot)
    (new_cold,) = store_chain(index, alloc, list(range(50, 50 + BS)))
    assert [b.hash for b in index.eviction_candidates(Tier.CPU, 2)] == [new_cold, old_hot]


def test_capacity_is_enforced():
    index, _ = make_index(cpu=1)
    index.begin_fill(Tier.CPU, 1, 0, tokens=tokens_to_bytes([0] * BS))
    with pytest.raises(RuntimeError, match="CPU tier is full"):
        index.begin_fill(Tier.CPU, 2, 1, tokens=tokens_to_bytes([1] * BS))


class IndexMachine(RuleBasedStateMachine):
    """Random stores, loads (pins), evictions, write-backs and failures against a model of the tiers."""

    def __init__(self) -> None:
        super().__init__()
        self.index, self.events = make_index(cpu=6, ssd=10)
        self.alloc = {Tier.CPU: SlotAllocator(6), Tier.SSD: SlotAllocator(10)}
        self.bytes = {Tier.CPU: {}, Tier.SSD: {}}  # slot -> hash whose bytes it holds
        self.filling: dict[Tier, list[int]] = {Tier.CPU: [], Tier.SSD: []}
        self.pins: Counter = Counter()  # (tier, hash) -> pins we hold
        self.balance: Counter = Counter()  # (tier, hash) -> Stored - Removed

    def _drain(self) -> None:
        for ev in self.events.drain():
            sign = 1 if isinstance(ev, BlockStored) else -1
            assert isinstance(ev, BlockStored | BlockRemoved)
            for h in ev.block_hashes:
                self.balance[(ev.tier, h)] += sign
                assert self.balance[(ev.tier, h)] in (0, 1), "stored twice or removed twice"

    def _evict(self, tier: Tier, n: int) -> None:
        victims = self.index.eviction_candidates(tier, n)
        for b in victims:
            assert self.pins[(tier, b.hash)] == 0, "pinned block offered for eviction"
            assert b.ready(tier)
        slots = self.index.remove(tier, [b.hash for b in victims])
        for s in slots:
            del self.bytes[tier][s]
        self.alloc[tier].free(slots)

    @rule(prompt=st.integers(0, 5), length=st.integers(1, 4), ok=st.booleans())
    def store(self, prompt: int, length: int, ok: bool) -> None:
        tokens = [prompt * 1000 + (i if i < 2 * BS else prompt * 7 + i) for i in range(length * BS)]
        hashes = chain_hashes(tokens, BS)
        parent = None
        started = []
        for i, h in enumerate(hashes):
            b = self.index.get(h)
            if not (b and b.held(Tier.CPU)):
                if self.alloc[Tier.CPU].num_free == 0:
                    self._evict(Tier.CPU, 1)
                slots = self.alloc[Tier.CPU].alloc(1)
                if not slots:
                    break
                self.index.begin_fill(Tier.CPU, h, slots[0], parent=parent,
                                      tokens=tokens_to_bytes(tokens[i * BS:(i + 1) * BS]))
                started.append((h, slots[0]))
            parent = h
        if ok:
            for h, s in started:
                self.bytes[Tier.CPU][s] = h
            self.index.finish_fill(Tier.CPU, [h for h, _ in started])
        else:
            freed = self.index.abort_fill(Tier.CPU, [h for h, _ in started])
            self.alloc[Tier.CPU].free(freed)

    @rule(data=st.data())
    def pin_ready(self, data) -> None:
        ready = [(t, b.hash) for b in self.index.blocks() for t in (Tier.CPU, Tier.SSD) if b.ready(t)]
        if ready:
            tier, h = data.draw(st.sampled_from(ready))
            self.index.pin(tier, h)
            self.pins[(tier, h)] += 1

    @precondition(lambda self: +self.pins)
    @rule(data=st.data())
    def unpin(self, data) -> None:
        tier, h = data.draw(st.sampled_from(sorted((+self.pins).keys(), key=lambda k: (k[0].value, k[1]))))
        self.index.unpin(tier, h)
        self.pins[(tier, h)] -= 1

    @rule(tier=st.sampled_from([Tier.CPU, Tier.SSD]), n=st.integers(1, 4))
    def evict(self, tier: Tier, n: int) -> None:
        self._evict(tier, n)

    @rule(n=st.integers(1, 4))
    def begin_write_back(self, n: int) -> None:
        todo = [b for b in self.index.blocks() if b.ready(Tier.CPU) and not b.held(Tier.SSD)][:n]
        for b in todo:
            if self.alloc[Tier.SSD].num_free == 0:
                self._evict(Tier.SSD, 1)
            slots = self.alloc[Tier.SSD].alloc(1)
            if not slots:
                return
            self.index.begin_fill(Tier.SSD, b.hash, slots[0])
            self.index.pin(Tier.CPU, b.hash)
            self.filling[Tier.SSD].append(b.hash)

    @precondition(lambda self: self.filling[Tier.SSD])
    @rule(ok=st.booleans())
    def end_write_back(self, ok: bool) -> None:
        h = self.filling[Tier.SSD].pop(0)
        b = self.index.get(h)
        if ok:
            self.bytes[Tier.SSD][b.slot_in(Tier.SSD)] = h
            self.index.finish_fill(Tier.SSD, [h])
        else:
            self.alloc[Tier.SSD].free(self.index.abort_fill(Tier.SSD, [h]))
        self.index.unpin(Tier.CPU, h)

    @invariant()
    def consistent(self) -> None:
        self._drain()
        for tier in (Tier.CPU, Tier.SSD):
            assert self.index.used(tier) <= self.index.capacity[0 if tier is Tier.CPU else 1]
            assert self.index.used(tier) == self.alloc[tier].num_used
        for b in self.index.blocks():
            for tier in (Tier.CPU, Tier.SSD):
                if b.ready(tier):
                    assert self.bytes[tier].get(b.slot_in(tier)) == b.hash, "ready block without its bytes"
                expected = 1 if b.ready(tier) else 0
                assert self.balance[(tier, b.hash)] == expected
                assert b.pins[0 if tier is Tier.CPU else 1] >= self.pins[(tier, b.hash)]
        # Blocks that left the index entirely were removed as often as they were stored.
        for (tier, h), n in self.balance.items():
            if self.index.get(h) is None:
                assert n == 0
            else:
                assert n == (1 if self.index.get(h).state[0 if tier is Tier.CPU else 1] == TierState.READY else 0)


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
