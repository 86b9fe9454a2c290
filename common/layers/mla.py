"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of compressed latents.

A token caches one vector per layer: its KV latent (after kv_a_layernorm, kv_lora_rank wide) followed by the roped
key it shares with every head (qk_rope_head_dim). kv_b_proj never expands the cache: its key half is folded into
the query and its value half is applied after attention ("absorbed" weights), so each head attends straight over
the latent vectors, as multi-query attention with a single kv head of kv_lora_rank + qk_rope_head_dim dims.
Prefill runs the same way as decode. It is exact (only the order of the sums changes) and reuses PagedAttention
for both: the one latent plane serves as keys and as values, and the value read-out keeps the latent part.
"""
import torch
from torch import nn

from common.layers.attention import AttentionMetadata, PagedAttention
from common.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from common.layers.norm import RMSNorm
from common.parallel.state import tp_size
from common.layers.rotary import RotaryEmbedding, rope_parameters, yarn_mscale

# transformers builds q_a_layernorm and kv_a_layernorm with its RMSNorm default, not config.rms_norm_eps
LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(config) -> float:
    """1/sqrt(qk head dim), times YaRN's mscale(factor, mscale_all_dim)^2 when the rope is scaled (as DeepSeek)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    if params["rope_type"] != "default" and params.get("mscale_all_dim"):
        scale *= yarn_mscale(params["factor"], params["mscale_all_dim"]) ** 2
    return scale


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): DeepSeek's rotary pairs are adjacent features; once
    regrouped, the rotate-half rotation gives exactly transformers' interleaved result (same layout out)."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class MLAttention(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding):
        super().__init__()
        heads = config.num_attention_heads
        self.num_heads = heads // tp_size()
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        bias = getattr(config, "attention_bias", False)
        self.q_lora = config.q_lora_rank is not None  # DeepSeek-V2-Lite projects q directly
        if not self.q_lora:
            self.q_proj = ColumnParallelLinear(config.hidden_size, heads * qk_dim)
        else:
            self.q_a_proj = ReplicatedLinear(config.hidden_size, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(config.q_lora_rank, heads * qk_dim)
        self.kv_a_proj_with_mqa = ReplicatedLinear(config.hidden_size, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(self.kv_rank, heads * (self.nope_dim + self.v_dim))
        self.kv_b_proj.prepack = False  # its weight is read directly (absorbed), never applied as a linear
        self.o_proj = RowParallelLinear(heads * self.v_dim, config.hidden_size, bias=bias)
        self.rotary = rotary
        self.interleaved = getattr(config, "rope_interleave", True)
        self.attn = PagedAttention(self.num_heads, 1, self.kv_rank + self.rope_dim, mla_softmax_scale(config))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_pe = q.view(-1, self.num_heads, self.nope_dim + self.rope_dim).split(
            [self.nope_dim, self.rope_dim], -1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], -1)
        k_pe = k_pe.unsqueeze(1)
        if self.interleaved:
            q_pe, k_pe = _deinterleave(q_pe), _deinterleave(k_pe)
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe)
        # per head: w_k [nope, rank] turns q_nope into a query over latents, w_v [v, rank] reads values out of them
        w_k, w_v = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank).split(
            [self.nope_dim, self.v_dim], 1)
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_k).transpose(0, 1)  # [tokens, heads, rank]
        query = torch.cat([q_latent, q_pe], -1)
        cached = torch.cat([self.kv_a_layernorm(latent).unsqueeze(1), k_pe], -1)  # [tokens, 1, rank + rope]
        o = self.attn(query, cached, cached, meta).view(-1, self.num_heads, self.kv_rank + self.rope_dim)
        out = torch.bmm(o[..., :self.kv_rank].transpose(0, 1), w_v.transpose(1, 2)).transpose(0, 1)
        return self.o_proj(out.flatten(1))
