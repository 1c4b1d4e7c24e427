"""Announcing what our tiers hold to Dynamo's router before any request, once somebody listens.

Our tier events reach the router inside vLLM's KV-event batches: the scheduler collects them with
``take_events()`` after each engine step and publishes them on vLLM's ZMQ PUB socket, which Dynamo's relay
(``dynamo.llm.KvEventPublisher``, in the ``dynamo.vllm`` process) subscribes to. Two gaps leave the blocks
a worker recovered from SSD at a warm restart unknown to the router until that worker serves a request:

* an idle engine never steps, so nothing calls ``take_events()``;
* PUB/SUB drops what is published before the subscription arrives, and Dynamo 1.6.1's relay subscribes
  only once the engine is up, asking for no replay of what it missed.

A restarted router (frontend) is not a gap: Dynamo 1.6.1's router recovers every worker's blocks, all
tiers, from the worker's *local indexer*, which the relay keeps (``enable_local_indexer``, on by default in
``dynamo.vllm``): whatever reached the relay once is known to every router started later.

So from start-up until the first request, `Announcer` keeps the engine stepping (the connector's
``has_pending_push_work``) at a slow tick (`TICK_S`), watches vLLM's KV-events endpoint for subscribers
(connections to vLLM's socket, read from ``/proc``), and after each new subscriber sends an *idempotent*
announcement a few times (`ROUNDS_S` after it connected): ``AllBlocksCleared`` followed by a Stored for
everything each tier holds. (A new subscriber can be Dynamo's relay or a tool such as ``flexkv events``:
each gets its rounds.) Idempotent, because the router counts copies per tier (a second Stored of a
block needs a second Removed) while Cleared-then-everything leaves the same state however often it
arrives; and safe before the first request only, because then vLLM's GPU tier holds nothing the Cleared
could wipe. After the first request our events flow as usual; so they do when `WAIT_S` passed after the
engine's loop started with no request (the engine may then idle), with a warning if no subscriber came at
all: the queued events then go out with the first request, as they always did.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger(__name__)

__all__ = ["ROUNDS_S", "TICK_S", "WAIT_S", "Announcer", "subscriber_watch"]

#: How long an idle step waits while we wait for a subscriber (the engine's idle loop runs at this rate).
TICK_S = 0.05
#: When the announcement goes out, in seconds after a new subscriber connected. A subscription reaches the
#: publisher a few milliseconds after the connection; later rounds cover a machine too busy for that.
ROUNDS_S = (0.25, 1.0, 3.0)
#: How long after start-up we wait for a first subscriber before giving up (and letting the engine idle).
WAIT_S = 120.0

_TCP_ESTABLISHED = "01"
_UNIX_CONNECTED = "03"


# ---- who is connected to an endpoint -------------------------------------------------------------------


def _tcp_connections(local_port: int | None, remote_port: int | None) -> set[int]:
    """Inodes of established TCP connections with that local (or remote) port, from /proc."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] != _TCP_ESTABLISHED:
                continue
            local, remote = int(cols[1].rpartition(":")[2], 16), int(cols[2].rpartition(":")[2], 16)
            if (local_port is not None and local == local_port) or (remote_port is not None and remote == remote_port):
                found.add(int(cols[9]))
    return found


def _unix_connections(path: str) -> set[int]:
    """Inodes of connected Unix sockets accepted on ``path`` (the server side shows the path too)."""
    found = set()
    with open("/proc/net/unix") as f:
        for row in f.read().splitlines()[1:]:
            cols = row.split(None, 7)
            if len(cols) == 8 and cols[5] == _UNIX_CONNECTED and cols[7] == path:
                found.add(int(cols[6]))
    return found


def subscriber_watch(endpoint: str) -> Callable[[], set[int]] | None:
    """A function returning the current connections of subscribers to vLLM's PUB socket at ``endpoint``
    (as vLLM opens it: wildcard tcp and ipc endpoints bind, a concrete tcp host connects), or None when
    this endpoint cannot be watched."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        return None if path.startswith("@") else (lambda: _unix_connections(path))
    if endpoint.startswith("tcp://"):
        host, _, port_text = endpoint[len("tcp://"):].rpartition(":")
        if not port_text.isdigit() or int(port_text) == 0:
            return None  # tcp://*:0: vLLM picks the port and keeps it to itself
        port = int(port_text)
        if "*" in host or "::" in host or host == "0.0.0.0":
            return lambda: _tcp_connections(port, None)  # vLLM binds: subscribers connected to us
        return lambda: _tcp_connections(None, port)  # vLLM connects out to a subscriber that binds
    return None


# ---- the announcer -------------------------------------------------------------------------------------


@dataclass
class Announcer:
    """When the scheduler should send the idempotent announcement (see the module docs).

    ``watch`` lists the subscribers' connections (None: nothing to wait for, the announcer stays idle).
    Not thread-safe: the scheduler calls it from vLLM's engine loop only.
    """

    watch: Callable[[], set[int]] | None
    endpoint: str = ""
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    started: float | None = None  # the engine loop's first idle step (engine start-up can take minutes)
    rounds_sent: int = 0
    _seen: set[int] = field(default_factory=set)
    _due: list[float] = field(default_factory=list)  # times of the rounds still to send
    _over: bool = False

    def __post_init__(self) -> None:
        self._over = self.watch is None

    @classmethod
    def for_engine(cls, vllm_config: VllmConfig, events_enabled: bool) -> Announcer:
        """The announcer of an engine: idle unless KV events are on and go to a ZMQ endpoint we can watch."""
        events = getattr(vllm_config, "kv_events_config", None)
        if not events_enabled or events is None or not events.enable_kv_cache_events or events.publisher != "zmq":
            return cls(None)
        from vllm.distributed.kv_events import ZmqEventPublisher

        endpoint = ZmqEventPublisher.offset_endpoint_port(events.endpoint,
                                                          vllm_config.parallel_config.data_parallel_index)
        watch = subscriber_watch(endpoint or "")
        if watch is None:
            log.info("KV events on %s: cannot see its subscribers, so the blocks our tiers hold are announced "
                     "with the first request", endpoint)
        return cls(watch, endpoint or "")

    @property
    def waiting(self) -> bool:
        """Keep the engine stepping: no request yet, and either rounds to send or `WAIT_S` not over."""
        if self._over:
            return False
        if not self._due and self.started is not None and self.clock() - self.started > WAIT_S:
            self._over = True
            if not self.rounds_sent:
                log.warning("no subscriber connected to the KV-events endpoint %s within %gs (is Dynamo's relay "
                            "subscribing?): the blocks our tiers hold are announced with the first request",
                            self.endpoint, WAIT_S)
        return not self._over

    @property
    def holding(self) -> bool:
        """Keep the cache's events queued: nobody may be listening yet, and if nobody ever does (or we cannot
        tell), the first request still publishes them as it always did."""
        return not self._over and not self.rounds_sent

    def request_seen(self) -> None:
        """A request reached the scheduler: from now on vLLM's GPU tier fills, and a Cleared would wipe it."""
        if not self._over:
            self._over = True
            self._due.clear()

    def idle_tick(self) -> None:
        """Called in a step with nothing to compute: look for new subscribers, then wait a little (until the
        next round at most) so that the idle engine does not spin."""
        if self.started is None:
            self.started = self.clock()
        if not self.waiting or self.watch is None:
            return
        now = self.clock()
        connections = self.watch()
        new = connections - self._seen
        self._seen = connections
        if new:
            self._due = sorted(now + delay for delay in ROUNDS_S)
            log.info("KV-events subscriber connected on %s: announcing what our tiers hold in %s s", self.endpoint,
                     "/".join(f"{d:g}" for d in ROUNDS_S))
        wait = TICK_S if not self._due else max(0.0, min(TICK_S, self._due[0] - now))
        self.sleep(wait)

    def due(self) -> bool:
        """Whether this step's events should be the announcement (at most once per step)."""
        if self._over or not self._due or self.clock() < self._due[0]:
            return False
        while self._due and self._due[0] <= self.clock():
            self._due.pop(0)
        self.rounds_sent += 1
        return True

    @staticmethod
    def announcement(stored: Iterable) -> list:
        """vLLM events for one round: forget this worker, then everything each tier holds (``stored``)."""
        from vllm.distributed.kv_events import AllBlocksCleared

        return [AllBlocksCleared(), *stored]
