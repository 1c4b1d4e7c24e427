"""The real Dynamo 1.6.1 KV router, fed by the KV events of simulated workers, offline.

Wiring (as ``dynamo.vllm`` workers + ``dynamo.frontend --router-mode kv`` do it: the worker's relay
subscribes to the engine's ZMQ events and forwards them on Dynamo's event plane)::

    worker i: our ZMQ publisher (PUB, binds)  ->  dynamo.llm.KvEventPublisher relay of worker i (SUB)
        -> Dynamo event plane (zmq)  ->  dynamo.llm.KvRouter  ->  best_worker(tokens)

Each worker is its own `DistributedRuntime` serving a registered (model-less) endpoint, so the router
sees N distinct workers exactly as in a deployment; the router has a runtime of its own, like a frontend.
Discovery is a file store in a temporary directory, the event plane zmq on loopback: no etcd, no NATS.

Routing decisions are the router's own: `ReplayRouter.choose` calls ``KvRouter.best_worker`` with a
request id, which runs Dynamo's cost function (``prefill_load_scale`` times the prefill blocks left after
crediting device hits by ``overlap_score_credit``, host hits by ``host_cache_hit_weight`` and disk hits by
``disk_cache_hit_weight``, plus the worker's active prefill; plus the decode blocks it tracks per worker;
sampled with ``router_temperature``) and books the request on the chosen worker; `prefill_done` and `finished` tell it
when the request's prefill ended and when it left, as the frontend does during generation.

A barrier keeps the replay exact: every batch a worker publishes ends with a probe, a one-block GPU
prefix of tokens no trace uses (replacing the previous probe), and `publish_many` returns only once the
router reports the probe of every worker it published to. Batches from one publisher are applied in order, so the router then
knows everything the worker said, and the next request is routed on the state it left.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexkv_core.config import patched_environ
from flexkv_dynamo.kv_events import MEDIUM_GPU
from flexkv_dynamo.publisher import KvEventPublisher

from .trace import PROBE_TOKEN_BASE

log = logging.getLogger(__name__)

#: Dynamo binds its servers to the machine's address unless told otherwise: keep them on loopback.
LOOPBACK_ENV = ("DYN_TCP_RPC_HOST", "DYN_EVENT_PLANE_HOST", "DYN_TCP_RESPONSE_STREAM_HOST", "DYN_SYSTEM_HOST")

#: How long a probe may take to reach the router before the replay stops with an error (generous: on a
#: machine loaded far beyond its cores, a probe has been seen to take over 30 s).
SYNC_TIMEOUT_S = 180.0
#: At start, PUB/SUB drops batches sent before the relay's subscription is in place: probes are resent
#: this often until one arrives.
STARTUP_RESEND_S = 0.5


@dataclass(frozen=True)
class RouterKnobs:
    """The router settings that decide where a request goes, as ``dynamo.frontend`` names them:

    * ``host`` / ``disk``: ``--router-host-cache-hit-weight`` / ``--router-disk-cache-hit-weight``, the
      credit for a prefix block in a worker's CPU tier / on its SSD (Dynamo allows 0 to 1);
    * ``scale``: ``--router-prefill-load-scale``, the weight of the prefill cost (prompt blocks left to
      compute after the credits, plus the worker's active prefill) against the decode load;
    * ``credit``: ``--router-kv-overlap-score-credit``, the credit for a block on the worker's GPU;
    * ``temperature``: ``--router-temperature``, 0 picks the cheapest worker, more samples at random;
    * ``track_prefill`` / ``track_decode`` (1 or 0): ``--no-router-track-prefill-tokens`` /
      ``--no-router-track-active-blocks`` when 0, the router then ignores that side of the load.

    The defaults are Dynamo 1.6.1's. `KNOB_KEYS` names them in configuration strings.
    """

    host: float = 0.75
    disk: float = 0.25
    scale: float = 1.0
    credit: float = 1.0
    temperature: float = 0.0
    track_prefill: float = 1.0
    track_decode: float = 1.0

    def __post_init__(self) -> None:
        for name in ("track_prefill", "track_decode"):
            if getattr(self, name) not in (0.0, 1.0):
                raise ValueError(f"{name} must be 1 or 0, got {getattr(self, name)}")
        for name in ("host", "disk"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} cache hit weight must be in [0, 1] (Dynamo's range), got {value}")
        for name in ("scale", "credit", "temperature"):
            value = getattr(self, name)
            if not (0.0 <= value < float("inf")):
                raise ValueError(f"router {name} must be finite and >= 0, got {value}")

    def frontend_args(self) -> list[str]:
        """The ``dynamo.frontend`` arguments that set these knobs: the two weights always, the others where
        they differ from Dynamo's defaults (Dynamo 1.6.1 deprecates their flags for a policy file in 1.7)."""
        args = ["--router-host-cache-hit-weight", f"{self.host:g}", "--router-disk-cache-hit-weight", f"{self.disk:g}"]
        base = RouterKnobs()
        for flag, attr in (("--router-prefill-load-scale", "scale"), ("--router-kv-overlap-score-credit", "credit"),
                           ("--router-temperature", "temperature")):
            if getattr(self, attr) != getattr(base, attr):
                args += [flag, f"{getattr(self, attr):g}"]
        if not self.track_prefill:
            args.append("--no-router-track-prefill-tokens")
        if not self.track_decode:
            args.append("--no-router-track-active-blocks")
        return args

    def config(self) -> Any:
        """Dynamo's ``KvRouterConfig`` exactly as ``dynamo.frontend --router-mode kv`` builds it from
        `frontend_args` (Dynamo's own argument parser and config; everything else at its defaults)."""
        import argparse
        import warnings

        from dynamo.frontend.frontend_args import FrontendArgGroup, FrontendConfig
        from dynamo.llm import KvRouterConfig

        parser = argparse.ArgumentParser()
        FrontendArgGroup().add_arguments(parser)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the deprecation notices of 1.6.1's flags
            args = parser.parse_args(["--router-mode", "kv", *self.frontend_args()])
        frontend = FrontendConfig.from_cli_args(args)
        frontend.validate()
        return KvRouterConfig(**frontend.kv_router_kwargs())

    def label(self) -> str:
        """``HOST/DISK`` and the knobs that differ from Dynamo's defaults, e.g. ``1/1:scale=2``."""
        out = f"{self.host:g}/{self.disk:g}"
        base = RouterKnobs()
        for key, attr in KNOB_KEYS.items():
            value = getattr(self, attr)
            if attr not in ("host", "disk") and value != getattr(base, attr):
                out += f":{key}={value:g}"
        return out


#: Configuration-string keys of the knobs beyond HOST/DISK (``tier-aware@1/1:scale=2:temp=0.1``).
KNOB_KEYS = {"host": "host", "disk": "disk", "scale": "scale", "credit": "credit", "temp": "temperature",
             "track_prefill": "track_prefill", "track_decode": "track_decode"}

#: What our deployments ship (deploy/lib.sh passes the same to ``dynamo.frontend``; a test checks that
#: they agree). Chosen by the router sweep of ``bench/trace_replay.py sweep``, see bench/README.md.
SHIPPED_KNOBS = RouterKnobs(host=1.0, disk=1.0, scale=8.0)


@contextmanager
def dynamo_env(workdir: Path, log_level: str = "error") -> Iterator[None]:
    """Environment Dynamo's runtime reads at start: loopback hosts, a file discovery store in
    ``workdir``, and quiet logs (``DYN_LOG``, unless the caller set it). Restored on exit."""
    values = {name: "127.0.0.1" for name in LOOPBACK_ENV}
    values["DYN_FILE_KV"] = str(Path(workdir) / "discovery")
    values["DYN_LOG"] = os.environ.get("DYN_LOG", log_level)
    with patched_environ(values):
        yield


def probe_tokens(n: int, block_size: int) -> list[int]:
    """The tokens of probe ``n``: above every trace token, unique in the first token."""
    return [PROBE_TOKEN_BASE + n % (1 << 24)] + [PROBE_TOKEN_BASE] * (block_size - 1)


class ReplayRouter:
    """N registered workers with their relays and publishers, and one KvRouter; use `start`."""

    def __init__(self, num_workers: int, block_size: int, knobs: RouterKnobs) -> None:
        self.num_workers = num_workers
        self.block_size = block_size
        self.knobs = knobs
        self.namespace = f"replay{uuid.uuid4().hex[:8]}"
        self.publishers: list[KvEventPublisher] = []
        self.worker_ids: list[int] = []
        self._index_of: dict[int, int] = {}
        self._runtimes: list[Any] = []
        self._relays: list[Any] = []
        self._serving: list[asyncio.Future] = []
        self._last_probe: list[int | None] = [None] * num_workers
        self._probes = 0
        self.router: Any = None
        self.sync_seconds = 0.0  # total time spent waiting for probes (the barrier's cost)
        # With ``tally``: per worker, Stored minus Removed per (medium, engine hash) of what it published
        # (probes excluded); balanced events leave 1 for what the worker holds and nothing else.
        self.tally: list[dict[tuple[str, int], int]] | None = None

    @classmethod
    async def start(cls, num_workers: int, block_size: int, knobs: RouterKnobs, *,
                    tally: bool = False) -> ReplayRouter:
        """Register the workers and start the router (inside `dynamo_env`, on the running loop)."""
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self = cls(num_workers, block_size, knobs)
        if tally:
            self.tally = [{} for _ in range(num_workers)]
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def _start(self) -> None:
        from dynamo.llm import KvEventPublisher as DynamoRelay
        from dynamo.llm import KvRouter, ModelInput, ModelType, WorkerType, register_model
        from dynamo.runtime import DistributedRuntime

        loop = asyncio.get_running_loop()
        path = f"{self.namespace}.worker.generate"

        async def generate(request: Any) -> Any:  # never called: the replay only asks for routing
            yield {"token_ids": []}

        for _ in range(self.num_workers):
            runtime = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
            self._runtimes.append(runtime)
            endpoint = runtime.endpoint(path)
            self._serving.append(asyncio.ensure_future(endpoint.serve_endpoint(generate)))
            await register_model(ModelInput.Tokens, ModelType.Chat | ModelType.Completions, endpoint,
                                 "trace-replay", "trace-replay", worker_type=WorkerType.Aggregated,
                                 kv_cache_block_size=self.block_size, skip_model_assets=True)
            publisher = KvEventPublisher("tcp://127.0.0.1:0", bind=True)
            self.publishers.append(publisher)
            # What dynamo.vllm starts for a worker with --kv-events-config: a relay of the engine's events.
            self._relays.append(DynamoRelay(endpoint, kv_block_size=self.block_size, zmq_endpoint=publisher.endpoint,
                                            zmq_topic="", enable_local_indexer=True))
            self.worker_ids.append(endpoint.connection_id())
        self._index_of = {wid: i for i, wid in enumerate(self.worker_ids)}
        if len(self._index_of) != self.num_workers:
            raise RuntimeError(f"workers share instance ids: {self.worker_ids}")
        frontend = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
        self._runtimes.append(frontend)
        self.router = KvRouter(frontend.endpoint(path), self.block_size, self.knobs.config())
        for i in range(self.num_workers):
            await self.publish(i, [], resend_every=STARTUP_RESEND_S)
        log.info("router ready: %d workers %s, knobs %s", self.num_workers, self.worker_ids, self.knobs.label())

    async def choose(self, tokens: Sequence[int], request_id: str) -> int:
        """The router's pick for a prompt (index of the worker); books the request on it."""
        worker_id, _dp_rank, _overlap = await self.router.best_worker(list(tokens), request_id=request_id)
        try:
            return self._index_of[worker_id]
        except KeyError:
            raise RuntimeError(f"router chose worker {worker_id}, not one of ours {self.worker_ids}") from None

    async def prefill_done(self, request_id: str) -> None:
        await self.router.mark_prefill_complete(request_id)

    async def finished(self, request_id: str) -> None:
        await self.router.free(request_id)

    async def overlap(self, tokens: Sequence[int]) -> dict[int, dict[str, int]]:
        """The router's view of a prompt: worker index -> its row of ``get_overlap_scores``."""
        scores = await self.router.get_overlap_scores(list(tokens))
        return {self._index_of[row["worker_id"]]: row for row in scores["workers"] if row["worker_id"] in self._index_of}

    async def publish(self, worker: int, events: list[Any], *, resend_every: float | None = None) -> None:
        """Publish one batch of ``worker``'s events and wait until the router has applied it."""
        await self.publish_many({worker: events}, resend_every=resend_every)

    async def publish_many(self, batches: dict[int, list[Any]], *, resend_every: float | None = None) -> None:
        """Publish one batch per worker (``worker index -> events``) and wait until the router has applied
        all of them (a probe closes each batch)."""
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        started = time.perf_counter()
        waiting: dict[int, tuple[list[int], list[Any]]] = {}  # worker -> (its probe's tokens, its batch)
        for worker, events in batches.items():
            if self.tally is not None:
                self._count(worker, events)
            self._probes += 1
            n = self._probes
            tokens = probe_tokens(n, self.block_size)
            probe_hash = (1 << 63) + n  # engine hashes of probes: outside what the trace's chained hashes hit
            batch = list(events)
            if self._last_probe[worker] is not None:
                batch.append(BlockRemoved(block_hashes=[self._last_probe[worker]], medium=MEDIUM_GPU))
            batch.append(BlockStored(block_hashes=[probe_hash], parent_block_hash=None, token_ids=tokens,
                                     block_size=self.block_size, lora_id=None, medium=MEDIUM_GPU, lora_name=None))
            self._last_probe[worker] = probe_hash
            self.publishers[worker].publish(batch)
            waiting[worker] = (tokens, batch)
        sent = started
        pause = 0.0001
        while waiting:
            for worker, (tokens, _) in list(waiting.items()):
                rows = (await self.router.get_overlap_scores(tokens))["workers"]
                if any(r["worker_id"] == self.worker_ids[worker] and r["device_blocks"] == 1 for r in rows):
                    del waiting[worker]
            if not waiting:
                break
            now = time.perf_counter()
            if now - started > SYNC_TIMEOUT_S:
                late = ", ".join(f"worker {w} ({self.publishers[w].endpoint})" for w in waiting)
                raise TimeoutError(f"the router did not apply the batches of {late} within {SYNC_TIMEOUT_S}s "
                                   "(a batch it dropped, or a dead relay)")
            if resend_every is not None and now - sent > resend_every:
                for worker, (_, batch) in waiting.items():
                    self.publishers[worker].publish(batch)  # start-up only: the batch holds nothing but the probe
                sent = now
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.002)
        self.sync_seconds += time.perf_counter() - started

    def _count(self, worker: int, events: list[Any]) -> None:
        """Tally Stored (+1) and Removed (-1) per (medium, block hash) of one worker's events."""
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        tally = self.tally[worker]
        for e in events:
            step = 1 if isinstance(e, BlockStored) else -1 if isinstance(e, BlockRemoved) else 0
            for h in getattr(e, "block_hashes", ()):
                key = (e.medium, h)
                tally[key] = tally.get(key, 0) + step
                if not tally[key]:
                    del tally[key]

    async def close(self) -> None:
        for relay in self._relays:
            relay.shutdown()
        for task in self._serving:
            task.cancel()
        for runtime in self._runtimes:
            runtime.shutdown()
        for publisher in self.publishers:
            publisher.close()
        await asyncio.sleep(0.2)  # let the runtimes' tasks see the cancellation
        self._relays, self._serving, self._runtimes, self.publishers = [], [], [], []
