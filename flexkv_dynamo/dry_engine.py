"""`DryEngine`: vLLM's real scheduler driving our connector, with no model and no worker process.

It exists to drive the scheduler side of the connector (`flexkv_dynamo.scheduler.FlexKVScheduler`) the
way an engine does, step by step, in seconds instead of minutes: `bench/bench_scheduler.py` measures its
cost per block with it, and `tests/test_scheduler_dry.py` tests preemption, aborts, partial stores and
resets with it.

What is real: vLLM 0.31's `Scheduler` (admission, chunked prefill, preemption, its prefix cache, block
pool and KV events, ``reset_prefix_cache``), vLLM `Request`s with block hashes made by vLLM's own hasher,
and the connector exactly as vLLM's factory builds it from ``kv_transfer_config`` (`FlexKVConnector` ->
`FlexKVScheduler` -> `TieredCache` with its real CPU pool, SSD tier and service endpoint).

What stands in for what cannot run without a model:

* the model: each step a scheduled request "computes" its scheduled tokens; a request whose prompt is
  done samples one token (a fixed function of its length, so two runs of one prompt agree);
* the workers: each load and store job of the step is carried out as `FlexKVWorker` does it, except that
  a block's *content* is an 8-byte tag, the engine hash of the block it holds, instead of its KV bytes.
  The forward pass writes the tag into each engine block it completes; a store copies tags into the
  CPU pool's real slots; a load copies them back. Stores are deferred as the real worker defers them, in
  the way most hostile to a missing fence: a store job of one step copies its tags only *after the next
  step's forward pass* (which may have rewritten a reallocated block), unless that step's ``flush`` names
  it, in which case it copies before the forward pass. A load that fills an engine block with a tag other
  than that block's hash is recorded in `wrong_loads` (a wrong slot, a block loaded before it was
  stored, a store that read a block overwritten under it...). Jobs can be made to fail (`fail_jobs`), as a
  worker reports a failed copy;
* vLLM's KV event publisher: `events` keeps every event of every batch, in order.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flexkv_core.config import patched_environ

from .kv_events import engine_hash_to_int
from .metadata import FlexKVConnectorMetadata, FlexKVWorkerMetadata, LoadJob, StoreJob
from .tiny_model import TinyModelSpec, make_tiny_model

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from .scheduler import FlexKVScheduler

log = logging.getLogger(__name__)

__all__ = ["DryEngine", "EventRecorder", "WrongLoad"]

#: The tiny model's word tokens (0-2 are special).
VOCAB = range(3, 2003)
_TAG_BYTES = 8


class EventRecorder:
    """Stands in for vLLM's ZMQ event publisher: keeps every published event, in order (or, with
    ``keep=False``, counts them only: a benchmark's millions of token ids need not stay in memory)."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.events: list[Any] = []
        self.published = 0

    def publish(self, batch: Any) -> None:
        self.published += len(batch.events)
        if self.keep:
            self.events.extend(batch.events)

    def shutdown(self) -> None:
        return


@dataclass(frozen=True)
class WrongLoad:
    """A load that filled engine block ``block_id`` (block ``position`` of ``req_id``) with the wrong tag."""

    req_id: str
    position: int
    block_id: int
    expected: int
    got: int


@dataclass
class StepOutput:
    finished: dict[str, list[int]] = field(default_factory=dict)  # request id -> its output tokens
    scheduled: int = 0  # tokens scheduled this step
    schedule_s: float = 0.0  # vLLM's schedule() (our build_connector_meta and lookups included)
    update_s: float = 0.0  # vLLM's update_from_output() (our completions and events included)
    schedule_cpu_s: float = 0.0  # the same, CPU time of this thread
    update_cpu_s: float = 0.0


class DryEngine:
    """vLLM's scheduler with our connector and stand-ins for the model and the workers (module docstring)."""

    def __init__(self, *, block_size: int = 16, num_gpu_blocks: int = 512, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_model_len: int = 8192,
                 flexkv_env: Mapping[str, str] | None = None, workdir: str | None = None,
                 kv_events: bool = True, keep_events: bool = True, tags: bool = True,
                 num_layers: int = 2) -> None:
        import torch
        from vllm.config import (
            CacheConfig,
            DeviceConfig,
            KVEventsConfig,
            KVTransferConfig,
            ModelConfig,
            SchedulerConfig,
            VllmConfig,
        )
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        self.workdir = workdir or tempfile.mkdtemp(prefix="fkvdry", dir="/tmp")
        spec = TinyModelSpec(num_layers=num_layers, max_positions=max(max_model_len, 8192))
        model_dir = make_tiny_model(os.path.join(self.workdir, "model"), spec)
        self.block_size = block_size
        self.tags = tags
        env = {
            "ENABLE_FLEXKV": "1", "FLEXKV_CPU_CACHE_GB": "0.25", "FLEXKV_SSD_CACHE_GB": "0",
            "FLEXKV_SSD_CACHE_DIR": os.path.join(self.workdir, "ssd"),
            "FLEXKV_SERVER_RECV_PORT": f"ipc://{os.path.join(self.workdir, 'svc.sock')}",
        }
        env.update(flexkv_env or {})
        self.env = env
        vllm_config = VllmConfig(
            model_config=ModelConfig(model=model_dir, dtype="float32", seed=0, max_model_len=max_model_len),
            scheduler_config=SchedulerConfig(max_num_seqs=min(max_num_seqs, max_num_batched_tokens),
                                             max_num_batched_tokens=max_num_batched_tokens,
                                             max_model_len=max_model_len, enable_chunked_prefill=True,
                                             is_encoder_decoder=False),
            cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=True, cache_dtype="auto"),
            kv_transfer_config=KVTransferConfig(kv_connector="FlexKVConnector",
                                                kv_connector_module_path="flexkv_dynamo.connector",
                                                kv_role="kv_both", kv_load_failure_policy="recompute"),
            kv_events_config=KVEventsConfig(enable_kv_cache_events=kv_events, publisher="null"),
            device_config=DeviceConfig("cpu"),
        )
        layers = [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]
        kv_cache_config = KVCacheConfig(
            num_blocks=num_gpu_blocks, kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(layers, FullAttentionSpec(block_size=block_size, num_kv_heads=2,
                                                                        head_size=64, dtype=torch.float32))])
        vllm_config.cache_config.num_gpu_blocks = num_gpu_blocks
        with patched_environ(env):
            self.scheduler: Scheduler = Scheduler(vllm_config, kv_cache_config, StructuredOutputManager(vllm_config),
                                                  block_size=block_size, log_stats=True)
        self.recorder = EventRecorder(keep=keep_events)
        self.scheduler.kv_event_publisher = self.recorder
        hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self._hasher = get_request_block_hasher(block_size, hash_fn)
        self._engine_tags: dict[int, int] = {}  # engine block id -> tag of the block it holds
        self.wrong_loads: list[WrongLoad] = []
        self._deferred: list[StoreJob] = []  # store jobs of the last step, copied during this one
        self._outputs: dict[str, list[int]] = {}  # request id -> tokens the engine output so far
        #: A job (load or store) for which this returns True is reported as failed by the workers.
        self.fail_jobs: Callable[[LoadJob | StoreJob], bool] = lambda job: False
        self.steps = 0
        self.closed = False
        # As vLLM's engine core does once it is up: the start-up heap is static, the GC skips it.
        from vllm.utils.gc_utils import freeze_gc_heap

        freeze_gc_heap()

    # ---- what tests and benchmarks use -------------------------------------------------------------

    @property
    def connector(self) -> Any:
        return self.scheduler.connector

    @property
    def flexkv(self) -> FlexKVScheduler:
        side = self.connector.scheduler_side
        assert side is not None, "the connector has no scheduler side (ENABLE_FLEXKV=0?)"
        return side

    @property
    def events(self) -> list[Any]:
        return self.recorder.events

    def add(self, req_id: str, prompt: list[int], max_tokens: int = 4) -> Request:
        """Queue a request, as vLLM's engine core does with a new one."""
        from vllm import SamplingParams
        from vllm.v1.request import Request

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = Request(req_id, list(prompt), params, None, block_hasher=self._hasher)
        self.scheduler.add_request(request)
        return request

    def abort(self, req_ids: Iterable[str]) -> None:
        from vllm.v1.request import RequestStatus

        self.scheduler.finish_requests(list(req_ids), RequestStatus.FINISHED_ABORTED)

    def reset_prefix_cache(self, reset_connector: bool = False) -> bool:
        """vLLM's ``reset_prefix_cache`` (between steps, as the engine core runs it)."""
        return self.scheduler.reset_prefix_cache(reset_connector=reset_connector)

    def step(self) -> StepOutput:
        """One engine step: schedule, "run" the model and the workers, update from their output."""
        result = StepOutput()
        if not self.scheduler.has_requests():
            return result
        t0, c0 = time.perf_counter(), time.thread_time()
        output = self.scheduler.schedule()
        result.schedule_s, result.schedule_cpu_s = time.perf_counter() - t0, time.thread_time() - c0
        result.scheduled = output.total_num_scheduled_tokens
        runner_output = self._run(output)
        t0, c0 = time.perf_counter(), time.thread_time()
        engine_outputs = self.scheduler.update_from_output(output, runner_output)
        result.update_s, result.update_cpu_s = time.perf_counter() - t0, time.thread_time() - c0
        for outs in engine_outputs.values():
            for out in outs.outputs:  # what the engine hands the front end: new tokens, finish reasons
                tokens = self._outputs.setdefault(out.request_id, [])
                tokens.extend(out.new_token_ids)
                if out.finish_reason is not None:
                    result.finished[out.request_id] = self._outputs.pop(out.request_id)
        self.steps += 1
        return result

    def run(self, max_steps: int = 10_000) -> dict[str, list[int]]:
        """Step until no request is left; returns the output tokens of every request that finished."""
        finished: dict[str, list[int]] = {}
        for _ in range(max_steps):
            if not self.scheduler.has_requests():
                return finished
            finished.update(self.step().finished)
        raise AssertionError(f"requests still unfinished after {max_steps} steps: {list(self.scheduler.requests)}")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.scheduler.shutdown()

    def __enter__(self) -> DryEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the stand-ins -------------------------------------------------------------------------------

    def _run(self, output: SchedulerOutput) -> Any:
        """The model and the workers of one step; returns vLLM's ``ModelRunnerOutput``."""
        from vllm.v1.outputs import ModelRunnerOutput

        requests = self.scheduler.requests
        meta = output.kv_connector_metadata
        worker_meta = FlexKVWorkerMetadata()
        # The start of the step (the real worker's handle_preemptions): fenced stores finish first.
        flush = set(meta.flush) if isinstance(meta, FlexKVConnectorMetadata) else set()
        self._finish_stores([job for job in self._deferred if job.job_id in flush], worker_meta)
        self._deferred = [job for job in self._deferred if job.job_id not in flush]
        req_ids = list(output.num_scheduled_tokens)
        sampled: list[list[int]] = []
        for req_id in req_ids:
            request = requests[req_id]
            done = request.num_computed_tokens  # vLLM advanced it when it scheduled the step
            if self.tags:
                self._compute(request, done - output.num_scheduled_tokens[req_id], done)
            if done >= request.num_tokens:  # the prompt (or the last output token) is in: sample one
                token = VOCAB[(request.num_tokens * 7919 + len(request.prompt_token_ids)) % len(VOCAB)]
                sampled.append([token])
            else:
                sampled.append([])  # a chunk of a longer prompt: nothing to sample yet
        kv_output = self._workers(meta, worker_meta)
        return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                 sampled_token_ids=sampled, kv_connector_output=kv_output)

    def _block_table(self, req_id: str) -> list[int]:
        (blocks,) = self.scheduler.kv_cache_manager.get_block_ids(req_id)
        return blocks

    def _compute(self, request: Request, start_token: int, end_token: int) -> None:
        """The forward pass completes blocks [start_token // bs, end_token // bs) that have a hash."""
        bs = self.block_size
        first, last = start_token // bs, min(end_token // bs, len(request.block_hashes))
        if first >= last:
            return
        table = self._block_table(request.request_id)
        for i in range(first, last):
            self._engine_tags[table[i]] = engine_hash_to_int(request.block_hashes[i])

    def _workers(self, meta: FlexKVConnectorMetadata | None, worker_meta: FlexKVWorkerMetadata) -> KVConnectorOutput | None:
        """After the forward pass, as `FlexKVWorker` does: the step's loads, the stores of the last step still
        in flight (they finish now), and this step's stores recorded for the next step."""
        from vllm.v1.outputs import KVConnectorOutput

        self._finish_stores(self._deferred, worker_meta)
        self._deferred = list(meta.stores) if meta is not None else []
        finished_recving: set[str] = set()
        errors: set[int] = set()
        pool = self.flexkv.cache.pool if self.tags else None
        for job in meta.loads if meta is not None else ():
            finished_recving.add(job.req_id)
            errors.update(job.failed_block_ids)
            if self.fail_jobs(job):
                errors.update(job.block_ids)
                worker_meta.failed[job.job_id] = 1
                continue
            if pool is not None and job.block_ids:
                self._load_tags(job, pool)
            worker_meta.done[job.job_id] = 1
        if not finished_recving and not errors and worker_meta.is_empty():
            return None
        return KVConnectorOutput(finished_recving=finished_recving or None, invalid_block_ids=errors,
                                 kv_connector_worker_meta=None if worker_meta.is_empty() else worker_meta)

    def _finish_stores(self, jobs: list[StoreJob], worker_meta: FlexKVWorkerMetadata) -> None:
        """Copy the stores' engine blocks (their tags as they are now) into their CPU slots and report them."""
        pool = self.flexkv.cache.pool if self.tags else None
        for job in jobs:
            if self.fail_jobs(job):
                worker_meta.failed[job.job_id] = 1
                continue
            if pool is not None:
                for block_id, slot in zip(job.block_ids, job.slots):
                    tag = self._engine_tags.get(block_id, 0)
                    pool.slot(slot)[:_TAG_BYTES] = tag.to_bytes(_TAG_BYTES, "little")
            worker_meta.done[job.job_id] = 1

    def _load_tags(self, job: LoadJob, pool: Any) -> None:
        request = self.scheduler.requests.get(job.req_id)
        table = self._block_table(job.req_id) if request is not None else []
        position = {block_id: i for i, block_id in enumerate(table)}
        for block_id, slot in zip(job.block_ids, job.slots):
            got = int.from_bytes(pool.slot(slot)[:_TAG_BYTES], "little")
            self._engine_tags[block_id] = got
            i = position.get(block_id)
            if request is None or i is None or i >= len(request.block_hashes):
                continue  # the request ended meanwhile: vLLM frees the blocks, nobody reads them
            expected = engine_hash_to_int(request.block_hashes[i])
            if got != expected:
                self.wrong_loads.append(WrongLoad(job.req_id, i, block_id, expected, got))
