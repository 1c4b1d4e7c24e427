"""A worker with a bad FlexKV setting stops before vLLM or Dynamo load anything, with one line on stderr.

Real launchers in real interpreters: ``python -m dynamo.vllm --connector flexkv`` through the start-up hook
(in a throwaway virtualenv layered on ours) and ``python -m flexkv_dynamo.vllm``, both running the real
Dynamo package. A test-only ``.pth`` in that virtualenv records, when the process exits, which of vLLM,
torch and Dynamo's vLLM worker it had imported: none, because the checks ran first. Without them the same
command goes on to import vLLM (tens of seconds) and fails only once the model has loaded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import make_hook_venv

from flexkv_core.service import CacheService

#: Written into the throwaway virtualenv: with TEST_IMPORT_WITNESS set, record at exit which modules of
#: interest this interpreter imported.
WITNESS = '''\
import atexit, json, os, sys

def _record(path=os.environ.get("TEST_IMPORT_WITNESS")):
    names = sorted(m for m in sys.modules if m.split(".")[0] in ("vllm", "torch", "dynamo", "flexkv_dynamo"))
    with open(path, "w") as fh:
        json.dump(names, fh)

if os.environ.get("TEST_IMPORT_WITNESS"):
    atexit.register(_record)
'''

HOLDER = """
import sys
from flexkv_core.service import CacheService
service = CacheService(sys.argv[1], {}, name="the-other-worker")
service.start()
print("holding", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preflight")
    py = make_hook_venv(root)
    site_dir = next(py.parent.parent.glob("lib/python*/site-packages"))
    (site_dir / "_flexkv_test_witness.py").write_text(WITNESS)
    (site_dir / "zz_flexkv_test_witness.pth").write_text("import _flexkv_test_witness\n")
    return py


@pytest.fixture
def workdir() -> Iterator[Path]:
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="fkpre", dir="/tmp"))  # short: ipc paths stay under 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def holder(workdir) -> Iterator[tuple[str, int]]:
    """Another live process serving a FlexKV cache at an ipc endpoint: (endpoint, its pid)."""
    endpoint = f"ipc://{workdir}/held.sock"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, endpoint], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        yield endpoint, proc.pid
    finally:
        proc.kill()
        proc.wait()


LAUNCHERS = {
    "hook": ("dynamo.vllm", ["-m", "dynamo.vllm", "--model", "some-model", "--connector", "flexkv"]),
    "explicit": ("flexkv_dynamo.vllm", ["-m", "flexkv_dynamo.vllm", "--model", "some-model"]),
}


def launch(py: Path, launcher: str, workdir: Path, **settings: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run a worker command with an SSD tier in ``workdir/ssd`` and ``settings``; (result, imported modules)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXKV_", "DYN_")) and k != "ENABLE_FLEXKV"}
    env.update(FLEXKV_CPU_CACHE_GB="0.01", FLEXKV_SSD_CACHE_GB="0.01", FLEXKV_SSD_CACHE_DIR=str(workdir / "ssd"),
               FLEXKV_SERVER_RECV_PORT=f"ipc://{workdir}/mine.sock", TEST_IMPORT_WITNESS=str(workdir / "witness"))
    env.update(settings)
    # A guard against a hang, not a measure: without the checks this command imports vLLM and runs far longer.
    out = subprocess.run([str(py), *LAUNCHERS[launcher][1]], capture_output=True, text=True, env=env, timeout=120)
    return out, json.loads((workdir / "witness").read_text())


def assert_stopped_early(out: subprocess.CompletedProcess, imported: list[str], launcher: str, message: str,
                         workdir: Path) -> None:
    prog = LAUNCHERS[launcher][0]
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), out.stderr  # one line, no traceback
    assert message in lines[0], lines[0]
    assert out.stdout == ""
    assert "flexkv_dynamo.preflight" in imported  # the checks ran ...
    assert not [m for m in imported if m.split(".")[0] in ("vllm", "torch") or m.startswith("dynamo.vllm")], imported
    assert not list((workdir / "ssd").glob("flexkv_ssd_*")) if (workdir / "ssd").exists() else True  # no SSD file


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_endpoint_held_by_another_worker_stops_before_anything_loads(venv_python, workdir, holder, launcher):
    endpoint, pid = holder
    out, imported = launch(venv_python, launcher, workdir, FLEXKV_SERVER_RECV_PORT=endpoint)
    assert_stopped_early(out, imported, launcher,
                         f"FLEXKV_SERVER_RECV_PORT {endpoint} is held by pid {pid} (flexkv service 'the-other-worker'",
                         workdir)
    assert "give each worker its own FLEXKV_SERVER_RECV_PORT" in out.stderr


def test_tcp_endpoint_held_by_a_stranger_is_named(venv_python, workdir):
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        endpoint = f"tcp://127.0.0.1:{stranger.getsockname()[1]}"
        out, imported = launch(venv_python, "hook", workdir, FLEXKV_SERVER_RECV_PORT=endpoint)
    assert_stopped_early(out, imported, "hook", f"FLEXKV_SERVER_RECV_PORT {endpoint} is held by an unknown process",
                         workdir)


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("settings,message", [
    ({"FLEXKV_CPU_CACHE_GB": "lots"}, "flexkv config: cpu_cache_gb='lots' from env FLEXKV_CPU_CACHE_GB: not a finite number"),
    ({"FLEXKV_CPU_CACHE_G": "1"}, "unknown environment variable FLEXKV_CPU_CACHE_G='1' (did you mean FLEXKV_CPU_CACHE_GB?)"),
    ({"FLEXKV_SSD_CACHE_GB": "1000000"}, "ssd_cache_gb=1000000 from env FLEXKV_SSD_CACHE_GB: only"),
    ({"FLEXKV_SERVER_RECV_PORT": "ipc:///nonexistent-dir/x.sock"}, "FLEXKV_SERVER_RECV_PORT ipc:///nonexistent-dir/x.sock: No such file or directory"),
])
def test_bad_setting_stops_before_anything_loads(venv_python, workdir, launcher, settings, message):
    out, imported = launch(venv_python, launcher, workdir, **settings)
    assert_stopped_early(out, imported, launcher, message, workdir)


def test_metrics_port_in_use_is_refused(venv_python, workdir):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        out, imported = launch(venv_python, "explicit", workdir, FLEXKV_METRICS_PORT=str(port))
    assert_stopped_early(out, imported, "explicit", f"FLEXKV_METRICS_PORT={port}: cannot serve metrics on "
                                                    f"127.0.0.1:{port}", workdir)


def test_bad_key_in_the_config_file(venv_python, workdir):
    config = workdir / "flexkv.yaml"
    config.write_text("cpu_cache_gib: 1\n")
    out, imported = launch(venv_python, "hook", workdir, FLEXKV_CONFIG_PATH=str(config))
    assert_stopped_early(out, imported, "hook", f"config file {config}: unknown key cpu_cache_gib=1 (did you mean "
                                                "cpu_cache_gb?)", workdir)


def test_a_free_endpoint_is_left_free(workdir):
    """The check claims the endpoint as the cache will, then lets it go: the worker can take it next."""
    from flexkv_dynamo.preflight import preflight

    endpoint = f"ipc://{workdir}/svc.sock"
    cfg = preflight({"FLEXKV_CPU_CACHE_GB": "0.01", "FLEXKV_SERVER_RECV_PORT": endpoint})
    assert cfg.server_recv_port == endpoint
    assert list(workdir.iterdir()) == []  # no socket or lock file left behind
    with CacheService(endpoint, {}):
        pass


def test_a_shared_cache_is_accepted_only_by_workers_that_share(workdir):
    """A node's shared cache owner serves the endpoint: a worker with FLEXKV_SHARE_SERVER=1 passes, one without
    is told how to use it (the same worker would otherwise fail after loading its model)."""
    from flexkv_dynamo.preflight import PreflightError, preflight

    endpoint = f"ipc://{workdir}/svc.sock"
    env = {"FLEXKV_CPU_CACHE_GB": "0.01", "FLEXKV_SERVER_RECV_PORT": endpoint}
    with CacheService(endpoint, {}, share=True, name="flexkv-serve"):
        assert preflight({**env, "FLEXKV_SHARE_SERVER": "1"}).share_server
        with pytest.raises(PreflightError, match=r"held by pid \d+ \(flexkv service 'flexkv-serve'.*sharing\).*or set FLEXKV_SHARE_SERVER=1"):
            preflight(env)
        with pytest.raises(PreflightError, match="FLEXKV_ENABLE_DISTRIBUTED=1 with FLEXKV_SHARE_SERVER=1"):
            preflight({**env, "FLEXKV_SHARE_SERVER": "1", "FLEXKV_ENABLE_DISTRIBUTED": "1"})
        # A sharing worker still serves its own metrics: a taken metrics port is refused for it too.
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            port = other.getsockname()[1]
            with pytest.raises(PreflightError, match=f"FLEXKV_METRICS_PORT={port}: cannot serve metrics"):
                preflight({**env, "FLEXKV_SHARE_SERVER": "1", "FLEXKV_METRICS_PORT": str(port)})


@pytest.mark.engine
@pytest.mark.slow
def test_engine_claims_the_endpoint_before_allocating_its_tiers(tiny_model_dir, workdir, holder):
    """The race the launcher's check cannot see (the endpoint taken after it ran): the connector claims the
    endpoint before it creates the CPU pool or preallocates SSD files, so the engine fails naming the
    holder and leaves nothing in /dev/shm or the SSD directory."""
    from conftest import FLEXKV_TRANSFER_CONFIG, flexkv_env, start_engine

    from flexkv_core.service import EndpointInUse

    endpoint, pid = holder
    env = flexkv_env(workdir, cpu_gb=0.05, ssd_gb=0.05, FLEXKV_SERVER_RECV_PORT=endpoint)
    shm_before = set(os.listdir("/dev/shm"))
    with pytest.raises(EndpointInUse, match=f"FLEXKV_SERVER_RECV_PORT {endpoint} is held by pid {pid}"):
        start_engine(tiny_model_dir, transfer_config=FLEXKV_TRANSFER_CONFIG, env=env)
    ssd = workdir / "ssd"
    assert not (ssd.exists() and [p.name for p in ssd.iterdir() if p.name.startswith("flexkv_ssd")])
    ours = [name for name in set(os.listdir("/dev/shm")) - shm_before if name.startswith(f"flexkv-{os.getpid()}-")]
    assert ours == []
