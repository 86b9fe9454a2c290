"""Tiny random-weight DeepseekV3ForCausalLM folders (MLA + grouped sigmoid MoE) for parity tests.

Same recipe as tests/tiny_models.py (seeded N(0, std) weights, norms near 1, the shared byte-level BPE tokenizer),
plus a random nonzero e_score_correction_bias: it is a buffer, not a parameter, and zeros would hide a router
that ignores it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tests.tiny_models import DEFAULT_INIT_STD, _init_weights, make_tokenizer


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
    from transformers import DeepseekV3ForCausalLM, GenerationConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(cfg.vocab_size)
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")]
    torch.manual_seed(cfg.seed)
    model = DeepseekV3ForCausalLM(_hf_config(cfg, *ids)).float().eval()
    _init_weights(model, cfg.init_std, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape, generator=g) * 0.5)
    model.generation_config = GenerationConfig(bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2])
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
