"""Shared pytest setup for the parity harness.

* torch threads: capped so HF and the engine don't oversubscribe small CI boxes
  (override with NANO_PD_TEST_THREADS).
* session fixtures: tiny model folders (built once per session under
  tmp_path_factory) and the converted SmolLM2 folder; HF references are cached
  for the session inside tests/support/hf_reference.py.
"""

from __future__ import annotations

import os

import pytest
import torch

_threads = int(os.environ.get("NANO_PD_TEST_THREADS", "0")) or max(1, min(os.cpu_count() or 1, 8))
torch.set_num_threads(_threads)
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
