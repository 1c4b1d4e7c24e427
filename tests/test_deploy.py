"""deploy/: the launch scripts and the Kubernetes example.

* The scripts parse (``bash -n``), print their help and refuse bad options by name (fast).
* single_node.sh with two workers on the tiny model, started as users start it: it waits until the
  frontend serves, answers a chat request, serves each cache's metrics; a worker killed with SIGKILL
  under streaming load costs no request (request migration) and is restarted; on Ctrl-C (SIGINT) it
  stops every process it started, their children included (slow: starts three vLLM engines).
* A worker refused for its configuration: the script prints the worker's one-line cause; the cause of a
  real vLLM engine-core failure (a captured log) is the engine core's exception.
* start_virtual_nodes.sh: ready only once every node sees the others (stale Redis keys do not count);
  arguments after one ``--`` reach the workers.
* The start-up failure path with real etcd + NATS: a worker that dies makes the script stop everything
  and exit 1 with the worker's log; multi_node.sh's infra and frontend roles come up and go down.
* The Kubernetes manifests: valid YAML, services select pods that exist, every FLEXKV_* setting is
  one flexkv_core's configuration accepts, the worker runs the user's command with its own cache
  endpoint, shared memory and per-pod SSD directory (``kubectl`` is not available here).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import short_tmpdir
from dynamo_cluster import log_tail
from support import (
    CHAT_TEMPLATE,
    base_env,
    free_port,
    group_alive,
    http_json,
    make_hook_venv,
    tiny_worker_args,
    write_torchvision_shim,
)

from flexkv_core.config import load_config
from flexkv_dynamo.launch_args import events_endpoint_problem
from flexkv_dynamo.tiny_model import words

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SCRIPTS = ["lib.sh", "single_node.sh", "multi_node.sh"]


def run_script(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=timeout, env=env)


def started_pids(log_text: str) -> list[int]:
    return [int(p) for p in re.findall(r"started .*? \(pid (\d+)\)", log_text)]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text`` (our unique work directory or port)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and str(os.getpid()) != entry.name:
            found.append(f"{entry.name}: {cmd}")
    return found


def stop_script(script: subprocess.Popen, out_path: Path) -> None:
    """After a failure: SIGTERM lets the script stop what it started; then kill whatever is left."""
    if script.poll() is None:
        script.send_signal(signal.SIGTERM)
        try:
            script.wait(150)
        except subprocess.TimeoutExpired:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait(10)
    text = out_path.read_text() if out_path.exists() else ""
    for pid in started_pids(text):  # each in its own process group
        if group_alive(pid):
            os.killpg(pid, signal.SIGKILL)


# ---- the scripts, statically -----------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    out = run_script("-n", str(DEPLOY / script))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh"])
def test_help_lists_the_router_weights_and_worker_options(script):
    out = run_script(str(DEPLOY / script), "--help")
    assert out.returncode == 0, out.stderr
    for flag in ("--router-host-cache-hit-weight", "--router-disk-cache-hit-weight", "--workers", "--model",
                 "--migration-limit", "--http-host"):
        assert flag in out.stdout


@pytest.mark.parametrize("args,message", [
    (["single_node.sh"], "--model is required"),
    (["single_node.sh", "--model", "m", "--workers", "two"], "--workers must be a positive integer, not 'two'"),
    (["single_node.sh", "--model", "m", "--bogus"], "unknown option '--bogus'"),
    (["single_node.sh", "--model", "m", "--system-base-port", "32767", "--workers", "2"], "below 32768"),
    (["single_node.sh", "--model", "m", "--python", sys.executable, "--migration-limit", "many"],
     "--migration-limit must be a number >= 0, not 'many'"),
    (["multi_node.sh", "everything"], "unknown role 'everything'"),
    (["multi_node.sh", "workers", "--model", "m", "--python", "/nonexistent/python"], "'/nonexistent/python' not found"),
])
def test_bad_options_are_refused_by_name(args, message):
    out = run_script(str(DEPLOY / args[0]), *args[1:])
    assert out.returncode != 0
    assert message in out.stderr


def failure_cause(log_text: str, tmp_path: Path) -> str:
    log = tmp_path / "worker.log"
    log.write_text(log_text)
    out = run_script("-c", f'source "{DEPLOY / "lib.sh"}"; failure_cause "$1"', "bash", str(log))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_failure_cause_is_the_engine_cores_exception_not_vllms_summary(tmp_path):
    """A real worker log (a vLLM engine core that failed to start, captured here): the cause the scripts
    print is the engine core's exception, not the "Engine core initialization failed" that follows it."""
    text = (Path(__file__).parent / "data" / "engine_core_failure.log").read_text()
    assert "RuntimeError: Engine core initialization failed" in text
    assert failure_cause(text, tmp_path).startswith(
        "ValueError: To serve at least one request with the model's max seq len (1024)")


def test_failure_cause_prefers_the_launchers_own_error_line(tmp_path):
    line = "dynamo.vllm: error: flexkv config: cpu_cache_gb='lots' from env FLEXKV_CPU_CACHE_GB: not a finite number"
    text = f"2026-12-06T11:28:19Z  WARN something: ValueError: noise\n{line}\n"
    assert failure_cause(text, tmp_path) == line


# ---- failure path and the multi-node roles, with real etcd + NATS -----------------------------------


def _fake_worker_dir(root: Path) -> Path:
    """A ``dynamo.vllm`` that exits at once (namespace-merged over the real ``dynamo``: the frontend is real)."""
    pkg = root / "fakeworker" / "dynamo" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text("import sys\nprint('fake worker', sys.argv[1:])\nsys.exit(3)\n")
    return root / "fakeworker"


@pytest.mark.servers
@pytest.mark.dynamo
@pytest.mark.slow
def test_a_dying_worker_stops_everything_started_with_etcd_and_nats(tmp_path):
    if shutil.which("etcd") is None or shutil.which("nats-server") is None:
        pytest.skip("needs etcd and nats-server on PATH")
    work = tmp_path / "sn"
    env = {**os.environ, "PYTHONPATH": str(_fake_worker_dir(tmp_path))}
    out = run_script(str(DEPLOY / "single_node.sh"), "--model", "m", "--workers", "2", "--with-etcd",
                     "--etcd-port", str(free_port()), "--etcd-peer-port", str(free_port()), "--with-nats",
                     "--nats-port", str(free_port()), "--http-port", str(free_port()), "--python", sys.executable,
                     "--launcher", "dynamo", "--workdir", str(work), env=env, timeout=180)
    assert out.returncode == 1, out.stderr
    assert "discovery: etcd" in out.stderr and "event plane: nats" in out.stderr
    assert re.search(r"worker \d \(pid \d+\) exited with status 3\n.*last lines of", out.stderr)
    # The workers ran the user's command; the hook translated it before the (stand-in) dynamo.vllm started.
    assert "fake worker ['--model', 'm', '--tensor-parallel-size', '1', '--kv-events-config'" in out.stderr
    assert '"kv_connector":"FlexKVConnector"' in out.stderr
    for name in ("frontend", "nats", "etcd"):
        assert f"stopping {name}" in out.stderr
    pids = started_pids(out.stderr)
    assert len(pids) == 5  # etcd, nats, frontend, 2 workers
    assert not [p for p in pids if group_alive(p)]
    assert not processes_mentioning(str(work))


@pytest.mark.servers
@pytest.mark.dynamo
@pytest.mark.slow
def test_multi_node_infra_and_frontend_roles(tmp_path):
    if shutil.which("etcd") is None or shutil.which("nats-server") is None:
        pytest.skip("needs etcd and nats-server on PATH")
    etcd, peer, nats, http = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "NODE_IP": "127.0.0.1", "INFRA_HOST": "127.0.0.1"}
    ports = ["--etcd-port", str(etcd), "--nats-port", str(nats)]
    logs = {name: open(tmp_path / f"{name}.out", "w+") for name in ("infra", "frontend")}
    infra = subprocess.Popen(["bash", str(DEPLOY / "multi_node.sh"), "infra", *ports, "--etcd-peer-port", str(peer),
                              "--workdir", str(tmp_path / "infra")], env=env, stderr=logs["infra"],
                             stdout=logs["infra"], start_new_session=True)
    frontend = None
    try:
        frontend = subprocess.Popen(["bash", str(DEPLOY / "multi_node.sh"), "frontend", *ports, "--http-port", str(http),
                                     "--python", sys.executable, "--workdir", str(tmp_path / "frontend")],
                                    env=env, stderr=logs["frontend"], stdout=logs["frontend"], start_new_session=True)
        deadline = time.monotonic() + 120
        while "ready: http://127.0.0.1" not in (tmp_path / "frontend.out").read_text():
            assert frontend.poll() is None, (tmp_path / "frontend.out").read_text()
            assert time.monotonic() < deadline, (tmp_path / "frontend.out").read_text()
            time.sleep(0.5)
        assert http_json(f"http://127.0.0.1:{http}/health", timeout=5)["status"] == "healthy"
        assert "export INFRA_HOST=127.0.0.1" in (tmp_path / "infra.out").read_text()
    finally:
        for proc in (frontend, infra):  # the frontend first: it is a client of the infra
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    assert frontend.returncode == 143 and infra.returncode == 143
    text = (tmp_path / "infra.out").read_text() + (tmp_path / "frontend.out").read_text()
    pids = started_pids(text)
    assert len(pids) == 3 and not [p for p in pids if group_alive(p)]
    assert not processes_mentioning(str(tmp_path))


@pytest.mark.dynamo
@pytest.mark.slow
def test_single_node_prints_the_failing_workers_cause(tmp_path):
    """A worker refused for its configuration: the script says why in one line (the worker's own), within
    seconds of starting it, and stops the frontend it had started."""
    pytest.importorskip("dynamo.llm")
    root = Path(short_tmpdir("fxcause"))
    try:
        python = make_hook_venv(root)
        env = base_env(root, write_torchvision_shim(root / "shim"))
        for key in ("DYN_DISCOVERY_BACKEND", "DYN_FILE_KV", "DYN_EVENT_PLANE"):
            env.pop(key)
        env.update(FLEXKV_CPU_CACHE_GB="lots")
        out = run_script(str(DEPLOY / "single_node.sh"), "--model", "some-model", "--http-port", str(free_port()),
                         "--ipc-dir", str(root), "--workdir", str(root / "work"), "--python", str(python),
                         env=env, timeout=300)
        assert out.returncode == 1, out.stderr
        assert re.search(r"worker 0 \(pid \d+\) exited with status 2: dynamo\.vllm: error: flexkv config: "
                         r"cpu_cache_gb='lots' from env FLEXKV_CPU_CACHE_GB: not a finite number", out.stderr), out.stderr
        assert "stopping frontend" in out.stderr
        assert not processes_mentioning(str(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- single_node.sh for real: two workers on the tiny model -----------------------------------------


@pytest.mark.engine
@pytest.mark.dynamo
@pytest.mark.slow
@pytest.mark.timeout(2400)  # three engine starts (two, then a restart) on a shared two-core machine
def test_single_node_two_workers_serve_a_request_and_stop_cleanly(tiny_model_dir):
    pytest.importorskip("dynamo.llm")
    pytest.importorskip("vllm")
    root = Path(short_tmpdir("fxdeploy"))
    try:
        shim = write_torchvision_shim(root / "shim")
        python = make_hook_venv(root)
        template = root / "chat.jinja"
        template.write_text(CHAT_TEMPLATE)
        env = base_env(root, shim)
        for key in ("DYN_DISCOVERY_BACKEND", "DYN_FILE_KV", "DYN_EVENT_PLANE"):  # the script chooses these
            env.pop(key)
        env.update(FLEXKV_CPU_CACHE_GB="0.125", FLEXKV_SSD_CACHE_GB="0.0625", STOP_TIMEOUT="60")
        http = free_port()
        metrics_base = free_port_pair()
        system_base = 20000 + (os.getpid() % 5000) * 2  # Dynamo wants system ports below 32768
        out_path = root / "script.out"
        with open(out_path, "w") as out:
            script = subprocess.Popen(
                ["bash", str(DEPLOY / "single_node.sh"), "--model", tiny_model_dir, "--workers", "2",
                 "--http-host", "127.0.0.1", "--http-port", str(http), "--kv-events-base-port", str(free_port()),
                 "--system-base-port", str(system_base), "--ipc-dir", str(root), "--workdir", str(root / "work"),
                 "--python", str(python), "--ready-timeout", "900", "--router-host-cache-hit-weight", "0.9",
                 "--metrics-base-port", str(metrics_base),
                 "--", *tiny_worker_args(tiny_model_dir, template)],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                # As from a terminal: a pytest started in the background ignores SIGINT, and bash cannot
                # trap a signal ignored when it starts.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 1000
            while "ready: 2 worker(s)" not in out_path.read_text():
                assert script.poll() is None, out_path.read_text()
                assert time.monotonic() < deadline, out_path.read_text()
                time.sleep(1)
            text = out_path.read_text()
            assert "hook is not installed" not in text  # workers run the user's command, through the hook
            model = http_json(f"http://127.0.0.1:{http}/v1/models", timeout=10)["data"][0]["id"]
            answer = http_json(f"http://127.0.0.1:{http}/v1/chat/completions",
                               {"model": model, "messages": [{"role": "user", "content": words(40)}],
                                "max_tokens": 6, "temperature": 0})
            assert re.fullmatch(r"( ?w\d+){6}", answer["choices"][0]["message"]["content"])
            # Each worker got its own cache service, SSD directory and KV-events port.
            for i in range(2):
                log = (root / "work" / "logs" / f"worker_{i}.log").read_text(errors="replace")
                assert f"serving at ipc://{root}/flexkv_server_{i}" in log
                assert (root / "work" / "ssd" / f"worker_{i}").is_dir()
            pids = started_pids(out_path.read_text())
            assert len(pids) == 3
            cmdlines = {p: Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0") for p in pids}
            assert any(b"--router-host-cache-hit-weight" in c and b"0.9" in c for c in cmdlines.values())
            assert sum(b"dynamo.vllm" in c and b"--connector" in c and b"flexkv" in c
                       for c in cmdlines.values()) == 2

            # Each worker's cache serves its flexkv_* series (Dynamo's /metrics forwards vLLM's only).
            for i in range(2):
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_base + i}/metrics", timeout=10) as resp:
                    assert b"flexkv_capacity_slots{" in resp.read()

            # The system port answers the probes deploy/k8s/workers.yaml uses.
            for path in ("/health", "/live"):
                with urllib.request.urlopen(f"http://127.0.0.1:{system_base}{path}", timeout=10) as resp:
                    assert resp.status == 200, path

            # A worker killed mid-stream under load costs no request: the frontend migrates its streams
            # (--migration-limit, on by default) and the script restarts the worker.
            assert "--migration-limit" in out_path.read_text() or any(
                b"--migration-limit" in c for c in cmdlines.values())
            victim = pids[2]  # worker 1's process group (its engine core included)
            with StreamingLoad(f"http://127.0.0.1:{http}", model, clients=3) as load:
                load.wait_started(6)  # requests in flight on both workers
                killed_at = time.monotonic()
                os.killpg(victim, signal.SIGKILL)
                load.wait_finished_after(killed_at, 12)
            assert not load.failures, load.failures
            spanning = [r for r in load.results if r.started < killed_at < r.ended]
            assert spanning, "no stream was in flight when the worker died"
            print(f"\nkill -9 of a worker: {len(load.results)} streams, 0 failed; the longest stream across the "
                  f"kill took {max(r.ended - r.started for r in spanning):.1f}s, the slowest before it "
                  f"{max((r.ended - r.started for r in load.results if r.ended < killed_at), default=0):.1f}s")
            deadline = time.monotonic() + 600
            while "worker 1 ready again" not in out_path.read_text():
                assert script.poll() is None, out_path.read_text()
                assert time.monotonic() < deadline, out_path.read_text()
                time.sleep(1)
            text = out_path.read_text()
            assert re.search(r"worker 1 \(pid \d+\) exited with status 137", text), text
            assert "restarting worker 1" in text
            pids = started_pids(text)
            assert len(pids) == 4  # the restarted worker has a new process group

            script.send_signal(signal.SIGINT)  # Ctrl-C
            assert script.wait(300) == 130, out_path.read_text()  # each process gets STOP_TIMEOUT (60 s)
        finally:
            stop_script(script, out_path)
        text = out_path.read_text()
        assert "interrupted" in text and "stopped; logs:" in text
        assert not [p for p in pids if group_alive(p)], text
        assert not processes_mentioning(str(root)), processes_mentioning(str(root))
    except BaseException:
        show_log_ends(root)  # the logs are deleted with the root: their ends go with the failure report
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)


def show_log_ends(root: Path, lines: int = 40) -> None:
    """Print the last lines of the script's output and of every log under ``root`` to stderr (pytest shows
    them with the failure)."""
    for path in sorted([*root.glob("*.out"), *root.glob("work/logs/*.log")]):
        print(log_tail(path, str(path.relative_to(root)), lines), file=sys.stderr)


@dataclasses.dataclass
class StreamResult:
    started: float
    ended: float
    tokens: int
    finish_reason: str | None


class StreamingLoad:
    """``clients`` threads, each sending streaming chat requests one after another until stopped; every
    request must stream to its end (``finish_reason`` set, all its tokens) or it is a failure."""

    MAX_TOKENS = 48

    def __init__(self, url: str, model: str, clients: int) -> None:
        self.url, self.model, self.clients = url, model, clients
        self.results: list[StreamResult] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]

    def __enter__(self) -> StreamingLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(300)

    def _one(self, k: int, n: int) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": words(60, start=100 * k + n)}],
                "max_tokens": self.MAX_TOKENS, "temperature": 0, "stream": True, "ignore_eos": True}
        req = urllib.request.Request(f"{self.url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        started, tokens, finish = time.monotonic(), 0, None
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                for raw in resp:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"])
                    for choice in chunk.get("choices", []):
                        if choice.get("delta", {}).get("content"):
                            tokens += 1
                        finish = choice.get("finish_reason") or finish
        except Exception as exc:  # an HTTP error, a broken stream: what a user would see
            with self._lock:
                self.failures.append(f"client {k} request {n}: {exc!r}")
            return
        result = StreamResult(started, time.monotonic(), tokens, finish)
        with self._lock:
            if finish is None or tokens < self.MAX_TOKENS // 2:
                self.failures.append(f"client {k} request {n}: stream ended early ({result})")
            self.results.append(result)

    def _client(self, k: int) -> None:
        n = 0
        while not self._stop.is_set():
            self._one(k, n)
            n += 1

    def _count(self, predicate) -> int:
        with self._lock:
            return sum(1 for r in self.results if predicate(r))

    def wait_started(self, n: int) -> None:
        """Until ``n`` streams have finished (the engines are warm and taking requests)."""
        deadline = time.monotonic() + 300
        while self._count(lambda r: True) < n:
            assert not self.failures and time.monotonic() < deadline, self.failures
            time.sleep(0.1)

    def wait_finished_after(self, moment: float, n: int) -> None:
        """Until ``n`` streams that started after ``moment`` have finished."""
        deadline = time.monotonic() + 600
        while self._count(lambda r: r.started > moment) < n:
            assert time.monotonic() < deadline, (self.failures, len(self.results))
            time.sleep(0.1)


# ---- the Kubernetes example --------------------------------------------------------------------------

K8S = DEPLOY / "k8s"


@functools.cache
def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in k8s_docs() if d["kind"] == kind]  # (the cached documents are only read)


def workloads() -> list[dict]:
    return [d for d in k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_every_service_selects_a_workload_and_its_ports():
    for service in by_kind("Service"):
        selector = service["spec"]["selector"]
        matches = [w for w in workloads()
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert matches, f"service {service['metadata']['name']} selects no pod"
        container_ports = {p["containerPort"] for w in matches for c in w["spec"]["template"]["spec"]["containers"]
                           for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, (service["metadata"]["name"], port)
    for workload in workloads():
        assert workload["spec"]["selector"]["matchLabels"].items() <= \
            workload["spec"]["template"]["metadata"]["labels"].items()


def _env(container: dict) -> dict[str, str]:
    configmap = by_kind("ConfigMap")[0]["data"]
    env = dict(configmap) if container.get("envFrom") else {}
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "<fieldRef>")
    return env


def test_env_references_are_defined_before_use():
    # Kubernetes expands $(VAR) only for variables defined earlier in the same list (or envFrom).
    for workload in workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            defined = set(by_kind("ConfigMap")[0]["data"]) if container.get("envFrom") else set()
            for item in container.get("env", []):
                for ref in re.findall(r"\$\((\w+)\)", item.get("value", "")):
                    assert ref in defined, (container["name"], item["name"], ref)
                defined.add(item["name"])
            for arg in container.get("args", []):
                for ref in re.findall(r"\$\((\w+)\)", arg):
                    assert ref in defined, (container["name"], arg)


def test_worker_runs_the_users_command_with_its_own_cache():
    (worker,) = [w for w in workloads() if w["metadata"]["name"] == "flexkv-worker"]
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "dynamo.vllm"]
    args = container["args"]
    assert args[args.index("--connector") + 1] == "flexkv"
    events = json.loads(args[args.index("--kv-events-config") + 1])
    assert events["enable_kv_cache_events"] is True
    # An endpoint vLLM binds and only this pod reaches (the launcher refuses one nobody would bind).
    assert events_endpoint_problem(events["endpoint"]) is None and events["endpoint"].startswith("ipc://")
    env = _env(container)
    # flexkv_core's configuration accepts every FLEXKV_* setting the manifests give (it refuses unknown ones).
    flexkv = {k: v for k, v in env.items() if k.startswith("FLEXKV_") or k == "ENABLE_FLEXKV"}
    config = load_config(env=flexkv, check_resources=False)
    assert config.server_recv_port == "ipc:///tmp/flexkv_server"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["ssd"]["mountPath"] == env["FLEXKV_SSD_CACHE_DIR"]
    assert mounts["ssd"]["subPathExpr"] == "$(POD_NAME)"  # pods on one node never share an SSD directory
    assert mounts["shm"]["mountPath"] == "/dev/shm" and volumes["shm"]["emptyDir"]["medium"] == "Memory"
    shm_gib = int(volumes["shm"]["emptyDir"]["sizeLimit"].removesuffix("Gi"))
    assert shm_gib > float(env["FLEXKV_CPU_CACHE_GB"])  # the CPU tier lives in /dev/shm
    assert env["DYN_SYSTEM_PORT"] == str(container["readinessProbe"]["httpGet"]["port"])
    assert int(env["DYN_SYSTEM_PORT"]) < 32768
    tp = int(next(a for a in args if a.startswith("--tensor-parallel-size=")).split("=", 1)[1])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == tp  # one GPU per TP rank


def test_frontend_routes_by_kv_with_tier_weights():
    (frontend,) = [w for w in workloads() if w["metadata"]["name"] == "flexkv-frontend"]
    (container,) = frontend["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "dynamo.frontend"]
    args = container["args"]
    assert "--router-mode=kv" in args
    assert any(a.startswith("--migration-limit=") and int(a.split("=")[1].split()[0]) > 0 for a in args)
    assert any(a.startswith("--router-host-cache-hit-weight=") for a in args)
    assert any(a.startswith("--router-disk-cache-hit-weight=") for a in args)
    env = _env(container)
    assert env["DYN_DISCOVERY_BACKEND"] == "etcd" and env["DYN_EVENT_PLANE"] == "nats"
    services = {s["metadata"]["name"] for s in by_kind("Service")}
    assert env["ETCD_ENDPOINTS"].split("//")[1].split(":")[0] in services
    assert env["NATS_SERVER"].split("//")[1].split(":")[0] in services


# ---- deploy/distributed/start_virtual_nodes.sh -------------------------------------------------------

VIRTUAL_NODES = DEPLOY / "distributed" / "start_virtual_nodes.sh"


def virtual_nodes_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("FLEXKV_", "DYN_", "ETCD_", "NATS_"))}


def start_redis(password: str) -> tuple[subprocess.Popen, int]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("needs redis-server and redis-cli on PATH")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--requirepass", password], stdout=subprocess.DEVNULL, start_new_session=True)
    import redis

    client = redis.Redis(port=port, password=password)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.05)
    return proc, port


@pytest.mark.servers
@pytest.mark.slow
def test_virtual_nodes_are_ready_only_when_each_node_sees_the_others(tmp_path):
    """Node keys left in Redis by an earlier run (leases not yet run out) must not count: "ready" means each
    node of this run answers and sees every other node of this run as a peer. Arguments after one -- reach
    the nodes."""
    import redis

    from flexkv_core.client import CacheClient

    password = "pw-virtual-nodes"
    server, port = start_redis(password)
    work = Path(short_tmpdir("fxvn"))
    out_path = work / "script.out"
    script = None
    try:
        stale = redis.Redis(port=port, password=password)
        for node in ("earlier-run-a", "earlier-run-b"):  # as many as the nodes asked for: the old count passed
            stale.hset(f"flexkv:0123abcd:node:{node}", mapping={"addr": "127.0.0.1"})
            stale.expire(f"flexkv:0123abcd:node:{node}", 600)
        with open(out_path, "w") as out:
            script = subprocess.Popen(
                ["bash", str(VIRTUAL_NODES), "--cache-only", "--nodes", "2", "--external-redis", "--redis-port",
                 str(port), "--redis-password", password, "--te-base-port", str(free_port_pair()),
                 "--service-base-port", str(free_port()), "--workdir", str(work), "--python", sys.executable,
                 "--", "--num-layers", "2", "--block-size", "16", "--num-kv-heads", "2", "--head-dim", "64"],
                env={**virtual_nodes_env(), "FLEXKV_CPU_CACHE_GB": "0.05"}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 300
        while "ready: 2 virtual node(s)" not in out_path.read_text():
            assert script.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.2)
        views = []
        for i in range(2):
            with CacheClient(f"ipc://{work}/node_{i}/ipc/flexkv_server", timeout_s=10) as client:
                views.append(client.call("distributed"))
        ids = [view["node_id"] for view in views]
        assert ids[1] in views[0]["peers"] and ids[0] in views[1]["peers"], views
        pids = started_pids(out_path.read_text())
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in pids]
        assert len(cmdlines) == 2 and all("--num-layers 2 --block-size 16" in c for c in cmdlines), cmdlines
        script.send_signal(signal.SIGTERM)
        assert script.wait(120) == 143, out_path.read_text()
        assert not [p for p in pids if group_alive(p)]
    finally:
        if script is not None:
            stop_script(script, out_path)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


def free_port_pair() -> int:
    """A port P with P and P+1 free (a transfer engine takes two)."""
    for _ in range(100):
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports")


@pytest.mark.dynamo
@pytest.mark.servers
@pytest.mark.slow
def test_virtual_nodes_pass_worker_arguments_after_one_dash(tmp_path):
    """Engine mode: `start_virtual_nodes.sh --model M -- --max-model-len 512` gives dynamo.vllm those flags
    (earlier it took them as single_node.sh options and failed with "unknown option"). The worker here is a
    stand-in that prints its arguments and exits, so the launcher stops with its cause."""
    password = "pw-virtual-nodes-2"
    server, port = start_redis(password)
    work = Path(short_tmpdir("fxvd"))
    try:
        env = {**virtual_nodes_env(), "PYTHONPATH": str(_fake_worker_dir(tmp_path)), "FLEXKV_CPU_CACHE_GB": "0.05"}
        out = run_script(str(VIRTUAL_NODES), "--model", "m", "--nodes", "1", "--external-redis", "--redis-port",
                         str(port), "--redis-password", password, "--http-base-port", str(free_port()),
                         "--system-base-port", str(20000 + os.getpid() % 5000 * 2), "--workdir", str(work),
                         "--python", sys.executable, "--node-arg", "--launcher", "--node-arg", "dynamo",
                         "--", "--max-model-len", "512", env=env, timeout=300)
        assert out.returncode == 1, out.stderr
        log = (work / "node_0" / "logs" / "worker_0.log").read_text()
        assert re.search(r"fake worker \[.*'--max-model-len', '512'", log), log
        assert "unknown option" not in out.stderr
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
