"""
The model side of a step: turns the scheduler's prefill chunks and decodes into forwards of the GPT
through the paged KV cache, and returns the logits that will be sampled.

Notable:
- owns the model (in eval mode, on its device) and the KV pools (serving/engine/paged_cache.py); the
  sequences' block tables, from the block manager, say where each token's keys and values go.
- at most two forwards a step: all decodes together as a (B, 1) batch, and all prefill chunks together,
  packed: their tokens back to back in one (1, N) row, so no token-wise part of the forward computes
  padding, however different the chunks' lengths (attention takes the rows apart: paged_cache.py).
  Keeping the two apart means the decodes, the common case, never pay for a chunk's length. With
  packed_prefill=False the chunks are (B, T_max) rows right-padded to the longest (bench/prefill.py
  compares the two).
- logits are computed only where they are used (the lm_head over the vocabulary, and the float32 softcap
  after it, would otherwise run at every prompt position): the last position of a row that needs a next
  token, while a chunk that stops short of the end of its sequence only fills the cache. The order
  matches ScheduledBatch.sampled_seqs: sampling chunks first, then decodes. A sequence that scores its
  prompt (Sequence.scores_prompt) also gets the rows of its chunk's prompt positions, returned apart
  as PromptLogits, row i predicting the token at start + i + 1. A chunk's forks (siblings of an n > 1
  request) get copies of its sampling row, and their partly filled last blocks are copied from its
  once the prefill has written them.
- reads sequences and never changes them: the scheduler's launched() advances num_cached_tokens.
- everything under torch.inference_mode(): no autograd bookkeeping, and the pools are written in place.
- on a GPU, decode batches replay CUDA graphs (serving/engine/cuda_graphs.py) unless enforce_eager: every
  batch up to max_num_seqs with flex attention, up to 8 with sdpa's gather; each pool then holds one block
  more than the block manager hands out, the graphs' scratch block. With compile_decode the graphs replay
  the decode step compiled.
- with num_window_blocks, the sliding-window layers keep their KV in a window pool of their own, read
  through each sequence's window_table (block_manager.py's window group).
- attention (serve.attention): "flex" reads the pools in place through FlexAttention, compiled, with no
  per-step gather (paged_cache.py); "sdpa" gathers each row's blocks for masked SDPA; "auto" is flex on a
  GPU and sdpa on a CPU, where flex runs uncompiled and materialises the scores over the whole pool. A
  flex runner computes one token at start, so a device where flex cannot run fails then, naming the key.
- weights in serve.dtype: "auto" is bfloat16 on a GPU (half the bytes each decode step reads, and the
  tensor cores) and float32 on a CPU, where bfloat16 matmuls of a few rows are slower; logits stay float32.
  The KV pools are in serve.kv_cache_dtype ("auto": the weights' dtype; vLLM's kv_cache_dtype), and
  attention runs in it: bfloat16 pools under float32 weights halve what a CPU gathers and reads per step
  (attention over long contexts is memory-bound there) and hold twice the tokens in the same memory.
"""

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanochat.gpt import GPT
from serving.engine.block_manager import BlockCopy
from serving.engine.cuda_graphs import DecodeGraphs
from serving.engine.paged_cache import Attention, PagedKVCache
from serving.engine.scheduler import PrefillChunk
from serving.engine.sequence import Sequence
from serving.engine.transfer import to_device

ServeDtype = Literal["auto", "float32", "bfloat16"]
ServeAttention = Literal["auto", "sdpa", "flex"]
# cuDNN's attention is left out: it builds a plan for each new shape, and a decode's key length grows every step
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def resolve_dtype(dtype: ServeDtype, device: torch.device | str) -> torch.dtype:
    """The torch dtype the engine serves in on `device` (vLLM's --dtype auto picks bfloat16 likewise)."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: must be one of auto, float32, bfloat16")
    return getattr(torch, dtype)


def resolve_kv_dtype(kv_cache_dtype: ServeDtype, weights: torch.dtype) -> torch.dtype:
    """The KV pools' dtype: the weights' under "auto", else the one named."""
    if kv_cache_dtype == "auto":
        return weights
    if kv_cache_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: must be one of auto, float32, bfloat16")
    return getattr(torch, kv_cache_dtype)


def resolve_attention(attention: ServeAttention, device: torch.device | str) -> Attention:
    """The paged attention the engine runs on `device`: auto is flex on a GPU, sdpa elsewhere."""
    if attention == "auto":
        return "flex" if torch.device(device).type == "cuda" else "sdpa"
    if attention not in ("sdpa", "flex"):
        raise ValueError(f"serve.attention={attention!r}: must be one of auto, sdpa, flex")
    return attention


@dataclass
class PromptLogits:
    """Logits at prompt positions start, start + 1, ... of seq: row i predicts token start + i + 1."""

    seq: Sequence
    start: int
    logits: Tensor  # (rows, vocab_size), float32


@dataclass
class StepLogits:
    sampled: Tensor  # (N, vocab_size): one row per sequence of ScheduledBatch.sampled_seqs, in its order
    prompt: list[PromptLogits]  # the prompt rows of the sequences that score their prompt


class ModelRunner:
    def __init__(self, model: GPT, num_blocks: int, block_size: int, device: torch.device | str,
                 dtype: ServeDtype = "auto", *, max_num_seqs: int = 16, max_model_len: int | None = None,
                 enforce_eager: bool = False, attention: ServeAttention = "auto", compile_flex: bool | None = None,
                 kv_cache_dtype: ServeDtype = "auto", num_window_blocks: int = 0, compile_decode: bool = False,
                 packed_prefill: bool = True):
        """compile_flex: run flex attention compiled (default: on a GPU only); num_window_blocks: the
        sliding-window layers' KV in a pool of their own of that many blocks (0: in the one pool);
        compile_decode: the CUDA graphs replay the decode step compiled (cuda_graphs.py); packed_prefill:
        a step's prefill chunks go back to back in one row (else right-padded rows)."""
        self.device = torch.device(device)
        self.packed_prefill = packed_prefill
        self.dtype = resolve_dtype(dtype, self.device)
        self.attention = resolve_attention(attention, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        graphs = self.device.type == "cuda" and not enforce_eager
        # with graphs, one block past those the block manager hands out in each pool: the graphs' scratch block
        extra = int(graphs)
        self.cache = PagedKVCache.for_model(self.model, num_blocks + extra, block_size,
                                            resolve_kv_dtype(kv_cache_dtype, self.dtype), attention=self.attention,
                                            compile_flex=compile_flex,
                                            num_window_blocks=num_window_blocks + extra if num_window_blocks else 0)
        if self.attention == "flex":
            self._check_flex()
        self.graphs = None
        if graphs:
            with torch.inference_mode(), sdpa_kernel(ATTENTION_BACKENDS):
                self.graphs = DecodeGraphs(self.model, self.cache, max_num_seqs,
                                           max_model_len or num_blocks * block_size, capture=True,
                                           compile=compile_decode)

    @torch.inference_mode()
    def _check_flex(self) -> None:
        """One token through the flex path (compiling its kernels on a GPU), written to block 0 while no
        sequence holds it: where flex cannot run, the engine fails now, naming the setting."""
        probe = Sequence([0])
        probe.block_table = [0]
        probe.window_table = [0] if self.cache.window_pool is not None else []
        try:
            self._forward([(probe, 0, 1)])
        except Exception as e:
            raise RuntimeError(f"serve.attention=flex cannot run on {self.device} ({type(e).__name__}: {e}); "
                               f"set serve.attention=sdpa") from e

    @torch.inference_mode()
    @sdpa_kernel(ATTENTION_BACKENDS)
    def run(self, prefill_chunks: list[PrefillChunk], decode_seqs: list[Sequence],
            block_copies: list[BlockCopy] | tuple[()] = (), decode_tokens: Tensor | None = None) -> StepLogits:
        """float32 logits (N, vocab_size), one row per sequence that gets a next token this step, and
        those of the prompt positions of sequences that score their prompt. block_copies: forks' blocks
        to copy after the prefill. decode_tokens: each decode's input (its last token) on the device, for
        a step launched while the one before, which samples some of them, still runs (async scheduling);
        by default they are read from the sequences. Nothing here waits for the device."""
        logits, prompt = [], []
        if prefill_chunks:
            last, prompt = self._prefill(prefill_chunks)
            logits.append(last)
        if block_copies:
            self.cache.copy_blocks(list(block_copies))
        if decode_seqs and self.graphs is not None and self.graphs.serves(len(decode_seqs)):
            logits.append(self.graphs.run(decode_seqs, decode_tokens))
        elif decode_seqs:
            logits.append(self._forward([(seq, len(seq) - 1, 1) for seq in decode_seqs], tokens=decode_tokens))
        if not logits:
            return StepLogits(torch.empty(0, self.model.config.vocab_size, device=self.device), prompt)
        return StepLogits(torch.cat(logits), prompt)

    def _prefill(self, chunks: list[PrefillChunk]) -> tuple[Tensor, list[PromptLogits]]:
        """One forward over the chunks, with logits at the last position of each sampling chunk and at
        the prompt positions of those that score their prompt (all but the prompt's last, which is
        the sampling position or lies past the chunk)."""
        # where each chunk's first token sits in the forward's tokens: back to back, or where its row starts
        lengths = [c.length for c in chunks]
        firsts = _starts(lengths) if self.packed_prefill else [b * max(lengths) for b in range(len(chunks))]
        sampled, scored, spans = [], [], []
        for first, c in zip(firsts, chunks, strict=True):
            if c.seq.scores_prompt:
                end = min(c.start + c.length, c.seq.num_prompt_tokens - 1)
                if end > c.start:
                    spans.append((c.seq, c.start, len(scored), end - c.start))
                    scored.extend(range(first, first + end - c.start))
            if c.samples:
                sampled.extend([first + c.length - 1] * (1 + len(c.forks)))
        rows = self._forward([(c.seq, c.start, c.length) for c in chunks], sampled + scored,
                             packed=self.packed_prefill)
        prompt = [PromptLogits(seq, start, rows[len(sampled) + i : len(sampled) + i + n])
                  for seq, start, i, n in spans]
        return rows[: len(sampled)], prompt

    def _forward(self, rows: list[tuple[Sequence, int, int]], logits_at: list[int] | None = None,
                 tokens: Tensor | None = None, packed: bool = False) -> Tensor:
        """Computes seq.token_ids[start : start + length] of each row; the logits at logits_at (indices
        into the forward's tokens: the rows' back to back if packed, else the rows' padded to the longest,
        row-major), or by default at each row's last. tokens: the rows' one token each, on the device,
        instead of token_ids (decodes of pending tokens)."""
        for seq, start, length in rows:
            if start + length > len(seq):
                raise ValueError(f"sequence {seq.id} has {len(seq)} tokens, "
                                 f"asked to compute positions {start}..{start + length - 1}")
        lengths = [length for _, _, length in rows]
        T = max(lengths)
        if logits_at is None:  # each row's last token
            ends = itertools.accumulate(lengths) if packed else (b * T + n for b, n in enumerate(lengths))
            logits_at = [end - 1 for end in ends]
        if tokens is not None:
            idx = tokens[:, None]
        elif packed:
            idx = [[t for seq, start, length in rows for t in seq.token_ids[start : start + length]]]
        else:
            idx = [seq.token_ids[start : start + length] + [0] * (T - length) for seq, start, length in rows]
        # what smear mixes in: the token before each row's first or, packed, before each token
        if packed:
            prev = [[t for seq, start, length in rows for t in ([seq.token_ids[start - 1]] if start else [0])
                     + seq.token_ids[start : start + length - 1]]]
        else:
            prev = [seq.token_ids[start - 1] if start else 0 for seq, start, _ in rows]
        window_tables = [seq.window_table for seq, _, _ in rows] if self.cache.window_pool is not None else None
        view = self.cache.view([seq.block_table for seq, _, _ in rows], [start for _, start, _ in rows],
                               lengths, window_tables, packed=packed)
        return self.model.forward_cached(idx if tokens is not None else to_device(idx, self.device), view,
                                         to_device(logits_at, self.device, torch.long),
                                         prev_idx=to_device(prev, self.device, torch.long))


def _starts(lengths: list[int]) -> list[int]:
    """Where each of rows of these lengths begins when they are laid back to back."""
    return list(itertools.accumulate(lengths[:-1], initial=0))
