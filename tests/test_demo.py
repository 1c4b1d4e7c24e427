"""`make demo`'s program stops everything it started when interrupted (Ctrl-C), even in the middle of start-up.

The whole demo runs in CI (`.ci/run` runs `make demo`); this checks the part a run cannot: the frontend,
both workers and the engine cores they spawn are gone after a Ctrl-C, found by the discovery directory in
their environment. About a minute (the processes only have to have started).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import torchvision_shim_if_needed, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.dynamo]


def processes_of(workdir: Path) -> list[int]:
    """Live processes whose environment points at the demo's discovery directory (the cluster's)."""
    marker = f"DYN_FILE_KV={workdir / 'discovery'}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                if (entry / "stat").read_text().split()[2] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_ctrl_c_during_start_up_stops_the_frontend_the_workers_and_their_engines(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": torchvision_shim_if_needed(tmp_path / "shim")}
    demo = subprocess.Popen([sys.executable, "-m", "flexkv_dynamo.demo", "--workdir", str(workdir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # The frontend, two workers and (once vLLM starts) their engine cores.
        wait_for(lambda: len(processes_of(workdir)) >= 3, timeout=300, what="the demo's processes", interval=0.5)
        demo.send_signal(signal.SIGINT)
        out, _ = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert demo.returncode == 130, out[-3000:]
    assert "interrupted: everything the demo started is stopped" in out
    assert processes_of(workdir) == []
