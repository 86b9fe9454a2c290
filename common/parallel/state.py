"""Tensor-parallel rank and size (1 when torch.distributed is not initialised), and expert parallelism.

The tensor-parallel group is the default process group: one per process, made by common/parallel/ranks.py for
the ranks of one engine. Expert parallelism is a property of that group: MoE layers then hold whole experts, a
slice of the experts per rank, instead of a slice of every expert.
"""
import torch.distributed as dist

_expert_parallel = False


def tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def tp_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def expert_parallel() -> bool:
    return _expert_parallel and tp_size() > 1


def set_expert_parallel(enabled: bool) -> None:
    global _expert_parallel
    _expert_parallel = enabled


def all_reduce(x):
    if tp_size() > 1:
        dist.all_reduce(x)
    return x
