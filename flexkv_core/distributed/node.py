"""`DistributedNode`: one cache taking part in cross-node reuse.

It does three jobs for its `TieredCache`:

* **publish**: it listens to the cache's events and keeps Redis's record of what this node holds (CPU or
  SSD) and of its liveness, under leases it renews (`registry`);
* **serve**: it hosts ``export`` / ``release_export`` on a tcp port (``dist_service_port``) so peers can
  pin our blocks, and registers our CPU pool with the transfer engine so they can read them (`transfer`);
* **fetch**: as the cache's `RemoteSource`, it answers lookups from a local snapshot of the global index
  (`snapshot`) and fetches remote blocks: ask the holder to export them (pinned for a lease, with xxh3
  checksums), read its slots into ours over the transfer engine, verify, release.

Checksums (``dist_verify``, on by default) cost one pass over the bytes on each side. The lender's pass
is taken off the fetch path: a background thread hashes blocks soon after they are stored in CPU (SSD
writes and verified reads and fetches already know theirs), so an export usually only looks them up.

Leaving: `close` unregisters the node. A process that is killed instead (vLLM kills its engine core at
shutdown) is unregistered by its *goodbye* process (`goodbye`) as soon as it has ended; a peer that
asks it for blocks meanwhile gets a refused connection at once (or, for a frozen node, no heartbeat
within `PEER_LIVENESS_S`) and skips it for a lease.

Failure model: Redis is optional at run time. Down at start: a warning, local only, retried in the
background; lost later: the snapshot is kept until it is a lease old (then dropped), and when Redis is
back the node republishes everything it holds. A wrong password is a start-up error. Every fetch ends
within bounded time (RPC timeouts, the transfer engine's progress timeout, the lease); whatever did
not arrive intact is None, which the cache turns into recomputation.

One background thread does all Redis work (publish, heartbeat, refresh, reconnect), so the event
listener (called under the cache's lock) only appends to a queue.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import redis
import xxhash

from ..cache import TieredCache
from ..client import CacheClient, ServiceError, ServiceUnavailable
from ..config import FlexKVConfig
from ..events import BlockRemoved, BlockStored, CacheEvent
from ..layout import Tier
from ..remote import RemoteBlock
from ..service import CacheService
from .goodbye import Goodbye, GoodbyeSpec
from .listen import listen_address
from .registry import NodeInfo, Registry
from .snapshot import GlobalSnapshot
from .transfer import EngineProcess, EngineSettings, check_metadata

log = logging.getLogger(__name__)

__all__ = ["DistributedNode", "NodeStats", "start_distributed"]

_TIER_BIT = {Tier.CPU: 1, Tier.SSD: 2}
#: Bytes per export and transfer-engine call, at most: pieces are pipelined (see _fetch_run), and
#: before each the reader checks that the lease still covers it.
_PIECE_BYTES = 64 << 20
_EDGE_PIECE_BYTES = 8 << 20  # the first export and the last check are not overlapped: keep them short
#: A peer whose libzmq answers no heartbeat for this long is gone (frozen, partitioned): the export call
#: fails then instead of at FLEXKV_DIST_TIMEOUT_S. A dead peer's closed port fails it at once. A peer that
#: is merely slow to answer (staging from its SSD) keeps answering heartbeats: its libzmq I/O thread does.
PEER_LIVENESS_S = 0.5


def _pieces(n: int, slot_bytes: int) -> list[tuple[int, int]]:
    """Split ``n`` blocks into pieces growing from `_EDGE_PIECE_BYTES` at both ends to `_PIECE_BYTES` in
    the middle (8, 16, 32, 64, 64, ..., 32, 16, 8 MiB)."""
    left: list[int] = []
    right: list[int] = []
    size, remaining = _EDGE_PIECE_BYTES, n
    while remaining > 0:
        for side in (left, right):  # one piece from each end, then grow
            count = min(remaining, max(1, size // slot_bytes))
            if count:
                side.append(count)
                remaining -= count
        size = min(2 * size, _PIECE_BYTES)
    out, start = [], 0
    for count in left + right[::-1]:
        out.append((start, start + count))
        start += count
    return out


@dataclass
class _Grant:
    """One piece a peer exported to us: ``hashes[start:stop]`` asked, ``len(slots)`` granted."""

    start: int
    stop: int
    job: int
    slots: list[int]
    parents: list[int | None]
    tokens: list[bytes]
    checksums: list[int | None]  # None: not asked for (dist_verify off)
    deadline: float  # monotonic time its pin may end
    began: float = 0.0  # when its transfer started

    @property
    def whole(self) -> bool:
        return len(self.slots) == self.stop - self.start


@dataclass
class NodeStats:
    """Counters a user (or a test) can read off a node."""

    fetched_blocks: int = 0
    failed_blocks: int = 0  # asked for, did not arrive intact
    checksum_mismatches: int = 0
    lease_aborts: int = 0  # transfers given up because the lease would not cover them
    grants: int = 0  # exports peers granted us
    publishes: int = 0
    resyncs: int = 0  # full republications (start, Redis back, lease lost)
    fetched_bytes: int = 0
    checksummed_ahead: int = 0  # stored blocks hashed in the background, before any peer asked
    lent_blocks: int = 0  # blocks we exported to peers (pinned for them to read)
    exports: int = 0  # export requests peers sent us


def start_distributed(cache: TieredCache, config: FlexKVConfig) -> DistributedNode | None:
    """A started `DistributedNode` for ``cache`` when ``enable_distributed`` is set, else None."""
    if not config.enable_distributed:
        return None
    node = DistributedNode(cache, config)
    node.start()
    return node


class DistributedNode:
    def __init__(self, cache: TieredCache, config: FlexKVConfig) -> None:
        check_metadata(config.te_metadata)
        self.cache = cache
        self.config = config
        self.lease_s = config.dist_lease_s
        self.timeout_s = config.dist_timeout_s
        self.slot_bytes = cache.layout.slot_bytes
        self.stats = NodeStats()
        self._stats_lock = threading.Lock()  # fetch threads count concurrently
        self.registry = Registry(config.redis_host, config.redis_port, config.redis_password, config.redis_db,
                                 cache.identity.fingerprint(), lease_s=self.lease_s, timeout_s=self.timeout_s)
        self.transport: EngineProcess | None = None
        self.service: CacheService | None = None
        self.info: NodeInfo | None = None
        self.snapshot: GlobalSnapshot | None = None
        self.connected = False
        # What we hold, per block: a bit per tier (the Redis set has a block while any bit is set).
        self._held: dict[int, int] = {}
        self._subscribed = False
        self._dirty: set[int] = set()  # blocks whose membership changed since the last publish
        self._events: collections.deque[CacheEvent] = collections.deque()
        self.verify = config.dist_verify
        self._unhashed: collections.deque[int] = collections.deque()  # CPU blocks to checksum ahead
        self._clients: dict[tuple[str, str], CacheClient] = {}
        self._clients_lock = threading.Lock()
        self._rate = 100e6  # bytes/s assumed for a transfer until we measured one (conservative)
        self._fetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flexkv-fetch")
        self._releaser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flexkv-release")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hasher: threading.Thread | None = None
        self._auth_warned = False
        self._goodbye: Goodbye | None = None
        self._closed = False

    @property
    def node_id(self) -> str:
        assert self.info is not None, "DistributedNode not started"
        return self.info.node_id

    # ---- life cycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (a refused password raises ConfigError; an unreachable Redis only warns), start the
        transfer engine and the export service, publish, and become the cache's remote source."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        cfg = self.config
        try:
            self.registry.connect()
            self.connected = True
        except redis.ConnectionError as exc:
            log.warning("Redis at %s unreachable (%s): serving local blocks only; retrying in the background",
                        self.registry.where, exc)
        pool = self.cache.pool
        listen = listen_address(cfg.dist_bind_addr, cfg.node_addr)  # None: every interface, as asked
        settings = EngineSettings(host=cfg.node_addr, protocol=cfg.te_protocol, device=cfg.te_device,
                                  metadata=cfg.te_metadata, port=cfg.te_port, timeout_s=self.timeout_s,
                                  listen=listen)
        self.transport = EngineProcess(settings, pool.name, pool.num_slots, self.slot_bytes)
        self._generation = self.transport.generation
        port = cfg.dist_service_port or "*"
        host = "*" if listen is None else f"[{listen}]" if ":" in listen else listen
        self.service = CacheService(f"tcp://{host}:{port}",
                                    {"export": self._lend, "release_export": self.cache.release_export},
                                    name="flexkv-distributed")
        self.service.start()
        service_port = self.service.endpoint.rpartition(":")[2]
        node_id = f"{cfg.node_addr}:{service_port}"
        self.info = NodeInfo(node_id=node_id, epoch="", service=f"tcp://{cfg.node_addr}:{service_port}",
                             session=self.transport.session, pool_ptr=self.transport.pool_ptr,
                             slot_bytes=self.slot_bytes, num_slots=pool.num_slots, pid=os.getpid())
        self.snapshot = GlobalSnapshot(node_id, self.slot_bytes)
        # Before we first register: whatever ends this process from now on, our keys leave Redis with it.
        self._goodbye = Goodbye.start(GoodbyeSpec(
            host=cfg.redis_host, port=cfg.redis_port, password=cfg.redis_password, db=cfg.redis_db,
            node_keys=self.registry.node_keys(node_id), nodes_key=self.registry.key("nodes"), node_id=node_id,
            pid=os.getpid(), timeout_s=self.timeout_s, give_up_s=self.lease_s))
        self._held = _subscribe(self.cache, self._on_event)
        self._subscribed = True
        self._dirty.clear()
        if self.verify:
            self._unhashed.extend(h for h, bits in self._held.items() if bits & _TIER_BIT[Tier.CPU])
            self._hasher = threading.Thread(target=self._hash_loop, name=f"flexkv-checksums {node_id}", daemon=True)
            self._hasher.start()
        if self.connected:
            try:
                self._resync()
                self.snapshot.refresh(self.registry)
            except redis.RedisError as exc:
                self._offline(exc)
        self._thread = threading.Thread(target=self._sync_loop, name=f"flexkv-dist {node_id}", daemon=True)
        self._thread.start()
        self.cache.remote = self
        log.info("distributed node %s up: Redis %s (%s), %d blocks held, lease %gs, snapshot every %gs",
                 node_id, self.registry.where, "connected" if self.connected else "offline", len(self._held),
                 self.lease_s, cfg.dist_snapshot_interval_s)

    def close(self) -> None:
        """Stop using and serving peers, leave Redis (peers forget us at their next refresh)."""
        if self._closed:
            return
        self._closed = True
        if self.cache.remote is self:
            self.cache.remote = None
        if self._subscribed:
            self.cache.unsubscribe(self._on_event)
        self._stop.set()
        for thread in (self._thread, self._hasher):
            if thread is not None:
                thread.join(timeout=self.timeout_s + 5)
        self._fetcher.shutdown(wait=True)
        self._releaser.shutdown(wait=True)
        if self._goodbye is not None:
            self._goodbye.cancel()  # we say it ourselves, now
        if self.connected and self.info is not None:
            try:
                self.registry.unregister(self.node_id)
            except redis.RedisError:
                pass
        if self.service is not None:
            self.service.stop()
        with self._clients_lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
        if self.transport is not None:
            self.transport.close()
        self.registry.close()

    def __enter__(self) -> DistributedNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- RemoteSource ------------------------------------------------------------------------------

    def lookup(self, block_hashes: Sequence[int]) -> int:
        if self.snapshot is None or self._closed:
            return 0
        return self.snapshot.lookup(block_hashes)

    def fetch(self, block_hashes: Sequence[int], buffers: Sequence[memoryview]) -> Future[list[RemoteBlock | None]]:
        fut: Future[list[RemoteBlock | None]] = Future()
        hashes = list(block_hashes)
        runs = self.snapshot.plan(hashes) if self.snapshot is not None and not self._closed else []
        if not runs:
            fut.set_result([None] * len(hashes))
            return fut

        def work() -> None:
            results: list[RemoteBlock | None] = [None] * len(hashes)
            try:
                for run in runs:
                    got = self._fetch_run(run.peer, hashes[run.start:run.stop], buffers[run.start:run.stop])
                    results[run.start:run.start + len(got)] = got
                    if len(got) < run.stop - run.start:
                        break  # the cache uses the leading prefix only: the rest would be wasted
            except Exception:  # noqa: BLE001 - a bug here must still resolve the future
                log.exception("remote fetch failed")
            ok = sum(r is not None for r in results)
            with self._stats_lock:
                self.stats.fetched_blocks += ok
                self.stats.failed_blocks += len(hashes) - ok
            fut.set_result(results)

        try:
            self._fetcher.submit(work)
        except RuntimeError:  # shut down
            fut.set_result([None] * len(hashes))
        return fut

    def describe(self) -> dict:
        """State for status commands and tests."""
        snap = self.snapshot
        engine = self.transport
        return {"node_id": self.info.node_id if self.info else None, "connected": self.connected,
                "engine_pid": engine.pid if engine else None, "engine_generation": engine.generation if engine else 0,
                "redis": self.registry.where, "held_blocks": len(self._held),
                "peers": snap.peer_ids() if snap else [], "peer_blocks": snap.block_count() if snap else 0,
                "stats": vars(self.stats).copy()}

    def _lend(self, **args) -> dict:
        """The ``export`` method peers call: the cache pins and describes the blocks; we count them."""
        grant = self.cache.export(**args)
        with self._stats_lock:
            self.stats.exports += 1
            self.stats.lent_blocks += len(grant["slots"])
        return grant

    # ---- fetching one run from one peer --------------------------------------------------------------

    def _client(self, endpoint: str, purpose: str = "export") -> CacheClient:
        """One client per peer and purpose: a release waiting on a slow peer never holds up an export."""
        with self._clients_lock:
            client = self._clients.get((endpoint, purpose))
            if client is None:
                client = self._clients[(endpoint, purpose)] = CacheClient(
                    endpoint, timeout_s=self.timeout_s, liveness_s=min(PEER_LIVENESS_S, self.timeout_s),
                    hint="the peer's export service at FLEXKV_DIST_SERVICE_PORT: it died, froze or is unreachable "
                         "from this node; it is skipped for a lease")
            return client

    def _fetch_run(self, peer: NodeInfo, hashes: list[int], buffers: Sequence[memoryview]) -> list[RemoteBlock]:
        """The leading blocks of ``hashes`` that arrived intact from ``peer`` into ``buffers``.

        Pieces of about `_PIECE_BYTES` go through a two-stage pipeline: while the engine process moves
        piece k, this thread asks the peer to export piece k+1 (the peer pins it and finds its checksums),
        then verifies piece k. Nothing returns while a read into ``buffers`` is still in flight.
        """
        assert self.transport is not None and self.snapshot is not None
        client = self._client(peer.service)
        pieces = _pieces(len(hashes), self.slot_bytes)
        base, size = self.cache.pool.data_ptr(), self.cache.pool.nbytes
        local = [_offset(buf, self.slot_bytes, base, size) for buf in buffers]
        granted: list[_Grant] = []  # exports not released yet
        inflight: _Grant | None = None  # the piece the engine process is writing into our slots
        out: list[RemoteBlock] = []
        peer_ok = True
        try:
            current = self._export(client, peer, hashes, *pieces[0])
            if current is None:
                return []
            granted.append(current)
            if not self._start_read(peer, current, local):
                return []
            inflight = current
            for k in range(len(pieces)):
                following = None
                if current.whole and k + 1 < len(pieces):
                    following = self._export(client, peer, hashes, *pieces[k + 1])
                    if following is not None:
                        granted.append(following)
                inflight = None
                if not self.transport.finish_read(current.deadline):
                    log.warning("peer %s: transfer of %d blocks failed (peer gone or stalled)", peer.node_id,
                                len(current.slots))
                    self.snapshot.suspect(peer.node_id, self.lease_s)
                    peer_ok = False
                    break
                self._measured(current)
                if following is not None and self._start_read(peer, following, local):
                    inflight = following
                good = self._verify(peer, current, hashes, buffers)
                out += good
                self._release(peer, current)
                granted.remove(current)
                if len(good) < current.stop - current.start or inflight is None:
                    break
                current = inflight
            with self._stats_lock:
                self.stats.fetched_bytes += len(out) * self.slot_bytes
            return out
        finally:
            if inflight is not None:  # never return while the engine may still write into our slots
                self.transport.finish_read(inflight.deadline)
            if peer_ok:  # a dead peer's pins end with it (or with the lease)
                for g in granted:
                    self._release(peer, g)

    def _release(self, peer: NodeInfo, g: _Grant) -> None:
        """Unpin a piece on ``peer``, in the background: the fetch does not wait for a slow or dying peer
        (a release that fails is harmless: the pin ends with the lease)."""
        def call() -> None:
            try:
                self._client(peer.service, "release").call("release_export", job=g.job)
            except (ServiceUnavailable, ServiceError) as exc:
                log.debug("peer %s: release_export failed (%s); its lease ends the pin", peer.node_id, exc)

        try:
            self._releaser.submit(call)
        except RuntimeError:  # shutting down
            pass

    def _export(self, client: CacheClient, peer: NodeInfo, hashes: list[int], start: int, stop: int
                ) -> _Grant | None:
        """Ask ``peer`` to pin ``hashes[start:stop]``; None when it cannot (dead) or holds none of them."""
        assert self.snapshot is not None
        sent = time.monotonic()
        try:
            # Half our timeout for its SSD staging, so its answer (even "nothing") beats our timeout.
            grant = client.call("export", block_hashes=hashes[start:stop], lease_s=self.lease_s,
                                timeout_s=self.timeout_s / 2, checksums=self.verify)
        except (ServiceUnavailable, ServiceError) as exc:
            log.warning("peer %s did not export %d blocks: %s", peer.node_id, stop - start, exc)
            self.snapshot.suspect(peer.node_id, self.lease_s)
            return None
        if not grant["slots"]:
            return None  # evicted since its last publish: a plain miss
        with self._stats_lock:
            self.stats.grants += 1
        # The peer pins for lease_s from when it answered; counting from before we asked is safe.
        return _Grant(start, stop, grant["job"], grant["slots"], grant["parents"], grant["tokens"],
                      grant["checksums"], deadline=sent + self.lease_s)

    def _start_read(self, peer: NodeInfo, g: _Grant, local: list[int]) -> bool:
        """Hand piece ``g`` to the engine process, unless its lease would lapse before it arrives."""
        assert self.transport is not None
        nbytes = len(g.slots) * self.slot_bytes
        if time.monotonic() + nbytes / self._rate > g.deadline:
            log.warning("peer %s: the %gs lease would lapse during the transfer; %d blocks left as misses",
                        peer.node_id, self.lease_s, len(g.slots))
            with self._stats_lock:
                self.stats.lease_aborts += 1
            return False
        g.began = time.monotonic()
        self.transport.start_read(peer.session, local[g.start:g.start + len(g.slots)],
                                  [peer.pool_ptr + s * peer.slot_bytes for s in g.slots],
                                  [self.slot_bytes] * len(g.slots))
        return True

    def _measured(self, g: _Grant) -> None:
        took = time.monotonic() - g.began
        if took > 0:
            self._rate = 0.5 * self._rate + 0.5 * (len(g.slots) * self.slot_bytes / took)

    def _verify(self, peer: NodeInfo, g: _Grant, hashes: list[int], buffers: Sequence[memoryview]
                ) -> list[RemoteBlock]:
        """The leading blocks of piece ``g`` whose bytes match the peer's checksums (when we verify), read
        within the lease."""
        if time.monotonic() > g.deadline:
            # Arrived, but partly after the pin ended: trust nothing read past the lease.
            log.warning("peer %s: transfer outlived the %gs lease; discarding it", peer.node_id, self.lease_s)
            with self._stats_lock:
                self.stats.lease_aborts += 1
            return []
        good = []
        for k, slot_sum in enumerate(g.checksums):
            i = g.start + k
            if slot_sum is not None and xxhash.xxh3_64_intdigest(buffers[i][:self.slot_bytes]) != slot_sum:
                log.warning("peer %s: block %d arrived with a wrong checksum; a miss from there on",
                            peer.node_id, hashes[i])
                with self._stats_lock:
                    self.stats.checksum_mismatches += 1
                break
            good.append(RemoteBlock(parent_hash=g.parents[k], token_ids=g.tokens[k], checksum=slot_sum))
        return good

    # ---- publishing (background thread) --------------------------------------------------------------

    def _on_event(self, event: CacheEvent) -> None:
        # Called under the cache's lock: queue only.
        if not self._closed:
            self._events.append(event)
            if self.verify and isinstance(event, BlockStored) and event.tier is Tier.CPU:
                self._unhashed.extend(event.block_hashes)

    def _hash_loop(self) -> None:
        """Checksum newly stored CPU blocks ahead of any export (a few at a time: each is pinned meanwhile)."""
        while not self._stop.wait(0.05):
            while self._unhashed and not self._stop.is_set():
                batch = [self._unhashed.popleft() for _ in range(min(32, len(self._unhashed)))]
                try:
                    n = self.cache.remember_checksums(batch)
                    with self._stats_lock:
                        self.stats.checksummed_ahead += n
                except Exception:  # noqa: BLE001 - an export computes what this missed
                    log.exception("checksumming stored blocks failed")

    def _drain_events(self) -> None:
        while True:
            try:
                event = self._events.popleft()
            except IndexError:
                return
            if isinstance(event, BlockStored):
                bit = _TIER_BIT.get(event.tier, 0)
                for h in event.block_hashes:
                    before = self._held.get(h, 0)
                    self._held[h] = before | bit
                    if not before and bit:
                        self._dirty.add(h)
            elif isinstance(event, BlockRemoved):
                bit = _TIER_BIT.get(event.tier, 0)
                for h in event.block_hashes:
                    after = self._held.get(h, 0) & ~bit
                    if after:
                        self._held[h] = after
                    elif self._held.pop(h, None) is not None:
                        self._dirty.add(h)
            # CacheCleared follows the Removed events of everything it dropped: nothing more to do.

    def _resync(self) -> None:
        """(Re)publish our info and everything we hold under a new epoch."""
        assert self.info is not None and self.transport is not None
        self.info = NodeInfo(**{**vars(self.info), "epoch": secrets.token_hex(8), "session": self.transport.session,
                                "pool_ptr": self.transport.pool_ptr})
        self._dirty.clear()
        self.registry.register(self.info, list(self._held))
        self.stats.resyncs += 1

    def _offline(self, exc: Exception) -> None:
        if self.connected:
            log.warning("lost Redis at %s (%s): serving local blocks only until it is back", self.registry.where,
                        exc)
        self.connected = False

    def _sync_loop(self) -> None:
        cfg = self.config
        interval = cfg.dist_snapshot_interval_s
        tick = min(0.05, interval / 4)
        heartbeat_every = self.lease_s / 3
        retry_every = min(1.0, heartbeat_every)
        now = time.monotonic()
        next_heartbeat, next_refresh, next_retry = now + heartbeat_every, now + interval, now
        while not self._stop.wait(tick):
            self._drain_events()
            now = time.monotonic()
            snap = self.snapshot
            assert snap is not None
            if snap.refreshed_at and now - snap.refreshed_at > self.lease_s:
                log.warning("global index snapshot is older than the %gs lease: dropping it", self.lease_s)
                snap.clear()
            try:
                if not self.connected:
                    if now < next_retry:
                        continue
                    next_retry = now + retry_every
                    if not self._reconnect():
                        continue
                    next_heartbeat = next_refresh = now
                if self.transport is not None and self.transport.generation != self._generation:
                    # A new engine process: peers must read from its session and address from now on.
                    self._generation = self.transport.generation
                    self._resync()
                if self._dirty:
                    dirty, self._dirty = self._dirty, set()
                    added = [h for h in dirty if h in self._held]
                    removed = [h for h in dirty if h not in self._held]
                    self.registry.publish(self.node_id, added, removed)
                    self.stats.publishes += 1
                if now >= next_heartbeat:
                    next_heartbeat = now + heartbeat_every
                    if not self.registry.heartbeat(self.node_id):
                        log.warning("our entry in Redis %s is gone (lease lapsed or Redis restarted): "
                                    "republishing %d blocks", self.registry.where, len(self._held))
                        self._resync()
                if now >= next_refresh:
                    next_refresh = now + interval
                    snap.refresh(self.registry)
            except redis.RedisError as exc:
                self._offline(exc)
                next_retry = now + retry_every
            except Exception:  # noqa: BLE001 - the sync thread must survive anything
                log.exception("distributed sync step failed")

    def _reconnect(self) -> bool:
        try:
            self.registry.connect()
        except redis.ConnectionError:
            return False
        except Exception as exc:  # noqa: BLE001 - e.g. the password was changed while Redis was down
            if not self._auth_warned:
                log.error("%s", exc)
                self._auth_warned = True
            return False
        self._auth_warned = False
        self._resync()
        self.connected = True
        log.info("Redis at %s is back: republished %d blocks", self.registry.where, len(self._held))
        return True


def _subscribe(cache: TieredCache, listener) -> dict[int, int]:
    """Add ``listener`` to the cache's events and return what the cache holds at that moment (hash ->
    tier bits), atomically, so no change is missed or counted twice."""
    return {h: sum(_TIER_BIT[t] for t in tiers) for h, tiers in cache.subscribe(listener).items()}


def _offset(buf: memoryview, length: int, base: int, size: int) -> int:
    """Where a fetch buffer (a CPU slot: the cache passes nothing else) starts in the pool."""
    if buf.nbytes < length or not buf.contiguous or buf.readonly:
        raise ValueError(f"fetch buffer of {buf.nbytes} bytes (readonly={buf.readonly}) cannot hold a "
                         f"{length}-byte slot")
    offset = int(np.frombuffer(buf, dtype=np.uint8).ctypes.data) - base
    if not 0 <= offset <= size - length:
        raise ValueError("fetch buffer is not inside this cache's CPU pool")
    return offset
