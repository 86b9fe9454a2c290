"""Tiny random-weight Qwen3NextForCausalLM folders (gated DeltaNet + gated attention + MoE with a shared expert).

Same recipe as tests/support/tiny_models.py (seeded N(0, std) matrices, the shared byte-level BPE tokenizer), except where
Qwen3-Next's parameters mean something else: its RMSNorms are zero-centred (weight + 1), so theirs are N(0, 0.1)
offsets; A_log follows transformers' own init, log U(0.01, 16), so heads range from keeping their state over
hundreds of tokens (A near 0.01) to forgetting it at once (A near 16), and dt_bias is 1 + N(0, 0.1).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tests.support.tiny_models import DEFAULT_INIT_STD, save_random_model


@dataclass(frozen=True)
class TinyQwen3NextConfig:
    num_layers: int = 4
    full_attention_interval: int = 4  # transformers' default pattern: three linear layers, then a full one
    mlp_only_layers: tuple = (1,)  # one dense MLP among the MoE layers
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4  # two value heads per key head, as the real model's 16 / 32
    linear_key_head_dim: int = 32
    linear_value_head_dim: int = 32
    conv_kernel: int = 4
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 64
    shared_expert_intermediate_size: int = 96
    vocab_size: int = 512
    seed: int = 0
    init_std: float = DEFAULT_INIT_STD

    @property
    def id(self) -> str:
        return f"qwen3next-L{self.num_layers}i{self.full_attention_interval}-e{self.num_experts}-s{self.seed}"


def _hf_config(cfg: TinyQwen3NextConfig, bos_id: int, eos_id: int, pad_id: int):
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size + 32,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, linear_conv_kernel_dim=cfg.conv_kernel, linear_key_head_dim=cfg.linear_key_head_dim,
        linear_value_head_dim=cfg.linear_value_head_dim, linear_num_key_heads=cfg.linear_num_key_heads,
        linear_num_value_heads=cfg.linear_num_value_heads, full_attention_interval=cfg.full_attention_interval,
        num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.moe_intermediate_size,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, decoder_sparse_step=1,
        mlp_only_layers=list(cfg.mlp_only_layers), norm_topk_prob=True, max_position_embeddings=2048,
        initializer_range=cfg.init_std, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)


def _init_qwen3_next(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.01, 16, generator=g).log())
            elif name.endswith("dt_bias"):
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("layernorm.weight") or name.endswith("_norm.weight") or name == "model.norm.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # zero-centred: the scale is 1 + weight


def make_tiny_qwen3_next(directory, cfg: TinyQwen3NextConfig) -> Path:
    return save_random_model(directory, cfg.vocab_size, cfg.seed, cfg.init_std,
                             lambda bos, eos, pad: _hf_config(cfg, bos, eos, pad),
                             lambda model: _init_qwen3_next(model, cfg.seed))
