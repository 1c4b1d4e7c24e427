"""Chained block hashes for engine-less use (benchmarks, a standalone service).

Inside vLLM the cache uses the engine's own block hashes, so that the GPU tier, our tiers and Dynamo's
router name a block the same way. Outside an engine we need a hash with the same property: block i's
hash depends on its tokens and on block i-1's hash, so equal hashes mean equal prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash


def tokens_to_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32, the packing Dynamo's router hashes too."""
    return np.asarray(token_ids, dtype="<u4").tobytes()


def chain_hashes(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Hashes of every *full* block of ``token_ids``; a trailing partial block is not hashed."""
    data = tokens_to_bytes(token_ids)
    step = block_size * 4
    out: list[int] = []
    prev = parent
    for start in range(0, len(data) - step + 1, step):
        h = xxhash.xxh3_64()
        h.update(((prev or 0) & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))
        h.update(data[start:start + step])
        prev = h.intdigest()
        out.append(prev)
    return out
