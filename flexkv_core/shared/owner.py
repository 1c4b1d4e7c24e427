"""`CacheOwner`: the process that holds a node's shared tiers (``flexkv serve``).

One owner per node and cache endpoint holds the index, the CPU pool and the SSD I/O of one
`TieredCache`; the engines of the node attach to it through ``FLEXKV_SERVER_RECV_PORT`` with
``FLEXKV_SHARE_SERVER=1`` (`flexkv_core.shared.client.SharedCache`). Why a process of its own and not one
of the engines: vLLM force-kills its engine core whenever a worker stops, so an engine that owned the
node's tiers would take them away from every other engine at each restart of that one; the owner's life
is the tiers' life. Upstream FlexKV's meaning of the instance keys is kept: the engine with
``FLEXKV_INSTANCE_ID=0`` starts the owner when none serves the endpoint (and that owner leaves by itself
once no engine has used it for a while); an operator may also run ``flexkv serve`` under a supervisor.

The cache is created by the first engine that opens a session (it brings the cache identity: model,
layout, dtype, TP size); a later engine of another identity is refused with both identities named.

Everything an engine does goes through its *session*: the loads it pinned and the stores it reserved
belong to it. A session ends when its engine closes it, when its process is gone (same node: the pid is
checked twice a second), or when it has not polled for ``LEASE_S`` (a stopped process): everything it
held is released then, so a dead engine leaks nothing here.

Engines learn what the tiers hold from an ordered event stream: every tier event of the cache gets a
sequence number and waits in a ring until every session has polled past it (a session that falls more
than ``RING_LIMIT`` events behind must take a fresh snapshot). `poll` also reports which of the
session's loads became ready (SSD staging done), and renews the session.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..cache import LoadPlan, StorePlan, TieredCache
from ..config import FlexKVConfig, configure_logging, load_config
from ..events import CacheEvent
from ..layout import CacheIdentity, KVLayout
from ..service import CacheService

log = logging.getLogger(__name__)

__all__ = ["CacheOwner", "identity_from_wire", "identity_to_wire", "main"]

#: A session that has not polled for this long is over (its engine is stopped or wedged).
LEASE_S = 10.0
#: How often the owner looks for sessions whose process is gone or whose lease lapsed.
REAP_INTERVAL_S = 0.5
#: Events kept for a session that lags; past this it must take a snapshot again.
RING_LIMIT = 200_000
#: At most this many events per poll answer (the engine polls again at once when there are more).
POLL_BATCH = 5_000


def identity_to_wire(identity: CacheIdentity) -> dict[str, Any]:
    return {"model": identity.model, "layout": asdict(identity.layout), "extra": identity.extra}


def identity_from_wire(d: dict[str, Any]) -> CacheIdentity:
    return CacheIdentity(model=str(d["model"]), layout=KVLayout(**d["layout"]), extra=str(d.get("extra", "")))


@dataclass
class _Session:
    sid: int
    pid: int
    instance_id: int
    last_seen: float
    acked: int  # the engine has applied every event up to this sequence number
    loads: dict[int, LoadPlan] = field(default_factory=dict)
    stores: dict[int, StorePlan] = field(default_factory=dict)
    ready: dict[int, int] = field(default_factory=dict)  # load job -> usable blocks, not yet reported
    stored_blocks: int = 0  # blocks this session's engine stored (operators: who fills the shared tiers)
    loaded_blocks: int = 0  # blocks it loaded (who reuses them)
    synced: bool = False  # the engine has polled once: its mirror holds the snapshot (its lookups can hit)


class CacheOwner:
    """Serves one shared `TieredCache` at ``config.server_recv_port`` (see the module docstring)."""

    def __init__(self, config: FlexKVConfig, *, exit_when_idle_s: float | None = None) -> None:
        if config.enable_distributed:
            raise ValueError("FLEXKV_ENABLE_DISTRIBUTED with FLEXKV_SHARE_SERVER is not supported yet: a shared "
                             "cache serves the engines of one node only")
        self.config = config
        self.epoch = secrets.token_hex(8)  # tells engines that a restarted owner is a new one
        self.exit_when_idle_s = exit_when_idle_s
        self.cache: TieredCache | None = None
        self._lock = threading.Lock()  # sessions and the event ring; never held while calling the cache
        self._sessions: dict[int, _Session] = {}
        self._next_sid = 1
        self._ring: deque[tuple[int, CacheEvent]] = deque()
        self._seq = 0
        self._idle_since = time.monotonic()
        self._stopped = threading.Event()
        handlers = {
            "open": self.open, "close": self.close_session, "poll": self.poll, "snapshot": self.snapshot,
            "prepare_load": self.prepare_load, "finish_load": self.finish_load,
            "reserve_store": self.reserve_store, "complete_store": self.complete_store,
            "reset": self.reset, "status": self.status, "attach": self.attach,
        }
        self.service = CacheService(config.server_recv_port, handlers, share=True, name="flexkv-serve")
        self._reaper = threading.Thread(target=self._reap_loop, name="flexkv-serve-reaper", daemon=True)

    # ---- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.service.start()
        if self.service.attached_to is not None:
            pid = self.service.attached_to
            self.service.stop()
            raise RuntimeError(f"FLEXKV_SERVER_RECV_PORT {self.config.server_recv_port} is already served by a "
                               f"shared cache (pid {pid})")
        self._reaper.start()
        log.info("shared cache owner serving at %s (epoch %s)", self.service.endpoint, self.epoch)

    def wait(self) -> None:
        """Serve until `stop` (a signal handler calls it) or, with ``exit_when_idle_s``, until idle."""
        self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()

    def close(self) -> None:
        self._stopped.set()
        self.service.stop()
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            self._release(s)
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    # ---- sessions --------------------------------------------------------------------------------

    def open(self, identity: dict[str, Any], pid: int, instance_id: int = 0) -> dict[str, Any]:
        """Start a session for an engine of ``identity``; creates the cache on first use."""
        ident = identity_from_wire(identity)
        cache = self._cache_for(ident)
        with self._lock:
            sid = self._next_sid
            self._next_sid += 1
            self._sessions[sid] = _Session(sid, int(pid), int(instance_id), time.monotonic(), self._seq)
            seq = self._seq
        log.info("session %d opened by pid %d (instance %d)", sid, pid, instance_id)
        info = cache.attach_info()
        return {"session": sid, "epoch": self.epoch, "seq": seq, "pool": info["pool"],
                "num_slots": info["num_slots"], "slot_bytes": info["slot_bytes"],
                "capacity": {t: v["capacity_slots"] for t, v in cache.stats()["tiers"].items()}}

    def _cache_for(self, identity: CacheIdentity) -> TieredCache:
        if self.cache is None:
            self.cache = TieredCache(self.config, identity)
            # Nobody drains the cache's own log here (what the SSD tier recovered is in it): the ring
            # carries every later event, and engines start from a snapshot.
            self.cache.events.enabled = False
            self.cache.take_events()
            self.cache.events.add_listener(self._on_event)
        elif identity.fingerprint() != self.cache.identity.fingerprint():
            raise ValueError(f"the shared cache at {self.config.server_recv_port} holds "
                             f"{self.cache.identity.describe()}; this engine is {identity.describe()}: engines "
                             "sharing one cache must have the same model, dtype, block size and parallelism")
        return self.cache

    def close_session(self, session: int) -> bool:
        with self._lock:
            s = self._sessions.pop(session, None)
        if s is None:
            return False
        self._release(s)
        log.info("session %d closed by its engine", session)
        return True

    def _session(self, sid: int) -> _Session:
        s = self._sessions.get(sid)
        if s is None:
            raise KeyError(f"unknown session {sid} (this owner, epoch {self.epoch}, never opened it or ended it)")
        s.last_seen = time.monotonic()
        return s

    def _release(self, s: _Session) -> None:
        """Give back what a session held (its engine is gone or said goodbye)."""
        cache = self.cache
        if cache is None:
            return
        for plan in s.loads.values():
            cache.finish_load(plan)
        for plan in s.stores.values():
            cache.complete_store(plan, ok=False)
        if s.loads or s.stores:
            log.info("session %d: released %d loads and %d stores", s.sid, len(s.loads), len(s.stores))

    def _reap_loop(self) -> None:
        while not self._stopped.wait(REAP_INTERVAL_S):
            now = time.monotonic()
            with self._lock:
                gone = [s for s in self._sessions.values()
                        if now - s.last_seen > LEASE_S or not _pid_alive(s.pid)]
                for s in gone:
                    del self._sessions[s.sid]
                busy = bool(self._sessions)
            for s in gone:
                log.warning("session %d (pid %d) ended: its engine %s", s.sid, s.pid,
                            "is gone" if not _pid_alive(s.pid) else f"did not poll for {LEASE_S:g} s")
                self._release(s)
            if busy or gone:
                self._idle_since = now
            elif self.exit_when_idle_s is not None and now - self._idle_since > self.exit_when_idle_s:
                log.info("no engine used this shared cache for %g s: exiting", self.exit_when_idle_s)
                self._stopped.set()

    # ---- events ----------------------------------------------------------------------------------

    def _on_event(self, event: CacheEvent) -> None:
        # Called with the cache's lock held: only queue.
        with self._lock:
            self._seq += 1
            self._ring.append((self._seq, event))
            if len(self._ring) > RING_LIMIT:
                self._ring.popleft()

    def poll(self, session: int, since: int) -> dict[str, Any]:
        """Events after ``since`` (at most POLL_BATCH), the session's loads that became ready, and the
        owner's epoch. ``resync`` means events after ``since`` were dropped: take a snapshot."""
        with self._lock:
            s = self._session(session)
            s.acked = max(s.acked, since)
            s.synced = True  # an engine polls only once it has applied its snapshot
            ready, s.ready = s.ready, {}
            first = self._ring[0][0] if self._ring else self._seq + 1
            if since + 1 < first and since < self._seq:
                return {"epoch": self.epoch, "resync": True, "seq": self._seq, "events": [], "more": False,
                        "ready": ready}
            events = [e for seq, e in self._ring if seq > since][:POLL_BATCH]
            last = since + len(events)
            self._trim()
        return {"epoch": self.epoch, "resync": False, "seq": last, "events": events,
                "more": last < self._seq, "ready": ready}

    def _trim(self) -> None:
        """Drop ring events every session has applied (lock held)."""
        floor = min((s.acked for s in self._sessions.values()), default=self._seq)
        while self._ring and self._ring[0][0] <= floor:
            self._ring.popleft()

    def snapshot(self, session: int) -> dict[str, Any]:
        """Stored events for everything the tiers hold, and the sequence number to poll from. The number
        is read *before* the snapshot: replaying the events after it is idempotent (see TierMirror)."""
        with self._lock:
            self._session(session)
            seq = self._seq
        cache = self.cache
        events = cache.snapshot_events() if cache is not None else []
        return {"seq": seq, "events": events}

    # ---- the cache, on behalf of a session -------------------------------------------------------

    def prepare_load(self, session: int, block_hashes: Sequence[int]) -> dict[str, Any]:
        cache = self._require_cache()
        with self._lock:
            self._session(session)
        plan = cache.prepare_load(list(block_hashes))
        with self._lock:
            s = self._sessions.get(session)
            if s is None:  # ended while we planned: nobody will finish this load
                release = True
            else:
                release = False
                s.loads[plan.job_id] = plan
        if release:
            cache.finish_load(plan)
            raise KeyError(f"session {session} ended")
        usable = plan.ready.result() if plan.ready.done() else None
        if usable is None:
            plan.ready.add_done_callback(lambda f, sid=session, job=plan.job_id: self._load_ready(sid, job, f))
        return {"job": plan.job_id, "block_hashes": plan.block_hashes, "slots": plan.slots,
                "tier_hits": {t.value: n for t, n in plan.tier_hits.items()}, "usable": usable}

    def _load_ready(self, sid: int, job: int, fut: Any) -> None:
        try:
            usable = int(fut.result())
        except Exception:  # noqa: BLE001 - a failed staging is a miss for the engine
            usable = 0
        with self._lock:
            s = self._sessions.get(sid)
            if s is not None and job in s.loads:
                s.ready[job] = usable

    def finish_load(self, session: int, job: int, copied: int | None = None) -> bool:
        """The engine is done with a load; ``copied``: how many leading blocks it copied (None: every usable
        one; 0 for an abort or a failed copy), which is what the hit and byte counters count."""
        cache = self._require_cache()
        with self._lock:
            s = self._session(session)
            plan = s.loads.pop(job, None)
            s.ready.pop(job, None)
        if plan is None:
            return False
        if plan.ready.done():
            usable = int(plan.ready.result())
            with self._lock:
                s.loaded_blocks += usable if copied is None else min(int(copied), usable)
        cache.finish_load(plan, copied=copied)
        return True

    def reserve_store(self, session: int, block_hashes: Sequence[int], parent_hash: int | None,
                      token_ids: Sequence[int]) -> dict[str, Any]:
        cache = self._require_cache()
        with self._lock:
            self._session(session)
        plan = cache.reserve_store(list(block_hashes), parent_hash, list(token_ids))
        if plan.block_hashes:
            with self._lock:
                s = self._sessions.get(session)
                if s is not None:
                    s.stores[plan.job_id] = plan
            if s is None:
                cache.complete_store(plan, ok=False)
                raise KeyError(f"session {session} ended")
        return {"job": plan.job_id, "block_hashes": plan.block_hashes, "slots": plan.slots,
                "positions": plan.positions, "covered": plan.covered}

    def complete_store(self, session: int, job: int, ok: bool) -> int:
        """Publish (or roll back) a store; returns how many leading blocks of it were published."""
        cache = self._require_cache()
        with self._lock:
            s = self._session(session)
            plan = s.stores.pop(job, None)
        if plan is None:
            return 0
        published = cache.complete_store(plan, ok=bool(ok))
        with self._lock:
            s.stored_blocks += published
        return published

    def reset(self, session: int) -> bool:
        cache = self._require_cache()
        with self._lock:
            self._session(session)
        cache.reset()
        return True

    def status(self) -> dict[str, Any]:
        with self._lock:
            sessions = [{"session": s.sid, "pid": s.pid, "instance_id": s.instance_id,
                         "loads": len(s.loads), "stores": len(s.stores), "stored_blocks": s.stored_blocks,
                         "loaded_blocks": s.loaded_blocks, "synced": s.synced,
                         "idle_s": round(time.monotonic() - s.last_seen, 3)} for s in self._sessions.values()]
            ring = len(self._ring)
        out: dict[str, Any] = {"shared": {"epoch": self.epoch, "sessions": sessions, "events_queued": ring,
                                          "seq": self._seq}}
        if self.cache is not None:
            out.update(self.cache.stats())
        return out

    def attach(self) -> dict[str, Any]:
        """What a worker needs to map the pool; ``{"pool": None}`` until an engine opened the cache (the
        worker asks again)."""
        cache = self.cache
        return cache.attach_info() if cache is not None else {"pool": None}

    def _require_cache(self) -> TieredCache:
        if self.cache is None:
            raise RuntimeError("no engine has opened this shared cache yet")
        return self.cache


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """``flexkv serve``: hold the shared tiers of this node at FLEXKV_SERVER_RECV_PORT until stopped."""
    parser = argparse.ArgumentParser(prog="flexkv serve", description=main.__doc__)
    parser.add_argument("--exit-when-idle", type=float, default=None, metavar="S",
                        help="exit once no engine has had a session for S seconds (default: serve until "
                             "SIGTERM/SIGINT)")
    parser.add_argument("--config-stdin", action="store_true",
                        help="read the configuration as JSON (FlexKVConfig.to_dict) from stdin instead of "
                             "FLEXKV_CONFIG_PATH / FLEXKV_* (how an engine starting the owner passes its own)")
    args = parser.parse_args(argv)
    try:
        if args.config_stdin:
            config = FlexKVConfig.from_dict(json.load(sys.stdin))
        else:
            config = load_config()
    except ValueError as e:
        parser.exit(2, f"flexkv serve: {e}\n")
    configure_logging(config)
    owner = CacheOwner(config, exit_when_idle_s=args.exit_when_idle)
    try:
        owner.start()
    except Exception as e:  # noqa: BLE001 - one line for the operator, not a traceback
        parser.exit(1, f"flexkv serve: {e}\n")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: owner.stop())
    try:
        owner.wait()
    finally:
        owner.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
