"""SSD tier throughput against the raw speed of the same filesystem, measured in the same run.

Raw baselines: ``dd`` with O_DIRECT and 4 MiB blocks (sequential write, then read), and the same pattern
as a Python ``pwritev``/``preadv`` loop. Then ``SsdStore`` writes and reads scattered slots (random slot
numbers out of a store twice the data size) from a shared anonymous mmap, in batches, for each
``io_threads`` setting: a first write (into freshly preallocated, unwritten extents), an overwrite, and a
verified read. Ratios are SsdStore / dd. The disk of a VM drifts a lot from one second to the next, so
every measurement is repeated ``--repeat`` times, interleaved, and the table shows medians. Everything
it creates under ``--dir`` is deleted at the end.

    .venv/bin/python bench/bench_ssd_tier.py --dir /tmp --gib 1 --slot-mib 2 --threads 1,2,4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import Future

import numpy as np
import xxhash
from tqdm import tqdm

from flexkv_core.layout import CacheIdentity, KVLayout
from flexkv_core.tiers.ssd import SsdStore, WriteItem

GiB = 1 << 30
MiB = 1 << 20


def dd(args: list[str]) -> float:
    """Run dd, return GiB/s from its own byte count and elapsed time."""
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    m = re.search(r"(\d+) bytes .* copied, ([\d.e+-]+) s", out)
    if m is None:
        raise RuntimeError(f"cannot parse dd output: {out!r}")
    return int(m.group(1)) / float(m.group(2)) / GiB


def raw_dd(workdir: str, gib: int) -> dict[str, float]:
    path = os.path.join(workdir, "dd.bin")
    count = gib * 256
    write = dd(["if=/dev/zero", f"of={path}", "bs=4M", f"count={count}", "oflag=direct"])
    read = dd([f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct"])
    os.unlink(path)
    return {"write": write, "read": read}


def raw_python(workdir: str, gib: int, src: memoryview) -> dict[str, float]:
    """Sequential 4 MiB O_DIRECT pwritev/preadv from/to an aligned mmap, one thread."""
    path = os.path.join(workdir, "py.bin")
    block = 4 * MiB
    n = gib * GiB // block
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        t = time.perf_counter()
        for i in range(n):
            off = (i * block) % (len(src) - block + 1)
            os.pwritev(fd, [src[off : off + block]], i * block)
        write = n * block / (time.perf_counter() - t) / GiB
        t = time.perf_counter()
        for i in range(n):
            off = (i * block) % (len(src) - block + 1)
            os.preadv(fd, [src[off : off + block]], i * block)
        read = n * block / (time.perf_counter() - t) / GiB
    finally:
        os.close(fd)
        os.unlink(path)
    return {"write": write, "read": read}


def raw_scattered(workdir: str, threads: int, src: memoryview, dst: memoryview, slot_bytes: int,
                  n_slots: int) -> dict[str, float]:
    """The store's access pattern without the store: one O_DIRECT pwritev/preadv per scattered slot on a
    thread pool, no checksum, no manifest. SsdStore / this = the store's own overhead."""
    from concurrent.futures import ThreadPoolExecutor

    path = os.path.join(workdir, "scattered.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 2 * n_slots * slot_bytes)
        slots = random.Random(threads).sample(range(2 * n_slots), n_slots)
        out = {}
        with ThreadPoolExecutor(threads) as pool:
            for name, op, buf in (("write_fresh", os.pwritev, src), ("write", os.pwritev, src),
                                  ("read", os.preadv, dst)):
                t = time.perf_counter()
                list(pool.map(lambda i, op=op, buf=buf: op(fd, [buf[i * slot_bytes : (i + 1) * slot_bytes]],
                                                           slots[i] * slot_bytes), range(n_slots)))
                out[name] = n_slots * slot_bytes / (time.perf_counter() - t) / GiB
    finally:
        os.close(fd)
        os.unlink(path)
    return out


def run_batches(label: str, submit, batches: list[list[int]], inflight: int) -> tuple[float, list[bool]]:
    """Submit batches keeping at most ``inflight`` outstanding; return seconds and all per-item results."""
    results: list[bool] = []
    pending: list[Future] = []
    t = time.perf_counter()
    for batch in tqdm(batches, desc=label, leave=False, unit="batch"):
        pending.append(submit(batch))
        if len(pending) >= inflight:
            results += pending.pop(0).result()
    for f in pending:
        results += f.result()
    return time.perf_counter() - t, results


def bench_store(workdir: str, threads: int, src: memoryview, dst: memoryview, slot_bytes: int,
                n_slots: int, batch_slots: int, inflight: int, max_file_bytes: int, ndirs: int,
                identity: CacheIdentity) -> dict[str, float]:
    dirs = [os.path.join(workdir, f"store{threads}_{d}") for d in range(ndirs)]
    capacity = 2 * n_slots * slot_bytes  # scattered: half the slots, at random
    rng = random.Random(threads)
    tokens = bytes(identity.layout.block_size * 4)
    t_open = time.perf_counter()
    store = SsdStore(dirs, capacity, slot_bytes, identity, max_file_bytes, io_threads=threads)
    open_s = time.perf_counter() - t_open
    try:
        slots = rng.sample(range(store.num_slots), n_slots)
        idx = list(range(n_slots))
        batches = [idx[i : i + batch_slots] for i in range(0, n_slots, batch_slots)]

        def write(batch: list[int]) -> Future:
            return store.write([WriteItem(slots[i], slots[i], None, tokens,
                                          src[i * slot_bytes : (i + 1) * slot_bytes]) for i in batch])

        def read(batch: list[int]) -> Future:
            return store.read([(slots[i], dst[i * slot_bytes : (i + 1) * slot_bytes]) for i in batch])

        total = n_slots * slot_bytes
        fresh_s, ok1 = run_batches(f"write fresh t={threads}", write, batches, inflight)
        over_s, ok2 = run_batches(f"overwrite t={threads}", write, batches, inflight)
        np.frombuffer(dst, np.uint8)[:] = 0
        read_s, ok3 = run_batches(f"read t={threads}", read, batches, inflight)
        if not (all(ok1) and all(ok2) and all(ok3)):
            raise RuntimeError(f"io_threads={threads}: some items failed: {store.stats()}")
        if not np.array_equal(np.frombuffer(src, np.uint8), np.frombuffer(dst, np.uint8)):
            raise RuntimeError(f"io_threads={threads}: bytes read back differ from bytes written")
        stats = store.stats()
    finally:
        store.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    return {"threads": threads, "open_s": open_s, "write_fresh": total / fresh_s / GiB,
            "write": total / over_s / GiB, "read": total / read_s / GiB,
            "syscalls": stats.syscalls, "direct_io": store.direct_io}


def bench_nixl(workdir: str, src: memoryview, dst: memoryview, slot_bytes: int, n_slots: int,
               batch_slots: int, inflight: int) -> dict[str, float]:
    """NIXL's POSIX backend with io_uring, same scattered pattern, O_DIRECT file (for comparison only)."""
    from nixl._api import nixl_agent, nixl_agent_config  # optional: only with --nixl

    agent = nixl_agent(f"bench-ssd-{os.getpid()}", nixl_agent_config(backends=[]))
    agent.create_backend("POSIX", {"use_uring": "true"})
    path = os.path.join(workdir, "nixl.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 2 * n_slots * slot_bytes)
        addrs = {name: np.frombuffer(mv, np.uint8).ctypes.data for name, mv in (("src", src), ("dst", dst))}
        for name, addr in addrs.items():
            agent.register_memory([(addr, n_slots * slot_bytes, 0, name)], "DRAM")
        agent.register_memory([(0, 2 * n_slots * slot_bytes, fd, "file")], "FILE")
        slots = random.Random(0).sample(range(2 * n_slots), n_slots)

        def run(op: str, base: int) -> float:
            handles: list = []

            def finish(h) -> None:
                while (state := agent.check_xfer_state(h)) == "PROC":  # NIXL's API is polled
                    time.sleep(0)
                if state != "DONE":
                    raise RuntimeError(f"NIXL {op} failed: {state}")
                h.release()

            t = time.perf_counter()
            for b in tqdm(range(0, n_slots, batch_slots), desc=f"nixl {op.lower()}", leave=False):
                idx = range(b, min(n_slots, b + batch_slots))
                local = agent.get_xfer_descs([(base + i * slot_bytes, slot_bytes, 0) for i in idx], "DRAM")
                remote = agent.get_xfer_descs([(slots[i] * slot_bytes, slot_bytes, fd) for i in idx], "FILE")
                h = agent.initialize_xfer(op, local, remote, agent.name)
                if agent.transfer(h) == "ERR":
                    raise RuntimeError(f"NIXL {op} failed to post")
                handles.append(h)
                if len(handles) >= inflight:
                    finish(handles.pop(0))
            for h in handles:
                finish(h)
            return n_slots * slot_bytes / (time.perf_counter() - t) / GiB

        fresh = run("WRITE", addrs["src"])
        write = run("WRITE", addrs["src"])
        read = run("READ", addrs["dst"])
        if not np.array_equal(np.frombuffer(src, np.uint8), np.frombuffer(dst, np.uint8)):
            raise RuntimeError("NIXL read back different bytes")
    finally:
        os.close(fd)
        os.unlink(path)
    return {"write_fresh": fresh, "write": write, "read": read}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp", help="filesystem to measure (a temp dir is made and removed in it)")
    ap.add_argument("--gib", type=int, default=1, help="data per pass, GiB (>= 1 for meaningful numbers)")
    ap.add_argument("--slot-mib", type=float, default=2.0, help="slot size, MiB (rounded to 4 KiB)")
    ap.add_argument("--threads", default="1,2,4,8", help="io_threads settings to try, comma separated")
    ap.add_argument("--batch-slots", type=int, default=32, help="slots per write()/read() call")
    ap.add_argument("--inflight", type=int, default=4, help="calls outstanding at once")
    ap.add_argument("--ndirs", type=int, default=1, help="directories to stripe over (same filesystem here)")
    ap.add_argument("--max-file-gib", type=float, default=1.0, help="max_file_bytes of the store, GiB")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians")
    ap.add_argument("--no-dd", action="store_true", help="skip the dd baseline")
    ap.add_argument("--nixl", action="store_true", help="also measure NIXL's POSIX backend with io_uring")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    slot_bytes = max(4096, int(args.slot_mib * MiB) // 4096 * 4096)
    n_slots = max(1, args.gib * GiB // slot_bytes)
    total = n_slots * slot_bytes
    identity = CacheIdentity("bench", KVLayout(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128))
    workdir = tempfile.mkdtemp(prefix="flexkv_bench_ssd_", dir=args.dir)
    try:
        # Shared anonymous mappings: page aligned, like the CPU pool's shared memory.
        src_map = mmap.mmap(-1, total)
        dst_map = mmap.mmap(-1, total)
        src, dst = memoryview(src_map), memoryview(dst_map)
        # Distinct content per slot (a random pattern with the slot number stamped in), cheap to make.
        pattern = np.frombuffer(os.urandom(64 * MiB), dtype=np.uint8)
        src_np = np.frombuffer(src_map, dtype=np.uint8)
        for off in range(0, total, len(pattern)):
            src_np[off : off + len(pattern)] = pattern[: total - off]
        for i in range(n_slots):
            src_np[i * slot_bytes : i * slot_bytes + 8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)
        np.frombuffer(dst_map, dtype=np.uint8)[:] = 1  # fault the pages in before timing

        t = time.perf_counter()
        xxhash.xxh3_64_intdigest(src)
        xxh3 = total / (time.perf_counter() - t) / GiB

        rounds: list[dict] = []
        for _ in tqdm(range(args.repeat), desc="rounds", unit="round"):
            rounds.append({
                "dd": raw_dd(workdir, args.gib) if not args.no_dd else None,
                "python": raw_python(workdir, args.gib, src),
                "scattered": raw_scattered(workdir, max(int(t) for t in args.threads.split(",")), src, dst,
                                           slot_bytes, n_slots),
                "store": [bench_store(workdir, int(t), src, dst, slot_bytes, n_slots, args.batch_slots,
                                      args.inflight, int(args.max_file_gib * GiB), args.ndirs, identity)
                          for t in args.threads.split(",")],
                "nixl": bench_nixl(workdir, src, dst, slot_bytes, n_slots, args.batch_slots, args.inflight)
                if args.nixl else None,
            })
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    raw = {kind: None if rounds[0][kind] is None else
           {op: med([r[kind][op] for r in rounds]) for op in rounds[0][kind]} for kind in ("dd", "python", "scattered", "nixl")}
    store = [{k: (med([r["store"][j][k] for r in rounds]) if isinstance(v, float) else v)
              for k, v in rounds[0]["store"][j].items()} for j in range(len(rounds[0]["store"]))]
    base = raw["dd"] or raw["python"]
    best_w = max(store, key=lambda r: r["write"])
    best_r = max(store, key=lambda r: r["read"])
    print(f"\nSSD tier on {args.dir}: {total / GiB:.2f} GiB per pass, slot {slot_bytes / MiB:.2f} MiB, "
          f"{n_slots} scattered slots, batches of {args.batch_slots}, {args.inflight} in flight, "
          f"{args.ndirs} dir(s); medians of {args.repeat} rounds; xxh3_64 {xxh3:.1f} GiB/s")
    print(f"{'what':34s} {'write GiB/s':>12s} {'read GiB/s':>11s}")
    if raw["dd"]:
        print(f"{'raw dd O_DIRECT 4 MiB sequential':34s} {raw['dd']['write']:12.2f} {raw['dd']['read']:11.2f}")
    print(f"{'raw python pwritev/preadv 4 MiB':34s} {raw['python']['write']:12.2f} {raw['python']['read']:11.2f}")
    sc, top = raw["scattered"], max(int(t) for t in args.threads.split(","))
    label = f"raw scattered slots, {top} threads"
    print(f"{label:34s} {sc['write']:12.2f} {sc['read']:11.2f}   (first write into fresh "
          f"extents {sc['write_fresh']:.2f}; no checksum, no manifest)")
    for r in store:
        label = f"SsdStore io_threads={r['threads']}"
        print(f"{label:34s} {r['write']:12.2f} {r['read']:11.2f}   (first write into fresh "
              f"extents {r['write_fresh']:.2f}, open {r['open_s']:.2f} s)")
    if raw["nixl"]:
        nx = raw["nixl"]
        print(f"{'NIXL POSIX io_uring (same slots)':34s} {nx['write']:12.2f} {nx['read']:11.2f}   (first write into fresh "
              f"extents {nx['write_fresh']:.2f})")
    ratio_w, ratio_r = best_w["write"] / base["write"], best_r["read"] / base["read"]
    print(f"best: write io_threads={best_w['threads']} -> {ratio_w:.2f} x raw, "
          f"read io_threads={best_r['threads']} -> {ratio_r:.2f} x raw (target >= 0.8 each)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "slot_bytes": slot_bytes, "n_slots": n_slots, "xxh3_gib_s": xxh3,
                       "raw": raw, "store": store, "rounds": rounds, "ratio_write": ratio_w, "ratio_read": ratio_r,
                       "best_write_threads": best_w["threads"], "best_read_threads": best_r["threads"]},
                      f, indent=2)


if __name__ == "__main__":
    main()
