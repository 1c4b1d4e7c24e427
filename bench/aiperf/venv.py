"""aiperf's own virtualenv, built once and cached outside the checkout.

aiperf pins versions that clash with the serving stack (vLLM, Dynamo), so it never goes into the
project venv. The venv lives under ``$FLEXKV_CACHE_DIR`` (default ``~/.cache/flexkv-dynamo``) as
``aiperf-<hash of requirements.txt>``: editing the pin file builds a fresh one, an unchanged pin file
reuses the cached one in milliseconds. A ``.complete`` marker is written last, so an interrupted
install is redone instead of half-used.

``python -m bench.aiperf.venv`` (from the repository root) builds it and prints the aiperf binary.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from flexkv_dynamo.models import cache_root

log = logging.getLogger(__name__)

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
_MARKER = ".complete"


class AiperfVenvError(RuntimeError):
    """The aiperf virtualenv could not be built or does not work."""


def venv_dir(requirements: Path = REQUIREMENTS) -> Path:
    """Where the venv for this pin file lives (whether or not it exists yet)."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    return cache_root() / f"aiperf-{digest}"


def aiperf_bin(venv: Path) -> Path:
    return venv / "bin" / "aiperf"


def _run(cmd: list[str]) -> None:
    log.info("$ %s", " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise AiperfVenvError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}")


def _python() -> str:
    """The interpreter the venv is made from: this one's base (a venv of a venv works, but needs none)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def ensure_aiperf_venv(requirements: Path = REQUIREMENTS) -> Path:
    """Build (once) and return the aiperf venv for ``requirements``; raise AiperfVenvError on failure."""
    if not requirements.is_file():
        raise AiperfVenvError(f"aiperf requirements file not found: {requirements}")
    venv = venv_dir(requirements)
    if (venv / _MARKER).is_file() and aiperf_bin(venv).exists():
        log.debug("aiperf venv cached: %s", venv)
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    # Two drivers (or checkouts) building the same venv at once would delete each other's half.
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / _MARKER).is_file() and aiperf_bin(venv).exists():
            return venv
        return _build(requirements, venv)


def _uv() -> str | None:
    """uv, the fast installer: on PATH, or the one scripts/setup.sh installs into the stack."""
    found = shutil.which("uv")
    if found:
        return found
    try:
        from uv import find_uv_bin
    except ImportError:
        return None
    return find_uv_bin()


def _build(requirements: Path, venv: Path) -> Path:
    log.info("building aiperf's venv in %s (about 3 minutes and 1.2 GB, once per pin file)", venv)
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    uv = _uv()
    if uv:
        _run([uv, "venv", "--quiet", "--python", _python(), str(venv)])
        _run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), "-r", str(requirements)])
    else:  # plain pip: slower, same result
        _run([_python(), "-m", "venv", str(venv)])
        _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              "-r", str(requirements)])
    _run([str(aiperf_bin(venv)), "--version"])
    (venv / _MARKER).write_text(requirements.read_text())
    # Keep the newest three aiperf venvs: each is over a gigabyte.
    old = sorted(cache_root().glob("aiperf-*"), key=lambda p: p.stat().st_mtime, reverse=True)[3:]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return venv


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[aiperf-venv] %(message)s")
    try:
        venv = ensure_aiperf_venv()
    except AiperfVenvError as exc:
        log.error("%s", exc)
        return 1
    sys.stdout.write(f"{aiperf_bin(venv)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
