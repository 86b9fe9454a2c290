"""Mixture-of-experts: routing (`select_experts`) and the stacked expert weights that run it (`FusedMoE`).

Routing styles covered by `select_experts` (each checked against transformers' own router in the tests):

* Qwen3-MoE: softmax over the router logits, top-k, optionally renormalised (`norm_topk_prob`).
* MiniMax-M2: sigmoid scores; `e_score_correction_bias` is added only to choose the experts, the weights are the
  un-biased scores of the chosen experts, renormalised.
* DeepSeek-V3: as MiniMax-M2, plus grouped top-k (groups ranked by the sum of their two best biased scores, only
  the best `topk_groups` groups stay eligible) and a final `routed_scaling_factor`.

Scores are computed in float32 whatever the logits' dtype (as transformers does); the returned weights are
float32, and a model whose reference casts them back (Qwen3-MoE) does so itself.

`FusedMoE` holds every local expert's gate+up projection in one `w13` [E_local, 2I, H] and its down projection
in `w2` [E_local, H, I]. A step sorts its (token, expert) pairs by expert, gathers the rows once, runs each active
expert once on its contiguous slice, puts the weighted results back in (token, slot) order and sums each token's
top_k slots.
Under tensor parallelism the intermediate dimension is split across the ranks (output all-reduced, like
`RowParallelLinear`); under expert parallelism each rank holds `local_experts`, a contiguous range of whole experts:
pairs routed to other ranks' experts are skipped here and summed in by the same reduction.
"""
import re

import torch
import torch.nn.functional as F
from torch import nn

from common.parallel.state import all_reduce, expert_parallel, tp_rank, tp_size


def select_experts(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = False,
                   correction_bias: torch.Tensor | None = None, num_groups: int = 1, topk_groups: int = 1,
                   routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [tokens, experts] -> (topk_weights float32 [tokens, top_k], topk_ids int64 [tokens, top_k])."""
    logits = router_logits.float()
    if scoring == "softmax":
        scores = logits.softmax(-1)
    elif scoring == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"unknown MoE scoring function {scoring!r}")
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if num_groups > 1:
        tokens, experts = choice.shape
        grouped = choice.view(tokens, num_groups, experts // num_groups)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        kept = group_scores.topk(topk_groups, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(tokens, experts)
    topk_ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, topk_ids)
    if renormalize:
        # the epsilon is DeepSeek-V3's; for any non-vanishing sum it does not change the float32 result
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, topk_ids


# per-expert checkpoint tensors: "<prefix>.experts.<e>.<proj>.weight"
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)\.weight$")
# transformers-5 in-memory layout, already stacked: "<prefix>.experts.gate_up_proj" / ".down_proj"
_STACKED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


def expert_checkpoint_target(name: str, proj_names: dict[str, str]) -> tuple[str, tuple] | None:
    """Map a checkpoint tensor name to (our FusedMoE parameter name, shard id), or None if it is no expert weight.

    proj_names maps the checkpoint's per-expert projection names to "gate" / "up" / "down"
    (Qwen-style gate_proj/up_proj/down_proj, Mixtral-style w1/w3/w2)."""
    m = _PER_EXPERT.match(name)
    if m and m.group(3) in proj_names:
        part = proj_names[m.group(3)]
        return f"{m.group(1)}.{'w2' if part == 'down' else 'w13'}", (int(m.group(2)), part)
    m = _STACKED.match(name)
    if m:
        part = "gate_up" if m.group(2) == "gate_up_proj" else "down"
        return f"{m.group(1)}.{'w2' if part == 'down' else 'w13'}", (None, part)
    return None


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 local_experts: range | None = None):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        # expert parallelism: each rank holds whole experts, a contiguous share of them; otherwise every rank holds
        # a slice of every expert's intermediate features. Either way the ranks' outputs sum to the layer's.
        self.slices = 1 if expert_parallel() else tp_size()
        if local_experts is None and expert_parallel():
            assert num_experts % tp_size() == 0
            share = num_experts // tp_size()
            local_experts = range(tp_rank() * share, (tp_rank() + 1) * share)
        self.local_experts = local_experts if local_experts is not None else range(num_experts)
        assert self.local_experts.step == 1 and 0 <= self.local_experts.start <= self.local_experts.stop <= num_experts
        assert intermediate_size % self.slices == 0
        self.intermediate_per_rank = intermediate_size // self.slices
        n, i = len(self.local_experts), self.intermediate_per_rank
        self.w13 = nn.Parameter(torch.empty(n, 2 * i, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(n, hidden_size, i), requires_grad=False)
        self.w13.weight_loader = self.w2.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple):
        """shard_id = (expert or None for a stacked [E, ...] tensor, "gate" | "up" | "gate_up" | "down")."""
        expert, part = shard_id
        if expert is None:
            dest, loaded = param.data, loaded[self.local_experts.start:self.local_experts.stop]
        elif expert in self.local_experts:
            dest = param.data[expert - self.local_experts.start]
        else:
            return  # another rank's expert
        i, tp = self.intermediate_per_rank, self.slices
        rank = tp_rank() if tp > 1 else 0
        if part == "down":
            dest.copy_(loaded.chunk(tp, -1)[rank])
            return
        halves = loaded.chunk(2, -2) if part == "gate_up" else [loaded]
        offsets = [0, i] if part == "gate_up" else [0 if part == "gate" else i]
        for half, offset in zip(halves, offsets):
            dest.narrow(-2, offset, i).copy_(half.chunk(tp, -2)[rank])

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden]; topk_weights, topk_ids [tokens, top_k] -> [tokens, hidden]."""
        flat_ids = topk_ids.flatten()
        order = flat_ids.argsort(stable=True)
        rows = order // topk_ids.shape[1]  # token of each (token, expert) pair, grouped by expert
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        bounds = torch.cat([counts, counts.cumsum(0)]).tolist()  # one device sync per layer
        counts, ends = bounds[:self.num_experts], bounds[self.num_experts:]
        gathered = x[rows]
        expert_out = torch.zeros_like(gathered)
        for e in self.local_experts:
            if counts[e] == 0:
                continue
            s, t = ends[e] - counts[e], ends[e]
            gate, up = F.linear(gathered[s:t], self.w13[e - self.local_experts.start]).chunk(2, -1)
            expert_out[s:t] = F.linear(F.silu(gate) * up, self.w2[e - self.local_experts.start])
        # float32 routing weights promote the products, so the k results of a token are summed in float32 and
        # rounded once (as transformers does); a sum over the k slots is also deterministic, unlike index_add_
        weighted = expert_out * topk_weights.flatten()[order, None]
        by_token = torch.empty_like(weighted).index_copy_(0, order, weighted)
        return all_reduce(by_token.view(*topk_ids.shape, -1).sum(1).to(x.dtype))
