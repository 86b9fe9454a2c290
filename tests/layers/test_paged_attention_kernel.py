"""CPU paged-attention kernels (common/layers/paged_attention_cpu.py) against their torch reference, and the
reference against the gather + SDPA path of common/layers/attention.py.

Caches are random and ragged: shuffled, non-contiguous block ids, unused blocks, block-table padding that is a
valid id, -1 or far out of range, and NaN in every slot no query may read (past a context, unused blocks), so a
kernel that reads one fails. Block sizes 16/32/256, GQA 1:1 to 8:1 (and 16:1), head_dim 32/48/64/80/128, contexts
1..4096 (few long, many short). fp32 within 1e-5, bf16 within 2e-2.
"""
import logging
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from common.layers import paged_attention_cpu as pa

BLOCK_SIZES = [16, 32, 256]
HEADS = [(4, 4), (9, 3), (8, 4), (12, 4), (8, 2), (6, 6), (8, 1), (12, 2), (16, 2), (16, 1)]  # (H, KVH)
HEAD_DIMS = [32, 64, 128, 48, 80]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
N_DECODE, N_PREFILL = 36, 30


@pytest.fixture(scope="module")
def kernel():
    if not pa.available():
        pytest.skip(f"paged attention C++ kernels unavailable: {pa.build_info().get('reason', 'unknown')}")


def make_cache(rng: random.Random, lens, bs, KVH, D, dtype, pad="valid", poison=True, gen=None):
    """A pool holding each sequence's lens[s] tokens in shuffled blocks; returns k_cache, v_cache, block_tables."""
    nbl = [-(-L // bs) for L in lens]
    total = sum(nbl) + rng.randint(1, 4)  # some unused blocks
    ids = list(range(total))
    rng.shuffle(ids)
    width = max(nbl) + rng.randint(0, 2)
    pad_value = {"valid": None, "neg": -1, "huge": 1 << 30}[pad]
    tables = torch.empty(len(lens), width, dtype=torch.int32)
    i = 0
    for s, c in enumerate(nbl):
        row = ids[i:i + c] + [pad_value if pad_value is not None else rng.randrange(total) for _ in range(width - c)]
        tables[s] = torch.tensor(row, dtype=torch.int32)
        i += c
    k_cache = torch.randn(total, bs, KVH, D, generator=gen)
    v_cache = torch.randn(total, bs, KVH, D, generator=gen)
    if poison:
        readable = torch.zeros(total, bs, dtype=torch.bool)
        for s, L in enumerate(lens):
            t = torch.arange(L)
            readable[tables[s, t // bs].long(), t % bs] = True
        k_cache[~readable] = float("nan")
        v_cache[~readable] = float("nan")
    return k_cache.to(dtype), v_cache.to(dtype), tables


def make_q(rng: random.Random, T, H, KVH, D, dtype, gen):
    """q, sometimes as the strided view a fused qkv projection hands over."""
    if rng.random() < 0.3:
        qkv = torch.randn(T, H + 2 * KVH, D, generator=gen).to(dtype)
        return qkv[:, :H]
    return torch.randn(T, H, D, generator=gen).to(dtype)


def case_shape(i):
    H, KVH = HEADS[i % len(HEADS)]
    return BLOCK_SIZES[i % 3], H, KVH, HEAD_DIMS[(i // 3) % len(HEAD_DIMS)]


def decode_lens(rng: random.Random, i):
    n = rng.randint(1, 8)
    lens = [rng.choice([1, 2, rng.randint(1, 64), rng.randint(1, 300), 16 * rng.randint(1, 8)]) for _ in range(n)]
    if i % 9 == 4:
        lens[0] = rng.randint(1500, 4096)  # a few long contexts
    return lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", range(N_DECODE))
def test_decode_matches_reference(kernel, case, dtype):
    rng = random.Random(1000 + case)
    gen = torch.Generator().manual_seed(case)
    bs, H, KVH, D = case_shape(case)
    lens = decode_lens(rng, case)
    k_cache, v_cache, tables = make_cache(rng, lens, bs, KVH, D, dtype, pad=["valid", "neg", "huge"][case % 3],
                                          gen=gen)
    q = make_q(rng, len(lens), H, KVH, D, dtype, gen)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    scale = D ** -0.5
    out = torch.ops.nano_pd.paged_attention_decode(q, k_cache, v_cache, tables, context_lens, scale)
    ref = pa.paged_attention_decode_ref(q, k_cache, v_cache, tables, context_lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", range(N_PREFILL))
def test_prefill_matches_reference(kernel, case, dtype):
    rng = random.Random(2000 + case)
    gen = torch.Generator().manual_seed(case)
    bs, H, KVH, D = case_shape(case + 1)
    S = rng.randint(1, 6)
    n_new = [rng.choice([1, rng.randint(2, 40), rng.randint(1, 200)]) for _ in range(S)]
    cached = [rng.choice([0, 0, rng.randint(1, 100), rng.randint(1, 600)]) for _ in range(S)]
    if case % 10 == 7:
        cached[0] = rng.randint(2000, 4096 - n_new[0])
    lens = [c + n for c, n in zip(cached, n_new)]
    k_cache, v_cache, tables = make_cache(rng, lens, bs, KVH, D, dtype, pad=["valid", "neg", "huge"][case % 3],
                                          gen=gen)
    q = make_q(rng, sum(n_new), H, KVH, D, dtype, gen)
    cu = torch.tensor([0] + [sum(n_new[:s + 1]) for s in range(S)], dtype=torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    scale = D ** -0.5
    out = torch.ops.nano_pd.paged_attention_prefill(q, k_cache, v_cache, tables, cu, context_lens, scale)
    ref = pa.paged_attention_prefill_ref(q, k_cache, v_cache, tables, cu, context_lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


# --- the reference keeps the semantics of the gather + SDPA path in common/layers/attention.py -----------------

def gather_sdpa_decode(q, k_cache, v_cache, tables, context_lens, scale):
    """PagedAttention.decode: gather whole block tables, mask positions >= context length, one SDPA."""
    n, H, D = q.shape
    KVH, bs = k_cache.shape[2], k_cache.shape[1]
    tables = tables.long()
    mask = (torch.arange(tables.shape[1] * bs)[None, :] < context_lens.long()[:, None]).view(n, 1, 1, -1)
    ctx_k = k_cache[tables].flatten(1, 2).transpose(1, 2)
    ctx_v = v_cache[tables].flatten(1, 2).transpose(1, 2)
    qd = q.reshape(n, KVH, H // KVH, D)
    return F.scaled_dot_product_attention(qd, ctx_k, ctx_v, attn_mask=mask, scale=scale).reshape(n, H, D)


def gather_sdpa_prefill(q, k_new, v_new, k_cache, v_cache, tables, cu, context_lens, scale):
    """PagedAttention.forward's prefill loop: causal SDPA over a chunk's own K/V when nothing is cached, else over
    the gathered context with a position mask."""
    out = torch.empty_like(q)
    bs = k_cache.shape[1]
    for s in range(len(context_lens)):
        a, b, ctx = int(cu[s]), int(cu[s + 1]), int(context_lens[s])
        n_new = b - a
        qp = q[a:b].transpose(0, 1).unsqueeze(0)
        if ctx == n_new:
            kp = k_new[a:b].transpose(0, 1).unsqueeze(0)
            vp = v_new[a:b].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            table = tables[s, :-(-ctx // bs)].long()
            kp = k_cache[table].flatten(0, 1)[:ctx].transpose(0, 1).unsqueeze(0)
            vp = v_cache[table].flatten(0, 1)[:ctx].transpose(0, 1).unsqueeze(0)
            mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - n_new, ctx)[:, None]
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out[a:b] = o.squeeze(0).transpose(0, 1)
    return out


@pytest.mark.parametrize("bs,H,KVH,D", [(16, 9, 3, 64), (32, 8, 8, 32), (256, 8, 1, 128)])
def test_reference_matches_gather_sdpa(bs, H, KVH, D):
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    scale = D ** -0.5
    # decode: ragged contexts; padding entries of the table are valid ids, as the engine's zero padding is
    lens = [1, 17, 200, 64, 513]
    k_cache, v_cache, tables = make_cache(rng, lens, bs, KVH, D, torch.float32, poison=False, gen=gen)
    q = torch.randn(len(lens), H, D, generator=gen)
    cl = torch.tensor(lens, dtype=torch.int32)
    expect = gather_sdpa_decode(q, k_cache, v_cache, tables, cl, scale)
    torch.testing.assert_close(pa.paged_attention_decode_ref(q, k_cache, v_cache, tables, cl, scale), expect,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pa.paged_attention_decode(q, k_cache, v_cache, tables, cl, scale), expect,
                               atol=1e-5, rtol=1e-5)
    # prefill: chunks with and without cached context; the chunks' own K/V are written into the cache first
    n_new, cached = [5, 128, 33, 1], [0, 0, 300, 40]
    lens = [c + n for c, n in zip(cached, n_new)]
    k_cache, v_cache, tables = make_cache(rng, lens, bs, KVH, D, torch.float32, poison=False, gen=gen)
    T = sum(n_new)
    q = torch.randn(T, H, D, generator=gen)
    k_new, v_new = torch.randn(T, KVH, D, generator=gen), torch.randn(T, KVH, D, generator=gen)
    slots = torch.cat([tables[s, torch.arange(c, c + n) // bs].long() * bs + torch.arange(c, c + n) % bs
                       for s, (c, n) in enumerate(zip(cached, n_new))])
    k_cache.view(-1, KVH, D).index_copy_(0, slots, k_new)
    v_cache.view(-1, KVH, D).index_copy_(0, slots, v_new)
    cu = torch.tensor([0, 5, 133, 166, 167], dtype=torch.int32)
    cl = torch.tensor(lens, dtype=torch.int32)
    expect = gather_sdpa_prefill(q, k_new, v_new, k_cache, v_cache, tables, cu, cl, scale)
    torch.testing.assert_close(pa.paged_attention_prefill_ref(q, k_cache, v_cache, tables, cu, cl, scale), expect,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pa.paged_attention_prefill(q, k_cache, v_cache, tables, cu, cl, scale), expect,
                               atol=1e-5, rtol=1e-5)


# --- behaviour ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_context_and_thread_counts(kernel, dtype):
    """Few (sequence, kv head) items split the context across threads; any thread count gives the same result."""
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(3)
    lens = [3001]
    k_cache, v_cache, tables = make_cache(rng, lens, 16, 1, 64, dtype, gen=gen)
    q = torch.randn(1, 8, 64, generator=gen).to(dtype)
    cl = torch.tensor(lens, dtype=torch.int32)
    ref = pa.paged_attention_decode_ref(q, k_cache, v_cache, tables, cl, 0.125).float()
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            out = pa.paged_attention_decode(q, k_cache, v_cache, tables, cl, 0.125)
            torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    finally:
        torch.set_num_threads(threads)


def test_int64_tables_and_zero_length(kernel):
    """The wrapper takes int64 tables/lengths (casts them); a zero-length context gives zeros."""
    rng = random.Random(4)
    gen = torch.Generator().manual_seed(4)
    lens = [0, 5, 40]
    k_cache, v_cache, tables = make_cache(rng, [max(L, 1) for L in lens], 16, 2, 32, torch.float32, gen=gen)
    q = torch.randn(3, 4, 32, generator=gen)
    out = pa.paged_attention_decode(q, k_cache, v_cache, tables.long(), torch.tensor(lens), 0.2)
    ref = pa.paged_attention_decode_ref(q, k_cache, v_cache, tables, torch.tensor(lens), 0.2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out[0].abs().max() == 0


def test_bad_block_id_raises(kernel):
    k_cache = torch.randn(4, 16, 2, 32)
    tables = torch.tensor([[0, 9]], dtype=torch.int32)  # block 9 does not exist and is needed (context 20)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.nano_pd.paged_attention_decode(torch.randn(1, 4, 32), k_cache, k_cache, tables,
                                                 torch.tensor([20], dtype=torch.int32), 0.1)


def test_fp16_falls_back_to_reference():
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, tables = make_cache(rng, [30, 7], 16, 2, 32, torch.float16, gen=gen)
    q = torch.randn(2, 4, 32, generator=gen).half()
    cl = torch.tensor([30, 7], dtype=torch.int32)
    out = pa.paged_attention_decode(q, k_cache, v_cache, tables, cl, 0.2)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, pa.paged_attention_decode_ref(q, k_cache, v_cache, tables, cl, 0.2))


def test_compiles_without_graph_breaks(kernel):
    rng = random.Random(6)
    gen = torch.Generator().manual_seed(6)
    k_cache, v_cache, tables = make_cache(rng, [40, 70], 16, 3, 64, torch.float32, gen=gen)
    cl = torch.tensor([40, 70], dtype=torch.int32)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    qd, qp = torch.randn(2, 9, 64, generator=gen), torch.randn(30, 9, 64, generator=gen)

    def step(qd, qp):
        d = pa.paged_attention_decode(qd, k_cache, v_cache, tables, cl, 0.125)
        p = pa.paged_attention_prefill(qp, k_cache, v_cache, tables, cu, cl, 0.125)
        return d * 2, p + 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(qd, qp), step(qd, qp)):
        torch.testing.assert_close(got, want)


def test_unavailable_build_logs_one_line_and_falls_back(tmp_path):
    """No compiler: available() is False after one warning, and the functions still answer (reference)."""
    code = (
        "import logging, torch\n"
        "logging.basicConfig(format='LOG %(name)s %(message)s')\n"
        "from common.layers import paged_attention_cpu as pa\n"
        "q = torch.randn(1, 2, 8); kc = torch.randn(2, 4, 1, 8)\n"
        "o = pa.paged_attention_decode(q, kc, kc, torch.tensor([[1]]), torch.tensor([3]), 0.3)\n"
        "r = pa.paged_attention_decode_ref(q, kc, kc, torch.tensor([[1]]), torch.tensor([3]), 0.3)\n"
        "assert torch.equal(o, r)\n"
        "print('available', pa.available())\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), NANO_PD_CACHE=str(tmp_path))
    env.pop("NANO_PD_PAGED_ATTENTION_ISA", None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "available False" in res.stdout
    logs = [ln for ln in res.stderr.splitlines() if ln.startswith("LOG ")]
    assert len(logs) == 1 and "no C++ compiler" in logs[0], res.stderr
