"""Vocabulary-parallel embedding and LM head: each rank holds a slice of the vocabulary."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.layers.packed_linear import matmul
from common.parallel.state import all_reduce, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp_size())
        self.start = tp_rank() * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        shard = loaded[self.start:self.start + self.shard_size]
        param.data.zero_()
        param.data[:shard.shape[0]].copy_(shard)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.start
        in_shard = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * in_shard.unsqueeze(-1)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = matmul(self, hidden)
        if tp_size() == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(tp_size())]
        dist.all_gather(parts, logits)
        return torch.cat(parts, -1)[..., :self.vocab_size]
