"""Synthetic Mooncake-format traces with controllable sharing, to check that router settings generalise.

Tuning the router on one trace overfits it; the traces it must work on (other users' traffic) share more
between requests. This module writes traces in the same format (JSON lines of ``timestamp`` in ms,
``input_length``, ``output_length`` and ``hash_ids`` of prefix-chained 512-token blocks) from a small
model of where sharing comes from:

* **sessions** arrive as a Poisson process (``session_rate`` per second); each has a geometric number of
  turns (mean ``turns``) separated by exponential think times (mean ``think_s``). Turn k's prompt is the
  previous turn's prompt, its answer (``output`` tokens) and a new user message (``user`` tokens): the
  multi-turn sharing of chat and agent loops;
* every session starts with one of ``system_prompts`` shared system prompts (``system`` tokens), picked
  with Zipf popularity (exponent ``system_zipf``): the sharing of tool definitions and instructions;
* with probability ``doc_prob`` the session's first message attaches one of ``documents`` documents
  (``doc`` tokens, Zipf ``doc_zipf``): the sharing of popular documents (RAG, code bases).

Token ranges are uniform ``(low, high)``. Block ids are exact: a block's id is determined by its parent's
id and the content of its 512 tokens (which segments, which offsets), so two requests share an id at
position i exactly when they share the whole prefix up to it, as in Mooncake's traces.

`PRESETS` are four workloads whose infinite-cache reuse spans about 35 % to 75 % of prompt tokens (the
conversation trace has 16 %). ``bench/trace_replay.py synth --preset agent --seed 2 --out t.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .trace import MOONCAKE_BLOCK_TOKENS

Range = tuple[int, int]


@dataclass(frozen=True)
class SynthSpec:
    """One synthetic workload (see the module docstring for what each field models)."""

    requests: int = 2000
    session_rate: float = 0.25  # new sessions per second
    turns: float = 3.0  # mean turns per session (geometric, >= 1)
    think_s: float = 60.0  # mean seconds between a session's turns
    system_prompts: int = 8
    system: Range = (1000, 4000)
    system_zipf: float = 1.0
    documents: int = 100
    doc: Range = (2000, 8000)
    doc_zipf: float = 1.0
    doc_prob: float = 0.0
    user: Range = (100, 1500)
    output: Range = (100, 600)
    max_input: int = 64_000  # a session ends once its prompt would exceed this

    def __post_init__(self) -> None:
        if self.requests < 1 or self.session_rate <= 0 or self.turns < 1 or self.think_s < 0:
            raise ValueError(f"requests >= 1, session_rate > 0, turns >= 1 and think_s >= 0 needed: {self}")
        if self.system_prompts < 1 or self.documents < 1 or not 0 <= self.doc_prob <= 1:
            raise ValueError(f"system_prompts >= 1, documents >= 1 and doc_prob in [0, 1] needed: {self}")
        for name in ("system", "doc", "user", "output"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name} range must be 1 <= low <= high, got {(low, high)}")


#: Workloads with more sharing than the conversation trace, of different kinds.
PRESETS: dict[str, SynthSpec] = {
    # Multi-turn chats over short system prompts, users coming back minutes later: sharing within sessions,
    # across a long reuse distance.
    "chat": SynthSpec(session_rate=0.3, turns=5.0, think_s=600.0, system_prompts=16, system=(500, 2000),
                      user=(300, 4000), output=(200, 1000)),
    # Tool-using agents: big shared tool definitions, quick steps each adding a tool result.
    "agent": SynthSpec(session_rate=0.25, turns=6.0, think_s=20.0, system_prompts=20, system=(2000, 8000),
                       user=(500, 5000), output=(50, 400)),
    # Questions over a large corpus of documents of skewed popularity: little history, much shared text,
    # a working set larger than the cluster's cache.
    "rag": SynthSpec(session_rate=1.0, turns=1.5, think_s=60.0, system_prompts=4, system=(500, 1500),
                     documents=10000, doc=(2000, 10000), doc_zipf=0.7, doc_prob=0.9, user=(50, 400),
                     output=(100, 500)),
    # All of it at once.
    "mixed": SynthSpec(session_rate=0.5, turns=3.0, think_s=300.0, system_prompts=24, system=(500, 6000),
                       documents=3000, doc=(2000, 10000), doc_zipf=0.8, doc_prob=0.4, user=(200, 3000),
                       output=(50, 600)),
}


def _zipf_weights(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return w / w.sum()


class BlockNamer:
    """Gives each distinct (parent block, block content) an id: equal ids mean equal prefixes."""

    def __init__(self) -> None:
        self._ids: dict[tuple, int] = {}

    def name(self, segments: list[tuple[int, int]], block_tokens: int) -> list[int]:
        """Block ids of a prompt made of ``(segment id, length)`` pieces, the last block possibly partial."""
        ids: list[int] = []
        parent = -1
        content: list[tuple[int, int, int]] = []  # (segment, start, stop) pieces of the current block
        room = block_tokens
        for seg, length in segments:
            pos = 0
            while pos < length:
                take = min(room, length - pos)
                content.append((seg, pos, pos + take))
                pos += take
                room -= take
                if room == 0:
                    parent = self._id(parent, content)
                    ids.append(parent)
                    content, room = [], block_tokens
        if content:
            ids.append(self._id(parent, content))
        return ids

    def _id(self, parent: int, content: list[tuple[int, int, int]]) -> int:
        key = (parent, tuple(content))
        got = self._ids.get(key)
        if got is None:
            got = self._ids[key] = len(self._ids)
        return got


def generate(spec: SynthSpec, seed: int, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> Iterator[dict]:
    """The trace's records, in arrival order."""
    rng = np.random.default_rng(seed)
    segment_ids = iter(range(1, 1 << 62))
    systems = [(next(segment_ids), int(rng.integers(spec.system[0], spec.system[1] + 1)))
               for _ in range(spec.system_prompts)]
    docs = [(next(segment_ids), int(rng.integers(spec.doc[0], spec.doc[1] + 1))) for _ in range(spec.documents)]
    sys_w = _zipf_weights(spec.system_prompts, spec.system_zipf)
    doc_w = _zipf_weights(spec.documents, spec.doc_zipf)
    namer = BlockNamer()

    def length(r: Range) -> int:
        return int(rng.integers(r[0], r[1] + 1))

    # Turns waiting to be issued: (time s, order, session prompt so far, turns left).
    queue: list[tuple[float, int, list[tuple[int, int]], int]] = []
    order = 0
    next_session = 0.0
    emitted = 0
    while emitted < spec.requests:
        next_session_at = next_session
        if not queue or next_session_at <= queue[0][0]:
            prompt = [systems[rng.choice(spec.system_prompts, p=sys_w)]]
            if rng.random() < spec.doc_prob:
                prompt.append(docs[rng.choice(spec.documents, p=doc_w)])
            turns = int(rng.geometric(1.0 / spec.turns))
            heapq.heappush(queue, (next_session_at, order, prompt, turns))
            order += 1
            next_session += float(rng.exponential(1.0 / spec.session_rate))
            continue
        at, _, prompt, left = heapq.heappop(queue)
        prompt = [*prompt, (next(segment_ids), length(spec.user))]
        input_length = sum(n for _, n in prompt)
        if input_length > spec.max_input:
            continue  # the session outgrew its context: it ends
        output_length = length(spec.output)
        yield {"timestamp": int(round(at * 1000)), "input_length": input_length, "output_length": output_length,
               "hash_ids": namer.name(prompt, block_tokens)}
        emitted += 1
        if left > 1:
            following = [*prompt, (next(segment_ids), output_length)]
            heapq.heappush(queue, (at + float(rng.exponential(spec.think_s)), order, following, left - 1))
            order += 1


def write_trace(path: Path, spec: SynthSpec, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in generate(spec, seed):
            f.write(json.dumps(record) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trace_replay.py synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="mixed", help="workload (default mixed)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a SynthSpec field, e.g. --set requests=500 --set system=2000,6000 (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    args = ap.parse_args(argv)
    try:
        spec = with_overrides(PRESETS[args.preset], args.set)
    except ValueError as exc:
        print(f"trace_replay synth: {exc}", file=sys.stderr)
        return 2
    write_trace(args.out, spec, args.seed)
    print(f"wrote {spec.requests} requests ({args.preset}, seed {args.seed}) to {args.out}")
    return 0


def with_overrides(spec: SynthSpec, overrides: list[str]) -> SynthSpec:
    """``spec`` with ``FIELD=VALUE`` overrides (ranges as ``LOW,HIGH``); ValueError names a bad one."""
    fields = {f.name: f for f in dataclasses.fields(SynthSpec)}
    changes: dict = {}
    for item in overrides:
        name, eq, value = item.partition("=")
        if name not in fields or not eq:
            raise ValueError(f"{item!r} is not FIELD=VALUE with FIELD one of {', '.join(fields)}")
        current = getattr(spec, name)
        try:
            if isinstance(current, tuple):
                low, high = (int(v) for v in value.split(","))
                changes[name] = (low, high)
            else:
                changes[name] = type(current)(value)
        except ValueError:
            raise ValueError(f"{name}: cannot read {value!r} as {type(current).__name__}") from None
    return dataclasses.replace(spec, **changes)
