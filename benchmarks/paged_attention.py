"""Paged-attention micro-benchmark: one layer's attention over the paged KV cache, SmolLM2-like shapes (9 heads,
3 KV heads, head_dim 64, block size 16, shuffled block ids), timed three ways:

  gather+SDPA  the path in common/layers/attention.py (copied below, so this file runs on its own): decode gathers
               every sequence's context (k_cache[block_tables]) into one masked SDPA; prefill runs one SDPA per
               chunk (causal on the chunk's own K/V with no cached context, else over the gathered context)
  kernel       common/layers/paged_attention_cpu.py's C++ kernels (one call for the whole batch, no gather)
  reference    that module's pure-torch reference

Cases: decode at batch 1/8/64 with ~256 and ~1024 tokens of context; prefill of 64 x 128-token chunks with no
cached context and of 8 x 128-token chunks with 512 cached; fp32 and bf16; torch.set_num_threads(1) and (2).
Each time is the median of repeated calls after a warm-up; the kernel's result is checked against the reference.

    .venv/bin/python benchmarks/paged_attention.py [--threads 1 2] [--dtypes float32 bfloat16] [--min-time 0.3]
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common.layers import paged_attention_cpu as pa  # noqa: E402

H, KVH, D, BS = 9, 3, 64, 16
SCALE = D ** -0.5


def gather_sdpa_decode(q, k_cache, v_cache, block_tables, mask):
    """PagedAttention.decode of common/layers/attention.py."""
    n = q.shape[0]
    ctx_k = k_cache[block_tables].flatten(1, 2).transpose(1, 2)
    ctx_v = v_cache[block_tables].flatten(1, 2).transpose(1, 2)
    qd = q.view(n, KVH, H // KVH, D)
    o = F.scaled_dot_product_attention(qd, ctx_k, ctx_v, attn_mask=mask, scale=SCALE)
    return o.reshape(n, H * D)


def gather_sdpa_prefill(q, k, v, k_cache, v_cache, chunks):
    """The prefill loop of PagedAttention.forward in common/layers/attention.py; chunks: (start, end, ctx, table)."""
    out = torch.empty_like(q)
    for start, end, ctx, table in chunks:
        qp = q[start:end].transpose(0, 1).unsqueeze(0)
        if table is None:
            kp = k[start:end].transpose(0, 1).unsqueeze(0)
            vp = v[start:end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=SCALE, enable_gqa=True)
        else:
            kp = k_cache[table].flatten(0, 1)[:ctx].transpose(0, 1).unsqueeze(0)
            vp = v_cache[table].flatten(0, 1)[:ctx].transpose(0, 1).unsqueeze(0)
            n_new = end - start
            mask = (torch.arange(ctx)[None, :] <= torch.arange(ctx - n_new, ctx)[:, None])
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=SCALE, enable_gqa=True)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out.flatten(1)


def paged_cache(context_lens, dtype, gen):
    """A pool holding each sequence's context in shuffled blocks: k_cache, v_cache, block tables (int64)."""
    nbl = [-(-c // BS) for c in context_lens]
    total = sum(nbl)
    perm = torch.randperm(total, generator=gen)
    width = max(nbl)
    tables = torch.zeros(len(context_lens), width, dtype=torch.long)
    i = 0
    for s, c in enumerate(nbl):
        tables[s, :c] = perm[i:i + c]
        i += c
    k_cache = torch.randn(total, BS, KVH, D, generator=gen).to(dtype)
    v_cache = torch.randn(total, BS, KVH, D, generator=gen).to(dtype)
    return k_cache, v_cache, tables


def timeit(fn, min_time):
    fn()
    times, total = [], 0.0
    while len(times) < 5 or (total < min_time and len(times) < 200):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        times.append(dt)
        total += dt
    return statistics.median(times) * 1e3


def decode_case(batch, ctx, dtype, gen):
    # ragged around ctx: lengths spread over [0.75 ctx, 1.25 ctx]
    lens = torch.randint(int(ctx * 0.75), int(ctx * 1.25) + 1, (batch,), generator=gen).tolist()
    if batch == 1:
        lens = [ctx]
    k_cache, v_cache, tables = paged_cache(lens, dtype, gen)
    q = torch.randn(batch, H, D, generator=gen).to(dtype)
    context = torch.tensor(lens)
    mask = (torch.arange(tables.shape[1] * BS)[None, :] < context[:, None]).view(batch, 1, 1, -1)
    bt32, cl32 = tables.to(torch.int32), context.to(torch.int32)
    return (lambda: gather_sdpa_decode(q, k_cache, v_cache, tables, mask),
            lambda: pa.paged_attention_decode(q, k_cache, v_cache, bt32, cl32, SCALE).flatten(1),
            lambda: pa.paged_attention_decode_ref(q, k_cache, v_cache, bt32, cl32, SCALE).flatten(1))


def prefill_case(batch, n_new, cached, dtype, gen):
    lens = [cached + n_new] * batch
    k_cache, v_cache, tables = paged_cache(lens, dtype, gen)
    T = batch * n_new
    q = torch.randn(T, H, D, generator=gen).to(dtype)
    # the chunk's own K/V, as the model would hand them over; written into the cache like PagedAttention.write
    k = torch.randn(T, KVH, D, generator=gen).to(dtype)
    v = torch.randn(T, KVH, D, generator=gen).to(dtype)
    pos = torch.arange(cached, cached + n_new)
    slots = torch.cat([tables[s, pos // BS] * BS + pos % BS for s in range(batch)])
    k_cache.view(-1, KVH, D).index_copy_(0, slots, k)
    v_cache.view(-1, KVH, D).index_copy_(0, slots, v)
    chunks = [(s * n_new, (s + 1) * n_new, cached + n_new,
               tables[s, :-(-(cached + n_new) // BS)] if cached else None) for s in range(batch)]
    cu = torch.arange(0, T + 1, n_new, dtype=torch.int32)
    bt32, cl32 = tables.to(torch.int32), torch.tensor(lens, dtype=torch.int32)
    return (lambda: gather_sdpa_prefill(q, k, v, k_cache, v_cache, chunks),
            lambda: pa.paged_attention_prefill(q, k_cache, v_cache, bt32, cu, cl32, SCALE).flatten(1),
            lambda: pa.paged_attention_prefill_ref(q, k_cache, v_cache, bt32, cu, cl32, SCALE).flatten(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds of repeats per timing (at least 5)")
    args = ap.parse_args()

    t = time.perf_counter()
    ok = pa.available()
    info = pa.build_info()
    print(f"kernel: {'available' if ok else 'UNAVAILABLE (' + info.get('reason', '?') + ')'}, "
          f"isa {info.get('isa')}, {'built' if info.get('built') else 'loaded from cache'} in "
          f"{time.perf_counter() - t:.1f}s; torch {torch.__version__}; shapes H={H} KVH={KVH} D={D} block={BS}")
    cases = [(f"decode b={b} ctx~{c}", lambda dt, g, b=b, c=c: decode_case(b, c, dt, g))
             for c in (256, 1024) for b in (1, 8, 64)]
    cases += [("prefill 64x128 ctx=0", lambda dt, g: prefill_case(64, 128, 0, dt, g)),
              ("prefill 8x128 +512 cached", lambda dt, g: prefill_case(8, 128, 512, dt, g))]
    header = (f"| {'case':<26} | thr | dtype    | gather+SDPA ms | kernel ms | reference ms | kernel speedup "
              f"| max |kernel-ref| |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for name, make in cases:
                gen = torch.Generator().manual_seed(0)
                base, kern, ref = make(dtype, gen)
                err = (kern().float() - ref().float()).abs().max().item()
                tb, tk, tr = (timeit(f, args.min_time) for f in (base, kern, ref))
                print(f"| {name:<26} | {threads:>3} | {dtype_name:<8} | {tb:>14.3f} | {tk:>9.3f} | {tr:>12.3f} "
                      f"| {tb / tk:>13.2f}x | {err:>16.1e} |", flush=True)


if __name__ == "__main__":
    main()
