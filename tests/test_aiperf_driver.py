"""The aiperf Mooncake-trace driver: trace preparation, results parsing, process hygiene, end to end.

The results tests read real aiperf 0.13 output kept in ``tests/data/aiperf/slice_0/`` (two 8-request runs
of an earlier version of the driver, laid out as the driver lays runs out now), so a change in what aiperf
writes shows up here first.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support import torchvision_shim_if_needed  # the test harness's stand-in (no CPU torchvision)

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench import aiperf_mooncake as driver  # noqa: E402
from bench.aiperf import launch, results, venv  # noqa: E402
from bench.aiperf.run import AiperfError, AiperfRun, aiperf_command, aiperf_env, hub_tokenizer  # noqa: E402
from bench.aiperf.trace import (  # noqa: E402
    MOONCAKE_BLOCK_TOKENS,
    PromptMode,
    SliceOptions,
    TraceFormatError,
    TraceRequest,
    aiperf_records,
    block_reuse,
    conversations,
    parse_fraction,
    prepare_trace,
    read_mooncake_trace,
    resolve_prompt_mode,
    scale_request,
    word_vocabulary,
    write_aiperf_trace,
)

DATA = Path(__file__).parent / "data" / "aiperf"
SHARED_TRACE = REPO_ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"


def write_trace(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def req(ts: float, n_blocks: int, last: int = MOONCAKE_BLOCK_TOKENS, out: int = 100, first_id: int = 0,
        shared: int = 0) -> dict:
    """A Mooncake record of ``n_blocks`` hash ids (the first ``shared`` ones are 0, 1, ...)."""
    ids = list(range(shared)) + list(range(first_id, first_id + n_blocks - shared))
    return {"timestamp": ts, "input_length": (n_blocks - 1) * MOONCAKE_BLOCK_TOKENS + last,
            "output_length": out, "hash_ids": ids}


# --- trace preparation ---------------------------------------------------------------------------

def test_every_sixth_request_is_kept_in_order_and_the_clock_restarts(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.jsonl", [req(1000 + 100 * i, 2, first_id=10 * i + 100) for i in range(13)])
    prepared = prepare_trace(read_mooncake_trace(path), SliceOptions())
    assert [r.hash_ids[0] for r in prepared.requests] == [100, 160, 220]  # requests 0, 6, 12
    assert [r.timestamp_ms for r in prepared.requests] == [0.0, 600.0, 1200.0]
    assert prepared.block_tokens == 512
    assert prepared.stats.duration_s == pytest.approx(1.2)


def test_scaling_shrinks_blocks_but_keeps_which_requests_share_them() -> None:
    opts = SliceOptions(scale_length=1 / 16)  # 512-token blocks become 32 tokens
    assert opts.block_tokens == 32
    # 13 full blocks + a last block of 102 tokens: 13 * 32 + round(102 / 16) = 416 + 6.
    scaled = scale_request(TraceRequest(0, 6758, 500, tuple(range(14))), opts)
    assert (scaled.input_length, scaled.hash_ids) == (422, tuple(range(14)))
    # A last block of 1 token still has a token; a full last block is a full scaled block.
    assert scale_request(TraceRequest(0, 513, 1, (0, 1)), opts).input_length == 33
    assert scale_request(TraceRequest(0, 1024, 1, (0, 1)), opts).input_length == 64
    # Hash ids covering only a prefix (aiperf's "prefix only" layout) keep a scaled tail.
    assert scale_request(TraceRequest(0, 1024 + 160, 1, (0, 1)), opts).input_length == 64 + 10


@pytest.mark.slow  # reads and checks all 12,031 requests: ~2 s
@pytest.mark.skipif(not SHARED_TRACE.is_file(), reason="shared Mooncake trace not present")
def test_scaled_real_trace_gives_every_hash_id_one_size_as_aiperf_requires() -> None:
    """aiperf refuses a hash id materialised at two sizes; scaling must never create one."""
    prepared = prepare_trace(read_mooncake_trace(SHARED_TRACE), SliceOptions(scale_length=1 / 16))
    assert len(prepared.requests) == 2006  # 12,031 requests, every 6th
    size_of: dict[int, int] = {}
    block = prepared.block_tokens
    for r in prepared.requests:
        n = len(r.hash_ids)
        assert (n - 1) * block < r.input_length <= n * block
        for i, h in enumerate(r.hash_ids):
            size = block if i < n - 1 else r.input_length - (n - 1) * block
            assert size_of.setdefault(h, size) == size, f"hash id {h} at two sizes"
    assert prepared.stats.block_reuse == pytest.approx(block_reuse(prepared.requests))
    assert 0.1 < prepared.stats.block_reuse < 0.3  # the sampled hour re-reads ~16% of its blocks


def test_output_scaling_has_a_floor_and_a_cap() -> None:
    opts = SliceOptions(scale_length=1 / 16, scale_output=1 / 32, min_output_tokens=8, max_output_tokens=16)
    outputs = [scale_request(TraceRequest(0, 100, out, (0,)), opts).output_length for out in (1, 320, 2000)]
    assert outputs == [8, 10, 16]
    # Without scale_output, outputs scale like prompts.
    assert scale_request(TraceRequest(0, 100, 320, (0,)), SliceOptions(scale_length=0.5)).output_length == 160


def test_filter_then_window_then_compress_time(tmp_path: Path) -> None:
    # Sampled requests alternate short (1 block) and long (5 blocks) prompts, one second apart.
    records = [req(1000 * i, 1 if i % 2 == 0 else 5, first_id=10 * i + 100) for i in range(12)]
    path = write_trace(tmp_path / "t.jsonl", records)
    opts = SliceOptions(sample_every=1, max_input_tokens=600, skip=1, limit=3, scale_time=0.5)
    prepared = prepare_trace(read_mooncake_trace(path), opts)
    # Long prompts are dropped first, so skip/limit count the requests actually sent: 2, 4, 6.
    assert [r.hash_ids[0] for r in prepared.requests] == [120, 140, 160]
    assert [r.timestamp_ms for r in prepared.requests] == [0.0, 1000.0, 2000.0]


def test_nothing_left_is_an_error_that_names_the_options(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.jsonl", [req(0, 4)])
    with pytest.raises(ValueError, match="max_input_tokens=100"):
        prepare_trace(read_mooncake_trace(path), SliceOptions(max_input_tokens=100))


def test_bad_trace_lines_are_reported_with_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(req(0, 2)) + "\n\n" + json.dumps({"timestamp": 5, "input_length": 10,
                                                                  "output_length": 1}) + "\n")
    with pytest.raises(TraceFormatError, match=r"bad\.jsonl:3: missing field 'hash_ids'"):
        read_mooncake_trace(path)
    path.write_text(json.dumps({"timestamp": 0, "input_length": 512, "output_length": 1, "hash_ids": [1, 2]}))
    with pytest.raises(TraceFormatError, match=r"bad\.jsonl:1: input_length 512 is too short for 2 hash_ids"):
        read_mooncake_trace(path)
    path.write_text("{not json\n")
    with pytest.raises(TraceFormatError, match=r"bad\.jsonl:1: not JSON"):
        read_mooncake_trace(path)


def test_slice_options_reject_bad_values_by_name() -> None:
    with pytest.raises(ValueError, match="scale_time must be > 0"):
        SliceOptions(scale_time=0)
    with pytest.raises(ValueError, match="max_output_tokens"):
        SliceOptions(min_output_tokens=8, max_output_tokens=4)
    assert parse_fraction("1/16") == 1 / 16 and parse_fraction("0.25") == 0.25
    with pytest.raises(ValueError, match="1/0"):
        parse_fraction("1/0")


def make_word_tokenizer(directory: Path, n_words: int = 500) -> Path:
    """A real word-level tokenizer (the kind the tiny test model has), saved with the tokenizers package."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                 "unk_token": "<unk>"}))
    return directory


def test_text_prompts_are_exact_in_tokens_and_share_exactly_the_shared_blocks(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    tok_dir = make_word_tokenizer(tmp_path / "tok")
    vocab = word_vocabulary(tok_dir)
    assert vocab is not None and len(vocab) == 500 and "<unk>" not in vocab
    assert resolve_prompt_mode(PromptMode.AUTO, tok_dir) is PromptMode.TEXT
    # Two requests share their first two blocks (ids 0, 1), then differ.
    trace = write_trace(tmp_path / "t.jsonl", [req(0, 4, last=100, first_id=10, shared=2),
                                               req(10, 3, last=512, first_id=20, shared=2)])
    prepared = prepare_trace(read_mooncake_trace(trace), SliceOptions(sample_every=1, scale_length=1 / 16))
    out = write_aiperf_trace(tmp_path / "aiperf.jsonl", prepared, PromptMode.TEXT, vocab=vocab, seed=100)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(records[0]) == {"timestamp", "text_input", "output_length"}  # aiperf: no hash_ids with text
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ids = [tokenizer.encode(r["text_input"], add_special_tokens=False).ids for r in records]
    assert [len(x) for x in ids] == [r.input_length for r in prepared.requests] == [3 * 32 + 6, 3 * 32]
    assert 0 not in ids[0] + ids[1]  # no <unk>
    assert ids[0][:64] == ids[1][:64] and ids[0][64:96] != ids[1][64:96]
    # Deterministic: the same seed writes the same prompts, another seed different ones.
    again = aiperf_records(prepared, PromptMode.TEXT, vocab=vocab, seed=100)
    other = aiperf_records(prepared, PromptMode.TEXT, vocab=vocab, seed=7)
    assert again == records and other[0]["text_input"] != records[0]["text_input"]


def test_hash_id_records_for_real_tokenizers(tmp_path: Path) -> None:
    (tmp_path / "bpe").mkdir()
    (tmp_path / "bpe" / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}}}))
    assert resolve_prompt_mode(PromptMode.AUTO, tmp_path / "bpe") is PromptMode.HASH_IDS
    assert resolve_prompt_mode(PromptMode.AUTO, None) is PromptMode.HASH_IDS
    trace = write_trace(tmp_path / "t.jsonl", [req(12.6, 2, last=7, out=3)])
    prepared = prepare_trace(read_mooncake_trace(trace), SliceOptions(sample_every=1))
    assert aiperf_records(prepared, PromptMode.HASH_IDS) == [
        {"timestamp": 0, "input_length": 519, "output_length": 3, "hash_ids": [0, 1]}]
    with pytest.raises(ValueError, match="word vocabulary"):
        aiperf_records(prepared, PromptMode.TEXT)


# --- the aiperf command and its venv -------------------------------------------------------------

def test_aiperf_command_is_the_published_one_plus_the_replay_flags(tmp_path: Path) -> None:
    run = AiperfRun(model="M", tokenizer="/tok", url="http://127.0.0.1:9", input_file=tmp_path / "t.jsonl",
                    artifact_dir=tmp_path / "a", block_tokens=32, extra_args=("--workers-max", "1"))
    cmd = aiperf_command("aiperf", run)
    joined = " ".join(cmd)
    for part in ("profile --model M --tokenizer /tok --endpoint-type chat --endpoint /v1/chat/completions "
                 "--streaming --url http://127.0.0.1:9", "--custom-dataset-type mooncake_trace --fixed-schedule",
                 "--random-seed 100", "--isl-block-size 32", "--extra-inputs ignore_eos:true",
                 "--workers-max 1"):
        assert part in joined
    assert cmd[cmd.index("-H") + 1] == "Authorization: Bearer NOT USED"
    text_run = AiperfRun(model="M", tokenizer="/tok", url="u", input_file=Path("t"), artifact_dir=Path("a"),
                         ignore_eos=False)
    assert "--isl-block-size" not in aiperf_command("aiperf", text_run)
    assert "--extra-inputs" not in aiperf_command("aiperf", text_run)
    assert "HF_HUB_OFFLINE" not in aiperf_env({"HF_HUB_OFFLINE": "1", "PATH": "/bin"})


def test_aiperf_venv_is_keyed_by_its_pin_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXKV_CACHE_DIR", str(tmp_path / "cache"))
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("aiperf==0.13.0\n")
    b.write_text("aiperf==0.12.0\n")
    assert venv.venv_dir(a).parent == tmp_path / "cache"
    assert venv.venv_dir(a).name.startswith("aiperf-") and venv.venv_dir(a) != venv.venv_dir(b)
    assert "aiperf==0.13.0" in venv.REQUIREMENTS.read_text()
    with pytest.raises(venv.AiperfVenvError, match="missing.txt"):
        venv.ensure_aiperf_venv(tmp_path / "missing.txt")


# --- conversation slices ---------------------------------------------------------------------------

def test_turns_are_grouped_by_their_longest_shared_prefix_not_by_the_common_first_block() -> None:
    reqs = [TraceRequest(0, 100, 1, (0, 1, 2)),      # conversation A, turn 1
            TraceRequest(1, 100, 1, (0, 5, 6)),      # B: shares only block 0 (every request does)
            TraceRequest(2, 100, 1, (0, 1, 2, 3)),   # A, turn 2
            TraceRequest(3, 100, 1, (0, 5, 6, 7)),   # B, turn 2
            TraceRequest(4, 100, 1, (0, 1, 2, 3, 9))]  # A, turn 3
    assert conversations(reqs) == [[0, 2, 4], [1, 3]]
    assert conversations(reqs, min_shared=1) == [[0, 1, 2, 3, 4]]


def test_conversation_slices_keep_whole_conversations_of_one_window(tmp_path: Path) -> None:
    records = [req(0, 2, first_id=100), req(1000, 2, first_id=200),          # two conversations...
               req(2000, 3, first_id=100, shared=0), req(3000, 3, first_id=300),
               req(4000, 4, first_id=100), req(70_000, 3, first_id=200)]      # ...the last turn out of the window
    # req(...) ids: turn k of conversation X repeats X's first ids; make A's turns extend A's prefix.
    records[2]["hash_ids"] = [100, 101, 102]
    records[4]["hash_ids"] = [100, 101, 102, 103]
    records[5]["hash_ids"] = [200, 201, 202]
    path = write_trace(tmp_path / "t.jsonl", records)
    trace = read_mooncake_trace(path)
    opts = SliceOptions(select="conversations", window_s=60, sample_every=1, min_turns=2)
    prepared = prepare_trace(trace, opts)
    # A has 3 turns in window 0; B's second turn is in window 1, so B has one turn here and is left out;
    # request 3 (ids 300...) is a single-turn conversation.
    assert [r.hash_ids[0] for r in prepared.requests] == [100, 100, 100]
    assert [r.timestamp_ms for r in prepared.requests] == [0.0, 2000.0, 4000.0]
    assert prepared.stats.block_reuse == pytest.approx(5 / 9)  # 2 of 3, then 3 of 4 blocks seen before
    assert prepare_trace(trace, replace(opts, min_turns=1)).stats.requests == 5
    # limit takes whole conversations, in order, each if it still fits: A (3 requests) and B (1), not C.
    limited = prepare_trace(trace, replace(opts, min_turns=1, limit=4))
    assert [r.hash_ids[0] for r in limited.requests] == [100, 200, 100, 100]
    with pytest.raises(ValueError, match="select must be one of"):
        SliceOptions(select="sessions")


@pytest.mark.slow  # reads all 12,031 requests: ~3 s
@pytest.mark.skipif(not SHARED_TRACE.is_file(), reason="shared Mooncake trace not present")
def test_conversation_slices_of_the_real_trace_reuse_far_more_than_every_sixth_request() -> None:
    """The published every-6th sampling breaks conversations up: a slice of it barely reuses anything, so it
    cannot show what a KV cache does. Whole conversations of a window reuse much more, in every window."""
    trace = read_mooncake_trace(SHARED_TRACE)
    preset = driver.PRESETS["cpu"]
    for window in range(3):
        conv = prepare_trace(trace, replace(preset, window=window))
        every6 = prepare_trace(trace, SliceOptions(scale_length=1 / 8, skip=window * conv.stats.requests,
                                                   limit=conv.stats.requests))
        assert conv.stats.block_reuse > 0.3 > 0.15 > every6.stats.block_reuse, (window, conv.stats, every6.stats)
        assert 20 <= conv.stats.requests <= 80
        assert max(r.input_length for r in conv.requests) <= preset.max_input_tokens


# --- results -------------------------------------------------------------------------------------

def test_real_aiperf_export_is_parsed_consistently_with_its_per_request_records() -> None:
    run = results.load_run("vllm", DATA / "slice_0" / "vllm" / "rep_0" / "aiperf")
    assert (run.requests, run.errors) == (8, 0)
    assert sorted(run.ttft_ms) == list(range(8))  # keyed by the request's line in the replayed trace
    assert run.units["time_to_first_token"] == "ms"
    # aiperf's summary percentiles are those of its own per-request records.
    ttfts = list(run.ttft_ms.values())
    assert run.stat("time_to_first_token", "p50") == pytest.approx(np.percentile(ttfts, 50))
    assert run.stat("time_to_first_token", "p90") == pytest.approx(np.percentile(ttfts, 90))
    assert run.stat("time_to_first_token", "avg") == pytest.approx(np.mean(ttfts))
    assert run.stat("output_token_throughput", "avg") > 0
    assert run.stat("time_to_first_token", "p42") is None


def test_missing_or_foreign_summary_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(results.ResultsError, match=str(tmp_path / "x" / results.SUMMARY_JSON)):
        results.load_run("x", tmp_path / "x")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / results.SUMMARY_JSON).write_text('{"hello": 1}')
    with pytest.raises(results.ResultsError, match="no time_to_first_token"):
        results.load_run("y", tmp_path / "y")


def copy_runs(dest: Path, repeats: int = 2) -> Path:
    """Two slices with ``repeats`` copies of each kept run (the second slice's flexkv copy scaled so that its
    ratios differ)."""
    for name in ("slice_0", "slice_1"):
        shutil.copy(DATA / "slice_0" / "trace_info.json", (dest / name).mkdir(parents=True) or dest / name)
        for config in ("vllm", "flexkv"):
            for rep in range(repeats):
                shutil.copytree(DATA / "slice_0" / config / "rep_0", dest / name / config / f"rep_{rep}")
    return dest


def test_ratios_are_medians_over_repeats_against_vllm_and_goals_are_judged_on_them(tmp_path: Path) -> None:
    out = copy_runs(tmp_path / "out")
    summary = out / "slice_1" / "flexkv" / "rep_1" / "aiperf" / results.SUMMARY_JSON
    data = json.loads(summary.read_text())
    data["time_to_first_token"]["p50"] *= 3  # one slow repeat: with 2 repeats the median is their mean
    summary.write_text(json.dumps(data))
    slices = results.discover(out)
    assert [sl.name for sl in slices] == ["slice_0", "slice_1"]
    sl0, sl1 = slices
    assert sl0.configs() == ["vllm", "flexkv"] and len(sl0.runs["flexkv"]) == 2
    base = sl0.median("vllm", "time_to_first_token", "p50")
    flex = sl0.median("flexkv", "time_to_first_token", "p50")
    assert sl0.ratio("flexkv", "time_to_first_token", "p50") == pytest.approx(flex / base)
    assert sl1.ratio("flexkv", "time_to_first_token", "p50") == pytest.approx(2 * flex / base)
    assert sl0.tier_hits("flexkv") == {"cpu": 94, "ssd": 0, "remote": 0}  # 47 per repeat
    goal = results.GOALS[0]
    assert goal.met(0.39) and not goal.met(0.41) and results.GOALS[3].met(1.0) and not results.GOALS[3].met(0.99)
    table = results.goals_table(slices)
    row = next(line for line in table.splitlines() if line.startswith("| slice_0 |"))
    ratio = flex / base
    assert f"{ratio:.2f} {'✓' if ratio <= 0.4 else '✗'}" in row and "| 4% |" in row  # the slice's reuse ceiling
    assert "94 / 0" in results.slice_table(sl0)
    path = results.write_csv(slices, tmp_path / "r.csv")
    rows = list(csv.DictReader(path.open()))
    assert {(r["slice"], r["config"], r["repeat"]) for r in rows} == {
        (s, c, str(k)) for s in ("slice_0", "slice_1") for c in ("vllm", "flexkv") for k in range(2)}


def test_ttft_is_split_into_first_and_later_turns_of_the_replayed_conversations(tmp_path: Path) -> None:
    out = copy_runs(tmp_path / "out", repeats=1)
    # Lines 0-7 of the replayed trace: conversation A is lines 0, 2, 5; B is 1, 7; 3, 4 and 6 stand alone
    # (sharing only block 0, as every request of the trace does).
    ids = [[0, 1, 2], [0, 5, 6], [0, 1, 2, 3], [0, 8], [0, 9], [0, 1, 2, 3, 4], [0, 10], [0, 5, 6, 11]]
    write_trace(out / "slice_0" / "trace.jsonl", [{"timestamp": i, "input_length": 64 * len(h), "output_length": 4,
                                                   "hash_ids": h} for i, h in enumerate(ids)])
    # A cache served a later turn when vLLM's cached tokens cover 3/4 of the blocks (32 tokens each here) an
    # earlier line had: line 2 (3 blocks) all of them, line 7 (3 blocks) exactly 3/4, line 5 (4 blocks) one.
    records = out / "slice_0" / "flexkv" / "rep_0" / "aiperf" / results.RECORDS_JSONL
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    for record in lines:
        cached = {2: 96, 5: 32, 7: 72}.get(record["metadata"]["session_num"])
        if cached is not None:
            record["metrics"]["usage_prompt_cache_read_tokens"]["value"] = cached
    records.write_text("".join(json.dumps(record) + "\n" for record in lines))
    sl0, sl1 = results.discover(out)
    assert sl0.later == {2: 3, 5: 4, 7: 3} and sl1.later is None  # slice_1 has no trace: no split
    assert sl0.later_served("flexkv") == (2, 3) and sl0.later_served("vllm") == (0, 3)
    assert "| 2 of 3 |" in results.slice_table(sl0)
    run = sl0.runs["flexkv"][0]
    assert sl0.turn_ttft_p50("flexkv", later=True) == pytest.approx(
        statistics.median(run.ttft_ms[i] for i in (2, 5, 7)))
    assert sl0.turn_ttft_p50("flexkv", later=False) == pytest.approx(
        statistics.median(run.ttft_ms[i] for i in (0, 1, 3, 4, 6)))
    base = sl0.turn_ttft_p50("vllm", later=True)
    assert sl0.turn_ratio("flexkv", later=True) == pytest.approx(sl0.turn_ttft_p50("flexkv", later=True) / base)
    row = next(line for line in results.goals_table([sl0, sl1]).splitlines() if line.startswith("| slice_0 |"))
    assert "| 3 of 8 |" in row and f"{sl0.turn_ratio('flexkv', later=True):.2f} |" in row
    assert sl1.turn_ratio("flexkv", later=True) is None


@pytest.mark.slow  # matplotlib import and two figures: ~2-3 s
def test_report_only_rebuilds_tables_and_plots_from_the_out_dir(tmp_path: Path) -> None:
    out = copy_runs(tmp_path / "out")
    (out / "slice_0" / "flexkv" / "rep_0" / "run_info.json").write_text(json.dumps({
        "config": "flexkv", "deployment": "dynamo.vllm --connector flexkv, tier events on, 2 workers",
        "model": "m"}))
    assert driver.main(["--report-only", "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert "8 requests over 3.0 s" in md and "## Ratios to `vllm`" in md
    assert "- `flexkv`: dynamo.vllm --connector flexkv, tier events on, 2 workers" in md
    for name in ("aiperf_ratios.png", "aiperf_ttft_cdf.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the driver's arguments and the tokenizer ------------------------------------------------------

def test_flags_override_the_preset() -> None:
    args = driver.parse_args(["--launch-mocker", "--limit", "5", "--scale-time", "1/2"])
    opts = driver.slice_options(args, "cpu", window=2)
    assert (opts.limit, opts.scale_time, opts.window) == (5, 0.5, 2)
    assert opts.scale_length == driver.PRESETS["cpu"].scale_length and opts.select == "conversations"
    assert driver.slice_options(driver.parse_args(["--limit", "0"]), "cpu").limit is None
    assert driver.slice_options(driver.parse_args([]), "full") == SliceOptions()
    quick = driver.parse_args(["--quick"])
    assert (quick.preset, quick.slices, quick.repeats) == ("quick", 2, 2)


def test_url_mode_takes_one_config_label(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="one running deployment"):
        driver.main(["--url", "http://127.0.0.1:9", "--configs", "vllm,flexkv", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown config"):
        driver.main(["--launch", "--configs", "lmcache", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown config"):  # the mocker has no blind mode
        driver.main(["--launch-mocker", "--configs", "flexkv-blind", "--out", str(tmp_path)])


@pytest.mark.slow  # imports transformers in a subprocess: ~10 s
def test_a_local_tokenizer_is_found_by_a_repo_style_name_offline(tmp_path: Path) -> None:
    """What aiperf 0.13 needs in hash-ids mode (it refuses an absolute directory as a tokenizer): the real
    model's tokenizer, laid out as a Hugging Face cache and loaded by name with the hub offline."""
    from flexkv_dynamo.models import ensure_model

    model_dir = ensure_model()
    name, env = hub_tokenizer(model_dir, tmp_path / "hub")
    assert name == f"local/{model_dir.name}" and env["HF_HUB_OFFLINE"] == "1"
    assert hub_tokenizer(model_dir, tmp_path / "hub") == (name, env)  # same files: same snapshot
    assert not list((tmp_path / "hub").rglob("*.safetensors"))  # the tokenizer only, never the weights
    code = (f"from transformers import AutoTokenizer; a = AutoTokenizer.from_pretrained({name!r}); "
            f"b = AutoTokenizer.from_pretrained({str(model_dir)!r}); s = 'The capital of France is'; "
            "print(a(s)['input_ids'] == b(s)['input_ids'], a.chat_template == b.chat_template)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["True", "True"]
    with pytest.raises(AiperfError, match="no tokenizer.json"):
        hub_tokenizer(tmp_path / "hub", tmp_path / "hub2")


# --- processes -----------------------------------------------------------------------------------

def test_waiting_for_a_dead_url_fails_with_the_url() -> None:
    port = launch.free_port()
    with pytest.raises(launch.DeploymentError, match=f"127.0.0.1:{port}.*'m'"):
        launch.wait_for_model(f"http://127.0.0.1:{port}", "m", timeout_s=0.3, poll_s=0.1)


def test_a_deployment_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    dep = launch.Deployment("t", "http://127.0.0.1:9", tmp_path)
    dep.spawn("worker", ["bash", "-c", "echo model file not found; exit 3"])
    time.sleep(0.5)
    with pytest.raises(launch.DeploymentError, match=r"(?s)worker exited with status 3.*model file not found"):
        dep.wait_ready("m", workers=1, timeout_s=5)
    dep.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_stop_ends_the_whole_process_group_children_included(tmp_path: Path) -> None:
    dep = launch.Deployment("t", "http://127.0.0.1:9", tmp_path)
    # A leader that ignores SIGTERM and a background child: both must be gone after stop().
    proc = dep.spawn("stubborn", ["bash", "-c", "trap '' TERM; sleep 60 & echo $! > child.pid; wait"], cwd=tmp_path)
    for _ in range(50):
        if (tmp_path / "child.pid").is_file() and (tmp_path / "child.pid").read_text().strip():
            break
        time.sleep(0.05)
    child = int((tmp_path / "child.pid").read_text())
    dep.stop(grace_s=0.5)
    assert proc.popen.poll() is not None
    for _ in range(20):
        if not _alive(child):
            break
        time.sleep(0.05)
    assert not _alive(child)


# --- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.dynamo
def test_driver_end_to_end_on_the_mocker(tmp_path: Path) -> None:
    """The whole pipeline on a 4-request slice, 2 repeats: deploy, replay, stop, report (about two minutes)."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "aiperf_mooncake.py"), "--launch-mocker", "--select", "requests",
           "--scale-length", "1/8", "--limit", "4", "--configs", "vllm,flexkv", "--repeats", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=560, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [sl] = results.discover(out)
    assert {c: [(r.requests, r.errors) for r in runs] for c, runs in sl.runs.items()} == {
        "vllm": [(4, 0), (4, 0)], "flexkv": [(4, 0), (4, 0)]}
    assert sl.ratio("flexkv", "time_to_first_token", "p50") > 0
    assert (out / "aiperf_ratios.png").is_file() and "## Ratios to `vllm`" in (out / "results.md").read_text()
    # Every run replayed the same prepared slice with aiperf's hash-ids prompts, tokenizer by repo-style name.
    for info in out.glob("slice/*/rep_*/run_info.json"):
        command = json.loads(info.read_text())["aiperf_command"]
        assert str(out / "slice" / "trace.jsonl") in command
        assert command[command.index("--tokenizer") + 1].startswith("local/")
    leftovers = subprocess.run(["pgrep", "-f", f"--discovery-backend file.*{tmp_path}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes still running: {leftovers.stdout}"


@pytest.mark.slow
@pytest.mark.dynamo
@pytest.mark.engine
def test_driver_end_to_end_with_real_workers_and_flexkv(tmp_path: Path) -> None:
    """Two real dynamo.vllm --connector flexkv workers on the real model, a slice of at most 3 requests (whole conversations) of one conversation
    window (about four minutes on two busy cores, most of it engine start-up): the runs complete, the caches
    are emptied before each repeat, and our tiers' counters are read around each run."""
    pytest.importorskip("vllm")
    out = tmp_path / "out"
    shim = torchvision_shim_if_needed(tmp_path / "shim")
    env = {**os.environ, "PYTHONPATH": shim}
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "aiperf_mooncake.py"), "--launch", "--quick", "--slices", "1",
           "--limit", "3", "--max-input-tokens", "1024", "--max-output-tokens", "8", "--configs", "flexkv",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=590, env=env, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [sl] = results.discover(out)
    # Whole conversations up to the limit: the slice may hold fewer requests than --limit.
    sliced = json.loads((out / sl.name / "trace_info.json").read_text())["stats"]["requests"]
    assert 2 <= sliced <= 3
    assert [(r.requests, r.errors) for r in sl.runs["flexkv"]] == [(sliced, 0), (sliced, 0)]
    info = json.loads((out / sl.name / "flexkv" / "rep_0" / "run_info.json").read_text())
    assert "--connector flexkv, tier events on" in info["deployment"]
    # Each repeat starts from empty caches (Dynamo's flush_cache empties our tiers too), so the second stores
    # its prompts' blocks again: with the first run's blocks still there, it would store none.
    stored = [t["stored"]["cpu"] for t in sl.tiers["flexkv"]]
    assert stored[0] > 0 and stored[1] > 0, stored
