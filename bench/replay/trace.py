"""Mooncake-format traces: loading, the published sampling (every k-th request), and synthetic tokens.

A Mooncake trace (FAST'25) is JSON lines, one request each::

    {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2, ...]}

``timestamp`` is the arrival in milliseconds; ``hash_ids`` names the prompt's 512-token blocks, the last one
usually partial (``len(hash_ids) == ceil(input_length / 512)``). The ids are prefix-chained: two requests
share a block id at position i only if they share the whole prefix up to it, so equal ids mean shareable KV.

The trace carries no text. For a router that hashes tokens we make them up, deterministically: block id
``h`` stands for the 512 tokens ``h * 512 + 0 .. h * 512 + 511``. Equal ids give equal tokens, different
ids give different tokens, and a request's tokens are its blocks' tokens cut to ``input_length``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flexkv_core.hashing import chain_hashes

log = logging.getLogger(__name__)

#: Tokens per hash id in Mooncake traces.
MOONCAKE_BLOCK_TOKENS = 512

#: Token ids at or above this value are never produced for a trace block; the replay's router probes
#: use them (`replay.router`), so a probe can never match a trace prompt.
PROBE_TOKEN_BASE = 0xFE00_0000


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace, as read (``line`` is its 0-based line in the file)."""

    line: int
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_trace(path: str | Path, *, every: int = 1, limit: int | None = None, offset: int = 0,
               block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> list[TraceRequest]:
    """Requests of a Mooncake trace in arrival order: every ``every``-th line from ``offset`` (offset,
    offset + k, ...), then at most ``limit`` of them. Keeping every 6th request is the published way to
    thin the conversation trace; other offsets give disjoint samples of it.

    Raises ValueError naming the file and line for a malformed record (missing key, hash_ids that do not
    cover ``input_length`` in blocks of ``block_tokens``, an id too large for the synthetic tokens).
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if not 0 <= offset < every:
        raise ValueError(f"offset must be in 0..every-1 ({every - 1}), got {offset}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    max_id = PROBE_TOKEN_BASE // block_tokens - 1
    requests: list[TraceRequest] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if line_no % every != offset or not line.strip():
                continue
            where = f"{path}:{line_no + 1}"
            try:
                rec = json.loads(line)
                req = TraceRequest(line_no, float(rec["timestamp"]), int(rec["input_length"]),
                                   int(rec["output_length"]), tuple(int(h) for h in rec["hash_ids"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{where}: not a Mooncake trace record ({type(exc).__name__}: {exc})") from None
            want = -(-req.input_length // block_tokens)
            if req.input_length < 1 or len(req.hash_ids) != want:
                raise ValueError(f"{where}: input_length {req.input_length} needs {want} hash_ids of "
                                 f"{block_tokens} tokens, got {len(req.hash_ids)}")
            bad = [h for h in req.hash_ids if not 0 <= h <= max_id]
            if bad:
                raise ValueError(f"{where}: hash id {bad[0]} outside 0..{max_id} (synthetic tokens must stay "
                                 f"below {PROBE_TOKEN_BASE:#x})")
            requests.append(req)
            if limit is not None and len(requests) >= limit:
                break
    requests.sort(key=lambda r: r.timestamp_ms)  # stable: equal timestamps keep file order
    log.info("loaded %d requests from %s (every %d from %d, limit %s)", len(requests), path, every, offset, limit)
    return requests


def block_tokens_of(hash_id: int, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> np.ndarray:
    """The synthetic tokens of one block id."""
    start = hash_id * block_tokens
    return np.arange(start, start + block_tokens, dtype=np.uint32)


def request_tokens(req: TraceRequest, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> np.ndarray:
    """The synthetic prompt of ``req``: its blocks' tokens, cut to ``input_length`` (uint32)."""
    ids = np.asarray(req.hash_ids, dtype=np.uint64)
    tokens = (ids[:, None] * block_tokens + np.arange(block_tokens, dtype=np.uint64)).astype(np.uint32)
    return tokens.reshape(-1)[: req.input_length]


def engine_block_hashes(tokens: Sequence[int] | np.ndarray, block_size: int = MOONCAKE_BLOCK_TOKENS) -> list[int]:
    """What an engine names the prompt's full blocks by: hashes chained over the tokens (parent first),
    so equal hashes mean equal prefixes. A trailing partial block has none."""
    return chain_hashes(tokens, block_size)


def reusable_blocks(input_length: int, block_size: int = MOONCAKE_BLOCK_TOKENS) -> int:
    """Full blocks an engine may serve from cache: vLLM computes at least the prompt's last token, so a
    prompt that is an exact multiple of the block size can reuse all but its last block."""
    return (input_length - 1) // block_size
