"""
Decode steps replayed as CUDA graphs. On a GPU the eager decode of a small model is bound by the host:
hundreds of kernel launches per step, while the GPU is busy for a fraction of the step.
So the decode forward is captured once per batch-size bucket and each step replays it (nano-vllm, vLLM).

Notable:
- a graph has fixed shapes, so every row attends over the longest context the engine allows (max_model_len in
  whole blocks): block tables are padded with a scratch block, the last block of each pool (one past those
  the block manager hands out), and the causal mask hides everything past a row's position. Padding rows
  decode token 0 at position 0 and write only into the scratch blocks. A window pool's table comes after
  the full one's; its entries behind the window (-1) read block 0 and are masked by the window.
- batch sizes are bucketed (1, 2, 4, 8, then multiples of 8, as vLLM's capture sizes) and a step of n
  decodes replays the smallest bucket >= n, the rows past n being padding. How far the buckets go depends
  on the attention. FlexAttention (serve.attention flex, auto's choice on a GPU) visits only the blocks
  each row holds (its block mask counts them on the device, inside the graph), so a row's cost follows its
  own context and graphs cover every batch up to max_num_seqs. The gather path (sdpa) copies and attends
  over all max_model_len keys of every row, slower than eager for large batches, so there graphs stop at
  8 decodes and larger batches run eagerly (bench/gpu.py measures graphs against eager).
- the inputs live in static buffers that each step overwrites (token, position, the token before, block
  table) with one host-to-device copy; the view over them (serving/engine/paged_cache.py's PagedView) is
  built inside the capture, so its index arithmetic replays too. The graphs share one memory pool, captured
  largest first.
- with compile (serve.compile_decode) the forward over the buffers is compiled once, with the batch size
  symbolic (one graph for every bucket, as vLLM compiles its model), before the graphs capture it: each
  replay then runs fused kernels. A forward that fails to compile is logged and the graphs capture it
  uncompiled, so a compiler problem costs speed, not the server.
- without capture (a CPU, or a test) the same buffers run through the same forward eagerly (or compiled).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

from nanochat.gpt import GPT
from serving.engine.paged_cache import PagedKVCache, PagedView
from serving.engine.sequence import Sequence

logger = logging.getLogger(__name__)

MAX_SDPA_GRAPH_BATCH = 8  # see above: larger decode batches through the gather path are faster eager


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8, up to and including max_num_seqs."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted({*sizes, max_num_seqs})


class DecodeGraphs:
    """The decode forward over static input buffers: one CUDA graph per batch bucket, or (capture=False) run
    through the same buffers without graphs; compiled first when compile (module docstring)."""

    def __init__(self, model: GPT, cache: PagedKVCache, max_num_seqs: int, max_model_len: int, capture: bool,
                 compile: bool = False):
        self.model, self.cache = model, cache
        self._step = torch.compile(self._forward, dynamic=True, fullgraph=True) if compile else self._forward
        self.scratch = [pool.num_blocks - 1 for pool in cache.pools]  # each pool's last block (module docstring)
        self.max_blocks = -(-max_model_len // cache.block_size)
        self.buckets = batch_buckets(max_num_seqs if cache.attention == "flex"
                                     else min(max_num_seqs, MAX_SDPA_GRAPH_BATCH))
        device, B = cache.device, self.buckets[-1]
        # one buffer, one copy per step: column 0 the token, 1 its position, 2 the token before it (smear reads
        # it), then the block table of each pool
        self.inputs = torch.zeros(B, 3 + self.max_blocks * len(cache.pools), dtype=torch.long, device=device)
        self.ones = torch.ones(B, dtype=torch.long, device=device)  # every row computes one new token
        self.real = torch.arange(B, device=device)  # every row is a real new token: its flat index is its row
        # a padding row (token 0 at position 0, every table entry its pool's scratch block) per bucket row
        self.padding = np.zeros((B, self.inputs.size(1)), dtype=np.int64)
        for i, scratch in enumerate(self.scratch):
            self.padding[:, 3 + i * self.max_blocks : 3 + (i + 1) * self.max_blocks] = scratch
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Tensor] = {}
        if capture:
            self._capture()

    @property
    def compiled(self) -> bool:
        """Whether the decode step runs compiled (asked for, and not fallen back from)."""
        return self._step != self._forward

    def serves(self, n: int) -> bool:
        """Whether a decode batch of n sequences has a bucket (larger ones are left to the eager path)."""
        return n <= self.buckets[-1]

    def run(self, seqs: list[Sequence], tokens: Tensor | None = None) -> Tensor:
        """float32 logits (len(seqs), vocab_size) of each sequence's next token; its last token is computed.
        tokens: those last tokens on the device, when some are still pending there (async scheduling)."""
        n = len(seqs)
        bucket = next(b for b in self.buckets if b >= n)
        self.inputs[:bucket].copy_(self._host_inputs(seqs, bucket), non_blocking=True)
        if tokens is not None:
            self.inputs[:n, 0] = tokens
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            return self.outputs[bucket][:n, 0].clone()
        return self._forward_through_step(bucket)[:n, 0]

    def _host_inputs(self, seqs: list[Sequence], bucket: int) -> Tensor:
        """The step's input rows, built in numpy from a copy of the padding (a slice assignment per table
        rather than a Python list of every entry: a host-bound step has no time to spare)."""
        rows = self.padding[:bucket].copy()
        n = self.max_blocks
        for i, seq in enumerate(seqs):
            last = len(seq) - 1  # a pending last token (not in token_ids yet) comes through run's tokens
            token = seq.token_ids[last] if not seq.num_pending else 0
            rows[i, :3] = token, last, seq.token_ids[last - 1] if last else 0
            for p, table in enumerate([seq.block_table, seq.window_table][: len(self.scratch)]):
                rows[i, 3 + p * n : 3 + p * n + len(table)] = table
        host = torch.from_numpy(rows)
        return host.pin_memory() if self.cache.device.type == "cuda" else host  # pinned: the copy is async

    def _forward(self, bucket: int) -> Tensor:
        inputs, n = self.inputs[:bucket], self.max_blocks
        tables = [inputs[:, 3 + i * n : 3 + (i + 1) * n] for i in range(len(self.scratch))]
        view = PagedView(self.cache, tables, inputs[:, 1], self.ones[:bucket], 1, self.real[:bucket],
                         self.max_blocks * self.cache.block_size)
        return self.model.forward_cached(inputs[:, :1], view, prev_idx=inputs[:, 2])

    def _forward_through_step(self, bucket: int) -> Tensor:
        """The forward, compiled when asked; a compiled step that fails falls back to the plain one, once."""
        if not self.compiled:
            return self._forward(bucket)
        try:
            return self._step(bucket)
        except Exception as e:  # the compiler's, whatever its kind: the plain forward still serves
            logger.warning("the decode step did not compile (%s: %s); decoding with it uncompiled",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self._step = self._forward
            return self._forward(bucket)

    def _capture(self) -> None:
        self.inputs.copy_(torch.from_numpy(self.padding))  # every row padding while capturing: only scratch blocks are written
        pool = None
        for bucket in reversed(self.buckets):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up off the capture (allocator, kernels' lazy init)
                for _ in range(2):
                    self._forward_through_step(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self._step(bucket)
            pool = graph.pool()
            self.graphs[bucket] = graph
        torch.cuda.synchronize()
