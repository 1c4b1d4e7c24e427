"""A tiny random Llama and a word-level tokenizer, written to a directory at run time (no download).

Tests, benchmarks and the demo need a real vLLM engine, and an engine needs a model. This one is made
from a fixed seed in about a second, so every run gets the same weights, and vLLM's CPU backend accepts
it: head_dim 64 (16 is refused) and a vocabulary of plain words ``w0 w1 ...`` so that a prompt of N
words is exactly N tokens (a BOS token is prepended by the tokenizer). The text it writes is nonsense,
but greedy decoding is deterministic, which is all a cache test needs: the same prompt must produce the
same tokens whether its KV was computed or loaded.

``python -m flexkv_dynamo.tiny_model DIR`` writes one and prints the directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Marker file: a directory holding it with the same spec is reused as is.
_SPEC_FILE = "flexkv_tiny_model.json"


@dataclass(frozen=True)
class TinyModelSpec:
    """The shape of the model. The defaults start an engine quickly on two CPU cores."""

    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 2  # head_dim = hidden_size / num_heads = 64, which vLLM's CPU attention supports
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vocab_words: int = 2000  # w0 .. w1999, plus the special tokens
    max_positions: int = 8192
    dtype: str = "float32"  # exact and fast enough here; bfloat16 also works
    seed: int = 1234

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def words(n: int, *, start: int = 0, vocab_words: int | None = None) -> str:
    """A prompt of ``n`` distinct-looking words (``n`` tokens), starting at word ``start``.

    Different ``start`` values give different prompts; equal ones share a prefix.
    """
    vocab = vocab_words or TinyModelSpec().vocab_words
    return " ".join(f"w{(start + i * 7) % vocab}" for i in range(n))


#: Messages' contents joined by spaces: the word-level tokenizer then sees only known words.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def make_tiny_model(directory: str | os.PathLike[str], spec: TinyModelSpec | None = None) -> str:
    """Write the model (config.json, model.safetensors) and tokenizer into ``directory``; return it.

    Idempotent: a directory already holding a model of the same spec is left alone.
    """
    spec = spec or TinyModelSpec()
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    marker = os.path.join(directory, _SPEC_FILE)
    wanted = json.dumps({**spec.__dict__, "chat_template": CHAT_TEMPLATE}, sort_keys=True)
    if os.path.exists(marker):
        with open(marker) as fh:
            if fh.read() == wanted:
                return directory

    # Heavy imports only here: importing this module (tests, the demo's argument parsing) stays cheap.
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(spec.vocab_words):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=spec.max_positions)
    fast.chat_template = CHAT_TEMPLATE  # Dynamo's frontend serves chat only for models that have one
    fast.save_pretrained(directory)

    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        tie_word_embeddings=False,
        torch_dtype=spec.dtype,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    # Default init gives nearly uniform logits; a wider spread makes greedy choices far from ties, so a
    # rounding difference between two equivalent computations cannot flip a token.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model = model.to(getattr(torch, spec.dtype))
    model.save_pretrained(directory, safe_serialization=True)
    with open(marker, "w") as fh:
        fh.write(wanted)
    log.info("tiny model written to %s (%d layers, hidden %d, %d heads)", directory, spec.num_layers,
             spec.hidden_size, spec.num_heads)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexkv_dynamo.tiny_model",
                                     description="Write a tiny random Llama and its tokenizer to DIR.")
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.stdout.write(make_tiny_model(args.directory) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
