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
    scheduler: request_finished (requests that ended) -> update_connector_output
               -> get_kv_connector_stats -> take_events

The engine never dies of its cache: every callback catches what our code raises, logs it once with the
requests involved, counts it (``vllm:flexkv_connector_errors``) and answers vLLM with a safe degraded
value (`flexkv_dynamo.guard`). What each callback answers after a failure, and why it is safe:

* ``get_num_new_matched_tokens``: a miss (0 tokens): vLLM computes the prompt.
* ``update_state_after_alloc``: vLLM already counts on the load (the request waits for it), so one load job
  still goes out, with every block vLLM expected from us as a load error: vLLM recomputes them.
* ``build_connector_meta``: every load not sent yet goes out as load errors (requests never wait
  forever), every store not sent yet is rolled back (the blocks are simply not cached).
* ``update_connector_output``: nothing to answer; a job whose completion fails is rolled back alone.
* ``request_finished``: "free the blocks now", as always (stores finish within their step).
* ``take_events`` / ``get_kv_connector_stats``: none this step (the router may credit a block we no longer
  hold: the lookup misses and vLLM computes it). ``has_pending_push_work``: yes (keep stepping).
  ``reset_cache``: the reset failed (vLLM reports it).
* worker ``handle_preemptions``: every store in flight is waited for (so no fence is skipped) and those
  not started are reported failed; ``start_load_kv``: its loads end as load errors; ``wait_for_save``: its
  stores are reported failed; ``get_finished``: every running load is waited for and ended as failed;
  ``get_block_ids_with_load_errors``: every block of the loads reported finished this step (never
  bytes vLLM would take for loaded when they are not); ``build_connector_worker_meta``: none this step
  (the jobs are reported with the next).
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

from .guard import CallbackFailures, FaultInjector
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
    """Tiered KV cache (CPU pool, SSD) behind vLLM's prefix cache. Thin: every call is delegated, and
    every failure of ours is caught here (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        # Only the owner of the cache checks the machine (memory, SSD directories); workers need the enable
        # flag and the endpoint alone: they ask the cache's service there for the pool (flexkv_dynamo.worker).
        config = load_config(check_resources=role == KVConnectorRole.SCHEDULER)
        self.enabled = config.enable
        self.scheduler_side: FlexKVScheduler | None = None
        self.worker_side: FlexKVWorker | None = None
        self.failures = CallbackFailures("scheduler" if role == KVConnectorRole.SCHEDULER else "worker")
        #: Test-only fault injection (FLEXKV_TEST_FAULTS=1 where the connector is built), else None.
        self.faults = FaultInjector.from_env()
        # Worker side: the job and blocks of each load handed to the worker and not yet reported finished,
        # and of those reported this step: what get_block_ids_with_load_errors answers if it fails.
        self._loads_out: dict[str, tuple[int, list[int]]] = {}
        self._due: list[tuple[int, list[int]]] = []
        if not self.enabled:
            log.info("ENABLE_FLEXKV is off: the FlexKV connector does nothing")
        elif role == KVConnectorRole.SCHEDULER:
            from .scheduler import FlexKVScheduler

            self.scheduler_side = FlexKVScheduler(vllm_config, kv_cache_config, config, failures=self.failures,
                                                  faults=self.faults)
        else:
            from .worker import FlexKVWorker

            self.worker_side = FlexKVWorker(vllm_config, kv_cache_config, config)

    @property
    def requires_kv_delivery(self) -> bool:
        # A cache, not a hand-off: a store lost to preemption is a future miss, nothing more.
        return False

    def _point(self, name: str) -> None:
        if self.faults is not None:
            self.faults.check(name)

    def _quietly(self, what: str, action: Any) -> Any:
        """A step of a degraded answer; its own failure is logged and yields None."""
        try:
            return action()
        except Exception:  # noqa: BLE001 - already degrading: answer vLLM anyway
            log.exception("FlexKV connector: could not %s after a failure", what)
            return None

    # ---- worker side -----------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.worker_side is None:
            return
        try:
            self._point("register_kv_caches")
            self.worker_side.register_kv_caches(kv_caches)
        except Exception as exc:  # noqa: BLE001 - without views every copy job fails: misses, not a dead engine
            self.failures.record("register_kv_caches", (), exc, "nothing: every later copy job fails")
            why = f"register_kv_caches failed ({type(exc).__name__}: {exc})"
            self._quietly("mark the worker unattached", lambda: self.worker_side.fail_attach(why))

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # The start of every step, before the forward pass: stores of the last step start, and stores whose
        # engine blocks this step reuses finish (see flexkv_dynamo.worker).
        if self.worker_side is None:
            return
        if not isinstance(kv_connector_metadata, FlexKVConnectorMetadata):
            raise TypeError(f"FlexKVConnector got connector metadata of type {type(kv_connector_metadata).__name__}")
        try:
            self._point("handle_preemptions")
            self.worker_side.handle_preemptions(kv_connector_metadata)
        except Exception as exc:  # noqa: BLE001
            self.failures.record("handle_preemptions", [job.req_id for job in kv_connector_metadata.stores], exc,
                                 "stores in flight waited for; a failed one is reported failed (not cached)")
            self._quietly("finish the stores in flight", self.worker_side.drain_stores)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self.worker_side is None or not self.has_connector_metadata():
            return
        meta = None
        try:
            meta = self._meta()
            for job in meta.loads:
                self._loads_out[job.req_id] = (job.job_id, job.block_ids + job.failed_block_ids)
            self._point("start_load_kv")
            self.worker_side.start_loads(meta)
        except Exception as exc:  # noqa: BLE001
            jobs = meta.loads if meta is not None else []
            self.failures.record("start_load_kv", [job.req_id for job in jobs], exc,
                                 "its loads ended as load errors (recomputed)")
            if jobs:
                self._quietly("fail the loads", lambda: self.worker_side.fail_loads(jobs))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole requests, finished before the request is scheduled to compute

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # stores copy whole blocks, from the next step on (wait_for_save, handle_preemptions)

    def wait_for_save(self) -> None:
        if self.worker_side is None or not self.has_connector_metadata():
            return
        meta = None
        try:
            meta = self._meta()
            self._point("wait_for_save")
            self.worker_side.run_stores(meta)
        except Exception as exc:  # noqa: BLE001
            jobs = meta.stores if meta is not None else []
            self.failures.record("wait_for_save", [job.req_id for job in jobs], exc,
                                 "its stores reported failed (rolled back: not cached)")
            if jobs:
                self._quietly("fail the stores", lambda: self.worker_side.fail_stores(jobs))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.worker_side is None:
            return None, None
        try:
            self._point("get_finished")
            recving = self.worker_side.take_finished_loads()
        except Exception as exc:  # noqa: BLE001
            self.failures.record("get_finished", self._loads_out, exc,
                                 "every running load waited for and ended as load errors (recomputed)")
            recving = self._quietly("abandon the loads", self.worker_side.abandon_loads) or set()
        for req_id in recving:
            if req_id in self._loads_out:
                self._due.append(self._loads_out.pop(req_id))
        return None, recving

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self.worker_side is None:
            return set()
        due, self._due = self._due, []
        try:
            self._point("get_block_ids_with_load_errors")
            return self.worker_side.take_load_errors()
        except Exception as exc:  # noqa: BLE001 - errors must not be lost: vLLM would use unloaded blocks
            blocks = {block for _, job_blocks in due for block in job_blocks}
            self.failures.record("get_block_ids_with_load_errors", (), exc,
                                 f"all {len(blocks)} blocks of the loads finished this step as load errors")
            # The scheduler must learn that those loads failed too (it then offers those requests no hit).
            worker = self.worker_side
            self._quietly("report the loads failed", lambda: worker.report_failed([job for job, _ in due]))
            return blocks

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self.worker_side is None:
            return None
        try:
            self._point("build_connector_worker_meta")
            return self.worker_side.take_worker_meta()
        except Exception as exc:  # noqa: BLE001
            self.failures.record("build_connector_worker_meta", (), exc, "no job reports this step")
            return None

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
        try:
            return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)
        except Exception as exc:  # noqa: BLE001
            self.failures.record("get_num_new_matched_tokens", [request.request_id], exc, "a miss")
            return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        side = self.scheduler_side
        if side is None:
            return
        try:
            side.update_state_after_alloc(request, blocks, num_external_tokens)
        except Exception as exc:  # noqa: BLE001
            self.failures.record("update_state_after_alloc", [request.request_id], exc,
                                 f"a load of {num_external_tokens} tokens, all load errors (recomputed)")
            self._quietly("fail the load", lambda: side.fail_load(request, blocks, num_external_tokens))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        side = self.scheduler_side
        if side is None:
            return FlexKVConnectorMetadata()
        try:
            return side.build_connector_meta(scheduler_output)
        except Exception as exc:  # noqa: BLE001
            meta = self._quietly("abandon the step", lambda: side.abandon_step(scheduler_output))
            meta = meta or FlexKVConnectorMetadata()
            self.failures.record("build_connector_meta", [job.req_id for job in meta.loads], exc,
                                 "no store this step, unsent loads as load errors (recomputed)")
            return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self.scheduler_side is None:
            return
        try:
            self.scheduler_side.update_connector_output(connector_output)
        except Exception as exc:  # noqa: BLE001
            self.failures.record("update_connector_output", (), exc, "nothing (jobs not completed are kept)")

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.scheduler_side is None:
            return False, None
        try:
            return self.scheduler_side.request_finished(request)
        except Exception as exc:  # noqa: BLE001 - freeing now is always safe: stores end within their step
            self.failures.record("request_finished", [request.request_id], exc, "free its blocks now")
            return False, None

    def take_events(self) -> Iterable[KVCacheEvent]:
        if self.scheduler_side is None:
            return ()
        try:
            return self.scheduler_side.take_events()
        except Exception as exc:  # noqa: BLE001
            self.failures.record("take_events", (), exc, "no tier events this step")
            return ()

    def has_pending_push_work(self) -> bool:
        if self.scheduler_side is None:
            return False
        try:
            return self.scheduler_side.has_pending_work()
        except Exception as exc:  # noqa: BLE001 - "yes": a load left waiting must still go out
            self.failures.record("has_pending_push_work", (), exc, "yes (keep stepping)")
            return True

    def reset_cache(self) -> bool | None:
        # Called by vLLM's reset_prefix_cache(reset_connector=True) only; a plain reset_prefix_cache()
        # leaves our tiers alone (which is how tests make vLLM load from them).
        if self.scheduler_side is None:
            return None
        try:
            return self.scheduler_side.reset_cache()
        except Exception as exc:  # noqa: BLE001
            self.failures.record("reset_cache", (), exc, "reset failed")
            return False

    # ---- both ------------------------------------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        side = self.scheduler_side or self.worker_side
        if side is None:
            return None
        stats = None
        try:
            if self.worker_side is not None:
                self._point("get_kv_connector_stats")
            stats = side.get_stats()
        except Exception as exc:  # noqa: BLE001
            self.failures.record("get_kv_connector_stats", (), exc, "no stats this step")
        errors = self.failures.take_count()
        if errors:
            stats = stats or FlexKVConnectorStats()
            stats.add("connector_errors", errors)
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return FlexKVConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type[PromMetric], type[PromMetricT]],
                           labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]
                           ) -> FlexKVPromMetrics:
        return FlexKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        for side in (self.worker_side, self.scheduler_side):
            if side is not None:
                try:
                    side.shutdown()
                except Exception as exc:  # noqa: BLE001
                    self.failures.record("shutdown", (), exc, "nothing (shutting down)")
