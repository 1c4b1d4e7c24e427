"""The CUDA data path of flexkv_core, checked on one NVIDIA GPU in a few minutes (run by scripts/gpu_check.sh).

Needs only Python, a CUDA PyTorch, numpy and xxhash: no vLLM, no network, no compiler (the CPU copy
extension is never imported on this path). On KV caches shaped as vLLM's CUDA attention backends
allocate them, it checks and prints in one table:

* byte-exact round trips GPU -> pool -> GPU (scattered blocks and slots, other blocks untouched) for
  several layouts, bf16 and fp8, both ranks of a TP=2 slot, through CUDA's batched memcpy and through the
  per-piece fallback;
* that a store does not block the host: a step (compute kernels, then waiting for them as sampling does)
  with a large store in flight takes at most 1.05x the host time of the same step without one;
* the pool's pinning time per GiB and when its first chunk is usable;
* batched D2H and H2D bandwidth of scattered blocks against one pinned ``cudaMemcpy`` of the same bytes
  (target >= 0.8).

``--dry-run`` runs the same cases on CPU tensors through the CPU path (no CUDA needed: the development
machine's check of this script); ``--quick`` makes everything smaller.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from flexkv_core.layout import KVLayout  # noqa: E402
from flexkv_core.tiers import cpu as cpu_tier  # noqa: E402
from flexkv_core.tiers.cpu import CpuPool  # noqa: E402
from flexkv_core.transfer import BlockCopier  # noqa: E402

GiB = 2**30


@dataclass(frozen=True)
class Case:
    """A KV cache layout as a vLLM CUDA backend allocates it, per layer."""

    name: str
    shape: str  # "kv_major" [2, B, N, H, D] (FlashAttention), "block_major" [B, 2, N, H, D] (FlashInfer),
    #             "mla" [B, N, D] (one latent plane)
    dtype: str
    layers: int
    block_size: int
    heads: int  # KV heads of this rank
    head_dim: int
    tp_size: int = 1

    def layout(self) -> KVLayout:
        return KVLayout(num_layers=self.layers, block_size=self.block_size, num_kv_heads=self.heads,
                        head_dim=self.head_dim, dtype=self.dtype, kv_planes=1 if self.shape == "mla" else 2,
                        tp_size=self.tp_size)


CASES = [
    Case("llama-8b flash bf16", "kv_major", "bfloat16", 32, 16, 8, 128),
    Case("llama-8b flashinfer bf16", "block_major", "bfloat16", 32, 16, 8, 128),
    Case("llama-8b flash fp8", "kv_major", "float8_e4m3fn", 32, 16, 8, 128),
    Case("tp2 slice flash bf16", "kv_major", "bfloat16", 32, 16, 4, 128, tp_size=2),
    Case("1 kv head flash bf16", "kv_major", "bfloat16", 32, 16, 1, 128),
    Case("mla bf16", "mla", "bfloat16", 16, 64, 1, 576),
]


def make_cache(case: Case, num_blocks: int, device: str, fill: bool, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per-layer tensors, planes) as flexkv_dynamo.worker.plane_views cuts vLLM's tensors."""
    dtype = getattr(torch, case.dtype)
    n, h, d = case.block_size, case.heads, case.head_dim
    shape = {"kv_major": (2, num_blocks, n, h, d), "block_major": (num_blocks, 2, n, h, d),
             "mla": (num_blocks, n, d)}[case.shape]
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = []
    for _ in range(case.layers):
        t = torch.empty(shape, dtype=dtype, device=device)
        raw = t.view(torch.uint8)
        if fill:
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, device=device, generator=gen))
        else:
            raw.zero_()
        tensors.append(t)
    planes = []
    for t in tensors:
        if case.shape == "kv_major":
            planes += [t[0], t[1]]
        elif case.shape == "block_major":
            planes += [t[:, 0], t[:, 1]]
        else:
            planes.append(t)
    return tensors, planes


def block_bytes(planes: list[torch.Tensor], ids: np.ndarray) -> torch.Tensor:
    """The bytes of blocks ``ids``, plane after plane, as a (len(ids), bytes) uint8 tensor."""
    idx = torch.as_tensor(ids, device=planes[0].device)
    # fp8 has few kernels (indexing among the missing): take one-byte types as bytes first.
    return torch.cat([(p.view(torch.uint8) if p.element_size() == 1 else p)[idx].reshape(len(ids), -1)
                      .view(torch.uint8) for p in planes], dim=1)


def pool_dir(nbytes: int) -> str:
    """Where pools live: /dev/shm unless it is too small (containers often give it 64 MiB)."""
    st = os.statvfs(cpu_tier.SHM_DIR)
    if st.f_bavail * st.f_frsize >= nbytes * 1.2:
        return cpu_tier.SHM_DIR
    path = tempfile.mkdtemp(prefix="flexkv-gpu-check-")
    cpu_tier.SHM_DIR = path  # a file-backed shared mapping pins and copies the same way
    return path


def round_trip(case: Case, device: str, batched: bool | None, num_blocks: int, n: int, rng) -> tuple[bool, str]:
    lay = case.layout()
    blocks = rng.choice(num_blocks, n, replace=False)
    back_ids = rng.choice(num_blocks, n, replace=False)
    slots = rng.choice(n * 2, n, replace=False)
    with CpuPool.create(n * 2, lay.slot_bytes) as pool:
        pool.array()[:] = 0xA5
        expected = {}
        for rank in range(lay.tp_size):
            _, src = make_cache(case, num_blocks, device, fill=True, seed=rank + 1)
            copier = BlockCopier(pool, lay, rank, src, batched=batched)
            copier.to_pool(blocks, slots).wait()
            expected[rank] = block_bytes(src, blocks).cpu()
            off = lay.rank_offset(rank)
            got = torch.from_numpy(pool.array()[slots, off:off + lay.rank_bytes].copy())
            if not torch.equal(got, expected[rank]):
                return False, f"rank {rank}: pool bytes differ after the store"
            copier.close()
        for rank in range(lay.tp_size):
            tensors, dst = make_cache(case, num_blocks, device, fill=False, seed=0)
            copier = BlockCopier(pool, lay, rank, dst, batched=batched)
            job = copier.from_pool(slots, back_ids)
            job.wait()
            if not torch.equal(block_bytes(dst, back_ids).cpu(), expected[rank]):
                return False, f"rank {rank}: engine bytes differ after the load"
            others = np.setdiff1d(np.arange(num_blocks), back_ids)
            if block_bytes(dst, others).any():
                return False, f"rank {rank}: the load wrote outside its blocks"
            copier.close()
        written = pool.array()[slots]
        for r in range(lay.tp_size):
            if not (written[:, r * lay.rank_stride + lay.rank_bytes:(r + 1) * lay.rank_stride] == 0xA5).all():
                return False, f"the padding after rank {r}'s part was written"
    return True, f"{n} blocks x {lay.rank_bytes // 1024} KiB x {lay.tp_size} rank(s)"


def cuda_time(fn: Callable[[], None], stream: torch.cuda.Stream) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def bandwidth(case: Case, num_blocks: int, n: int, rng, reps: int) -> dict[str, float]:
    """Batched scattered D2H/H2D GiB/s vs one pinned copy of the same bytes (median of reps)."""
    lay = case.layout()
    _, planes = make_cache(case, num_blocks, "cuda", fill=True, seed=3)
    blocks = rng.choice(num_blocks, n, replace=False)
    slots = rng.permutation(n)
    nbytes = n * lay.rank_bytes
    out: dict[str, list[float]] = {"d2h": [], "h2d": [], "ref_d2h": [], "ref_h2d": []}
    with CpuPool.create(n, lay.slot_bytes) as pool:
        copier = BlockCopier(pool, lay, 0, planes)
        pool.wait_pinned()
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        host = torch.from_numpy(pool.array().reshape(-1)[:nbytes])  # pinned: part of the registered pool
        s = torch.cuda.Stream()
        for _ in range(reps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            copier.to_pool(blocks, slots).wait()
            out["d2h"].append(nbytes / (time.perf_counter() - t0) / GiB)
            t0 = time.perf_counter()
            copier.from_pool(slots, blocks).wait()
            out["h2d"].append(nbytes / (time.perf_counter() - t0) / GiB)
            with torch.cuda.stream(s):
                out["ref_d2h"].append(nbytes / cuda_time(lambda: host.copy_(dev, non_blocking=True), s) / GiB)
                out["ref_h2d"].append(nbytes / cuda_time(lambda: dev.copy_(host, non_blocking=True), s) / GiB)
        copier.close()
    return {k: float(np.median(v[1:])) for k, v in out.items()}  # the first round warms up


def step_blocking(case: Case, num_blocks: int, n: int, rng, reps: int) -> dict[str, float]:
    """Host time of a step (forward-like kernels, then waiting for them as sampling does) with and without
    a store of ``n`` blocks issued at its start (as handle_preemptions does)."""
    lay = case.layout()
    _, planes = make_cache(case, num_blocks, "cuda", fill=True, seed=4)
    blocks = rng.choice(num_blocks, n, replace=False)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    compute = torch.cuda.current_stream()
    host_with, host_without, gpu_with, gpu_without = [], [], [], []
    with CpuPool.create(n, lay.slot_bytes) as pool:
        copier = BlockCopier(pool, lay, 0, planes)
        pool.wait_pinned()

        def step(store: bool) -> tuple[float, float]:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            job = copier.to_pool(blocks, np.arange(n)) if store else None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(compute)
            x = a
            for _ in range(100):
                x = torch.matmul(x, a).clamp_(-1, 1)
            end.record(compute)
            end.synchronize()  # sampling waits for the forward, not for the store
            host = time.perf_counter() - t0
            if job is not None:
                job.wait()
            return host, start.elapsed_time(end) / 1e3

        step(False), step(True)  # warm-up
        for _ in range(reps):
            h, g = step(False)
            host_without.append(h), gpu_without.append(g)
            h, g = step(True)
            host_with.append(h), gpu_with.append(g)
        copier.close()
    return {"host_without": float(np.median(host_without)), "host_with": float(np.median(host_with)),
            "gpu_without": float(np.median(gpu_without)), "gpu_with": float(np.median(gpu_with)),
            "store_bytes": n * lay.rank_bytes}


def pinning(gib: float) -> dict[str, float]:
    nbytes = int(gib * GiB)
    slot = 2 << 20
    with CpuPool.create(nbytes // slot, slot) as pool:
        t0 = time.perf_counter()
        pool.start_pinning(torch.cuda.current_device())
        pool.wait_pinned(cpu_tier.PIN_CHUNK_BYTES)
        first = time.perf_counter() - t0
        pool.wait_pinned()
        total = time.perf_counter() - t0
    return {"gib": nbytes / GiB, "s_per_gib": total / (nbytes / GiB), "first_chunk_s": first}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU tensors, CPU path: checks the script itself")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    rng = np.random.default_rng(0)
    small = args.quick or args.dry_run
    num_blocks, n = (256, 64) if small else (2048, 512)
    pdir = pool_dir(8 * GiB if not small else GiB)
    rows: list[tuple[str, str, str, bool | None]] = []  # (check, case, result, ok)

    env = f"torch {torch.__version__}"
    if cuda:
        from flexkv_core.cuda_batch import BatchCopy

        env += (f", CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
                f"cuMemcpyBatchAsync {'yes' if BatchCopy().batched else 'NO (fallback)'}")
    print(f"{env}; pools in {pdir}", flush=True)

    paths = [None, False] if cuda else [None]  # batched (where available) and the per-piece fallback
    for case in CASES:
        if case.dtype.startswith("float8") and not hasattr(torch, case.dtype):
            rows.append(("round trip", case.name, "skipped: no fp8 dtype in this torch", None))
            continue
        for batched in paths:
            label = "round trip" + (" (fallback)" if batched is False else "")
            if batched is False and case.name != CASES[0].name and case.name != CASES[3].name:
                continue  # the fallback is slow per piece: two cases are enough to prove it right
            try:
                ok, detail = round_trip(case, device, batched, num_blocks, n, rng)
            except Exception as exc:  # noqa: BLE001 - one broken case must not hide the others
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            rows.append((label, case.name, detail, ok))
            print(f"  {label}: {case.name}: {'ok' if ok else 'FAILED'} ({detail})", flush=True)

    results: dict = {"rows": rows}
    if cuda:
        reps = 3 if small else 7
        blocking = step_blocking(CASES[0], num_blocks, n, rng, reps)
        ratio = blocking["host_with"] / blocking["host_without"]
        rows.append(("store blocks host", CASES[0].name,
                     f"step host {blocking['host_with'] * 1e3:.1f} vs {blocking['host_without'] * 1e3:.1f} ms "
                     f"= {ratio:.3f}x (GPU {blocking['gpu_with'] * 1e3:.1f} vs {blocking['gpu_without'] * 1e3:.1f} ms, "
                     f"store {blocking['store_bytes'] / 2**20:.0f} MiB)", ratio <= 1.05))
        results["blocking"] = blocking
        pin = pinning(1.0 if small else 4.0)
        rows.append(("pinning", f"{pin['gib']:.0f} GiB pool",
                     f"{pin['s_per_gib'] * 1e3:.0f} ms/GiB, first chunk usable after {pin['first_chunk_s'] * 1e3:.0f} ms",
                     None))
        results["pinning"] = pin
        for case in (CASES[0], CASES[4]):
            bw = bandwidth(case, num_blocks, n, rng, reps)
            for d in ("d2h", "h2d"):
                r = bw[d] / bw[f"ref_{d}"]
                rows.append((f"bandwidth {d.upper()}", case.name,
                             f"{bw[d]:.1f} GiB/s vs one pinned copy {bw[f'ref_{d}']:.1f} GiB/s = {r:.2f}", r >= 0.8))
            results.setdefault("bandwidth", {})[case.name] = bw

    width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"\n{'check':<{width[0]}}  {'case':<{width[1]}}  {'':<6}  result")
    for check, case_name, detail, ok in rows:
        verdict = "-" if ok is None else ("ok" if ok else "FAIL")
        print(f"{check:<{width[0]}}  {case_name:<{width[1]}}  {verdict:<6}  {detail}")
    print(f"({time.perf_counter() - started:.0f} s{', dry run on CPU' if not cuda else ''})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return 0 if all(ok is not False for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
