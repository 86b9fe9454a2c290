"""Attention over the paged KV cache: C++ kernels on CPU, Triton kernels on CUDA, the torch path as the fallback.

New keys and values are written to their slots first, then every query attends through its block table. On CPU
(fp32/bf16) that is the C++ kernels of paged_attention_cpu.py, which read K/V where they lie in the pool: one call
for all decode queries and one for all prefill chunks of a step, with the inputs the runner prepared once per step
(AttentionMetadata.kernel). On CUDA the same two calls go to the Triton kernels of triton_paged_attention.py (same
inputs), imported only once a step runs on CUDA, so a CPU process never loads triton. Elsewhere, or without a kernel
for the tensors, the torch path: decode queries (one new token each) run as one batched gather + SDPA, with the
query heads of one KV head folded into the query-length dimension so grouped-query attention needs no repeated
K/V; prefill chunks run one sequence at a time: a chunk with no cached context uses its own fresh K/V with a
causal mask, otherwise it reads its whole context back from the blocks.

A decode-only batch run by a compiled step (`common/engine/compiled_step.py`) reaches the cache through one opaque custom
op per layer: the compiler then neither traces the scattered cache writes (a traced in-place write into a view of
the pool makes it copy the pool) nor specialises on the context length.
"""
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from common.layers import opaque_ops
from common.layers import paged_attention_cpu
from common.layers.paged_attention_cpu import use_kernel

log = logging.getLogger(__name__)


@dataclass
class PrefillChunk:
    start: int  # token range of this chunk in the flattened batch
    end: int
    context_len: int  # cached tokens + this chunk
    block_table: torch.Tensor | None  # None: no cached context, attend to the chunk's own K/V


@dataclass
class KernelInputs:
    """What the paged-attention kernels read, built once per step (int32, on the step's device)."""
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks]
    decode_context_lens: torch.Tensor | None  # [num_decode]: tokens each decode query sees, its own included
    prefill_block_tables: torch.Tensor | None  # [num_prefills, max_blocks]
    cu_seqlens_q: torch.Tensor | None  # [num_prefills + 1]: where each chunk's queries start in the prefill part
    prefill_context_lens: torch.Tensor | None  # [num_prefills]: cached tokens + the chunk's


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat slot of each new token
    num_decode: int = 0  # the first num_decode tokens are single-token queries
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks]
    decode_mask: torch.Tensor | None = None  # [num_decode, 1, 1, max_blocks * block_size], True = attend
    prefills: list[PrefillChunk] = field(default_factory=list)
    opaque: bool = False  # a compiled decode-only step: attend through the nano_pd::paged_decode op
    kernel: KernelInputs | None = None  # set where the paged-attention kernels may run (kernels_available)


_triton_kernels = None  # the Triton module once imported; False: triton is not importable


def _cuda_kernels():
    """triton_paged_attention, imported on first use (CUDA only: CPU processes never import triton), or None."""
    global _triton_kernels
    if _triton_kernels is None:
        try:
            from common.layers import triton_paged_attention
            _triton_kernels = triton_paged_attention
        except ImportError as e:
            log.warning("Triton paged-attention kernels unavailable (%s); using the torch path on CUDA", e)
            _triton_kernels = False
    return _triton_kernels or None


def kernels_available(device: torch.device) -> bool:
    """Whether a step on this device should build KernelInputs: the C++ kernels are built (CPU) or triton
    imports (CUDA)."""
    if device.type == "cpu":
        return paged_attention_cpu.available()
    return device.type == "cuda" and _cuda_kernels() is not None


def _kernels_for(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    """The kernel module that takes these tensors (both have the same two calls), or None for the torch path."""
    if use_kernel(q, k_cache, v_cache):
        return paged_attention_cpu
    if q.is_cuda:
        kernels = _cuda_kernels()
        if kernels is not None and kernels.supports(q, k_cache, v_cache):
            return kernels
    return None



class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        # [num_blocks, block_size, num_kv_heads, head_dim] views into the engine's one pool, set by the runner
        self.k_cache = self.v_cache = torch.empty(0)
        opaque_ops.register(self, "layer_key")  # the compiled step's op finds the layer's cache by it

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] -> [tokens, heads * head_dim]."""
        kin = meta.kernel
        tables, lens = (kin.decode_block_tables, kin.decode_context_lens) if kin is not None else (None, None)
        if meta.opaque:
            return torch.ops.nano_pd.paged_decode(q, k, v, self.layer_key, meta.slot_mapping,
                                                  meta.decode_block_tables, meta.decode_mask, tables, lens)
        self.write(k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.num_decode:
            n = meta.num_decode
            out[:n] = self.decode(q[:n], meta.decode_block_tables, meta.decode_mask, tables, lens).view(
                n, self.num_heads, -1)
        kernels = _kernels_for(q, self.k_cache, self.v_cache) if meta.prefills and kin is not None else None
        if kernels is not None:
            start = meta.prefills[0].start
            out[start:] = kernels.paged_attention_prefill(q[start:].contiguous(), self.k_cache, self.v_cache,
                                                          kin.prefill_block_tables, kin.cu_seqlens_q,
                                                          kin.prefill_context_lens, self.scale)
            return out.flatten(1)
        kc, vc = self.k_cache, self.v_cache
        for chunk in meta.prefills:
            qp = q[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)  # [1, heads, chunk, d]
            if chunk.block_table is None:
                kp = k[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)
                vp = v[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=self.scale, enable_gqa=True)
            else:
                ctx = chunk.context_len
                kp = kc[chunk.block_table].flatten(0, 1)[:ctx].transpose(0, 1).unsqueeze(0)
                vp = vc[chunk.block_table].flatten(0, 1)[:ctx].transpose(0, 1).unsqueeze(0)
                n_new = chunk.end - chunk.start
                # query i sits at position ctx - n_new + i and sees keys 0..that position
                mask = (torch.arange(ctx, device=q.device)[None, :]
                        <= torch.arange(ctx - n_new, ctx, device=q.device)[:, None])
                o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[chunk.start:chunk.end] = o.squeeze(0).transpose(0, 1)
        return out.flatten(1)

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor):
        self.k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, k)
        self.v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, v)

    def decode(self, q: torch.Tensor, block_tables: torch.Tensor, mask: torch.Tensor,
               kernel_tables: torch.Tensor | None = None, context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """One query token per sequence, all sequences in one kernel call (given the kernel's int32 tables and
        context lengths) or one SDPA: [n, heads, d] -> [n, heads * d]."""
        n = q.shape[0]
        kernels = _kernels_for(q, self.k_cache, self.v_cache) if context_lens is not None else None
        if kernels is not None:
            return kernels.paged_attention_decode(q.contiguous(), self.k_cache, self.v_cache, kernel_tables,
                                                  context_lens, self.scale).view(n, -1)
        # [n, blocks, block_size, kv_heads, d] -> [n, kv_heads, context, d]
        ctx_k = self.k_cache[block_tables].flatten(1, 2).transpose(1, 2)
        ctx_v = self.v_cache[block_tables].flatten(1, 2).transpose(1, 2)
        qd = q.view(n, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        o = F.scaled_dot_product_attention(qd, ctx_k, ctx_v, attn_mask=mask, scale=self.scale)
        return o.reshape(n, self.num_heads * self.head_dim)


def _paged_decode(q, k, v, layer_key, slot_mapping, block_tables, mask, kernel_tables, context_lens):
    layer = opaque_ops.lookup(layer_key)
    layer.write(k, v, slot_mapping)  # the cache, reached through the key, is not an input the compiler sees
    return layer.decode(q, block_tables, mask, kernel_tables, context_lens)


opaque_ops.define("paged_decode(Tensor q, Tensor k, Tensor v, Tensor layer_key, Tensor slot_mapping, "
                  "Tensor block_tables, Tensor mask, Tensor? kernel_tables, Tensor? context_lens) -> Tensor",
                  _paged_decode, lambda q, *_: q.new_empty(q.shape[0], q.shape[1] * q.shape[2]))
