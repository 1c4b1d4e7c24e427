"""Dynamo's KV-routing frontend and N ``python -m dynamo.vllm`` workers on this machine, started and stopped.

What the demo and the aiperf benchmark run: the commands users type, with what makes several of them
share one machine.

* Discovery by files and Dynamo's ZMQ event plane (no etcd, no NATS), every server on loopback.
* Each worker gets its own KV-events endpoint (``tcp://*:P``, given explicitly so that every kind of worker
  publishes its GPU events to the router alike), Dynamo system port (below 32768, as Dynamo requires),
  cache-service socket and SSD directory, and, unless ``VLLM_CPU_OMP_THREADS_BIND`` is set, its own share
  of the CPU cores: vLLM's automatic binding reserves cores by whether a connector is configured, which
  would give a worker with our connector different cores than one without.
* Three kinds of worker (`WorkerKind`): plain ``dynamo.vllm`` (no connector at all), ``--connector
  flexkv`` with our tiers' events published to the router, and the same with those events off
  (``DYNAMO_USE_FLEXKV=0``: the router sees GPU blocks only, as with upstream FlexKV).
* Every process runs in its own session, logging to a file; `LocalCluster.stop` ends each process group
  (SIGTERM, SIGKILL after a grace period), so vLLM's engine cores go too. A cluster is also stopped at
  interpreter exit, and the context manager stops it on any exception, Ctrl-C included.

``python -m dynamo.vllm`` imports torchvision (through transformers' Qwen2-VL image processor, for every
model). GPU machines have it; on a CPU-only machine, where the package index has no CPU build for this
torch, the worker dies at import: `LocalCluster` says so instead of waiting for it.
"""

from __future__ import annotations

import atexit
import enum
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .launch_args import events_config_for, free_port_block

log = logging.getLogger(__name__)

#: Dynamo hosts its servers on the machine's address unless told otherwise: keep them on loopback.
LOOPBACK_ENV = ("DYN_TCP_RPC_HOST", "DYN_EVENT_PLANE_HOST", "DYN_TCP_RESPONSE_STREAM_HOST", "DYN_SYSTEM_HOST")


class ClusterError(RuntimeError):
    """A process of the cluster did not start, died, or the cluster did not become ready in time."""


class WorkerKind(str, enum.Enum):
    """What a worker runs besides vLLM."""

    VLLM = "vllm"  # plain dynamo.vllm: vLLM's own GPU prefix cache, no connector
    FLEXKV = "flexkv"  # --connector flexkv, our tiers' KV events published to the router
    FLEXKV_BLIND = "flexkv-blind"  # --connector flexkv, tier events off: the router sees GPU blocks only

    @property
    def has_cache(self) -> bool:
        return self is not WorkerKind.VLLM


@dataclass
class Process:
    """A process started in its own session, its output in ``log_path``."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        """The log so far, colour codes removed."""
        try:
            return re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(errors="replace"))
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return f"--- {self.name} ({self.log_path}) ---\n" + "\n".join(self.text().splitlines()[-lines:])


@dataclass
class Worker:
    index: int
    kind: WorkerKind
    process: Process
    system_port: int  # Dynamo's system server: /health, /metrics, /engine/flush_cache
    cache_endpoint: str | None  # our cache service (flexkv kinds)

    def instance_id(self) -> int | None:
        """Dynamo's id of this worker (what the router names in its decisions), once it registered."""
        found = re.search(r"KvEventPublisher for worker (\d+)", self.process.text())
        return int(found.group(1)) if found else None


def cpu_share(index: int, count: int, cpus: Sequence[int] | None = None) -> str:
    """The cores worker ``index`` of ``count`` binds its compute threads to, as VLLM_CPU_OMP_THREADS_BIND
    wants them ("0", "2-3"): an equal slice each, the same slice whatever the worker kind."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else list(cpus)
    if count <= len(cpus):
        per = len(cpus) // count
        mine = cpus[index * per:(index + 1) * per]
    else:  # more workers than cores: share round-robin
        mine = [cpus[index % len(cpus)]]
    return ",".join(str(c) for c in mine)


def dynamo_vllm_importable(env: Mapping[str, str] | None = None) -> str | None:
    """None when ``python -m dynamo.vllm`` can import its dependencies here, else why not (cheap: no import)."""
    env = os.environ if env is None else env
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if importlib.util.find_spec("torchvision") is not None or any(Path(p, "torchvision").is_dir() for p in path):
        return None
    return ("python -m dynamo.vllm imports torchvision (Dynamo's handlers import transformers' Qwen2-VL image "
            "processor for every model) and this environment has none. Install the torchvision that matches "
            "torch; on a CPU-only machine, where the package index has no CPU build, `make demo` puts the "
            "test harness's stand-in on PYTHONPATH for the workers.")


@dataclass
class LocalCluster:
    """Frontend + workers under ``workdir``; use as a context manager, or call `stop`."""

    workdir: Path
    python: str = sys.executable
    env: Mapping[str, str] | None = None  # base environment (default: ours)
    http_port: int = 0  # 0: a free one
    frontend_args: Sequence[str] = ()
    processes: list[Process] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)
    url: str = ""
    ipc_dir: Path | None = None  # the workers' cache sockets (made on first use, removed by stop)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = dict(os.environ if self.env is None else self.env)
        # Settings of another deployment must not leak into ours (a FLEXKV_* of the caller's shell, a
        # DYN_* discovery backend); the caller passes what it wants through start_worker's env.
        base = {k: v for k, v in base.items()
                if not k.startswith(("FLEXKV_", "DYN_", "ETCD_", "NATS_")) and k not in ("KV_ENDPOINT",
                                                                                      "ENABLE_FLEXKV")}
        base.update({name: "127.0.0.1" for name in LOOPBACK_ENV})
        base.update(DYN_DISCOVERY_BACKEND="file", DYN_FILE_KV=str(self.workdir / "discovery"),
                    DYN_EVENT_PLANE="zmq", DYN_REQUEST_PLANE="tcp", DYN_LOG=base.get("DYN_LOG", "info"),
                    DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS="0.5")
        shutil.rmtree(self.workdir / "discovery", ignore_errors=True)  # stale registrations
        self._env = base
        _LIVE.append(self)

    # ---- starting --------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Process:
        log_path = self.workdir / f"{name.replace(' ', '_')}.log"
        log.debug("starting %s: %s (log %s)", name, " ".join(argv), log_path)
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(list(argv), env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        proc = Process(name, popen, log_path)
        self.processes.append(proc)
        return proc

    def start_frontend(self) -> str:
        """``python -m dynamo.frontend --router-mode kv`` on loopback; returns its URL."""
        port = self.http_port or free_port_block()
        self._spawn("frontend", [self.python, "-m", "dynamo.frontend", "--router-mode", "kv",
                                 "--http-host", "127.0.0.1", "--http-port", str(port), *self.frontend_args],
                    self._env)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def start_worker(self, model: str, kind: WorkerKind, *, count: int, args: Sequence[str] = (),
                     env: Mapping[str, str] | None = None, ssd_gb: float = 0.0) -> Worker:
        """Worker number ``len(self.workers)`` of ``count`` (``count`` sizes its share of the cores).

        ``env`` adds to the environment (``FLEXKV_CPU_CACHE_GB``...); ``ssd_gb`` > 0 gives the worker an SSD
        tier in its own directory under ``workdir``.
        """
        why = dynamo_vllm_importable(self._env)
        if why:
            raise ClusterError(why)
        index = len(self.workers)
        system_port = free_port_block()
        events_port = free_port_block()
        worker_env = dict(self._env)
        worker_env["DYN_SYSTEM_PORT"] = str(system_port)
        worker_env.setdefault("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
                              or cpu_share(index, count))
        argv = [self.python, "-m", "dynamo.vllm", "--model", model, *args,
                "--kv-events-config", json.dumps(events_config_for(f"tcp://*:{events_port}"))]
        endpoint = None
        if kind.has_cache:
            argv += ["--connector", "flexkv"]
            # A short path: a Unix socket's name has at most 107 bytes.
            endpoint = f"ipc://{self._ipc_dir()}/flexkv_{index}"
            worker_env.update(FLEXKV_SERVER_RECV_PORT=endpoint,
                              DYNAMO_USE_FLEXKV="1" if kind is WorkerKind.FLEXKV else "0",
                              FLEXKV_SSD_CACHE_GB=f"{ssd_gb:g}",
                              FLEXKV_SSD_CACHE_DIR=str(self.workdir / f"ssd_{index}"))
        worker_env.update(env or {})
        proc = self._spawn(f"worker {index}", argv, worker_env)
        worker = Worker(index, kind, proc, system_port, endpoint)
        self.workers.append(worker)
        return worker

    def _ipc_dir(self) -> Path:
        if self.ipc_dir is None:
            self.ipc_dir = Path(tempfile.mkdtemp(prefix="fkvc", dir="/tmp"))
        return self.ipc_dir

    # ---- waiting ---------------------------------------------------------------------------------------

    def check_alive(self) -> None:
        """ClusterError naming the first process that exited, with the end of its log."""
        for proc in self.processes:
            if not proc.alive():
                hint = ""
                if "No module named 'torchvision'" in proc.text():
                    hint = "\n" + (dynamo_vllm_importable({}) or "")
                raise ClusterError(f"{proc.name} exited with status {proc.popen.returncode}:\n{proc.tail()}{hint}")

    def wait_ready(self, timeout_s: float, progress: Any = None) -> str:
        """Wait until the frontend lists a model served by every worker; return the model's id.

        ``progress``, when given, is called with a line of text each time the state changes.
        """
        deadline = time.monotonic() + timeout_s
        last = ""
        while True:
            self.check_alive()
            state, model = self._serving_state()
            if state != last and progress is not None:
                progress(state)
            last = state
            if model is not None:
                return model
            if time.monotonic() > deadline:
                raise ClusterError(f"not serving after {timeout_s:.0f} s ({state}):\n"
                                   + "\n".join(p.tail(15) for p in self.processes))
            time.sleep(1.0)

    def _serving_state(self) -> tuple[str, str | None]:
        try:
            models = get_json(f"{self.url}/v1/models")["data"]
            health = get_json(f"{self.url}/health")
        except (OSError, ValueError, KeyError):
            return "frontend starting", None
        ready = sum(1 for i in health.get("instances", []) if i.get("endpoint") == "generate")
        if models and ready >= len(self.workers):
            return f"{ready} workers ready", models[0]["id"]
        return f"{ready} of {len(self.workers)} workers ready", None

    # ---- stopping --------------------------------------------------------------------------------------

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM every process group, wait up to ``grace_s``, then SIGKILL what is left of each group.

        The groups get the time left after their leaders exit: an engine core closes our cache then.
        """
        running = [p for p in self.processes if p.alive()]
        for proc in running:
            _signal_group(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in running:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.0f s: killing it", proc.name, grace_s)
        for proc in self.processes:
            while group_alive(proc.popen.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            _signal_group(proc.popen.pid, signal.SIGKILL)
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) did not die", proc.name, proc.popen.pid)
        if self.ipc_dir is not None:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
        if self in _LIVE:
            _LIVE.remove(self)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self, lines: int = 30) -> str:
        return "\n".join(p.tail(lines) for p in self.processes)


_LIVE: list[LocalCluster] = []


@atexit.register
def _stop_all() -> None:
    for cluster in list(_LIVE):
        cluster.stop(grace_s=10.0)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Is any process of process group ``pgid`` left (vLLM's engine core outlives a worker's main process)?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def get_json(url: str, body: Any = None, timeout: float = 10.0) -> Any:
    """GET (or POST ``body`` as JSON) and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (loopback URLs we built)
        return json.load(resp)


__all__ = ["ClusterError", "LocalCluster", "Process", "Worker", "WorkerKind", "cpu_share",
           "dynamo_vllm_importable", "get_json"]
