"""Distributed KV-cache reuse across nodes.

Each node publishes the blocks its CPU and SSD tiers hold to Redis (with leases and a liveness key), keeps
a local snapshot of everyone's blocks for fast lookups, and fetches blocks only peers hold over Mooncake's
transfer engine into its own CPU slots. Off unless ``enable_distributed`` (FLEXKV_ENABLE_DISTRIBUTED) is
set; ``deploy/distributed/README.md`` is the operator's guide.

    node = start_distributed(cache, config)   # None when disabled; sets cache.remote
    ...
    node.close()

Modules: `registry` (the Redis key schema), `snapshot` (the local copy of the global index), `transfer`
(the Mooncake transfer engine, run in a helper process), `node` (`DistributedNode`, tying them to a
`TieredCache`). Names are imported on first use: the transfer-engine helper process imports
``flexkv_core.distributed.transfer`` and should not pay for Redis and the cache.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DistributedNode": "node", "NodeStats": "node", "start_distributed": "node",
    "NodeInfo": "registry", "Registry": "registry",
    "GlobalSnapshot": "snapshot",
    "EngineProcess": "transfer", "MooncakeTransport": "transfer", "TransferError": "transfer",
}

__all__ = ["DistributedNode", "EngineProcess", "GlobalSnapshot", "MooncakeTransport", "NodeInfo", "NodeStats",
           "Registry", "TransferError", "start_distributed"]

if TYPE_CHECKING:
    from .node import DistributedNode, NodeStats, start_distributed
    from .registry import NodeInfo, Registry
    from .snapshot import GlobalSnapshot
    from .transfer import EngineProcess, MooncakeTransport, TransferError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
