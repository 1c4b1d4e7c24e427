"""Talking to a cache service: the wire format and a client that never hangs.

The wire (also what a non-Python tool would speak): a ZMQ ROUTER socket on the service side; a DEALER
or REQ socket on the client side. A request is one msgpack frame ``{"method": str, "args": {...}}``;
the reply is one msgpack frame ``{"ok": bool, "result": any, "error": str}``. The service echoes every
frame before the last one, so a REQ client (empty delimiter frame) and our DEALER client (a request-id
frame, used to drop late replies) both work.

`CacheClient.call` raises `ServiceUnavailable` when nobody answers within the timeout and
`ServiceError` when the service answered with an error. After a timeout the socket is thrown away, so a
late reply can never be taken for the answer to the next call.

A peer that is gone need not cost the whole timeout. ZMQ hides connection failures (a DEALER reconnects
silently to a closed port and keeps the request queued), so the client watches its socket's monitor
events: a refused or dropped connection, or a handshake that fails, ends the call at once. With
``liveness_s`` it also asks libzmq to exchange heartbeats (ZMTP PING/PONG, answered by the peer's libzmq
I/O thread, not by Python): a peer that is frozen (SIGSTOP, a partition) is dropped within ``liveness_s``,
while one that is merely slow to answer (a handler waiting on the SSD) is not.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message


class Request(msgspec.Struct):
    method: str
    args: dict[str, Any] = {}


class Reply(msgspec.Struct):
    ok: bool
    result: Any = None
    error: str = ""


class ServiceUnavailable(ConnectionError):
    """Nobody answered at the endpoint within the timeout."""

    def __init__(self, endpoint: str, message: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint


class ServiceError(RuntimeError):
    """The service answered, with an error (a failed handler, an unknown method, a bad request)."""

    def __init__(self, endpoint: str, method: str, error: str) -> None:
        super().__init__(f"flexkv service at {endpoint} failed {method!r}: {error}")
        self.endpoint = endpoint
        self.method = method
        self.error = error


def check_endpoint(endpoint: str) -> str:
    """Validate an endpoint string; returns it unchanged. Raises ValueError naming what is wrong."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not path:
            raise ValueError(f"FLEXKV_SERVER_RECV_PORT {endpoint!r} has an empty ipc path")
        # sun_path is 108 bytes including the terminating NUL; libzmq refuses longer paths.
        if len(path.encode()) > 107:
            raise ValueError(
                f"FLEXKV_SERVER_RECV_PORT {endpoint!r}: ipc path is {len(path.encode())} bytes, the limit is "
                "107 (Unix socket path length); use a shorter path")
        return endpoint
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint[len("tcp://"):].rpartition(":")
        if not sep or not host or not (port == "*" or port.isdigit()):
            raise ValueError(f"FLEXKV_SERVER_RECV_PORT {endpoint!r} must look like tcp://HOST:PORT")
        return endpoint
    raise ValueError(
        f"FLEXKV_SERVER_RECV_PORT {endpoint!r} must be ipc://PATH or tcp://HOST:PORT")


def ipc_path(endpoint: str) -> str | None:
    """The socket file of an ipc:// endpoint (None for tcp and for Linux abstract sockets, ipc://@name)."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        return endpoint[len("ipc://"):]
    return None


def connect_address(endpoint: str) -> str:
    """Where a client connects for a bind endpoint: wildcard tcp hosts become the loopback address."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if host in ("*", "0.0.0.0"):
            return f"tcp://127.0.0.1:{port}"
        if host in ("::", "[::]"):
            return f"tcp://[::1]:{port}"
    return endpoint


#: Monitor events meaning the connection is not (or no longer) usable: a reply will not come on it.
_LOST = {zmq.EVENT_CONNECT_RETRIED: "connection refused", zmq.EVENT_DISCONNECTED: "connection lost",
         zmq.EVENT_CLOSED: "connection refused", zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
         zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed", zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake failed"}
_WATCHED = zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(_LOST)


class CacheClient:
    """A blocking request/reply client for a `CacheService`. Thread-safe (calls are serialised).

    ``liveness_s`` (None: off) turns on transport heartbeats: a peer whose libzmq stops answering for that
    long (frozen, partitioned) fails the call then, whatever ``timeout_s`` is. ``hint`` is appended to the
    message of `ServiceUnavailable` (which setting names this endpoint).
    """

    def __init__(self, endpoint: str, timeout_s: float = 5.0, *, liveness_s: float | None = None,
                 hint: str = "is the cache service running and is FLEXKV_SERVER_RECV_PORT the same on both sides?"
                 ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"CacheClient timeout_s must be > 0, got {timeout_s!r}")
        if liveness_s is not None and liveness_s <= 0:
            raise ValueError(f"CacheClient liveness_s must be > 0 or None, got {liveness_s!r}")
        self.endpoint = check_endpoint(endpoint)
        self.timeout_s = timeout_s
        self.liveness_s = liveness_s
        self.hint = hint
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._up = False  # the current connection completed its handshake and has not been lost since
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Reply)

    def _socket(self) -> zmq.Socket:
        if self._sock is not None and not self._up:
            self._lost_since_send()  # what happened since the last call (events queued meanwhile)
            if not self._up:
                # Not connected now: a fresh socket connects at once instead of waiting out ZMQ's
                # reconnect back-off, and its first verdict (refused or up) is about the peer as it is now.
                self._drop_socket()
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)  # never block interpreter exit on unsent requests
            if self.liveness_s is not None:
                ms = max(1, int(self.liveness_s * 1000))
                sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, ms // 5))
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ms)
                sock.setsockopt(zmq.HANDSHAKE_IVL, ms)  # accepted by a frozen peer's kernel, never greeted
            self._monitor = sock.get_monitor_socket(_WATCHED)
            sock.connect(connect_address(self.endpoint))
            self._sock, self._up = sock, False
        return self._sock

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close(linger=0)
            self._sock = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        self._up = False

    def _lost_since_send(self) -> str | None:
        """Apply the monitor events waiting; the reason if the connection was lost or refused (and has not
        come back since)."""
        lost = None
        while self._monitor is not None:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                break
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._up, lost = True, None
            elif event in _LOST:
                self._up, lost = False, lost or _LOST[event]  # the first cause, not the retries after it
        return lost

    def call(self, method: str, /, **args: Any) -> Any:
        """Call ``method`` with keyword ``args``; returns its result.

        Raises ServiceUnavailable (no answer within ``timeout_s``) or ServiceError (the remote error).
        """
        payload = self._encoder.encode(Request(method=method, args=args))
        with self._lock:
            request_id = str(next(self._ids)).encode()
            sock = self._socket()
            deadline = time.monotonic() + self.timeout_s
            try:
                sock.send_multipart([request_id, payload], flags=zmq.NOBLOCK)
            except zmq.Again:
                self._drop_socket()
                raise ServiceUnavailable(self.endpoint, self._unavailable_message(method)) from None
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(self._monitor, zmq.POLLIN)
            while True:
                left_s = deadline - time.monotonic()
                ready = dict(poller.poll(math.ceil(left_s * 1000))) if left_s > 0 else {}
                lost = self._lost_since_send() if self._monitor in ready else None
                if lost is not None or not ready:
                    # A fresh socket next time: a late reply to this request must never be read as the
                    # reply to a later one, and a wedged connection must not outlive the timeout. A lost
                    # connection loses the request with it (ZMQ does not resend): no reply will come.
                    self._drop_socket()
                    raise ServiceUnavailable(self.endpoint, self._unavailable_message(method, lost))
                if sock not in ready:
                    continue
                frames = sock.recv_multipart()
                if len(frames) == 2 and frames[0] == request_id:
                    break
                # A reply to an earlier request on this socket cannot happen (we drop the socket on
                # timeout), but a malformed frame set must not be taken for ours: skip it.
            try:
                reply = self._decoder.decode(frames[1])
            except msgspec.DecodeError as e:
                raise ServiceError(self.endpoint, method, f"undecodable reply ({e})") from None
        if not reply.ok:
            raise ServiceError(self.endpoint, method, reply.error)
        return reply.result

    def _unavailable_message(self, method: str, lost: str | None = None) -> str:
        if lost is None:
            msg = f"no answer from a flexkv service at {self.endpoint} to {method!r} within {self.timeout_s:g} s"
        else:
            msg = f"no answer from a flexkv service at {self.endpoint} to {method!r}: {lost}"
        path = ipc_path(self.endpoint)
        if path is not None and not os.path.exists(path):
            msg += f" (no socket file {path}: no service is running there)"
        else:
            msg += f" ({self.hint})"
        return msg

    def close(self) -> None:
        with self._lock:
            self._drop_socket()

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
