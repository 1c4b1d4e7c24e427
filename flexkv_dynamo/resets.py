"""In a Dynamo worker, a reset of vLLM's prefix cache also empties our tiers.

vLLM keeps two resets apart: ``reset_prefix_cache()`` drops its GPU prefix cache only, and
``reset_prefix_cache(reset_connector=True)`` also clears the KV connector's cache. The second one is for
"the KV computed so far must not be reused": vLLM's own ``pause_generation(clear_cache=True)`` uses it,
and so does Dynamo's ``clear_kv_blocks``. But Dynamo 1.6.1's other invalidations call the plain form:
``update_weights_from_disk``, ``update_weights_from_distributed``, ``flush_cache`` (what RL loops call
after changing weights) and LoRA hot-swaps. Block hashes do not change with weights, so our tiers would
then hand back KV computed under the old weights: wrong outputs, silently.

Every plain reset in a Dynamo vLLM worker is such an invalidation, so in the workers we launch (see
`flexkv_dynamo.dynamo_hook`) `AsyncLLM.reset_prefix_cache` defaults to ``reset_connector=True``. A caller
that passes ``reset_connector=False`` explicitly still gets the plain reset. Outside Dynamo (``vllm
serve``, ``LLM``) vLLM's own default stands: a plain reset keeps our tiers, which is what offloading
benchmarks rely on to measure hits from them.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

__all__ = ["reset_connector_with_prefix_cache"]


def reset_connector_with_prefix_cache() -> bool:
    """Make ``AsyncLLM.reset_prefix_cache()`` in this process also reset the KV connector (see the module
    docstring). Idempotent; returns False when vLLM's AsyncLLM is not importable."""
    try:
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError:
        return False
    original = AsyncLLM.reset_prefix_cache
    if getattr(original, "__flexkv_wrapped__", False):
        return True

    @functools.wraps(original)
    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = True) -> bool:
        return await original(self, reset_running_requests, reset_connector)

    reset_prefix_cache.__flexkv_wrapped__ = True  # type: ignore[attr-defined]
    AsyncLLM.reset_prefix_cache = reset_prefix_cache  # type: ignore[method-assign]
    log.info("Dynamo's prefix-cache resets (weight updates, LoRA hot-swaps, flush_cache) also clear FlexKV's "
             "tiers: their KV must not be reused")
    return True
