"""SsdStore: bytes round-trip exactly, survive restarts, and never come back wrong."""

from __future__ import annotations

import json
import logging
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flexkv_core.layout import CacheIdentity, KVLayout
from flexkv_core.tiers.manifest import SlotRecord
from flexkv_core.tiers.ssd import (
    LOCK_NAME,
    MANIFEST_NAME,
    ReadStatus,
    SsdDirInUse,
    SsdDirUnusable,
    SsdNoSpace,
    SsdStore,
    WriteItem,
)

LAYOUT = KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64)
IDENTITY = CacheIdentity("test-model", LAYOUT)
PAGE = 4096
REPO = Path(__file__).resolve().parents[1]


def slot_data(slot: int, slot_bytes: int, seed: int = 0) -> bytes:
    return np.random.default_rng([seed, slot]).bytes(slot_bytes)


def tokens(slot: int) -> bytes:
    return np.arange(slot * 16, slot * 16 + 16, dtype="<u4").tobytes()


def aligned(nbytes: int) -> memoryview:
    """Page-aligned memory, like a CPU pool slot (anonymous shared mmap)."""
    return memoryview(mmap.mmap(-1, nbytes))


def unaligned(nbytes: int, shift: int = 512) -> memoryview:
    return memoryview(mmap.mmap(-1, nbytes + PAGE))[shift : shift + nbytes]


def write_slots(store: SsdStore, slots: list[int], seed: int = 0, buffers=None) -> list[bool]:
    sb = store.slot_bytes
    if buffers is None:
        buffers = [aligned(sb) for _ in slots]
    for buf, slot in zip(buffers, slots, strict=True):
        buf[:] = slot_data(slot, sb, seed)
    items = [WriteItem(s, block_hash=1000 + s, parent_hash=(999 + s) if s else None, token_ids=tokens(s), buffer=b)
             for s, b in zip(slots, buffers, strict=True)]
    return store.write(items).result(timeout=30)


def read_slots(store: SsdStore, slots: list[int], buffers=None) -> tuple[list[bool], list[bytes]]:
    """Each slot's success (its ReadStatus is OK) and the bytes read."""
    ok, data = read_statuses(store, slots, buffers)
    return [bool(s) for s in ok], data


def read_statuses(store: SsdStore, slots: list[int], buffers=None) -> tuple[list[ReadStatus], list[bytes]]:
    if buffers is None:
        buffers = [aligned(store.slot_bytes) for _ in slots]
    statuses = store.read(list(zip(slots, buffers, strict=True))).result(timeout=30)
    return statuses, [bytes(b) for b in buffers]


def expected_record(slot: int) -> tuple:
    """(slot, block_hash, parent_hash, token_ids) as write_slots() writes them."""
    return (slot, 1000 + slot, (999 + slot) if slot else None, tokens(slot))


def record_key(r: SlotRecord) -> tuple:
    return (r.slot, r.block_hash, r.parent_hash, r.token_ids)


def open_store(dirs, slot_bytes=4 * PAGE, num_slots=16, max_file_slots=None, identity=IDENTITY, **kw) -> SsdStore:
    max_file_bytes = (max_file_slots or num_slots) * slot_bytes
    return SsdStore([str(d) for d in dirs], num_slots * slot_bytes, slot_bytes, identity, max_file_bytes, **kw)


# A child process that opens a store on the given dirs, runs steps, then either exits without closing
# (a crash, for the manifest) or holds the store until its stdin closes (a live owner, for the lock).
CHILD = r"""
import json, os, sys
import numpy as np
from flexkv_core.layout import CacheIdentity, KVLayout
from flexkv_core.tiers.ssd import SsdStore, WriteItem
a = json.loads(sys.argv[1])
ident = CacheIdentity(a["model"], KVLayout(**a["layout"]))
store = SsdStore(a["dirs"], a["num_slots"] * a["slot_bytes"], a["slot_bytes"], ident, a["max_file_bytes"])
for op, slots in a["steps"]:
    if op == "write":
        items = [WriteItem(s, 1000 + s, (999 + s) if s else None,
                           np.arange(s * 16, s * 16 + 16, dtype="<u4").tobytes(),
                           np.random.default_rng([0, s]).bytes(a["slot_bytes"])) for s in slots]
        assert all(store.write(items).result())
    else:
        store.forget(slots)
print("ready", flush=True)
if a["then"] == "crash":
    os._exit(0)
sys.stdin.read()
store.close()
"""


def start_child(dirs, steps, then, slot_bytes=4 * PAGE, num_slots=16, max_file_slots=None) -> subprocess.Popen:
    args = {"dirs": [str(d) for d in dirs], "steps": steps, "then": then, "slot_bytes": slot_bytes,
            "num_slots": num_slots, "max_file_bytes": (max_file_slots or num_slots) * slot_bytes,
            "model": IDENTITY.model, "layout": vars(LAYOUT)}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    line = child.stdout.readline()
    assert line.strip() == "ready", f"child failed to start (rc={child.poll()})"
    return child


# ------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("seed", range(6))
def test_random_round_trips_are_byte_exact(tmp_path, seed):
    rng = random.Random(seed)
    ndirs = rng.randint(1, 3)
    slot_bytes = PAGE * rng.choice([1, 2, 3, 8])
    num_slots = rng.randint(5, 40)
    max_file_slots = rng.randint(1, 4)  # several files per directory
    dirs = [tmp_path / f"d{i}" for i in range(ndirs)]
    with open_store(dirs, slot_bytes, num_slots, max_file_slots, io_threads=rng.randint(1, 4)) as store:
        slots = rng.sample(range(num_slots), rng.randint(1, num_slots))
        cut = rng.randint(0, len(slots))
        assert write_slots(store, slots[:cut]) == [True] * cut
        assert write_slots(store, slots[cut:]) == [True] * (len(slots) - cut)
        order = rng.sample(slots, len(slots))
        ok, data = read_slots(store, order)
        assert ok == [True] * len(order)
        assert data == [slot_data(s, slot_bytes) for s in order]
        assert record_key(store.record(slots[0])) == expected_record(slots[0])
    files = sorted(p.name for d in dirs for p in d.glob("flexkv_ssd_*.bin"))
    per_dir = [-(-len(range(i, num_slots, ndirs)) // max_file_slots) for i in range(ndirs)]
    assert len(files) == sum(per_dir)
    assert sum(p.stat().st_size for d in dirs for p in d.glob("*.bin")) == num_slots * slot_bytes


def test_adjacent_slots_of_a_file_take_one_syscall(tmp_path):
    with open_store([tmp_path / "a"], num_slots=32) as store:
        assert write_slots(store, list(range(8))) == [True] * 8
        assert store.stats().syscalls == 1
        ok, data = read_slots(store, [7, 3, 5, 4, 6, 0, 1, 2])
        assert ok == [True] * 8 and data[0] == slot_data(7, store.slot_bytes)
        assert store.stats().syscalls == 2
    with open_store([tmp_path / "b", tmp_path / "c"], num_slots=32) as store:
        # Slots alternate directories: 0,2,4,6 are adjacent in b's file, 1,3,5,7 in c's.
        assert write_slots(store, list(range(8))) == [True] * 8
        assert store.stats().syscalls == 2


def test_unaligned_buffers_go_through_a_bounce_buffer(tmp_path):
    with open_store([tmp_path / "a"], num_slots=8) as store:
        assert store.direct_io
        sb = store.slot_bytes
        src = [unaligned(sb), aligned(sb), unaligned(sb, shift=1), bytearray(sb)]
        assert write_slots(store, [0, 1, 2, 3], buffers=src) == [True] * 4
        dst = [aligned(sb), unaligned(sb, shift=3), unaligned(sb), bytearray(sb)]
        ok, data = read_slots(store, [0, 1, 2, 3], buffers=dst)
        assert ok == [True] * 4
        assert data == [slot_data(s, sb) for s in range(4)]
        assert store.stats().bounced >= 4


def test_buffered_io_round_trips_and_restarts(tmp_path):
    with open_store([tmp_path], num_slots=8, direct_io=False) as store:
        assert not store.direct_io
        assert write_slots(store, [0, 5], buffers=[unaligned(store.slot_bytes), aligned(store.slot_bytes)]) == [True] * 2
        ok, data = read_slots(store, [5, 0])
        assert ok == [True, True] and data == [slot_data(5, store.slot_bytes), slot_data(0, store.slot_bytes)]
        assert store.stats().bounced == 0  # buffered I/O needs no alignment
    with open_store([tmp_path], num_slots=8) as store:  # the files do not remember the I/O mode
        assert store.direct_io
        ok, data = read_slots(store, [0])
        assert ok == [True] and data == [slot_data(0, store.slot_bytes)]


def test_tmpfs_works_with_or_without_o_direct(caplog):
    """tmpfs refuses O_DIRECT before Linux 6.6: the store must then fall back (and say so)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize < 64 << 20:
        pytest.skip("no usable tmpfs at /dev/shm")
    d = shm / f"flexkv_test_ssd_{os.getpid()}"
    try:
        with caplog.at_level(logging.WARNING), open_store([d], num_slots=8) as store:
            assert write_slots(store, [0, 5]) == [True, True]
            ok, data = read_slots(store, [5, 0])
            assert ok == [True, True] and data == [slot_data(5, store.slot_bytes), slot_data(0, store.slot_bytes)]
            assert store.direct_io == ("does not support O_DIRECT" not in caplog.text)
    finally:
        for p in d.glob("*") if d.exists() else []:
            p.unlink()
        if d.exists():
            d.rmdir()


def test_signed_and_unsigned_64bit_hashes_are_stored_exactly(tmp_path):
    hashes = [-(2**63), 2**64 - 1, -1]
    with open_store([tmp_path]) as store:
        buf = aligned(store.slot_bytes)
        items = [WriteItem(i, h, h, tokens(i), buf) for i, h in enumerate(hashes)]
        assert store.write(items).result() == [True] * 3
    with open_store([tmp_path]) as store:
        assert [(r.block_hash, r.parent_hash) for r in store.recovered()] == [(h, h) for h in hashes]


def test_bad_arguments_are_rejected_naming_the_value(tmp_path):
    with pytest.raises(ValueError, match="5000"):
        SsdStore([str(tmp_path)], 1 << 20, 5000, IDENTITY, 1 << 20)
    with open_store([tmp_path / "a"], num_slots=4) as store:
        sb = store.slot_bytes
        with pytest.raises(ValueError, match="slot 4 is outside 0..3"):
            store.write([WriteItem(4, 1, None, tokens(4), aligned(sb))])
        with pytest.raises(ValueError, match="appears twice"):
            store.write([WriteItem(1, 1, None, tokens(1), aligned(sb))] * 2)
        with pytest.raises(ValueError, match=f"{sb - 1} bytes"):
            store.write([WriteItem(1, 1, None, tokens(1), aligned(sb)[1:])])
        with pytest.raises(ValueError, match="token_ids must be 64 bytes"):
            store.write([WriteItem(1, 1, None, b"\0" * 60, aligned(sb))])
        with pytest.raises(ValueError, match=str(2**64)):
            store.write([WriteItem(1, 2**64, None, tokens(1), aligned(sb))])
        with pytest.raises(ValueError, match="read-only"):
            store.read([(1, bytes(sb))])
    with pytest.raises(RuntimeError, match="closed"):
        store.write([WriteItem(1, 1, None, tokens(1), aligned(sb))])


# --------------------------------------------------------------------------- what reads may return


def test_unwritten_and_forgotten_slots_read_false(tmp_path):
    with open_store([tmp_path], num_slots=8) as store:
        assert write_slots(store, [1, 2]) == [True, True]
        store.forget([2])
        assert store.record(2) is None
        ok, _ = read_statuses(store, [0, 1, 2])
        assert ok == [ReadStatus.MISSING, ReadStatus.OK, ReadStatus.MISSING]


def test_corrupted_slot_fails_exactly_that_item(tmp_path):
    with open_store([tmp_path], num_slots=8) as store:
        assert write_slots(store, [0, 1, 2, 3]) == [True] * 4
        path, offset = store.location(2)
        fd = os.open(path, os.O_RDWR)
        os.pwrite(fd, b"\xff\x00\xff", offset + 100)
        os.fsync(fd)
        os.close(fd)
        ok, data = read_statuses(store, [0, 1, 2, 3])  # one coalesced read
        assert ok == [ReadStatus.OK, ReadStatus.OK, ReadStatus.CHECKSUM, ReadStatus.OK]
        assert [data[i] for i in (0, 1, 3)] == [slot_data(s, store.slot_bytes) for s in (0, 1, 3)]
        assert store.stats().checksum_mismatches == 1


def test_rewriting_a_slot_replaces_its_record_and_bytes(tmp_path):
    with open_store([tmp_path], num_slots=4) as store:
        assert write_slots(store, [1]) == [True]
        assert write_slots(store, [1], seed=7) == [True]
        ok, data = read_slots(store, [1])
        assert ok == [True] and data == [slot_data(1, store.slot_bytes, seed=7)]
    with open_store([tmp_path], num_slots=4) as store:
        ok, data = read_slots(store, [1])
        assert ok == [True] and data == [slot_data(1, store.slot_bytes, seed=7)]


# ---------------------------------------------------------------------------------------- restarts


def test_warm_restart_recovers_records_and_bytes(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    with open_store(dirs, num_slots=20, max_file_slots=3) as store:
        assert write_slots(store, [0, 3, 4, 7, 11, 19]) == [True] * 6
        store.forget([4, 11])
    with open_store(dirs, num_slots=20, max_file_slots=3) as store:
        kept = [0, 3, 7, 19]
        assert [record_key(r) for r in store.recovered()] == [expected_record(s) for s in kept]
        ok, data = read_slots(store, kept + [4])
        assert ok == [True] * 4 + [False]
        assert data[:4] == [slot_data(s, store.slot_bytes) for s in kept]


def test_other_identity_recovers_nothing_and_never_reads_old_bytes(tmp_path, caplog):
    with open_store([tmp_path], num_slots=8) as store:
        assert write_slots(store, [0, 1, 2]) == [True] * 3
    other = CacheIdentity("test-model", LAYOUT, extra="lora=a")
    with caplog.at_level(logging.WARNING), open_store([tmp_path], num_slots=8, identity=other) as store:
        assert store.recovered() == []
        ok, _ = read_slots(store, [0, 1, 2])
        assert ok == [False] * 3
    assert IDENTITY.describe() in caplog.text and other.describe() in caplog.text
    with open_store([tmp_path], num_slots=8) as store:  # the original identity's records are gone for good
        assert store.recovered() == []


def test_geometry_change_starts_empty_but_smaller_capacity_keeps_lower_slots(tmp_path, caplog):
    with open_store([tmp_path], num_slots=16) as store:
        assert write_slots(store, [1, 9, 15]) == [True] * 3
    with open_store([tmp_path], num_slots=10, max_file_slots=16) as store:
        assert [r.slot for r in store.recovered()] == [1, 9]
        ok, data = read_slots(store, [9])
        assert ok == [True] and data == [slot_data(9, store.slot_bytes)]
    with caplog.at_level(logging.WARNING), open_store([tmp_path], slot_bytes=8 * PAGE, num_slots=8) as store:
        assert store.recovered() == []
    assert "different geometry" in caplog.text


def test_crash_without_close_keeps_completed_records(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    child = start_child(dirs, [["write", [0, 1, 2, 3, 4, 5]], ["forget", [1]], ["write", [6, 7]]], "crash")
    assert child.wait(timeout=30) == 0
    with open_store(dirs) as store:
        kept = [0, 2, 3, 4, 5, 6, 7]
        assert [record_key(r) for r in store.recovered()] == [expected_record(s) for s in kept]
        ok, data = read_slots(store, kept)
        assert ok == [True] * len(kept)
        assert data == [slot_data(s, store.slot_bytes) for s in kept]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_manifest_tail_loses_only_the_last_append(tmp_path, caplog, damage):
    child = start_child([tmp_path], [["write", [0, 1, 2]], ["forget", [1]], ["write", [5, 6]]], "crash")
    assert child.wait(timeout=30) == 0
    manifest = tmp_path / MANIFEST_NAME
    size = manifest.stat().st_size
    if damage == "truncate":
        os.truncate(manifest, size - 3)
        expect = [0, 2]
    elif damage == "flip":
        with open(manifest, "r+b") as f:
            f.seek(size - 2)
            f.write(b"\x00\xff")
        expect = [0, 2]
    else:
        with open(manifest, "ab") as f:
            f.write(os.urandom(40))
        expect = [0, 2, 5, 6]
    with caplog.at_level(logging.WARNING), open_store([tmp_path]) as store:
        assert [r.slot for r in store.recovered()] == expect
        ok, _ = read_slots(store, expect)
        assert all(ok)
        assert write_slots(store, [9]) == [True]
    assert "torn or corrupt tail" in caplog.text
    with open_store([tmp_path]) as store:  # the damage was cut off: appends after it survive
        assert [r.slot for r in store.recovered()] == sorted(expect + [9])


def test_close_waits_for_queued_io(tmp_path):
    store = open_store([tmp_path], num_slots=64, io_threads=2)
    buffers = [aligned(store.slot_bytes) for _ in range(64)]
    for s, b in enumerate(buffers):
        b[:] = slot_data(s, store.slot_bytes)
    futures = [store.write([WriteItem(s, 1000 + s, None, tokens(s), buffers[s])]) for s in range(64)]
    store.close()
    assert all(f.done() and f.result() == [True] for f in futures)
    with open_store([tmp_path], num_slots=64) as store:
        assert len(store.recovered()) == 64


def test_manifest_log_is_compacted_while_running(tmp_path):
    stale = tmp_path / f"{MANIFEST_NAME}.tmp.12345"  # left by a crash during a rewrite
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"partial")
    with open_store([tmp_path], num_slots=8, compact_after_bytes=4096) as store:
        assert not stale.exists()
        for r in range(300):  # the same 4 slots over and over (~60 KB of log): the live set stays small
            assert write_slots(store, [r % 4, (r + 1) % 4], seed=r) == [True, True]
            if r % 3 == 0:
                store.forget([r % 4])
        deadline = time.monotonic() + 5  # compaction runs in the background
        while (tmp_path / MANIFEST_NAME).stat().st_size >= 3 * 4096 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (tmp_path / MANIFEST_NAME).stat().st_size < 3 * 4096
        held = {s: store.record(s) for s in range(8) if store.record(s) is not None}
    with open_store([tmp_path], num_slots=8) as store:
        assert {r.slot: r for r in store.recovered()} == held
        ok, _ = read_slots(store, sorted(held))
        assert all(ok)


# ---------------------------------------------------------------------------- errors at open


def test_not_enough_space_is_a_clear_error(tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    slot_bytes = 1 << 20
    capacity = free + (1 << 40)
    t = time.monotonic()
    with pytest.raises(SsdNoSpace) as err:
        SsdStore([str(tmp_path)], capacity, slot_bytes, IDENTITY, 1 << 30)
    assert time.monotonic() - t < 5
    msg = str(err.value)
    assert str(tmp_path) in msg and "free" in msg and "needs" in msg
    assert sum(p.stat().st_blocks for p in tmp_path.glob("*.bin")) * 512 < 1 << 30  # nothing big allocated
    with open_store([tmp_path]) as store:  # the failed open released the directory
        assert store.num_slots == 16


def test_unusable_directory_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    bad = tmp_path / "file" / "ssd"
    with pytest.raises(SsdDirUnusable, match=str(bad)):
        open_store([tmp_path / "ok", bad])
    with open_store([tmp_path / "ok"]):  # and the good one was released
        pass


def test_directory_held_by_a_live_process_fails_fast_with_its_pid(tmp_path):
    child = start_child([tmp_path], [], "hold")
    try:
        t = time.monotonic()
        with pytest.raises(SsdDirInUse) as err:
            open_store([tmp_path / "other", tmp_path])
        assert time.monotonic() - t < 1.0
        assert err.value.pid == child.pid
        assert str(tmp_path) in str(err.value) and str(child.pid) in str(err.value)
    finally:
        child.stdin.close()
        assert child.wait(timeout=30) == 0
    with open_store([tmp_path / "other", tmp_path]):  # free again once the owner closed
        pass


def test_second_store_in_the_same_process_is_refused(tmp_path):
    with open_store([tmp_path]):
        with pytest.raises(SsdDirInUse, match=str(os.getpid())):
            open_store([tmp_path])


def test_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    child = start_child([tmp_path], [["write", [3]]], "hold")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    child.stdin.close()
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(child.pid)
    with caplog.at_level(logging.WARNING), open_store([tmp_path]) as store:
        assert [r.slot for r in store.recovered()] == [3]
    assert f"process {child.pid}" in caplog.text
    assert (tmp_path / LOCK_NAME).read_text() == ""  # clean close: no stale owner left behind


# ------------------------------------------------------------------------------------ concurrency


def test_concurrent_writers_and_readers_lose_nothing(tmp_path):
    threads, rounds, per_thread = 4, 12, 16
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    store = open_store(dirs, slot_bytes=8 * PAGE, num_slots=threads * per_thread, max_file_slots=5, io_threads=3)
    errors: list[str] = []

    def worker(t: int) -> None:
        rng = random.Random(t)
        mine = list(range(t, threads * per_thread, threads))
        for r in range(rounds):
            batch = rng.sample(mine, rng.randint(1, len(mine)))
            if write_slots(store, batch, seed=r) != [True] * len(batch):
                errors.append(f"thread {t} round {r}: write failed")
            ok, data = read_slots(store, batch)
            if ok != [True] * len(batch) or data != [slot_data(s, store.slot_bytes, seed=r) for s in batch]:
                errors.append(f"thread {t} round {r}: read back wrong")
            store.forget(rng.sample(batch, len(batch) // 2))

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    held = {s: store.record(s) for s in range(store.num_slots) if store.record(s) is not None}
    store.close()
    assert errors == []
    with open_store(dirs, slot_bytes=8 * PAGE, num_slots=threads * per_thread, max_file_slots=5) as store:
        assert {r.slot: r for r in store.recovered()} == held
        ok, _ = read_slots(store, sorted(held))
        assert all(ok)


@pytest.mark.slow
def test_large_scattered_round_trip_over_three_dirs(tmp_path):
    """256 MiB of 1 MiB slots, scattered over 3 dirs x several files, in concurrent batches."""
    slot_bytes, n = 1 << 20, 256
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    src, dst = aligned(n * slot_bytes), aligned(n * slot_bytes)
    np.frombuffer(src, np.uint8)[:] = np.random.default_rng(1).integers(0, 256, n * slot_bytes, np.uint8)
    with SsdStore([str(d) for d in dirs], 2 * n * slot_bytes, slot_bytes, IDENTITY, 40 * slot_bytes) as store:
        slots = random.Random(2).sample(range(store.num_slots), n)
        writes = [store.write([WriteItem(slots[i], i, None, tokens(i), src[i * slot_bytes : (i + 1) * slot_bytes])
                               for i in range(b, b + 16)]) for b in range(0, n, 16)]
        assert all(all(f.result(timeout=120)) for f in writes)
        reads = [store.read([(slots[i], dst[i * slot_bytes : (i + 1) * slot_bytes]) for i in range(b, b + 32)])
                 for b in range(0, n, 32)]
        assert all(all(f.result(timeout=120)) for f in reads)
        assert np.array_equal(np.frombuffer(src, np.uint8), np.frombuffer(dst, np.uint8))
