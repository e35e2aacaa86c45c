"""
KV cache for inference, and the small protocol through which the model uses one.

Notable:
- the model never touches cache storage. Each attention layer computes q, k, v (rotary and QK-norm
  already applied) and hands them to the cache, which stores k, v and returns the attention output.
  The dense `KVCache` here is the simple implementation; serving brings a paged one with the same
  three methods.
- tensors use the (B, T, H, D) layout of flash-attn; keys and values arrive with n_kv_head heads (GQA)
  and are stored that way, SDPA broadcasts them to the query heads.
- positions are per row: rows of one batch may hold different lengths (a slot of a continuous batch
  is prefilled through `rows()` while the others decode).
- a sliding window is a mask, nothing is evicted: window W lets the query at position p see the keys
  at positions p-W .. p (flash-attn's `window_size=(W, 0)`); None is the full causal context.

The protocol, in the order `GPT.forward_cached(idx, cache)` calls it for new tokens idx of shape (B, T):
1. `positions(T)` -> (LongTensor (B, T), int): the absolute position of each new token (for rotary), and a
   bound known on the host that every position lies below (the rotary tables must cover it: reading it off
   the tensor would wait for the device, and a captured CUDA graph may not wait at all).
2. `attend(layer_idx, q, k, v, window)` -> y (B, T, n_head, head_dim), once per layer: store k, v at
   those positions, then attend q to everything the row holds plus the new tokens, causally.
3. `advance(T)`, once after the last layer: the T new tokens become part of every row's history.
"""

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KVCacheLike(Protocol):
    def positions(self, T: int) -> tuple[Tensor, int]: ...

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, window: int | None) -> Tensor: ...

    def advance(self, T: int) -> None: ...


class KVCache:
    """Dense cache: keys and values of every layer in one contiguous (n_layer, B, max_len, n_kv_head, head_dim) tensor each."""

    def __init__(self, k: Tensor, v: Tensor, lengths: Tensor):
        self.k, self.v = k, v
        self.lengths = lengths  # (B,) tokens held per row
        self.max_len = k.size(2)
        self._n_keys = 0  # keys to attend over in the current forward, set by positions()

    @classmethod
    def empty(cls, batch_size: int, max_len: int, n_layer: int, n_kv_head: int, head_dim: int,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "KVCache":
        k = torch.zeros(n_layer, batch_size, max_len, n_kv_head, head_dim, dtype=dtype, device=device)
        lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(k, torch.zeros_like(k), lengths)

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> "KVCache":
        """A cache shaped for `model` (a GPT), on its device; max_len defaults to the training context."""
        cfg = model.config
        param = next(model.parameters())
        return cls.empty(batch_size, max_len or cfg.sequence_len, cfg.n_layer, cfg.n_kv_head,
                         cfg.n_embd // cfg.n_head, dtype or param.dtype, param.device)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows [start, stop): what is written through it lands in this cache."""
        return KVCache(self.k[:, start:stop], self.v[:, start:stop], self.lengths[start:stop])

    def copy_row_to_all(self, row: int = 0) -> None:
        """Give every row the history of `row`: prefill a prompt once, then sample it many times."""
        n = int(self.lengths[row])
        # a copy first: the source row is also one of the destinations
        self.k[:, :, :n] = self.k[:, row : row + 1, :n].clone()
        self.v[:, :, :n] = self.v[:, row : row + 1, :n].clone()
        self.lengths.fill_(n)

    def reset(self) -> None:
        """Forget every row's history (old entries are simply overwritten later)."""
        self.lengths.zero_()

    def positions(self, T: int) -> tuple[Tensor, int]:
        n_keys = int(self.lengths.max()) + T  # the one host sync of a forward
        if n_keys > self.max_len:
            raise RuntimeError(f"KV cache full: {n_keys} positions needed, max_len={self.max_len}")
        self._n_keys = n_keys
        return self._positions(T), n_keys

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, window: int | None) -> Tensor:
        B, T = q.shape[:2]
        pos = self._positions(T)
        rows = torch.arange(B, device=q.device)[:, None]
        self.k[layer_idx, rows, pos] = k.to(self.k.dtype)
        self.v[layer_idx, rows, pos] = v.to(self.v.dtype)
        keys = self.k[layer_idx, :, : self._n_keys].to(q.dtype)
        values = self.v[layer_idx, :, : self._n_keys].to(q.dtype)
        # key j is visible to the query at position p iff 0 <= p - j <= window; entries past a
        # row's length are stale or empty, and p - j < 0 masks them
        delta = pos[:, :, None] - torch.arange(self._n_keys, device=q.device)  # (B, T, n_keys)
        mask = delta >= 0
        if window is not None:
            mask &= delta <= window
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=mask[:, None], enable_gqa=keys.size(2) != q.size(2),
        )
        return y.transpose(1, 2)

    def advance(self, T: int) -> None:
        self.lengths += T  # in place, so that views made by rows() advance their parent too

    def _positions(self, T: int) -> Tensor:
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)
