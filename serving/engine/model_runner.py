"""
The model side of a step: turns the scheduler's prefill chunks and decodes into forwards of the GPT
through the paged KV cache, and returns the logits that will be sampled.

Notable:
- owns the model (in eval mode, on its device) and the KV pools (serving/engine/paged_cache.py); the
  sequences' block tables, from the block manager, say where each token's keys and values go.
- at most two forwards a step: all decodes together as a (B, 1) batch, and all prefill chunks together
  as a (B, T_max) batch with rows right-padded to the longest chunk. Keeping them apart means the
  decodes, the common case, never pay for a chunk's length in padding.
- only the last position of a row that needs a next token is returned: a chunk that stops short of the
  end of its sequence only fills the cache. The order matches ScheduledBatch.sampled_seqs: sampling
  chunks first, then decodes.
- reads sequences and never changes them: the scheduler's postprocess advances num_cached_tokens.
- everything under torch.inference_mode(): no autograd bookkeeping, and the pools are written in place.
"""

import torch
from torch import Tensor

from nanochat.gpt import GPT
from serving.engine.paged_cache import PagedKVCache
from serving.engine.scheduler import PrefillChunk
from serving.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: GPT, num_blocks: int, block_size: int, device: torch.device | str):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.cache = PagedKVCache.for_model(self.model, num_blocks, block_size)

    @torch.inference_mode()
    def run(self, prefill_chunks: list[PrefillChunk], decode_seqs: list[Sequence]) -> Tensor:
        """float32 logits (N, vocab_size), one row per sequence that gets a next token this step."""
        logits = []
        if prefill_chunks:
            rows = [(c.seq, c.start, c.length) for c in prefill_chunks]
            last = self._forward(rows)
            logits.append(last[[i for i, c in enumerate(prefill_chunks) if c.samples]])
        if decode_seqs:
            logits.append(self._forward([(seq, len(seq) - 1, 1) for seq in decode_seqs]))
        if not logits:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        return torch.cat(logits)

    def _forward(self, rows: list[tuple[Sequence, int, int]]) -> Tensor:
        """Computes seq.token_ids[start : start + length] of each row; the logits of each row's last one."""
        for seq, start, length in rows:
            if start + length > len(seq):
                raise ValueError(f"sequence {seq.id} has {len(seq)} tokens, "
                                 f"asked to compute positions {start}..{start + length - 1}")
        T = max(length for _, _, length in rows)
        idx = [seq.token_ids[start : start + length] + [0] * (T - length) for seq, start, length in rows]
        view = self.cache.view([seq.block_table for seq, _, _ in rows], [start for _, start, _ in rows],
                               [length for _, _, length in rows])
        logits = self.model.forward_cached(torch.tensor(idx, device=self.device), view)  # (B, T, V)
        last = torch.tensor([length - 1 for _, _, length in rows], device=self.device)
        return logits[torch.arange(len(rows), device=self.device), last]
