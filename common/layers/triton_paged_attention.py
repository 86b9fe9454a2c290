"""Triton paged attention for CUDA: the CPU kernels' two calls (paged_attention_cpu.py), reading K/V where they lie.

    paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale) -> out
    paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale) -> out

Inputs and results as paged_attention_cpu.py's functions of the same names (k_cache, v_cache [num_blocks,
block_size, KVH, D]; int32 block tables and lengths; out [tokens, H, D] in q's dtype). fp32, bf16 and fp16.

Both are one kernel. A program takes one sequence, one KV head and a tile of its chunk's queries; the tile's rows
are (query token, query head of that KV head) pairs, so the query heads of one KV head share every K/V row it
loads (GQA). Keys are read token by token through the block table (any block size, no gather copy), softmax is
online (running max and sum), accumulation fp32. A decode query is a chunk of one token at position
context_len - 1. Prefill tiles are laid out for the longest possible chunk (all T tokens), and a tile past its
own chunk's end returns at once: that costs empty programs but no host read of the chunk lengths, which would
stall the stream once per layer.

This module imports triton; attention.py imports it only once a step runs on CUDA, so CPU processes never load
triton. The tests run it under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors; benchmarks/gpu_check.py
runs the same cases compiled on CUDA. UNVERIFIED on a GPU: tile sizes are first guesses, never tuned.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256  # wider heads (MLA's 576-wide latent) would need more registers than a tile has: torch path
MAX_GROUP = 64  # query heads per KV head one tile can hold
LOG2_E = 1.4426950408889634
_DOT_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Triton 3.9's interpreter multiplies bf16 tiles as their raw 16-bit integers (np.matmul on the storage), so
# interpreted bf16 dots take their operands widened to fp32: exact for bf16 values, and the accumulation is fp32 on
# a GPU too; only p is then not rounded to bf16 before the second product. Read at import, as triton's decorator
# reads it.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether these tensors fit the kernel (dtype, head width, group size, unit-stride rows)."""
    heads, head_dim = q.shape[1], q.shape[2]
    return (q.dtype in DTYPES and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and head_dim <= MAX_HEAD_DIM and heads // k_cache.shape[2] <= MAX_GROUP
            and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1)


@triton.jit
def _paged_attention_kernel(
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_q_ptr,
        scale_log2, stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh, stride_bt,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DECODE: tl.constexpr,
        DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(2)
    if DECODE:
        q_start = seq
        chunk_len = 1
    else:
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        chunk_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    TOKENS: tl.constexpr = BLOCK_M // GROUP_PAD  # query tokens a tile holds
    first = tl.program_id(1) * TOKENS
    if first >= chunk_len:
        return
    context_len = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    token = first + rows // GROUP_PAD  # index in the chunk
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (rows % GROUP_PAD < GROUP) & (token < chunk_len)
    q_pos = context_len - chunk_len + token  # sees keys 0..q_pos
    dim = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dim < HEAD_DIM
    q = tl.load(q_ptr + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + dim[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(DOT_TYPE)

    # a finite start, so a padding row (all scores -inf) gets exp2(-inf) = 0 weights rather than NaN
    row_max = tl.full([BLOCK_M], -1e30, tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    kv_end = tl.minimum(context_len, context_len - chunk_len + first + TOKENS)  # the tile's last query's keys
    table = block_tables_ptr + seq * stride_bt
    for start in range(0, kv_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_ok = pos < kv_end
        block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)  # no int32 overflow
        slot = pos % BLOCK_SIZE
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + block[:, None] * stride_kb + slot[:, None] * stride_kt + kv_head * stride_kh
                    + dim[None, :], mask=kv_mask, other=0.0).to(DOT_TYPE)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        scores = tl.where(row_ok[:, None] & pos_ok[None, :] & (pos[None, :] <= q_pos[:, None]), scores,
                          float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        p = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vt + kv_head * stride_vh
                    + dim[None, :], mask=kv_mask, other=0.0).to(DOT_TYPE)
        acc = acc * rescale[:, None] + tl.dot(p.to(DOT_TYPE), v, input_precision=DOT_PRECISION)
        row_max = new_max
    out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]  # no keys (context 0): zeros, as the reference
    tl.store(out_ptr + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + dim[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def _launch(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, decode: bool) -> torch.Tensor:
    tokens, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs 16 or more on every side
    wide = head_dim_pad > 128
    # decode: one token a tile, as few padding rows as tl.dot allows; prefill: several tokens a tile
    block_m = max(16, group_pad) if decode else max(32 if wide else 64, group_pad)
    block_n = 32 if wide else 64
    out = torch.empty(tokens, heads, head_dim, dtype=q.dtype, device=q.device)
    num_seqs = block_tables.shape[0]
    if num_seqs == 0 or tokens == 0:
        return out
    dot_type = tl.float32 if _INTERPRETED and q.dtype == torch.bfloat16 else _DOT_TYPES[q.dtype]
    tiles = 1 if decode else triton.cdiv(tokens, block_m // group_pad)
    _paged_attention_kernel[(num_seqs, tiles, kv_heads)](
        # decode reads no cu_seqlens_q; any int32 pointer stands in
        out, q, k_cache, v_cache, block_tables, context_lens, context_lens if decode else cu_seqlens_q,
        scale * LOG2_E, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, DECODE=decode, DOT_TYPE=dot_type,
        # fp32 must not be rounded to tf32 (the fp32 engine is the parity oracle's twin); bf16/fp16 ignore it
        DOT_PRECISION="ieee" if dot_type == tl.float32 else "tf32")
    return out


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence attending to its first context_lens cached tokens: [n, H, D] -> [n, H, D]."""
    return _launch(q, k_cache, v_cache, block_tables, context_lens, None, scale, decode=True)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Causal attention of all prefill chunks at once, keys read from the cache: [T, H, D] -> [T, H, D]."""
    return _launch(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, decode=False)
