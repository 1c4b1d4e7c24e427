"""The cache service endpoint, its client and `flexkv status`, with real sockets and real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import zmq
from prometheus_client import CollectorRegistry
from support import free_port

from flexkv_core import cli
from flexkv_core.client import CacheClient, ServiceError, ServiceUnavailable
from flexkv_core.metrics import CacheMetrics
from flexkv_core.service import CacheService, EndpointInUse

REPO = Path(__file__).resolve().parent.parent

# A service owner in its own process: prints "ready PID CHILD_PID" once serving, stops when stdin
# closes. With fork=1 it first forks a child that merely waits (as engines fork workers); the child
# prints "child-up" once it runs.
OWNER = r"""
import os, sys
from flexkv_core.service import CacheService
endpoint, share, fork = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
svc = CacheService(endpoint, {"whose": lambda: "owner"}, share=share, name="owner")
svc.start()
child = 0
if fork:
    child = os.fork()
    if child == 0:
        os.write(1, b"child-up\n")  # past the fork hooks; one write() each, so lines never interleave
        sys.stdin.readline()
        os._exit(0)
os.write(1, f"ready {os.getpid()} {child}\n".encode())
sys.stdin.readline()
svc.stop()
"""


class Owner:
    """A CacheService running in another process."""

    def __init__(self, endpoint: str, share: bool = False, fork: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", OWNER, endpoint, "1" if share else "0", "1" if fork else "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        lines = [self.proc.stdout.readline().split() for _ in range(2 if fork else 1)]
        ready = next((line for line in lines if line[:1] == ["ready"]), None)
        assert ready is not None, f"owner did not start: {lines}"
        self.pid, self.child_pid = int(ready[1]), int(ready[2])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        if self.child_pid:
            try:
                os.kill(self.child_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def owners():
    started: list[Owner] = []

    def start(endpoint: str, **kw) -> Owner:
        started.append(Owner(endpoint, **kw))
        return started[-1]

    yield start
    for owner in started:
        owner.close()


@pytest.fixture
def services():
    started: list[CacheService] = []

    def start(endpoint: str, handlers=None, **kw) -> CacheService:
        svc = CacheService(endpoint, handlers or {}, **kw)
        started.append(svc)
        svc.start()
        return svc

    yield start
    for svc in started:
        svc.stop()


@pytest.fixture(params=["ipc", "tcp"])
def endpoint(request, tmp_path) -> str:
    if request.param == "ipc":
        ep = f"ipc://{tmp_path}/kv"
        assert len(ep) < 100
        return ep
    return f"tcp://127.0.0.1:{free_port()}"


def expect_in_use(endpoint: str, **kw) -> tuple[EndpointInUse, float]:
    svc = CacheService(endpoint, {}, **kw)
    t0 = time.monotonic()
    with pytest.raises(EndpointInUse) as info:
        svc.start()
    return info.value, time.monotonic() - t0


# --- exclusivity -----------------------------------------------------------------------------------


def test_second_service_on_a_held_endpoint_names_the_holder(endpoint, services):
    services(endpoint)
    err, elapsed = expect_in_use(endpoint)
    assert elapsed < 5
    assert endpoint in str(err) and f"pid {os.getpid()}" in str(err)
    assert "FLEXKV_SHARE_SERVER=1" in str(err)
    assert err.holder_pid == os.getpid()


def test_endpoint_held_by_another_process_names_its_pid(endpoint, owners):
    owner = owners(endpoint)
    err, elapsed = expect_in_use(endpoint)
    assert elapsed < 5
    assert endpoint in str(err) and f"pid {owner.pid}" in str(err)
    assert err.holder_pid == owner.pid
    # The owner still serves its own callers.
    assert CacheClient(endpoint, timeout_s=5).call("whose") == "owner"


def test_stop_frees_the_endpoint_for_the_next_owner(tmp_path, services):
    endpoint = f"ipc://{tmp_path}/kv"
    first = services(endpoint)
    first.stop()
    first.stop()  # idempotent
    assert not (tmp_path / "kv").exists() and not (tmp_path / "kv.lock").exists()
    second = services(endpoint, {"whose": lambda: "second"})
    assert CacheClient(endpoint, timeout_s=5).call("whose") == "second"
    assert second.serving


def test_stale_ipc_socket_of_a_killed_owner_is_reclaimed(tmp_path, owners, services, caplog):
    endpoint = f"ipc://{tmp_path}/kv"
    owner = owners(endpoint)
    os.kill(owner.pid, signal.SIGKILL)
    owner.proc.wait(timeout=10)
    assert (tmp_path / "kv").is_socket() and (tmp_path / "kv.lock").exists()  # left behind

    services(endpoint, {"whose": lambda: "new"})
    assert CacheClient(endpoint, timeout_s=5).call("whose") == "new"
    assert CacheClient(endpoint, timeout_s=5).call("whoami")["pid"] == os.getpid()
    assert "reclaiming" in caplog.text


def test_killed_owner_with_a_forked_child_does_not_keep_the_endpoint(tmp_path, owners, services):
    # The child inherited the owner's lock fd and listening socket; neither may keep the endpoint busy.
    endpoint = f"ipc://{tmp_path}/kv"
    owner = owners(endpoint, fork=True)
    os.kill(owner.pid, signal.SIGKILL)
    owner.proc.wait(timeout=10)
    os.kill(owner.child_pid, 0)  # still alive

    services(endpoint, {"whose": lambda: "new"})
    assert CacheClient(endpoint, timeout_s=5).call("whose") == "new"


def test_listener_without_our_lock_is_named_by_its_pid(tmp_path):
    # libzmq would silently take over the path; we must refuse and name whoever listens there.
    path = tmp_path / "kv"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        err, elapsed = expect_in_use(f"ipc://{path}")
    assert elapsed < 5
    assert f"pid {os.getpid()}" in str(err) and "without holding" in str(err)


def test_a_regular_file_at_the_ipc_path_is_not_deleted(tmp_path):
    path = tmp_path / "kv"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        CacheService(f"ipc://{path}", {}).start()
    assert path.read_text() == "precious"


@pytest.mark.slow
def test_tcp_port_held_by_something_else_is_reported_within_seconds():
    with socket.socket() as plain:  # listens but speaks no ZMQ
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        endpoint = f"tcp://127.0.0.1:{plain.getsockname()[1]}"
        err, elapsed = expect_in_use(endpoint)
    assert elapsed < 5
    assert endpoint in str(err) and "an unknown process" in str(err)
    assert err.holder_pid is None


@pytest.mark.parametrize("bad, why", [
    ("ipc://" + "/x" * 60, "107"),
    ("http://127.0.0.1:5000", "ipc://PATH or tcp://HOST:PORT"),
    ("tcp://127.0.0.1", "tcp://HOST:PORT"),
])
def test_bad_endpoints_are_refused_with_the_value(bad, why):
    with pytest.raises(ValueError, match="FLEXKV_SERVER_RECV_PORT") as info:
        CacheService(bad, {})
    assert bad in str(info.value) and why in str(info.value)


def test_tcp_wildcard_port_reports_the_bound_endpoint(services):
    svc = services("tcp://127.0.0.1:*")
    assert not svc.endpoint.endswith(":*")
    assert CacheClient(svc.endpoint, timeout_s=5).call("whoami")["endpoint"] == svc.endpoint


# --- sharing ---------------------------------------------------------------------------------------


def test_share_on_both_sides_attaches_to_the_owner(endpoint, owners):
    owner = owners(endpoint, share=True)
    second = CacheService(endpoint, {"whose": lambda: "second"}, share=True)
    second.start()
    try:
        assert second.attached_to == owner.pid and not second.serving
        # Requests go to the owner, through a client, as the caller would.
        assert CacheClient(endpoint, timeout_s=5).call("whose") == "owner"
    finally:
        second.stop()
    assert CacheClient(endpoint, timeout_s=5).call("whose") == "owner"  # detaching leaves the owner alone


def test_share_requested_but_the_owner_does_not_share(endpoint, services):
    services(endpoint, share=False)
    err, elapsed = expect_in_use(endpoint, share=True)
    assert elapsed < 5
    assert endpoint in str(err) and f"pid {os.getpid()}" in str(err)
    assert "BOTH sides must set FLEXKV_SHARE_SERVER=1" in str(err)


def test_owner_shares_but_the_newcomer_does_not(endpoint, services):
    services(endpoint, share=True)
    err, _ = expect_in_use(endpoint, share=False)
    assert f"pid {os.getpid()}" in str(err) and "sharing" in str(err)
    assert "FLEXKV_SHARE_SERVER=1" in str(err)


# --- client ----------------------------------------------------------------------------------------


def test_client_fails_at_once_when_nobody_serves(endpoint):
    # ZMQ alone would reconnect silently and keep the request queued for the whole timeout.
    client = CacheClient(endpoint, timeout_s=30, hint="is FLEXKV_DIST_SERVICE_PORT right?")
    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailable) as info:
        client.call("status")
    assert time.monotonic() - t0 < 15  # far below the timeout: the refused connection ended the call
    assert endpoint in str(info.value) and "connection refused" in str(info.value)
    if endpoint.startswith("tcp://"):
        assert "FLEXKV_DIST_SERVICE_PORT" in str(info.value)  # the hint names the setting of that endpoint
    client.close()


def test_client_waits_out_a_slow_handler_but_not_past_its_timeout(endpoint, services):
    services(endpoint, {"slow": lambda seconds: time.sleep(seconds) or "done"})
    client = CacheClient(endpoint, timeout_s=1.0, liveness_s=0.2)
    assert client.call("slow", seconds=0.6) == "done"  # slower than liveness_s: heartbeats keep it alive
    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="within 1 s"):
        client.call("slow", seconds=3)
    assert time.monotonic() - t0 >= 1.0
    client.close()


def test_a_frozen_service_fails_the_call_after_liveness_not_timeout(tmp_path):
    port = free_port()
    owner = subprocess.Popen([sys.executable, "-c", OWNER, f"tcp://127.0.0.1:{port}", "0", "0"], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().startswith("ready")
        client = CacheClient(f"tcp://127.0.0.1:{port}", timeout_s=30, liveness_s=0.3)
        assert client.call("whose") == "owner"
        os.kill(owner.pid, signal.SIGSTOP)  # its libzmq stops answering heartbeats too
        for connection in ("established", "fresh"):  # a fresh one is accepted by its kernel, never greeted
            t0 = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="connection lost|handshake failed"):
                client.call("whose")
            assert time.monotonic() - t0 < 15, connection
        os.kill(owner.pid, signal.SIGCONT)
        assert client.call("whose") == "owner"  # back to normal once it runs again
        client.close()
    finally:
        os.kill(owner.pid, signal.SIGCONT)
        owner.stdin.close()
        owner.wait(timeout=30)


def test_client_recovers_once_the_service_appears(tmp_path, services):
    endpoint = f"ipc://{tmp_path}/kv"
    client = CacheClient(endpoint, timeout_s=0.3)
    with pytest.raises(ServiceUnavailable, match="no socket file"):
        client.call("whose")
    services(endpoint, {"whose": lambda: "late"})
    client.timeout_s = 5
    assert client.call("whose") == "late"


def test_handler_error_comes_back_as_service_error_and_the_service_survives(endpoint, services):
    def evict(tier: str, n: int) -> int:
        raise KeyError(f"no tier {tier!r}")

    services(endpoint, {"evict": evict, "echo": lambda **kw: kw})
    client = CacheClient(endpoint, timeout_s=5)
    with pytest.raises(ServiceError, match="KeyError") as info:
        client.call("evict", tier="tape", n=3)
    assert "no tier 'tape'" in info.value.error
    with pytest.raises(ServiceError, match="unexpected keyword argument"):
        client.call("evict", tier="cpu", n=1, bogus=2)
    assert client.call("echo", a=1, b=[1, 2], c={"x": "y"}) == {"a": 1, "b": [1, 2], "c": {"x": "y"}}


def test_unknown_method_names_it_and_the_known_ones(endpoint, services):
    services(endpoint, {"status": dict, "attach": dict})
    with pytest.raises(ServiceError) as info:
        CacheClient(endpoint, timeout_s=5).call("statsu")
    assert "'statsu'" in str(info.value) and "attach, status, whoami" in str(info.value)


def test_unencodable_result_is_an_error_reply(endpoint, services):
    services(endpoint, {"bad": lambda: object(), "good": lambda: 1})
    client = CacheClient(endpoint, timeout_s=5)
    with pytest.raises(ServiceError, match="cannot be sent"):
        client.call("bad")
    assert client.call("good") == 1


def test_whoami(endpoint, services):
    svc = services(endpoint, name="engine-0", share=True)
    who = CacheClient(endpoint, timeout_s=5).call("whoami")
    assert who["pid"] == os.getpid() and who["name"] == "engine-0" and who["share"] is True
    assert who["endpoint"] == endpoint and who["started_at"] == svc.started_at


def test_a_plain_req_socket_speaks_the_wire_format(endpoint, services):
    # What a non-Python tool would do: REQ socket, msgpack map in, msgpack map out.
    services(endpoint, {"add": lambda a, b: a + b})
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 5000)
    req.connect(endpoint)
    try:
        req.send(msgspec.msgpack.encode({"method": "add", "args": {"a": 2, "b": 40}}))
        assert msgspec.msgpack.decode(req.recv()) == {"ok": True, "result": 42, "error": ""}
        req.send(b"\xc1 not msgpack")
        reply = msgspec.msgpack.decode(req.recv())
        assert reply["ok"] is False and "malformed request" in reply["error"]
    finally:
        req.close()


# --- flexkv status / config ------------------------------------------------------------------------


def flexkv(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run the installed `flexkv` console script (the entry point users have)."""
    exe = Path(sys.executable).with_name("flexkv")
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLEXKV_")}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                          env={**base, **(env or {})}, cwd=REPO)


@pytest.fixture
def status_service(tmp_path, services):
    metrics = CacheMetrics("cli-test", CollectorRegistry())
    metrics.lookup(40, 30)
    metrics.hit("cpu", 17)
    metrics.hit("ssd", 5)
    metrics.stored("cpu", 64)
    metrics.evicted("cpu", 3)
    metrics.set_usage("cpu", 61, 244)
    metrics.set_usage("ssd", 9, 1000)
    metrics.moved("engine_to_cpu", 3 * 2**30, 0.5)
    endpoint = f"ipc://{tmp_path}/kv"
    services(endpoint, {"status": metrics.snapshot})
    return endpoint, metrics


def test_flexkv_status_prints_usage_hits_and_bytes(status_service):
    endpoint, _ = status_service
    result = flexkv("status", "--endpoint", endpoint)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert endpoint in out and f"pid {os.getpid()}" in out
    cpu = next(line.split() for line in out.splitlines() if line.startswith("cpu "))
    ssd = next(line.split() for line in out.splitlines() if line.startswith("ssd "))
    header = next(line.split() for line in out.splitlines() if line.startswith("tier "))
    assert dict(zip(header, cpu, strict=True))["used_slots"] == "61"
    assert dict(zip(header, cpu, strict=True))["capacity_slots"] == "244"
    assert dict(zip(header, cpu, strict=True))["used%"] == "25.0%"
    assert dict(zip(header, cpu, strict=True))["hit_blocks"] == "17"
    assert dict(zip(header, cpu, strict=True))["evicted_blocks"] == "3"
    assert dict(zip(header, ssd, strict=True))["hit_blocks"] == "5"
    assert "engine_to_cpu 3.00 GiB" in out


def test_flexkv_status_json_is_the_service_answer(status_service):
    endpoint, metrics = status_service
    result = flexkv("status", "--endpoint", endpoint, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["status"] == metrics.snapshot()
    assert doc["service"]["pid"] == os.getpid()


def test_flexkv_status_uses_the_configured_endpoint(status_service):
    endpoint, _ = status_service
    result = flexkv("status", env={"FLEXKV_SERVER_RECV_PORT": endpoint})
    assert result.returncode == 0, result.stderr
    assert endpoint in result.stdout


def test_flexkv_status_with_nothing_there_fails_naming_the_endpoint(tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody"
    t0 = time.monotonic()
    result = flexkv("status", "--endpoint", endpoint, "--timeout", "1")
    assert time.monotonic() - t0 < 1 + 3  # the timeout plus interpreter start-up
    assert result.returncode == 1
    assert endpoint in result.stderr and result.stdout == ""


def test_flexkv_status_without_a_status_handler_fails(tmp_path, services):
    endpoint = f"ipc://{tmp_path}/kv"
    services(endpoint, {})
    assert cli.main(["status", "--endpoint", endpoint, "--timeout", "2"]) == 1


def test_flexkv_config_delegates_to_the_config_module(capsys, monkeypatch):
    for key in [k for k in os.environ if k.startswith("FLEXKV_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("FLEXKV_SERVER_RECV_PORT", "tcp://127.0.0.1:7777")
    assert cli.main(["config", "--json", "--no-check"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["server_recv_port"] == {"value": "tcp://127.0.0.1:7777", "source": "env FLEXKV_SERVER_RECV_PORT"}


def test_flexkv_rejects_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["status", "--bogus"])
    assert info.value.code == 2 and "--bogus" in capsys.readouterr().err
    assert cli.main([]) == 2
