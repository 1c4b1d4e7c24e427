"""Helpers shared by the test modules (one copy each; test modules import from here, never from each other).

* `free_port`, `wait_for`, `patched_environ`: ports, polling and environment for any test.
* `RedisServer`: a throw-away password-protected redis-server (distributed reuse).
* `make_hook_venv`: a throwaway virtualenv layered on ours with the Dynamo start-up hook installed, as
  scripts/setup.sh installs it.
* For tests that start real ``dynamo.vllm`` workers: `write_torchvision_shim`, `base_env`,
  `tiny_worker_args`, `http_json`, `group_alive`, `CHAT_TEMPLATE`.

Standard library only at import time: tests/test_distributed.py imports this module when it runs as a
node process too.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from flexkv_core.config import patched_environ  # noqa: F401 - re-exported for the tests
from flexkv_dynamo.local_cluster import get_json, group_alive  # noqa: F401 - group_alive re-exported

T = TypeVar("T")

#: Dynamo hosts its servers on the machine's IP unless told otherwise; keep everything on loopback.
LOOPBACK_ENV = ("DYN_TCP_RPC_HOST", "DYN_EVENT_PLANE_HOST", "DYN_TCP_RESPONSE_STREAM_HOST", "DYN_SYSTEM_HOST")
#: Blocks of vLLM's (GPU) KV cache per tiny test worker: small, so that a few prompts push a prefix out of it.
GPU_BLOCKS = 48
BLOCK_SIZE = 32
#: The chat template the tiny model lacks (Dynamo's frontend refuses a chat model without one).
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"


# ---- ports, polling, environment -------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def nothing_pending(status: dict[str, Any]) -> bool:
    """A cache's ``status``: no store and no SSD write-back is still queued."""
    return status["pending_stores"] == 0 and status["pending_writes"] == 0


def assert_connector_idle(flexkv: Any) -> None:
    """No job, pin or slot of the connector's scheduler side (a `FlexKVScheduler`) outlives the requests."""
    assert flexkv.in_flight() == {"waiting_loads": 0, "loads": 0, "stores": 0, "requests": 0}
    assert flexkv.cache.flush(timeout=30)
    tiers = flexkv.cache.stats()["tiers"]
    for tier in ("cpu", "ssd"):
        assert tiers[tier]["pinned_blocks"] == 0, tiers
        assert tiers[tier]["used_slots"] == tiers[tier]["ready_blocks"], tiers


class RedisServer:
    """A throw-away redis-server on 127.0.0.1 with a password, no persistence."""

    PASSWORD = "s3cret-test-pw"

    def __init__(self, port: int | None = None, password: str = PASSWORD) -> None:
        if shutil.which("redis-server") is None:
            import pytest

            pytest.skip("redis-server is not installed")
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--requirepass", self.password],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client().ping()  # waits: the client retries while the server comes up (below)
        return self

    def client(self):
        import redis

        r = redis.Redis(port=self.port, password=self.password, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                return r
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


# ---- the start-up hook in a throwaway virtualenv ---------------------------------------------------


def make_hook_venv(root: Path) -> Path:
    """A virtualenv in ``root`` layered on ours (everything importable) with the hook's .pth installed by
    `dynamo_hook.install`, as scripts/setup.sh installs it; returns its python. Creating one takes ~0.1 s."""
    import sysconfig

    from flexkv_dynamo import dynamo_hook

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site_dir = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]  # our venv's site-packages: its own .pth files are processed too
    Path(site_dir, "_base.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    dynamo_hook.install(site_dir)
    return py


# ---- real dynamo.vllm workers on the tiny model ----------------------------------------------------

#: transformers (imported by dynamo.vllm for image models) wants torchvision, which has no CPU build
#: on PyPI. This stand-in goes on the test subprocesses' PYTHONPATH only, never into the product: any
#: ``torchvision.*`` module imports, any name in it is a class that refuses to be used.
TORCHVISION_SHIM = '''\
"""Test-only stand-in for torchvision: transformers imports parts of it at module level for image
models; the text-only test model never calls any of it."""
import importlib.machinery
import sys

__version__ = "0.0.0+test-stub"


class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub(name)


def _stub(name):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"torchvision stub: {name} is not available in this test environment")
    return _StubMeta(name, (), {"__init__": refuse, "__call__": refuse})


def _module_getattr(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _stub(name)


class _Loader:
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__path__ = []
        module.__getattr__ = _module_getattr


class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, _Loader(), is_package=True)
        return None


sys.meta_path.append(_Finder())
__getattr__ = _module_getattr
'''


def write_torchvision_shim(root: Path) -> Path:
    """Write the shim package under ``root``; return the directory to put on PYTHONPATH."""
    pkg = root / "torchvision"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(TORCHVISION_SHIM)
    return root


def base_env(workdir: Path, shim: Path) -> dict[str, str]:
    """The environment of every process: file discovery + ZMQ event plane on loopback, small caches."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLEXKV_", "DYN_", "ETCD_", "NATS_")) and k not in ("KV_ENDPOINT", "ENABLE_FLEXKV")}
    env.update({name: "127.0.0.1" for name in LOOPBACK_ENV})
    env.update(
        DYN_DISCOVERY_BACKEND="file", DYN_FILE_KV=str(workdir / "discovery"), DYN_EVENT_PLANE="zmq",
        DYN_REQUEST_PLANE="tcp", DYN_LOG="info", DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS="0.5",
        PYTHONPATH=str(shim),
        VLLM_CPU_KVCACHE_SPACE="1", DYNAMO_USE_FLEXKV="1", FLEXKV_CPU_CACHE_GB="0.25", FLEXKV_SSD_CACHE_GB="0",
    )
    return env


def tiny_worker_args(model_dir: str, template: Path) -> list[str]:
    """vLLM/Dynamo flags that make the tiny model start fast and keep its GPU cache tiny."""
    return ["--block-size", str(BLOCK_SIZE), "--max-model-len", "1024", "--num-gpu-blocks-override", str(GPU_BLOCKS),
            "--enforce-eager", "--dtype", "float32", "--distributed-executor-backend", "uni",
            "--custom-jinja-template", str(template)]


def http_json(url: str, body: Any = None, timeout: float = 120.0) -> Any:
    """POST ``body`` as JSON (GET when None) and return the decoded JSON answer."""
    return get_json(url, body, timeout)


def torchvision_shim_if_needed(root: Path) -> str:
    """The shim's directory (written under ``root``) when this interpreter has no working torchvision, else ""."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a CUDA build that fails to load on a CPU-only torch
        return str(write_torchvision_shim(root))
    return ""


if __name__ == "__main__":
    # `python tests/support.py torchvision-shim DIR`: what `make demo` puts on PYTHONPATH on a CPU-only machine
    # (dynamo.vllm imports torchvision for every model; the package index has no CPU build for our torch).
    if len(sys.argv) != 3 or sys.argv[1] != "torchvision-shim":
        sys.exit("usage: python tests/support.py torchvision-shim DIR")
    print(torchvision_shim_if_needed(Path(sys.argv[2])))
