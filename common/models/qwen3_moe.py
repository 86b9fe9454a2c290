"""Qwen3MoeForCausalLM: Qwen3 attention; a routed mixture of experts replaces the MLP on the sparse layers."""
import torch
from torch import nn

from common.layers.linear import ReplicatedLinear
from common.layers.moe import FusedMoE, select_experts
from common.models.llama import LlamaMLP
from common.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM


class Qwen3MoeSparseBlock(nn.Module):
    """Router gate + experts; softmax routing over all experts, top-k, optionally renormalised."""

    def __init__(self, config, intermediate_size: int):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts)
        self.experts = FusedMoE(config.num_experts, self.top_k, config.hidden_size, intermediate_size)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        weights, ids = select_experts(logits, self.top_k, "softmax", renormalize=self.config.norm_topk_prob)
        return weights.to(logits.dtype), ids  # transformers rounds the weights to the model dtype here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, *self.route(x))


def is_sparse_layer(config, layer_idx: int) -> bool:
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
            and (layer_idx + 1) % config.decoder_sparse_step == 0)


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        if is_sparse_layer(config, layer_idx):
            return Qwen3MoeSparseBlock(config, config.moe_intermediate_size)
        return LlamaMLP(config)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer
    # per-expert checkpoint projections -> the part of FusedMoE's stacks they fill
    expert_proj_names = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
