import torch
import torch.nn.functional as F
from torch import nn

from common.parallel.state import all_reduce, tp_rank, tp_size


class RMSNorm(nn.Module):
    """Computed in float32 and cast back, in the same order of operations as transformers (parity)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def _mean_square(self, x: torch.Tensor) -> torch.Tensor:
        return x.pow(2).mean(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(self._mean_square(x) + self.eps)
        return self.weight * x.to(dtype)


class AllHeadsRMSNorm(RMSNorm):
    """RMSNorm over all heads of q (or k) together rather than per head (MiniMax-M2); x: [tokens, heads, head_dim].

    Under tensor parallelism a rank holds only its heads, so the mean square is averaged over ranks (every rank has
    the same width, and replicated kv heads are counted once per replica on both sides of the average)."""

    def __init__(self, heads_per_rank: int, head_dim: int, eps: float, replicas: int = 1):
        super().__init__(heads_per_rank * head_dim, eps)
        self.replicas = replicas
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        param.data.copy_(loaded.chunk(tp_size() // self.replicas, 0)[tp_rank() // self.replicas])

    def _mean_square(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super()._mean_square(x)) / tp_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(-2)).view_as(x)


class ZeroCenteredRMSNorm(RMSNorm):
    """The weight is stored as an offset from 1 (Qwen3-Next), and is applied in float32 before the cast back."""

    def __init__(self, size: int, eps: float):
        super().__init__(size, eps)
        self.weight.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(self._mean_square(x.float()) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm, then multiplied by silu(gate) in float32 (the output gate of Qwen3-Next's linear attention)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return (super().forward(x) * F.silu(gate.float())).to(x.dtype)
