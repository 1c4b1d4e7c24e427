"""One replay: a trace, a configuration, N simulated workers behind the real router; and the oracle.

The loop, per request in arrival order (see `replay` for the semantics as a whole):

1. requests whose simulated prefill or decode ended by this arrival are reported to the router
   (``mark_prefill_complete`` / ``free``), so its load view is the one a frontend would have;
2. the router picks a worker (``best_worker``) for the request's synthetic tokens;
3. the worker serves it (GPU, then its node's CPU, then SSD, then other nodes, the rest recomputed)
   and stores the prompt;
4. the events of the worker (GPU) and of every node's tiers (to each worker of the node) are published,
   and the router has applied them (barrier) before the next request.

Simulated time feeds the router's load view and a simulated time to first token: a worker prefills one
request at a time in arrival order, each for its recomputed tokens at ``prefill_tokens_per_s`` (loads
from our tiers are free), then decodes it for ``output_length * tpot_ms`` alongside the others.
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

from flexkv_core.layout import Tier
from flexkv_dynamo.kv_events import MEDIUM_CPU_PINNED, MEDIUM_DISK, MEDIUM_GPU

from .peers import ReplayPeers
from .router import KNOB_KEYS, SHIPPED_KNOBS, ReplayRouter, RouterKnobs, dynamo_env
from .trace import MOONCAKE_BLOCK_TOKENS, TraceRequest, engine_block_hashes, request_tokens, reusable_blocks
from .worker import Capacity, EventStyle, GpuPrefixCache, NodeTiers, Served, SimWorker, map_events

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setup:
    """What a configuration gives the workers: an event style, tiers per worker or per node, remote fetches."""

    style: EventStyle
    shared: bool = False  # one CPU pool and SSD store per node (--workers-per-node), else one per worker
    remote: bool = False  # a node fetches what other nodes hold past its own prefix


#: The configuration names `parse_config` accepts (with optional router knobs, see there).
SETUPS = {
    "no-offload": Setup(EventStyle.NONE),
    "upstream-events": Setup(EventStyle.UPSTREAM),
    "tier-aware": Setup(EventStyle.TIER_AWARE),
    "shared-node-blind": Setup(EventStyle.UPSTREAM, shared=True),
    "shared-node": Setup(EventStyle.TIER_AWARE, shared=True),
    "distributed-blind": Setup(EventStyle.UPSTREAM, shared=True, remote=True),
    "distributed": Setup(EventStyle.TIER_AWARE, shared=True, remote=True),
}

DEFAULT_CONFIGS = ("no-offload", "upstream-events", "tier-aware", "tier-aware@shipped", "shared-node-blind",
                   "shared-node@shipped", "distributed-blind", "distributed@shipped")


@dataclass(frozen=True)
class ReplayConfig:
    """What the workers have and what the router is told: a `Setup` and the router's knobs."""

    name: str
    setup: Setup
    knobs: RouterKnobs = RouterKnobs()

    @property
    def style(self) -> EventStyle:
        return self.setup.style


def parse_config(text: str) -> ReplayConfig:
    """``NAME``, ``NAME@HOST/DISK``, ``NAME@shipped``, each optionally followed by ``:KEY=VALUE`` knobs
    (``scale``, ``credit``, ``temp``; also ``host``, ``disk``), NAME one of `SETUPS`. Knobs not given are
    Dynamo's defaults (``@shipped``: our deployments' defaults, `SHIPPED_KNOBS`)."""
    spec = text.strip()
    head, *extras = spec.split(":")
    name, sep, weights = head.partition("@")
    if name not in SETUPS:
        raise ValueError(f"unknown replay configuration {text!r}: NAME[@HOST/DISK|@shipped][:KEY=VALUE...] with "
                         f"NAME one of {', '.join(SETUPS)}")
    values = {}
    if sep and weights == "shipped":
        values = {attr: getattr(SHIPPED_KNOBS, attr) for attr in KNOB_KEYS.values()}
    elif sep:
        host, slash, disk = weights.partition("/")
        try:
            values = {"host": float(host), "disk": float(disk)}
        except ValueError:
            slash = ""
        if not slash:
            raise ValueError(f"configuration {text!r}: weights must read HOST/DISK (e.g. 0.75/0.25) or shipped")
    for extra in extras:
        key, eq, value = extra.partition("=")
        if key not in KNOB_KEYS or not eq:
            raise ValueError(f"configuration {text!r}: {extra!r} is not KEY=VALUE with KEY one of {', '.join(KNOB_KEYS)}")
        try:
            values[KNOB_KEYS[key]] = float(value)
        except ValueError:
            raise ValueError(f"configuration {text!r}: {key} must be a number, got {value!r}") from None
    try:
        knobs = RouterKnobs(**values)
    except ValueError as exc:
        raise ValueError(f"configuration {text!r}: {exc}") from None
    return ReplayConfig(spec, SETUPS[name], knobs)


def node_groups(num_workers: int, workers_per_node: int, setup: Setup) -> list[list[int]]:
    """Worker indices per node holding one set of our tiers: ``workers_per_node`` consecutive workers when
    the setup shares tiers, one worker each otherwise; none without tiers."""
    if workers_per_node < 1 or num_workers % workers_per_node:
        raise ValueError(f"--workers-per-node must divide --workers ({num_workers}), got {workers_per_node}")
    if setup.style is EventStyle.NONE:
        return []
    size = workers_per_node if setup.shared else 1
    return [list(range(i, i + size)) for i in range(0, num_workers, size)]


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
    remote: int = 0
    available: int = 0
    chosen: int = 0

    def add(self, s: Served, available: int, chosen: int) -> None:
        self.prompt += s.prompt_tokens
        self.gpu += s.gpu_tokens
        self.cpu += s.cpu_tokens
        self.ssd += s.ssd_tokens
        self.remote += s.remote_tokens
        self.available += available
        self.chosen += chosen

    @property
    def recomputed(self) -> int:
        return self.prompt - self.reused

    @property
    def reused(self) -> int:
        return self.gpu + self.cpu + self.ssd + self.remote

    def fractions(self) -> dict[str, float]:
        p = self.prompt or 1
        return {"gpu": self.gpu / p, "cpu": self.cpu / p, "ssd": self.ssd / p, "remote": self.remote / p,
                "recomputed": self.recomputed / p}


@dataclass
class ConfigResult:
    config: ReplayConfig
    totals: Totals
    requests_per_worker: list[int]
    wall_s: float
    sync_s: float  # of wall_s, waiting for the router to apply events
    load_errors: int = 0  # loads the cache refused with an exception (recomputed instead)
    reused_series: list[int] = field(default_factory=list)  # cumulative reused prompt tokens after each request
    recomputed_per_worker: list[int] = field(default_factory=list)  # prefill work each worker did, tokens
    ttft_ms: list[float] = field(default_factory=list)  # simulated time to first token per request
    decoded_per_worker: list[int] = field(default_factory=list)  # output tokens each worker generated
    final_worker_stats: list[dict] = field(default_factory=list)
    check: Check | None = None  # with ``check=True``: the router's view against what the caches hold


@dataclass
class Check:
    """End-of-replay comparison of what each worker announced with what it holds (tests use it).

    ``tally[w]``: Stored minus Removed per (medium, engine hash) that worker ``w`` published;
    ``holds[w]``: the same keys for what ``w`` holds at the end (its GPU blocks; its node's CPU / SSD
    blocks), each 1; ``overlap[w]``: per distinct prompt, (router's device blocks, router's blocks over all
    tiers) for ``w``, and ``expected[w]`` what ``w`` holds of that prompt (GPU prefix, GPU + own tiers)."""

    tally: list[dict[tuple[str, int], int]]
    holds: list[dict[tuple[str, int], int]]
    overlap: list[list[tuple[int, int]]]
    expected: list[list[tuple[int, int]]]


@dataclass(frozen=True)
class Oracle:
    """A reference cache with perfect routing: every request is served from one cache (still only as a
    prefix, and never the block holding the prompt's last token). ``capacity_blocks`` None: infinite."""

    totals: Totals
    reused_series: list[int]
    capacity_blocks: int | None = None


def oracle(requests: Sequence[TraceRequest], block_size: int = MOONCAKE_BLOCK_TOKENS,
           capacity_blocks: int | None = None) -> Oracle:
    """The infinite oracle (every full block seen before is reusable), or with ``capacity_blocks`` the
    pooled-capacity oracle: one LRU of that many blocks (all workers' GPU + CPU + SSD together), kept as
    vLLM keeps its GPU cache (`GpuPrefixCache`: a served chain becomes most recent, tail first)."""
    lru = GpuPrefixCache(capacity_blocks) if capacity_blocks is not None else None
    seen: set[int] = set()
    totals = Totals()
    series: list[int] = []
    for req in requests:
        hashes = engine_block_hashes(request_tokens(req, block_size), block_size)
        limit = reusable_blocks(req.input_length, block_size)
        if lru is not None:
            hit = lru.match(hashes[:limit])
            lru.store(hashes)
        else:
            hit = 0
            while hit < limit and hashes[hit] in seen:
                hit += 1
            seen.update(hashes)
        totals.add(Served(req.input_length, hit * block_size, 0, 0), hit * block_size, hit * block_size)
        series.append(totals.reused)
    return Oracle(totals, series, capacity_blocks)


def pooled_capacity(capacity: Capacity, num_workers: int) -> int:
    """Blocks of all workers' GPU + CPU + SSD tiers together: the pooled-capacity oracle's LRU."""
    return num_workers * (capacity.gpu_blocks + capacity.cpu_blocks + capacity.ssd_blocks)


async def _replay(requests: Sequence[TraceRequest], config: ReplayConfig, capacity: Capacity, num_workers: int,
                  workers_per_node: int, workdir: Path, time_model: TimeModel, progress: bool, block_size: int,
                  check: bool) -> ConfigResult:
    setup = config.setup
    groups = node_groups(num_workers, workers_per_node, setup)
    router = await ReplayRouter.start(num_workers, block_size, config.knobs, tally=check)
    nodes: list[NodeTiers] = []
    try:
        peers = [ReplayPeers(i) for i in range(len(groups))] if setup.remote else []
        for i, group in enumerate(groups):  # each closed below if a later one fails
            nodes.append(NodeTiers(i, group, capacity, workdir, block_size, peers[i] if peers else None))
        for p in peers:
            p.nodes = nodes
        node_of = {w: n for n in nodes for w in n.workers}
        workers = [SimWorker(i, capacity.gpu_blocks, node_of.get(i), block_size) for i in range(num_workers)]
        totals = Totals()
        per_worker = [0] * num_workers
        recomputed = [0] * num_workers
        decoded = [0] * num_workers
        prefill_free_at = [0.0] * num_workers  # ms: when each worker's prefill queue drains
        ttft: list[float] = []
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
            served, gpu_ev = workers[w].serve(tokens, hashes)
            # The chosen worker's GPU events, then every node's tier events (a remote fetch changes the
            # peer's tiers too) to each worker of that node: all of them read those tiers.
            batches: dict[int, list] = {w: gpu_ev}
            for node in nodes:
                ours = map_events(node.take_events(), setup.style, block_size)
                if ours:
                    for x in node.workers:
                        batches.setdefault(x, []).extend(ours)
            await router.publish_many(batches)
            totals.add(served, max(held), held[w])
            per_worker[w] += 1
            recomputed[w] += served.recomputed_tokens
            decoded[w] += req.output_length
            series.append(totals.reused)
            prefill_ms = served.recomputed_tokens / time_model.prefill_tokens_per_s * 1000.0
            end_prefill = max(req.timestamp_ms, prefill_free_at[w]) + prefill_ms
            prefill_free_at[w] = end_prefill
            ttft.append(end_prefill - req.timestamp_ms)
            heapq.heappush(pending, (end_prefill, order, "prefill", rid))
            heapq.heappush(pending, (end_prefill + req.output_length * time_model.tpot_ms, order + 1, "finish", rid))
            order += 2
            if progress and n % 50 == 0:
                bar.set_postfix(reused=f"{totals.reused / max(totals.prompt, 1):.1%}")
        bar.close()
        wall = time.perf_counter() - started
        result = ConfigResult(config, totals, per_worker, wall, router.sync_seconds,
                              sum(nd.load_errors for nd in nodes), series, recomputed, ttft, decoded,
                              [{"gpu_blocks": len(wk.gpu), **(node_of[i].stats() if i in node_of else {})}
                               for i, wk in enumerate(workers)])
        if check:
            result.check = await _check(requests, workers, node_of, router, block_size)
        return result
    finally:
        for nd in nodes:
            nd.close()
        await router.close()


async def _check(requests: Sequence[TraceRequest], workers: Sequence[SimWorker], node_of: dict[int, NodeTiers],
                 router: ReplayRouter, block_size: int) -> Check:
    assert router.tally is not None
    medium = {Tier.CPU: MEDIUM_CPU_PINNED, Tier.SSD: MEDIUM_DISK}
    holds: list[dict[tuple[str, int], int]] = []
    tiers = {id(nd): nd.holdings() for nd in node_of.values()}
    for i, wk in enumerate(workers):
        mine = {(MEDIUM_GPU, h): 1 for h in wk.gpu.blocks()}
        if i in node_of:
            for tier, hashes in tiers[id(node_of[i])].items():
                mine.update({(medium[tier], h): 1 for h in hashes})
        holds.append(mine)
    overlap: list[list[tuple[int, int]]] = [[] for _ in workers]
    expected: list[list[tuple[int, int]]] = [[] for _ in workers]
    seen: set[tuple[int, ...]] = set()
    for req in requests:
        if req.hash_ids in seen:
            continue
        seen.add(req.hash_ids)
        tokens = request_tokens(req, block_size)
        hashes = engine_block_hashes(tokens, block_size)
        rows = await router.overlap(tokens.tolist())
        for i, wk in enumerate(workers):
            row = rows.get(i, {})
            overlap[i].append((row.get("device_blocks", 0), row.get("disk_blocks", 0)))
            expected[i].append(wk.held_prefix(hashes))
    return Check([dict(t) for t in router.tally], holds, overlap, expected)


def run_config(requests: Sequence[TraceRequest], config: ReplayConfig, capacity: Capacity, *, num_workers: int = 4,
               workers_per_node: int = 1, time_model: TimeModel = TimeModel(), progress: bool = True,
               block_size: int = MOONCAKE_BLOCK_TOKENS, workdir: Path | None = None,
               check: bool = False) -> ConfigResult:
    """Replay ``requests`` under ``config`` (a fresh router, fresh workers, SSD files in a temp dir).
    ``check``: also compare, at the end, what each worker announced with what it holds (`Check`)."""
    node_groups(num_workers, workers_per_node, config.setup)  # bad topology: fail before starting anything
    with tempfile.TemporaryDirectory(prefix="trace-replay-", dir=workdir) as tmp:
        with dynamo_env(Path(tmp)):
            return asyncio.run(_replay(requests, config, capacity, num_workers, workers_per_node, Path(tmp),
                                       time_model, progress, block_size, check))
