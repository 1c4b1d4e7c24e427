"""What the cache needs from other nodes: a place to look blocks up and fetch their bytes from.

`TieredCache` knows nothing of Redis or Mooncake: distributed reuse (`flexkv_core.distributed`) plugs in
as a `RemoteSource`. Blocks another node serves are never announced to the router as ours until their
bytes have landed in our CPU tier (then they are ordinary CPU blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RemoteBlock:
    """What a fetch returns for a block besides its bytes: enough to index it locally."""

    parent_hash: int | None
    token_ids: bytes  # uint32 little-endian, block_size tokens
    checksum: int | None = None  # xxh3_64 of the slot bytes, when the fetch verified them


class RemoteSource(Protocol):
    def lookup(self, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of ``block_hashes`` peers can serve (from a local snapshot: no network)."""
        ...

    def fetch(self, block_hashes: Sequence[int], buffers: Sequence[memoryview]) -> Future[list[RemoteBlock | None]]:
        """Copy each block's slot bytes into ``buffers[i]`` (one CPU slot each); None where it failed.

        Must never hang: a dead peer or a lapsed lease resolves those blocks to None within its timeout.
        """
        ...
