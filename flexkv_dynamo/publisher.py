"""A standalone KV-event publisher, in vLLM's wire format, for setups where no vLLM publisher carries ours.

Inside a vLLM worker our tiers' events ride vLLM's own batches (the connector's ``take_events()``).
An engine without vLLM's publisher, or a cache service shared by several engines, publishes them
with this class instead; Dynamo's relay (``dynamo.llm.KvEventPublisher(zmq_endpoint=...)``) subscribes
to it exactly as it subscribes to vLLM.

Wire format (vLLM's ``ZmqEventPublisher``; see `flexkv_dynamo.kv_events`):

* PUB socket, one 3-frame message per batch: topic, 8-byte big-endian sequence number (0, 1, 2, ...
  per publisher), msgpack ``[ts, events, data_parallel_rank]``.
* Optional ROUTER replay socket: a client (DEALER, or REQ for the first reply only) sends
  ``[b"", start_seq as 8 bytes big-endian]``; it gets ``[b"", topic, seq, payload]`` for every
  buffered batch with seq >= start_seq, then the end marker ``[b"", b"", seq -1, b""]``.

Endpoints follow vLLM's rule: ``tcp://*:P``, ``ipc://`` and ``inproc://`` bind; a concrete host such
as ``tcp://10.0.0.5:P`` connects (then the subscriber binds). Dynamo's relay always connects, so the
publisher it listens to must bind. ``bind=True`` binds a concrete address (e.g. ``tcp://127.0.0.1:0``
for a free loopback port; `endpoint` then names the port picked).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import zmq

from .kv_events import encode_event_batch, event_frames, parse_seq

logger = logging.getLogger(__name__)

#: vLLM's end-of-replay marker: sequence number -1 as 8 signed big-endian bytes.
END_SEQ = (-1).to_bytes(8, "big", signed=True)


def is_bind_endpoint(endpoint: str) -> bool:
    """vLLM's rule: wildcard hosts and ipc/inproc endpoints bind, concrete tcp hosts connect."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind and return the endpoint actually bound (the real port when ``:0`` was asked)."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise OSError(f"cannot bind KV-event socket to {endpoint}: {exc}") from exc
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


class KvEventPublisher:
    """Publishes KV event batches on ZMQ exactly as vLLM's ``ZmqEventPublisher`` does.

    ``publish`` sends synchronously from the caller's thread (serialised by a lock); a background
    thread answers replay requests. Neither blocks on slow subscribers: ZMQ drops past the high-water
    mark, and subscribers recover missed sequence numbers through the replay socket.
    """

    def __init__(
        self,
        endpoint: str,
        topic: str = "kv-events",
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
        *,
        data_parallel_rank: int = 0,
        bind: bool | None = None,
        hwm: int = 100_000,
        linger_ms: int = 200,
    ) -> None:
        if buffer_steps <= 0:
            raise ValueError(f"buffer_steps must be positive, got {buffer_steps}")
        self.topic = topic
        self.data_parallel_rank = data_parallel_rank
        self._linger_ms = linger_ms
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._next_seq = 0
        self._lock = threading.Lock()  # guards the PUB socket, the sequence counter and the buffer
        self._closed = False

        ctx = zmq.Context.instance()
        self._pub = ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        try:
            if is_bind_endpoint(endpoint) if bind is None else bind:
                self.endpoint = _bind(self._pub, endpoint)
            else:
                self._pub.connect(endpoint)
                self.endpoint = endpoint
        except BaseException:
            self._pub.close(linger=0)
            raise

        self.replay_endpoint: str | None = None
        self._replay: zmq.Socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if replay_endpoint is not None:
            self._replay = ctx.socket(zmq.ROUTER)
            try:
                self.replay_endpoint = _bind(self._replay, replay_endpoint)
            except BaseException:
                self._replay.close(linger=0)
                self._pub.close(linger=0)
                raise
            self._thread = threading.Thread(target=self._serve_replay, name="kv-event-replay", daemon=True)
            self._thread.start()
        logger.info("KV-event publisher on %s (replay: %s, topic %r)", self.endpoint, self.replay_endpoint, topic)

    @property
    def next_seq(self) -> int:
        """The sequence number the next batch will carry."""
        return self._next_seq

    def publish(self, events: Sequence[msgspec.Struct], dp_rank: int | None = None) -> int:
        """Send one batch (vLLM ``KVCacheEvent`` structs) and return its sequence number.

        ``dp_rank`` defaults to the publisher's ``data_parallel_rank``: like vLLM, every batch names
        its rank, because Dynamo attributes events to (worker, dp_rank).
        """
        rank = self.data_parallel_rank if dp_rank is None else dp_rank
        payload = encode_event_batch(events, data_parallel_rank=rank)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"KV-event publisher on {self.endpoint} is closed")
            seq = self._next_seq
            self._pub.send_multipart(event_frames(self.topic, seq, payload))
            self._buffer.append((seq, payload))
            self._next_seq += 1
        return seq

    def _serve_replay(self) -> None:
        assert self._replay is not None
        while not self._stop.is_set():
            try:
                if not self._replay.poll(100):
                    continue
                frames = self._replay.recv_multipart()
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                raise
            if len(frames) != 3 or len(frames[2]) != 8:
                logger.warning("ignoring malformed replay request (%d frames): %r", len(frames), frames[:3])
                continue
            client, empty, start = frames
            start_seq = int.from_bytes(start, "big")
            with self._lock:
                batches = [(seq, payload) for seq, payload in self._buffer if seq >= start_seq]
            topic = self.topic.encode("utf-8")
            for seq, payload in batches:
                self._replay.send_multipart([client, empty, topic, seq.to_bytes(8, "big"), payload])
            self._replay.send_multipart([client, empty, b"", END_SEQ, b""])
            logger.debug("replayed %d batches from seq %d", len(batches), start_seq)

    def close(self) -> None:
        """Stop the replay thread and close the sockets (pending batches get ``linger_ms`` to leave)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._pub.close(linger=self._linger_ms)

    def __enter__(self) -> KvEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ReplayedBatch:
    seq: int
    topic: bytes
    payload: bytes


def request_replay(replay_endpoint: str, start_seq: int = 0, *, timeout_s: float = 5.0) -> list[ReplayedBatch]:
    """Ask a publisher's replay socket (ours or vLLM's) for every buffered batch from ``start_seq`` on.

    Raises TimeoutError naming the endpoint when the end marker does not arrive within ``timeout_s``.
    """
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(replay_endpoint)
        sock.send_multipart([b"", start_seq.to_bytes(8, "big")])
        batches: list[ReplayedBatch] = []
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not sock.poll(remaining_ms):
                raise TimeoutError(
                    f"no end of replay from {replay_endpoint} within {timeout_s}s "
                    f"(got {len(batches)} batches from seq {start_seq})"
                )
            frames = sock.recv_multipart()
            if len(frames) != 4:
                raise ValueError(f"malformed replay reply from {replay_endpoint}: {len(frames)} frames")
            _, topic, seq_frame, payload = frames
            seq = parse_seq(seq_frame)
            if seq == -1:
                return batches
            batches.append(ReplayedBatch(seq=seq, topic=topic, payload=payload))
    finally:
        sock.close()
