"""
Paged KV cache: the memory of the serving engine, and the per-forward view the model attends through.

Notable:
- one pool per layer for keys and one for values, (num_blocks, block_size, n_kv_head, head_dim),
  allocated once (vLLM's PagedAttention layout). A sequence owns a list of block ids, its block table;
  the token at position p lives in block table[p // block_size] at offset p % block_size. Blocks need
  not be contiguous or ordered, and sequences with a common prefix may share blocks.
- `PagedView` implements nanochat/kv_cache.py's KVCacheLike for one forward over a batch of rows, each
  row being one sequence's new tokens (a prefill chunk, or one decode token) at consecutive positions.
- packed (a prefill): the forward's tokens are the rows' new tokens back to back, one (1, N) row of
  N = sum of lengths, so every token-wise part of the model (projections, MLP, norms: most of a forward)
  computes real tokens only, however different the chunks' lengths (vLLM's varlen batches). Attention
  alone takes the rows apart: each layer's queries go into (B, T) rows right-padded to the longest, and
  its outputs come back packed. Unpacked (decodes, one token a row; CUDA graphs), the forward's tokens are
  the (B, T) rows themselves.
- in the (B, T) rows, a padded token repeats its row's last real position: it is never written to the pool
  and it attends exactly like the last real token, so no query row is ever fully masked (SDPA would
  return NaN). Its outputs are simply never read; flex skips the query blocks made only of padding.
- two attention paths (the cache's `attention`):
  "sdpa" gathers each row's blocks into a contiguous (B, n_blocks * block_size, ...) tensor and runs
  SDPA with an explicit mask: causal (which also hides stale slots past the context and the padding
  of the block tables) and, for sliding-window layers, p - W <= j. Plain torch on CPU and GPU. A decode
  forward (one new token a row) hands SDPA each key/value head's group of query heads as that head's rows
  of queries (_decode_grouped). A packed prefill of rows of different lengths runs one SDPA per row, over
  that row's real queries and the keys up to its own last block, so padding costs no attention either.
  "flex" reads the pools in place, no gather: FlexAttention with the pool of a layer as one long key
  sequence (shared by every row) and a block mask listing, for each row, its own blocks as the KV
  blocks to visit (KV block = cache block). The mask_mod places a key by its block's column in the
  block tables, kept per block in block_column: a block shared by prefix caching or a fork sits at
  the same column in every table holding it, so one map serves the whole batch. It admits the key
  if that column of the query's row holds that very block (not another row's, nor a stale entry of
  the map) and causality (and the window) allow it. Compiled on a GPU; on a CPU eager flex builds the
  scores over the whole pool, fine for tests only.
- a sliding-window layer reads only the blocks its window can reach: row b's from the block of
  position start_b - W on, as many as W + T positions can touch (gathered, or listed in the block
  mask). Its keys are then not position j at index j: each row carries the columns of its blocks.
  Blocks past a row's table (the clamped tail of a short row) get positions beyond its last query,
  so causality hides them.
- with a window pool (block_manager.py: sliding-window layers keep only their window), the window
  layers' keys and values live in pools of their own, addressed by each row's window table, whose
  entries behind the window are -1: the view reads them as block 0 and never attends to them (a window
  layer reads from the block of start_b - W on; with the whole table, past-window keys are masked).
- the pools are written only at the slots of real new tokens (one index_copy per layer), so what a
  sequence shares with others (prefix blocks) or what freed blocks still hold is never disturbed.
- no step waits on the GPU inside the forward: which tokens are real is known on the host, so they are
  picked by an index built there, not by a boolean mask (masked selection must read the mask's count back
  from the device: two stalls per layer, every decode step).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from nanochat.gpt import grouped_kv
from serving.engine.block_manager import BlockCopy
from serving.engine.transfer import to_device

Attention = Literal["sdpa", "flex"]


class KVPool:
    """Keys and values of some layers: k[i], v[i] are (num_blocks, block_size, n_kv_head, head_dim)."""

    def __init__(self, n_layer: int, num_blocks: int, block_size: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None):
        shape = (n_layer, num_blocks, block_size, n_kv_head, head_dim)  # one allocation; k[i] is a layer's pool
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        # flex: the column at which each block sits in the block tables holding it (the same in all of
        # them: a block shared by prefix caching or a fork holds the same positions everywhere), and one
        # slot past the blocks where the padding of the tables is written
        self.block_column = torch.zeros(num_blocks + 1, dtype=torch.long, device=device)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (source, destination) block's keys and values, in every layer."""
        src, dst = (to_device(ids, self.k.device, torch.long) for ids in zip(*pairs, strict=True))
        for pool in (self.k, self.v):
            pool.index_copy_(1, dst, pool.index_select(1, src))


class PagedKVCache:
    """The KV pools of all layers: the full-context layers' (or every layer's) k, v, and with a window pool
    the sliding-window layers' window_k, window_v, each (layers, num_blocks, block_size, n_kv_head, head_dim)."""

    def __init__(self, n_layer: int, num_blocks: int, block_size: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 attention: Attention = "sdpa", compile_flex: bool | None = None,
                 window_layers: Sequence[bool] = (), num_window_blocks: int = 0):
        """attention: "sdpa" gathers each row's blocks, "flex" reads the pools in place (module docstring);
        compile_flex: run FlexAttention compiled (by default on a GPU only); window_layers[i]: layer i keeps
        its KV in the window pool of num_window_blocks blocks (none: every layer in the one pool)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks}, block_size={block_size}: both must be >= 1")
        if attention not in ("sdpa", "flex"):
            raise ValueError(f"attention={attention!r}: must be sdpa or flex")
        in_window = list(window_layers) or [False] * n_layer
        if len(in_window) != n_layer or (any(in_window) and num_window_blocks < 1):
            raise ValueError(f"window_layers needs one flag per layer ({n_layer}) and a window pool "
                             f"num_window_blocks >= 1, got {len(in_window)} flags and {num_window_blocks}")
        # each layer's pool (0: full context, 1: window) and its index there
        self.layer_pool = [int(w) for w in in_window]
        self.layer_index = [sum(1 for w in in_window[:i] if w == in_window[i]) for i in range(n_layer)]
        self.pools = [KVPool(n_layer - sum(in_window), num_blocks, block_size, n_kv_head, head_dim, dtype, device)]
        if any(in_window):
            self.pools.append(KVPool(sum(in_window), num_window_blocks, block_size, n_kv_head, head_dim, dtype, device))
        self.num_blocks, self.block_size = num_blocks, block_size
        self.attention = attention
        self.compile_flex = self.device.type == "cuda" if compile_flex is None else compile_flex

    @classmethod
    def for_model(cls, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype | None = None,
                  attention: Attention = "sdpa", compile_flex: bool | None = None,
                  num_window_blocks: int = 0) -> "PagedKVCache":
        """Pools shaped for `model` (a GPT), on its device, in its parameters' dtype unless told; with
        num_window_blocks, its sliding-window layers in a window pool of that many blocks."""
        cfg = model.config
        param = next(model.parameters())
        window_layers = [w is not None for w in model.window_sizes] if num_window_blocks else ()
        return cls(cfg.n_layer, num_blocks, block_size, cfg.n_kv_head, cfg.head_dim, dtype or param.dtype,
                   param.device, attention, compile_flex, window_layers, num_window_blocks)

    @property
    def k(self) -> Tensor:
        return self.pools[0].k

    @property
    def v(self) -> Tensor:
        return self.pools[0].v

    @property
    def window_pool(self) -> KVPool | None:
        return self.pools[1] if len(self.pools) > 1 else None

    @property
    def device(self) -> torch.device:
        return self.pools[0].k.device

    def copy_blocks(self, copies: list[BlockCopy]) -> None:
        """Copy each fork's last block, in every layer of each pool."""
        self.pools[0].copy_blocks([(c.src, c.dst) for c in copies])
        window = [(c.window_src, c.window_dst) for c in copies if c.window_src is not None]
        if window:
            self.pools[1].copy_blocks(window)

    def view(self, block_tables: list[list[int]], starts: list[int], lengths: list[int],
             window_tables: list[list[int]] | None = None, packed: bool = False) -> "PagedView":
        """A view for one forward over len(starts) rows: row b holds lengths[b] new tokens at positions
        starts[b] .. starts[b] + lengths[b] - 1 and attends to positions 0 .. starts[b] - 1 already in
        its blocks block_tables[b] (and window_tables[b] in the window pool, -1 behind the window), which
        must cover every position up to its last new token. packed: the forward's tokens are the rows'
        new tokens back to back, (1, sum(lengths)), rather than (len(starts), max(lengths))."""
        if not (len(block_tables) == len(starts) == len(lengths)) or not starts:
            raise ValueError("block_tables, starts and lengths need one entry per row, and at least one row")
        tables = [block_tables]
        if self.window_pool is not None:
            if window_tables is None or len(window_tables) != len(starts):
                raise ValueError("a cache with a window pool needs a window table per row")
            tables.append(window_tables)
        device, padded_tables = self.device, []
        for pool, pool_tables in zip(self.pools, tables, strict=True):
            padded = _checked_tables(pool_tables, starts, lengths, self.block_size, pool.num_blocks,
                                     behind_window=pool is not self.pools[0])
            padded_tables.append(to_device(torch.from_numpy(padded), device))
        T = max(lengths)
        real = [b * T + t for b, length in enumerate(lengths) for t in range(length)]  # in the flat (B * T) order
        return PagedView(self, padded_tables, to_device(starts, device, torch.long),
                         to_device(lengths, device, torch.long), T, to_device(real, device, torch.long),
                         max(start + length for start, length in zip(starts, lengths, strict=True)),
                         packed=packed, row_spans=list(zip(starts, lengths, strict=True)))


def _decode_grouped(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Attention of one new token per row, q (B, H, 1, D), over keys and values (B, H_kv, S, D) that groups
    of H / H_kv query heads share, with mask (B, 1, 1, S): each group attends as its key/value head's rows
    of queries (B, H_kv, H / H_kv, D), the sums of SDPA's enable_gqa without it. Torch's CPU kernel packs
    bfloat16 keys and values anew for every single-row query head, which made a bfloat16 cache's decode
    several times slower than a float32 one's (bench/serving.py); grouped, a key/value head is packed once
    for its group. On a GPU no head copies its group's keys and values either (grouped_kv)."""
    B, H, _, D = q.shape
    y = F.scaled_dot_product_attention(q.reshape(B, keys.size(1), H // keys.size(1), D), keys, values,
                                       attn_mask=mask)
    return y.view(B, H, 1, D)


def _checked_tables(tables: list[list[int]], starts: list[int], lengths: list[int], block_size: int,
                    num_blocks: int, behind_window: bool) -> np.ndarray:
    """The tables as one (rows, longest) array, short ones padded with block 0 (those slots lie past the
    row's context: causality hides them), once each row's table is known to cover its new tokens with
    blocks of the pool (-1 allowed behind a window). The block ids are checked on the array, not one by one
    in Python: this runs every step."""
    for b, (table, start, length) in enumerate(zip(tables, starts, lengths, strict=True)):
        if start < 0 or length < 1:
            raise ValueError(f"row {b}: start={start}, length={length}: need start >= 0, length >= 1")
        if len(table) * block_size < start + length:
            raise ValueError(f"row {b}: {len(table)} blocks of {block_size} cannot hold {start + length} positions")
    padded = np.zeros((len(tables), max(len(table) for table in tables)), dtype=np.int64)
    for b, table in enumerate(tables):
        padded[b, : len(table)] = table
    low = -1 if behind_window else 0
    outside = ((padded < low) | (padded >= num_blocks)).any(axis=1)
    if outside.any():
        raise ValueError(f"row {int(outside.argmax())}: block ids must lie in [{low}, {num_blocks})")
    if behind_window:
        new_columns = np.arange(padded.shape[1]) >= (np.asarray(starts) // block_size)[:, None]
        behind = ((padded < 0) & new_columns).any(axis=1)
        if behind.any():
            raise ValueError(f"row {int(behind.argmax())}: the blocks of its new tokens cannot be behind the window")
    return padded


class PagedView:
    """KVCacheLike for one forward: new tokens of shape (B, T) with T = the longest row, others padded, or
    packed, (1, N) with N the rows' new tokens back to back. Attention runs over the (B, T) rows, or with the
    gather path over each packed row alone."""

    def __init__(self, cache: PagedKVCache, block_tables: list[Tensor], starts: Tensor, lengths: Tensor, T: int,
                 real: Tensor, n_positions: int, packed: bool = False,
                 row_spans: list[tuple[int, int]] | None = None):
        """block_tables: each pool's (B, n) tables, -1 behind a window; real: the flat (B * T) indices of
        the real new tokens, in order (the rest is padding); n_positions: every new token's position lies
        below it; packed: the forward's tokens are the real ones back to back; row_spans: each row's
        (start, length) as the host knows them (a packed view's gather path attends row by row with them)."""
        self.cache, self.T, self.real, self.lengths = cache, T, real, lengths
        self.n_positions, self.packed, self.row_spans = n_positions, packed, row_spans
        # some row is shorter than T (else real is every index, and no index needs to be applied); sizes
        # are the host's to know, so this reads nothing from the device
        self.padded = real.numel() < starts.numel() * T
        offsets = torch.arange(T, device=starts.device)
        # padding repeats the row's last real position (see the module docstring)
        self.pos = starts[:, None] + torch.minimum(offsets, lengths[:, None] - 1)
        self.n_used = self.pos[:, -1] // cache.block_size + 1  # (B,) blocks each row reads up to its last query
        self.pools = [_PoolView(self, pool, tables, behind_window=i > 0)
                      for i, (pool, tables) in enumerate(zip(cache.pools, block_tables, strict=True))]

    def positions(self, T: int) -> tuple[Tensor, int]:
        expected = self.real.numel() if self.packed else self.T
        if T != expected:
            where = "in its one packed row" if self.packed else "per row"
            raise ValueError(f"this view was built for {expected} new tokens {where}, the model sent {T}")
        return (self._packed(self.pos) if self.packed else self.pos), self.n_positions

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, window: int | None) -> Tensor:
        cache = self.cache
        pool, index = self.pools[cache.layer_pool[layer_idx]], cache.layer_index[layer_idx]
        if not self.packed:
            return pool.attend(index, q, self.real_tokens(k), self.real_tokens(v), window)
        # the new keys and values are the real tokens already
        if self.padded and cache.attention == "sdpa" and self.row_spans is not None:
            return pool.attend_packed_rows(index, q, k[0], v[0], window, self.row_spans)
        return self._packed(pool.attend(index, self._rows(q), k[0], v[0], window))  # the queries in rows

    def real_tokens(self, x: Tensor) -> Tensor:
        """The real new tokens of x (B, T, ...), flat and in order."""
        x = x.flatten(0, 1)
        return x.index_select(0, self.real) if self.padded else x

    def _packed(self, x: Tensor) -> Tensor:
        """x (B, T, ...) as the forward's packed tokens (1, N, ...)."""
        return self.real_tokens(x)[None]

    def _rows(self, x: Tensor) -> Tensor:
        """The forward's packed tokens x (1, N, ...) placed in the (B, T, ...) rows, padding zero."""
        B, shape = self.pos.size(0), x.shape[2:]
        if not self.padded:
            return x.view(B, self.T, *shape)
        return x.new_zeros(B * self.T, *shape).index_copy_(0, self.real, x[0]).view(B, self.T, *shape)

    def advance(self, T: int) -> None:
        """Nothing to do: the pools already hold the new tokens, and the lengths live in the sequences."""


class _PoolView:
    """One pool's side of a view: the rows' block tables into it, where the new tokens go, and the keys
    each window size reads (built once, shared by the layers of that window)."""

    def __init__(self, view: PagedView, pool: KVPool, block_tables: Tensor, behind_window: bool):
        """behind_window: the tables may hold -1 for blocks given back behind a window (the window pool's)."""
        cache, pos, bs = view.cache, view.pos, view.cache.block_size
        self.view, self.pool, self.n_used = view, pool, view.n_used
        # window blocks given back: read as block 0, never attended to
        behind = block_tables < 0 if behind_window else None
        self.block_tables = block_tables.clamp(min=0) if behind_window else block_tables
        block_ids = self.block_tables.gather(1, pos // bs)
        self.slots = view.real_tokens(block_ids * bs + pos % bs)  # flat pool index of each real new token
        self._keys_by_window: dict[int | None, tuple[Tensor, Tensor]] = {}
        self._flex_masks: dict[int | None, BlockMask] = {}
        if cache.attention == "flex":
            columns = torch.arange(block_tables.size(1), device=pos.device).expand_as(block_tables)
            # the padding of the tables (and what is behind a window) goes to the spare slot, so a real
            # block's column is never overwritten
            used = columns < self.n_used[:, None]
            if behind is not None:
                used &= ~behind
            used = torch.where(used, self.block_tables, pool.num_blocks)
            pool.block_column.scatter_(0, used.flatten(), columns.flatten())

    def attend(self, index: int, q: Tensor, k: Tensor, v: Tensor, window: int | None) -> Tensor:
        """Writes the real new tokens' keys and values k, v (n_real, n_kv_head, D) to the pool, then returns
        the attention of q (B, T, n_head, D) over the rows' keys."""
        k_pool, v_pool = self._write(index, k, v)
        if self.view.cache.attention == "flex":
            return self._flex(k_pool, v_pool, q, window)
        keys, values, mask = self._gathered(k_pool, v_pool, window)
        # attention runs in the pools' dtype: a bfloat16 cache is read at half the bytes, not widened first
        out_dtype = q.dtype
        q, keys, values = q.to(k_pool.dtype).transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        if q.size(2) == 1 and keys.size(1) < q.size(1):
            return _decode_grouped(q, keys, values, mask).transpose(1, 2).to(out_dtype)
        keys, values, gqa = grouped_kv(q, keys, values)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        return y.transpose(1, 2).to(out_dtype)

    def attend_packed_rows(self, index: int, q: Tensor, k: Tensor, v: Tensor, window: int | None,
                           row_spans: list[tuple[int, int]]) -> Tensor:
        """The gather path's attention for packed rows of different lengths, q (1, N, n_head, D) packed and
        the result packed as well: each row's real queries over the keys up to its own last position, one
        SDPA per row, so that no padded query (the most of a step where one long chunk sits beside short
        ones) and no key past the row's context is computed. k, v: as attend's."""
        k_pool, v_pool = self._write(index, k, v)
        keys, values, mask = self._gathered(k_pool, v_pool, window)
        bs, full_width = self.view.cache.block_size, self.block_tables.size(1) * self.view.cache.block_size
        out_dtype, q = q.dtype, q.to(k_pool.dtype)  # in the pools' dtype, as attend
        out, offset = [], 0
        for b, (start, length) in enumerate(row_spans):
            # keys gathered from the table's first column on (no window cut) end at the row's last block
            n_keys = (start + length + bs - 1) // bs * bs if keys.size(1) == full_width else keys.size(1)
            q_row = q[:, offset:offset + length].transpose(1, 2)
            k_row, v_row = keys[b:b + 1, :n_keys].transpose(1, 2), values[b:b + 1, :n_keys].transpose(1, 2)
            k_row, v_row, gqa = grouped_kv(q_row, k_row, v_row)
            y = F.scaled_dot_product_attention(q_row, k_row, v_row, attn_mask=mask[b:b + 1, :, :length, :n_keys],
                                               enable_gqa=gqa)
            out.append(y.transpose(1, 2))
            offset += length
        return torch.cat(out, dim=1).to(out_dtype)

    def _write(self, index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes the real new tokens' keys and values to the layer's pools; returns those pools."""
        k_pool, v_pool = self.pool.k[index], self.pool.v[index]
        n_slots = k_pool.size(0) * k_pool.size(1)
        for pool, new in ((k_pool, k), (v_pool, v)):
            pool.view(n_slots, *pool.shape[2:]).index_copy_(0, self.slots, new.to(pool.dtype))
        return k_pool, v_pool

    def _gathered(self, k_pool: Tensor, v_pool: Tensor, window: int | None) -> tuple[Tensor, Tensor, Tensor]:
        """Each row's keys and values (B, K, n_kv_head, D), gathered from its blocks, and their mask."""
        tables, mask = self._keys(window)
        B, flat = tables.size(0), tables.flatten()
        # index_select over whole blocks (a block as one row) copies far faster than advanced indexing
        keys = k_pool.flatten(1).index_select(0, flat).view(B, -1, *k_pool.shape[2:])
        values = v_pool.flatten(1).index_select(0, flat).view(B, -1, *v_pool.shape[2:])
        return keys, values, mask

    def _blocks(self, window: int | None) -> tuple[Tensor, Tensor]:
        """The blocks (B, n) a layer with this window reads for each row, and their columns in the row's
        block table (B, n): all of them, or for a window only those it reaches (module docstring)."""
        bs, n_blocks, pos = self.view.cache.block_size, self.block_tables.size(1), self.view.pos
        columns = torch.arange(n_blocks, device=pos.device)
        width = n_blocks if window is None else (window + self.view.T + bs - 2) // bs + 1
        if width >= n_blocks:
            return self.block_tables, columns.expand_as(self.block_tables)
        columns = (pos[:, :1] - window).clamp(min=0) // bs + columns[:width]
        return self.block_tables.gather(1, columns.clamp(max=n_blocks - 1)), columns

    def _keys(self, window: int | None) -> tuple[Tensor, Tensor]:
        """The blocks each row gathers (B, n) and the (B, 1, T, n * block_size) mask over their keys: key at
        position j is visible to the query at position p iff 0 <= p - j (<= window). Built once per window
        size and shared by the layers that use it."""
        if window not in self._keys_by_window:
            tables, columns = self._blocks(window)
            bs = self.view.cache.block_size
            key_pos = (columns[:, :, None] * bs + torch.arange(bs, device=columns.device)).flatten(1)
            delta = self.view.pos[:, :, None] - key_pos[:, None, :]
            mask = delta >= 0
            if window is not None:
                mask &= delta <= window
            self._keys_by_window[window] = tables, mask[:, None]
        return self._keys_by_window[window]

    def _flex(self, k_pool: Tensor, v_pool: Tensor, q: Tensor, window: int | None) -> Tensor:
        """FlexAttention of q (B, T, n_head, D) over the pools in place: each row visits only its own blocks
        (those its window reaches), listed in a block mask whose mask_mod places every key by its block's
        column (module docstring)."""
        if window not in self._flex_masks:
            self._flex_masks[window] = self._flex_mask(window)
        cache = self.view.cache
        keys, values = (pool.flatten(0, 1).permute(1, 0, 2)[None] for pool in (k_pool, v_pool))  # (1, H, N, D)
        # dynamic shapes on a GPU (vLLM's setting: the batch changes every step); the CPU code generator
        # fails on dynamic flex kernels, so there each new shape compiles anew (tests only)
        on_gpu = cache.device.type == "cuda"
        attend = _compiled_flex(None if on_gpu else False) if cache.compile_flex else flex_attention
        y = attend(q.to(keys.dtype).transpose(1, 2), keys, values, block_mask=self._flex_masks[window],
                   enable_gqa=keys.size(1) != q.size(2))
        return y.transpose(1, 2).to(q.dtype)

    def _flex_mask(self, window: int | None) -> BlockMask:
        cache, bs, num_blocks = self.view.cache, self.view.cache.block_size, self.pool.num_blocks
        tables, columns = self._blocks(window)
        pos, block_tables, block_column = self.view.pos, self.block_tables, self.pool.block_column
        last_column = block_tables.size(1) - 1

        def visible(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            block = kv_idx // bs
            column = block_column[block]
            key_pos, q_pos = column * bs + kv_idx % bs, pos[b, q_idx]
            # a block of another row, or a stale one, is not at that column of this row's table; a column
            # past the row's blocks lies past its last query, which causality hides
            ok = (block_tables[b, column.clamp(max=last_column)] == block) & (key_pos <= q_pos)
            return ok if window is None else ok & (q_pos - key_pos <= window)

        B = tables.size(0)
        n_q = -(-self.view.T // FLEX_Q_BLOCK)
        if cache.compile_flex and cache.device.type == "cpu":  # the CPU kernel wants every block of the pool listed
            tables = F.pad(tables, (0, num_blocks - tables.size(1)))
        # a query block of padding only (past its row's length) visits no block at all
        q_starts = torch.arange(n_q, device=tables.device) * FLEX_Q_BLOCK
        counts = torch.where(q_starts < self.view.lengths[:, None], (self.n_used - columns[:, 0])[:, None], 0)
        return BlockMask.from_kv_blocks(
            counts[:, None].to(torch.int32),
            tables[:, None, None, :].expand(B, 1, n_q, tables.size(1)).to(torch.int32),
            BLOCK_SIZE=(FLEX_Q_BLOCK, bs), mask_mod=visible, seq_lengths=(self.view.T, num_blocks * bs),
            compute_q_blocks=False)


FLEX_Q_BLOCK = 16  # queries per block of the flex block mask (vLLM's choice with small KV blocks)


@functools.cache
def _compiled_flex(dynamic: bool | None) -> Callable[..., Tensor]:
    """flex_attention compiled, once per process and setting of torch.compile's dynamic."""
    return torch.compile(flex_attention, dynamic=dynamic, fullgraph=True)
