"""A standalone cache node: ``python -m flexkv_core.distributed --model NAME [layout options]``.

Runs a `TieredCache` with distributed reuse and no engine, configured like any other (``FLEXKV_*`` /
``FLEXKV_CONFIG_PATH``; ``enable_distributed`` is implied). It serves the cache at
``FLEXKV_SERVER_RECV_PORT`` (``flexkv status --endpoint ...`` works; ``distributed`` answers the node's
view: peers, blocks, counters) and takes part in the global index. Uses: checking a multi-node setup
(Redis, ports, transfer engines) before starting engines, and ``deploy/distributed/start_virtual_nodes.sh
--cache-only``. Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from ..cache import TieredCache
from ..config import ConfigError, configure_logging, load_config
from ..layout import CacheIdentity, KVLayout
from ..service import CacheService
from .node import DistributedNode

log = logging.getLogger("flexkv_core.distributed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexkv_core.distributed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model name (part of the cache identity: only nodes with "
                                                   "the same model and layout share blocks)")
    ap.add_argument("--num-layers", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=16, help="tokens per block")
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tp-size", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        cfg = load_config().replace(enable_distributed=True)
    except ConfigError as exc:
        sys.stderr.write(f"flexkv config error: {exc}\n")
        return 2
    configure_logging(cfg)
    layout = KVLayout(num_layers=args.num_layers, block_size=args.block_size, num_kv_heads=args.num_kv_heads,
                      head_dim=args.head_dim, dtype=args.dtype, tp_size=args.tp_size)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with TieredCache(cfg, CacheIdentity(model=args.model, layout=layout)) as cache:
        try:
            node = DistributedNode(cache, cfg)
            node.start()
        except ConfigError as exc:
            sys.stderr.write(f"flexkv config error: {exc}\n")
            return 2
        with node:
            service = CacheService(cfg.server_recv_port, {**cache.service_handlers(), "distributed": node.describe},
                                   share=cfg.share_server, name=f"flexkv-node {node.node_id}")
            service.start()
            log.info("standalone cache node %s ready; cache service at %s", node.node_id, service.endpoint)
            stop.wait()
            service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
