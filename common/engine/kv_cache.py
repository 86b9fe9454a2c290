"""The engine's KV memory: how many blocks fit the budget, the one paged pool every attention layer views, rank 0's
full-head exchange pool under tensor parallelism, and a hybrid model's per-sequence state slots."""
import math

import torch
import torch.distributed as dist

from common.cache_kinds import PAGED_KV, PLANES
from common.parallel.state import tp_rank, tp_size


class KVCache:
    def __init__(self, model, config, lead: bool, scratch_blocks: int = 0):
        """scratch_blocks: blocks past those the block manager hands out (CUDA-graph padding rows write there)."""
        hf, device, dtype = config.hf_config, torch.device(config.device), config.torch_dtype
        self.block_size = config.block_size
        layers = model.attention_layers()
        first = layers[0]
        # what a token leaves in the cache: K and V planes, or (MLA) one plane holding the compressed latent
        planes = PLANES[getattr(model, "kv_cache_kind", PAGED_KV)]
        token_shape = (planes, len(layers), first.num_kv_heads, first.head_dim)
        # hybrid models also keep a recurrent state per sequence (float32), in one slot per block id: a running
        # sequence's slot is that of its first block, which is its own while prefix caching is off
        state_layers = model.state_layers() if hasattr(model, "state_layers") else []
        slot_numel = sum(layer.state_numel for layer in state_layers)
        self.num_blocks = config.num_kv_blocks or self._blocks_for_budget(
            config.kv_cache_memory_gb, token_shape, dtype, slot_numel * 4)
        # one pool for every layer, so a transfer engine can register it once
        self.pool = torch.zeros(planes, len(layers), self.num_blocks + scratch_blocks, self.block_size,
                                first.num_kv_heads, first.head_dim, dtype=dtype, device=device)
        for i, attn in enumerate(layers):
            # a latent pool's single plane is MLA's keys and (its first kv_lora_rank dims) its values
            attn.k_cache, attn.v_cache = self.pool[0, i], self.pool[planes - 1, i]
        # what KV transports register and move: the pool itself, or with tensor parallelism rank 0's copy with every
        # KV head, filled from and spread to the ranks' shards around each hand-off (move_blocks)
        self.exchange_pool = self.pool
        self.kv_heads_total = 1 if planes == 1 else getattr(hf, "num_key_value_heads", hf.num_attention_heads)
        if tp_size() > 1:
            full = list(self.pool.shape)
            full[4] = self.kv_heads_total
            self.exchange_pool = torch.zeros(full, dtype=dtype, device=device) if lead else None
        # [slots, slot_numel]: one contiguous slot per sequence, so a transport moves a sequence's state in one piece
        self.state_pool = None
        if state_layers:
            self.state_pool = torch.zeros(self.pool.shape[2], slot_numel, dtype=torch.float32, device=device)
            offset = 0
            for layer in state_layers:
                layer.bind_state(self.state_pool[:, offset:offset + layer.state_numel], self.block_size)
                offset += layer.state_numel

    def _blocks_for_budget(self, gigabytes: float, token_shape: tuple[int, ...], dtype: torch.dtype,
                           slot_bytes: int) -> int:
        """slot_bytes: the recurrent-state slot that comes with every block id (hybrid models)."""
        per_block = math.prod(token_shape) * self.block_size * torch.empty(0, dtype=dtype).element_size()
        return max(1, int(gigabytes * 2**30 // (per_block + slot_bytes)))

    @torch.inference_mode()
    def move_blocks(self, block_ids: list[int], to_exchange: bool):
        """Collective over all ranks: rank r holds KV heads [r * total // tp, + local) of every block (shared ones
        are replicated: several ranks write the same values)."""
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.pool.device)
        rank, size, local = tp_rank(), tp_size(), self.pool.shape[4]

        def heads(r: int) -> slice:
            first = r * self.kv_heads_total // size
            return slice(first, first + local)

        if to_exchange:
            shard = self.pool[:, :, ids]
            parts = [torch.empty_like(shard) for _ in range(size)] if rank == 0 else None
            dist.gather(shard, parts, dst=0)
            if rank == 0:
                for r, part in enumerate(parts):
                    self.exchange_pool[:, :, ids, :, heads(r)] = part
        else:
            shard = torch.empty_like(self.pool[:, :, ids])
            parts = [self.exchange_pool[:, :, ids, :, heads(r)].contiguous() for r in range(size)] if rank == 0 \
                else None
            dist.scatter(shard, parts, src=0)
            self.pool[:, :, ids] = shard
