"""The CPU tier's shared-memory pool: naming, sharing between processes, sizes, lifetime."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from flexkv_core.layout import ALIGN
from flexkv_core.tiers.cpu import SHM_DIR, CpuPool


def _path(pool: CpuPool) -> str:
    return os.path.join(SHM_DIR, pool.name)


def _run_child(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (as a TP worker would be); returns its completed process."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture
def pool():
    with CpuPool.create(8, 2 * ALIGN) as p:
        yield p


def test_views_share_one_memory(pool):
    arr = pool.array()
    assert arr.shape == (8, 2 * ALIGN) and arr.dtype == np.uint8
    t = pool.tensor()
    assert tuple(t.shape) == (8, 2 * ALIGN) and str(t.dtype) == "torch.uint8"
    arr[3, 17] = 99
    assert int(t[3, 17]) == 99
    mv = pool.slot(3)
    assert len(mv) == 2 * ALIGN and not mv.readonly and mv[17] == 99
    mv[18] = 42
    assert arr[3, 18] == 42 and int(t[3, 18]) == 42
    assert pool.nbytes == 8 * 2 * ALIGN and pool.owner


def test_slots_are_page_aligned(pool):
    for i in range(pool.num_slots):
        address = ctypes.addressof(ctypes.c_char.from_buffer(pool.slot(i)))
        assert address % ALIGN == 0, f"slot {i} at {address:#x}"


def test_slot_index_out_of_range_names_it(pool):
    with pytest.raises(IndexError, match="slot 8 outside 0..7"):
        pool.slot(8)
    with pytest.raises(IndexError, match="slot -1"):
        pool.slot(-1)


def test_attach_in_same_process_sees_and_makes_writes(pool):
    with CpuPool.attach(pool.name, 8, 2 * ALIGN) as other:
        assert not other.owner
        pool.array()[5, :4] = [1, 2, 3, 4]
        assert other.array()[5, :4].tolist() == [1, 2, 3, 4]
        other.slot(6)[0] = 7
        assert pool.array()[6, 0] == 7
    # An attacher closing leaves the region in place for the owner.
    assert os.path.exists(_path(pool))
    assert pool.array()[6, 0] == 7


def test_attach_with_wrong_size_fails_clearly(pool):
    with pytest.raises(ValueError, match=rf"holds {8 * 2 * ALIGN} bytes, expected {16 * 2 * ALIGN}"):
        CpuPool.attach(pool.name, 16, 2 * ALIGN)
    with pytest.raises(ValueError, match=rf"expected {8 * ALIGN}"):
        CpuPool.attach(pool.name, 8, ALIGN)


def test_attach_missing_pool_names_it():
    with pytest.raises(FileNotFoundError, match="'flexkv-test-no-such-pool' not found"):
        CpuPool.attach("flexkv-test-no-such-pool", 4, ALIGN)


@pytest.mark.parametrize("num_slots, slot_bytes", [(0, ALIGN), (4, 1000), (4, 0), (-1, ALIGN)])
def test_bad_geometry_is_refused(num_slots, slot_bytes):
    with pytest.raises(ValueError, match="num_slots|slot_bytes"):
        CpuPool.create(num_slots, slot_bytes)


@pytest.mark.parametrize("name", ["", "a/b", "../etc", ".hidden", "x" * 201, "sp ace"])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError, match="not a valid name"):
        CpuPool.create(1, ALIGN, name=name)


def test_owner_close_unlinks_and_is_idempotent():
    p = CpuPool.create(2, ALIGN)
    path = _path(p)
    assert os.path.exists(path)
    p.close()
    assert not os.path.exists(path)
    p.close()  # second close: nothing to do, no error
    assert p.closed
    with pytest.raises(ValueError, match="closed"):
        p.array()
    with pytest.raises(FileNotFoundError):
        CpuPool.attach(p.name, 2, ALIGN)


def test_close_with_views_still_alive_unlinks_and_keeps_views_valid():
    p = CpuPool.create(2, ALIGN)
    arr, t, mv = p.array(), p.tensor(), p.slot(1)
    arr[1, 0] = 5
    p.close()
    assert not os.path.exists(_path(p))
    # The mapping stays until the last view goes: reading them is still safe, not a dangling pointer.
    assert arr[1, 0] == 5 and int(t[1, 0]) == 5 and mv[0] == 5


def test_name_held_by_live_owner_is_refused(pool):
    with pytest.raises(FileExistsError, match=f"'{pool.name}'.*live owner"):
        CpuPool.create(8, 2 * ALIGN, name=pool.name)


def test_auto_names_are_unique():
    with CpuPool.create(1, ALIGN) as a, CpuPool.create(1, ALIGN) as b:
        assert a.name != b.name


def test_pages_are_populated_lazily_and_by_prefault():
    with CpuPool.create(256, 16 * ALIGN) as p:  # 16 MiB
        allocated = os.stat(_path(p)).st_blocks * 512
        assert allocated < p.nbytes // 8, f"{allocated} B allocated right after create"
        p.array()[7, 0] = 1
        p.prefault()
        assert os.stat(_path(p)).st_blocks * 512 >= p.nbytes
        assert p.array()[7, 0] == 1 and p.array()[7, 1:].sum() == 0  # prefault changed no byte


def test_too_large_for_dev_shm_is_refused():
    free = os.statvfs(SHM_DIR).f_bavail * os.statvfs(SHM_DIR).f_frsize
    slots = free // (1 << 30) + 2
    with pytest.raises(MemoryError, match="does not fit in /dev/shm"):
        CpuPool.create(slots, 1 << 30)


def test_pin_is_a_no_op_without_cuda(pool):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: pinning is exercised by the CUDA transfer test")
    assert pool.pin() is False and not pool.pinned


def test_second_process_attaches_reads_and_writes():
    with CpuPool.create(6, 2 * ALIGN) as pool:
        pool.array()[2, :8] = list(range(10, 18))
        proc = _run_child(f"""
            from flexkv_core.tiers.cpu import CpuPool
            with CpuPool.attach({pool.name!r}, 6, {2 * ALIGN}) as pool:
                arr = pool.array()
                seen = arr[2, :8].tolist()
                assert seen == list(range(10, 18)), seen
                arr[3, :8] = list(range(100, 108))  # for the owner to see
                pool.slot(4)[{ALIGN}] = 77
            print("child ok")
        """)
        assert proc.returncode == 0, proc.stderr
        assert "child ok" in proc.stdout
        # Nothing on stderr: in particular no resource_tracker "leaked shared_memory" warning.
        assert proc.stderr == ""
        assert pool.array()[3, :8].tolist() == list(range(100, 108))
        assert pool.array()[4, ALIGN] == 77
        # The attacher's exit did not remove the region.
        assert os.path.exists(_path(pool))
        with CpuPool.attach(pool.name, 6, 2 * ALIGN):
            pass


def test_owner_process_exit_unlinks_its_region():
    proc = _run_child("""
        from flexkv_core.tiers.cpu import CpuPool
        pool = CpuPool.create(2, 4096)
        print(pool.name)
        # no close(): interpreter exit must still remove the region
    """)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    name = proc.stdout.strip()
    assert name.startswith("flexkv-")
    assert not os.path.exists(os.path.join(SHM_DIR, name))


def test_a_killed_owners_region_is_removed_by_its_reaper():
    """vLLM kills its engine core at shutdown (and operators kill process groups): the connector never
    closes its pool, yet the region and its memory must not outlive the owner."""
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from flexkv_core.tiers.cpu import CpuPool
        pool = CpuPool.create(64, 4096)
        pool.prefault()
        print(pool.name, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    path = os.path.join(SHM_DIR, owner.stdout.readline().strip())
    assert os.path.exists(path)
    os.killpg(owner.pid, signal.SIGKILL)  # the owner's whole process group, as vLLM and `kill -9 -PGID` do
    owner.wait(10)
    deadline = time.monotonic() + 10
    while os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} outlived its owner"
        time.sleep(0.05)


def test_stale_region_of_dead_owner_is_replaced_refused_and_swept():
    name = f"flexkv-test-stale-{os.getpid()}"
    # The owner dies without any cleanup (like SIGKILL), and so does its reaper (an operator's kill -9 of
    # everything, the OOM killer): the file stays, its lock is gone.
    die_without_cleanup = f"""
        import os
        from flexkv_core.tiers import cpu
        cpu._start_reaper = lambda path, fd: None  # as if its reaper had been killed as well
        pool = cpu.CpuPool.create(2, 4096, name={name!r})
        pool.array()[1, 0] = 9
        os._exit(0)
    """
    proc = _run_child(die_without_cleanup)
    assert proc.returncode == 0, proc.stderr
    path = os.path.join(SHM_DIR, name)
    assert os.path.exists(path)
    with pytest.raises(FileNotFoundError, match="stale"):
        CpuPool.attach(name, 2, 4096)
    with CpuPool.create(4, 4096, name=name) as fresh:  # replaces it, even with another size
        assert fresh.array().sum() == 0
        assert CpuPool.remove_stale("flexkv-test-stale-") == []  # a live owner's region is not stale
    assert not os.path.exists(path)

    _run_child(die_without_cleanup)  # leave one more stale region behind
    assert os.path.exists(path)
    assert CpuPool.remove_stale("flexkv-test-stale-") == [name]
    assert not os.path.exists(path)
