"""`flexkv_dynamo.local_cluster` without engines: core shares, the torchvision check, and that stop() leaves
no process of a group behind (the demo and the aiperf driver rely on it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from support import wait_for

from flexkv_dynamo.local_cluster import (
    ClusterError,
    LocalCluster,
    WorkerKind,
    cpu_share,
    dynamo_vllm_importable,
)


def test_every_worker_gets_an_equal_share_of_the_cores_whatever_its_kind() -> None:
    assert [cpu_share(i, 2, [0, 1]) for i in range(2)] == ["0", "1"]
    assert [cpu_share(i, 2, range(8)) for i in range(2)] == ["0,1,2,3", "4,5,6,7"]
    assert [cpu_share(i, 3, [0, 1]) for i in range(3)] == ["0", "1", "0"]  # more workers than cores: shared


def test_a_missing_torchvision_is_reported_before_anything_starts(tmp_path: Path) -> None:
    stand_in = tmp_path / "shim"
    (stand_in / "torchvision").mkdir(parents=True)
    assert dynamo_vllm_importable({"PYTHONPATH": str(stand_in)}) is None
    if dynamo_vllm_importable({}) is None:
        pytest.skip("this environment has a real torchvision")
    why = dynamo_vllm_importable({"PYTHONPATH": ""})
    assert why is not None and "torchvision" in why and "make demo" in why
    cluster = LocalCluster(tmp_path / "c", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    try:
        with pytest.raises(ClusterError, match="torchvision"):
            cluster.start_worker("m", WorkerKind.VLLM, count=1)
        assert cluster.processes == []
    finally:
        cluster.stop()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_stop_ends_each_process_group_children_and_stubborn_leaders_included(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "c")
    pidfile = tmp_path / "child.pid"
    # A leader that ignores SIGTERM with a child (as a worker with its engine core): both must go.
    leader = cluster._spawn("worker 0", ["bash", "-c", f"trap '' TERM; sleep 60 & echo $! > {pidfile}; wait"],
                            os.environ)
    wait_for(lambda: pidfile.is_file() and pidfile.read_text().strip(), timeout=30, what="the child's pid")
    child = int(pidfile.read_text())
    cluster.stop(grace_s=0.5)
    assert leader.popen.poll() is not None
    wait_for(lambda: not _alive(child), timeout=10, what="the child to be gone")


def test_a_process_that_dies_is_named_with_its_log(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "c")
    try:
        proc = cluster._spawn("frontend", [sys.executable, "-c", "print('bad flag'); raise SystemExit(2)"],
                              os.environ)
        wait_for(lambda: proc.popen.poll() is not None, timeout=30, what="the process to exit")
        with pytest.raises(ClusterError, match=r"(?s)frontend exited with status 2.*bad flag"):
            cluster.check_alive()
    finally:
        cluster.stop()
