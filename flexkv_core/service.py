"""The cache service: one endpoint per cache, held exclusively, answering small requests.

``FLEXKV_SERVER_RECV_PORT`` (default ``ipc:///tmp/flexkv_server``) names it. TP worker processes ask it
where the shared CPU pool is (``attach``), ``flexkv status`` asks it for usage, and several engine
instances may share one cache through it when both sides set ``FLEXKV_SHARE_SERVER=1``.

Exclusivity is the point of this module. libzmq, asked to bind an ipc path that exists, silently unlinks
it and takes it over, so two workers configured with the same port each believe they own it and
requests go to whichever bound last (upstream FlexKV users see this as a hang). Here:

* ``ipc://PATH``: the owner holds ``flock`` on ``PATH.lock`` (which holds its pid) for as long as it
  serves. A second owner fails at once with `EndpointInUse` naming the endpoint and that pid. A socket
  file with no lock holder is left by a dead owner: it is reclaimed (with a warning) unless something
  still listens on it, in which case the listener's pid (from the kernel) is named instead.
* ``tcp://HOST:PORT``: the bind itself fails with EADDRINUSE; the holder is asked ``whoami`` (at most
  2 s) so the error can name its pid, or "an unknown process".
* ``share=True``: if the holder is a flexkv service that also shares, `start` does not bind; it records
  ``attached_to`` (the holder's pid) and the caller talks to the holder with a `CacheClient`.

Requests are served one at a time on a daemon thread; handlers run on that thread, so they must be
safe to call alongside whatever else the owning process does with the cache.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import zmq

from .client import (
    CacheClient,
    Reply,
    Request,
    ServiceError,
    ServiceUnavailable,
    check_endpoint,
    ipc_path,
)

logger = logging.getLogger(__name__)

#: How long a holder of an endpoint gets to answer ``whoami`` before we call it "an unknown process".
PROBE_TIMEOUT_S = 2.0
_POLL_MS = 100  # how often the serving thread looks at its stop flag

_ADVICE = ("give each worker its own FLEXKV_SERVER_RECV_PORT, or set FLEXKV_SHARE_SERVER=1 "
           "to share one cache")


class EndpointInUse(RuntimeError):
    """Another live process holds the endpoint. ``holder_pid`` is None when it could not be named."""

    def __init__(self, endpoint: str, holder_pid: int | None, message: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.holder_pid = holder_pid


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to another user
        return True
    return True


def _describe_pid(pid: int) -> str:
    """A short description of a process, from /proc, for error messages."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
    return cmd if len(cmd) <= 80 else cmd[:77] + "..."


def _holder_details(info: Mapping[str, Any]) -> str:
    """'flexkv service 'name', sharing' or similar, from a whoami answer or a lock file record."""
    parts = [f"flexkv service {info.get('name', '?')!r}"]
    started = info.get("started_at")
    if isinstance(started, (int, float)):
        parts.append("started " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)))
    parts.append("sharing" if info.get("share") else "not sharing")
    return ", ".join(parts)


# A process forked from an owner inherits its lock file descriptor, and with it the flock: the endpoint
# would stay "held" after the owner died, by a child that serves nothing. Children drop it at fork.
_LIVE_SERVICES: weakref.WeakSet[CacheService] = weakref.WeakSet()


def _drop_locks_in_child() -> None:
    for service in list(_LIVE_SERVICES):
        service._forget_in_child()


os.register_at_fork(after_in_child=_drop_locks_in_child)


def probe_endpoint(endpoint: str) -> None:
    """Check that this process could serve ``endpoint`` now, the way `CacheService.start` claims it, and
    let it go at once (within about PROBE_TIMEOUT_S). For launchers, before they load anything heavy.

    Raises `EndpointInUse` naming the holder, or OSError when it cannot be bound at all (a missing ipc
    directory, a host that is not this machine's)."""
    service = CacheService(endpoint, {}, name="flexkv-probe")
    service.start()
    service.stop()


class CacheService:
    """Serves ``handlers`` (plus the built-in ``whoami``) at ``endpoint``, exclusively.

    ``handlers`` maps a method name to a callable taking the request's args as keyword arguments and
    returning something msgpack can encode (dicts, lists, numbers, strings, dataclasses, enums).
    """

    def __init__(self, endpoint: str, handlers: Mapping[str, Callable[..., Any]], *, share: bool = False,
                 name: str = "flexkv") -> None:
        self.endpoint = check_endpoint(endpoint)
        if "whoami" in handlers:
            raise ValueError("handler name 'whoami' is reserved for the service itself")
        self.handlers: dict[str, Callable[..., Any]] = dict(handlers)
        self.share = share
        self.name = name
        self.pid = os.getpid()
        self.started_at: float | None = None
        #: pid of the sharing owner we attached to instead of binding (share=True only)
        self.attached_to: int | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock_fd: int | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Request)

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- start / stop -------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and serve on a daemon thread; or, with share=True, attach to a sharing owner.

        Raises EndpointInUse (within PROBE_TIMEOUT_S plus a little) when a live process holds the endpoint.
        """
        if self._thread is not None or self.attached_to is not None:
            raise RuntimeError(f"CacheService at {self.endpoint} already started")
        self.pid = os.getpid()
        path = ipc_path(self.endpoint)
        if path is not None:
            if self._take_ipc_lock(path) is False:
                return  # attached to a sharing owner
            try:
                self._reclaim_stale_socket(path)
                self._bind()
            except BaseException:
                self._release_ipc_lock(path)
                raise
        else:
            try:
                self._bind()
            except zmq.ZMQError as e:
                if e.errno != zmq.EADDRINUSE:
                    raise
                self._on_busy_tcp()
                return
        self.started_at = time.time()
        if self._lock_fd is not None:
            self._write_lock_record()
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=f"flexkv-service {self.endpoint}",
                                        daemon=True)
        self._thread.start()
        _LIVE_SERVICES.add(self)
        logger.info("flexkv service %r serving at %s (pid %d, share=%s)", self.name, self.endpoint,
                    self.pid, self.share)

    def stop(self) -> None:
        """Stop serving and free the endpoint (socket file and lock file removed). Idempotent."""
        self.attached_to = None
        thread = self._thread
        if thread is not None:
            self._stop.set()
            thread.join(timeout=10)
            if thread.is_alive():
                # A handler is stuck and still owns the socket: keep the endpoint (and its lock) held
                # rather than let a new owner bind next to a listener we cannot close.
                logger.error("flexkv service thread at %s did not stop within 10 s; the endpoint stays "
                             "held until this process exits", self.endpoint)
                return
            self._thread = None
        if self._ctx is not None:
            # The serving thread closed the socket; term() waits until libzmq has really closed the
            # listener. That matters for ipc: libzmq unlinks the socket file *by name* when it closes the
            # listener, which must not happen after the next owner has bound the same path.
            if self._sock is not None:  # bound but never served (start failed half-way)
                self._sock.close(linger=0)
                self._sock = None
            self._ctx.term()
            self._ctx = None
        path = ipc_path(self.endpoint)
        if path is not None and self._lock_fd is not None:
            self._release_ipc_lock(path, remove_socket=True)
        _LIVE_SERVICES.discard(self)

    def __enter__(self) -> CacheService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _bind(self) -> None:
        ctx = zmq.Context(io_threads=1)  # our own, so stop() can wait for libzmq to let go (see stop)
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            ctx.term()
            if e.errno == zmq.EADDRINUSE:
                raise
            raise OSError(e.errno, f"cannot bind FLEXKV_SERVER_RECV_PORT {self.endpoint}: {e}") from None
        if self.endpoint.endswith(":*"):  # tcp://HOST:* picks a free port: report the real one
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ctx, self._sock = ctx, sock

    # --- ipc exclusivity ----------------------------------------------------------------------------

    def _take_ipc_lock(self, path: str) -> bool:
        """Hold PATH.lock. Returns False when attached to a sharing owner; raises EndpointInUse."""
        lock_path = path + ".lock"
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise OSError(e.errno, f"cannot open the lock file {lock_path} of FLEXKV_SERVER_RECV_PORT "
                                       f"{self.endpoint}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return self._on_locked(lock_path)
            # The previous owner may have unlinked the lock file between our open() and our flock():
            # then we hold a lock on a file nobody else can find. Only the file at lock_path counts.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                _LIVE_SERVICES.add(self)  # from now on a fork must not carry the lock along
                # Our pid right away: a contender must never read the record of a dead previous owner.
                self._write_lock_record()
                return True
            os.close(fd)

    def _write_lock_record(self) -> None:
        # First line: the pid alone (for `kill $(head -1 PATH.lock)`); second: details for error messages.
        record = f"{self.pid}\n" + json.dumps({"pid": self.pid, "name": self.name, "share": self.share,
                                               "started_at": self.started_at}) + "\n"
        # (Written twice: with started_at None when the lock is taken, then again once bound.)
        assert self._lock_fd is not None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, record.encode(), 0)

    def _read_lock_record(self, lock_path: str) -> tuple[int | None, dict[str, Any]]:
        # The holder writes its record right after binding: give it a moment if we caught it in between.
        deadline = time.monotonic() + 0.5
        while True:
            try:
                with open(lock_path) as f:
                    lines = f.read().splitlines()
                pid = int(lines[0])
                info = json.loads(lines[1]) if len(lines) > 1 else {}
                return pid, info
            except (OSError, ValueError, IndexError):
                if time.monotonic() > deadline:
                    return None, {}
                time.sleep(0.02)

    def _on_locked(self, lock_path: str) -> bool:
        pid, info = self._read_lock_record(lock_path)
        if pid is not None and not _pid_alive(pid):
            raise EndpointInUse(
                self.endpoint, pid,
                f"FLEXKV_SERVER_RECV_PORT {self.endpoint} is locked ({lock_path}) in the name of pid {pid}, "
                "which is no longer running: a process it started still holds the lock; stop that "
                f"process, or {_ADVICE}")
        if self.share:
            return self._attach_or_raise(pid)
        who = f"pid {pid}" if pid is not None else "another process (pid not recorded yet)"
        details = _holder_details(info) if info else _describe_pid(pid) if pid else ""
        raise EndpointInUse(
            self.endpoint, pid,
            f"FLEXKV_SERVER_RECV_PORT {self.endpoint} is held by {who}" + (f" ({details})" if details else "")
            + f"; {_ADVICE}")

    def _reclaim_stale_socket(self, path: str) -> None:
        """We hold the lock. A socket file still there was left by a dead owner, unless someone listens."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(
                f"FLEXKV_SERVER_RECV_PORT {self.endpoint}: {path} exists and is not a socket; "
                "refusing to replace it (libzmq would delete it)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            logger.warning("FLEXKV_SERVER_RECV_PORT %s: reclaiming the socket file %s left by a process "
                           "that is gone", self.endpoint, path)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        except OSError as e:
            raise OSError(e.errno, f"FLEXKV_SERVER_RECV_PORT {self.endpoint}: cannot probe {path}: "
                                   f"{e.strerror}") from None
        else:
            # Something accepts connections without holding our lock. The kernel tells who created the
            # listener. If that process is dead, the listener is an orphan kept open by a child it forked
            # (it inherited the fd): nothing will ever answer there, so the path is ours to reclaim.
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0] or None
            if pid is not None and not _pid_alive(pid):
                logger.warning("FLEXKV_SERVER_RECV_PORT %s: reclaiming %s, whose listener was created by pid "
                               "%d (gone) and is only kept open by a process it forked", self.endpoint,
                               path, pid)
                os.unlink(path)
                return
            desc = _describe_pid(pid) if pid else ""
            raise EndpointInUse(
                self.endpoint, pid,
                f"FLEXKV_SERVER_RECV_PORT {self.endpoint} is held by "
                + (f"pid {pid}" if pid else "an unknown process") + (f" ({desc})" if desc else "")
                + f", which listens on {path} without holding {path}.lock (not a flexkv service of this "
                f"version?); {_ADVICE}")
        finally:
            probe.close()

    def _release_ipc_lock(self, path: str, remove_socket: bool = False) -> None:
        # Unlink while still holding the lock, so the next owner never finds our files half-removed.
        for victim in ((path,) if remove_socket else ()) + (path + ".lock",):
            try:
                os.unlink(victim)
            except FileNotFoundError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _forget_in_child(self) -> None:
        # After fork, in the child: close our copy of the lock fd (the parent keeps the lock) and forget
        # the parent's sockets and thread without touching them.
        if self._lock_fd is not None:
            try:
                os.close(self._lock_fd)
            except OSError:
                pass
        self._lock_fd = None
        self._ctx = self._sock = self._thread = None

    # --- tcp exclusivity ----------------------------------------------------------------------------

    def _on_busy_tcp(self) -> None:
        if self.share:
            self._attach_or_raise(None)
            return
        info = self._whoami_of_holder()
        if info is None:
            raise EndpointInUse(
                self.endpoint, None,
                f"FLEXKV_SERVER_RECV_PORT {self.endpoint} is held by an unknown process (it did not answer "
                f"within {PROBE_TIMEOUT_S:g} s: not a flexkv service); {_ADVICE}")
        pid = info.get("pid")
        raise EndpointInUse(
            self.endpoint, pid,
            f"FLEXKV_SERVER_RECV_PORT {self.endpoint} is held by pid {pid} ({_holder_details(info)}); {_ADVICE}")

    # --- sharing ------------------------------------------------------------------------------------

    def _whoami_of_holder(self) -> dict[str, Any] | None:
        client = CacheClient(self.endpoint, timeout_s=PROBE_TIMEOUT_S)
        try:
            info = client.call("whoami")
        except (ServiceUnavailable, ServiceError):
            return None
        finally:
            client.close()
        return info if isinstance(info, dict) else None

    def _attach_or_raise(self, locked_by: int | None) -> bool:
        info = self._whoami_of_holder()
        if info is None:
            who = f"pid {locked_by}" if locked_by else "an unknown process"
            raise EndpointInUse(
                self.endpoint, locked_by,
                f"FLEXKV_SERVER_RECV_PORT {self.endpoint} is held by {who}, which did not answer within "
                f"{PROBE_TIMEOUT_S:g} s, so this cache cannot share it; {_ADVICE}")
        pid = info.get("pid")
        if not info.get("share"):
            raise EndpointInUse(
                self.endpoint, pid,
                f"FLEXKV_SERVER_RECV_PORT {self.endpoint} is held by pid {pid} ({_holder_details(info)}), "
                "which does not share it: to share one cache, BOTH sides must set FLEXKV_SHARE_SERVER=1; "
                "otherwise give each worker its own FLEXKV_SERVER_RECV_PORT")
        self.attached_to = pid
        logger.info("FLEXKV_SERVER_RECV_PORT %s: sharing the cache served by pid %s", self.endpoint, pid)
        return False

    # --- serving ------------------------------------------------------------------------------------

    def _whoami(self) -> dict[str, Any]:
        return {"pid": self.pid, "name": self.name, "endpoint": self.endpoint,
                "started_at": self.started_at, "share": self.share}

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stop.is_set():
            try:
                if not sock.poll(_POLL_MS, zmq.POLLIN):
                    continue
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            except zmq.ZMQError as e:  # the context is going away
                logger.debug("flexkv service at %s stops on %s", self.endpoint, e)
                break
            if len(frames) < 2:  # a ROUTER always prepends the peer identity; anything else is noise
                continue
            reply = self._handle(frames[-1])
            try:
                sock.send_multipart(frames[:-1] + [reply], flags=zmq.NOBLOCK)
            except zmq.ZMQError as e:  # peer gone: ROUTER drops, but never let it kill the loop
                logger.debug("flexkv service at %s: reply dropped (%s)", self.endpoint, e)
        # Close from the thread that used the socket (ZMQ sockets belong to one thread at a time).
        sock.close(linger=0)
        self._sock = None

    def _handle(self, payload: bytes) -> bytes:
        try:
            request = self._decoder.decode(payload)
        except msgspec.DecodeError as e:
            return self._encoder.encode(Reply(ok=False, error=f"malformed request ({e})"))
        method = request.method
        if method == "whoami":
            handler: Callable[..., Any] | None = self._whoami
        else:
            handler = self.handlers.get(method)
        if handler is None:
            known = ", ".join(sorted([*self.handlers, "whoami"]))
            return self._encoder.encode(Reply(ok=False, error=f"unknown method {method!r}; known: {known}"))
        try:
            result = handler(**request.args)
        except Exception as e:
            logger.warning("flexkv service at %s: %s(%s) failed: %r", self.endpoint, method,
                           ", ".join(request.args), e)
            return self._encoder.encode(Reply(ok=False, error=f"{type(e).__name__}: {e}"))
        try:
            return self._encoder.encode(Reply(ok=True, result=result))
        except (TypeError, ValueError, OverflowError) as e:
            return self._encoder.encode(Reply(
                ok=False, error=f"{method!r} returned a value that cannot be sent ({type(e).__name__}: {e})"))

