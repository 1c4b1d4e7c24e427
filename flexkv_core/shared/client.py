"""`SharedCache`: an engine's handle on its node's shared tiers, held by a `CacheOwner` process.

It offers the scheduler-facing part of `TieredCache` (``lookup``, ``prepare_load`` / ``finish_load``,
``reserve_store`` / ``complete_store``, ``take_events``, ``reannounce``, ``reset``), so the connector
works the same whether it owns its tiers or shares its node's:

* **Lookups are local**: a `TierMirror` of what the shared tiers hold, kept current by a background
  thread that polls the owner's event stream every few milliseconds. No round trip on the scheduler
  thread for a lookup.
* **Loads and stores** are one round trip each to the owner (tens of microseconds over ipc); SSD
  staging completes asynchronously and is learnt from the same poll.
* **Announcements**: every change of the mirror becomes this engine's own tier event, so the router
  credits every engine of the node for every shared block (Stored and Removed balance per engine and
  medium: see `TierMirror`).
* **The owner may go away.** A failed poll (no answer within ``POLL_TIMEOUT_S``), an unknown session or a
  new owner epoch means the owner is gone: every block the mirror announced is removed, loads still
  waiting resolve as misses (the engine recomputes), and lookups miss until a new owner answers; then
  the engine attaches again, takes a snapshot and announces it. Calls on the scheduler thread never wait
  longer than ``CALL_TIMEOUT_S``, and not at all once a call has failed until a poll succeeds again.
* **Starting the owner**: the engine with ``FLEXKV_INSTANCE_ID=0`` starts one (``flexkv serve
  --exit-when-idle``, in a session of its own so vLLM's shutdown of this engine does not take it along)
  when nobody answers at ``FLEXKV_SERVER_RECV_PORT``; the others wait for it, a bounded time, then run
  with empty tiers until it appears.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import msgspec
import xxhash

from ..cache import LoadPlan, StorePlan
from ..client import CacheClient, ServiceError, ServiceUnavailable
from ..config import FlexKVConfig
from ..events import CacheEvent
from ..index import LookupResult
from ..layout import CacheIdentity, Tier
from ..metrics import CacheMetrics, make_metrics
from .mirror import TierMirror
from .owner import identity_to_wire

log = logging.getLogger(__name__)

__all__ = ["SharedCache"]

#: Poll period while loads wait for their staging, and otherwise.
POLL_BUSY_S = 0.002
POLL_IDLE_S = 0.02
#: A poll unanswered for this long means the owner is gone.
POLL_TIMEOUT_S = 1.0
#: The longest a call on the scheduler thread waits for the owner.
CALL_TIMEOUT_S = 0.5
#: How often a detached engine tries to attach again.
ATTACH_RETRY_S = 1.0
#: How long engine start-up waits for the owner: the engine that starts it, and the others.
START_WAIT_OWNER_S = 60.0
START_WAIT_OTHERS_S = 10.0
#: An owner started by an engine exits once no engine has used it for this long (its SSD tier stays).
OWNER_IDLE_EXIT_S = 60.0

_EVENTS = msgspec.convert  # decoding the owner's events: tagged dicts -> BlockStored / BlockRemoved


class _Pool:
    """What the connector reads of the pool (its name and size) when the pool is the owner's."""

    def __init__(self, name: str, num_slots: int) -> None:
        self.name = name
        self.num_slots = num_slots


class SharedCache:
    """The scheduler-side cache of an engine attached to its node's shared tiers (module docstring)."""

    def __init__(self, config: FlexKVConfig, identity: CacheIdentity, *,
                 metrics: CacheMetrics | None = None) -> None:
        self.config = config
        self.identity = identity
        self.layout = identity.layout
        self.block_size = self.layout.block_size
        self.endpoint = config.server_recv_port
        self.metrics = metrics or make_metrics(config, instance=f"{self.endpoint}#{config.instance_id}")
        self._rpc = CacheClient(self.endpoint, timeout_s=CALL_TIMEOUT_S)  # the scheduler thread's
        self._poll_rpc = CacheClient(self.endpoint, timeout_s=POLL_TIMEOUT_S)  # the poller's
        self._lock = threading.Lock()
        self._mirror = TierMirror()
        self._events: list[CacheEvent] = []
        self._session: int | None = None
        self._epoch: str | None = None
        self._seq = 0
        self._generation = 0  # bumps at every attach: plans of an older one belong to a gone owner
        self._owner_ok = False  # the last call to the owner succeeded
        self.pool: _Pool | None = None
        self._waiting: dict[int, LoadPlan] = {}  # load job -> plan whose staging is not done
        self._early: dict[int, int] = {}  # readiness reported before prepare_load registered the plan
        self._spawned_at = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        wait_s = START_WAIT_OWNER_S if config.instance_id == 0 else START_WAIT_OTHERS_S
        deadline = time.monotonic() + wait_s
        while not self._attach() and time.monotonic() < deadline:
            time.sleep(0.1 if config.instance_id == 0 else ATTACH_RETRY_S / 2)
        if self._session is None:
            log.warning("no shared cache answers at %s after %g s: running with empty tiers until one does",
                        self.endpoint, wait_s)
        self._thread = threading.Thread(target=self._poll_loop, name="flexkv-shared-poll", daemon=True)
        self._thread.start()

    # ---- what the connector reads -------------------------------------------------------------------

    @property
    def pool_name(self) -> str | None:
        pool = self.pool
        return pool.name if pool is not None else None

    @property
    def attached(self) -> bool:
        return self._session is not None

    def lookup(self, block_hashes: Sequence[int]) -> LookupResult:
        with self._lock:
            result = self._mirror.lookup(block_hashes)
        self.metrics.lookup(len(block_hashes), result.total)
        return result

    def prepare_load(self, block_hashes: Sequence[int]) -> LoadPlan:
        with self._lock:
            session, generation, pool = self._session, self._generation, self.pool_name
        if session is None or not self._owner_ok:
            return _empty_load(pool)
        try:
            r = self._rpc.call("prepare_load", session=session, block_hashes=list(block_hashes))
        except (ServiceUnavailable, ServiceError) as e:
            self._call_failed("prepare_load", e)
            return _empty_load(pool)
        plan = LoadPlan(r["job"], list(r["block_hashes"]), list(r["slots"]), pool=pool or "")
        plan.tier_hits = {Tier(t): int(n) for t, n in r["tier_hits"].items()}
        if r["usable"] is not None:
            plan.ready.set_result(int(r["usable"]))
        else:
            with self._lock:
                usable = self._early.pop(plan.job_id, None)
                if usable is None and generation == self._generation:
                    self._waiting[plan.job_id] = plan
                    self._wake.set()
                elif usable is None:  # the owner went away meanwhile
                    usable = 0
            if usable is not None:
                plan.ready.set_result(usable)
        for tier, n in plan.tier_hits.items():
            self.metrics.hit(tier, n)
        return plan

    def finish_load(self, plan: LoadPlan, copied: int | None = None) -> None:
        """As `TieredCache.finish_load`: ``copied`` leading blocks reached the engine (None: every usable one)."""
        if plan._finished:
            return
        plan._finished = True
        with self._lock:
            self._waiting.pop(plan.job_id, None)
        if self._ours(plan) and plan.job_id:
            self._call("finish_load", job=plan.job_id, copied=copied)

    def reserve_store(self, block_hashes: Sequence[int], parent_hash: int | None,
                      token_ids: Sequence[int]) -> StorePlan:
        with self._lock:
            session, pool = self._session, self.pool_name
        empty = StorePlan(0, [], [], [], pool=pool or "")
        if session is None or not self._owner_ok:
            return empty
        tokens = token_ids[:len(block_hashes) * self.block_size]
        tokens = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        try:
            r = self._rpc.call("reserve_store", session=session, block_hashes=list(block_hashes),
                               parent_hash=parent_hash, token_ids=tokens)
        except (ServiceUnavailable, ServiceError) as e:
            self._call_failed("reserve_store", e)
            return empty
        return StorePlan(r["job"], list(r["block_hashes"]), list(r["slots"]), list(r["positions"]),
                         covered=int(r["covered"]), pool=pool or "")

    def complete_store(self, plan: StorePlan, ok: bool = True) -> int:
        """As `TieredCache.complete_store`; a plan of an owner that went away publishes nothing."""
        if not plan.block_hashes or not self._ours(plan):
            return 0
        published = self._call("complete_store", job=plan.job_id, ok=ok)
        return published if isinstance(published, int) else 0

    def take_events(self) -> list[CacheEvent]:
        with self._lock:
            events, self._events = self._events, []
        return events

    def reannounce(self) -> list[CacheEvent]:
        """A Stored for everything the shared tiers hold (the router forgot this engine's tiers)."""
        with self._lock:
            self._events = []
            if self._session is None:
                return []
        snapshot = self._snapshot(self._rpc)
        if snapshot is None:
            return []
        with self._lock:
            self._mirror = TierMirror()
            self._mirror.apply(snapshot[1])
            self._seq = snapshot[0]
            return list(snapshot[1])

    def reannouncing(self) -> bool:
        return False  # `reannounce` returns the whole snapshot at once

    def reset(self) -> None:
        self._call("reset")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            local = {"attached": self._session is not None, "session": self._session, "epoch": self._epoch,
                     "pool": self.pool_name, "mirror_blocks": {t.value: self._mirror.count(t)
                                                               for t in (Tier.CPU, Tier.SSD)},
                     "waiting_loads": len(self._waiting)}
        return {"shared": local, "metrics": self.metrics.snapshot()}

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            try:
                self._rpc.call("close", session=session)
            except (ServiceUnavailable, ServiceError):
                pass
        self._rpc.close()
        self._poll_rpc.close()
        self.metrics.close()

    # ---- talking to the owner -------------------------------------------------------------------------

    def _ours(self, plan: LoadPlan | StorePlan) -> bool:
        """Whether ``plan`` was made by the owner we are attached to now (each owner has its own pool)."""
        return bool(plan.pool) and plan.pool == self.pool_name

    def _call(self, method: str, **args: Any) -> Any:
        with self._lock:
            session = self._session
        if session is None or not self._owner_ok:
            return None
        try:
            return self._rpc.call(method, session=session, **args)
        except (ServiceUnavailable, ServiceError) as e:
            self._call_failed(method, e)
            return None

    def _call_failed(self, method: str, error: Exception) -> None:
        # No more waiting on the scheduler thread until the poller hears from the owner again.
        self._owner_ok = False
        self._wake.set()
        log.warning("shared cache at %s: %s failed (%s); treating our tiers as empty until the owner answers",
                    self.endpoint, method, error)

    def _attach(self) -> bool:
        """Open a session and take a snapshot; starts an owner first where that is our job."""
        try:
            r = self._poll_rpc.call("open", identity=identity_to_wire(self.identity), pid=os.getpid(),
                                    instance_id=self.config.instance_id)
        except ServiceUnavailable:
            self._maybe_start_owner()
            return False
        except ServiceError as e:
            if "holds" in e.error:  # another identity: a configuration error, not a passing state
                raise ValueError(e.error) from None
            log.warning("shared cache at %s refused to open a session: %s", self.endpoint, e.error)
            return False
        session = int(r["session"])
        with self._lock:
            self._session, self._epoch = session, str(r["epoch"])
            self._generation += 1
            self._seq = int(r["seq"])
            self.pool = _Pool(str(r["pool"]), int(r["num_slots"]))
        snapshot = self._snapshot(self._poll_rpc)
        if snapshot is None:
            self._detach("its snapshot failed")
            return False
        seq, events = snapshot
        with self._lock:
            self._events.extend(self._mirror.apply(events))
            self._seq = seq
            self._owner_ok = True
            held = len(self._mirror)
        log.info("attached to the shared cache at %s (session %d, epoch %s, pool %s): %d blocks held",
                 self.endpoint, session, self._epoch, r["pool"], held)
        return True

    def _snapshot(self, rpc: CacheClient) -> tuple[int, list[CacheEvent]] | None:
        with self._lock:
            session = self._session
        try:
            r = rpc.call("snapshot", session=session)
        except (ServiceUnavailable, ServiceError) as e:
            log.warning("shared cache at %s: snapshot failed (%s)", self.endpoint, e)
            return None
        return int(r["seq"]), _decode(r["events"])

    def _detach(self, why: str) -> None:
        """The owner is gone: unannounce everything, fail waiting loads, forget the session."""
        with self._lock:
            if self._session is None:
                return
            self._session = None
            self._owner_ok = False
            self.pool = None
            self._events.extend(self._mirror.clear())
            waiting, self._waiting = list(self._waiting.values()), {}
            self._early.clear()
        for plan in waiting:
            if not plan.ready.done():
                plan.ready.set_result(0)  # a miss: vLLM recomputes
        log.warning("shared cache at %s lost (%s): our tiers are empty until it answers again", self.endpoint,
                    why)

    def _maybe_start_owner(self) -> None:
        if self.config.instance_id != 0 or time.monotonic() - self._spawned_at < 30:
            return
        self._spawned_at = time.monotonic()
        logfile = os.path.join(tempfile.gettempdir(),
                               f"flexkv-serve-{xxhash.xxh3_64_hexdigest(self.endpoint.encode())}.log")
        cmd = [sys.executable, "-m", "flexkv_core.cli", "serve", "--exit-when-idle", str(OWNER_IDLE_EXIT_S),
               "--config-stdin"]
        with open(logfile, "ab") as out:
            # setsid -f: the owner lives in a session of its own and is no child of ours, so neither vLLM's
            # shutdown of this engine (it kills the engine's process tree) nor our exit takes it along. Our
            # configuration travels on its stdin (not argv: it may hold secrets).
            subprocess.run(["setsid", "-f", *cmd], input=json.dumps(self.config.to_dict()).encode(),
                           stdout=out, stderr=out, check=False, close_fds=True)
        log.info("started the node's shared cache owner at %s (log: %s)", self.endpoint, logfile)

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                session, epoch, since = self._session, self._epoch, self._seq
                busy = bool(self._waiting)
            if session is None:
                if not self._attach():
                    self._wake.wait(ATTACH_RETRY_S)
                    self._wake.clear()
                continue
            try:
                r = self._poll_rpc.call("poll", session=session, since=since)
            except ServiceUnavailable:
                self._detach(f"no answer within {POLL_TIMEOUT_S:g} s")
                continue
            except ServiceError as e:
                self._detach(e.error)
                continue
            if r["epoch"] != epoch:
                self._detach("a new owner answers")
                continue
            self._owner_ok = True
            self._apply_poll(r)
            if r["more"]:
                continue
            self._wake.wait(POLL_BUSY_S if busy else POLL_IDLE_S)
            self._wake.clear()

    def _apply_poll(self, r: dict[str, Any]) -> None:
        if r["resync"]:
            snapshot = self._snapshot(self._poll_rpc)
            if snapshot is None:
                return
            seq, events = snapshot
            with self._lock:
                # Announce the difference between what we announced and what is held now.
                self._events.extend(self._mirror.resync(events))
                self._seq = seq
        else:
            events = _decode(r["events"])
            with self._lock:
                self._events.extend(self._mirror.apply(events))
                self._seq = int(r["seq"])
        done = []
        with self._lock:
            for job, usable in r["ready"].items():
                plan = self._waiting.pop(int(job), None)
                if plan is None:
                    self._early[int(job)] = int(usable)
                else:
                    done.append((plan, int(usable)))
        for plan, usable in done:
            if not plan.ready.done():
                plan.ready.set_result(usable)


def _decode(events: list[Any]) -> list[CacheEvent]:
    return [_EVENTS(e, CacheEvent) for e in events]


def _empty_load(pool: str | None) -> LoadPlan:
    plan = LoadPlan(0, [], [], pool=pool or "")
    plan.tier_hits = {}
    future: Future = plan.ready
    future.set_result(0)
    return plan
