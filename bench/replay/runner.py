"""One replay: a trace, a configuration, N simulated workers behind the real router; and the oracle.

The loop, per request in arrival order (see `replay` for the semantics as a whole):

1. requests whose simulated prefill or decode ended by this arrival are reported to the router
   (``mark_prefill_complete`` / ``free``), so its load view is the one a frontend would have;
2. the router picks a worker (``best_worker``) for the request's synthetic tokens;
3. the worker serves it (GPU, then our CPU, then SSD, the rest recomputed) and stores the prompt;
4. its events are published and the router has applied them (barrier) before the next request.

Simulated time only feeds the router's load view: a request's prefill lasts its recomputed tokens at
``prefill_tokens_per_s`` and its decode ``output_length * tpot_ms``.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .router import ReplayRouter, RouterWeights, dynamo_env
from .trace import MOONCAKE_BLOCK_TOKENS, TraceRequest, engine_block_hashes, request_tokens, reusable_blocks
from .worker import Capacity, EventStyle, Served, SimWorker

log = logging.getLogger(__name__)

#: The configuration names `parse_config` accepts (with an optional ``@HOST/DISK`` weight suffix).
STYLE_NAMES = {"no-offload": EventStyle.NONE, "upstream-events": EventStyle.UPSTREAM,
               "tier-aware": EventStyle.TIER_AWARE}

DEFAULT_CONFIGS = ("no-offload", "upstream-events", "tier-aware@0.75/0.25", "tier-aware@1.0/1.0",
                   "tier-aware@0.25/0.1")


@dataclass(frozen=True)
class ReplayConfig:
    """What the workers have and what the router is told: an event style and the router's weights."""

    name: str
    style: EventStyle
    weights: RouterWeights = RouterWeights()


def parse_config(text: str) -> ReplayConfig:
    """``NAME`` or ``NAME@HOST/DISK``, NAME one of `STYLE_NAMES` (weights default to Dynamo's 0.75/0.25)."""
    name, sep, weights = text.strip().partition("@")
    if name not in STYLE_NAMES:
        raise ValueError(f"unknown replay configuration {text!r}: NAME[@HOST/DISK] with NAME one of "
                         f"{', '.join(STYLE_NAMES)}")
    w = RouterWeights()
    if sep:
        host, slash, disk = weights.partition("/")
        try:
            w = RouterWeights(float(host), float(disk))
        except ValueError:
            raise ValueError(f"configuration {text!r}: weights must read HOST/DISK, e.g. 0.75/0.25") from None
        if not slash:
            raise ValueError(f"configuration {text!r}: weights must read HOST/DISK, e.g. 0.75/0.25")
    return ReplayConfig(text.strip(), STYLE_NAMES[name], w)


@dataclass(frozen=True)
class TimeModel:
    """How long simulated requests keep a worker busy (only the router's load view depends on it)."""

    prefill_tokens_per_s: float = 10_000.0
    tpot_ms: float = 20.0


@dataclass
class Totals:
    """Prefill tokens by source, summed over requests. At each arrival, ``available``: what the best-placed
    worker held (a router that knew every tier and cared for nothing else would get it); ``chosen``: what
    the worker the router chose held (served tokens fall short of it only when a load is cut short)."""

    prompt: int = 0
    gpu: int = 0
    cpu: int = 0
    ssd: int = 0
    available: int = 0
    chosen: int = 0

    def add(self, s: Served, available: int, chosen: int) -> None:
        self.prompt += s.prompt_tokens
        self.gpu += s.gpu_tokens
        self.cpu += s.cpu_tokens
        self.ssd += s.ssd_tokens
        self.available += available
        self.chosen += chosen

    @property
    def recomputed(self) -> int:
        return self.prompt - self.gpu - self.cpu - self.ssd

    @property
    def reused(self) -> int:
        return self.gpu + self.cpu + self.ssd

    def fractions(self) -> dict[str, float]:
        p = self.prompt or 1
        return {"gpu": self.gpu / p, "cpu": self.cpu / p, "ssd": self.ssd / p, "recomputed": self.recomputed / p}


@dataclass
class ConfigResult:
    config: ReplayConfig
    totals: Totals
    requests_per_worker: list[int]
    wall_s: float
    sync_s: float  # of wall_s, waiting for the router to apply events
    load_errors: int = 0  # loads the cache refused with an exception (recomputed instead)
    reused_series: list[int] = field(default_factory=list)  # cumulative reused prompt tokens after each request
    final_worker_stats: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Oracle:
    """An infinite cache shared by all workers: every full block seen before is reusable (still only as a
    prefix, and never the block holding the prompt's last token)."""

    totals: Totals
    reused_series: list[int]


def oracle(requests: Sequence[TraceRequest], block_size: int = MOONCAKE_BLOCK_TOKENS) -> Oracle:
    seen: set[int] = set()
    totals = Totals()
    series: list[int] = []
    for req in requests:
        hashes = engine_block_hashes(request_tokens(req, block_size), block_size)
        limit = reusable_blocks(req.input_length, block_size)
        hit = 0
        while hit < limit and hashes[hit] in seen:
            hit += 1
        seen.update(hashes)
        totals.add(Served(req.input_length, hit * block_size, 0, 0), hit * block_size, hit * block_size)
        series.append(totals.reused)
    return Oracle(totals, series)


async def _replay(requests: Sequence[TraceRequest], config: ReplayConfig, capacity: Capacity, num_workers: int,
                  workdir: Path, time_model: TimeModel, progress: bool, block_size: int) -> ConfigResult:
    router = await ReplayRouter.start(num_workers, block_size, config.weights)
    workers: list[SimWorker] = []
    try:
        for i in range(num_workers):
            workers.append(SimWorker(i, capacity, config.style, workdir, block_size))  # closed below if one fails
        totals = Totals()
        per_worker = [0] * num_workers
        series: list[int] = []
        pending: list[tuple[float, int, str, str]] = []  # (time_ms, order, "prefill"|"finish", request id)
        order = 0
        started = time.perf_counter()
        bar = tqdm(requests, desc=config.name, unit="req", disable=not progress, leave=True)
        for n, req in enumerate(bar):
            while pending and pending[0][0] <= req.timestamp_ms:
                _, _, kind, rid = heapq.heappop(pending)
                await (router.prefill_done(rid) if kind == "prefill" else router.finished(rid))
            tokens = request_tokens(req, block_size)
            hashes = engine_block_hashes(tokens, block_size)
            rid = f"r{n}"
            held = [wk.reusable_here(len(tokens), hashes) * block_size for wk in workers]
            w = await router.choose(tokens.tolist(), rid)
            served, events = workers[w].serve(tokens, hashes)
            await router.publish(w, events)
            totals.add(served, max(held), held[w])
            per_worker[w] += 1
            series.append(totals.reused)
            prefill_ms = served.recomputed_tokens / time_model.prefill_tokens_per_s * 1000.0
            end_prefill = req.timestamp_ms + prefill_ms
            heapq.heappush(pending, (end_prefill, order, "prefill", rid))
            heapq.heappush(pending, (end_prefill + req.output_length * time_model.tpot_ms, order + 1, "finish", rid))
            order += 2
            if progress and n % 50 == 0:
                bar.set_postfix(reused=f"{totals.reused / max(totals.prompt, 1):.1%}")
        bar.close()
        wall = time.perf_counter() - started
        stats = [wk.stats() for wk in workers]
        errors = sum(wk.load_errors for wk in workers)
        return ConfigResult(config, totals, per_worker, wall, router.sync_seconds, errors, series, stats)
    finally:
        for wk in workers:
            wk.close()
        await router.close()


def run_config(requests: Sequence[TraceRequest], config: ReplayConfig, capacity: Capacity, *, num_workers: int = 4,
               time_model: TimeModel = TimeModel(), progress: bool = True,
               block_size: int = MOONCAKE_BLOCK_TOKENS, workdir: Path | None = None) -> ConfigResult:
    """Replay ``requests`` under ``config`` (a fresh router, fresh workers, SSD files in a temp dir)."""
    with tempfile.TemporaryDirectory(prefix="trace-replay-", dir=workdir) as tmp:
        with dynamo_env(Path(tmp)):
            return asyncio.run(_replay(requests, config, capacity, num_workers, Path(tmp), time_model,
                                       progress, block_size))
