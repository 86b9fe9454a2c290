"""Shared pytest setup for the parity harness.

* dtype=auto means float32 in every engine and worker the suite starts: the oracle (HF transformers) runs in
  float32, and on a CPU with native bf16 auto would pick bfloat16. Tests of bf16 name it.
* decode_mode=auto means eager: on a CPU auto compiles the decode step while each engine starts (seconds per
  engine, and the suite builds hundreds); the tests of compiled decoding name it.
* torch threads: capped so HF and the engine don't oversubscribe small CI boxes
  (override with NANO_PD_TEST_THREADS).
* session fixtures: tiny model folders (built once per session under
  tmp_path_factory) and the converted SmolLM2 folder; HF references are cached
  for the session inside tests/support/hf_reference.py.
* module fixtures of the end-to-end tests: the tiny model they serve (model_dir)
  and the offline engine they are checked against (offline).
"""

from __future__ import annotations

import os

import pytest
import torch

_threads = int(os.environ.get("NANO_PD_TEST_THREADS", "0")) or max(1, min(os.cpu_count() or 1, 8))
torch.set_num_threads(_threads)
os.environ.setdefault("NANO_PD_DTYPE", "float32")
os.environ.setdefault("NANO_PD_DECODE_MODE", "eager")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """``get(cfg: TinyConfig) -> Path``: builds each tiny model folder once per session."""
    from tests.support.tiny_models import make_tiny_model_from_config

    built: dict = {}

    def get(cfg):
        if cfg not in built:
            d = tmp_path_factory.mktemp(cfg.id)
            built[cfg] = make_tiny_model_from_config(d, cfg)
        return built[cfg]

    return get


@pytest.fixture(scope="session")
def hf_refs():
    """``refs(model_dir, prompts, max_new_tokens) -> [(ids, logits), ...]`` (session-cached)."""
    from tests.support.hf_reference import hf_greedy_batch

    return hf_greedy_batch


@pytest.fixture(scope="session")
def smollm2_dir():
    """HF safetensors folder converted from the bundled SmolLM2-135M-Instruct GGUF."""
    from common.models.gguf import default_gguf_path, gguf_to_hf_folder

    return gguf_to_hf_folder(default_gguf_path())


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    """The model the end-to-end cluster tests serve (tests.support.tiny_models.SERVING_TINY)."""
    from tests.support.tiny_models import SERVING_TINY

    return str(tiny_model_factory(SERVING_TINY))


@pytest.fixture(scope="module")
def offline(model_dir):
    """reference(prompts, max_tokens, ignore_eos) -> texts of the offline engine (colocated, greedy)."""
    from common import SamplingParams
    from common.engine import LLM

    llm = LLM(model_dir, num_kv_blocks=2048)
    cache = {}

    def reference(prompts: list[str], max_tokens: int, ignore_eos: bool = False) -> list[str]:
        key = (tuple(prompts), max_tokens, ignore_eos)
        if key not in cache:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
            cache[key] = [o["text"] for o in outs]
        return cache[key]

    return reference
