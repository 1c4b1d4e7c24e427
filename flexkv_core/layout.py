"""What a cached block *is*: its tier, its byte layout, and the identity that guards reuse.

Everything that changes the bytes of a block (model, dtype, block size, layout, TP size) is part of the
`CacheIdentity`; a cache written for one identity is never read for another (the SSD manifest and the
shared CPU pool both carry its fingerprint).
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass

import xxhash

#: O_DIRECT needs offsets, lengths and buffers aligned to the logical block size; 4 KiB covers every
#: device we meet, and it is also the page size, so page-aligned shared memory qualifies as a buffer.
ALIGN = 4096

_ITEMSIZE = {
    "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1, "int8": 1, "fp8": 1,
}


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


class Tier(enum.Enum):
    """The media our cache manages. The GPU tier belongs to the engine, not to us."""

    CPU = "cpu"
    SSD = "ssd"
    REMOTE = "remote"  # blocks another node holds (distributed reuse); never announced as local


@dataclass(frozen=True)
class KVLayout:
    """Bytes of one block, for one TP rank, and how a slot holds all ranks.

    A block of one rank is ``num_layers * kv_planes`` planes, each ``block_size * num_kv_heads *
    head_dim`` elements of ``dtype``. A slot (CPU or SSD) holds every rank's block side by side, each
    rank's part starting on an ``ALIGN`` boundary, so each TP worker copies only its own part and an
    SSD slot is one aligned O_DIRECT transfer.
    """

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    kv_planes: int = 2  # K and V; 1 for MLA-style latent caches
    tp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "kv_planes", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"KVLayout.dtype {self.dtype!r} is not one of {sorted(_ITEMSIZE)}")

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def num_planes(self) -> int:
        return self.num_layers * self.kv_planes

    @property
    def plane_bytes(self) -> int:
        """Bytes of one (layer, K-or-V) plane of one block on one rank."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def rank_bytes(self) -> int:
        return self.num_planes * self.plane_bytes

    @property
    def rank_stride(self) -> int:
        return align_up(self.rank_bytes)

    @property
    def slot_bytes(self) -> int:
        return self.rank_stride * self.tp_size

    def rank_offset(self, tp_rank: int) -> int:
        if not 0 <= tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {tp_rank} outside 0..{self.tp_size - 1}")
        return tp_rank * self.rank_stride


@dataclass(frozen=True)
class CacheIdentity:
    """Who may read a cached block: equal identities produce equal bytes for equal hashes."""

    model: str
    layout: KVLayout
    extra: str = ""  # anything else that changes bytes (quantisation, LoRA set, cache salt, ...)

    def fingerprint(self) -> str:
        canon = json.dumps({"model": self.model, "layout": asdict(self.layout), "extra": self.extra},
                           sort_keys=True)
        return xxhash.xxh3_64_hexdigest(canon.encode())

    def describe(self) -> str:
        lay = self.layout
        return (f"model={self.model} dtype={lay.dtype} block_size={lay.block_size} layers={lay.num_layers} "
                f"heads={lay.num_kv_heads} head_dim={lay.head_dim} planes={lay.kv_planes} tp={lay.tp_size}"
                + (f" extra={self.extra}" if self.extra else ""))
