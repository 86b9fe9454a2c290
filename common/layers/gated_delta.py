"""Gated DeltaNet linear attention (Qwen3-Next) over a per-sequence recurrent state.

A layer keeps, per sequence, the last kernel-1 inputs of its causal depthwise conv and a [v_heads, k_dim, v_dim]
delta-rule state, both float32 (transformers keeps the delta state in float32 whatever the model dtype; the conv
inputs are model-dtype values, so holding them in float32 and casting back is exact). Neither is paged: the runner
gives every KV block id one state slot and a running sequence uses the slot of its first block, which is its own
while prefix caching is off. A sequence whose tokens in this step start at position 0 starts from a zero state
(a new request, or one recomputed after preemption); any other step continues from its slot, so chunked prefill
and decode need nothing from the scheduler.

The two kernels follow transformers' torch fallbacks operation for operation: the chunked form (64-token chunks,
a unit-triangular solve per chunk) for prefill chunks, the token-by-token recurrence for single-token decodes.
"""
import torch
import torch.nn.functional as F
from torch import nn

from common.layers.attention import AttentionMetadata
from common.layers.linear import ReplicatedLinear
from common.layers.norm import GatedRMSNorm
from common.parallel.state import tp_size


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def chunk_gated_delta_rule(q, k, v, g, beta, state, chunk_size: int = 64):
    """One sequence's tokens. q, k: [T, H, dk] (already one per value head), v: [T, H, dv], g, beta: [T, H],
    state: [H, dk, dv] float32 -> (out [T, H, dv] float32, final state)."""
    q, k, v, beta, g = (x.transpose(0, 1).float() for x in (q, k, v, beta, g))
    q, k = l2norm(q), l2norm(k)
    q = q * q.shape[-1] ** -0.5
    length = q.shape[1]
    pad = (chunk_size - length % chunk_size) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = F.pad(beta, (0, pad)), F.pad(g, (0, pad))
    v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)
    heads = q.shape[0]
    q, k, k_beta, v_beta = (x.reshape(heads, -1, chunk_size, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    g = g.reshape(heads, -1, chunk_size)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    cum = g.cumsum(-1)
    pairwise = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * pairwise
    intra = (q @ k.transpose(-1, -2)) * pairwise
    decayed_k_beta = k_beta * cum.exp().unsqueeze(-1)
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(system, decayed_k_beta, upper=False, unitriangular=True)
    q = q * cum.exp().unsqueeze(-1)
    k = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]
    out = torch.zeros_like(new_values)
    for i in range(q.shape[1]):
        v_new = new_values[:, i] - k_cumdecay[:, i] @ state
        out[:, i] = q[:, i] @ state + intra[:, i] @ v_new
        state = state * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ v_new
    return out.reshape(heads, -1, out.shape[-1])[:, :length].transpose(0, 1), state


def recurrent_gated_delta_step(q, k, v, g, beta, state):
    """One token of each of N sequences. q, k: [N, H, dk], v: [N, H, dv], g, beta: [N, H], state: [N, H, dk, dv]
    float32 -> (out [N, H, dv] float32, new state)."""
    q, k, v, beta, g = (x.float() for x in (q, k, v, beta, g))
    q, k = l2norm(q), l2norm(k)
    q = q / q.shape[-1] ** 0.5
    state = state * g.exp()[..., None, None]
    kv_mem = (state * k.unsqueeze(-1)).sum(-2)
    delta = (v - kv_mem) * beta.unsqueeze(-1)
    state = state + k.unsqueeze(-1) * delta.unsqueeze(-2)
    return (state * q.unsqueeze(-1)).sum(-2), state


class GatedDeltaNet(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert tp_size() == 1, "Qwen3-Next's linear attention is not sharded for tensor parallelism yet"
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim, self.value_dim = self.num_k_heads * self.head_k_dim, self.num_v_heads * self.head_v_dim
        self.kernel = config.linear_conv_kernel_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj_qkvz = ReplicatedLinear(config.hidden_size, 2 * self.key_dim + 2 * self.value_dim)
        self.in_proj_ba = ReplicatedLinear(config.hidden_size, 2 * self.num_v_heads)
        # depthwise and causal; the weight is all that is used (the left context comes from the state)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.conv1d.weight.requires_grad_(False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads), requires_grad=False)
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = ReplicatedLinear(self.value_dim, config.hidden_size)
        # [slots, conv_dim, kernel - 1] and [slots, v_heads, k_dim, v_dim] views into the runner's state pool
        self.conv_state = self.delta_state = torch.empty(0)
        self.block_size = 0

    @property
    def state_numel(self) -> int:
        """float32 values one sequence's state takes in this layer."""
        return self.conv_dim * (self.kernel - 1) + self.num_v_heads * self.head_k_dim * self.head_v_dim

    def bind_state(self, slots: torch.Tensor, block_size: int):
        """slots: [num_slots, state_numel] float32, this layer's columns of the pool."""
        conv = self.conv_dim * (self.kernel - 1)
        self.conv_state = slots[:, :conv].unflatten(1, (self.conv_dim, self.kernel - 1))
        self.delta_state = slots[:, conv:].unflatten(1, (self.num_v_heads, self.head_k_dim, self.head_v_dim))
        self.block_size = block_size

    def _split(self, qkvz: torch.Tensor, ba: torch.Tensor):
        """The projections are grouped per key head ([q, k, v..., z...] and [b..., a...]); transformers' order."""
        groups = self.num_v_heads // self.num_k_heads
        qkvz = qkvz.view(-1, self.num_k_heads, 2 * self.head_k_dim + 2 * groups * self.head_v_dim)
        q, k, v, z = qkvz.split([self.head_k_dim, self.head_k_dim, groups * self.head_v_dim,
                                 groups * self.head_v_dim], -1)
        b, a = ba.view(-1, self.num_k_heads, 2 * groups).split([groups, groups], -1)
        mixed = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], -1)
        return mixed, z.reshape(-1, self.num_v_heads, self.head_v_dim), b.reshape(-1, self.num_v_heads), \
            a.reshape(-1, self.num_v_heads)

    def _conv(self, mixed: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mixed [N, conv_dim, n] after the N sequences' float32 conv states [N, conv_dim, kernel - 1]."""
        full = torch.cat([state.to(mixed.dtype), mixed], -1)
        weight = self.conv1d.weight
        out = F.silu(F.conv1d(full.to(weight.dtype), weight, groups=self.conv_dim)).to(mixed.dtype)
        return out, full[..., -(self.kernel - 1):]

    def _heads(self, conv_out: torch.Tensor):
        """[tokens, conv_dim] -> q, k [tokens, v_heads, k_dim] (each key head serving its group), v."""
        q, k, v = conv_out.split([self.key_dim, self.key_dim, self.value_dim], -1)
        groups = self.num_v_heads // self.num_k_heads
        q, k = (x.unflatten(-1, (self.num_k_heads, self.head_k_dim)).repeat_interleave(groups, 1) for x in (q, k))
        return q, k, v.unflatten(-1, (self.num_v_heads, self.head_v_dim))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        mixed, z, b, a = self._split(self.in_proj_qkvz(x), self.in_proj_ba(x))
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        core = torch.empty(x.shape[0], self.num_v_heads, self.head_v_dim, dtype=x.dtype, device=x.device)
        n = meta.num_decode
        if n:
            slots = meta.decode_block_tables[:, 0]
            fresh = (positions[:n] == 0).view(n, 1, 1)  # a one-token prompt is scheduled as a decode
            conv_state = self.conv_state[slots].masked_fill(fresh, 0)
            conv_out, conv_state = self._conv(mixed[:n].unsqueeze(-1), conv_state)
            q, k, v = self._heads(conv_out.squeeze(-1))
            delta_state = self.delta_state[slots].masked_fill(fresh.unsqueeze(-1), 0)
            out, delta_state = recurrent_gated_delta_step(q, k, v, g[:n], beta[:n], delta_state)
            core[:n] = out.to(x.dtype)
            self.conv_state.index_copy_(0, slots, conv_state.float())
            self.delta_state.index_copy_(0, slots, delta_state)
        for chunk in meta.prefills:
            s, e = chunk.start, chunk.end
            if chunk.block_table is None:  # the chunk starts the sequence
                slot = int(meta.slot_mapping[s]) // self.block_size
                conv_state = self.conv_state.new_zeros(self.conv_state.shape[1:])
                delta_state = self.delta_state.new_zeros(self.delta_state.shape[1:])
            else:
                slot = int(chunk.block_table[0])
                conv_state, delta_state = self.conv_state[slot], self.delta_state[slot]
            conv_out, conv_state = self._conv(mixed[s:e].T.unsqueeze(0), conv_state.unsqueeze(0))
            q, k, v = self._heads(conv_out.squeeze(0).T)
            out, delta_state = chunk_gated_delta_rule(q, k, v, g[s:e], beta[s:e], delta_state)
            core[s:e] = out.to(x.dtype)
            self.conv_state[slot] = conv_state[0]
            self.delta_state[slot] = delta_state
        core = self.norm(core.flatten(0, 1), z.flatten(0, 1)).view(x.shape[0], -1)
        return self.out_proj(core)
