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

from replay.runner import Oracle, TimeModel, oracle, parse_config, run_config  # noqa: E402
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
    assert len(load_trace(path, every=1, limit=2)) == 2


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


def test_parse_config_names_the_allowed_values():
    cfg = parse_config("tier-aware@1/0.5")
    assert cfg.style is EventStyle.TIER_AWARE and (cfg.weights.host, cfg.weights.disk) == (1.0, 0.5)
    with pytest.raises(ValueError, match="unknown replay configuration 'lmcache'.*no-offload, upstream-events"):
        parse_config("lmcache")
    with pytest.raises(ValueError, match="HOST/DISK"):
        parse_config("tier-aware@0.5")


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
    # Blind to the tiers, the router sends revisits to a worker without the prefix about half the time.
    blind = results["upstream-events"].totals
    assert blind.available - blind.chosen > 0.05 * blind.prompt
    assert blind.cpu + blind.ssd > 0  # the workers still serve from their tiers when the router is lucky


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
        parts = sum(float(r[k]) for k in ("gpu", "cpu", "ssd", "recomputed"))
        assert parts == pytest.approx(1.0)
        assert float(r["reused"]) <= float(r["oracle"]) + 1e-12
    for png in ("sources.png", "reuse_over_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tier-aware@1/1 |" in (out / "results.md").read_text()
