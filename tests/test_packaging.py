"""Installing the project installs the ``dynamo.vllm --connector flexkv`` start-up hook, removably.

The project is built for real (``pip wheel``, ``pip install -e``, setuptools from our environment, no
network) from a copy of the sources, and installed into a throwaway virtualenv layered on the pinned stack
only (vLLM, Dynamo, pip), never on our own ``.venv`` whose hook would answer instead. In that virtualenv the
real ``python -m dynamo.vllm`` is run with a command only the hook can refuse in its own words: proof the
installed ``.pth`` is active. ``pip uninstall`` removes it; ``dynamo_hook uninstall`` and
``FLEXKV_DYNAMO_HOOK=0`` still work.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flexkv_dynamo import dynamo_hook

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "setup.py", "README.md", "flexkv_core", "flexkv_dynamo"]
#: A command line the hook refuses before Dynamo loads; without the hook Dynamo imports vLLM and fails later.
CONFLICT = ["-m", "dynamo.vllm", "--model", "m", "--connector", "flexkv", "--kv-transfer-config", "{}"]
HOOK_ERROR = "dynamo.vllm: error: --connector flexkv and --kv-transfer-config both choose the KV connector"


def copy_sources(dest: Path) -> Path:
    dest.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def stack_venv(root: Path) -> tuple[Path, Path]:
    """A virtualenv layered on the pinned stack's site-packages (where vLLM lives), without this project;
    returns (python, its site-packages)."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site_dir = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    stack = Path(importlib.util.find_spec("vllm").origin).parent.parent
    (site_dir / "_stack.pth").write_text(f"import site; site.addsitedir({str(stack)!r})\n")
    return py, site_dir


def run(py: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXKV_", "DYN_", "PYTHON"))}
    clean.update(env)
    # Run from the virtualenv's directory: from the checkout, `python -c/-m` would import its packages.
    return subprocess.run([str(py), *args], capture_output=True, text=True, env=clean, cwd=py.parent, timeout=600)


def pip(py: Path, command: str, *args: str) -> None:
    offline = [] if command == "uninstall" else ["--no-deps", "--no-build-isolation", "--no-index"]
    out = run(py, "-m", "pip", command, "-q", *offline, *args)
    assert out.returncode == 0, out.stdout + out.stderr


def assert_hook_active(py: Path, site_dir: Path, tmp: Path) -> None:
    pth = site_dir / dynamo_hook.PTH_NAME
    assert pth.read_text().strip() == dynamo_hook.PTH_LINE
    status = run(py, "-m", "flexkv_dynamo.dynamo_hook", "status")
    assert status.returncode == 0 and status.stdout.strip() == f"installed and active: {pth}", status
    out = run(py, *CONFLICT, FLEXKV_SERVER_RECV_PORT=f"ipc://{tmp}/svc.sock", FLEXKV_CPU_CACHE_GB="0.01")
    assert out.returncode == 2 and out.stderr.startswith(HOOK_ERROR), out.stderr[-2000:]
    off = run(py, "-m", "flexkv_dynamo.dynamo_hook", "status", FLEXKV_DYNAMO_HOOK="0")
    assert off.stdout.strip() == f"installed, disabled by FLEXKV_DYNAMO_HOOK: {pth}"


def assert_removed_by_pip_uninstall(py: Path, site_dir: Path) -> None:
    pip(py, "uninstall", "-y", "flexkv-dynamo")
    assert not (site_dir / dynamo_hook.PTH_NAME).exists()
    assert importlib.util.find_spec("flexkv_dynamo") is not None  # (ours, in this process) ...
    gone = run(py, "-c", "import flexkv_dynamo")
    assert gone.returncode != 0  # ... but not in the throwaway virtualenv any more


def test_wheel_installs_the_hook_and_pip_uninstall_removes_it(tmp_path):
    src = copy_sources(tmp_path / "src")
    py, site_dir = stack_venv(tmp_path)
    pip(py, "wheel", "-w", str(tmp_path / "dist"), str(src))
    wheel = next((tmp_path / "dist").glob("flexkv_dynamo-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read(dynamo_hook.PTH_NAME).decode().strip() == dynamo_hook.PTH_LINE  # top level of the wheel
    pip(py, "install", str(wheel))
    assert_hook_active(py, site_dir, tmp_path)

    # The documented switch still removes it, and pip then uninstalls the rest without complaint.
    out = run(py, "-m", "flexkv_dynamo.dynamo_hook", "uninstall")
    assert out.returncode == 0 and out.stdout.startswith("removed:")
    assert run(py, "-m", "flexkv_dynamo.dynamo_hook", "status").returncode == 1
    assert_removed_by_pip_uninstall(py, site_dir)


def test_editable_install_installs_the_hook_and_pip_uninstall_removes_it(tmp_path):
    src = copy_sources(tmp_path / "src")
    py, site_dir = stack_venv(tmp_path)
    pip(py, "install", "-e", str(src))
    assert_hook_active(py, site_dir, tmp_path)
    assert_removed_by_pip_uninstall(py, site_dir)
