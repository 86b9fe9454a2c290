"""Tiny random-weight DeepseekV3ForCausalLM folders (MLA + grouped sigmoid MoE) for parity tests.

Same recipe as tests/support/tiny_models.py (seeded N(0, std) weights, norms near 1, the shared byte-level BPE tokenizer),
plus a random nonzero e_score_correction_bias: it is a buffer, not a parameter, and zeros would hide a router
that ignores it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from tests.support.tiny_models import DEFAULT_INIT_STD, _init_correction_bias, save_random_model


@dataclass(frozen=True)
class TinyDeepseekConfig:
    q_lora_rank: int | None = 48
    rope_interleave: bool = True
    # YaRN with mscale != mscale_all_dim: scales both cos/sin and the softmax (real V3 configs use 1.0 and 1.0)
    yarn: bool = True
    num_layers: int = 3
    first_k_dense_replace: int = 1
    hidden_size: int = 128
    num_heads: int = 4
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 24
    n_routed_experts: int = 8
    n_group: int = 4
    topk_group: int = 2
    num_experts_per_tok: int = 2
    vocab_size: int = 512
    seed: int = 0
    init_std: float = DEFAULT_INIT_STD

    @property
    def id(self) -> str:
        return (f"deepseek-q{self.q_lora_rank}-{'inter' if self.rope_interleave else 'half'}"
                f"-{'yarn' if self.yarn else 'rope'}-L{self.num_layers}d{self.first_k_dense_replace}")


def _hf_config(cfg: TinyDeepseekConfig, bos_id: int, eos_id: int, pad_id: int):
    from transformers import DeepseekV3Config

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if cfg.yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512,
                "beta_fast": 32, "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 1.0}
    return DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
        moe_intermediate_size=cfg.hidden_size // 2, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads, n_shared_experts=1,
        n_routed_experts=cfg.n_routed_experts, routed_scaling_factor=2.5, kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim, n_group=cfg.n_group, topk_group=cfg.topk_group,
        num_experts_per_tok=cfg.num_experts_per_tok, first_k_dense_replace=cfg.first_k_dense_replace,
        norm_topk_prob=True, max_position_embeddings=2048, initializer_range=cfg.init_std, rms_norm_eps=1e-6,
        rope_parameters=rope, rope_interleave=cfg.rope_interleave, tie_word_embeddings=False,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)


def make_tiny_deepseek(directory, cfg: TinyDeepseekConfig) -> Path:
    return save_random_model(directory, cfg.vocab_size, cfg.seed, cfg.init_std,
                             lambda bos, eos, pad: _hf_config(cfg, bos, eos, pad),
                             lambda model: _init_correction_bias(model, 0.5, cfg.seed))
