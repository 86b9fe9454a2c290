"""BlockManager: hash-chained prefix cache, ref counts, LRU reuse, collision guard."""
from common.engine.block_manager import BlockManager
from common.sampling_params import SamplingParams
from common.engine.sequence import Sequence

BS = 4


def seq(tokens):
    return Sequence(list(tokens), SamplingParams(temperature=0))


def compute_all(bm: BlockManager, s: Sequence):
    s.num_computed_tokens = s.num_tokens
    bm.publish_computed(s)


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(8, BS)
    s = seq(range(10))
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.free_seq(s)
    assert bm.num_free_blocks == 8 and all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_hit_shares_blocks_and_counts_tokens():
    bm = BlockManager(16, BS)
    a = seq(list(range(10)))
    bm.allocate(a)
    compute_all(bm, a)
    b = seq(list(range(8)) + [99, 98, 97])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert bm.prefix_hits == 8 and bm.prefix_queries == 21


def test_blocks_are_published_only_once_computed():
    bm = BlockManager(16, BS)
    a = seq(range(12))
    bm.allocate(a)
    a.num_computed_tokens = 4  # a chunked prefill has filled one block so far
    bm.publish_computed(a)
    b = seq(range(12))
    bm.allocate(b)
    assert b.num_cached_tokens == 4


def test_fully_cached_prompt_recomputes_its_last_block():
    bm = BlockManager(16, BS)
    a = seq(range(8))
    bm.allocate(a)
    compute_all(bm, a)
    b = seq(range(8))
    bm.allocate(b)
    assert b.num_computed_tokens == 4 and b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1]


def test_freed_cached_blocks_are_reused_lru_and_evicted_last():
    bm = BlockManager(4, BS)
    a = seq(range(8))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free_seq(a)
    assert bm.num_free_blocks == 4
    # the two blocks without content are handed out before the cached ones
    c = seq([50, 51, 52, 53, 54])
    bm.allocate(c)
    assert not set(c.block_table) & set(a.block_table)
    again = seq(list(range(8)) + [7])
    assert bm.can_allocate(again) is False  # needs 3 blocks, only the 2 cached ones are free
    bm.free_seq(c)
    bm.allocate(again)
    assert again.num_cached_tokens == 8


def test_eviction_forgets_the_hash():
    bm = BlockManager(2, BS)
    a = seq(range(4))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free_seq(a)
    other = seq([9] * 8)
    bm.allocate(other)  # takes both blocks, evicting a's
    compute_all(bm, other)
    bm.free_seq(other)
    b = seq(list(range(4)) + [1])
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_hash_collision_is_not_a_hit(monkeypatch):
    bm = BlockManager(8, BS)
    a = seq(range(4))
    bm.allocate(a)
    compute_all(bm, a)
    b = seq([7, 7, 7, 7, 1])
    b._hashes = list(a.full_block_hashes(BS))  # force the same hash for different tokens
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_grow_adds_blocks_for_decode():
    bm = BlockManager(3, BS)
    s = seq(range(4))
    bm.allocate(s)
    assert bm.can_grow(s, 5)
    bm.grow(s, 5)
    assert len(s.block_table) == 2
    bm.grow(s, 12)
    assert len(s.block_table) == 3 and not bm.can_grow(s, 13)


def test_decode_blocks_are_cached_too():
    bm = BlockManager(8, BS)
    s = seq(range(3))
    bm.allocate(s)
    s.token_ids += [3, 4, 5]
    bm.grow(s, 6)
    s.num_computed_tokens = 6
    bm.publish_computed(s)
    assert s.num_registered_blocks == 1
    t = seq(list(range(6)) + [0])
    bm.allocate(t)
    assert t.num_cached_tokens == 4
