"""Moving block bytes between nodes: Mooncake's transfer engine, run in a helper process.

Each node runs one engine, registers its CPU pool with it, and reads peers' pool slots straight into its
own slots (one-sided reads: the serving node's Python code is not involved in the bytes). Facts about the
``mooncake-transfer-engine-non-cuda`` wheel this relies on (checked on 0.3.13.post1):

* ``initialize(local_host, metadata, protocol, device)``. With ``P2PHANDSHAKE`` metadata each engine
  listens on a handshake port of its own (``get_rpc_port()``) and peers address it as the session
  ``"host:rpc_port"``: no metadata server at all; our Redis tells peers that session id. With
  ``etcd://HOST:PORT`` the engine publishes its segment under its local name ``"host:port"``. The
  ``redis://`` metadata plugin is not compiled into the wheel: the process *aborts*, so we refuse it.
* Over TCP an engine takes its ports (handshake and data) from ``MC_MIN_RPC_PORT..MC_MAX_RPC_PORT``:
  pinning those to ``[te_port, te_port + 1]`` gives a node fixed ports.
* ``batch_transfer_sync_read`` releases the GIL, returns 0 or -1, and fails fast when the peer is gone
  (connection refused / reset). ``MC_TCP_PROGRESS_TIMEOUT_SEC`` aborts a TCP transfer that stalls
  (``MC_TRANSFER_TIMEOUT`` on other transports); both are read at ``initialize``.
* But the first transfer to a peer starts with a handshake whose socket read has **no timeout**: a
  peer that freezes (SIGSTOP, a partition) at that moment blocks the call for ever, and every other
  transfer of the engine queues behind it. No setting changes that.
* ``batch_transfer_sync_read`` (and ``get_batch_transfer_status``) wait by polling the batch's status in
  a loop that never sleeps: one core spins for the whole transfer. Where the engine's TCP threads need
  every core (two cores here) that halves throughput: measured 2.6 GiB/s for 256 MiB over loopback,
  against 4.4-4.8 GiB/s when the same bytes are submitted with ``batch_transfer_async_read`` (one batch
  per contiguous run) and ``transfer_check_status`` is polled with short sleeps. ``transfer_check_status``
  looks at a batch's first task only, hence one batch per run. A failed submission falls back to the
  sync call, which also re-opens a stale segment (a peer restarted on the same port).
* Too many tasks in flight at once (3,072 runs of 16 KiB in one batch, or as many one-run batches)
  overflow the TCP transport's lane queue: the read fails, and the engine fails every read after that
  (a fresh engine works). Reads therefore keep at most `_MAX_RUNS_IN_FLIGHT` runs in flight.

Hence the helper process (`EngineProcess`): the engine lives in a child process that maps the same
shared-memory CPU pool, and the node asks it to copy slots. When a read outlives its deadline the node
kills the child (a dead process writes no late bytes into a slot the cache has reused), starts a fresh
one and republishes its new session. The child also keeps an abort inside Mooncake from taking the
node down. The cost is one small pipe round trip per read: the bytes go straight into shared memory.
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import math
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any

import msgspec

from ..config import ConfigError

log = logging.getLogger(__name__)

__all__ = ["EngineProcess", "EngineSettings", "MooncakeTransport", "StuckTransfer", "TransferError", "check_metadata",
           "free_port"]


class TransferError(RuntimeError):
    """The transfer engine could not start or register memory."""


class StuckTransfer(RuntimeError):
    """A read timed out inside the engine and may still write into its target: stop using this process."""


def check_metadata(metadata: str) -> str:
    """``P2PHANDSHAKE`` or ``etcd://HOST:PORT``; anything else is a ConfigError naming te_metadata."""
    if metadata == "P2PHANDSHAKE":
        return metadata
    scheme, sep, rest = metadata.partition("://")
    if sep and scheme == "etcd" and rest:
        return metadata
    why = ("the redis:// metadata plugin is not compiled into the mooncake wheel (the process would abort); "
           "our own Redis already carries the peers' addresses, so use P2PHANDSHAKE"
           if scheme == "redis" else "not a metadata kind the transfer engine supports here")
    raise ConfigError(f"te_metadata={metadata!r}: {why}; allowed: P2PHANDSHAKE or etcd://HOST:PORT",
                      key="te_metadata")


@dataclass(frozen=True)
class EngineSettings:
    """How to start a transfer engine (from the te_* and node_addr configuration keys)."""

    host: str
    protocol: str = "tcp"
    device: str | None = None
    metadata: str = "P2PHANDSHAKE"
    port: int = 0  # first of two fixed ports; 0: any free ones
    timeout_s: float = 5.0  # stall timeout of a transfer
    listen: str | None = None  # the only address the helper's ports accept connections on (None: any; `listen`)


def _coalesce(local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]
              ) -> tuple[list[int], list[int], list[int]]:
    """Merge transfers that continue the previous one on both sides (fewer, larger requests)."""
    out_l: list[int] = []
    out_r: list[int] = []
    out_n: list[int] = []
    for lo, ro, n in zip(local, remote, lengths):
        if out_n and out_l[-1] + out_n[-1] == lo and out_r[-1] + out_n[-1] == ro:
            out_n[-1] += n
        else:
            out_l.append(lo)
            out_r.append(ro)
            out_n.append(n)
    return out_l, out_r, out_n


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


#: How long the reader sleeps between looks at its transfers (Python's sleep adds ~50 us to it).
_POLL_S = 1e-4
#: Runs (tasks) one engine has in flight, at most. Over TCP, 3,072 or more at once overflow the engine's
#: lane queue ("TCP lane queue-full rejection"): that read fails, and so does every later read of that
#: engine (2,048 pass).
_MAX_RUNS_IN_FLIGHT = 1024
_NO_BATCH = (0, 2**64 - 1)  # what batch_transfer_async_read returns when it could not submit


class MooncakeTransport:
    """One transfer engine in this process: ``session`` is what peers pass to read from us.

    Used inside the helper process, and directly by benchmarks (raw engine throughput). A node uses
    `EngineProcess`, never this, for the reason the module docstring gives.
    """

    def __init__(self, settings: EngineSettings) -> None:
        s = settings
        check_metadata(s.metadata)
        # Read by the engine at initialize. An operator's own setting wins (they may know better).
        timeout = str(max(1, math.ceil(s.timeout_s)))
        os.environ.setdefault("MC_TCP_PROGRESS_TIMEOUT_SEC", timeout)
        os.environ.setdefault("MC_TRANSFER_TIMEOUT", timeout)
        if s.port:
            os.environ["MC_MIN_RPC_PORT"] = str(s.port)
            os.environ["MC_MAX_RPC_PORT"] = str(s.port + 1)
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:
            raise TransferError("distributed reuse needs Mooncake's transfer engine: install "
                                "mooncake-transfer-engine-non-cuda (CPU) or mooncake-transfer-engine") from exc
        self.protocol = s.protocol
        self._engine = TransferEngine()
        p2p = s.metadata == "P2PHANDSHAKE"
        # P2P: peers learn our handshake port from get_rpc_port(). etcd: our segment is published under
        # our local name, which must be unique: "host:port".
        local_name = s.host if p2p else f"{s.host}:{s.port or free_port(s.host)}"
        rc = self._engine.initialize(local_name, s.metadata, s.protocol, s.device or "")
        if rc != 0:
            raise TransferError(f"Mooncake transfer engine failed to start (rc={rc}) with te_protocol={s.protocol} "
                                f"te_metadata={s.metadata} node_addr={s.host} te_port={s.port}"
                                + (" (are both te_port and te_port+1 free?)" if s.port else ""))
        self.rpc_port = int(self._engine.get_rpc_port())
        self.session = f"{s.host}:{self.rpc_port}" if p2p else local_name
        self._regions: dict[int, int] = {}  # address -> length
        self._lock = threading.Lock()

    def register(self, address: int, length: int) -> None:
        """Make ``[address, address + length)`` readable by peers (and a valid local target)."""
        rc = self._engine.register_memory(address, length)
        if rc != 0:
            raise TransferError(f"register_memory({address:#x}, {length}) failed (rc={rc})")
        with self._lock:
            self._regions[address] = length

    def unregister(self, address: int) -> None:
        with self._lock:
            if self._regions.pop(address, None) is None:
                return
        self._engine.unregister_memory(address)

    def registered(self, address: int, length: int) -> bool:
        with self._lock:
            return any(a <= address and address + length <= a + n for a, n in self._regions.items())

    def read(self, session: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]) -> bool:
        """Copy each ``remote[i]`` (peer addresses) into ``local[i]``; True when every byte arrived."""
        if not lengths:
            return True
        loc, rem, num = _coalesce(local, remote, lengths)
        # RDMA needs the target registered; our pool is, anything else is registered for this read.
        extra = [(a, n) for a, n in zip(loc, num) if not self.registered(a, n)] if self.protocol != "tcp" else []
        for a, n in extra:
            self.register(a, n)
        try:
            ok = self._read_runs(session, loc, rem, num)
        finally:
            for a, _ in extra:
                self.unregister(a)
        if not ok:
            log.debug("transfer engine read of %d bytes from %s failed", sum(num), session)
        return ok

    def _read_runs(self, session: str, local: list[int], remote: list[int], lengths: list[int]) -> bool:
        """Submit one batch per run, at most `_MAX_RUNS_IN_FLIGHT` at a time, and wait for them in order
        without spinning (see the module docs). Returns only when no transfer can still write into
        ``local``; False as soon as one run failed (the rest are not submitted)."""
        engine = self._engine
        todo = collections.deque(zip(local, remote, lengths))
        inflight: collections.deque[int] = collections.deque()
        ok, submit_failed = True, False
        while todo or inflight:
            while todo and ok and not submit_failed and len(inflight) < _MAX_RUNS_IN_FLIGHT:
                lo, ro, n = todo[0]
                batch = engine.batch_transfer_async_read(session, [lo], [ro], [n])
                if batch in _NO_BATCH:
                    submit_failed = True
                    break
                todo.popleft()
                inflight.append(batch)
            if not inflight:
                break
            status = engine.transfer_check_status(inflight[0])  # 1 done, 0 running, -1 failed, -2 timed out
            if status == 0:
                time.sleep(_POLL_S)
                continue
            if status == -2:
                # Its slices may still land later: only the end of this process makes the target memory
                # safe to reuse (the helper process exits on this; the node replaces it).
                raise StuckTransfer(f"transfer engine timed out a read from {session}")
            ok = ok and status == 1
            inflight.popleft()  # the binding freed it
        if not ok or not todo:
            return ok
        # A submission failed (nothing is in flight now): the sync call re-opens a stale segment (a peer
        # restarted on the same port) and reads the rest, a bounded batch at a time.
        rest = list(todo)
        for k in range(0, len(rest), _MAX_RUNS_IN_FLIGHT):
            lo, ro, n = (list(x) for x in zip(*rest[k:k + _MAX_RUNS_IN_FLIGHT]))
            if engine.batch_transfer_sync_read(session, lo, ro, n) != 0:
                return False
        return True

    def close(self) -> None:
        with self._lock:
            regions = list(self._regions)
            self._regions.clear()
        for address in regions:
            self._engine.unregister_memory(address)


# ---- the helper process -------------------------------------------------------------------------------
# Wire: frames of a 4-byte big-endian length and a msgpack map, over two pipes of its own (stdout and
# stderr stay free for Mooncake's logging). The child says hello ({"session", "pool_ptr"} or {"error"}),
# then answers each {"op": "read", "session", "local" (offsets in the pool), "remote", "lengths"} with
# {"ok": bool}. It exits on EOF, and with its parent (PR_SET_PDEATHSIG).

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def _send(fd: int, obj: Any) -> None:
    data = _encoder.encode(obj)
    os.write(fd, struct.pack(">I", len(data)) + data)


def _read_exactly(fd: int, n: int, deadline: float | None) -> bytes | None:
    """``n`` bytes, or None on EOF or once ``deadline`` (monotonic) passed."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(fd: int, deadline: float | None) -> Any:
    head = _read_exactly(fd, 4, deadline)
    if head is None:
        return None
    body = _read_exactly(fd, struct.unpack(">I", head)[0], deadline)
    return None if body is None else _decoder.decode(body)


@dataclass
class _Child:
    proc: subprocess.Popen
    to_child: int  # pipe fds
    from_child: int
    session: str
    pool_ptr: int

    def stop(self) -> None:
        for fd in (self.to_child, self.from_child):
            os.close(fd)
        if self.proc.poll() is None:
            self.proc.kill()  # EOF would do, unless it is stuck inside Mooncake
        self.proc.wait(timeout=30)


class EngineProcess:
    """The node's handle on its transfer engine, which runs in a child process mapping the CPU pool.

    ``session`` and ``pool_ptr`` are what peers need (the child's session and its address of slot 0);
    they change when the child is replaced, and ``generation`` counts the children started.
    """

    def __init__(self, settings: EngineSettings, pool_name: str, num_slots: int, slot_bytes: int,
                 start_timeout_s: float = 60.0) -> None:
        check_metadata(settings.metadata)
        self.settings = settings
        self.pool_name = pool_name
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.start_timeout_s = start_timeout_s
        self.session = ""
        self.pool_ptr = 0
        self.generation = 0
        self._child: _Child | None = None
        self._closed = False
        self._lock = threading.Lock()  # one read at a time, held from start_read to finish_read
        self._pending: tuple[int, str] = (0, "")  # bytes and session of the read in flight (for messages)
        # Children are started by one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that
        # started a child ends, so a child started by a passing thread would die with it.
        self._spawns: queue.Queue[Future | None] = queue.Queue()
        threading.Thread(target=self._spawner, name="flexkv-engine-spawner", daemon=True).start()
        self._spawn().result()  # raises TransferError

    def read(self, session: str, local_offsets: Sequence[int], remote: Sequence[int], lengths: Sequence[int],
             deadline: float) -> bool:
        """Copy peer addresses ``remote[i]`` into pool bytes ``[local_offsets[i], +lengths[i])``.

        False when it failed, or did not finish by ``deadline`` (monotonic): then the child is killed
        before this returns (nothing it was doing can touch the pool afterwards) and a new one is started
        in the background (reads fail at once until it is up).
        """
        self.start_read(session, local_offsets, remote, lengths)
        return self.finish_read(deadline)

    def start_read(self, session: str, local_offsets: Sequence[int], remote: Sequence[int],
                   lengths: Sequence[int]) -> None:
        """Send a read and return at once (the caller works meanwhile); `finish_read` must follow, from
        the same thread. One read at a time: a second start_read waits for the first to finish."""
        request = {"op": "read", "session": session, "local": list(local_offsets), "remote": list(remote),
                   "lengths": list(lengths)}
        self._lock.acquire()
        self._pending = sum(lengths), session
        if self._child is None:
            return
        try:
            _send(self._child.to_child, request)
        except OSError:
            pass  # the child is gone: finish_read finds no reply and replaces it

    def finish_read(self, deadline: float) -> bool:
        """Wait for the read `start_read` sent; see `read`."""
        try:
            child = self._child
            if child is None:
                return False
            try:
                reply = _recv(child.from_child, deadline)
            except OSError:
                reply = None
            if isinstance(reply, dict):
                return bool(reply.get("ok"))
            nbytes, session = self._pending
            log.error("transfer engine did not finish a read of %d bytes from %s in time (stuck handshake or "
                      "dead helper): replacing the engine process", nbytes, session)
            self._child = None
            child.stop()
            self._spawn()
            return False
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
        if child is not None:
            child.stop()
        self._spawns.put(None)

    @property
    def pid(self) -> int | None:
        """The engine process (None while there is none)."""
        child = self._child
        return child.proc.pid if child is not None else None

    def _spawn(self) -> Future:
        fut: Future = Future()
        self._spawns.put(fut)
        return fut

    def _spawner(self) -> None:
        while (fut := self._spawns.get()) is not None:
            try:
                child = self._launch()
            except Exception as exc:  # noqa: BLE001 - handed to whoever waits, logged otherwise
                log.error("transfer engine process could not start: %s", exc)
                fut.set_exception(exc)
                continue
            with self._lock:
                if self._closed:
                    child.stop()
                    fut.set_exception(TransferError("transfer engine closed"))
                    continue
                self._child = child
                self.session, self.pool_ptr = child.session, child.pool_ptr
                self.generation += 1
            log.info("transfer engine process %d up: session %s (%s, metadata %s)", child.proc.pid,
                     child.session, self.settings.protocol, self.settings.metadata)
            fut.set_result(None)

    def _launch(self) -> _Child:
        child_in, parent_out = os.pipe()
        parent_in, child_out = os.pipe()
        spec = {"settings": asdict(self.settings), "pool": [self.pool_name, self.num_slots, self.slot_bytes],
                "fds": [child_in, child_out]}
        env = dict(os.environ)  # find flexkv_core even when it is not installed, only on our sys.path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
        try:
            proc = subprocess.Popen([sys.executable, "-m", "flexkv_core.distributed.transfer", json.dumps(spec)],
                                    pass_fds=(child_in, child_out), stdin=subprocess.DEVNULL, env=env)
        except OSError:
            for fd in (child_in, child_out, parent_in, parent_out):
                os.close(fd)
            raise
        os.close(child_in)
        os.close(child_out)
        hello = _recv(parent_in, time.monotonic() + self.start_timeout_s)
        if not isinstance(hello, dict) or "session" not in hello:
            error = hello.get("error") if isinstance(hello, dict) else "no answer"
            _Child(proc, parent_out, parent_in, "", 0).stop()
            raise TransferError(f"transfer engine process failed to start: {error}")
        return _Child(proc, parent_out, parent_in, hello["session"], hello["pool_ptr"])


def _worker_main(spec: dict) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the node
    fd_in, fd_out = spec["fds"]
    try:
        from ..tiers.cpu import CpuPool
        from .listen import restrict_listeners

        name, num_slots, slot_bytes = spec["pool"]
        pool = CpuPool.attach(name, num_slots, slot_bytes)
        settings = EngineSettings(**spec["settings"])
        transport = MooncakeTransport(settings)
        if settings.listen is not None:
            # Mooncake listens on every interface: only connections to our address get through.
            restricted = restrict_listeners(settings.listen)
            log.info("transfer engine ports %s accept connections to %s only",
                     sorted(x.port for x in restricted), settings.listen)
        base = pool.data_ptr()
        transport.register(base, pool.nbytes)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        _send(fd_out, {"error": f"{type(exc).__name__}: {exc}"})
        return
    _send(fd_out, {"session": transport.session, "pool_ptr": base})
    limit = pool.nbytes
    while True:
        request = _recv(fd_in, None)
        if not isinstance(request, dict):
            return  # the node closed the pipe
        local = request["local"]
        if any(off < 0 or off + n > limit for off, n in zip(local, request["lengths"])):
            _send(fd_out, {"ok": False})
            continue
        try:
            ok = transport.read(request["session"], [base + off for off in local], request["remote"],
                                request["lengths"])
        except StuckTransfer as exc:
            log.error("%s: exiting so that no late bytes can land in the pool", exc)
            os._exit(3)  # no reply, no clean-up that could wait on the engine: the node starts a fresh one
        _send(fd_out, {"ok": ok})


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
