"""The prefix index: lookups, leaves-first eviction by policy, pins, ghosts, and its invariants under random
operation sequences (a hypothesis state machine against a model of the tiers)."""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flexkv_core.allocator import SlotAllocator
from flexkv_core.config import EvictionPolicy
from flexkv_core.hashing import chain_hashes
from flexkv_core.index import PrefixIndex
from flexkv_core.layout import Tier

BS = 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class Recorder:
    """An index observer keeping Stored - Removed per (tier, hash), as a router would."""

    def __init__(self) -> None:
        self.index: PrefixIndex | None = None
        self.balance: Counter = Counter()
        self.stored_events: list[tuple[Tier, list[int], list[int | None]]] = []

    def stored(self, tier: Tier, rows) -> None:
        hashes = self.index.hashes(rows).tolist()
        self.stored_events.append((tier, hashes, self.index.parent_hashes(rows)))
        for h in hashes:
            self.balance[(tier, h)] += 1
            assert self.balance[(tier, h)] == 1, "stored twice"

    def removed(self, tier: Tier, rows, hashes) -> None:
        for h in hashes.tolist():
            self.balance[(tier, h)] -= 1
            assert self.balance[(tier, h)] == 0, "removed twice"


def make_index(cpu: int = 8, ssd: int = 16, policy: EvictionPolicy = EvictionPolicy.LRU, reward: float = 0.0):
    rec = Recorder()
    index = PrefixIndex({Tier.CPU: cpu, Tier.SSD: ssd}, policy=policy, hit_reward_seconds=reward, clock=FakeClock(),
                        observer=rec)
    rec.index = index
    return index, rec


def row(index: PrefixIndex, h: int) -> int:
    (r,) = index.find([h]).tolist()
    return r


def store_chain(index: PrefixIndex, alloc: SlotAllocator, tokens: list[int], tier: Tier = Tier.CPU) -> list[int]:
    """Store the chain's blocks one call each (as separate requests would)."""
    hashes = chain_hashes(tokens, BS)
    parent = None
    for h in hashes:
        b = index.get(h)
        if not (b and b.held(tier)):
            rows = index.begin_fill(tier, [h], alloc.alloc(1), [parent])
            index.finish_fill(tier, rows)
        parent = h
    return hashes


def victims(index: PrefixIndex, tier: Tier, n: int) -> list[int]:
    return index.hashes(index.pop_victims(tier, n)).tolist()


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
    index.check()


def test_filling_blocks_are_invisible_and_announced_once_ready():
    index, rec = make_index()
    h0, h1 = chain_hashes(list(range(2 * BS)), BS)
    rows = index.begin_fill(Tier.CPU, [h0, h1], [0, 1], [None, h0])
    assert index.lookup([h0, h1]).total == 0
    assert rec.stored_events == []
    index.finish_fill(Tier.CPU, rows)
    assert rec.stored_events == [(Tier.CPU, [h0, h1], [None, h0])]
    assert index.lookup([h0, h1]).cpu == 2
    index.check()


def test_eviction_takes_leaves_first_and_skips_pinned():
    index, _ = make_index()
    alloc = SlotAllocator(8)
    a = store_chain(index, alloc, list(range(3 * BS)))
    b = store_chain(index, alloc, list(range(100, 100 + 2 * BS)))
    index.pin(Tier.CPU, [row(index, b[-1])])
    # Only leaves: a's last block; b's leaf is pinned, so b's root (not a leaf) is not offered either.
    rows = index.pop_victims(Tier.CPU, 10)
    assert index.hashes(rows).tolist() == [a[-1]]
    index.remove(Tier.CPU, rows)  # what an eviction does with what it took
    index.check()


def test_evicting_a_leaf_exposes_its_parent():
    index, _ = make_index()
    alloc = SlotAllocator(8)
    a = store_chain(index, alloc, list(range(3 * BS)))
    for expected in reversed(a):
        (v,) = index.pop_victims(Tier.CPU, 5)
        assert index.hashes([v]).tolist() == [expected]
        alloc.free(index.remove(Tier.CPU, [v]))
    assert len(index) == 0
    index.check()


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
    inv = {v: row(index, k) for k, v in names.items()}
    index.touch([inv["x"]])  # x hit once ...
    index.touch([inv["x"]])  # ... twice
    index.touch([inv["y"]], hit=False)  # y only refreshed
    index.touch([inv["z"]])  # z hit once, most recent
    assert [names[h] for h in victims(index, Tier.CPU, 3)] == expected


def test_hit_reward_keeps_hot_blocks_under_lru():
    index, _ = make_index(reward=100.0)
    alloc = SlotAllocator(8)
    (hot,) = store_chain(index, alloc, list(range(BS)))
    index.touch([row(index, hot)])
    (cold,) = store_chain(index, alloc, list(range(50, 50 + BS)))
    assert victims(index, Tier.CPU, 1) == [cold]


def test_slru_protects_blocks_hit_twice():
    index, _ = make_index(policy=EvictionPolicy.SLRU)
    alloc = SlotAllocator(8)
    (old_hot,) = store_chain(index, alloc, list(range(BS)))
    index.touch([row(index, old_hot)])
    index.touch([row(index, old_hot)])
    (new_cold,) = store_chain(index, alloc, list(range(50, 50 + BS)))
    assert victims(index, Tier.CPU, 2) == [new_cold, old_hot]


def test_capacity_and_bad_batches_are_refused_before_anything_changes():
    index, _ = make_index(cpu=2)
    index.begin_fill(Tier.CPU, [1], [0], [None])
    with pytest.raises(RuntimeError, match="CPU tier is full"):
        index.begin_fill(Tier.CPU, [2, 3], [1, 0], [None, 2])
    with pytest.raises(RuntimeError, match="already held in CPU"):
        index.begin_fill(Tier.CPU, [1], [1], [None])
    with pytest.raises(ValueError, match="appears twice"):
        index.begin_fill(Tier.SSD, [5, 5], [0, 1], [None, 5])
    with pytest.raises(ValueError, match="not an int in"):
        index.begin_fill(Tier.SSD, [-3], [0], [None])
    with pytest.raises(ValueError, match="its parent is needed"):
        index.begin_fill(Tier.SSD, [7], [0])
    with pytest.raises(ValueError, match="outside"):
        index.begin_fill(Tier.SSD, [7], [16], [None])
    with pytest.raises(RuntimeError, match="is not ready"):
        index.remove(Tier.CPU, index.find([1]))
    assert index.counts()["used"] == [1, 0] and len(index) == 1
    index.check()


def test_a_parent_leaving_every_tier_stays_a_ghost_while_a_child_is_held():
    """Child only in CPU, parent only on SSD: evicting the parent from SSD must not forget that it has a
    child in CPU, so that, stored in CPU again, it still goes after that child."""
    index, _ = make_index()
    p, c = chain_hashes(list(range(2 * BS)), BS)
    index.finish_fill(Tier.SSD, index.begin_fill(Tier.SSD, [p], [0], [None]))
    index.finish_fill(Tier.CPU, index.begin_fill(Tier.CPU, [c], [0], [p]))
    assert victims(index, Tier.SSD, 5) == [p]
    index.remove(Tier.SSD, index.find([p]))
    assert index.get(p) is None and index.lookup([p, c]).total == 0
    index.check()
    index.finish_fill(Tier.CPU, index.begin_fill(Tier.CPU, [p], [1], [None]))
    index.check()
    assert victims(index, Tier.CPU, 5) == [c]  # the parent is not a leaf of the CPU tier


def test_rows_and_memory_follow_the_blocks():
    """Freed rows are reused: storing and evicting many times never grows the rows in use."""
    index, _ = make_index(cpu=64, ssd=0)
    alloc = SlotAllocator(64)
    for rnd in range(50):
        hashes = chain_hashes(list(range(rnd * 1000, rnd * 1000 + 32 * BS)), BS)
        rows = index.begin_fill(Tier.CPU, hashes, alloc.alloc(len(hashes)), [None, *hashes[:-1]])
        index.finish_fill(Tier.CPU, rows)
        while len(index) > 32:
            alloc.free(index.remove(Tier.CPU, index.pop_victims(Tier.CPU, 7)))
    assert index.rows_in_use <= 64
    index.check()


class IndexMachine(RuleBasedStateMachine):
    """Random stores, loads (pins), evictions, write-backs and failures against a model of the tiers."""

    def __init__(self) -> None:
        super().__init__()
        self.index, self.rec = make_index(cpu=6, ssd=10)
        self.alloc = {Tier.CPU: SlotAllocator(6), Tier.SSD: SlotAllocator(10)}
        self.bytes = {Tier.CPU: {}, Tier.SSD: {}}  # slot -> hash whose bytes it holds
        self.filling: dict[Tier, list[int]] = {Tier.CPU: [], Tier.SSD: []}
        self.pins: Counter = Counter()  # (tier, hash) -> pins we hold

    def _evict(self, tier: Tier, n: int) -> None:
        rows = self.index.pop_victims(tier, n)
        for b in (self.index.get(h) for h in self.index.hashes(rows).tolist()):
            assert self.pins[(tier, b.hash)] == 0, "pinned block offered for eviction"
            assert b.ready(tier)
        slots = self.index.remove(tier, rows)
        for s in slots.tolist():
            del self.bytes[tier][s]
        self.alloc[tier].free(slots)

    @rule(prompt=st.integers(0, 5), length=st.integers(1, 4), ok=st.booleans(), one_call=st.booleans())
    def store(self, prompt: int, length: int, ok: bool, one_call: bool) -> None:
        tokens = [prompt * 1000 + (i if i < 2 * BS else prompt * 7 + i) for i in range(length * BS)]
        hashes = chain_hashes(tokens, BS)
        want, parents, slots = [], [], []
        parent = None
        for h in hashes:
            b = self.index.get(h)
            if not (b and b.held(Tier.CPU)):
                if self.alloc[Tier.CPU].num_free == 0:
                    self._evict(Tier.CPU, 1)
                got = self.alloc[Tier.CPU].alloc(1)
                if not got.size:
                    break
                want.append(h)
                parents.append(parent)
                slots.append(int(got[0]))
                if not one_call:
                    self.index.begin_fill(Tier.CPU, [h], got, [parent])
            parent = h
        if not want:
            return
        rows = self.index.begin_fill(Tier.CPU, want, slots, parents) if one_call else self.index.find(want)
        if ok:
            for h, s in zip(want, slots):
                self.bytes[Tier.CPU][s] = h
            self.index.finish_fill(Tier.CPU, rows)
        else:
            self.alloc[Tier.CPU].free(self.index.abort_fill(Tier.CPU, rows))

    @rule(data=st.data())
    def pin_ready(self, data) -> None:
        ready = [(t, b.hash) for b in self.index.blocks() for t in (Tier.CPU, Tier.SSD) if b.ready(t)]
        if ready:
            tier, h = data.draw(st.sampled_from(ready))
            self.index.pin(tier, self.index.find([h]))
            self.pins[(tier, h)] += 1

    @precondition(lambda self: +self.pins)
    @rule(data=st.data())
    def unpin(self, data) -> None:
        tier, h = data.draw(st.sampled_from(sorted((+self.pins).keys(), key=lambda k: (k[0].value, k[1]))))
        self.index.unpin(tier, self.index.find([h]))
        self.pins[(tier, h)] -= 1

    @rule(data=st.data(), hit=st.booleans())
    def touch(self, data, hit: bool) -> None:
        held = [b.hash for b in self.index.blocks()]
        if held:
            self.index.touch(self.index.find(data.draw(st.lists(st.sampled_from(held), unique=True, max_size=3))), hit)

    @rule(tier=st.sampled_from([Tier.CPU, Tier.SSD]), n=st.integers(1, 4))
    def evict(self, tier: Tier, n: int) -> None:
        self._evict(tier, n)

    @rule(tier=st.sampled_from([Tier.CPU, Tier.SSD]), n=st.integers(1, 4))
    def take_and_give_back(self, tier: Tier, n: int) -> None:
        self.index.give_back(tier, self.index.pop_victims(tier, n))

    @rule(n=st.integers(1, 4))
    def begin_write_back(self, n: int) -> None:
        todo = [b for b in self.index.blocks() if b.ready(Tier.CPU) and not b.held(Tier.SSD)][:n]
        for b in todo:
            if self.alloc[Tier.SSD].num_free == 0:
                self._evict(Tier.SSD, 1)
            slots = self.alloc[Tier.SSD].alloc(1)
            if not slots.size:
                return
            rows = self.index.find([b.hash])
            self.index.begin_fill_rows(Tier.SSD, rows, slots)
            self.index.pin(Tier.CPU, rows)
            self.filling[Tier.SSD].append(b.hash)

    @precondition(lambda self: self.filling[Tier.SSD])
    @rule(ok=st.booleans())
    def end_write_back(self, ok: bool) -> None:
        h = self.filling[Tier.SSD].pop(0)
        rows = self.index.find([h])
        if ok:
            self.bytes[Tier.SSD][self.index.get(h).slot_in(Tier.SSD)] = h
            self.index.finish_fill(Tier.SSD, rows)
        else:
            self.alloc[Tier.SSD].free(self.index.abort_fill(Tier.SSD, rows))
        self.index.unpin(Tier.CPU, rows)

    @invariant()
    def consistent(self) -> None:
        self.index.check()
        for tier in (Tier.CPU, Tier.SSD):
            assert self.index.used(tier) == self.alloc[tier].num_used
        ready = set()
        for b in self.index.blocks():
            for tier in (Tier.CPU, Tier.SSD):
                if b.ready(tier):
                    ready.add((tier, b.hash))
                    assert self.bytes[tier].get(b.slot_in(tier)) == b.hash, "ready block without its bytes"
                assert b.pins[0 if tier is Tier.CPU else 1] >= self.pins[(tier, b.hash)]
        # Stored minus Removed per tier is exactly what each tier holds READY.
        assert {k for k, n in self.rec.balance.items() if n} == ready


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_touching_a_batch_reorders_only_those_blocks():
    index, _ = make_index(cpu=8, ssd=0)
    alloc = SlotAllocator(8)
    leaves = [store_chain(index, alloc, list(range(b, b + BS)))[0] for b in (0, 100, 200, 300)]
    index.touch(index.find(leaves[:2]))
    assert victims(index, Tier.CPU, 4) == leaves[2:] + leaves[:2]


def test_pins_and_rows_reject_bad_input():
    index, _ = make_index()
    rows = index.begin_fill(Tier.CPU, [11], [0], [None])
    with pytest.raises(RuntimeError, match="not pinned"):
        index.unpin(Tier.CPU, rows)
    with pytest.raises(RuntimeError, match="not held in SSD"):
        index.pin(Tier.SSD, rows)
    with pytest.raises(IndexError):
        index.pin(Tier.CPU, np.array([12345], np.int32))
    with pytest.raises(ValueError, match="appears twice"):
        index.pin(Tier.CPU, np.array([rows[0], rows[0]], np.int32))
    index.check()


def test_a_missing_build_says_how_to_fix_it():
    import subprocess
    import sys

    code = ("import sys; sys.modules['flexkv_core.native._index'] = None\n"
            "try:\n    import flexkv_core.native\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "is not built" in out and "scripts/setup.sh" in out and "pip install -e ." in out
