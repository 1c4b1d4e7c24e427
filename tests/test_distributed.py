"""Distributed reuse across nodes: a real Redis, real Mooncake transfer engines over TCP, node processes.

Each node is a separate process (this file run as a script: ``python tests/test_distributed.py node
SPEC``) holding a real `TieredCache`, an "engine" of torch KV planes copied through `BlockCopier`, and a
`DistributedNode`. The test drives it over a small control service (the project's own CacheService on
an ipc socket): store a prompt, look it up, load it, describe the node. Byte identity is checked with
xxh3 digests of the engine blocks that were stored on one node and loaded on another.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from support import RedisServer, free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
PASSWORD = RedisServer.PASSWORD
SMALL = {"num_layers": 2, "block_size": 16, "num_kv_heads": 2, "head_dim": 64, "dtype": "float16"}  # 16 KiB
BIG = {"num_layers": 8, "block_size": 64, "num_kv_heads": 8, "head_dim": 128, "dtype": "float16"}  # 2 MiB
LEASE_S = 3.0
SNAPSHOT_S = 0.25

pytestmark = [pytest.mark.servers]


# ------------------------------------------------------------------------------------------------------
# servers and node processes


class Node:
    """One node process and its control client."""

    def __init__(self, workdir: Path, name: str, redis_port: int, *, layout=SMALL, cpu_blocks=64,
                 password: str = PASSWORD, **config) -> None:
        from flexkv_core.client import CacheClient

        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.control_dir = tempfile.mkdtemp(prefix="fkvd", dir="/tmp")  # ipc paths must stay short
        self.control = f"ipc://{self.control_dir}/ctl.sock"
        slot = _layout(layout).slot_bytes
        cfg = {"enable_distributed": True, "redis_port": redis_port, "redis_password": password,
               "cpu_cache_gb": cpu_blocks * slot / GiB, "enable_metrics": False, "dist_lease_s": LEASE_S,
               "dist_snapshot_interval_s": SNAPSHOT_S, "dist_timeout_s": 2.0,
               "server_recv_port": f"ipc://{self.dir}/svc.sock", **config}
        spec = {"config": cfg, "layout": layout, "control": self.control, "name": name}
        self.log = open(self.dir / "node.log", "wb")
        # Its own process group: the node and its transfer-engine helper process freeze and die together.
        self.proc = subprocess.Popen([sys.executable, __file__, "node", json.dumps(spec)], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = CacheClient(self.control, timeout_s=30)
        self.name = name

    def wait_ready(self) -> Node:
        deadline = time.monotonic() + 90
        while not os.path.exists(self.control[len("ipc://"):]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name} did not start:\n{self.output()}")
            time.sleep(0.05)
        return self

    def call(self, method: str, **args):
        return self.client.call(method, **args)

    def output(self) -> str:
        self.log.flush()
        return (self.dir / "node.log").read_text(errors="replace")[-5000:]

    def signal(self, sig: int) -> None:
        """Signal the node's whole process group (the node and its transfer-engine process)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def ask_to_exit(self) -> None:
        self.signal(signal.SIGCONT)  # a test may have left it frozen
        if self.proc.poll() is None:
            from flexkv_core.client import CacheClient

            try:
                with CacheClient(self.control, timeout_s=5) as client:
                    client.call("exit")
            except Exception:  # noqa: BLE001 - stop() kills it
                pass

    def stop(self) -> None:
        self.ask_to_exit()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
        self.client.close()
        self.log.close()
        shutil.rmtree(self.control_dir, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    """Start Redis and nodes on demand; everything is torn down after the test."""
    started: list = []

    class Cluster:
        def redis(self, **kw) -> RedisServer:
            server = RedisServer(**kw)
            started.append(server)
            return server

        def nodes(self, names: str, redis_port: int, **kw) -> list[Node]:
            """Start several nodes at once (each takes seconds, mostly importing torch)."""
            nodes = [Node(tmp_path, name, redis_port, **kw) for name in names.split()]
            started.extend(nodes)
            return [node.wait_ready() for node in nodes]

    yield Cluster()
    nodes = [thing for thing in started if isinstance(thing, Node)]
    for node in nodes:  # all at once, then wait
        node.ask_to_exit()
    for node in nodes:
        node.stop()
    for thing in started:
        if isinstance(thing, RedisServer):
            thing.kill()
    from flexkv_core.tiers.cpu import CpuPool

    CpuPool.remove_stale("flexkv-dist-test-")  # the CPU pools of nodes the test killed


def fingerprint(layout=SMALL) -> str:
    from flexkv_core.layout import CacheIdentity

    return CacheIdentity(model="dist-test", layout=_layout(layout)).fingerprint()


# ------------------------------------------------------------------------------------------------------
# tests


@pytest.mark.slow
def test_a_prefix_stored_on_one_node_loads_byte_identical_on_another_and_dies_with_its_node(cluster):
    redis_server = cluster.redis().start()
    a, b = cluster.nodes("a b", redis_server.port)
    stored = a.call("store", prompt=1, n_blocks=6)
    hashes = stored["hashes"]
    # A checksums what it stored in the background, so lending it later costs no hashing.
    wait_for(lambda: a.call("describe")["stats"]["checksummed_ahead"] == 6, 5, "A to checksum its blocks")

    # Visible to B within the snapshot interval (plus A's publishing tick).
    t0 = time.monotonic()
    wait_for(lambda: b.call("lookup", hashes=hashes)["remote"] == 6, 2 + SNAPSHOT_S, "B to see A's prefix")
    assert time.monotonic() - t0 < 1 + SNAPSHOT_S

    loaded = b.call("load", hashes=hashes)
    assert loaded["n"] == 6
    assert loaded["digests"] == stored["digests"]  # the engine bytes, exactly
    info = b.call("describe")
    assert info["stats"]["fetched_blocks"] == 6 and info["stats"]["checksum_mismatches"] == 0
    # Kept by B as its own CPU blocks: a local hit now, and published as B's.
    assert b.call("lookup", hashes=hashes)["cpu"] == 6
    r = redis_server.client()
    prefix = f"flexkv:{fingerprint()}"
    b_blocks = f"{prefix}:blocks:{b.call('describe')['node_id']}"
    wait_for(lambda: all(r.sismember(b_blocks, str(h)) for h in hashes), 2, "B to publish what it kept")

    # A prompt only A holds, then A dies without a word.
    other = a.call("store", prompt=2, n_blocks=4)["hashes"]
    wait_for(lambda: b.call("lookup", hashes=other)["remote"] == 4, 2 + SNAPSHOT_S, "B to see prompt 2")
    a_id = a.call("describe")["node_id"]
    assert r.exists(f"{prefix}:node:{a_id}", f"{prefix}:blocks:{a_id}") == 2
    a.kill()
    t0 = time.monotonic()
    loaded = b.call("load", hashes=other)  # A's service does not answer: recompute, after one timeout
    assert loaded["n"] == 0
    assert time.monotonic() - t0 < 2.0 + 2
    # A's keys leave Redis within its lease, and B's view drops it.
    wait_for(lambda: r.exists(f"{prefix}:node:{a_id}", f"{prefix}:blocks:{a_id}", f"{prefix}:log:{a_id}") == 0,
             LEASE_S + 1, "A's keys to expire")
    wait_for(lambda: a_id not in b.call("describe")["peers"], 2 * SNAPSHOT_S + 1, "B to drop A")
    assert b.call("lookup", hashes=other)["total"] == 0
    # B still serves what it kept.
    assert b.call("load", hashes=hashes)["digests"] == stored["digests"]


def flexkv_status(node: Node) -> tuple[str, dict]:
    """``flexkv status`` against the node's cache endpoint, as an operator types it: (text, --json)."""
    endpoint = f"ipc://{node.dir}/svc.sock"
    runs = [subprocess.run([sys.executable, "-m", "flexkv_core.cli", "status", "--endpoint", endpoint, *extra],
                           capture_output=True, text=True, timeout=60, cwd=ROOT) for extra in ([], ["--json"])]
    for run in runs:
        assert run.returncode == 0, run.stderr
    return runs[0].stdout, json.loads(runs[1].stdout)


@pytest.mark.slow
def test_flexkv_status_shows_peers_and_the_blocks_fetched_and_lent(cluster):
    redis_server = cluster.redis().start()
    a, b = cluster.nodes("a b", redis_server.port)
    stored = a.call("store", prompt=7, n_blocks=5)
    wait_for(lambda: b.call("lookup", hashes=stored["hashes"])["remote"] == 5, 2 + SNAPSHOT_S, "B to see A's")
    assert b.call("load", hashes=stored["hashes"])["n"] == 5
    a_id, b_id = a.call("describe")["node_id"], b.call("describe")["node_id"]

    text, answer = flexkv_status(b)
    view = answer["distributed"]
    assert view["peers"] == [a_id] and view["stats"]["fetched_blocks"] == 5 and view["stats"]["lent_blocks"] == 0
    assert f"peers: 1 ({a_id})" in text and "fetched: 5 blocks" in text and "lent: 0 blocks" in text
    # A lent them (B keeps its copies: A's own view of B follows B's publishing).
    wait_for(lambda: flexkv_status(a)[1]["distributed"]["peers"] == [b_id], 2 + SNAPSHOT_S, "A to see B")
    text, answer = flexkv_status(a)
    assert answer["distributed"]["stats"]["lent_blocks"] == 5 and answer["distributed"]["stats"]["exports"] >= 1
    assert "lent: 5 blocks" in text and "fetched: 0 blocks" in text


@pytest.mark.slow
def test_a_peer_that_dies_freezes_or_stops_costs_a_request_no_multi_second_stall(cluster, capsys):
    """A request needing blocks only a gone peer holds recomputes at once: a closed port refuses the export
    call, a frozen node stops answering heartbeats (`PEER_LIVENESS_S`), a stopped node says goodbye (and
    one that is killed has its goodbye process say it). The lease (30 s) and the call timeout (10 s) are
    long here, so neither can explain a short stall; before this, each case cost the whole timeout."""
    from flexkv_core.distributed.node import PEER_LIVENESS_S

    timeout_s, lease_s = 10.0, 30.0
    redis_server = cluster.redis().start()
    r = redis_server.client()
    prefix = f"flexkv:{fingerprint()}"
    (b,) = cluster.nodes("b", redis_server.port, dist_timeout_s=timeout_s, dist_lease_s=lease_s)
    stalls = {}
    for k, how in enumerate(("SIGKILL", "SIGSTOP", "SIGTERM")):
        (a,) = cluster.nodes(f"a{k}", redis_server.port, dist_timeout_s=timeout_s, dist_lease_s=lease_s)
        a_id = a.call("describe")["node_id"]
        hashes = a.call("store", prompt=20 + k, n_blocks=4)["hashes"]
        wait_for(lambda h=hashes: b.call("lookup", hashes=h)["remote"] == 4, 5, f"B to see a{k}'s blocks")
        if how == "SIGTERM":
            a.signal(signal.SIGTERM)
            a.proc.wait(timeout=30)
        else:
            a.signal(getattr(signal, how))
        t0 = time.monotonic()
        assert b.call("load", hashes=hashes)["n"] == 0  # recomputed
        stalls[how] = time.monotonic() - t0
        assert stalls[how] < timeout_s / 4, (how, stalls[how])
        assert b.call("lookup", hashes=hashes)["remote"] == 0  # and no further request tries it
        if how == "SIGSTOP":
            a.signal(signal.SIGCONT)
            a.kill()
        # Gone from Redis long before its lease: its goodbye (killed) or its own close (SIGTERM) said so.
        keys = [f"{prefix}:node:{a_id}", f"{prefix}:blocks:{a_id}", f"{prefix}:log:{a_id}"]
        t0 = time.monotonic()
        wait_for(lambda keys=keys: r.exists(*keys) == 0, lease_s / 3, f"a{k}'s keys to leave Redis")
        left = time.monotonic() - t0
        wait_for(lambda a_id=a_id: a_id not in b.call("describe")["peers"], 2 + SNAPSHOT_S, f"B to drop a{k}")
        with capsys.disabled():
            print(f"\n{how}: request stall {stalls[how] * 1000:.0f} ms (call timeout {timeout_s:g} s, peer "
                  f"liveness {PEER_LIVENESS_S:g} s); keys left Redis {left * 1000:.0f} ms after the load")


@pytest.mark.slow
def test_a_node_that_does_not_verify_checksums_still_gets_and_lends_the_exact_bytes(cluster):
    redis_server = cluster.redis().start()
    (a,) = cluster.nodes("a", redis_server.port, dist_verify=False)
    (b,) = cluster.nodes("b", redis_server.port)
    from_a = a.call("store", prompt=3, n_blocks=5)
    from_b = b.call("store", prompt=4, n_blocks=4)
    wait_for(lambda: b.call("lookup", hashes=from_a["hashes"])["remote"] == 5, 2 + SNAPSHOT_S, "B to see A's")
    wait_for(lambda: a.call("lookup", hashes=from_b["hashes"])["remote"] == 4, 2 + SNAPSHOT_S, "A to see B's")
    assert b.call("load", hashes=from_a["hashes"])["digests"] == from_a["digests"]  # B verified A's sums
    assert a.call("load", hashes=from_b["hashes"])["digests"] == from_b["digests"]  # A checked nothing
    a_stats, b_stats = a.call("describe")["stats"], b.call("describe")["stats"]
    assert a_stats["fetched_blocks"] == 4 and b_stats["fetched_blocks"] == 5
    assert a_stats["checksummed_ahead"] == 0  # no one-pass hashing on a node that does not verify
    assert b_stats["checksum_mismatches"] == 0


@pytest.mark.slow
def test_a_serving_node_that_freezes_or_dies_mid_transfer_is_a_miss_not_a_hang(cluster):
    redis_server = cluster.redis().start()
    n = 96  # 192 MiB: long enough over loopback TCP to be interrupted
    a, b = cluster.nodes("a b", redis_server.port, layout=BIG, cpu_blocks=n + 8)
    stored = a.call("store", prompt=3, n_blocks=n)
    hashes = stored["hashes"]

    def interrupted_load(action, when_granted: bool = True) -> dict:
        # (B keeps what it fetched before: its own prefix plus what A serves)
        wait_for(lambda: b.call("lookup", hashes=hashes)["total"] == n, 10, "B to see A's blocks")
        grants = b.call("describe")["stats"]["grants"]
        if not when_granted:
            action()
        b.call("load_start", hashes=hashes)
        if when_granted:
            # The moment A granted the export, B's transfer engine is reading: interrupt it.
            wait_for(lambda: b.call("describe")["stats"]["grants"] > grants, 10, "A to grant", interval=0.002)
            action()
        t0 = time.monotonic()
        result = wait_for(lambda: b.call("load_result"), 15, "B's load to end")
        # Bounded by the lease (the read's deadline) or the transfer engine's stall timeout (dist_timeout_s).
        assert time.monotonic() - t0 < LEASE_S + 2
        assert result["n"] < n, "the transfer finished before A was interrupted: make it longer"
        # Whatever B did accept is A's bytes exactly.
        assert result["digests"] == stored["digests"][:result["n"]]
        return result

    # A's transfer engine stops answering before B ever talked to it: B's engine hangs in Mooncake's
    # handshake (it has no timeout), so B replaces its engine process at the read's deadline.
    engine = b.call("describe")["engine_pid"]
    a_engine = a.call("describe")["engine_pid"]
    assert interrupted_load(lambda: os.kill(a_engine, signal.SIGSTOP), when_granted=False)["n"] == 0
    assert b.call("describe")["engine_pid"] != engine
    assert b.call("lookup", hashes=hashes)["remote"] == 0  # A is suspect for a lease
    os.kill(a_engine, signal.SIGCONT)
    # The whole node freezes (as if partitioned: no reset, no answer) while B reads.
    interrupted_load(lambda: a.signal(signal.SIGSTOP))
    a.signal(signal.SIGCONT)
    # Killed outright while B reads.
    interrupted_load(a.kill)
    stats = b.call("describe")["stats"]
    assert stats["grants"] >= 3 and stats["checksum_mismatches"] == 0
    assert b.call("lookup", hashes=hashes)["remote"] == 0


@pytest.mark.slow
def test_nodes_work_without_redis_and_resynchronise_when_it_returns(cluster):
    port = free_port()
    redis_server = cluster.redis(port=port)  # not started yet: the nodes come up without it
    a, b = cluster.nodes("a b", port)
    assert "unreachable" in a.output()
    first = a.call("store", prompt=4, n_blocks=3)
    assert a.call("load", hashes=first["hashes"])["digests"] == first["digests"]  # local service works

    redis_server.start()  # Redis arrives: both register in the background
    wait_for(lambda: b.call("lookup", hashes=first["hashes"])["remote"] == 3, 5, "B to see A after Redis came")

    redis_server.kill()  # Redis dies: both keep serving locally
    second = a.call("store", prompt=5, n_blocks=3)
    assert a.call("load", hashes=second["hashes"])["digests"] == second["digests"]
    mine = b.call("store", prompt=6, n_blocks=2)
    assert b.call("load", hashes=mine["hashes"])["digests"] == mine["digests"]
    wait_for(lambda: not b.call("describe")["connected"], 5, "B to notice Redis is gone")

    redis_server.start()  # back, empty: both republish everything, including what changed meanwhile
    wait_for(lambda: b.call("lookup", hashes=second["hashes"])["remote"] == 3, 8, "B to see A's new prompt")
    wait_for(lambda: a.call("lookup", hashes=mine["hashes"])["remote"] == 2, 8, "A to see B's prompt")
    assert b.call("load", hashes=second["hashes"])["digests"] == second["digests"]
    assert a.call("describe")["stats"]["resyncs"] >= 2


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started (and theirs), from /proc."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
        for child in children:
            out += [child, *descendants(child)]
    return out


@pytest.mark.slow
def test_every_port_a_node_opens_takes_connections_at_the_node_address_only(cluster):
    """FLEXKV_NODE_ADDR=127.0.0.1: nothing of a node answers at another address of this machine (127.0.0.2
    reaches the same loopback interface), although Mooncake's transfer engine listens on every interface;
    FLEXKV_DIST_BIND_ADDR=* is the operator's way to ask for every interface."""
    from flexkv_core.distributed.listen import connectable, listening_sockets

    redis_server = cluster.redis().start()
    (a,) = cluster.nodes("a", redis_server.port)
    (b,) = cluster.nodes("b", redis_server.port, dist_bind_addr="*")

    def listeners(node: Node) -> list:
        return [x for pid in (node.proc.pid, *descendants(node.proc.pid)) for x in listening_sockets(pid)]

    mine = listeners(a)
    service_port = int(a.call("describe")["node_id"].rpartition(":")[2])
    assert len(mine) == 3 and service_port in {x.port for x in mine}  # export service, TE handshake and data
    for x in mine:
        assert connectable("127.0.0.1", x.port, 5), x
        assert not connectable("127.0.0.2", x.port, 0.5), x
        if x.port == service_port:
            assert x.address == "127.0.0.1"  # ours binds the address itself
    assert all(connectable("127.0.0.2", x.port, 5) for x in listeners(b))  # every interface, as asked
    # Both still lend and fetch through the filtered ports.
    from_a, from_b = a.call("store", prompt=30, n_blocks=3), b.call("store", prompt=31, n_blocks=3)
    wait_for(lambda: b.call("lookup", hashes=from_a["hashes"])["remote"] == 3, 5, "B to see A's blocks")
    wait_for(lambda: a.call("lookup", hashes=from_b["hashes"])["remote"] == 3, 5, "A to see B's blocks")
    assert b.call("load", hashes=from_a["hashes"])["digests"] == from_a["digests"]
    assert a.call("load", hashes=from_b["hashes"])["digests"] == from_b["digests"]


def test_a_read_from_a_peer_that_is_gone_fails_at_once(tmp_path):
    """The transfer engine's own wait never sleeps; ours polls, and must still report a refused peer fast
    (its failed submission falls back to the engine's sync call, which fails at once too)."""
    import numpy as np

    from flexkv_core.distributed.transfer import EngineSettings, MooncakeTransport

    engine = MooncakeTransport(EngineSettings(host="127.0.0.1", timeout_s=2))
    buf = np.zeros(1 << 20, dtype=np.uint8)
    engine.register(buf.ctypes.data, buf.nbytes)
    try:
        t0 = time.monotonic()
        assert not engine.read(f"127.0.0.1:{free_port()}", [buf.ctypes.data, buf.ctypes.data + 8192],
                               [0x10000, 0x30000], [4096, 4096])
        assert time.monotonic() - t0 < 1
    finally:
        engine.close()


_PEER = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from flexkv_core.distributed.transfer import EngineSettings, MooncakeTransport
engine = MooncakeTransport(EngineSettings(host="127.0.0.1"))
buf = np.random.default_rng(7).integers(0, 256, int(sys.argv[2]), dtype=np.uint8)
engine.register(buf.ctypes.data, buf.nbytes)
print(engine.session, buf.ctypes.data, flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_a_read_of_thousands_of_scattered_runs_arrives_whole_and_leaves_the_engine_usable():
    """The engine's TCP transport fails a batch of 3,072+ runs and every read after it; our reads keep
    at most _MAX_RUNS_IN_FLIGHT in flight, so 4,096 scattered 16 KiB blocks arrive, byte for byte."""
    import numpy as np

    from flexkv_core.distributed.transfer import EngineSettings, MooncakeTransport

    run, count = 16 << 10, 4096
    size = 2 * run * count
    peer = subprocess.Popen([sys.executable, "-c", _PEER, str(ROOT), str(size)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    engine = MooncakeTransport(EngineSettings(host="127.0.0.1", timeout_s=5))
    try:
        session, base = peer.stdout.readline().split()
        want = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
        got = np.zeros(size, dtype=np.uint8)
        engine.register(got.ctypes.data, got.nbytes)
        every_other = [2 * i * run for i in range(count)]  # no two runs coalesce
        assert engine.read(session, [got.ctypes.data + o for o in every_other], [int(base) + o for o in every_other],
                           [run] * count)
        mask = np.zeros(size, dtype=bool)
        for o in every_other:
            mask[o:o + run] = True
        assert np.array_equal(got[mask], want[mask]) and not got[~mask].any()
        assert engine.read(session, [got.ctypes.data + run], [int(base)], [run])  # still usable
        assert np.array_equal(got[run:2 * run], want[:run])
    finally:
        engine.close()
        peer.stdin.close()
        peer.wait(timeout=30)


def test_a_wrong_redis_password_fails_at_start_naming_the_key(tmp_path):
    from flexkv_core.config import ConfigError
    from flexkv_core.distributed import DistributedNode

    server = RedisServer().start()
    try:
        for password, needle in (("not-the-password", "rejected the password in FLEXKV_REDIS_PASSWORD"),
                                 (None, "requires a password: set FLEXKV_REDIS_PASSWORD")):
            cache = _cache(tmp_path, SMALL, 8, {"redis_port": server.port, "redis_password": password,
                                                "enable_metrics": False})
            with cache, pytest.raises(ConfigError) as info:
                DistributedNode(cache, cache.config).start()
            assert needle in str(info.value) and info.value.key == "redis_password"
            assert PASSWORD not in str(info.value) and (password is None or password not in str(info.value))
            assert cache.remote is None
    finally:
        server.kill()


def test_redis_metadata_for_the_transfer_engine_is_refused_up_front(tmp_path):
    from flexkv_core.config import ConfigError
    from flexkv_core.distributed import DistributedNode

    cache = _cache(tmp_path, SMALL, 8, {"te_metadata": "redis://127.0.0.1:6379", "enable_metrics": False})
    with cache, pytest.raises(ConfigError) as info:
        DistributedNode(cache, cache.config)
    assert info.value.key == "te_metadata" and "P2PHANDSHAKE" in str(info.value)


def test_registry_log_follows_changes_and_reloads_after_a_new_epoch():
    from flexkv_core.distributed.registry import NodeInfo, Registry

    server = RedisServer().start()
    try:
        reg = Registry("127.0.0.1", server.port, PASSWORD, 0, "fp", lease_s=5, timeout_s=2)
        reg.connect()
        info = NodeInfo("n1", "e1", "tcp://127.0.0.1:1", "127.0.0.1:2", 4096, 8192, 10, 1)
        reg.register(info, [1, 2, 3])
        assert reg.live_nodes() == {"n1": info}
        epoch, blocks, last = reg.load_blocks("n1")
        assert (epoch, blocks) == ("e1", {1, 2, 3})
        reg.publish("n1", [4, 5], [1])
        reg.publish("n1", [], [4])
        changes = reg.changes_since("n1", last)
        assert changes.batches == [([4, 5], [1]), ([], [4])]
        assert reg.changes_since("n1", changes.last_id).batches == []
        # Another identity (fingerprint) sees nothing of it.
        other = Registry("127.0.0.1", server.port, PASSWORD, 0, "other-fp", lease_s=5, timeout_s=2)
        assert other.live_nodes() == {}
        # Re-registering replaces the set and starts a new log: an old position is a gap.
        reg.register(NodeInfo(**{**vars(info), "epoch": "e2"}), [7])
        assert reg.changes_since("n1", changes.last_id) is None
        assert reg.load_blocks("n1")[:2] == ("e2", {7})
        # A lapsed lease takes the node out of everyone's view.
        short = Registry("127.0.0.1", server.port, PASSWORD, 0, "fp", lease_s=0.2, timeout_s=2)
        assert short.heartbeat("n1")
        time.sleep(0.4)
        assert reg.live_nodes() == {} and reg.keys_of("n1") == []
        assert not reg.heartbeat("n1")  # the node learns it must register again
        reg.close()
        other.close()
        short.close()
    finally:
        server.kill()


def test_snapshot_serves_the_longest_prefix_peers_hold_together_and_follows_their_changes():
    from flexkv_core.distributed.registry import NodeInfo, Registry
    from flexkv_core.distributed.snapshot import GlobalSnapshot

    server = RedisServer().start()
    try:
        reg = Registry("127.0.0.1", server.port, PASSWORD, 0, "fp", lease_s=5, timeout_s=2)

        def node(name: str) -> NodeInfo:
            return NodeInfo(name, "e1", f"tcp://{name}", f"{name}:1", 4096, 8192, 10, 1)

        reg.register(node("me"), [1, 2, 3, 4, 5])  # our own blocks are never "remote"
        reg.register(node("p"), [1, 2])
        reg.register(node("q"), [2, 3, 4])
        reg.register(NodeInfo("odd", "e1", "tcp://odd", "odd:1", 4096, 4096, 10, 1), [1, 2, 3, 4, 5])
        snap = GlobalSnapshot("me", slot_bytes=8192)
        snap.refresh(reg)
        assert snap.peer_ids() == ["p", "q"]  # "odd" has another slot size
        assert snap.lookup([1, 2, 3, 4, 5]) == 4  # p serves 1-2, q serves 3-4, nobody 5
        assert snap.lookup([3, 9, 4]) == 1
        assert [(r.peer.node_id, r.start, r.stop) for r in snap.plan([1, 2, 3, 4, 5])] == [("p", 0, 2), ("q", 2, 4)]
        assert [(r.peer.node_id, r.start, r.stop) for r in snap.plan([2, 3])] == [("q", 0, 2)]  # longest run
        # Changes arrive with the next refresh; a suspect peer is left out until its time is up.
        reg.publish("p", [3, 4, 5], [])
        snap.refresh(reg)
        assert [(r.peer.node_id, r.stop) for r in snap.plan([1, 2, 3, 4, 5])] == [("p", 5)]
        snap.suspect("p", 0.3)
        assert snap.lookup([1, 2, 3, 4, 5]) == 0
        time.sleep(0.35)
        assert snap.lookup([1, 2, 3, 4, 5]) == 5
        reg.unregister("p")
        snap.refresh(reg)
        assert snap.peer_ids() == ["q"] and snap.lookup([2, 3, 4]) == 3
        reg.close()
    finally:
        server.kill()


# ------------------------------------------------------------------------------------------------------
# the node process (run as: python tests/test_distributed.py node SPEC)


def _layout(spec: dict):
    from flexkv_core.layout import KVLayout

    return KVLayout(**spec)


def _cache(workdir: Path, layout_spec: dict, cpu_blocks: int, config: dict):
    from flexkv_core.cache import TieredCache
    from flexkv_core.config import FlexKVConfig
    from flexkv_core.layout import CacheIdentity

    layout = _layout(layout_spec)
    cfg = FlexKVConfig.from_dict({"cpu_cache_gb": cpu_blocks * layout.slot_bytes / GiB,
                                  "server_recv_port": f"ipc://{workdir}/svc.sock", **config})
    return TieredCache(cfg, CacheIdentity(model="dist-test", layout=layout),
                       pool_name=f"flexkv-dist-test-{os.getpid()}-{time.monotonic_ns()}")


def _node_main(spec: dict) -> None:
    import logging

    import torch
    import xxhash

    from flexkv_core.config import FlexKVConfig
    from flexkv_core.distributed import start_distributed
    from flexkv_core.hashing import chain_hashes
    from flexkv_core.service import CacheService
    from flexkv_core.transfer import BlockCopier

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {spec['name']} %(levelname)s %(name)s: "
                                                   "%(message)s")
    cfg = FlexKVConfig.from_dict(spec["config"])
    layout = _layout(spec["layout"])
    workdir = Path(cfg.server_recv_port[len("ipc://"):]).parent
    cache = _cache(workdir, spec["layout"], cfg.cpu_cache_bytes // layout.slot_bytes, spec["config"])
    num_blocks = cache.pool.num_slots
    shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    planes = [torch.zeros(shape, dtype=torch.float16) for _ in range(layout.num_planes)]
    copier = BlockCopier(cache.pool, layout, 0, planes)
    node = start_distributed(cache, cfg)
    assert node is not None
    done = threading.Event()
    background: dict = {}

    def digests(ids: list[int]) -> list[str]:
        out = []
        for i in ids:
            h = xxhash.xxh3_64()
            for p in planes:
                h.update(p[i].contiguous().view(torch.uint8).numpy().tobytes())
            out.append(h.hexdigest())
        return out

    def tokens_for(prompt: int, n: int) -> list[int]:
        return [prompt * 100_000 + i for i in range(n * layout.block_size)]

    def store(prompt: int, n_blocks: int) -> dict:
        tokens = tokens_for(prompt, n_blocks)
        hashes = chain_hashes(tokens, layout.block_size)
        ids = list(range(n_blocks))
        for p in planes:  # fresh content per prompt
            p[:n_blocks] = torch.randint(-30000, 30000, p[:n_blocks].shape, dtype=torch.int16).view(torch.float16)
        plan = cache.reserve_store(hashes, None, tokens)
        if plan is not None:
            copier.to_pool([ids[i] for i in plan.positions], plan.slots).wait()
            cache.complete_store(plan)
        return {"hashes": hashes, "digests": digests(ids)}

    def load(hashes: list[int]) -> dict:
        plan = cache.prepare_load(hashes)
        n = plan.ready.result(timeout=60)
        ids = list(range(num_blocks - n, num_blocks))  # other engine blocks than store() uses
        for p in planes:
            p[ids] = 0
        if n:
            copier.from_pool(plan.slots[:n], ids).wait()
        cache.finish_load(plan)
        return {"n": n, "digests": digests(ids)}

    def load_start(hashes: list[int]) -> None:
        background.clear()

        def run() -> None:
            background["result"] = load(hashes)

        threading.Thread(target=run, daemon=True).start()

    handlers = {
        "store": store, "load": load, "load_start": load_start,
        "load_result": lambda: background.get("result"),
        "lookup": lambda hashes: vars(cache.lookup(hashes)),
        "describe": node.describe,
        "exit": lambda: done.set(),
    }
    control = CacheService(spec["control"], handlers, name=f"dist-test-{spec['name']}")
    control.start()
    # What an operator's `flexkv status --endpoint FLEXKV_SERVER_RECV_PORT` talks to, as in a worker.
    status = CacheService(cfg.server_recv_port, {**cache.service_handlers(), "distributed": node.describe},
                          name=f"dist-test-cache-{spec['name']}")
    status.start()
    signal.signal(signal.SIGTERM, lambda *_: done.set())  # a clean stop, as the standalone node does it
    while not done.wait(0.1):  # short waits: the SIGTERM handler runs between them
        pass
    time.sleep(0.1)  # let the reply to "exit" leave
    status.stop()
    control.stop()
    node.close()
    cache.close()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "node":
    sys.path.insert(0, str(ROOT))
    _node_main(json.loads(sys.argv[2]))
