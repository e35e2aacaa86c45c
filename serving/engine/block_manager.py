"""
KV cache blocks: which physical block holds which tokens of which sequence, and prefix caching.

Notable:
- The cache is num_blocks blocks of block_size tokens each; a sequence's block_table maps its logical
  blocks to physical ones. Nothing here touches tensors or the model.
- Prefix caching: a full block whose KV has been computed is keyed by a hash chain,
  blake2b(previous block's hash + this block's token ids), so a key names the whole prefix up to the
  block's end: equal tokens after a different prefix never match. Shared system prompts and multi-turn
  histories then reuse blocks (reference counted) instead of recomputing them.
- Blocks are hashed only once their KV is computed (cache_computed_blocks, called after each step),
  so a hit never points at KV that is still being written.
- A freed block keeps its hash and can still be hit until it is handed out for something else. The
  free list is ordered for eviction: blocks without a hash first (no one can hit them), then hashed ones
  least recently freed first; a sequence frees its blocks last-first, so a prefix's tail goes before
  its head.
- The cache never serves a prompt's last token: even when every block hits, the last block is
  recomputed so the step has logits to sample from.
- A sequence asking for its prompt's log-probabilities gets no hits until they are computed (as vLLM
  does): a hit would skip the very positions it wants scored. Its blocks are still keyed for others.
- Prefix cache counters are in tokens, like vLLM's: queries count the tokens looked up, hits the
  tokens found.
- fork: the choices of an n > 1 request share one prefill. A sibling takes the prompt's full blocks of
  the sequence that computes it (reference counted) and a copy of its partly filled last block (copy on
  write, done at once: each choice writes its own next token into that block). A fork is not a lookup,
  so the prefix cache counters do not count it.
- Sliding-window layers keep only their window (vLLM's hybrid KV cache manager). Given a window, the
  window layers' KV lives in a pool of its own with a block table of its own per sequence
  (Sequence.window_table): the next query, at position n, sees keys back to n - window, so once a step
  has computed up to n the blocks wholly before n - window go back to that pool (-1 in the table), and
  a prefill chunk gets its window blocks when it is scheduled (cover), not at admission. The full-context
  layers keep every block as before. A prefix hit then needs both: the full layers' blocks of the whole
  prefix and the window layers' blocks of its last window, so the hit is the longest prefix with both.
- The window pool has at least window_pool_blocks (the scheduler refuses fewer): a running sequence
  holds at most the blocks its window and its step's new tokens touch, so the pool never runs short and
  only the full pool decides admission, appends and preemption, as without a window.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

from serving.engine.sequence import Sequence


def chain_hash(prev: bytes | None, token_ids: list[int]) -> bytes:
    """Key of a full block: depends on this block's tokens and, through prev, on every earlier one."""
    h = hashlib.blake2b(digest_size=16)
    h.update(prev or b"")
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def window_pool_blocks(window: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Blocks a window pool needs never to run short. A running sequence about to compute T tokens from
    position n holds the blocks of positions n - window .. n + T - 1, at most
    window // block_size + T // block_size + 3 of them; at most max_num_seqs sequences run, and their
    steps' tokens add up to max_num_batched_tokens at most."""
    return max_num_seqs * (window // block_size + 3) + max_num_batched_tokens // block_size


@dataclass(frozen=True)
class BlockCopy:
    """A fork's partly filled last block, to copy from the leader's once its KV is written: src to dst in
    the full pool, and window_src to window_dst in the window pool when there is one."""

    src: int
    dst: int
    window_src: int | None = None
    window_dst: int | None = None


class BlockPool:
    """One pool's physical blocks: reference counts, prefix-cache keys, and the free list in eviction order."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # evict from front

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (cached but free blocks count as free, as in vLLM)."""
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def take(self) -> int:
        """A free block for new tokens, its cache entry (if any) evicted."""
        assert self.free_blocks, "no free block: the caller checks the pool has room first"
        block_id, _ = self.free_blocks.popitem(last=False)
        h = self.block_hash[block_id]
        if h is not None:  # evict its cache entry: the block is about to hold other tokens
            if self.hash_to_block.get(h) == block_id:
                del self.hash_to_block[h]
            self.block_hash[block_id] = None
        assert self.ref_counts[block_id] == 0
        self.ref_counts[block_id] = 1
        return block_id

    def share(self, block_id: int) -> None:
        """One more holder of block_id (a prefix hit or a fork); a cached free block leaves the free list."""
        if self.ref_counts[block_id] == 0:
            del self.free_blocks[block_id]
        self.ref_counts[block_id] += 1

    def release(self, block_id: int) -> None:
        """One holder less; at none the block is free, and still hits until taken if it is keyed."""
        self.ref_counts[block_id] -= 1
        assert self.ref_counts[block_id] >= 0, f"block {block_id} freed twice"
        if self.ref_counts[block_id] == 0:
            self.free_blocks[block_id] = None
            if self.block_hash[block_id] is None:
                self.free_blocks.move_to_end(block_id, last=False)  # nothing can hit it: reuse first

    def key(self, block_id: int, h: bytes) -> None:
        self.block_hash[block_id] = h
        # a block computed twice (two equal prompts admitted together): the first one stays the key
        self.hash_to_block.setdefault(h, block_id)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, window: int | None = None,
                 num_window_blocks: int = 0) -> None:
        """num_blocks: the full-context layers' pool (every layer's without a window). window: the
        sliding window, in tokens, of the layers whose KV lives in a pool of num_window_blocks blocks."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        if window is not None and (window < 1 or num_window_blocks < 1):
            raise ValueError(f"need window >= 1 and num_window_blocks >= 1, got {window}, {num_window_blocks}")
        self.block_size = block_size
        self.full = BlockPool(num_blocks)
        self.window = window
        self.window_pool = BlockPool(num_window_blocks) if window is not None else None
        self.prefix_cache_queries = 0  # tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # tokens found there

    @property
    def num_blocks(self) -> int:
        return self.full.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.full.free_blocks)

    @property
    def usage(self) -> float:
        return self.full.usage

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, seq: Sequence, n: int) -> list[bytes]:
        """The keys of seq's first n full blocks, hashed once per sequence."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < n:
            i = len(hashes)
            hashes.append(chain_hash(hashes[-1] if hashes else None, seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes[:n]

    def _first_live(self, num_computed: int) -> int:
        """The first block the window layers still read once num_computed tokens are computed: the next
        query, at position num_computed, sees keys back to num_computed - window."""
        assert self.window is not None
        return max(0, num_computed - self.window) // self.block_size

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Blocks already holding the KV of seq's leading full blocks, stopping short of its last token:
        the full pool's, and the window pool's (-1 before the window of the first token to compute);
        none for a sequence that scores its prompt, which needs the logits of every prompt position."""
        if seq.scores_prompt:
            return [], []
        full: list[int] = []
        for h in self._hashes(seq, (len(seq) - 1) // self.block_size):
            block_id = self.full.hash_to_block.get(h)
            if block_id is None:
                break
            full.append(block_id)
        if self.window_pool is None:
            return full, []
        for k in range(len(full), -1, -1):  # the longest prefix whose last window is cached too
            first = self._first_live(k * self.block_size)
            window = [self.window_pool.hash_to_block.get(h) for h in seq.block_hashes[first:k]]
            if None not in window:
                return full[:k], [-1] * first + window
        raise AssertionError("an empty prefix always hits")

    def can_allocate(self, seq: Sequence) -> bool:
        # a hit on a block in use costs nothing; a hit on a free cached block still takes it off the list
        full, _ = self._cached_prefix(seq)
        shared = sum(1 for b in full if self.full.ref_counts[b] > 0)
        return self.num_blocks_for(len(seq)) - shared <= len(self.full.free_blocks)

    def allocate(self, seq: Sequence) -> None:
        """Give seq full-pool blocks for all its tokens, reusing cached ones, and the window pool's hits;
        sets num_cached_tokens to the hits."""
        assert not seq.block_table, f"sequence {seq.id} already has blocks"
        full, window = self._cached_prefix(seq)
        for block_id in full:
            self.full.share(block_id)
        seq.block_table = full + [self.full.take() for _ in range(self.num_blocks_for(len(seq)) - len(full))]
        if self.window_pool is not None:
            for block_id in window:
                if block_id >= 0:
                    self.window_pool.share(block_id)
            seq.window_table = window
        seq.num_cached_tokens = len(full) * self.block_size
        if seq.num_prompt_cache_hits is None:
            seq.num_prompt_cache_hits = min(seq.num_cached_tokens, seq.num_prompt_tokens)
        self.prefix_cache_queries += len(seq)
        self.prefix_cache_hits += seq.num_cached_tokens

    def cover(self, seq: Sequence, end: int) -> None:
        """Window-pool blocks for seq's positions below end, about to be computed (the full pool's
        cover the whole sequence from admission on)."""
        if self.window_pool is not None:
            while len(seq.window_table) * self.block_size < end:
                seq.window_table.append(self.window_pool.take())

    def can_fork(self, seq: Sequence) -> bool:
        return len(seq) % self.block_size == 0 or len(self.full.free_blocks) > 0

    def fork(self, parent: Sequence, child: Sequence) -> BlockCopy | None:
        """Give child (a sibling with parent's tokens, holding no blocks) parent's blocks: the full ones
        shared, the partly filled last one as a fresh block. Returns the blocks whose contents must be
        copied once parent's KV is written, or None when every block is full."""
        assert not child.block_table and child.token_ids == parent.token_ids, f"sequence {child.id} cannot fork"
        full = len(parent) // self.block_size
        child.block_table = self._share(self.full, parent.block_table[:full])
        child.window_table = self._share(self.window_pool, parent.window_table[:full])
        child.block_hashes = list(parent.block_hashes)
        child.num_prompt_cache_hits = parent.num_prompt_cache_hits
        if len(parent) % self.block_size == 0:
            return None
        child.block_table.append(self.full.take())
        if self.window_pool is None:
            return BlockCopy(parent.block_table[full], child.block_table[-1])
        child.window_table.append(self.window_pool.take())
        return BlockCopy(parent.block_table[full], child.block_table[-1],
                         parent.window_table[full], child.window_table[-1])

    @staticmethod
    def _share(pool: BlockPool | None, table: list[int]) -> list[int]:
        for block_id in table:
            if block_id >= 0:
                pool.share(block_id)
        return list(table)

    def can_append(self, seq: Sequence) -> bool:
        return len(seq) <= len(seq.block_table) * self.block_size or len(self.full.free_blocks) > 0

    def append(self, seq: Sequence) -> None:
        """Make room for seq's newest token: a new block when the last one is full."""
        if len(seq) > len(seq.block_table) * self.block_size:
            seq.block_table.append(self.full.take())
        assert len(seq) <= len(seq.block_table) * self.block_size, "append covers one new token at a time"
        self.cover(seq, len(seq))

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Key seq's full blocks whose KV is now computed (or being computed by a launched step) and whose
        tokens are known (not pending), so later sequences can hit them; then give back the window blocks no
        later query of seq can see. A step launched later runs after the launched one, so neither a hit nor
        a block given back and taken again can meet KV still being written."""
        bs = self.block_size
        end = min(seq.num_cached_tokens, len(seq.token_ids)) // bs
        start = end
        while start > 0 and self.full.block_hash[seq.block_table[start - 1]] is None:
            start -= 1  # blocks are keyed in order: walk back to the last one already keyed
        if start < end:  # most calls (a decode within its block, a step's second look) key nothing new
            hashes = self._hashes(seq, end)
            for i in range(start, end):
                self.full.key(seq.block_table[i], hashes[i])
                if self.window_pool is not None and seq.window_table[i] >= 0:
                    self.window_pool.key(seq.window_table[i], hashes[i])
        if self.window_pool is not None:
            for i in reversed(range(self._first_live(seq.num_cached_tokens))):
                if seq.window_table[i] < 0:
                    break  # released in order: everything before is gone already
                self.window_pool.release(seq.window_table[i])
                seq.window_table[i] = -1

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self.full.release(block_id)
        if self.window_pool is not None:
            for block_id in reversed(seq.window_table):
                if block_id >= 0:
                    self.window_pool.release(block_id)
        seq.block_table, seq.window_table = [], []
        seq.num_cached_tokens = 0
