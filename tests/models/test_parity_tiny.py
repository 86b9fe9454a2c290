"""Token-for-token greedy parity of our engine vs HF transformers on tiny random
Llama / Qwen3 models, across scheduling modes.

Configs cover, per architecture: GQA 1:1, 3:1 and 4:1; head_dim 32, 64 and 128;
tied and untied embeddings; hidden_size both == and != heads*head_dim.
Modes (see tests/support/hf_reference.py::mode_llm_kwargs): block_size 16, block_size
256, chunked prefill forced, preemption forced, prefix-cache hits.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.hf_reference import (
    MODES,
    check_outputs_against_hf,
    greedy_params,
    hf_greedy_batch,
    make_llm,
    run_mode_and_compare,
)
from tests.support.model_checks import prefill_logits
from tests.support.tiny_models import TinyConfig

MAX_NEW = 64
VOCAB = 512

CONFIGS = [
    # llama: 1:1/d32/untied, 3:1/d64/tied, 4:1/d128/untied (hidden 128 != 4*128), 4:1/d32/tied
    TinyConfig(arch="llama", num_heads=4, num_kv_heads=4, head_dim=32, hidden_size=128,
               tie_word_embeddings=False, vocab_size=VOCAB, seed=1),
    TinyConfig(arch="llama", num_heads=6, num_kv_heads=2, head_dim=64, hidden_size=192,
               tie_word_embeddings=True, vocab_size=VOCAB, seed=2),
    TinyConfig(arch="llama", num_heads=4, num_kv_heads=1, head_dim=128, hidden_size=128,
               tie_word_embeddings=False, vocab_size=VOCAB, seed=3),
    TinyConfig(arch="llama", num_heads=8, num_kv_heads=2, head_dim=32, hidden_size=256,
               tie_word_embeddings=True, vocab_size=VOCAB, seed=4),
    # qwen3: 1:1/d64/tied (hidden 128 != 4*64), 3:1/d32/untied, 4:1/d128/tied, 3:1/d128/untied
    TinyConfig(arch="qwen3", num_heads=4, num_kv_heads=4, head_dim=64, hidden_size=128,
               tie_word_embeddings=True, vocab_size=VOCAB, seed=5),
    TinyConfig(arch="qwen3", num_heads=6, num_kv_heads=2, head_dim=32, hidden_size=192,
               tie_word_embeddings=False, vocab_size=VOCAB, seed=6),
    TinyConfig(arch="qwen3", num_heads=8, num_kv_heads=2, head_dim=128, hidden_size=256,
               tie_word_embeddings=True, vocab_size=VOCAB, seed=7),
    TinyConfig(arch="qwen3", num_heads=3, num_kv_heads=1, head_dim=128, hidden_size=128,
               tie_word_embeddings=False, vocab_size=VOCAB, seed=8),
]

# 16 prompt lengths in 1..600, hitting block boundaries (15/16/17, 255/256/257 ...)
PROMPT_LENS = [1, 2, 7, 15, 16, 17, 33, 64, 100, 127, 200, 255, 256, 257, 411, 600]
# prefix mode: shared "system prompt" of 192 tokens (exactly 12 blocks of 16) + per-prompt
# suffix; suffix 0 = the system prompt alone (fully cached on repeat)
SYSTEM_LEN = 192
SUFFIX_LENS = [0, 1, 3, 8, 16, 24, 40, 57, 64, 100, 150, 200, 250, 301, 350, 408]


def make_prompts(vocab: int, seed: int, lens=PROMPT_LENS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lens), generator=g).tolist()  # mixed, not sorted
    return [torch.randint(0, vocab, (lens[i],), generator=g).tolist() for i in order]


def make_prefix_prompts(vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(10_000 + seed)
    system = torch.randint(0, vocab, (SYSTEM_LEN,), generator=g).tolist()
    return [system + torch.randint(0, vocab, (n,), generator=g).tolist() for n in SUFFIX_LENS]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.id)
def test_parity(cfg, mode, tiny_model_factory):
    d = tiny_model_factory(cfg)
    stats, ties = run_mode_and_compare(
        d, mode,
        prompts=make_prompts(cfg.vocab_size, cfg.seed),
        prefix_prompts=make_prefix_prompts(cfg.vocab_size, cfg.seed),
        max_new_tokens=MAX_NEW,
        check_logprobs_atol=2e-3,
    )
    if ties:
        print(f"accepted numerical ties (prompt, step): {ties}")


COUNTER_LENS = [5, 16, 32, 47, 100, 128, 250, 301]


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[4]], ids=lambda c: c.id)
def test_bf16_logits_match_hf(cfg, tiny_model_factory):
    """bfloat16 (what dtype=auto picks on a CPU with native bf16), every position, in two prefill chunks (the
    second reads the first back from the paged cache): our logits part from the float32 reference no further than
    transformers' own bfloat16 logits do, and stay far closer to those than either is to float32."""
    from transformers import AutoModelForCausalLM

    from common.engine.config import EngineConfig
    from common.engine.model_runner import ModelRunner

    d = tiny_model_factory(cfg)
    prompt = make_prompts(cfg.vocab_size, cfg.seed)[0] + make_prompts(cfg.vocab_size, cfg.seed + 1)[0]
    runner = ModelRunner(EngineConfig(model=str(d), dtype="bfloat16", block_size=16,
                                      num_kv_blocks=len(prompt) // 16 + 2))
    ours = prefill_logits(runner, prompt, [37, len(prompt)])
    with torch.inference_mode():
        ref = {dtype: AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()(torch.tensor([prompt])).logits[0]
               .float() for dtype in (torch.float32, torch.bfloat16)}
    assert ref[torch.float32].std() > 0.5, "degenerate tiny model"
    hf_error = (ref[torch.bfloat16] - ref[torch.float32]).abs()
    our_error = (ours - ref[torch.float32]).abs()
    assert our_error.max() <= 1.25 * hf_error.max() and our_error.mean() <= 1.1 * hf_error.mean()
    assert (ours - ref[torch.bfloat16]).abs().mean() <= 0.25 * hf_error.mean()


def _tail(n: int, bs: int) -> int:
    """Tokens that must be recomputed when the same prompt comes back: the last
    partial block, or a whole block when n is block-aligned (at least one token has
    to be computed to get logits, and engines recompute the last full block)."""
    r = n % bs
    return r if r else bs


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4]], ids=lambda c: c.id)
def test_prefix_cache_counters(cfg, tiny_model_factory):
    """Same 8 prompts twice on one LLM: the 2nd run computes only the uncached tails,
    and its outputs equal the 1st run's (and HF's)."""
    bs = 16
    d = tiny_model_factory(cfg)
    prompts = make_prompts(cfg.vocab_size, 100 + cfg.seed, lens=COUNTER_LENS)
    llm = make_llm(d, block_size=bs)
    params = greedy_params(MAX_NEW)
    s0 = llm.stats()
    out1 = llm.generate(prompts, params, use_tqdm=False)
    s1 = llm.stats()
    out2 = llm.generate(prompts, params, use_tqdm=False)
    s2 = llm.stats()

    total = sum(len(p) for p in prompts)
    computed1 = s1["num_prefill_tokens_computed"] - s0["num_prefill_tokens_computed"]
    assert computed1 == total, (
        f"first run should compute every prompt token once: {computed1} != {total} ({s1})"
    )
    computed2 = s2["num_prefill_tokens_computed"] - s1["num_prefill_tokens_computed"]
    bound = sum(_tail(len(p), bs) for p in prompts)
    assert 1 <= computed2 <= bound, (
        f"second run computed {computed2} prefill tokens; only the uncached tails "
        f"(<= {bound}) should be computed. stats before={s1} after={s2}"
    )
    hits = s2["prefix_cache_hit_tokens"] - s1["prefix_cache_hit_tokens"]
    assert hits >= total - bound, f"prefix hits {hits} < {total - bound}: {s2}"
    assert s2["num_preemptions"] == 0

    for j, (a, b) in enumerate(zip(out1, out2)):
        assert a["token_ids"] == b["token_ids"], f"prompt #{j} (len {len(prompts[j])}): rerun differs"
    check_outputs_against_hf(out1, prompts, hf_greedy_batch(d, prompts, MAX_NEW),
                             label="counter run1", check_logprobs_atol=2e-3)
