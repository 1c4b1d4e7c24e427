"""Prepare a Mooncake trace for aiperf: the published sampling, optional scaling, aiperf's jsonl format.

A Mooncake trace (FAST'25) is jsonl with one request per line: ``timestamp`` (ms), ``input_length``,
``output_length`` and ``hash_ids``, where each hash id names one 512-token block of the prompt and
equal ids mean shareable KV (prefix-chained). The published benchmark keeps every 6th request of the
one-hour conversation trace and replays it by timestamp.

A CPU deployment cannot bear that load, so a slice can be made smaller without losing its shape:

- ``scale_length`` shrinks prompts by shrinking the *block*: 512 tokens become ``round(512 * s)``
  tokens, and every hash id keeps naming one block. The prefix-sharing structure (which requests
  share which blocks) is therefore exactly the original one, only cheaper to compute. With
  ``s = 1/16`` a block is 32 tokens, the KV block size of our CPU vLLM workers.
- ``scale_output`` shrinks (and ``max_output_tokens`` caps) the number of generated tokens.
- ``scale_time`` compresses the gaps between arrivals (0.25 = four times as fast).
- ``max_input_tokens`` drops requests whose (scaled) prompt is longer than the deployment accepts;
  ``skip`` and ``limit`` choose a window of the sampled requests.

Which requests to keep (``select``):

- ``requests`` (the published method): every ``sample_every``-th request. It breaks conversations up:
  the turns of one conversation rarely survive together, so a short slice barely reuses anything (a
  40-request slice of every 6th request repeats 4-13 % of its blocks).
- ``conversations``: the trace is cut into consecutive windows of ``window_s`` seconds (slice
  ``window`` is the window-th one), requests are grouped into conversations inside the window (a turn
  continues the earlier request it shares the longest prefix with, at least ``MIN_SHARED_BLOCKS``
  blocks: every request of the trace shares block 0, a system prompt), and every ``sample_every``-th
  conversation with at least ``min_turns`` turns is kept whole. Each kept request is sent at its own
  timestamp: consecutive turns of a conversation arrive as they did, other users' requests in between.
  Consecutive windows are the slices, so none is picked by hand.

Two ways to hand the result to aiperf (``PromptMode``):

- ``hash-ids``: records keep ``input_length`` + ``hash_ids``; aiperf synthesises the prompt text with
  the model's tokenizer, one block of ``block_tokens`` tokens per hash id (``--isl-block-size``). This
  is the published method and what a real model uses.
- ``text``: we write the prompt text ourselves (``text_input``), one deterministic block of words per
  hash id, drawn from a word-level tokenizer's own vocabulary. aiperf's synthesis samples a text
  corpus, and every corpus word is unknown to a word-level tokenizer such as the tiny test model's:
  all prompts would be the same ``<unk>`` string and every request would hit the cache.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

#: Tokens per hash id in the Mooncake traces (and aiperf's default block size for them).
MOONCAKE_BLOCK_TOKENS = 512


#: How ``SliceOptions.select`` may choose requests.
SELECTIONS = ("requests", "conversations")
#: A request continues an earlier one's conversation when they share at least this many leading blocks
#: (every request of the Mooncake conversation trace shares block 0, a common system prompt).
MIN_SHARED_BLOCKS = 2


class TraceFormatError(ValueError):
    """A trace line is not a valid Mooncake request."""


class PromptMode(str, enum.Enum):
    AUTO = "auto"
    HASH_IDS = "hash-ids"
    TEXT = "text"


@dataclass(frozen=True)
class TraceRequest:
    """One request of a Mooncake trace."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class SliceOptions:
    """How to cut and scale a trace. The defaults are the published method, unscaled."""

    sample_every: int = 6
    skip: int = 0
    limit: int | None = None
    scale_length: float = 1.0
    scale_output: float | None = None  # None: the same factor as the prompts
    max_output_tokens: int | None = None
    min_output_tokens: int = 1
    scale_time: float = 1.0
    max_input_tokens: int | None = None
    select: str = "requests"  # or "conversations" (see the module's docstring)
    window_s: float = 600.0  # conversations: length of a slice, in trace seconds
    window: int = 0  # conversations: which window (0 = the trace's first window_s seconds)
    min_turns: int = 2  # conversations: keep only conversations with at least this many turns in the window

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if not self.window_s > 0 or self.window < 0 or self.min_turns < 1:
            raise ValueError(f"window_s must be > 0, window >= 0 and min_turns >= 1, got {self.window_s}, "
                             f"{self.window}, {self.min_turns}")
        if self.sample_every < 1:
            raise ValueError(f"sample_every must be >= 1, got {self.sample_every}")
        if self.skip < 0:
            raise ValueError(f"skip must be >= 0, got {self.skip}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all), got {self.limit}")
        for name in ("scale_length", "scale_time"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.scale_output is not None and not self.scale_output > 0:
            raise ValueError(f"scale_output must be > 0, got {self.scale_output}")
        if self.min_output_tokens < 1:
            raise ValueError(f"min_output_tokens must be >= 1, got {self.min_output_tokens}")
        if self.max_output_tokens is not None and self.max_output_tokens < self.min_output_tokens:
            raise ValueError(f"max_output_tokens ({self.max_output_tokens}) must be >= min_output_tokens "
                             f"({self.min_output_tokens})")
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise ValueError(f"max_input_tokens must be >= 1, got {self.max_input_tokens}")

    @property
    def block_tokens(self) -> int:
        """Tokens per hash id after scaling (at least 1)."""
        return max(1, round(MOONCAKE_BLOCK_TOKENS * self.scale_length))


@dataclass(frozen=True)
class TraceStats:
    """What a prepared slice looks like, for the log and the report."""

    requests: int
    duration_s: float
    input_tokens_mean: float
    input_tokens_max: int
    output_tokens_mean: float
    block_reuse: float  # fraction of prompt blocks already seen earlier in the slice

    def describe(self) -> str:
        return (f"{self.requests} requests over {self.duration_s:.1f} s, prompts {self.input_tokens_mean:.0f} "
                f"tokens on average (max {self.input_tokens_max}), outputs {self.output_tokens_mean:.1f} "
                f"tokens on average, {100 * self.block_reuse:.1f}% of prompt blocks seen before in the slice")


@dataclass(frozen=True)
class PreparedTrace:
    requests: list[TraceRequest]
    block_tokens: int
    stats: TraceStats


# --- reading -------------------------------------------------------------------------------------

def parse_request(record: object, *, where: str = "record") -> TraceRequest:
    """One Mooncake record (a decoded json object) as a TraceRequest; TraceFormatError names the field."""
    if not isinstance(record, dict):
        raise TraceFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("timestamp", "input_length", "output_length", "hash_ids"):
        if key not in record:
            raise TraceFormatError(f"{where}: missing field {key!r}")
    ts, inp, out, ids = record["timestamp"], record["input_length"], record["output_length"], record["hash_ids"]
    if not isinstance(ts, (int, float)) or ts < 0:
        raise TraceFormatError(f"{where}: timestamp must be a number of ms >= 0, got {ts!r}")
    if not isinstance(inp, int) or inp < 1:
        raise TraceFormatError(f"{where}: input_length must be an integer >= 1, got {inp!r}")
    if not isinstance(out, int) or out < 0:
        raise TraceFormatError(f"{where}: output_length must be an integer >= 0, got {out!r}")
    if not isinstance(ids, list) or not all(isinstance(h, int) for h in ids):
        raise TraceFormatError(f"{where}: hash_ids must be a list of integers, got {ids!r}")
    n = len(ids)
    if n and inp <= (n - 1) * MOONCAKE_BLOCK_TOKENS:
        raise TraceFormatError(f"{where}: input_length {inp} is too short for {n} hash_ids of "
                               f"{MOONCAKE_BLOCK_TOKENS} tokens (the last block would be empty)")
    return TraceRequest(float(ts), inp, out, tuple(ids))


def read_mooncake_trace(path: str | os.PathLike[str]) -> list[TraceRequest]:
    """All requests of a Mooncake jsonl trace, in file order (which is timestamp order)."""
    requests = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(f"{where}: not JSON ({exc})") from None
            requests.append(parse_request(record, where=where))
    if not requests:
        raise TraceFormatError(f"{path}: no requests")
    return requests


# --- slicing and scaling -------------------------------------------------------------------------

def scale_request(req: TraceRequest, opts: SliceOptions) -> TraceRequest:
    """The request with its prompt measured in scaled blocks and its output scaled and capped.

    Only the last block of a prompt may be partial. Its scaled size is a function of its original
    size alone, so a hash id that ends two prompts has the same scaled size in both (aiperf refuses
    a hash id materialised at two sizes). A prompt longer than its blocks (hash ids cover a prefix
    only) keeps a scaled un-hashed tail.
    """
    block = opts.block_tokens
    factor = block / MOONCAKE_BLOCK_TOKENS
    n = len(req.hash_ids)
    hashed = n * MOONCAKE_BLOCK_TOKENS
    if n and req.input_length <= hashed:
        last = req.input_length - (n - 1) * MOONCAKE_BLOCK_TOKENS
        scaled_last = min(block, max(1, round(last * factor)))
        input_length = (n - 1) * block + scaled_last
    elif n:
        input_length = n * block + max(1, round((req.input_length - hashed) * factor))
    else:
        input_length = max(1, round(req.input_length * factor))
    out_factor = opts.scale_output if opts.scale_output is not None else opts.scale_length
    output_length = max(opts.min_output_tokens, round(req.output_length * out_factor))
    if opts.max_output_tokens is not None:
        output_length = min(output_length, opts.max_output_tokens)
    return replace(req, input_length=input_length, output_length=output_length)


def block_reuse(requests: Iterable[TraceRequest]) -> float:
    """Fraction of prompt blocks whose hash id appeared in an earlier request.

    With an infinite cache and perfect routing this is the share of prefill that can be skipped: the
    ceiling of what any KV cache can win on this slice.
    """
    seen: set[int] = set()
    hits = total = 0
    for req in requests:
        for h in req.hash_ids:
            total += 1
            hits += h in seen
            seen.add(h)
    return hits / total if total else 0.0


def trace_stats(requests: Sequence[TraceRequest]) -> TraceStats:
    if not requests:
        return TraceStats(0, 0.0, 0.0, 0, 0.0, 0.0)
    return TraceStats(
        requests=len(requests),
        duration_s=(requests[-1].timestamp_ms - requests[0].timestamp_ms) / 1000.0,
        input_tokens_mean=sum(r.input_length for r in requests) / len(requests),
        input_tokens_max=max(r.input_length for r in requests),
        output_tokens_mean=sum(r.output_length for r in requests) / len(requests),
        block_reuse=block_reuse(requests),
    )


def conversations(requests: Sequence[TraceRequest], min_shared: int = MIN_SHARED_BLOCKS) -> list[list[int]]:
    """Indices of ``requests`` grouped into conversations, each in order, ordered by their first request.

    A request continues the conversation of the earlier request it shares the longest prefix of hash ids
    with, when that prefix has at least ``min_shared`` blocks; otherwise it starts a conversation.
    """
    first_owner: dict[tuple[int, ...], int] = {}  # prefix -> first request that had it
    conv_of: list[int] = []
    groups: dict[int, list[int]] = {}
    for i, req in enumerate(requests):
        ids = req.hash_ids
        conv = i
        for k in range(len(ids), min_shared - 1, -1):
            owner = first_owner.get(ids[:k])
            if owner is not None:
                conv = conv_of[owner]
                break
        conv_of.append(conv)
        groups.setdefault(conv, []).append(i)
        for k in range(1, len(ids) + 1):
            first_owner.setdefault(ids[:k], i)
    return list(groups.values())  # dicts keep insertion order: by first request


def _select_conversations(scaled: Sequence[TraceRequest], opts: SliceOptions) -> list[TraceRequest]:
    start_ms = opts.window * opts.window_s * 1000.0
    end_ms = start_ms + opts.window_s * 1000.0
    window = [r for r in scaled if start_ms <= r.timestamp_ms < end_ms]
    kept = [g for g in conversations(window) if len(g) >= opts.min_turns][:: opts.sample_every]
    chosen: list[int] = []
    for group in kept[opts.skip:]:
        if opts.limit is not None and len(chosen) + len(group) > opts.limit:
            continue  # whole conversations only: one that no longer fits is left out
        chosen.extend(group)
    return [window[i] for i in sorted(chosen)]


def prepare_trace(requests: Sequence[TraceRequest], opts: SliceOptions) -> PreparedTrace:
    """Select, scale, filter, window, and restart the clock at 0.

    ``select="requests"``, in the order a user of the published method expects: every
    ``sample_every``-th request (on the original trace), then scaling, then dropping prompts over
    ``max_input_tokens``, then ``skip``/``limit`` (so ``limit`` is the number of requests actually sent).
    ``select="conversations"``: scaling and ``max_input_tokens`` first, then the window, then every
    ``sample_every``-th conversation of at least ``min_turns`` turns, whole; ``skip`` counts
    conversations and ``limit`` caps the requests (conversations in order, each kept only if it still fits). Then time is rebased and
    compressed.
    """
    if opts.select == "conversations":
        scaled = [scale_request(r, opts) for r in requests]
        if opts.max_input_tokens is not None:
            scaled = [r for r in scaled if r.input_length <= opts.max_input_tokens]
        window = _select_conversations(scaled, opts)
        what = (f"window {opts.window} ({opts.window_s:g} s), every {opts.sample_every} conversation(s) of "
                f">= {opts.min_turns} turns")
    else:
        sampled = [scale_request(r, opts) for r in requests[:: opts.sample_every]]
        if opts.max_input_tokens is not None:
            kept = [r for r in sampled if r.input_length <= opts.max_input_tokens]
            if len(kept) < len(sampled):
                log.info("dropped %d of %d sampled requests with prompts over %d tokens",
                         len(sampled) - len(kept), len(sampled), opts.max_input_tokens)
            sampled = kept
        end = None if opts.limit is None else opts.skip + opts.limit
        window = sampled[opts.skip : end]
        what = f"every {opts.sample_every} request(s), skip={opts.skip}, limit={opts.limit}"
    if not window:
        raise ValueError(f"no request left after sampling ({what}), max_input_tokens={opts.max_input_tokens} "
                         f"({len(requests)} requests in the trace)")
    t0 = window[0].timestamp_ms
    rebased = [replace(r, timestamp_ms=(r.timestamp_ms - t0) * opts.scale_time) for r in window]
    return PreparedTrace(rebased, opts.block_tokens, trace_stats(rebased))


# --- prompt text for word-level tokenizers ---------------------------------------------------------

def word_vocabulary(tokenizer_dir: str | os.PathLike[str]) -> list[str] | None:
    """The plain words of a word-level tokenizer (``tokenizer.json``), or None for any other kind.

    Special tokens (``added_tokens`` and those named in ``tokenizer_config.json``) are left out, so a
    prompt of N words is exactly N tokens.
    """
    tok_file = Path(tokenizer_dir) / "tokenizer.json"
    if not tok_file.is_file():
        return None
    data = json.loads(tok_file.read_text())
    model = data.get("model") or {}
    if model.get("type") != "WordLevel":
        return None
    special = {t["content"] for t in data.get("added_tokens") or [] if t.get("special")}
    cfg_file = Path(tokenizer_dir) / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = cfg.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                special.add(value)
    words = [w for w in model.get("vocab", {}) if w not in special and w.strip() == w and w]
    return words or None


def resolve_prompt_mode(mode: PromptMode, tokenizer_dir: str | os.PathLike[str] | None) -> PromptMode:
    """AUTO becomes TEXT for a local word-level tokenizer, HASH_IDS otherwise."""
    if mode is not PromptMode.AUTO:
        return mode
    if tokenizer_dir is not None and word_vocabulary(tokenizer_dir) is not None:
        return PromptMode.TEXT
    return PromptMode.HASH_IDS


class BlockText:
    """Deterministic words for each hash id: the same id gives the same words in every request and run."""

    def __init__(self, vocab: Sequence[str], block_tokens: int, seed: int) -> None:
        if not vocab:
            raise ValueError("empty vocabulary")
        self._vocab = list(vocab)
        self._block_tokens = block_tokens
        self._seed = seed
        self._cache: dict[int, list[str]] = {}

    def block(self, hash_id: int) -> list[str]:
        words = self._cache.get(hash_id)
        if words is None:
            # A str seed is hashed with SHA-512 by random.seed: stable across processes and runs.
            rng = random.Random(f"{self._seed}:{hash_id}")
            words = rng.choices(self._vocab, k=self._block_tokens)
            self._cache[hash_id] = words
        return words

    def prompt(self, req: TraceRequest) -> str:
        """``req.input_length`` words: whole blocks for all hash ids, the last one possibly cut short."""
        words: list[str] = []
        for h in req.hash_ids:
            words.extend(self.block(h))
        if len(words) < req.input_length:  # no hash ids, or fewer than the prompt needs: fresh words
            rng = random.Random(f"{self._seed}:tail:{req.timestamp_ms}:{req.input_length}")
            words.extend(rng.choices(self._vocab, k=req.input_length - len(words)))
        return " ".join(words[: req.input_length])


# --- writing -------------------------------------------------------------------------------------

def aiperf_records(prepared: PreparedTrace, mode: PromptMode, *, vocab: Sequence[str] | None = None,
                   seed: int = 100) -> list[dict[str, object]]:
    """The prepared requests as aiperf ``mooncake_trace`` records (``mode`` must be resolved)."""
    if mode is PromptMode.AUTO:
        raise ValueError("resolve the prompt mode first (resolve_prompt_mode)")
    records: list[dict[str, object]] = []
    if mode is PromptMode.HASH_IDS:
        for r in prepared.requests:
            records.append({"timestamp": round(r.timestamp_ms), "input_length": r.input_length,
                            "output_length": r.output_length, "hash_ids": list(r.hash_ids)})
        return records
    if not vocab:
        raise ValueError("prompt mode 'text' needs a word vocabulary (a word-level tokenizer)")
    text = BlockText(vocab, prepared.block_tokens, seed)
    for r in prepared.requests:
        records.append({"timestamp": round(r.timestamp_ms), "text_input": text.prompt(r),
                        "output_length": r.output_length})
    return records


def write_aiperf_trace(path: str | os.PathLike[str], prepared: PreparedTrace, mode: PromptMode, *,
                       vocab: Sequence[str] | None = None, seed: int = 100) -> Path:
    """Write the aiperf ``mooncake_trace`` jsonl; return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for record in aiperf_records(prepared, mode, vocab=vocab, seed=seed):
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")
    return path


def parse_fraction(text: str) -> float:
    """``"0.25"`` or ``"1/16"`` as a float (argparse type for the scale options)."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a number or fraction: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number, got {text!r}")
    return value
