"""Paged KV block allocation with a hash-chained prefix cache.

A block is published to the cache (hash -> block) only once its KV has been computed, so a sequence admitted
while another is still prefilling never reads blocks that hold nothing yet. Freed blocks keep their hash and
content and sit in an LRU free list: they are reused as cache hits until a new allocation evicts them.
"""
from collections import OrderedDict

from common.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: list[int] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the cache
        self.prefix_hits = 0  # of which found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _cache_hits(self, seq: Sequence) -> list[int]:
        """Leading blocks of seq found in the cache (tokens compared, so a hash collision is no hit)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for i, h in enumerate(seq.full_block_hashes(self.block_size)):
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != seq.block_tokens(i, self.block_size):
                break
            hits.append(block_id)
        # the last token must go through the model to give logits, so a fully cached sequence recomputes
        # its last block rather than writing into a block others share
        if hits and len(hits) * self.block_size == seq.num_tokens:
            hits.pop()
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cache_hits(seq)
        free_hits = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_needed(seq.num_tokens) - len(hits) + free_hits <= len(self.free)

    def allocate(self, seq: Sequence):
        """Give seq blocks for all its current tokens, reusing cached ones; sets its computed-token count."""
        assert not seq.block_table
        hits = self._cache_hits(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = hits + [self._take_free_block() for _ in range(self.blocks_needed(seq.num_tokens) - len(hits))]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_registered_blocks = len(hits)
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += seq.num_cached_tokens

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash = block.token_ids = None
        block.ref_count = 1
        return block_id

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int):
        """Make room in seq's block table for num_tokens tokens (decode appends)."""
        for _ in range(self.blocks_needed(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free_block())

    def publish_computed(self, seq: Sequence):
        """Enter seq's newly computed full blocks into the prefix cache."""
        num_full = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or num_full <= seq.num_registered_blocks:
            return
        hashes = seq.full_block_hashes(self.block_size)
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = hashes[i], seq.block_tokens(i, self.block_size)
            self.cached.setdefault(block.hash, block.block_id)
        seq.num_registered_blocks = num_full

    def free_seq(self, seq: Sequence):
        # tail blocks first, so the LRU evicts the end of a prefix before its start
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)  # content-less blocks are reused first
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
