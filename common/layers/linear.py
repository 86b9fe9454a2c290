"""Linear layers that shard their weights for tensor parallelism; each parameter knows how to load its shard.

With one rank they are plain linears. Column-parallel layers split output features, row-parallel layers split
input features and all-reduce their output.
"""
import torch
import torch.nn.functional as F
from torch import nn

from common.layers.packed_linear import matmul
from common.layers.quantized_linear import is_int4
from common.parallel.state import all_reduce, tp_rank, tp_size


class _ShardedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, shard_dim: int | None):
        super().__init__()
        self.shard_dim = shard_dim
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        if self.shard_dim is not None and self.shard_dim < loaded.dim():
            loaded = loaded.chunk(tp_size(), self.shard_dim)[tp_rank()]
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "packed_key", None) is None and not is_int4(self):
            return F.linear(x, self.weight, self.bias)
        y = matmul(self, x)
        return y if self.bias is None else y + self.bias


class ReplicatedLinear(_ShardedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias, shard_dim=None)


class ColumnParallelLinear(_ShardedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        assert out_features % tp_size() == 0
        super().__init__(in_features, out_features // tp_size(), bias, shard_dim=0)


class RowParallelLinear(_ShardedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        assert in_features % tp_size() == 0
        super().__init__(in_features // tp_size(), out_features, bias, shard_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the bias is added once, after the reduction
        y = all_reduce(matmul(self, x))
        return y + self.bias if self.bias is not None else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate and up)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias)

    def _shard_slice(self, shard_id: int) -> tuple[int, int]:
        sizes = [s // tp_size() for s in self.output_sizes]
        return sum(sizes[:shard_id]), sizes[shard_id]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        offset, size = self._shard_slice(shard_id)
        param.data.narrow(0, offset, size).copy_(loaded.chunk(tp_size(), 0)[tp_rank()])


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections in one matmul; kv heads are replicated when there are fewer than ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = tp_size()
        self.num_kv_heads_per_rank = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        super().__init__(hidden_size, [num_heads * head_dim, self.num_kv_heads_per_rank * head_dim * tp,
                                       self.num_kv_heads_per_rank * head_dim * tp], bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        index = {"q": 0, "k": 1, "v": 2}[shard_id]
        offset, size = self._shard_slice(index)
        rank = tp_rank() if index == 0 else tp_rank() // self.kv_replicas
        parts = tp_size() if index == 0 else tp_size() // self.kv_replicas
        param.data.narrow(0, offset, size).copy_(loaded.chunk(parts, 0)[rank])
