"""The trace replay (bench/trace_replay.py): real Dynamo router, simulated GPU caches, our real tiers.

Fast tests cover the pieces that need neither vLLM nor Dynamo (trace loading, the GPU LRU, the oracle).
The slow ones replay a small synthetic conversation trace with much reuse through the real KvRouter:
each turn of a conversation extends its previous prompt, and the GPU caches are too small to keep a
conversation until its next turn, so only our tiers can serve the reuse.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from replay.router import SHIPPED_KNOBS, RouterKnobs  # noqa: E402
from replay.runner import (  # noqa: E402
    SETUPS,
    Oracle,
    TimeModel,
    node_groups,
    oracle,
    parse_config,
    pooled_capacity,
    run_config,
)
from replay.synth import PRESETS, SynthSpec, generate, with_overrides  # noqa: E402
from replay.trace import TraceRequest, load_trace, request_tokens  # noqa: E402
from replay.worker import Capacity, EventStyle, GpuPrefixCache  # noqa: E402

BS = 512


def conversation_trace(path: Path, conversations: int = 12, turns: int = 4, blocks_per_turn: int = 2) -> Path:
    """Round-robin turns of ``conversations`` conversations, each turn adding ``blocks_per_turn`` blocks
    (the last one partial) to the conversation's previous prompt."""
    lines = []
    ts = 0
    for turn in range(turns):
        for c in range(conversations):
            n = (turn + 1) * blocks_per_turn
            ids = [c * 1000 + i for i in range(n)]
            lines.append(json.dumps({"timestamp": ts, "input_length": n * BS - 100, "output_length": 10,
                                     "hash_ids": ids}))
            ts += 100
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- fast: no vLLM, no Dynamo ------------------------------------------------------------------------


def test_load_trace_keeps_every_kth_line_in_time_order(tmp_path):
    rows = [{"timestamp": t, "input_length": 600, "output_length": 1, "hash_ids": [i, 100 + i]}
            for i, t in enumerate([5, 1, 4, 3, 2, 0])]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    kept = load_trace(path, every=2)
    assert [r.line for r in kept] == [4, 2, 0]  # lines 0, 2, 4, sorted by timestamp (2, 4, 5)
    assert [r.timestamp_ms for r in kept] == [2, 4, 5]
    assert [r.line for r in load_trace(path, every=2, offset=1)] == [5, 1, 3]  # lines 1, 3, 5 at 1, 3, 0
    assert len(load_trace(path, every=1, limit=2)) == 2
    with pytest.raises(ValueError, match="offset must be in 0..every-1"):
        load_trace(path, every=2, offset=2)


def test_load_trace_names_the_line_of_a_bad_record(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"timestamp": 0, "input_length": 1500, "output_length": 1, "hash_ids": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: input_length 1500 needs 3 hash_ids"):
        load_trace(path)
    path.write_text('{"timestamp": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a Mooncake trace record .*input_length"):
        load_trace(path)


def test_equal_hash_ids_give_equal_tokens_and_the_prompt_is_cut_to_its_length():
    a = TraceRequest(0, 0, 1000, 1, (7, 8))
    b = TraceRequest(1, 0, 1024, 1, (7, 9))
    ta, tb = request_tokens(a), request_tokens(b)
    assert len(ta) == 1000 and len(tb) == 1024
    assert (ta[:BS] == tb[:BS]).all() and not (ta[BS:1000] == tb[BS:1000]).any()


def test_gpu_cache_evicts_least_recent_chain_tail_first():
    gpu = GpuPrefixCache(4)
    new, evicted = gpu.store([1, 2, 3])
    assert (new, evicted) == ([0, 1, 2], [])
    new, evicted = gpu.store([1, 9])  # shares block 1; needs one slot: 3 (the old tail) goes first
    assert (new, evicted) == ([1], [])
    new, evicted = gpu.store([5, 6])
    assert new == [0, 1] and evicted == [3, 2]
    assert gpu.match([1, 9, 4]) == 2 and gpu.match([1, 2]) == 1
    assert len(gpu) == 4


def test_oracle_reuses_only_seen_prefixes_and_never_the_last_token_block(tmp_path):
    reqs = [TraceRequest(0, 0, 1024, 1, (1, 2)),  # nothing seen yet
            TraceRequest(1, 1, 1024, 1, (1, 2)),  # both seen, but the block with the last token is computed
            TraceRequest(2, 2, 1100, 1, (3, 2, 4))]  # block 2 after 3 is a different prefix: no reuse
    result = oracle(reqs)
    assert result.totals.prompt == 1024 + 1024 + 1100
    assert result.totals.gpu == BS
    assert result.reused_series == [0, BS, BS]


def test_pooled_oracle_is_one_lru_of_the_summed_capacity_on_a_hand_checked_trace():
    # Blocks are whole (input_length a multiple of 512), so a prompt of n blocks may reuse n - 1 of them.
    reqs = [TraceRequest(0, 0, 3 * BS, 1, (1, 2, 3)),
            TraceRequest(1, 1, 3 * BS, 1, (1, 2, 4)),
            TraceRequest(2, 2, 2 * BS, 1, (5, 6)),
            TraceRequest(3, 3, 4 * BS, 1, (1, 2, 4, 7))]
    # One worker of 1 GPU + 1 CPU + 1 SSD block: the pooled LRU holds 3 blocks.
    capacity = pooled_capacity(Capacity(gpu_blocks=1, cpu_blocks=1, ssd_blocks=1), num_workers=1)
    assert capacity == 3
    pooled = oracle(reqs, capacity_blocks=capacity)
    # r0: empty cache, 0 hits; it leaves [1, 2, 3] cached, the head most recent (1 > 2 > 3).
    # r1: may reuse 2 blocks, 1 and 2 are cached: 2 hits. Storing 4 evicts the least recent, 3: 1 > 2 > 4.
    # r2: may reuse 1 block, 5 is new: 0 hits. Storing 5 and 6 evicts 4 and 2 (least recent first): 5 > 6 > 1.
    # r3: may reuse 3 blocks; 1 is cached but 2 is gone, so the prefix stops there: 1 hit.
    assert pooled.reused_series == [0, 2 * BS, 2 * BS, 3 * BS]
    # The infinite oracle keeps everything: r3 reuses 1, 2 and 4.
    infinite = oracle(reqs)
    assert infinite.reused_series == [0, 2 * BS, 2 * BS, 5 * BS]
    assert pooled.totals.prompt == infinite.totals.prompt == (3 + 3 + 2 + 4) * BS
    # Enough room for every block (7 of them): the pooled oracle is the infinite one.
    assert oracle(reqs, capacity_blocks=7).reused_series == infinite.reused_series


def test_parse_config_names_the_allowed_values():
    cfg = parse_config("tier-aware@1/0.5")
    assert cfg.style is EventStyle.TIER_AWARE and (cfg.knobs.host, cfg.knobs.disk) == (1.0, 0.5)
    assert parse_config("tier-aware").knobs == RouterKnobs()  # Dynamo's defaults
    cfg = parse_config("distributed@shipped:scale=2:temp=0.1")
    assert cfg.setup == SETUPS["distributed"] and cfg.setup.shared and cfg.setup.remote
    assert (cfg.knobs.host, cfg.knobs.disk, cfg.knobs.scale, cfg.knobs.temperature) == (
        SHIPPED_KNOBS.host, SHIPPED_KNOBS.disk, 2.0, 0.1)
    with pytest.raises(ValueError, match="unknown replay configuration 'lmcache'.*no-offload, upstream-events"):
        parse_config("lmcache")
    with pytest.raises(ValueError, match="HOST/DISK"):
        parse_config("tier-aware@0.5")
    with pytest.raises(ValueError, match=r"'speed=2' is not KEY=VALUE with KEY one of host, disk, scale"):
        parse_config("shared-node:speed=2")
    with pytest.raises(ValueError, match=r"host cache hit weight must be in \[0, 1\].*1.5"):
        parse_config("shared-node@1.5/1")


def test_nodes_group_consecutive_workers_only_when_tiers_are_shared():
    assert node_groups(4, 2, SETUPS["shared-node"]) == [[0, 1], [2, 3]]
    assert node_groups(4, 2, SETUPS["tier-aware"]) == [[0], [1], [2], [3]]
    assert node_groups(4, 2, SETUPS["no-offload"]) == []
    with pytest.raises(ValueError, match="must divide --workers \\(4\\), got 3"):
        node_groups(4, 3, SETUPS["shared-node"])


def test_shipped_router_knobs_are_what_the_deploy_scripts_and_manifests_pass():
    deploy = Path(__file__).resolve().parents[1] / "deploy"
    args = SHIPPED_KNOBS.frontend_args()
    line = next(x for x in (deploy / "lib.sh").read_text().splitlines() if x.startswith("ROUTER_DEFAULT_ARGS=("))
    assert line == f"ROUTER_DEFAULT_ARGS=({' '.join(args)})"
    manifest = (deploy / "k8s" / "frontend.yaml").read_text()
    router_lines = sorted(x.strip() for x in manifest.splitlines() if x.strip().startswith("- --router-")
                          and x.strip() != "- --router-mode=kv")
    assert router_lines == sorted(f"- {flag}={value}" for flag, value in zip(args[::2], args[1::2]))


@pytest.mark.dynamo
def test_dynamo_reads_the_shipped_knobs_from_those_arguments():
    pytest.importorskip("dynamo.frontend")
    config = SHIPPED_KNOBS.config()  # through dynamo.frontend's own parser and FrontendConfig
    assert config.prefill_load_scale == SHIPPED_KNOBS.scale
    assert config.overlap_score_credit == SHIPPED_KNOBS.credit


def test_synthetic_traces_are_prefix_chained_and_reproducible(tmp_path):
    spec = with_overrides(PRESETS["mixed"], ["requests=300", "doc=600,1500", "system=300,1200"])
    assert spec.requests == 300 and spec.doc == (600, 1500)
    records = list(generate(spec, seed=7))
    assert records == list(generate(spec, seed=7)) and records != list(generate(spec, seed=8))
    path = tmp_path / "synth.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    reqs = load_trace(path)  # validates lengths against hash_ids
    assert len(reqs) == 300 and [r.timestamp_ms for r in reqs] == sorted(r.timestamp_ms for r in reqs)
    # Prefix chaining: an id stands for one whole prefix wherever it appears.
    prefix_of: dict[int, tuple[int, ...]] = {}
    for r in reqs:
        for i, h in enumerate(r.hash_ids):
            assert prefix_of.setdefault(h, r.hash_ids[:i]) == r.hash_ids[:i]
    # Sessions and shared prompts make prompts share prefixes: the oracle finds reuse.
    best = oracle(reqs)
    assert best.totals.reused > 0.2 * best.totals.prompt
    with pytest.raises(ValueError, match="'turns' is not|turn"):
        with_overrides(spec, ["turn=3"])
    with pytest.raises(ValueError, match="range must be 1 <= low <= high"):
        with_overrides(spec, ["user=10,5"])
    with pytest.raises(ValueError, match="turns >= 1"):
        SynthSpec(turns=0.5)


# ---- slow: the real router -----------------------------------------------------------------------------

#: No simulated load: the router's choice is decided by its view of the caches alone.
NO_LOAD = TimeModel(prefill_tokens_per_s=1e15, tpot_ms=0.0)
#: GPU too small to keep a conversation across 11 others; CPU + SSD large enough.
CAPACITY = Capacity(gpu_blocks=8, cpu_blocks=16, ssd_blocks=64)


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    pytest.importorskip("dynamo.llm")
    pytest.importorskip("vllm.distributed.kv_events")
    trace = conversation_trace(tmp_path_factory.mktemp("trace") / "conv.jsonl")
    requests = load_trace(trace)
    results = {name: run_config(requests, parse_config(name), CAPACITY, num_workers=2, time_model=NO_LOAD,
                                progress=False)
               for name in ("no-offload", "upstream-events", "tier-aware", "tier-aware@1/1")}
    return requests, oracle(requests), results


def _check_bounded_by_oracle(series: list[int], best: Oracle) -> None:
    assert len(series) == len(best.reused_series)
    over = [i for i, (a, b) in enumerate(zip(series, best.reused_series)) if a > b]
    assert not over, f"reuse above the oracle after requests {over[:5]}"


@pytest.mark.dynamo
@pytest.mark.slow
def test_fractions_add_up_and_stay_under_the_oracle(replayed):
    requests, best, results = replayed
    prompt = sum(r.input_length for r in requests)
    for name, res in results.items():
        t = res.totals
        assert t.prompt == prompt, name
        assert t.gpu + t.cpu + t.ssd + t.recomputed == prompt, name
        assert sum(res.requests_per_worker) == len(requests), name
        assert t.reused <= t.chosen <= t.available <= best.totals.reused, name
        _check_bounded_by_oracle(res.reused_series, best)
    assert results["no-offload"].totals.cpu == results["no-offload"].totals.ssd == 0


@pytest.mark.dynamo
@pytest.mark.slow
def test_tier_aware_offload_beats_no_offload_on_a_trace_with_reuse(replayed):
    _, best, results = replayed
    frac = {name: res.totals.reused / res.totals.prompt for name, res in results.items()}
    assert best.totals.reused / best.totals.prompt > 0.4  # the trace has the reuse we built into it
    assert frac["no-offload"] < 0.1, frac  # the GPU alone keeps almost nothing across conversations
    for name in ("tier-aware", "tier-aware@1/1"):
        aware = results[name].totals
        assert frac[name] > frac["no-offload"] + 0.3, frac
        assert aware.cpu > 0 and aware.ssd > 0, name  # both of our tiers served (SSD blocks staged via CPU)


@pytest.mark.dynamo
@pytest.mark.slow
def test_the_router_sees_our_tiers_exactly_and_upstream_events_not_at_all(replayed):
    _, _, results = replayed
    # Hits weighted like GPU hits and no load: the router's only criterion is the longest cached prefix,
    # so if our events describe the tiers exactly it always picks a worker holding the most.
    full = results["tier-aware@1/1"].totals
    assert full.chosen == full.available
    # Blind to the tiers, the router sends some revisits to a worker without the prefix (how many is up to
    # its random choice between equally loaded workers: 12-24 % of the prompt tokens in 40 repeated runs).
    blind = results["upstream-events"].totals
    assert blind.available - blind.chosen > 0
    assert blind.cpu + blind.ssd > 0  # the workers still serve from their tiers when the router is lucky


#: Two nodes of two workers, each node one pool of 2 x (16 CPU + 64 SSD) blocks.
NODES = {"num_workers": 4, "workers_per_node": 2}


@pytest.fixture(scope="module")
def node_replays(tmp_path_factory):
    pytest.importorskip("dynamo.llm")
    pytest.importorskip("vllm.distributed.kv_events")
    trace = conversation_trace(tmp_path_factory.mktemp("trace") / "conv.jsonl")
    requests = load_trace(trace)
    results = {name: run_config(requests, parse_config(name), CAPACITY, time_model=NO_LOAD, progress=False,
                                check=True, **NODES)
               for name in ("tier-aware@1/1", "shared-node@1/1", "shared-node-blind", "distributed@1/1",
                            "distributed-blind")}
    return requests, oracle(requests), results


@pytest.mark.dynamo
@pytest.mark.slow
def test_every_worker_of_a_node_announces_the_shared_tiers_balanced(node_replays):
    _, _, results = node_replays
    for name in ("tier-aware@1/1", "shared-node@1/1", "distributed@1/1"):
        check = results[name].check
        for w in range(NODES["num_workers"]):
            # Stored minus Removed per (medium, block) of what worker w published: exactly 1 for each block it
            # holds at the end (its GPU blocks, its node's CPU and SSD blocks), nothing for anything else, so
            # every Removed matched a Stored of the same medium and nothing was announced twice.
            assert check.tally[w] == check.holds[w], (name, w)
        if name == "tier-aware@1/1":
            continue
        for a, b in ((0, 1), (2, 3)):  # node mates announce the same host / disk tiers
            tiers = [{k for k in check.tally[x] if k[0] != "GPU"} for x in (a, b)]
            assert tiers[0] == tiers[1] and tiers[0], (name, a, b)


@pytest.mark.dynamo
@pytest.mark.slow
def test_the_router_credits_every_worker_of_a_node_with_what_it_can_load(node_replays):
    requests, _, results = node_replays
    for name in ("shared-node@1/1", "distributed@1/1"):
        check = results[name].check
        for w in range(NODES["num_workers"]):
            # Per distinct prompt: the router's (device, all tiers) prefix for w equals what w holds on its
            # GPU and in its node's tiers; at least one prompt is credited to both workers of a node.
            assert check.overlap[w] == check.expected[w], (name, w)
        assert any(check.overlap[0][i][1] > 0 and check.overlap[1][i][1] > 0 for i in range(len(check.overlap[0])))
        # Crediting tiers like the GPU and with no load, the router always picks a worker holding the most.
        t = results[name].totals
        assert t.chosen == t.available, name


@pytest.mark.dynamo
@pytest.mark.slow
def test_node_sharing_and_remote_fetches_reuse_more(node_replays):
    requests, best, results = node_replays
    prompt = sum(r.input_length for r in requests)
    frac = {name: res.totals.reused / res.totals.prompt for name, res in results.items()}
    for name, res in results.items():
        t = res.totals
        assert t.prompt == prompt and t.reused + t.recomputed == prompt, name
        assert t.reused <= t.chosen <= t.available <= best.totals.reused, name
        _check_bounded_by_oracle(res.reused_series, best)
    best_frac = best.totals.reused / prompt
    # Only distributed configurations fetch from the other node. A blind router sends some revisits to the
    # other node: how many varies from run to run (Dynamo's router breaks ties between equally loaded workers
    # at random; 2.6-19 % of the prompt tokens were fetched in repeated runs), so the test asserts what holds in
    # every run: a distributed node fetches those prefixes and loses no reuse to blind routing, a node that
    # cannot fetch recomputes them.
    assert results["shared-node@1/1"].totals.remote == results["shared-node-blind"].totals.remote == 0
    assert results["distributed-blind"].totals.remote > 0
    assert frac["distributed-blind"] >= best_frac - 0.02, frac
    assert frac["shared-node-blind"] < best_frac, frac
    # With the tiers announced, the router sends revisits to the node holding them: all the reuse there is,
    # no fetch needed, and sharing a node's tiers does at least as well as private tiers of the same total size.
    assert frac["shared-node@1/1"] >= best_frac - 0.02, frac
    assert frac["distributed@1/1"] >= frac["shared-node@1/1"] - 0.02, frac
    assert frac["shared-node@1/1"] + 0.02 >= frac["tier-aware@1/1"], frac


@pytest.mark.dynamo
@pytest.mark.slow
def test_cli_writes_the_report(tmp_path, replayed):
    import trace_replay

    trace = conversation_trace(tmp_path / "conv.jsonl", conversations=4, turns=2)
    out = tmp_path / "report"
    rc = trace_replay.main(["--trace", str(trace), "--every", "1", "--workers", "2", "--gpu-blocks", "8",
                            "--cpu-blocks", "16", "--ssd-blocks", "64", "--configs", "no-offload,tier-aware@1/1",
                            "--repeats", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["no-offload", "tier-aware@1/1"]
    for r in rows:
        parts = sum(float(r[k]) for k in ("gpu", "cpu", "ssd", "remote", "recomputed"))
        assert parts == pytest.approx(1.0)
        assert float(r["reused"]) <= float(r["oracle"]) + 1e-12
        assert float(r["pooled"]) <= float(r["oracle"]) + 1e-12
        assert float(r["of_pooled"]) == pytest.approx(float(r["reused"]) / float(r["pooled"]))
    for png in ("sources.png", "reuse_over_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tier-aware@1/1 |" in (out / "results.md").read_text()
