"""What a FlexKV worker checks before vLLM or Dynamo load anything (about a second, instead of after the
model has loaded).

`preflight` builds the FlexKV configuration exactly as the connector will (``FLEXKV_CONFIG_PATH`` >
``FLEXKV_*`` > defaults, with the checks against this machine: memory, /dev/shm, SSD directories and
their free space), then checks that the cache's service endpoint (``FLEXKV_SERVER_RECV_PORT``) is not
owned by another live process, by claiming it as the cache will and letting it go (and that
``FLEXKV_METRICS_PORT``, when set, is free). Nothing is allocated:
no CPU pool, no SSD file (the machine check creates missing SSD directories, nothing in them).

The launcher (``python -m flexkv_dynamo.vllm``) and the start-up hook (``python -m dynamo.vllm
--connector flexkv``) call it; a failure is one line on stderr and exit status 2. The connector repeats
both checks when the engine builds it (the endpoint is claimed before anything is allocated there too),
so a port taken between the two is still refused cleanly.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from flexkv_core.config import ConfigError, FlexKVConfig, load_config
from flexkv_core.service import EndpointInUse, probe_endpoint

__all__ = ["PreflightError", "preflight"]


class PreflightError(RuntimeError):
    """The worker cannot start; the message is the one line to show."""


def preflight(env: Mapping[str, str] | None = None) -> FlexKVConfig:
    """The validated configuration, once the endpoint is known to be free. Raises `PreflightError`."""
    env = os.environ if env is None else env
    try:
        cfg = load_config(env, check_resources=True)
    except ConfigError as exc:
        raise PreflightError(f"flexkv config: {exc}") from None
    if not cfg.enable:
        return cfg  # the connector will be inert: it claims nothing
    if cfg.share_server and cfg.enable_distributed:
        raise PreflightError("FLEXKV_ENABLE_DISTRIBUTED=1 with FLEXKV_SHARE_SERVER=1 is not supported yet: a "
                             "shared cache serves the engines of one node")
    # A worker of a node's shared cache does not probe the endpoint: the owner serves it (or instance 0 starts
    # one), may be too busy starting to answer within the probe's time, and the engine attaches once it does.
    if not cfg.share_server:
        _check_endpoint_free(cfg.server_recv_port)
    if cfg.enable_metrics and cfg.metrics_port:  # every worker serves its own metrics, sharing or not
        _check_port_free(cfg.node_addr, cfg.metrics_port)
    return cfg


def _check_endpoint_free(endpoint: str) -> None:
    """FLEXKV_SERVER_RECV_PORT must not be held by another live process, and must be bindable at all."""
    try:
        probe_endpoint(endpoint)
    except EndpointInUse as exc:
        raise PreflightError(str(exc)) from None
    except OSError as exc:  # cannot be bound at all
        message = exc.strerror or str(exc)
        if "FLEXKV_SERVER_RECV_PORT" not in message:
            message = f"FLEXKV_SERVER_RECV_PORT {endpoint}: {message}"
        raise PreflightError(message) from None


def _check_port_free(host: str, port: int) -> None:
    """FLEXKV_METRICS_PORT must be free where the cache will serve it (FLEXKV_NODE_ADDR)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds it
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PreflightError(f"FLEXKV_METRICS_PORT={port}: cannot serve metrics on {host}:{port} "
                                 f"({exc.strerror}): give each worker its own port") from None
