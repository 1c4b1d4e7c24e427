"""Start and stop the deployments the driver benchmarks, and wait until they serve.

A `Deployment` is a set of processes behind one OpenAI-compatible URL. Each process runs in its own
session (process group), its output goes to a log file, and `Deployment.stop` ends every group
(SIGTERM, then SIGKILL after a grace period), so nothing outlives the driver: not the vLLM engine
cores that workers spawn, not the children of a launch script. Every live deployment is also
stopped at interpreter exit, whatever path the driver takes out.

`start_mocker` gives one: ``python -m dynamo.frontend --router-mode kv`` + ``python -m dynamo.mocker``
with N simulated workers. No model runs; the mocker simulates an engine's timing and its prefix cache and
publishes KV events to the router. Config ``flexkv`` gives each mock worker a host-memory tier
(``--num-host-blocks``), config ``vllm`` none: a stand-in for the real comparison, useful to check the
pipeline in seconds. Real workers (plain vLLM, FlexKV, FlexKV with its tier events off) are started by
`flexkv_dynamo.local_cluster`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


#: What a config name means for the mocker (host-tier blocks per worker; None: no host tier).
MOCKER_CONFIGS = ("vllm", "flexkv")


class DeploymentError(RuntimeError):
    """A deployment did not start, died, or did not become ready in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


_LIVE: list[Deployment] = []


#: Every process of a deployment (and everything they spawn, whatever session it moves to) inherits
#: this variable with the deployment's own token: `Deployment.stop` finds stragglers by it.
RUN_ID_ENV = "BENCH_DEPLOYMENT_ID"  # not FLEXKV_*: our config rejects unknown FLEXKV_ names


@dataclass
class Deployment:
    """Processes serving ``url``; `stop` ends them all."""

    name: str
    url: str
    workdir: Path
    processes: list[ManagedProcess] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cleanup: list[Path] = field(default_factory=list)  # directories removed after stop
    cache_endpoints: list[str] = field(default_factory=list)  # FlexKV cache services of the workers

    def spawn(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> ManagedProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"{name}.log"
        log.info("[%s] starting %s: %s (log %s)", self.name, name, " ".join(cmd), log_path)
        full_env = dict(os.environ if env is None else env)
        full_env[RUN_ID_ENV] = self.run_id
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=full_env, cwd=cwd, start_new_session=True)
        proc = ManagedProcess(name, popen, log_path)
        self.processes.append(proc)
        if self not in _LIVE:
            _LIVE.append(self)
        return proc

    def check_alive(self) -> None:
        """Raise DeploymentError naming the first process that exited, with the end of its log."""
        for proc in self.processes:
            code = proc.popen.poll()
            if code is not None:
                raise DeploymentError(f"[{self.name}] {proc.name} exited with status {code} before the end; "
                                      f"last lines of {proc.log_path}:\n{tail(proc.log_path)}")

    def wait_ready(self, model: str, *, workers: int | None, timeout_s: float) -> None:
        """Wait until ``model`` is listed and (if given) ``workers`` generate endpoints are registered."""
        wait_for_model(self.url, model, workers=workers, timeout_s=timeout_s, alive=self.check_alive)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM every process group, wait up to ``grace_s``, then SIGKILL what is left."""
        running = [p for p in self.processes if p.popen.poll() is None]
        for proc in running:
            _signal_group(proc.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in running:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("[%s] %s ignored SIGTERM for %.0f s: killing it", self.name, proc.name, grace_s)
        # The leader may be gone while children it spawned (engine cores) still run: kill the groups.
        for proc in self.processes:
            _signal_group(proc.popen, signal.SIGKILL)
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("[%s] %s (pid %d) did not die", self.name, proc.name, proc.popen.pid)
        # Children that started their own session (a launch script's workers) are not in our groups.
        for pid in pids_with_env(RUN_ID_ENV, self.run_id):
            log.warning("[%s] killing stray process %d left by the deployment", self.name, pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        if running:
            log.info("[%s] stopped", self.name)
        if self in _LIVE:
            _LIVE.remove(self)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(popen: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # start_new_session made the child the leader of a group whose id is its pid.
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pids_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has ``name=value`` (Linux /proc; [] where unreadable)."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@atexit.register
def _stop_all() -> None:
    for dep in list(_LIVE):
        dep.stop(grace_s=5.0)


def _get_json(url: str, timeout_s: float = 5.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (loopback URL we built)
        return json.loads(resp.read().decode())


def served_models(url: str) -> list[str]:
    data = _get_json(f"{url.rstrip('/')}/v1/models")
    return [m.get("id") for m in data.get("data", [])] if isinstance(data, dict) else []


def generate_instances(url: str) -> int:
    """How many worker ``generate`` endpoints the frontend's /health lists (Dynamo's format)."""
    data = _get_json(f"{url.rstrip('/')}/health")
    if not isinstance(data, dict):
        return 0
    return sum(1 for inst in data.get("instances", []) if inst.get("endpoint") == "generate")


def wait_for_model(url: str, model: str, *, workers: int | None = None, timeout_s: float = 60.0,
                   alive: Callable[[], None] | None = None, poll_s: float = 1.0) -> None:
    """Poll until ``url`` serves ``model`` (and has ``workers`` generate instances); else DeploymentError.

    ``alive``, when given, is called on every poll and raises if the deployment died: a crashed worker
    fails the run at once instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while True:
        if alive is not None:
            alive()
        try:
            models = served_models(url)
            if model in models:
                if workers is None:
                    return
                n = generate_instances(url)
                if n >= workers:
                    log.info("%s serves %s with %d workers", url, model, n)
                    return
                last = f"{n} of {workers} workers registered"
            else:
                last = f"models listed: {models}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise DeploymentError(f"{url} did not serve model {model!r} within {timeout_s:.0f} s ({last})")
        time.sleep(poll_s)


def dynamo_env(workdir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Dynamo processes of one deployment: loopback only, file discovery in ``workdir``.

    A fresh discovery directory per deployment matters: a worker registered by the previous config's
    deployment must not be seen by the next one's router.
    """
    env = dict(os.environ if base is None else base)
    env.update({
        "DYN_FILE_KV": str(workdir / "discovery"),
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_EVENT_PLANE_HOST": "127.0.0.1",
        "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
        "DYN_SYSTEM_HOST": "127.0.0.1",
    })
    return env


@dataclass(frozen=True)
class MockerOptions:
    workers: int = 2
    block_size: int = 32
    gpu_blocks: int = 128  # per worker: small, so the slice overflows it and a host tier matters
    host_blocks: int = 4096  # per worker, config "flexkv" only
    speedup_ratio: float = 1.0


def start_mocker(config: str, *, model_dir: str, model_name: str, port: int, workdir: Path,
                 options: MockerOptions = MockerOptions()) -> Deployment:
    """Frontend (KV router) + ``dynamo.mocker`` workers; config ``flexkv`` adds a host tier per worker."""
    if config not in MOCKER_CONFIGS:
        raise ValueError(f"unknown mocker config {config!r}: expected one of {', '.join(MOCKER_CONFIGS)}")
    env = dynamo_env(workdir)
    dep = Deployment(f"mocker-{config}", f"http://127.0.0.1:{port}", workdir)
    py = sys.executable
    dep.spawn("frontend", [py, "-m", "dynamo.frontend", "--router-mode", "kv", "--http-host", "127.0.0.1",
                           "--http-port", str(port), "--discovery-backend", "file"], env)
    cmd = [py, "-m", "dynamo.mocker", "--model-path", model_dir, "--model-name", model_name,
           "--num-workers", str(options.workers), "--block-size", str(options.block_size),
           "--num-gpu-blocks-override", str(options.gpu_blocks), "--speedup-ratio", str(options.speedup_ratio),
           "--discovery-backend", "file"]
    if config == "flexkv":
        cmd += ["--num-host-blocks", str(options.host_blocks)]
    dep.spawn("mocker", cmd, env)
    return dep



def flexkv_tier_metrics(endpoints: Sequence[str], timeout_s: float = 10.0) -> list[dict[str, object]]:
    """Each worker's FlexKV counters (``flexkv status``: blocks stored, hit, evicted per tier).

    Asked before the deployment stops, so the report can say what the tiers actually served. A worker
    that does not answer gets an ``error`` entry instead: the benchmark's numbers stand either way.
    """
    from flexkv_core.client import CacheClient

    found: list[dict[str, object]] = []
    for endpoint in endpoints:
        client = CacheClient(endpoint, timeout_s=timeout_s)
        try:
            found.append({"endpoint": endpoint, "metrics": client.call("status")["metrics"]})
        except Exception as exc:  # noqa: BLE001 (any failure only costs the report a line)
            log.warning("no FlexKV status from %s: %s", endpoint, exc)
            found.append({"endpoint": endpoint, "error": str(exc)})
        finally:
            client.close()
    return found
