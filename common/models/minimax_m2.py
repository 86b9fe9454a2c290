"""MiniMaxM2ForCausalLM: a mixture of experts on every layer with sigmoid scores and a selection-only bias;
attention with RMSNorm over all of q's (and k's) heads at once and rotary on the first rotary_dim features."""
import torch
from torch import nn

from common.layers.moe import select_experts
from common.layers.norm import AllHeadsRMSNorm
from common.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from common.models.qwen3_moe import Qwen3MoeSparseBlock


class MiniMaxM2Attention(LlamaAttention):
    qk_norm = True

    def __init__(self, config, rotary):
        super().__init__(config, rotary)
        self.q_norm = AllHeadsRMSNorm(self.num_heads, self.head_dim, config.rms_norm_eps)
        self.k_norm = AllHeadsRMSNorm(self.num_kv_heads, self.head_dim, config.rms_norm_eps,
                                      replicas=self.qkv_proj.kv_replicas)


class MiniMaxM2SparseBlock(Qwen3MoeSparseBlock):
    def __init__(self, config):
        super().__init__(config, config.intermediate_size)
        # in the model dtype, as transformers keeps it (its rounding can change which experts win a near tie)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.num_experts), requires_grad=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return select_experts(self.gate(x), self.top_k, "sigmoid", renormalize=True,
                              correction_bias=self.e_score_correction_bias)


class MiniMaxM2DecoderLayer(LlamaDecoderLayer):
    attention_cls = MiniMaxM2Attention

    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        return MiniMaxM2SparseBlock(config)


class MiniMaxM2ForCausalLM(LlamaForCausalLM):
    layer_cls = MiniMaxM2DecoderLayer
    renamed_modules = {"block_sparse_moe": "mlp"}
    expert_proj_names = {"w1": "gate", "w3": "up", "w2": "down"}
