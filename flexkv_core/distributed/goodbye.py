"""Leaving Redis when a node's process ends, however it ends.

vLLM stops the engine core that holds a worker's cache (and its `DistributedNode`) with SIGTERM followed
at once by SIGKILL of its whole process tree, so `DistributedNode.close` never runs: the node's keys would
stay in Redis until its lease lapses, and peers would keep planning fetches from a node that is gone.

So each node starts a *goodbye*: a small detached process (a session of its own, not a descendant of the
node: vLLM kills the node's process tree) that waits for the node's process to end (a pidfd) and then
removes the node's keys from Redis, unless

* the node closed cleanly first: `Goodbye.cancel` writes to a pipe the goodbye watches, and it leaves
  without touching Redis (the node unregistered itself);
* the keys belong to another incarnation of the node (same address and port, another pid): a check and
  delete in one Lua script, so a fast restart is never unregistered by its predecessor's goodbye.

Peers then drop the node at their next snapshot refresh. The goodbye imports redis-py and the standard
library only, and gets its settings (the Redis password among them) on stdin, never in its command line.

    goodbye = Goodbye.start(redis_spec, node_keys, nodes_key, node_id)   # None if it could not start
    ...
    goodbye.cancel()                                                       # clean close
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

__all__ = ["Goodbye", "GoodbyeSpec"]

#: Delete the node's keys only if they are still this incarnation's (KEYS[1] is its info hash).
_UNREGISTER_IF_MINE = """
if redis.call('HGET', KEYS[1], 'pid') ~= ARGV[1] then return 0 end
redis.call('DEL', unpack(KEYS, 1, #KEYS - 1))
redis.call('SREM', KEYS[#KEYS], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class GoodbyeSpec:
    """What the goodbye needs: where Redis is, which keys are the node's, whose death to wait for."""

    host: str
    port: int
    password: str | None
    db: int
    node_keys: list[str]  # the info hash first
    nodes_key: str  # the set of registered node ids
    node_id: str
    pid: int  # the node's process
    timeout_s: float  # per Redis attempt
    give_up_s: float  # stop retrying an unreachable Redis after this (the lease has lapsed by then)


class Goodbye:
    """The node's handle on its goodbye process."""

    def __init__(self, cancel_fd: int) -> None:
        self._cancel_fd: int | None = cancel_fd

    @classmethod
    def start(cls, spec: GoodbyeSpec) -> Goodbye | None:
        """Start the goodbye for ``spec`` (the caller's own process); None (and a warning) if it could not."""
        read_fd, write_fd = os.pipe()
        try:
            # The intermediate process forks the goodbye and exits: the goodbye is then nobody's child
            # in the node's tree (and in a session of its own, out of the node's process group).
            proc = subprocess.Popen([sys.executable, "-m", __name__, str(read_fd)], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(read_fd,),
                                    start_new_session=True, env=_child_env())
            _, err = proc.communicate(json.dumps(asdict(spec)).encode(), timeout=30)
            if proc.returncode != 0:
                raise RuntimeError(err.decode(errors="replace").strip()[-500:] or f"exit status {proc.returncode}")
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            os.close(write_fd)
            log.warning("no goodbye process for node %s (%s): if this process is killed, peers see it until its "
                        "lease lapses", spec.node_id, exc)
            return None
        finally:
            os.close(read_fd)
        return cls(write_fd)

    def cancel(self) -> None:
        """The node unregistered itself: the goodbye leaves without touching Redis."""
        fd, self._cancel_fd = self._cancel_fd, None
        if fd is None:
            return
        try:
            os.write(fd, b"x")
        except OSError:  # it died already: nothing to cancel
            pass
        finally:
            os.close(fd)


def _child_env() -> dict[str, str]:
    """Our environment, with this package importable even when it is not installed."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


# ---- the goodbye process -------------------------------------------------------------------------------


def _wait_for_end(spec: GoodbyeSpec, cancel_fd: int) -> bool:
    """Block until the node's process ends (True) or it cancels us (False)."""
    try:
        pidfd = os.pidfd_open(spec.pid)
    except ProcessLookupError:
        return True  # it ended before we looked
    while True:
        ready, _, _ = select.select([pidfd, cancel_fd], [], [])
        if pidfd in ready:
            return True
        if os.read(cancel_fd, 1):
            return False
        # EOF without a word: the node dropped its end without closing cleanly; keep waiting for the process.
        os.close(cancel_fd)
        select.select([pidfd], [], [])
        return True


def _unregister(spec: GoodbyeSpec, client) -> bool:
    """Remove the node's keys if they are still its own. Retries while Redis is unreachable, up to
    ``give_up_s``. True when Redis answered."""
    import redis

    deadline = time.monotonic() + spec.give_up_s
    while True:
        try:
            client.eval(_UNREGISTER_IF_MINE, len(spec.node_keys) + 1, *spec.node_keys, spec.nodes_key,
                        str(spec.pid), spec.node_id)
            return True
        except redis.RedisError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        finally:
            client.close()


def _main(cancel_fd: int) -> None:
    spec = GoodbyeSpec(**json.loads(sys.stdin.read()))
    # Armed before the node's Popen returns: redis-py imported (that takes seconds on a busy machine) and
    # the client made, so that the goodbye acts within milliseconds of the node's end.
    import redis

    client = redis.Redis(host=spec.host, port=spec.port, db=spec.db, password=spec.password or None,
                         socket_timeout=spec.timeout_s, socket_connect_timeout=spec.timeout_s)
    if os.fork():
        os._exit(0)  # the intermediate: the node's Popen returns now
    os.closerange(0, 3)  # nothing to print to and nobody to read from: the node may be long gone
    if _wait_for_end(spec, cancel_fd):
        _unregister(spec, client)


if __name__ == "__main__":
    _main(int(sys.argv[1]))
