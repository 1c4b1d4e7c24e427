"""`FlexKVConnector`: vLLM's KV connector interface, delegating to the scheduler or the worker side.

Load it with::

    kv_transfer_config = {
        "kv_connector": "FlexKVConnector",
        "kv_connector_module_path": "flexkv_dynamo.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",   # recompute blocks a failed load could not deliver
    }

vLLM builds one instance in the scheduler (role SCHEDULER: `flexkv_dynamo.scheduler.FlexKVScheduler`,
which owns the cache) and one in every worker (role WORKER: `flexkv_dynamo.worker.FlexKVWorker`, which
copies). Both read the FlexKV configuration (``FLEXKV_CONFIG_PATH`` > ``FLEXKV_*`` > defaults, see
`flexkv_core.config`); with ``ENABLE_FLEXKV=0`` the connector is inert: no cache, no hits, no copies.

The per-step order vLLM 0.31 follows (CPU backend; asynchronous loads run after the forward pass)::

    scheduler: get_num_new_matched_tokens -> update_state_after_alloc -> build_connector_meta
    worker:    handle_preemptions -> bind_connector_metadata -> forward -> start_load_kv -> wait_for_save
               -> get_finished -> get_block_ids_with_load_errors -> get_kv_connector_stats
               -> build_connector_worker_meta -> clear_connector_metadata
    scheduler: request_finished (requests that ended) -> update_connector_output -> take_events
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from flexkv_core.config import load_config

from .metadata import FlexKVConnectorMetadata
from .stats import FlexKVConnectorStats, FlexKVPromMetrics

if TYPE_CHECKING:
    import torch
    from vllm.attention.backends.abstract import AttentionMetadata
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats, PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from .scheduler import FlexKVScheduler
    from .worker import FlexKVWorker

log = logging.getLogger(__name__)

__all__ = ["FlexKVConnector"]


class FlexKVConnector(KVConnectorBase_V1):
    """Tiered KV cache (CPU pool, SSD) behind vLLM's prefix cache. Thin: every call is delegated."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        # Only the owner of the cache checks the machine (memory, SSD directories); workers need the
        # enable flag alone: the pool's name and layout reach them through the metadata.
        config = load_config(check_resources=role == KVConnectorRole.SCHEDULER)
        self.enabled = config.enable
        self.scheduler_side: FlexKVScheduler | None = None
        self.worker_side: FlexKVWorker | None = None
        if not self.enabled:
            log.info("ENABLE_FLEXKV is off: the FlexKV connector does nothing")
        elif role == KVConnectorRole.SCHEDULER:
            from .scheduler import FlexKVScheduler

            self.scheduler_side = FlexKVScheduler(vllm_config, kv_cache_config, config)
        else:
            from .worker import FlexKVWorker

            self.worker_side = FlexKVWorker(vllm_config, kv_cache_config, config)

    @property
    def requires_kv_delivery(self) -> bool:
        # A cache, not a hand-off: a store lost to preemption is a future miss, nothing more.
        return False

    # ---- worker side -----------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.worker_side is not None:
            self.worker_side.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # The start of every step, before the forward pass: stores of the last step start, and stores whose
        # engine blocks this step reuses finish (see flexkv_dynamo.worker).
        if self.worker_side is not None:
            if not isinstance(kv_connector_metadata, FlexKVConnectorMetadata):
                raise TypeError(f"FlexKVConnector got connector metadata of type "
                                f"{type(kv_connector_metadata).__name__}")
            self.worker_side.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self.worker_side is not None and self.has_connector_metadata():
            self.worker_side.start_loads(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole requests, finished before the request is scheduled to compute

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # stores copy whole blocks, from the next step on (wait_for_save, handle_preemptions)

    def wait_for_save(self) -> None:
        if self.worker_side is not None and self.has_connector_metadata():
            self.worker_side.run_stores(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.worker_side is None:
            return None, None
        return None, self.worker_side.take_finished_loads()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.take_load_errors() if self.worker_side is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self.worker_side.take_worker_meta() if self.worker_side is not None else None

    def _meta(self) -> FlexKVConnectorMetadata:
        meta = self._get_connector_metadata()
        if not isinstance(meta, FlexKVConnectorMetadata):
            raise TypeError(f"FlexKVConnector got connector metadata of type {type(meta).__name__}")
        return meta

    # ---- scheduler side --------------------------------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self.scheduler_side is not None:
            self.scheduler_side.bind_kv_cache_manager(kv_cache_manager)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.scheduler_side is None:
            return 0, False
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if self.scheduler_side is not None:
            self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        if self.scheduler_side is None:
            return FlexKVConnectorMetadata()
        return self.scheduler_side.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self.scheduler_side is not None:
            self.scheduler_side.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.scheduler_side is None:
            return False, None
        return self.scheduler_side.request_finished(request)

    def take_events(self) -> Iterable[KVCacheEvent]:
        return self.scheduler_side.take_events() if self.scheduler_side is not None else ()

    def has_pending_push_work(self) -> bool:
        return self.scheduler_side is not None and self.scheduler_side.has_pending_work()

    def reset_cache(self) -> bool | None:
        # Called by vLLM's reset_prefix_cache(reset_connector=True) only; a plain reset_prefix_cache()
        # leaves our tiers alone (which is how tests make vLLM load from them).
        return self.scheduler_side.reset_cache() if self.scheduler_side is not None else None

    # ---- both ------------------------------------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        side = self.scheduler_side or self.worker_side
        return side.get_stats() if side is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return FlexKVConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type[PromMetric], type[PromMetricT]],
                           labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]
                           ) -> FlexKVPromMetrics:
        return FlexKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.worker_side is not None:
            self.worker_side.shutdown()
        if self.scheduler_side is not None:
            self.scheduler_side.shutdown()
