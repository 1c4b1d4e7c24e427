"""Real Dynamo deployments for end-to-end tests: ``dynamo.frontend`` and ``dynamo.vllm --connector flexkv``
workers on the tiny model, as processes of their own (file discovery, ZMQ event plane, loopback only).

* `Proc`: a process in its own session, logging to a file, stopped the way the launchers stop it.
* `stop_all`, `wait_until_serving`: start-up and tear-down of a set of them.
* `cache_call`, `flexkv_status_cli`, `cpu_counts`: a worker's cache as an operator reaches it (its
  ``FLEXKV_SERVER_RECV_PORT``).
* `worker_id`: the id Dynamo's router knows a worker by (from the worker's own log).
* `complete`, `stream`: requests through the frontend's OpenAI API (``stream`` reads server-sent events).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from conftest import short_tmpdir
from support import CHAT_TEMPLATE, group_alive, http_json, make_hook_venv, write_torchvision_shim

#: What ``dynamo.vllm`` serves by default (namespace dynamo, component backend): the router's endpoint.
WORKER_ENDPOINT = "dynamo.backend.generate"


def log_text(path: Path) -> str:
    """A process's log without the colour codes Dynamo's logger writes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))


def log_tail(path: Path, name: str, lines: int = 40) -> str:
    """The last ``lines`` of a log under a header naming it, for failure messages."""
    return f"--- {name} ({path}) ---\n" + "\n".join(log_text(path).splitlines()[-lines:])


@dataclass
class Proc:
    """A process we started in its own session (so that stopping it stops its children), logging to a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path) -> Proc:
        with open(log, "wb") as fh:
            popen = subprocess.Popen(list(argv), env=dict(env), stdout=fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(name, popen, log)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return log_text(self.log)

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log, self.name, lines)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout``. The group gets the time left after its
        leader exits: the engine core closes our cache then (a SIGKILL leaves the pool in /dev/shm until
        the next cache start sweeps it)."""
        deadline = time.monotonic() + timeout
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        while group_alive(self.popen.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.kill()

    def kill(self) -> None:
        """SIGKILL to everything left of the process group (kill -9, as a crash or the OOM killer does)."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.alive():
            self.popen.wait(10)


def stop_all(procs: Sequence[Proc], timeout: float = 30.0) -> None:
    """SIGTERM every process group at once, then wait; SIGKILL what is left after ``timeout``."""
    for proc in procs:
        if proc.alive():
            try:
                os.killpg(proc.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        proc.stop(timeout=max(0.0, deadline - time.monotonic()))


def generate_instances(url: str) -> list[dict[str, Any]]:
    """The workers' generate endpoints the frontend lists in /health (empty while it is not up)."""
    try:
        health = http_json(f"{url}/health", timeout=5)
    except (OSError, ValueError):
        return []
    return [i for i in health.get("instances", []) if i.get("endpoint") == "generate"]


def wait_until_serving(url: str, procs: Sequence[Proc], workers: int, timeout: float) -> str:
    """Wait for the frontend to list a model and ``workers`` generate endpoints; return the model id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p for p in procs if not p.alive()]
        if dead:
            raise AssertionError("exited during start-up:\n" + "\n".join(p.tail() for p in dead))
        try:
            models = http_json(f"{url}/v1/models", timeout=5)["data"]
        except (OSError, ValueError):
            models = []
        if models and len(generate_instances(url)) >= workers:
            return models[0]["id"]
        time.sleep(2)
    raise AssertionError(f"not serving after {timeout}s:\n" + "\n".join(p.tail() for p in procs))


def worker_id(worker: Proc) -> int:
    """The id Dynamo's router knows this worker by (its relay logs it when it starts)."""
    found = re.findall(r"KvEventPublisher for worker (\d+)", worker.text())
    if not found:
        raise AssertionError(f"no worker id in the log of {worker.name}:\n{worker.tail()}")
    return int(found[-1])


# ---- a worker's cache, as an operator reaches it -----------------------------------------------------


def cache_call(endpoint: str, method: str, **args: Any) -> Any:
    """Call ``method`` on the worker cache's service at ``endpoint`` (its FLEXKV_SERVER_RECV_PORT)."""
    from flexkv_core.client import CacheClient

    with CacheClient(endpoint, timeout_s=30) as client:
        return client.call(method, **args)


def flexkv_status_cli(endpoint: str) -> dict[str, Any]:
    """The answer of ``flexkv status --endpoint E --json`` (the operator's command): status (and distributed)."""
    out = subprocess.run([sys.executable, "-m", "flexkv_core.cli", "status", "--endpoint", endpoint, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"flexkv status --endpoint {endpoint} failed: {out.stderr}"
    return json.loads(out.stdout)


def cpu_counts(endpoint: str) -> tuple[int, int]:
    """(blocks stored into the CPU tier, blocks loaded from it) so far, asked as `flexkv status` asks."""
    metrics = cache_call(endpoint, "status")["metrics"]
    return metrics["stored_blocks"]["cpu"], metrics["hit_blocks"]["cpu"]


# ---- requests through the frontend ---------------------------------------------------------------------


def complete(url: str, model: str, prompt: str, max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return http_json(f"{url}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                               "temperature": 0, **extra})


def stream(url: str, model: str, prompt: str, max_tokens: int, timeout: float = 300) -> Iterator[dict[str, Any]]:
    """A streaming completion's chunks, as they arrive (server-sent events, up to ``data: [DONE]``). Each
    chunk carries its tokens' logprobs: a slow reader gets several tokens merged into one chunk, so count
    tokens with `chunk_tokens`, not chunks."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True, "logprobs": 1}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)


def chunk_tokens(choice: dict[str, Any]) -> int:
    """How many tokens one streamed choice carries (requests made with ``logprobs``)."""
    logprobs = choice.get("logprobs") or {}
    return len(logprobs.get("tokens") or ())


class Workdir(NamedTuple):
    """What every Dynamo deployment of the e2e tests starts from: a short-named directory (ipc sockets), the
    torchvision stand-in, a venv with our start-up hook, and the tiny model's chat template."""

    path: Path
    shim: Path
    hook_python: Path
    template: Path

    @classmethod
    def make(cls, prefix: str) -> Workdir:
        path = Path(short_tmpdir(prefix))
        template = path / "chat.jinja"
        template.write_text(CHAT_TEMPLATE)
        return cls(path, write_torchvision_shim(path / "shim"), make_hook_venv(path), template)
