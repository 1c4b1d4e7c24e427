# Everyday commands. `make demo` and `make test` are the README's two commands; both set up first.
PY := .venv/bin/python
FAST := not slow and not engine and not servers and not dynamo

.PHONY: setup demo test test-fast lint bench gpu-check lock clean
setup:
	@bash scripts/setup.sh

# `python -m dynamo.vllm` imports torchvision for every model (through transformers' Qwen2-VL image processor)
# and the package index has no CPU build of it for our torch: on a machine without a working one, the demo's
# workers get the test harness's stand-in (tests/support.py) on PYTHONPATH. The product never ships it.
SHIM_DIR := $(or $(FLEXKV_CACHE_DIR),$(HOME)/.cache/flexkv-dynamo)/torchvision-stand-in
demo: setup
	PYTHONPATH="$$($(PY) tests/support.py torchvision-shim $(SHIM_DIR))" $(PY) -m flexkv_dynamo.demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "$(FAST)"

lint: setup
	$(PY) -m ruff check flexkv_core flexkv_dynamo tests bench deploy

bench: setup
	$(PY) bench/bench_index.py --blocks 1000000
	$(PY) bench/bench_cpu_tier.py
	$(PY) bench/bench_itl.py
	$(PY) bench/bench_ssd_tier.py
	$(PY) bench/bench_engine_wait.py

# On a machine with one NVIDIA GPU and a CUDA PyTorch (no vLLM, no network needed): see scripts/gpu_check.sh.
gpu-check:
	bash scripts/gpu_check.sh

lock:
	bash scripts/lock.sh

clean:
	rm -rf .venv .pytest_cache .hypothesis
