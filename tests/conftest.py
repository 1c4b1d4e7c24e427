"""Shared fixtures: the tiny model, and real vLLM engines (in-process) with or without our connector.

Engines are expensive (40-60 s to start on two cores): share one per module, and shut it down in the
module's fixture. They run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a test reaches
the connector's live cache directly: `Engine.flexkv` is the scheduler side of the connector,
``Engine.flexkv.cache`` its `TieredCache`.

Nothing here sets environment variables for the whole session: an engine's variables (FLEXKV_*,
VLLM_*) are set while it is built and restored afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import patched_environ

from flexkv_dynamo.tiny_model import make_tiny_model

#: Block size of test engines: the CPU attention backend needs a multiple of 32.
BLOCK_SIZE = 32
#: Small, so that prompts of a few hundred tokens already need chunked prefill.
MAX_BATCHED_TOKENS = 512

FLEXKV_TRANSFER_CONFIG = {
    "kv_connector": "FlexKVConnector",
    "kv_connector_module_path": "flexkv_dynamo.connector",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",
}


def flexkv_env(workdir: str | os.PathLike[str], *, cpu_gb: float = 0.25, ssd_gb: float = 0.5,
               **extra: str) -> dict[str, str]:
    """FLEXKV_* variables for a test cache living in ``workdir`` (SSD files and the service socket)."""
    workdir = os.fspath(workdir)
    env = {
        "ENABLE_FLEXKV": "1",
        "FLEXKV_CPU_CACHE_GB": str(cpu_gb),
        "FLEXKV_SSD_CACHE_GB": str(ssd_gb),
        "FLEXKV_SSD_CACHE_DIR": os.path.join(workdir, "ssd"),
        # ipc paths must stay under 108 bytes; workdir comes from short_tmpdir.
        "FLEXKV_SERVER_RECV_PORT": f"ipc://{os.path.join(workdir, 'svc.sock')}",
    }
    env.update(extra)
    return env


def short_tmpdir(prefix: str = "fkv") -> str:
    """A fresh directory with a short path (pytest's tmp_path can be too long for an ipc socket)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


@dataclass
class Engine:
    """A vLLM ``LLM`` running in this process, and how to stop it."""

    llm: Any
    env: dict[str, str] = field(default_factory=dict)
    closed: bool = False

    @property
    def core(self) -> Any:
        """vLLM's EngineCore (in-process), which holds the scheduler."""
        return self.llm.llm_engine.engine_core.engine_core

    @property
    def connector(self) -> Any:
        return self.core.scheduler.connector

    @property
    def flexkv(self) -> Any:
        """The scheduler side of our connector (`flexkv_dynamo.scheduler.FlexKVScheduler`)."""
        side = getattr(self.connector, "scheduler_side", None)
        if side is None:
            raise AssertionError(f"engine has no FlexKV scheduler side (connector {self.connector!r})")
        return side

    def generate(self, prompts: list[list[int]], max_tokens: int = 16) -> list[Any]:
        """Greedy completions of token-id prompts (``RequestOutput`` list, in order)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    def settle(self, timeout: float = 120) -> None:
        """Step the engine until neither requests nor connector work (stores in flight) remain. An in-process
        engine only steps while ``generate`` waits for outputs; stores are reported in a later step."""
        import time

        deadline = time.monotonic() + timeout
        while self.core.scheduler.has_requests():
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy after {timeout}s: {self.flexkv.in_flight()}")
            self.core.step()

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        import gc

        gc.collect()


def start_engine(model_dir: str, *, transfer_config: dict[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, block_size: int = BLOCK_SIZE,
                 max_model_len: int = 4096, max_num_batched_tokens: int = MAX_BATCHED_TOKENS,
                 kv_cache_gb: int = 1, **llm_kwargs: Any) -> Engine:
    """Start an in-process vLLM engine on the tiny model (tens of seconds)."""
    from vllm import LLM
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    # vLLM keeps the worker-side connector in a process-wide global, set once and cleared by a clean engine
    # shutdown only: an earlier engine of this process that failed to start (a test of that) leaves its
    # connector there, and vLLM would hand it to this engine, with the other engine's KV layout.
    ensure_kv_transfer_shutdown()
    values = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb)}
    values.update(env or {})
    with patched_environ(values):
        llm = LLM(model=model_dir, dtype="float32", block_size=block_size, max_model_len=max_model_len,
                  max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=True, seed=0,
                  kv_transfer_config=transfer_config, **llm_kwargs)
    return Engine(llm, dict(env or {}))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with a word-level tokenizer (made once per session, no download)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def flexkv_workdir() -> Iterator[Path]:
    """A short-named directory for one module's caches (SSD files, service socket), removed after."""
    path = short_tmpdir()
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)
