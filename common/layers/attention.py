"""Attention over the paged KV cache (portable torch path; runs on CPU and GPU).

New keys and values are written to their slots first, then every query attends through its block table. Decode
queries (one new token each) run as one batched gather + SDPA, with the query heads of one KV head folded into
the query-length dimension so grouped-query attention needs no repeated K/V. Prefill chunks run one sequence at a
time: a chunk with no cached context uses its own fresh K/V with a causal mask, otherwise it reads its whole
context back from the blocks.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefillChunk:
    start: int  # token range of this chunk in the flattened batch
    end: int
    context_len: int  # cached tokens + this chunk
    block_table: torch.Tensor | None  # None: no cached context, attend to the chunk's own K/V


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat slot of each new token
    num_decode: int = 0  # the first num_decode tokens are single-token queries
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks]
    decode_mask: torch.Tensor | None = None  # [num_decode, 1, 1, max_blocks * block_size], True = attend
    prefills: list[PrefillChunk] = field(default_factory=list)


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        # [num_blocks, block_size, num_kv_heads, head_dim] views into the engine's one pool, set by the runner
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] -> [tokens, heads * head_dim]."""
        kc, vc = self.k_cache, self.v_cache
        flat_k, flat_v = kc.view(-1, self.num_kv_heads, self.head_dim), vc.view(-1, self.num_kv_heads, self.head_dim)
        flat_k.index_copy_(0, meta.slot_mapping, k)
        flat_v.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        group = self.num_heads // self.num_kv_heads
        if meta.num_decode:
            n = meta.num_decode
            # [n, blocks, block_size, kv_heads, d] -> [n, kv_heads, context, d]
            ctx_k = kc[meta.decode_block_tables].flatten(1, 2).transpose(1, 2)
            ctx_v = vc[meta.decode_block_tables].flatten(1, 2).transpose(1, 2)
            qd = q[:n].view(n, self.num_kv_heads, group, self.head_dim)
            o = F.scaled_dot_product_attention(qd, ctx_k, ctx_v, attn_mask=meta.decode_mask, scale=self.scale)
            out[:n] = o.reshape(n, self.num_heads, self.head_dim)
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
