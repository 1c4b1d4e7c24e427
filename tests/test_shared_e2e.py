"""End to end: two ``python -m dynamo.vllm --connector flexkv`` workers sharing one node's tiers.

A real ``flexkv serve`` owner holds the CPU pool and SSD store; both workers attach to it with
``FLEXKV_SHARE_SERVER=1`` (``FLEXKV_INSTANCE_NUM=2``, ids 0 and 1) at the same FLEXKV_SERVER_RECV_PORT.
Dynamo's frontend alternates between them (``--router-mode round-robin``: the test decides which worker
serves what; the router's per-tier credit for shared blocks is tested against the real KvRouter in
tests/test_shared_tiers.py). On the tiny model, file discovery, ZMQ event plane, loopback.

What it proves: a prompt one worker computed is served by the other from the shared CPU tier, with the
same answer; when the owner is killed the workers keep answering (recomputing) and never hang; a
restarted owner is attached again, warm from SSD, and serves the prompt to both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time

import dynamo_cluster
import pytest
from dynamo_cluster import Proc, Workdir, stop_all, wait_until_serving
from support import (
    BLOCK_SIZE,
    base_env,
    free_port,
    nothing_pending,
    tiny_worker_args,
    wait_for,
)

from flexkv_core.client import CacheClient
from flexkv_dynamo.launch_args import free_port_block
from flexkv_dynamo.tiny_model import words

PROMPT_BLOCKS = 8


def owner_status(endpoint: str) -> dict:
    with CacheClient(endpoint, timeout_s=10) as client:
        return client.call("status")


def sessions(endpoint: str) -> dict[int, dict]:
    return {s["instance_id"]: s for s in owner_status(endpoint)["shared"]["sessions"]}


@pytest.fixture(scope="module")
def node(tiny_model_dir):
    pytest.importorskip("dynamo.llm")
    pytest.importorskip("vllm")
    workdir, shim, hook_python, template = Workdir.make("fxsh")
    endpoint = f"ipc://{workdir}/flexkv_node"
    env = {**base_env(workdir, shim), "FLEXKV_SERVER_RECV_PORT": endpoint, "FLEXKV_SHARE_SERVER": "1",
           "FLEXKV_INSTANCE_NUM": "2", "FLEXKV_SSD_CACHE_GB": "0.25", "FLEXKV_SSD_CACHE_DIR": str(workdir / "ssd")}
    http_port = free_port()
    procs: list[Proc] = []
    owner_argv = [str(hook_python), "-m", "flexkv_core.cli", "serve"]
    try:
        owner = Proc.start("owner", owner_argv, env, workdir / "owner.log")
        procs.append(owner)
        frontend = Proc.start("frontend", [sys.executable, "-m", "dynamo.frontend", "--router-mode", "round-robin",
                                           "--http-host", "127.0.0.1", "--http-port", str(http_port)],
                              env, workdir / "frontend.log")
        procs.append(frontend)
        for i in range(2):
            worker_env = {**env, "FLEXKV_INSTANCE_ID": str(i), "DYN_SYSTEM_PORT": str(free_port_block())}
            argv = [str(hook_python), "-m", "dynamo.vllm", "--model", tiny_model_dir, "--connector", "flexkv",
                    *tiny_worker_args(tiny_model_dir, template)]
            procs.append(Proc.start(f"worker {i}", argv, worker_env, workdir / f"worker_{i}.log"))
        url = f"http://127.0.0.1:{http_port}"
        model = wait_until_serving(url, procs, workers=2, timeout=540)
        state = {"url": url, "model": model, "endpoint": endpoint, "procs": procs, "owner": owner,
                 "owner_argv": owner_argv, "env": env, "workdir": workdir}
        yield state
    finally:
        stop_all(procs)
        respawned = locals().get("state", {}).get("respawned_pid")
        if respawned is not None:  # an owner a worker started lives in a session of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(respawned, signal.SIGTERM)
        shutil.rmtree(workdir, ignore_errors=True)


def complete(node, prompt: str) -> dict:
    return dynamo_cluster.complete(node["url"], node["model"], prompt)


def logs(node) -> str:
    return "\n".join(p.tail() for p in node["procs"])


@pytest.mark.engine
@pytest.mark.dynamo
@pytest.mark.slow
def test_a_prompt_one_worker_computed_is_served_by_the_other_from_the_shared_tier(node):
    endpoint = node["endpoint"]
    wait_for(lambda: sorted(sessions(endpoint)) == [0, 1], 60, "both workers' sessions")
    prompt = words(PROMPT_BLOCKS * BLOCK_SIZE, start=21)
    before = sessions(endpoint)
    first = complete(node, prompt)
    wait_for(lambda: sum(s["stored_blocks"] for s in sessions(endpoint).values())
             - sum(s["stored_blocks"] for s in before.values()) >= PROMPT_BLOCKS, 30, "the prompt's blocks stored")
    stored = {i: s["stored_blocks"] - before[i]["stored_blocks"] for i, s in sessions(endpoint).items()}
    computer = max(stored, key=stored.get)
    other = 1 - computer
    assert stored[computer] == PROMPT_BLOCKS and stored[other] == 0, stored

    again = complete(node, prompt)  # round-robin: the other worker, whose GPU cache never saw the prompt

    loaded = {i: s["loaded_blocks"] - before[i]["loaded_blocks"] for i, s in sessions(endpoint).items()}
    assert loaded == {computer: 0, other: PROMPT_BLOCKS}, (loaded, logs(node))
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == PROMPT_BLOCKS * BLOCK_SIZE
    assert again["choices"][0]["text"] == first["choices"][0]["text"]


@pytest.mark.engine
@pytest.mark.dynamo
@pytest.mark.slow
def test_owner_death_costs_no_request_and_a_restarted_owner_serves_warm_from_ssd(node):
    endpoint = node["endpoint"]
    prompt = words(PROMPT_BLOCKS * BLOCK_SIZE, start=400)
    node["epoch"] = _epoch(endpoint)
    # Earlier tests' blocks are on SSD too: count this prompt's from a quiet owner, so that the kill below
    # cannot come before its write-back did (a block READY on SSD is in the manifest: it survives a kill -9).
    wait_for(lambda: nothing_pending(owner_status(endpoint)), 30, "earlier stores and write-backs finished")
    before = sessions(endpoint)
    ssd_before = owner_status(endpoint)["tiers"]["ssd"]["ready_blocks"]
    first = complete(node, prompt)  # computed by one worker: in its GPU cache and in the shared tiers
    wait_for(lambda: nothing_pending(status := owner_status(endpoint))
             and status["tiers"]["ssd"]["ready_blocks"] >= ssd_before + PROMPT_BLOCKS, 30,
             "the prompt's blocks written back to SSD")
    stored = {i: s["stored_blocks"] - before[i]["stored_blocks"] for i, s in sessions(endpoint).items()}
    assert sorted(stored.values()) == [0, PROMPT_BLOCKS], stored
    computer = max(stored, key=stored.get)
    owner = node["owner"]
    os.killpg(owner.popen.pid, signal.SIGKILL)
    owner.popen.wait(10)
    killed = time.monotonic()
    # Both workers keep answering while the owner is away (other prompts, recomputed): no hang, no error.
    for k in range(2):
        other = words(PROMPT_BLOCKS * BLOCK_SIZE, start=900 + 50 * k)
        assert len(complete(node, other)["choices"][0]["text"]) > 0
    print(f"two requests answered {time.monotonic() - killed:.1f} s after the owner was killed")
    for p in node["procs"][1:]:
        assert p.alive(), p.tail()

    # The worker with FLEXKV_INSTANCE_ID=0 starts a new owner (as upstream FlexKV's instance 0 does); both
    # workers attach to it.
    # Attached, and each worker's mirror holds the new owner's snapshot (else its lookups miss and it recomputes).
    wait_for(lambda: _epoch(endpoint) not in (None, node["epoch"]) and sorted(sessions(endpoint)) == [0, 1]
             and all(s["synced"] for s in sessions(endpoint).values()), 60, "both workers attached to a new owner")
    node["respawned_pid"] = _whoami(endpoint)["pid"]
    assert owner_status(endpoint)["tiers"]["ssd"]["ready_blocks"] >= ssd_before + PROMPT_BLOCKS, "not warm from SSD"
    # Round-robin sends the prompt to the worker whose GPU cache never held it within a few requests: that
    # worker loads it from the new owner's SSD tier. (The worker that computed it hits its GPU cache.)
    for _ in range(4):
        answer = complete(node, prompt)
        assert answer["choices"][0]["text"] == first["choices"][0]["text"]
        loaded = {i: s["loaded_blocks"] for i, s in sessions(endpoint).items()}
        if loaded[1 - computer]:
            break
    status = owner_status(endpoint)
    # (The worker that computed it may load the prompt's last block too: vLLM's own hit stops one token
    # short of a prompt that fills its last block.)
    assert loaded[1 - computer] == PROMPT_BLOCKS, (loaded, status["metrics"], logs(node))
    assert status["metrics"]["hit_blocks"]["ssd"] == sum(loaded.values()), status["metrics"]


def _whoami(endpoint: str) -> dict:
    with CacheClient(endpoint, timeout_s=2) as client:
        return client.call("whoami")


def _epoch(endpoint: str) -> str | None:
    try:
        return owner_status(endpoint)["shared"]["epoch"]
    except Exception:  # noqa: BLE001 - nobody answers yet
        return None
