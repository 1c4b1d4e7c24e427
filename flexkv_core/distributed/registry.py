"""The global index in Redis: which node is alive, how to reach it, which blocks it holds.

Keys, all under ``flexkv:<cache fingerprint>:`` so that two models (or two layouts of one model) never
see each other's blocks:

``nodes``             SET of node ids that registered (pruned by readers once a node's info expired)
``node:<id>``         HASH: the node's addresses and pool geometry (`NodeInfo`). Its TTL is the node's
                      liveness lease: renewed every lease/3 by the node's heartbeat, gone a lease after
                      the node died or lost Redis.
``blocks:<id>``       SET of the hashes (decimal) of the blocks the node holds in CPU or SSD; same TTL.
``log:<id>``          STREAM of changes to that set, one entry per published batch (``add``/``del``:
                      space-separated hashes), capped at about `LOG_LEN` entries; same TTL.

A reader loads a node's whole set once (atomically with the log's last id), then follows the log. It
loads the set again when the node's ``epoch`` changes (the node re-registered after losing Redis or its
lease: it rewrote everything) or when the log was trimmed past what the reader had seen.

Errors: `redis.RedisError` escapes every method (the caller decides what being offline means), except
in `Registry.connect`, which turns a refused password into a `ConfigError` naming FLEXKV_REDIS_PASSWORD.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..config import ConfigError

log = logging.getLogger(__name__)

__all__ = ["LOG_LEN", "Changes", "NodeInfo", "Registry"]

#: Log entries kept per node (approximately). A reader that falls further behind reloads the whole set.
LOG_LEN = 10_000
_CHUNK = 10_000  # members per SADD command when republishing everything
_READ_BATCH = 1_000  # log entries per XRANGE


@dataclass(frozen=True)
class NodeInfo:
    """What a peer needs to read blocks from a node."""

    node_id: str
    epoch: str  # changes each time the node (re)publishes its whole block set
    service: str  # tcp:// endpoint of the node's export service
    session: str  # transfer-engine session id ("host:port")
    pool_ptr: int  # address of CPU slot 0 in the node's process (what remote reads target)
    slot_bytes: int
    num_slots: int
    pid: int

    def to_redis(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> NodeInfo | None:
        """None for a missing (expired) or malformed hash."""
        values = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            return cls(**{f.name: (int(values[f.name]) if f.type == "int" else values[f.name])
                          for f in fields(cls)})
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True)
class Changes:
    """Log entries after ``since``, in order: each a pair (added, removed)."""

    batches: list[tuple[list[int], list[int]]]
    last_id: str


def _stream_id(text: str | bytes) -> tuple[int, int]:
    if isinstance(text, bytes):
        text = text.decode()
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _hashes(field: bytes | None) -> list[int]:
    return [int(x) for x in field.split()] if field else []


class Registry:
    """One Redis connection (pool) speaking the key schema above for one cache identity."""

    def __init__(self, host: str, port: int, password: str | None, db: int, fingerprint: str, *,
                 lease_s: float, timeout_s: float) -> None:
        self.where = f"{host}:{port}/{db}"
        self.lease_ms = max(1, int(lease_s * 1000))
        self.prefix = f"flexkv:{fingerprint}"
        # No retries inside redis-py: a dead server must cost one timeout, not several with back-off.
        self._redis = redis.Redis(host=host, port=port, db=db, password=password or None,
                                  socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                  retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._has_password = bool(password)

    # ---- keys --------------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def node_keys(self, node_id: str) -> list[str]:
        return [self.key("node", node_id), self.key("blocks", node_id), self.key("log", node_id)]

    # ---- connection --------------------------------------------------------------------------------

    def connect(self) -> None:
        """Check that Redis answers and accepts us.

        Raises ConfigError (key redis_password) when it refuses the password or wants one we lack, and
        redis.ConnectionError when it cannot be reached. The password itself is never in a message.
        """
        try:
            self._redis.ping()
        except redis.AuthenticationError as exc:
            # AuthenticationError is a ConnectionError: catch it first, it is a configuration mistake.
            if self._has_password:
                problem = f"Redis at {self.where} rejected the password in FLEXKV_REDIS_PASSWORD"
            else:
                problem = f"Redis at {self.where} requires a password: set FLEXKV_REDIS_PASSWORD"
            detail = str(exc).split(".")[0]
            raise ConfigError(f"redis_password: {problem} ({detail}); allowed: the password of that Redis "
                              "server (requirepass)", key="redis_password") from None
        except redis.ResponseError as exc:  # e.g. SELECT of a db the server does not have
            raise ConfigError(f"redis_db: Redis at {self.where} refused us: {exc}", key="redis_db") from None

    def close(self) -> None:
        self._redis.close()

    # ---- the writer's side (one node publishing itself) --------------------------------------------

    def register(self, info: NodeInfo, blocks: Iterable[int]) -> None:
        """Publish ``info`` and the node's whole block set, replacing whatever was there, atomically."""
        nid = info.node_id
        node_key, blocks_key, log_key = self.node_keys(nid)
        p = self._redis.pipeline(transaction=True)
        p.delete(blocks_key, log_key)
        members = [str(h) for h in blocks]
        for i in range(0, len(members), _CHUNK):
            p.sadd(blocks_key, *members[i:i + _CHUNK])
        p.xadd(log_key, {"epoch": info.epoch}, maxlen=LOG_LEN, approximate=True)  # readers start after it
        p.delete(node_key)
        p.hset(node_key, mapping=info.to_redis())
        for k in (node_key, blocks_key, log_key):
            p.pexpire(k, self.lease_ms)
        p.sadd(self.key("nodes"), nid)
        p.execute()

    def heartbeat(self, node_id: str) -> bool:
        """Renew the node's lease. False when its info is gone (expired, or Redis lost its data): the
        caller must `register` again."""
        node_key, blocks_key, log_key = self.node_keys(node_id)
        p = self._redis.pipeline(transaction=False)
        for k in (node_key, blocks_key, log_key):
            p.pexpire(k, self.lease_ms)
        p.sadd(self.key("nodes"), node_id)  # a reader may have pruned us during a lapse
        alive, *_ = p.execute()
        return bool(alive)

    def publish(self, node_id: str, added: Sequence[int], removed: Sequence[int]) -> None:
        """Record one batch of changes in the node's set and log."""
        _, blocks_key, log_key = self.node_keys(node_id)
        p = self._redis.pipeline(transaction=True)
        if added:
            p.sadd(blocks_key, *[str(h) for h in added])
        if removed:
            p.srem(blocks_key, *[str(h) for h in removed])
        p.xadd(log_key, {"add": " ".join(map(str, added)), "del": " ".join(map(str, removed))},
               maxlen=LOG_LEN, approximate=True)
        p.pexpire(blocks_key, self.lease_ms)
        p.pexpire(log_key, self.lease_ms)
        p.execute()

    def unregister(self, node_id: str) -> None:
        """A clean shutdown: peers stop seeing us at their next refresh rather than after the lease."""
        p = self._redis.pipeline(transaction=True)
        p.delete(*self.node_keys(node_id))
        p.srem(self.key("nodes"), node_id)
        p.execute()

    # ---- the readers' side (every other node's snapshot) -------------------------------------------

    def live_nodes(self) -> dict[str, NodeInfo]:
        """Registered nodes whose liveness key has not expired. Prunes the others from ``nodes``."""
        ids = sorted(m.decode() for m in self._redis.smembers(self.key("nodes")))
        if not ids:
            return {}
        p = self._redis.pipeline(transaction=False)
        for nid in ids:
            p.hgetall(self.key("node", nid))
        live: dict[str, NodeInfo] = {}
        gone = []
        for nid, raw in zip(ids, p.execute()):
            info = NodeInfo.from_redis(raw) if raw else None
            if info is None:
                gone.append(nid)
            else:
                live[nid] = info
        if gone:
            # A node that re-registered meanwhile re-adds itself with its next heartbeat.
            self._redis.srem(self.key("nodes"), *gone)
        return live

    def load_blocks(self, node_id: str) -> tuple[str | None, set[int], str]:
        """(epoch, block set, id of the last log entry it includes), read atomically."""
        node_key, blocks_key, log_key = self.node_keys(node_id)
        p = self._redis.pipeline(transaction=True)
        p.hget(node_key, "epoch")
        p.smembers(blocks_key)
        p.xrevrange(log_key, count=1)
        epoch, members, last = p.execute()
        last_id = last[0][0].decode() if last else "0-0"
        return (epoch.decode() if epoch else None), {int(m) for m in members}, last_id

    def changes_since(self, node_id: str, last_id: str) -> Changes | None:
        """Log entries after ``last_id``; None when some may have been trimmed (reload the set)."""
        log_key = self.key("log", node_id)
        p = self._redis.pipeline(transaction=False)
        p.xrange(log_key, "-", "+", count=1)
        p.xrange(log_key, f"({last_id}", "+", count=_READ_BATCH)
        first, entries = p.execute()
        if not first:
            return Changes([], last_id)  # no log: the node's keys expired, its info goes with them
        if _stream_id(first[0][0]) > _stream_id(last_id):
            return None
        batches: list[tuple[list[int], list[int]]] = []
        while True:
            for entry_id, data in entries:
                last_id = entry_id.decode()
                batches.append((_hashes(data.get(b"add")), _hashes(data.get(b"del"))))
            if len(entries) < _READ_BATCH:
                return Changes(batches, last_id)
            entries = self._redis.xrange(log_key, f"({last_id}", "+", count=_READ_BATCH)

    def keys_of(self, node_id: str) -> list[str]:
        """Which of the node's keys exist (tests, operators)."""
        return [k for k in self.node_keys(node_id) if self._redis.exists(k)]
