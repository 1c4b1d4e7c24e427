"""Fences: which stores in flight must finish before vLLM's next forward pass may overwrite their blocks.

A store job copies engine blocks into CPU slots from the step after the one that computed them (see
`flexkv_dynamo.worker`), so its engine blocks must not be rewritten meanwhile. Blocks of a running request
are never rewritten while it runs; the danger is vLLM handing a block out again once it is free:

* a request that ended (``request_finished``): its blocks are free at once. Its stores in flight are
  *fenced*: each of their blocks remembers the jobs reading it;
* a block given out again in a step (to a new request, a running one that grows, or a load that writes
  into it) whose fence holds jobs: those jobs go into the step's ``flush`` list, which the workers finish
  before the forward pass;
* a request preempted in a step: vLLM frees its blocks and may reuse them in the same step, so all its
  stores in flight are flushed.

A fence costs nothing unless a just-freed block is reused while its store runs, which vLLM's free list
(freed blocks go to its tail) makes rare.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from vllm.distributed.kv_transfer.kv_connector.utils import yield_req_data

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

__all__ = ["StoreFences"]


class _StoreInFlight(Protocol):
    req_id: str
    block_ids: list[int]  # the engine blocks the store reads


class StoreFences:
    """Engine block -> store jobs still reading it, for the blocks of requests vLLM has freed."""

    def __init__(self) -> None:
        self._readers: dict[int, set[int]] = {}
        self._loaded: set[int] = set()  # engine blocks loads were given since the last step

    def loaded_into(self, engine_blocks: Iterable[int]) -> None:
        """vLLM gave these blocks to a load (which writes them): reused like any block allocated now."""
        self._loaded.update(engine_blocks)

    def request_ended(self, req_id: str, stores: Mapping[int, _StoreInFlight]) -> None:
        """vLLM may free ``req_id``'s blocks now: fence its stores in flight."""
        for job_id, store in stores.items():
            if store.req_id == req_id:
                for block in store.block_ids:
                    self._readers.setdefault(block, set()).add(job_id)

    def to_flush(self, scheduler_output: SchedulerOutput, stores: Mapping[int, _StoreInFlight]) -> list[int]:
        """Store jobs the workers must finish before this step's forward pass: those of requests preempted in
        this step, and those reading a block allocated in this step."""
        flush: set[int] = set()
        preempted = scheduler_output.preempted_req_ids or ()
        if preempted:
            flush.update(job_id for job_id, store in stores.items() if store.req_id in preempted)
        allocated, self._loaded = self._loaded, set()
        if self._readers:
            for _req_id, new_blocks, _resumed in yield_req_data(scheduler_output):
                if new_blocks:
                    allocated.update(new_blocks[0])
            for block in allocated & self._readers.keys():
                flush.update(self._readers[block])
        return sorted(flush)

    def store_ended(self, job_id: int, store: _StoreInFlight) -> None:
        """The job no longer reads anything: drop it from its blocks' fences."""
        for block in store.block_ids:
            jobs = self._readers.get(block)
            if jobs is not None:
                jobs.discard(job_id)
                if not jobs:
                    del self._readers[block]

    def clear(self) -> None:
        self._readers.clear()
        self._loaded.clear()

    def __len__(self) -> int:
        """Blocks with a fence (tests: none once the engine is idle)."""
        return len(self._readers)
