"""Block manager: allocation, reference counts, exhaustion and prefix caching by hash chain."""

import pytest

from serving.engine.block_manager import BlockCopy, BlockManager, chain_hash
from serving.engine.sequence import Sequence

BS = 4


def computed(bm: BlockManager, seq: Sequence) -> Sequence:
    """Stand in for the model step that computes all of seq's tokens, then key its full blocks."""
    seq.num_cached_tokens = len(seq)
    bm.cache_computed_blocks(seq)
    return seq


def admitted(bm: BlockManager, tokens: list[int]) -> Sequence:
    seq = Sequence(tokens)
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    return seq


def test_allocate_append_free_and_refcounts():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = admitted(bm, list(range(6)))  # 6 tokens: 2 blocks, the second half full
    assert len(seq.block_table) == 2 and len(set(seq.block_table)) == 2
    assert all(bm.full.ref_counts[b] == 1 for b in seq.block_table)
    assert bm.num_free_blocks == 6 and bm.usage == pytest.approx(2 / 8)

    for token in (6, 7):  # fills the second block: no new block
        seq.token_ids.append(token)
        assert bm.can_append(seq)
        bm.append(seq)
    assert len(seq.block_table) == 2
    seq.token_ids.append(8)  # first token of a third block
    bm.append(seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5

    bm.free(seq)
    assert seq.block_table == [] and seq.num_cached_tokens == 0
    assert bm.num_free_blocks == 8 and bm.usage == 0.0 and not any(bm.full.ref_counts)


@pytest.mark.parametrize("prompt_len", [6, 8])
def test_fork_shares_full_blocks_and_gives_a_fresh_copy_of_a_partly_filled_last_one(prompt_len):
    bm = BlockManager(num_blocks=4, block_size=BS)
    parent = admitted(bm, list(range(prompt_len)))
    child = Sequence(list(range(prompt_len)))
    assert bm.can_fork(parent)
    copy = bm.fork(parent, child)
    assert child.block_table[:1] == parent.block_table[:1] and bm.full.ref_counts[parent.block_table[0]] == 2
    if prompt_len == 8:  # every block full: all shared, nothing to copy
        assert copy is None and child.block_table == parent.block_table
    else:
        assert copy == BlockCopy(parent.block_table[1], child.block_table[1]) and child.block_table[1] != parent.block_table[1]
    assert bm.prefix_cache_queries == prompt_len  # the parent's lookup only
    if prompt_len == 6:
        admitted(bm, [9] * 4)  # takes the last free block
        assert bm.num_free_blocks == 0 and not bm.can_fork(parent)  # no block for a copy


def test_exhaustion_can_allocate_and_can_append_false():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = admitted(bm, list(range(8)))  # 2 blocks
    b = Sequence(list(range(100, 108)))  # needs 2, only 1 free
    assert not bm.can_allocate(b)
    c = admitted(bm, [1, 2, 3, 4])  # takes the last block
    assert bm.num_free_blocks == 0 and bm.usage == 1.0
    c.token_ids.append(5)  # needs a second block: none left
    assert not bm.can_append(c)
    bm.free(a)
    assert bm.can_append(c) and bm.can_allocate(b)


def test_shared_prefix_reuses_blocks_and_counts_hits():
    bm = BlockManager(num_blocks=8, block_size=BS)
    system = list(range(10, 18))  # two full blocks
    a = computed(bm, admitted(bm, system + [1, 2]))
    b = admitted(bm, system + [3, 4, 5])
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert [bm.full.ref_counts[x] for x in b.block_table] == [2, 2, 1]
    assert b.num_cached_tokens == 2 * BS
    assert bm.prefix_cache_queries == len(a) + len(b)  # tokens, as in vLLM
    assert bm.prefix_cache_hits == 2 * BS
    bm.free(a)
    assert [bm.full.ref_counts[x] for x in b.block_table] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_uncomputed_blocks_do_not_hit():
    bm = BlockManager(num_blocks=8, block_size=BS)
    admitted(bm, list(range(9)))  # allocated, but the model has not computed it yet
    b = admitted(bm, list(range(9)))
    assert b.num_cached_tokens == 0 and bm.prefix_cache_hits == 0


def test_same_block_after_a_different_prefix_does_not_hit():
    bm = BlockManager(num_blocks=8, block_size=BS)
    second = [7, 7, 7, 7]
    computed(bm, admitted(bm, [1, 2, 3, 4] + second + [9]))
    b = admitted(bm, [5, 6, 7, 8] + second + [9])
    assert b.num_cached_tokens == 0 and bm.prefix_cache_hits == 0
    assert chain_hash(None, second) != chain_hash(chain_hash(None, [1, 2, 3, 4]), second)


def test_last_prompt_token_is_always_recomputed():
    bm = BlockManager(num_blocks=8, block_size=BS)
    prompt = list(range(2 * BS))  # exactly two full blocks
    a = computed(bm, admitted(bm, prompt))
    b = admitted(bm, prompt)
    # only the first block hits: the second holds the last token, whose logits the step needs
    assert b.num_cached_tokens == BS
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_freed_cached_block_hits_until_reused():
    bm = BlockManager(num_blocks=4, block_size=BS)
    prefix = list(range(2 * BS))
    a = computed(bm, admitted(bm, prefix + [99]))
    cached = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 4

    b = admitted(bm, prefix + [42])  # hits blocks that sit on the free list
    assert b.block_table[:2] == cached and b.num_cached_tokens == 2 * BS
    assert bm.num_free_blocks == 1
    bm.free(b)

    c = admitted(bm, prefix + [7])
    assert c.block_table[:2] == cached
    bm.free(c)

    # a sequence that needs every block overwrites the cached ones: the prefix no longer hits
    big = computed(bm, admitted(bm, list(range(1000, 1000 + 4 * BS))))
    bm.free(big)
    d = admitted(bm, prefix + [7])
    assert d.num_cached_tokens == 0


def test_blocks_without_a_hash_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=3, block_size=BS)
    prefix = list(range(2 * BS))
    bm.free(computed(bm, admitted(bm, prefix + [99])))  # 2 cached blocks + 1 plain one, all free
    bm.free(admitted(bm, [500]))  # a plain block freed after the cached ones
    bm.free(admitted(bm, [600]))  # must take that plain block, not evict a cached one
    c = admitted(bm, prefix + [7])
    assert c.num_cached_tokens == 2 * BS


# a window pool: the sliding-window layers' blocks, only their last window kept

W = 6  # the window, in tokens: the query at position n sees back to n - 6


def test_window_blocks_are_given_at_each_chunk_and_given_back_behind_the_window():
    bm = BlockManager(num_blocks=8, block_size=BS, window=W, num_window_blocks=8)
    seq = admitted(bm, list(range(20)))  # 5 full-pool blocks at admission, no window block yet
    assert len(seq.block_table) == 5 and seq.window_table == []
    bm.cover(seq, 10)  # a first chunk of 10 tokens: positions 0..9
    assert len(seq.window_table) == 3 and len(bm.window_pool.free_blocks) == 5
    first = seq.window_table[0]
    seq.num_cached_tokens = 10
    bm.cache_computed_blocks(seq)
    # the next query, at 10, sees back to 4: block 0 (positions 0..3) goes back, keyed, so it can still hit
    assert seq.window_table[0] == -1 and all(b >= 0 for b in seq.window_table[1:])
    assert len(bm.window_pool.free_blocks) == 6 and bm.window_pool.block_hash[first] is not None
    bm.cover(seq, 20)
    seq.num_cached_tokens = 20
    bm.cache_computed_blocks(seq)
    assert seq.window_table[:3] == [-1, -1, -1] and len(bm.window_pool.free_blocks) == 6  # blocks 3, 4 held
    bm.free(seq)
    assert seq.window_table == [] and len(bm.window_pool.free_blocks) == 8 and not any(bm.window_pool.ref_counts)
    assert bm.num_free_blocks == 8


def test_a_prefix_hit_needs_the_window_blocks_of_its_last_window():
    bm = BlockManager(num_blocks=16, block_size=BS, window=W, num_window_blocks=8)
    pool = bm.window_pool
    prefix = list(range(100, 124))  # six full blocks
    a = admitted(bm, prefix + [1])
    bm.cover(a, len(a))
    computed(bm, a)
    bm.free(a)
    b = admitted(bm, prefix + [2])  # every block of both pools still cached: all six full blocks hit
    assert b.num_cached_tokens == 24 and b.window_table[:4] == [-1] * 4 and min(b.window_table[4:]) >= 0
    last_window, b_blocks = b.window_table[4:], b.block_table
    bm.free(b)
    # evict the window pool's blocks of the last window (as new tokens would, once they reach the front
    # of the free list): a hit at 24 would attend to positions 18..23 that no longer exist, so the hit
    # stops where the window pool still has the window: the query at 16 sees 10..15, blocks 2 and 3
    for block in last_window:
        pool.free_blocks.move_to_end(block, last=False)
    assert {pool.take(), pool.take()} == set(last_window)
    c = admitted(bm, prefix + [3])
    assert c.num_cached_tokens == 16 and c.window_table[:2] == [-1, -1] and len(c.window_table) == 4
    assert c.block_table[:4] == b_blocks[:4]  # the full pool's hits are cut to the same 4 blocks
    assert bm.prefix_cache_hits == 24 + 16


def test_a_fork_shares_the_window_blocks_and_copies_the_last_one_in_both_pools():
    bm = BlockManager(num_blocks=16, block_size=BS, window=W, num_window_blocks=16)
    parent = admitted(bm, list(range(14)))
    bm.cover(parent, 14)  # the whole prompt in one chunk; the fork happens before it is computed
    child = Sequence(list(range(14)))
    copy = bm.fork(parent, child)
    assert child.window_table[:3] == parent.window_table[:3]
    assert copy == BlockCopy(parent.block_table[3], child.block_table[3], parent.window_table[3], child.window_table[3])
    assert child.window_table[3] != parent.window_table[3]
    for s in (parent, child):
        computed(bm, s)  # the next query, at 14, sees back to 8: blocks 0 and 1 go back
        assert s.window_table[:2] == [-1, -1]
    assert [bm.window_pool.ref_counts[b] for b in parent.window_table[2:]] == [2, 1]
    bm.free(parent)
    bm.free(child)
    assert not any(bm.window_pool.ref_counts) and not any(bm.full.ref_counts)


def test_a_window_pool_that_could_run_short_is_refused():
    from serving.engine.block_manager import window_pool_blocks
    from serving.engine.scheduler import Scheduler

    needed = window_pool_blocks(W, BS, 4, 32)
    assert needed == 4 * (W // BS + 3) + 32 // BS
    Scheduler(BlockManager(64, BS, W, needed), max_num_seqs=4, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match=f"the window pool's {needed - 1} blocks can run short"):
        Scheduler(BlockManager(64, BS, W, needed - 1), max_num_seqs=4, max_num_batched_tokens=32)
