"""Fixtures of the end-to-end cluster tests: the tiny model they serve and the offline engine they are checked
against."""
from __future__ import annotations

import pytest

from tests.support.tiny_models import SERVING_TINY


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
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
