"""Trace replay through the real Dynamo KV router, with simulated workers and our real tiers (no model).

Operators size a KV cache before buying memory and SSDs; this replay answers "how much prefill would
tiers save on this trace, with this many workers, under Dynamo's router". Modules:

* `replay.trace`: Mooncake traces (load, keep every k-th request), synthetic tokens, engine hashes;
* `replay.synth`: synthetic Mooncake-format traces with controllable sharing;
* `replay.worker`: simulated workers (a GPU prefix cache each) and our real tiers per worker or per node
  (`flexkv_core.TieredCache`), and the KV events they publish, in three styles;
* `replay.peers`: the other nodes as a remote source (the ``distributed`` configurations);
* `replay.router`: N workers registered with a real Dynamo runtime, one relay each, one real KvRouter,
  and the router knobs (`RouterKnobs`, what our deployments ship: `SHIPPED_KNOBS`);
* `replay.runner`: the replay loop, configurations, the oracles;
* `replay.report`: tables and plots; `replay.sweep`: the router-knob sweep; `replay.options`: shared
  command-line options. The CLI is ``bench/trace_replay.py`` (``synth`` and ``sweep`` sub-commands).

Replay semantics
----------------

* **Requests** are replayed one at a time in timestamp order (optionally every k-th line of the file,
  ``--every``; 6 is the published method). No model runs, so wall-clock time does not matter; simulated
  time (below) only feeds the router's load view.
* **Tokens.** Hash id ``h`` stands for the 512 tokens ``h*512 .. h*512+511``, so equal ids give equal
  tokens; a prompt is its blocks' tokens cut to ``input_length``. The router hashes tokens itself
  (XXH3-64, seed 1337, of u32 little-endian tokens per block); the workers name blocks by engine hashes
  chained over the tokens (`flexkv_core.hashing.chain_hashes`), as vLLM names them by
  ``request.block_hashes``. Blocks are 512 tokens for the engine, our tiers and the router alike.
* **Routing** is the real router's decision: ``KvRouter.best_worker(tokens, request_id=...)`` applies
  Dynamo's cost (prefill tokens left after crediting cached blocks: device hits by the overlap credit,
  host hits by the host weight, disk hits by the disk weight, scaled by the prefill load scale, plus the
  decode load it tracks per worker; the knobs of ``dynamo.frontend``'s ``--router-*`` options, set in
  ``KvRouterConfig``). Nothing of the cost is reimplemented here. The request is booked on the chosen
  worker and reported with ``mark_prefill_complete`` / ``free`` at its simulated prefill end and finish:
  a worker prefills one request at a time in arrival order, each for its recomputed tokens at
  ``--prefill-tps``, then decodes for ``output_length * --tpot-ms``; the wait plus the prefill is the
  request's simulated time to first token. The router breaks cost ties at random (unseeded), so
  repeated runs differ slightly: ``--repeats``.
* **Nodes.** Without sharing (``upstream-events``, ``tier-aware``) each worker has its own tiers. With it
  (``shared-node*``, ``distributed*``) the workers of a node (``--workers-per-node`` consecutive ones)
  read one CPU pool and one SSD store of the node's summed capacity, and every one of them announces
  the node's tier events as its own: each worker's Stored and Removed balance per medium, and the router
  credits each of them with what it can load. ``distributed*`` also fetch, past a node's own prefix,
  what other nodes hold (`replay.peers`: their real export path, as Redis + Mooncake do in a
  deployment); the fetched blocks become the fetching node's CPU blocks, announced as such.
* **Serving.** The chosen worker serves the longest prefix its GPU cache holds, continues it from its
  tiers' CPU, then SSD (``TieredCache.lookup`` / ``prepare_load``, SSD blocks really read and staged
  into CPU slots, ``finish_load``), then other nodes (``distributed*``), and recomputes the rest. The block holding the prompt's last
  token is never reused (vLLM computes at least one token). Only prompt blocks are cached: the trace
  does not say what was generated.
* **Storing.** Every full block of the prompt then becomes cached on the worker's GPU (LRU of
  ``--gpu-blocks``, a chain made most recent tail first as vLLM frees it, evictions announced as GPU
  ``BlockRemoved``) and is stored into our tiers (``reserve_store`` / ``complete_store``; our cache writes
  CPU blocks through to SSD in the background and evicts by its policy). Engine bytes are not needed:
  a block is one 4 KiB slot of a tiny layout, its content irrelevant.
* **Events.** The worker publishes, in one batch: vLLM's GPU events (Removed, then Stored with tokens
  and parent) and our tiers' events, which differ by configuration: none (``no-offload``: no tiers);
  upstream FlexKV's style (``upstream-events``: own hashes, no parent, ``token_ids=[]``, medium
  "CPU"/"SSD"; Dynamo indexes none of it, so the router routes on GPU contents only while the workers
  still serve from their tiers); ours (``tier-aware``: `flexkv_dynamo.kv_events.to_vllm_events`,
  ``CPU_PINNED`` / ``DISK``, vLLM's hashes, full tokens). A probe closes each batch and the next
  request is routed only once the router has applied it (`replay.router`).
* **Outputs** per configuration: the fraction of prompt tokens served from GPU / CPU / SSD / another
  node and recomputed; the infinite oracle (a cache shared by all workers: every full block seen before
  is reusable, as a prefix); the pooled-capacity oracle (one LRU of all workers' GPU + CPU + SSD blocks
  together, kept like the GPU cache, serving every request: perfect routing, no duplication) and the
  ratio of reuse to it; the gap to the infinite oracle, split into *routing* loss (some worker could
  have loaded more of the prefix than the chosen one) and *capacity* loss (no worker could any more);
  load balance (the busiest worker's prefill over the mean) and the simulated time to first token.
"""
