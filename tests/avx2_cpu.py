"""Test-only: a virtualenv in which torch and vLLM behave as on an x86-64 CPU with AVX2 and no AVX-512.

AVX2 code runs on an AVX-512 machine, so the path a smaller CPU takes can be exercised here. vLLM decides
from torch's CPU probes (``torch.cpu._is_avx512_supported()`` and friends): which of its kernel builds to
load (``vllm.platforms.cpu.CpuPlatform.import_kernels``: ``_C`` for AVX-512+BF16, ``_C_AVX512``, else
``_C_AVX2``), the attention ISA, AMX paths. Neither vLLM nor torch has a switch for those probes, so a
``.pth`` in the throwaway virtualenv makes them answer False in every interpreter it starts, children
included (a one-shot import hook patches ``torch.cpu`` right after torch loads it). torch's and oneDNN's own
kernels are held to AVX2 with their supported switches, ``ATEN_CPU_CAPABILITY=avx2`` and
``ONEDNN_MAX_CPU_ISA=AVX2``.

The patch is tied to vLLM 0.31's code: `probes_vllm_reads` lists every ``torch.cpu._is_*`` probe vLLM's
sources call, and tests/test_cpu_isa.py fails if vLLM starts reading one this module does not patch, or
if ``import_kernels`` stops choosing by these probes.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

#: The probes that answer False in the virtualenv: everything beyond AVX2.
PATCHED_PROBES = ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_vnni_supported",
                  "_is_amx_tile_supported", "_is_amx_fp16_supported")
#: The probe that stays true (the CPU has AVX2).
KEPT_PROBES = ("_is_avx2_supported",)
VLLM_SERIES = "0.31."

_MODULE = f'''\
"""Test-only (flexkv-dynamo tests/avx2_cpu.py): behave as an AVX2-only x86-64 CPU."""
import os
import sys

os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
_PROBES = {PATCHED_PROBES!r}


def _no():
    return False


class _Loader:
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for name in _PROBES:
            setattr(module, name, _no)


class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name != "torch.cpu":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        spec.loader = _Loader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())
'''


def make_avx2_venv(root: Path) -> Path:
    """A virtualenv in ``root`` layered on ours, in which every interpreter sees an AVX2-only CPU, with the
    start-up hook installed as an install of the project would; its python."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site_dir = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    import sysconfig

    ours = sysconfig.get_paths()["purelib"]
    (site_dir / "_base.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    (site_dir / "_flexkv_test_avx2_only.py").write_text(_MODULE)
    (site_dir / "zz_flexkv_test_avx2_only.pth").write_text("import _flexkv_test_avx2_only\n")
    from flexkv_dynamo import dynamo_hook

    dynamo_hook.install(site_dir)
    return py


def vllm_dir() -> Path:
    return Path(importlib.util.find_spec("vllm").origin).parent


def probes_vllm_reads() -> set[str]:
    """Every ``torch.cpu._is_*`` probe called anywhere in the installed vLLM's sources."""
    found: set[str] = set()
    for path in vllm_dir().rglob("*.py"):
        found.update(re.findall(r"torch\.cpu\.(_is_[a-z0-9_]+)", path.read_text(errors="replace")))
    return found
