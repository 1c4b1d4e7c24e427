"""Our tiers' KV events as vLLM publishes them and Dynamo's KV router reads them.

The core (`flexkv_core.events`) says what each of our tiers holds; this module turns that into vLLM's own
event structs (`vllm.distributed.kv_events.BlockStored` / `BlockRemoved`), which ride vLLM's KV event
batches to Dynamo when the connector returns them from ``take_events()``, and it encodes batches
byte-for-byte as vLLM's ZMQ publisher does, for the standalone publisher (`flexkv_dynamo.publisher`).

What Dynamo 1.6.1's router does with these events decides every rule below (FIELD_NOTES §3-4):

* It keys each block by an XXH3 hash of the block's ``token_ids``, so a Stored event must carry every
  token of every block it announces, and ``block_size`` must be the engine's block size.
* It links blocks by the engine hash (``parent_block_hash``) and removes by it, so our events must use
  the very ints vLLM puts in its GPU events for the same blocks (`engine_hash_to_int`).
* The tier comes from ``medium``: we say ``CPU_PINNED`` for host memory and ``DISK`` for SSD. Media it
  does not know (``SSD``, lowercase ``cpu``) are dropped, and one event of an unknown *type* drops the
  whole batch, so we only ever emit ``BlockStored`` and ``BlockRemoved``.

Importing vLLM costs many seconds, so only `to_vllm_events` imports it, on first use (inside a vLLM
process it is already loaded). Everything else here needs only msgspec.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from flexkv_core import events as core_events
from flexkv_core.layout import Tier

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent

logger = logging.getLogger(__name__)

#: The medium vLLM's own block pool puts in its (GPU) events.
MEDIUM_GPU = "GPU"
#: Host memory. Dynamo counts it as "host_pinned" and credits it by --router-host-cache-hit-weight.
MEDIUM_CPU_PINNED = "CPU_PINNED"
#: Local SSD. Dynamo counts it as "disk" and credits it by --router-disk-cache-hit-weight.
MEDIUM_DISK = "DISK"

#: The medium each of our tiers is announced with. REMOTE is absent on purpose: blocks another node
#: holds are not local, and announcing them would make the router prefer this worker for them.
TIER_MEDIUM: Mapping[Tier, str] = {Tier.CPU: MEDIUM_CPU_PINNED, Tier.SSD: MEDIUM_DISK}

#: How Dynamo 1.6.1's router classifies ``medium`` (measured against the real router, FIELD_NOTES §4).
#: Any other value, "SSD" and lowercase "cpu" included, makes it drop the event.
DYNAMO_MEDIUM_TIERS: Mapping[str | None, str] = {
    None: "device", "GPU": "device",
    "CPU": "host", "CPU_PINNED": "host", "CPU_TIER1": "host",
    "DISK": "disk", "NVME": "disk", "CPU_TIER2": "disk", "STORAGE": "disk", "EXTERNAL": "disk",
}

#: The event types Dynamo 1.6.1 decodes; one event of any other type makes it drop the whole batch.
DYNAMO_EVENT_TYPES = frozenset({"BlockStored", "BlockRemoved", "AllBlocksCleared"})

_U64_MASK = (1 << 64) - 1
_SEQ_BYTES = 8
_encoder = msgspec.msgpack.Encoder()


def engine_hash_to_int(block_hash: bytes | int) -> int:
    """The int vLLM puts in its KV events for a block hash (``request.block_hashes[i]``).

    vLLM hashes blocks to bytes (sha256 by default) and, for events, keeps the low 64 bits read
    big-endian (`vllm.v1.core.kv_cache_utils.maybe_convert_block_hash`, with vLLM's default
    ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``). That function returns bytes when the variable is 0,
    and our core stores ints, so we do the conversion ourselves: the connector must name blocks in the
    core with exactly these ints, or our blocks will not chain onto vLLM's GPU blocks in the router.
    An int is returned unchanged (already converted).
    """
    if isinstance(block_hash, int):
        if not 0 <= block_hash <= _U64_MASK:
            raise ValueError(f"block hash {block_hash} is not an unsigned 64-bit int")
        return block_hash
    if isinstance(block_hash, (bytes, bytearray, memoryview)):
        return int.from_bytes(bytes(block_hash), byteorder="big") & _U64_MASK
    raise TypeError(f"block hash must be bytes or int, got {type(block_hash).__name__}: {block_hash!r}")


def engine_hashes_to_ints(block_hashes: Sequence[bytes | int]) -> list[int]:
    """`engine_hash_to_int` of each hash, about five times faster for long runs of vLLM's bytes hashes.

    An engine hashes every block with one function, so its hashes share one length (32 bytes for
    sha256): joined, they are an array of big-endian u64 words whose last word per hash is the int.
    Anything else (ints, mixed lengths, lengths not a multiple of 8) takes the per-hash path.
    """
    n = len(block_hashes)
    first = block_hashes[0] if n else None
    if n < 8 or not isinstance(first, bytes) or len(first) % 8:
        return [engine_hash_to_int(h) for h in block_hashes]
    try:
        joined = b"".join(block_hashes)  # TypeError if an int hides among them
    except TypeError:
        return [engine_hash_to_int(h) for h in block_hashes]
    words = len(first) // 8
    if len(joined) != n * len(first):  # not all of one length
        return [engine_hash_to_int(h) for h in block_hashes]
    return np.frombuffer(joined, dtype=">u8")[words - 1::words].tolist()


def check_int_block_hashes(env: Mapping[str, str] = os.environ) -> None:
    """Refuse ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``, under which nothing reaches Dynamo's router.

    With it vLLM publishes block hashes as raw bytes; Dynamo 1.6.1 cannot decode such a batch and drops
    it whole (GPU events included), and our int hashes could not chain onto them anyway.
    """
    raw = env.get("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1")
    try:
        enabled = bool(int(raw))
    except ValueError:
        raise ValueError(f"VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES={raw!r} is not an int (vLLM reads it as 0/1)") from None
    if not enabled:
        raise ValueError(
            "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0 makes vLLM publish block hashes as bytes, which Dynamo's "
            "KV router cannot decode (it drops every such batch): unset it or set it to 1"
        )


def tier_events_enabled(env: Mapping[str, str] = os.environ) -> bool:
    """Whether our tiers' events are published (``DYNAMO_USE_FLEXKV``; on unless "0"/"false"/"no"/"off")."""
    raw = env.get("DYNAMO_USE_FLEXKV", "")
    value = raw.strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"DYNAMO_USE_FLEXKV={raw!r} is not a boolean: use 1/true/yes/on or 0/false/no/off")


def to_vllm_events(events: Iterable[core_events.CacheEvent], *, block_size: int) -> list[KVCacheEvent]:
    """Map core events to vLLM's ``BlockStored`` / ``BlockRemoved``, in order, for the router.

    ``block_size`` is vLLM's block size (the worker's ``kv_block_size`` in Dynamo); every Stored event
    must be of that size and carry ``len(block_hashes) * block_size`` token ids, else ValueError: the
    router would silently index nothing for it. Events of the REMOTE tier, empty events and
    ``CacheCleared`` produce nothing (see below).
    """
    from vllm.distributed.kv_events import BlockRemoved, BlockStored

    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    out: list[KVCacheEvent] = []
    for event in events:
        if isinstance(event, core_events.CacheCleared):
            # Nothing to say: the cache emitted a Removed for every block the reset dropped, which
            # already empties our tiers in the router. vLLM's AllBlocksCleared is per worker, not per
            # medium: Dynamo would wipe this worker's GPU index too, which the reset did not touch.
            continue
        if not isinstance(event, (core_events.BlockStored, core_events.BlockRemoved)):
            raise TypeError(f"not a flexkv_core cache event: {event!r}")
        medium = TIER_MEDIUM.get(event.tier)
        if medium is None or not event.block_hashes:
            continue
        hashes = [engine_hash_to_int(h) for h in event.block_hashes]
        if isinstance(event, core_events.BlockStored):
            if event.block_size != block_size:
                raise ValueError(
                    f"BlockStored of tier {event.tier.value} has block_size {event.block_size}, "
                    f"but vLLM's block size is {block_size}"
                )
            if len(event.token_ids) != len(hashes) * block_size:
                raise ValueError(
                    f"BlockStored of tier {event.tier.value} for {len(hashes)} blocks of {block_size} "
                    f"tokens carries {len(event.token_ids)} token ids, expected {len(hashes) * block_size}"
                )
            parent = None if event.parent_block_hash is None else engine_hash_to_int(event.parent_block_hash)
            # lora_id / lora_name: the core does not track LoRA adapters; base-model blocks only.
            out.append(
                BlockStored(
                    block_hashes=hashes,
                    parent_block_hash=parent,
                    token_ids=list(event.token_ids),
                    block_size=block_size,
                    lora_id=None,
                    medium=medium,
                    lora_name=None,
                )
            )
        else:
            out.append(BlockRemoved(block_hashes=hashes, medium=medium))
    return out


def encode_event_batch(
    events: Sequence[msgspec.Struct], *, data_parallel_rank: int | None = 0, ts: float | None = None
) -> bytes:
    """The msgpack payload vLLM's ZMQ publisher sends: ``[ts, [tagged events...], data_parallel_rank]``.

    Byte-identical to encoding vLLM's ``KVEventBatch`` (an array-like struct: a None rank is sent as
    nil, not left out). vLLM's publisher always fills the rank in (0 without data parallelism), and so
    do we by default.
    """
    return _encoder.encode([time.time() if ts is None else ts, list(events), data_parallel_rank])


def event_frames(topic: str, seq: int, payload: bytes) -> list[bytes]:
    """The 3-frame ZMQ multipart message: topic, 8-byte big-endian sequence number, payload."""
    return [topic.encode("utf-8"), seq.to_bytes(_SEQ_BYTES, "big"), payload]


def parse_seq(frame: bytes) -> int:
    """The sequence number of a frame from `event_frames` (signed: vLLM's replay end marker is -1)."""
    if len(frame) != _SEQ_BYTES:
        raise ValueError(f"a sequence frame has {_SEQ_BYTES} bytes, got {len(frame)}: {frame!r}")
    return int.from_bytes(frame, "big", signed=True)
