"""Qwen3NextForCausalLM (Qwen3-Next-80B-A3B): a hybrid of gated DeltaNet linear attention (most layers, a
per-sequence recurrent state) and gated full attention (every full_attention_interval-th layer, the paged KV
cache), each followed by a softmax-routed MoE with a sigmoid-gated shared expert. Norms are zero-centred
(weight + 1) and the rotary covers a quarter of each head."""
import torch
from torch import nn

from common.layers.attention import AttentionMetadata, PagedAttention
from common.layers.gated_delta import GatedDeltaNet
from common.layers.linear import QKVParallelLinear, ReplicatedLinear
from common.layers.norm import ZeroCenteredRMSNorm
from common.layers.rotary import RotaryEmbedding
from common.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from common.models.qwen3_moe import Qwen3MoeSparseBlock, is_sparse_layer


class Qwen3NextAttention(LlamaAttention):
    """Qwen3 attention whose q_proj also yields, per head, a gate: the output is attention * sigmoid(gate)."""

    def __init__(self, config, rotary: RotaryEmbedding):
        super().__init__(config, rotary)
        # per head the checkpoint's q_proj rows are [query (head_dim), gate (head_dim)]: twice the query heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, 2 * config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.attention_bias)
        self.q_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        d, heads, kv_heads = self.head_dim, self.num_heads, self.num_kv_heads
        qg, k, v = self.qkv_proj(x).split([2 * heads * d, kv_heads * d, kv_heads * d], -1)
        q, gate = qg.view(-1, heads, 2 * d).chunk(2, -1)
        q, k = self.q_norm(q), self.k_norm(k.view(-1, kv_heads, d))
        q, k = self.rotary(positions, q, k)
        out = self.attn(q.contiguous(), k, v.view(-1, kv_heads, d), meta)
        return self.o_proj(out * torch.sigmoid(gate.reshape(out.shape)))


class Qwen3NextSparseBlock(Qwen3MoeSparseBlock):
    """Qwen3-MoE's routed experts plus a shared expert every token takes, scaled by sigmoid(shared_expert_gate)."""

    def __init__(self, config):
        super().__init__(config, config.moe_intermediate_size)
        self.shared_expert = LlamaMLP(config, config.shared_expert_intermediate_size)
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class Qwen3NextDecoderLayer(LlamaDecoderLayer):
    """Llama's residual block; its token mixer (kept under self_attn) is linear or full attention per layer_types."""

    def __init__(self, config, rotary: RotaryEmbedding, layer_idx: int = 0):
        nn.Module.__init__(self)
        linear = config.layer_types[layer_idx] == "linear_attention"
        self.self_attn = GatedDeltaNet(config) if linear else Qwen3NextAttention(config, rotary)
        self.mlp = (Qwen3NextSparseBlock(config) if is_sparse_layer(config, layer_idx)
                    else LlamaMLP(config))
        self.input_layernorm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3NextForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3NextDecoderLayer
    # a recurrent state cannot be shared by two sequences (prefix caching) nor rolled back (speculative decoding)
    has_recurrent_state = True
    renamed_modules = {"linear_attn": "self_attn"}
    expert_proj_names = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    def __init__(self, config):
        super().__init__(config)
        self.model.norm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers if not isinstance(layer.self_attn, GatedDeltaNet)]

    def state_layers(self) -> list[GatedDeltaNet]:
        return [layer.self_attn for layer in self.model.layers if isinstance(layer.self_attn, GatedDeltaNet)]
