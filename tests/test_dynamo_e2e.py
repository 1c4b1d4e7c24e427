"""End to end: Dynamo's KV router in front of two ``python -m dynamo.vllm --connector flexkv`` workers.

The command is the one users type (`support.make_hook_venv`'s throwaway virtualenv has the hook
installed, as scripts/setup.sh installs it), on the tiny model, with file discovery and the ZMQ event
plane on loopback (no etcd/NATS). One frontend and two workers are shared by the module (about three
minutes to start on two busy cores). What it proves:

* the hook's translation reaches Dynamo and vLLM: our connector runs, KV events are enabled on the
  endpoint the hook picked, and Dynamo's relay subscribes to it;
* a chat request through the frontend returns text;
* a prefix that only one worker holds, in our CPU tier alone (pushed out of its GPU cache by other
  prompts), is routed to that worker (the router's own log line shows the host-tier blocks it counted)
  and served from our tier (the worker's cache reports the hits; the answer is the same as the first).

Also here, without an engine: Dynamo's own argument parser accepts the translated command lines, and
``python -m flexkv_dynamo.vllm`` (no hook) runs Dynamo's real ``dynamo.vllm`` up to its parser.

Process logs go to the module's temporary directory; a failing test prints their tails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest
from dynamo_cluster import (
    Proc,
    Workdir,
    cache_call,
    complete,
    cpu_counts,
    flexkv_status_cli,
    stop_all,
    wait_until_serving,
)
from support import (
    BLOCK_SIZE,
    GPU_BLOCKS,
    base_env,
    free_port,
    http_json,
    tiny_worker_args,
    wait_for,
    write_torchvision_shim,
)

from flexkv_dynamo.launch_args import free_port_block, translate
from flexkv_dynamo.tiny_model import words


@dataclass
class Cluster:
    url: str
    model: str
    frontend: Proc
    workers: list[Proc]
    cache_endpoints: list[str]
    system_ports: list[int]  # each worker's Dynamo system server (health, engine routes)

    def complete(self, prompt: str, max_tokens: int = 4) -> dict[str, Any]:
        return complete(self.url, self.model, prompt, max_tokens)

    def logs(self) -> str:
        return "\n".join(p.tail() for p in [self.frontend, *self.workers])


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    pytest.importorskip("dynamo.llm")
    pytest.importorskip("vllm")
    workdir, shim, hook_python, template = Workdir.make("fxe2e")
    env = base_env(workdir, shim)
    http_port = free_port()
    procs: list[Proc] = []
    try:
        frontend = Proc.start("frontend", [sys.executable, "-m", "dynamo.frontend", "--router-mode", "kv",
                                           "--http-host", "127.0.0.1", "--http-port", str(http_port),
                                           "--migration-limit", "3"],  # as the launchers run it
                              env, workdir / "frontend.log")
        procs.append(frontend)
        workers, endpoints, system_ports = [], [], []
        for i in range(2):
            endpoint = f"ipc://{workdir}/flexkv_server_{i}"
            system_ports.append(free_port_block())  # Dynamo wants it below 32768
            worker_env = {**env, "FLEXKV_SERVER_RECV_PORT": endpoint, "DYN_SYSTEM_PORT": str(system_ports[-1])}
            argv = [str(hook_python), "-m", "dynamo.vllm", "--model", tiny_model_dir, "--connector", "flexkv",
                    *tiny_worker_args(tiny_model_dir, template)]
            workers.append(Proc.start(f"worker {i}", argv, worker_env, workdir / f"worker_{i}.log"))
            endpoints.append(endpoint)
        procs += workers
        url = f"http://127.0.0.1:{http_port}"
        model = wait_until_serving(url, procs, workers=2, timeout=540)
        yield Cluster(url, model, frontend, workers, endpoints, system_ports)
    finally:
        stop_all(procs)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.engine
@pytest.mark.dynamo
@pytest.mark.slow
def test_hook_translation_reaches_dynamo_and_vllm(cluster):
    for worker in cluster.workers:
        log = worker.text()
        assert "--connector flexkv: using --kv-transfer-config" in log, worker.tail()
        assert "FlexKV connector (scheduler side) ready" in log, worker.tail()
        port = re.search(r"KV events enabled for the router on tcp://\*:(\d+)", log)
        assert port, worker.tail()
        # Dynamo's relay subscribes to the endpoint the hook chose: our tiers' events reach the router.
        assert f"subscribing to vLLM at tcp://127.0.0.1:{port.group(1)}" in log, worker.tail()


@pytest.mark.engine
@pytest.mark.dynamo
@pytest.mark.slow
def test_chat_request_through_the_frontend_returns_text(cluster):
    answer = http_json(f"{cluster.url}/v1/chat/completions",
                       {"model": cluster.model, "messages": [{"role": "user", "content": words(12)}],
                        "max_tokens": 8, "temperature": 0})
    text = answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] == 8
    assert re.fullmatch(r"( ?w\d+){8}", text), text  # the tiny model's words


@pytest.mark.engine
@pytest.mark.dynamo
@pytest.mark.slow
def test_prefix_only_in_one_workers_cpu_tier_is_routed_there_and_served_from_it(cluster):
    prompt = words(8 * BLOCK_SIZE, start=11)  # 8 full blocks
    start = [cpu_counts(e)[0] for e in cluster.cache_endpoints]
    first = cluster.complete(prompt)
    # Stores are copied and published a step after the request's last one: wait for both workers to settle.
    wait_for(lambda: settled(cluster) and sum(cpu_counts(e)[0] for e in cluster.cache_endpoints) - sum(start) >= 8,
             60, "the prompt's blocks stored")
    before = [cpu_counts(e) for e in cluster.cache_endpoints]
    new_blocks = [before[i][0] - start[i] for i in range(2)]
    assert sorted(new_blocks) == [0, 8], f"the prompt's 8 blocks should be stored by one worker: {new_blocks}"
    holder = new_blocks.index(8)
    other = 1 - holder

    # Push the prefix out of the holder's GPU cache: once the holder has allocated more blocks than its
    # GPU cache has since the prefix finished, none of the prefix's GPU blocks is left (vLLM evicts free
    # blocks least recently used first). Our CPU tier keeps them.
    target = before[holder][0] + GPU_BLOCKS + 8
    for k in range(60):
        if cpu_counts(cluster.cache_endpoints[holder])[0] >= target:
            break
        cluster.complete(words(8 * BLOCK_SIZE, start=1000 + 37 * k), max_tokens=1)
    else:
        raise AssertionError(f"worker {holder} never stored {target} blocks:\n{cluster.logs()}")
    wait_for(lambda: settled(cluster), 60, "both workers idle")
    hits_before = [cpu_counts(e)[1] for e in cluster.cache_endpoints]

    again = cluster.complete(prompt)

    wait_for(lambda: settled(cluster), 60, "both workers idle")
    hits_after = [cpu_counts(e)[1] for e in cluster.cache_endpoints]
    # Served from our CPU tier on the holder: 8 blocks loaded there, none on the other worker.
    assert hits_after[holder] - hits_before[holder] == 8, (hits_before, hits_after, cluster.logs())
    assert flexkv_status_cli(cluster.cache_endpoints[holder])["status"]["metrics"]["hit_blocks"]["cpu"] == hits_after[holder]
    assert hits_after[other] == hits_before[other]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 8 * BLOCK_SIZE
    assert again["choices"][0]["text"] == first["choices"][0]["text"]  # loaded KV gives the same answer

    # The router chose the holder because of our host-tier blocks: its decision log names them.
    holder_id = re.search(r"KvEventPublisher for worker (\d+)", cluster.workers[holder].text()).group(1)
    request_id = again["id"].split("-", 1)[1]
    decision = [line for line in cluster.frontend.text().splitlines()
                if "Selected worker" in line and request_id in line]
    assert decision, f"no routing decision logged for {request_id}:\n{cluster.frontend.tail()}"
    assert f"worker_id={holder_id}" in decision[0] and "host_pinned_blocks=8" in decision[0], decision[0]


def settled(cluster: Cluster) -> bool:
    """No job of ours in flight on any worker (stores and loads end a step or more after their request)."""
    return all(not any(cache_call(e, "in_flight").values()) for e in cluster.cache_endpoints)


def tier_blocks(endpoint: str) -> int:
    tiers = cache_call(endpoint, "status")["tiers"]
    return sum(t["ready_blocks"] for t in tiers.values())


@pytest.mark.engine
@pytest.mark.dynamo
@pytest.mark.slow
def test_dynamos_cache_flush_after_a_weight_update_empties_our_tiers(cluster):
    """Dynamo's RL ``flush_cache`` (like its weight updates and LoRA hot-swaps) resets vLLM's prefix cache
    without asking connectors: KV computed before must not come back from our tiers either."""
    # A prompt no other test of the module sent (words wrap at the tiny vocabulary: start=3000 was the first
    # filler prompt of the routing test again, so its blocks were already in our tiers and this test did not
    # wait for its own store).
    prompt = words(4 * BLOCK_SIZE, start=500)
    start = sum(cpu_counts(e)[0] for e in cluster.cache_endpoints)
    first = cluster.complete(prompt)
    wait_for(lambda: settled(cluster) and sum(cpu_counts(e)[0] for e in cluster.cache_endpoints) - start == 4, 60,
             "the prompt's blocks stored")
    for port in cluster.system_ports:
        answer = http_json(f"http://127.0.0.1:{port}/engine/flush_cache", {}, timeout=60)
        assert answer["status"] == "ok", answer
    assert [tier_blocks(e) for e in cluster.cache_endpoints] == [0, 0], cluster.logs()
    hits = [cpu_counts(e)[1] for e in cluster.cache_endpoints]
    again = cluster.complete(prompt)
    assert [cpu_counts(e)[1] for e in cluster.cache_endpoints] == hits  # recomputed, nothing loaded from us
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert "also clear FlexKV's tiers" in cluster.workers[0].text()


# ---- Dynamo's parser accepts what the hook produces (no engine) -------------------------------------


@pytest.mark.dynamo
@pytest.mark.slow
@pytest.mark.parametrize("connectors", [["flexkv"], ["flexkv", "nixl"]])
def test_dynamo_parses_the_translated_command(tiny_model_dir, connectors):
    args_mod = pytest.importorskip("dynamo.vllm.args")
    plan = translate(["--model", tiny_model_dir, "--connector", *connectors, "--block-size", "32"], {},
                     pick_port=lambda count: 20555)
    config = args_mod.parse_args(plan.args)
    kv = config.engine_args.kv_transfer_config
    assert kv.kv_load_failure_policy == "recompute"
    if connectors == ["flexkv"]:
        assert (kv.kv_connector, kv.kv_connector_module_path) == ("FlexKVConnector", "flexkv_dynamo.connector")
    else:
        assert kv.kv_connector == "MultiConnector"
        names = [c["kv_connector"] for c in kv.kv_connector_extra_config["connectors"]]
        assert names == ["NixlConnector", "FlexKVConnector"]
        # Dynamo's P/D logic finds the transport child inside it.
        from dynamo.vllm.kv_connector_protocols import NixlConnectorProtocol, make_kv_connector_protocol

        class _VllmConfig:
            kv_transfer_config = kv

        assert isinstance(make_kv_connector_protocol(_VllmConfig()), NixlConnectorProtocol)
    assert config.engine_args.kv_events_config.enable_kv_cache_events
    assert config.engine_args.kv_events_config.endpoint == "tcp://*:20555"
    assert config.use_kv_events  # Dynamo will relay this worker's KV events to the router


@pytest.mark.dynamo
@pytest.mark.slow
def test_explicit_launcher_runs_dynamos_own_main(tiny_model_dir, tmp_path):
    """``python -m flexkv_dynamo.vllm`` runs the real ``dynamo.vllm`` (here up to its argument parser:
    ``--help``), and the translation is logged through the logging Dynamo configured."""
    pytest.importorskip("dynamo.vllm")
    env = base_env(tmp_path, write_torchvision_shim(tmp_path / "shim"))
    out = subprocess.run([sys.executable, "-m", "flexkv_dynamo.vllm", "--model", tiny_model_dir, "--help"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--kv-transfer-config" in out.stdout and "Dynamo vLLM worker configuration" in out.stdout
    log = re.sub(r"\x1b\[[0-9;]*m", "", out.stderr)
    assert re.search(r"INFO .*--connector flexkv: using --kv-transfer-config", log), log[-3000:]
    assert "KV events enabled for the router on tcp://*:" in log
