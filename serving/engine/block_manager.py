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
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

from serving.engine.sequence import Sequence


def chain_hash(prev: bytes | None, token_ids: list[int]) -> bytes:
    """Key of a full block: depends on this block's tokens and, through prev, on every earlier one."""
    h = hashlib.blake2b(digest_size=16)
    h.update(prev or b"")
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # evict from front
        self.prefix_cache_queries = 0  # tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # tokens found there

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (cached but free blocks count as free, as in vLLM)."""
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks already holding the KV of seq's leading full blocks, stopping short of its last token;
        none for a sequence that scores its prompt, which needs the logits of every prompt position."""
        hits: list[int] = []
        if seq.scores_prompt:
            return hits
        h = None
        bs = self.block_size
        for i in range((len(seq) - 1) // bs):
            h = chain_hash(h, seq.token_ids[i * bs : (i + 1) * bs])
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        # a hit on a block in use costs nothing; a hit on a free cached block still takes it off the list
        shared = sum(1 for b in self._cached_prefix(seq) if self.ref_counts[b] > 0)
        return self.num_blocks_for(len(seq)) - shared <= len(self.free_blocks)

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its tokens, reusing cached ones; sets num_cached_tokens to the hits."""
        assert not seq.block_table, f"sequence {seq.id} already has blocks"
        hits = self._cached_prefix(seq)
        for block_id in hits:
            if self.ref_counts[block_id] == 0:
                del self.free_blocks[block_id]
            self.ref_counts[block_id] += 1
        seq.block_table = hits + [
            self._take_free_block() for _ in range(self.num_blocks_for(len(seq)) - len(hits))
        ]
        seq.num_cached_tokens = len(hits) * self.block_size
        if seq.num_prompt_cache_hits is None:
            seq.num_prompt_cache_hits = min(seq.num_cached_tokens, seq.num_prompt_tokens)
        self.prefix_cache_queries += len(seq)
        self.prefix_cache_hits += seq.num_cached_tokens

    def can_fork(self, seq: Sequence) -> bool:
        return len(seq) % self.block_size == 0 or len(self.free_blocks) > 0

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give child (a sibling with parent's tokens, holding no blocks) parent's blocks: the full ones
        shared, the partly filled last one as a fresh block. Returns (parent's block, child's block) whose
        contents must be copied once parent's KV is written, or None when every block is full."""
        assert not child.block_table and child.token_ids == parent.token_ids, f"sequence {child.id} cannot fork"
        full = len(parent) // self.block_size
        shared = parent.block_table[:full]
        for block_id in shared:
            self.ref_counts[block_id] += 1
        child.block_table = list(shared)
        child.num_prompt_cache_hits = parent.num_prompt_cache_hits
        if len(parent) % self.block_size == 0:
            return None
        child.block_table.append(self._take_free_block())
        return parent.block_table[full], child.block_table[-1]

    def can_append(self, seq: Sequence) -> bool:
        return len(seq) <= len(seq.block_table) * self.block_size or len(self.free_blocks) > 0

    def append(self, seq: Sequence) -> None:
        """Make room for seq's newest token: a new block when the last one is full."""
        if len(seq) > len(seq.block_table) * self.block_size:
            seq.block_table.append(self._take_free_block())
        assert len(seq) <= len(seq.block_table) * self.block_size, "append covers one new token at a time"

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Key seq's full blocks whose KV is now computed, so later sequences can hit them."""
        bs = self.block_size
        end = seq.num_cached_tokens // bs
        start = end
        while start > 0 and self.block_hash[seq.block_table[start - 1]] is None:
            start -= 1  # blocks are keyed in order: walk back to the last one already keyed
        h = self.block_hash[seq.block_table[start - 1]] if start > 0 else None
        for i in range(start, end):
            h = chain_hash(h, seq.token_ids[i * bs : (i + 1) * bs])
            block_id = seq.block_table[i]
            self.block_hash[block_id] = h
            # a block computed twice (two equal prompts admitted together): the first one stays the key
            self.hash_to_block.setdefault(h, block_id)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"block {block_id} freed twice"
            if self.ref_counts[block_id] == 0:
                self.free_blocks[block_id] = None
                if self.block_hash[block_id] is None:
                    self.free_blocks.move_to_end(block_id, last=False)  # nothing can hit it: reuse first
        seq.block_table = []
        seq.num_cached_tokens = 0

    def _take_free_block(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        h = self.block_hash[block_id]
        if h is not None:  # evict its cache entry: the block is about to hold other tokens
            if self.hash_to_block.get(h) == block_id:
                del self.hash_to_block[h]
            self.block_hash[block_id] = None
        assert self.ref_counts[block_id] == 0
        self.ref_counts[block_id] = 1
        return block_id
