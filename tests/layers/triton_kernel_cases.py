"""The Triton paged-attention kernels (common/layers/triton_paged_attention.py) against the torch reference of
paged_attention_cpu.py (itself checked against attention.py's gather + SDPA path in test_paged_attention_kernel.py),
and an engine whose attention runs them against the torch path.

Two ways to run: under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1; test_triton_paged_attention.py
runs this file so in a child process, since triton decorates its own helpers (tl.zeros, tl.max, ...) when it is
imported, interpreted only if the variable is set by then, and in the suite's process another test (inductor) has
usually imported triton already), or compiled on a CUDA device without the variable (benchmarks/gpu_check.py):
TRITON_INTERPRET=1 pytest tests/layers/triton_kernel_cases.py   |   pytest tests/layers/triton_kernel_cases.py

The caches are test_paged_attention_kernel.py's: shuffled block ids, unused blocks, padding entries that are valid
ids, -1 or far out of range, NaN in every slot no query may read. GQA 9:3, 4:1, 8:2 and 1:1; head_dim 64, 32 and
the unpadded widths 80 and 48 (the kernel masks the padding to a power of two); then eight shapes drawn at random
(13 per kernel and dtype: 52 cases in fp32 and bf16, 26 more in fp16). fp32 within 1e-5; bf16 within
2e-2 and fp16 within 5e-3 (under the interpreter bf16 products run on fp32 operands, see the module). Shapes are
small: the interpreter runs every program in numpy, one after another.
"""
import os
import random

import pytest
import torch

from common.layers import paged_attention_cpu as pa
from tests.layers.test_paged_attention_kernel import make_cache, make_q

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 from the start (test_triton_paged_attention.py sets it) or a CUDA device",
                allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
from common.layers import triton_paged_attention as tpa  # noqa: E402 - after the check above

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}
DTYPES = pytest.mark.parametrize("dtype", list(TOL), ids=["fp32", "bf16", "fp16"])
# (block size, heads, KV heads, head_dim): the named ones, then random draws (a fixed seed, so a failure reruns)
SHAPES = [(16, 9, 3, 64), (32, 4, 1, 64), (16, 8, 2, 80), (8, 6, 6, 48), (256, 4, 4, 32)]
_draw = random.Random(17)
for _ in range(8):
    _kv_heads = _draw.choice([1, 2, 3])
    SHAPES.append((_draw.choice([8, 16, 32]), _kv_heads * _draw.choice([1, 2, 3, 4]), _kv_heads,
                   _draw.choice([32, 48, 64, 80])))


@DTYPES
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_decode_matches_reference(case, dtype):
    rng = random.Random(100 + case)
    gen = torch.Generator().manual_seed(case)
    bs, H, KVH, D = SHAPES[case]
    # one token, block edges, a few blocks, one longer context
    lens = [1, bs, bs + 1, rng.randint(2, 3 * bs), rng.randint(100, 300)][:3 + case % 3]
    k_cache, v_cache, tables = make_cache(rng, lens, bs, KVH, D, dtype, pad=["valid", "neg", "huge"][case % 3],
                                          gen=gen)
    q = make_q(rng, len(lens), H, KVH, D, dtype, gen).to(DEVICE)
    k_cache, v_cache, tables = k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = D ** -0.5
    out = tpa.paged_attention_decode(q, k_cache, v_cache, tables, context_lens, scale)
    ref = pa.paged_attention_decode_ref(q, k_cache, v_cache, tables, context_lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@DTYPES
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_prefill_matches_reference(case, dtype):
    rng = random.Random(200 + case)
    gen = torch.Generator().manual_seed(case)
    bs, H, KVH, D = SHAPES[case]
    # chunks of one token and of several tiles, with no cached context, part of a block, several blocks
    n_new = [1, rng.randint(2, 9), rng.randint(20, 70)][:2 + case % 2]
    cached = [rng.choice([0, rng.randint(1, bs), rng.randint(bs, bs + 120)]) for _ in n_new]
    lens = [c + n for c, n in zip(cached, n_new)]
    k_cache, v_cache, tables = make_cache(rng, lens, bs, KVH, D, dtype, pad=["valid", "neg", "huge"][case % 3],
                                          gen=gen)
    q = make_q(rng, sum(n_new), H, KVH, D, dtype, gen).to(DEVICE)
    k_cache, v_cache, tables = k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE)
    cu = torch.tensor([0] + [sum(n_new[:s + 1]) for s in range(len(n_new))], dtype=torch.int32, device=DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = D ** -0.5
    out = tpa.paged_attention_prefill(q, k_cache, v_cache, tables, cu, context_lens, scale)
    ref = pa.paged_attention_prefill_ref(q, k_cache, v_cache, tables, cu, context_lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def test_supports_only_what_fits_a_tile():
    cache = torch.zeros(4, 16, 2, 64)
    assert tpa.supports(torch.zeros(3, 8, 64), cache, cache)
    assert not tpa.supports(torch.zeros(3, 8, 64, dtype=torch.bfloat16), cache, cache)  # dtypes differ
    wide = torch.zeros(4, 16, 1, 576)  # MLA's latent: one KV head, 576 wide
    assert not tpa.supports(torch.zeros(3, 16, 576), wide, wide)
    assert not tpa.supports(torch.zeros(3, 8, 128)[..., ::2], cache, cache)  # strided rows


def test_engine_through_triton_kernels_equals_torch_path(tiny_model_factory, monkeypatch):
    """Greedy tokens and logprobs of a tiny GQA model with chunked prefill beside running decodes and a prefix hit,
    attention through the Triton kernels (as attention.py routes a CUDA step) and through the torch path."""
    from collections import Counter

    from common import SamplingParams
    from common.engine import LLM
    from common.engine import model_runner
    from common.layers import attention
    from tests.support.tiny_models import TinyConfig

    model = str(tiny_model_factory(TinyConfig(num_heads=4, num_kv_heads=2, head_dim=32, num_layers=2)))
    prompts = [list(range(3, 40)), list(range(3, 30)) + [5, 9], [7] * 20]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    calls = Counter()
    for name in ("paged_attention_decode", "paged_attention_prefill"):
        def counted(*args, name=name, kernel=getattr(tpa, name)):
            calls[name] += 1
            return kernel(*args)
        monkeypatch.setattr(tpa, name, counted)

    def run(kernels):
        monkeypatch.setattr(attention, "_kernels_for", lambda q, k, v: kernels)
        monkeypatch.setattr(model_runner, "kernels_available", lambda device: kernels is not None)
        # a budget of 24 tokens chunks the prefills beside running decodes
        llm = LLM(model, dtype="float32", max_model_len=128, num_kv_blocks=32, block_size=16,
                  max_num_batched_tokens=24, decode_mode="eager", device=DEVICE)
        return llm.generate(prompts, params, use_tqdm=False), llm.engine.stats()

    (want, _), (got, stats) = run(None), run(tpa)
    assert calls["paged_attention_decode"] > 0 and calls["paged_attention_prefill"] > 0
    assert stats["prefix_cache_hit_tokens"] > 0
    for g, w in zip(got, want):
        assert g["token_ids"] == w["token_ids"]
        for lg, lw in zip(g["logprobs"], w["logprobs"]):
            assert lg.keys() == lw.keys() and all(abs(lg[t] - lw[t]) < 1e-4 for t in lw)
