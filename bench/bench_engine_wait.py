"""Benchmark: how to wait for Mooncake's transfer engine.

A peer process registers ``--mib`` MiB; this process reads half of it back as runs of ``--run-kib`` KiB
(every other run, so none coalesce), over TCP on loopback, two ways in turn:

* *sync*: the engine's own ``batch_transfer_sync_read``, one batch, waited for inside the engine (a loop
  that never sleeps);
* *polled*: `MooncakeTransport.read`, what our engine process does: one async batch per run, at most
  1,024 in flight, ``transfer_check_status`` polled with 0.1 ms sleeps.

It prints throughput and this process's CPU time per read (the reader's cost; the peer's is the same
either way). Batches of more than about 2,048 runs fail in the sync form (and break that engine), so
the sync column is left out there.

    .venv/bin/python bench/bench_engine_wait.py
    .venv/bin/python bench/bench_engine_wait.py --run-kib 64 256 2048 --mib 512 --reads 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexkv_core.distributed.transfer import EngineSettings, MooncakeTransport  # noqa: E402

PEER = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from flexkv_core.distributed.transfer import EngineSettings, MooncakeTransport
engine = MooncakeTransport(EngineSettings(host="127.0.0.1"))
buf = np.ones(int(sys.argv[2]), dtype=np.uint8)
engine.register(buf.ctypes.data, buf.nbytes)
print(engine.session, buf.ctypes.data, flush=True)
sys.stdin.read()
"""
SYNC_LIMIT = 2048  # runs per batch the engine's TCP lane queue takes


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-kib", type=int, nargs="+", default=[64, 256, 1024, 2048])
    ap.add_argument("--mib", type=int, default=512, help="peer memory; half of it is read per read")
    ap.add_argument("--reads", type=int, default=5, help="timed reads per way and run size")
    args = ap.parse_args()
    size = args.mib << 20
    peer = subprocess.Popen([sys.executable, "-c", PEER, str(ROOT), str(size)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    engine = MooncakeTransport(EngineSettings(host="127.0.0.1", timeout_s=10))
    try:
        session, base = peer.stdout.readline().split()
        dst = np.zeros(size, dtype=np.uint8)
        engine.register(dst.ctypes.data, dst.nbytes)
        print(f"{'run':>8} {'runs':>6} {'MiB':>5} | {'sync GiB/s':>10} {'cpu ms':>7} | {'polled GiB/s':>12} {'cpu ms':>7}")
        def sync(local, remote, lengths) -> bool:
            return engine._engine.batch_transfer_sync_read(session, local, remote, lengths) == 0

        def polled(local, remote, lengths) -> bool:
            return engine.read(session, local, remote, lengths)

        for kib in args.run_kib:
            run = kib << 10
            offsets = [2 * i * run for i in range(size // (2 * run))]
            batch = ([dst.ctypes.data + o for o in offsets], [int(base) + o for o in offsets], [run] * len(offsets))
            cells = {}
            for name, read in (("sync", sync), ("polled", polled)):
                if name == "sync" and len(offsets) > SYNC_LIMIT:
                    cells[name] = f"{'-':>10} {'-':>7}"
                    continue
                dst[:] = 0
                assert read(*batch), f"{name} read failed"  # warm-up, and the bytes must be there
                assert int(dst.sum()) == run * len(offsets), f"{name}: not every byte arrived"
                c0, t0 = cpu_s(), time.perf_counter()
                for _ in range(args.reads):
                    assert read(*batch), f"{name} read failed"
                wall, cpu = (time.perf_counter() - t0) / args.reads, (cpu_s() - c0) / args.reads
                cells[name] = f"{run * len(offsets) / wall / 2**30:10.2f} {cpu * 1000:7.0f}"
            print(f"{kib:>5} KiB {len(offsets):>6} {run * len(offsets) >> 20:>5} | {cells['sync']} | "
                  f"{cells['polled']:>20}")
    finally:
        engine.close()
        peer.stdin.close()
        peer.wait(timeout=30)


if __name__ == "__main__":
    main()
