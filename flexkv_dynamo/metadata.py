"""What the scheduler-side connector tells its workers each step, and what they answer.

vLLM hands `FlexKVConnectorMetadata` (built by ``build_connector_meta``) to every worker before the
step runs; with a multi-process executor it is pickled, so everything here is plain data. Workers
answer with `FlexKVWorkerMetadata` (``build_connector_worker_meta``); vLLM merges the answers of all
workers with ``aggregate`` and passes the sum to the scheduler's ``update_connector_output``.

The contract between the two sides:

* The pool's name and layout are not in here: each worker asks the cache's service for them once
  (``attach`` at ``FLEXKV_SERVER_RECV_PORT``, see `flexkv_dynamo.worker`).
* A store job names engine blocks that are complete once this step's forward pass has run. The worker
  starts copying them at the beginning of the *next* step (vLLM's offloading connector does the same: the
  copy then overlaps that step's forward instead of this step's sampling) and reports the job in the step's
  answer in which it finds the copy finished. The scheduler publishes the blocks (``complete_store``) when
  every worker reported the job: blocks are announced only once their bytes are in place.
* Engine blocks a store still reads must not be overwritten. vLLM frees a request's blocks when it ends
  or is preempted, and may hand them to another request at once; so the scheduler lists in ``flush`` every
  store job that reads a block allocated in this step, or that belongs to a request preempted in this
  step, and the worker finishes those jobs before the forward pass (``handle_preemptions``). Blocks of a
  running request are never rewritten while it runs.
* A load job is sent only once its CPU slots hold the bytes (SSD staging done). The worker copies
  them into the named engine blocks and reports the job *and* its request id (``finished_recving``) in
  the step the copy is done; ``failed_block_ids`` (blocks we promised but cannot deliver) are reported as
  load errors in that step too, so vLLM recomputes them. Every request that waits for a load gets exactly
  one load job, possibly with nothing to copy (its request was aborted meanwhile): vLLM frees the
  blocks of a request that ends while waiting only after the worker reports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from flexkv_core.layout import KVLayout


@dataclass(frozen=True)
class PoolInfo:
    """Where the CPU tier lives: what a worker needs to map it (`flexkv_core.tiers.cpu.CpuPool.attach`).
    The cache's service answers it (``attach``); it never travels in the per-step metadata."""

    name: str
    num_slots: int
    slot_bytes: int
    layout: KVLayout


@dataclass
class StoreJob:
    """Copy engine blocks into pool slots (``block_ids[i]`` -> ``slots[i]``)."""

    job_id: int
    req_id: str
    block_ids: list[int]
    slots: list[int]


@dataclass
class LoadJob:
    """Copy pool slots into engine blocks (``slots[i]`` -> ``block_ids[i]``), then report ``req_id``."""

    job_id: int
    req_id: str
    block_ids: list[int]
    slots: list[int]
    #: engine blocks vLLM expects us to fill but that we cannot (evicted, failed SSD read): load errors
    failed_block_ids: list[int] = field(default_factory=list)


@dataclass
class FlexKVConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = field(default_factory=list)
    stores: list[StoreJob] = field(default_factory=list)
    #: store jobs (of earlier steps) to finish before this step's forward pass: their blocks are reused now
    flush: list[int] = field(default_factory=list)
    #: the CPU pool this step's jobs name slots of. An engine's own pool never changes; a shared cache's does
    #: when its owner restarts, and a worker mapped to another pool must not copy (see flexkv_dynamo.worker).
    pool: str | None = None

    def is_empty(self) -> bool:
        return not self.loads and not self.stores and not self.flush


@dataclass
class FlexKVWorkerMetadata(KVConnectorWorkerMetadata):
    """One step's answer of the workers: per job id, how many workers finished it, and how many failed.

    A job is over when ``done + failed`` reaches the number of workers; it succeeded if none failed.
    """

    done: dict[int, int] = field(default_factory=dict)
    failed: dict[int, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, FlexKVWorkerMetadata):
            raise TypeError(f"cannot aggregate FlexKVWorkerMetadata with {type(other).__name__}")
        done = dict(self.done)
        for job_id, n in other.done.items():
            done[job_id] = done.get(job_id, 0) + n
        failed = dict(self.failed)
        for job_id, n in other.failed.items():
            failed[job_id] = failed.get(job_id, 0) + n
        return FlexKVWorkerMetadata(done, failed)

    def is_empty(self) -> bool:
        return not self.done and not self.failed
