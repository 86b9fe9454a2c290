"""DeepseekV3ForCausalLM (DeepSeek-V3, R1): multi-head latent attention with a latent-only paged cache, and
sigmoid-routed MoE with grouped top-k and shared experts after the first first_k_dense_replace dense layers."""
import torch
import torch.nn.functional as F
from torch import nn

from common.cache_kinds import PAGED_LATENT
from common.layers.mla import MLAttention
from common.layers.moe import FusedMoE, select_experts
from common.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


class DeepseekV3MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gate = DeepseekV3Router(config)
        self.experts = FusedMoE(config.n_routed_experts, config.num_experts_per_tok, config.hidden_size,
                                config.moe_intermediate_size)
        self.shared_experts = (LlamaMLP(config, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        weights, ids = select_experts(self.gate(x), c.num_experts_per_tok, "sigmoid", renormalize=c.norm_topk_prob,
                                      correction_bias=self.gate.e_score_correction_bias, num_groups=c.n_group or 1,
                                      topk_groups=c.topk_group or 1, routed_scaling_factor=c.routed_scaling_factor)
        out = self.experts(x, weights, ids)
        return out if self.shared_experts is None else out + self.shared_experts(x)


class DeepseekV3Router(nn.Module):
    """Router logits in float32 whatever the model dtype, and the bias that steers expert choice (kept float32,
    as transformers keeps it)."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts, dtype=torch.float32),
                                                    requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class DeepseekV3DecoderLayer(LlamaDecoderLayer):
    attention_cls = MLAttention

    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        return LlamaMLP(config) if layer_idx < config.first_k_dense_replace else DeepseekV3MoE(config)


class DeepseekV3ForCausalLM(LlamaForCausalLM):
    layer_cls = DeepseekV3DecoderLayer
    kv_cache_kind = PAGED_LATENT
    packed_modules = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    expert_proj_names = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
