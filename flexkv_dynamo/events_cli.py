"""``flexkv events``: subscribe to a KV-event endpoint as Dynamo's relay does and print what arrives.

    python -m flexkv_dynamo.events_cli --endpoint tcp://127.0.0.1:5557 [--topic T] [--count N] [--json]

One line per event: sequence number, data-parallel rank, type, medium (and the tier Dynamo 1.6.1 files
it under), number of blocks, first block hash, parent hash, number of token ids. A ``note`` says when
Dynamo would ignore the event (unknown medium, too few token ids) or the whole batch (unknown type),
and a gap in sequence numbers is reported on stderr: those are the usual reasons a router does not see
a worker's cache.

Decoding is generic msgpack (tagged maps as vLLM >= 0.28 sends, and legacy arrays), so the tool starts
in a fraction of a second and does not need vLLM.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import zmq

from .kv_events import DYNAMO_EVENT_TYPES, DYNAMO_MEDIUM_TIERS, parse_seq

# Field order of legacy array-encoded events (after the type name), as vLLM's structs declare them.
_ARRAY_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


class EventLine(msgspec.Struct, omit_defaults=True):
    """One decoded event, as printed."""

    seq: int
    dp_rank: int | None
    type: str
    medium: str | None = None
    tier: str | None = None  # what Dynamo files it under: device / host / disk, or "dropped"
    blocks: int | None = None
    first_hash: int | None = None
    parent: int | None = None
    tokens: int | None = None
    block_size: int | None = None
    note: str | None = None


def _fields(raw: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(raw, dict):
        return str(raw.get("type", "?")), raw
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        names = _ARRAY_FIELDS.get(raw[0], ())
        return raw[0], dict(zip(names, raw[1:]))
    return "?", {}


def describe_batch(seq: int, payload: bytes) -> list[EventLine]:
    """Decode one batch payload (``[ts, events, dp_rank]``) into printable lines."""
    batch = msgspec.msgpack.decode(payload)
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        return [EventLine(seq=seq, dp_rank=None, type="?", note="not a KV event batch: Dynamo drops it")]
    dp_rank = batch[2] if len(batch) > 2 else None  # vLLM sends nil for "no rank"
    lines: list[EventLine] = []
    for raw in batch[1]:
        kind, f = _fields(raw)
        line = EventLine(seq=seq, dp_rank=dp_rank, type=kind)
        if kind in ("BlockStored", "BlockRemoved"):
            hashes = f.get("block_hashes") or []
            line.medium = f.get("medium")
            line.tier = DYNAMO_MEDIUM_TIERS.get(line.medium, "dropped")
            line.blocks = len(hashes)
            line.first_hash = hashes[0] if hashes and isinstance(hashes[0], int) else None
            named = [*hashes, f.get("parent_block_hash")]
            if any(h is not None and not isinstance(h, int) for h in named):
                line.note = "block hashes are bytes, not ints: Dynamo drops the whole batch"
            elif line.tier == "dropped":
                line.note = f"medium {line.medium!r} is unknown to Dynamo: event ignored"
        if kind == "BlockStored":
            parent = f.get("parent_block_hash")
            line.parent = parent if isinstance(parent, int) else None
            line.tokens = len(f.get("token_ids") or [])
            line.block_size = f.get("block_size")
            if line.note is None and line.block_size and line.tokens < (line.blocks or 0) * line.block_size:
                line.note = f"{line.tokens} token ids for {line.blocks} blocks: Dynamo indexes only the blocks they cover"
        if kind not in DYNAMO_EVENT_TYPES:
            line.note = "unknown event type: Dynamo drops the whole batch"
        lines.append(line)
    return lines


def format_line(line: EventLine) -> str:
    parts = [f"seq={line.seq}", f"dp={line.dp_rank}", line.type]
    if line.medium is not None or line.tier is not None:
        parts.append(f"medium={line.medium}({line.tier})")
    if line.blocks is not None:
        parts.append(f"blocks={line.blocks}")
    if line.first_hash is not None:
        parts.append(f"first={line.first_hash}")
    if line.type == "BlockStored":
        parts.append(f"parent={line.parent}")
        parts.append(f"tokens={line.tokens}")
    if line.note:
        parts.append(f"note: {line.note}")
    return " ".join(parts)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexkv events",
        description="Subscribe to a KV-event endpoint as Dynamo's relay does and print each event.",
    )
    p.add_argument("--endpoint", required=True, help="the publisher's endpoint, e.g. tcp://127.0.0.1:5557")
    p.add_argument(
        "--topic",
        default="",
        help='topic prefix to subscribe to (default "": every topic, as Dynamo subscribes)',
    )
    p.add_argument("--count", type=int, default=None, help="exit after printing this many events")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object per event")
    p.add_argument(
        "--bind",
        action="store_true",
        help="bind the endpoint instead of connecting (for a publisher that connects, e.g. tcp://HOST:P)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the subscriber; 0 when done (count reached, timeout without --count, Ctrl-C), 1 when
    --timeout expired before --count events arrived."""
    args = _parser().parse_args(argv)
    out = sys.stdout
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.setsockopt(zmq.SUBSCRIBE, args.topic.encode("utf-8"))
        (sock.bind if args.bind else sock.connect)(args.endpoint)
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        printed = 0
        last_seq: int | None = None
        while args.count is None or printed < args.count:
            wait_ms = 200 if deadline is None else int(min(200, (deadline - time.monotonic()) * 1000))
            if wait_ms <= 0:
                if args.count is not None:
                    sys.stderr.write(f"timeout: {printed} of {args.count} events from {args.endpoint}\n")
                    return 1
                return 0
            if not sock.poll(wait_ms):
                continue
            frames = sock.recv_multipart()
            if len(frames) != 3:
                sys.stderr.write(f"message of {len(frames)} frames (Dynamo expects 3): ignored\n")
                continue
            try:
                seq = parse_seq(frames[1])
                lines = describe_batch(seq, frames[2])
            except (ValueError, msgspec.DecodeError) as exc:
                sys.stderr.write(f"undecodable message: {exc}\n")
                continue
            if last_seq is not None and seq != last_seq + 1:
                sys.stderr.write(f"sequence gap: {last_seq} -> {seq}\n")
            last_seq = seq
            for line in lines:
                if args.count is not None and printed >= args.count:
                    break
                text = json.dumps(msgspec.to_builtins(line)) if args.json else format_line(line)
                out.write(text + "\n")
                out.flush()
                printed += 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
