"""
Prefill of chunks of different lengths, side by side in one run on one model: the serving runner's packed
prefill (the chunks' tokens back to back in one row, its default) against the same chunks right-padded to
the longest (ModelRunner(packed_prefill=False)), in prefill tokens/s and the ratio packed / padded.

Mixes of chunk lengths, each one step of the runner:
- equal: every chunk as long as the longest (nothing to pad: the ratio shows packing's own cost)
- spread: lengths spread evenly from 1/8 of the longest to the longest (prompts of mixed lengths arriving together)
- one-long: one chunk as long as the longest beside short ones (a long prompt's chunk beside new chat turns)

On a CPU the attention is the gather path (sdpa); on a GPU FlexAttention over the pools, compiled (what
serve.attention auto picks on each).

    .venv/bin/python -m bench.prefill [--depth 4] [--chunks 8] [--longest 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from nanochat.gpt import GPT, GPTConfig
from serving.engine.model_runner import ModelRunner
from serving.engine.scheduler import PrefillChunk
from serving.engine.sequence import Sequence

BLOCK_SIZE = 16


def length_mixes(chunks: int, longest: int) -> dict[str, list[int]]:
    shortest = max(1, longest // 8)
    spread = [round(shortest + (longest - shortest) * i / max(1, chunks - 1)) for i in range(chunks)]
    return {"equal": [longest] * chunks, "spread": spread, "one-long": [longest] + [shortest] * (chunks - 1)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_prefill(model: GPT, lengths: list[int], packed: bool, repeats: int, device: torch.device,
                 dtype: str = "auto") -> float:
    """Median seconds of one runner step prefilling chunks of these lengths (fresh prompts, each the whole of
    its sequence, so each samples a token), after a warm-up step."""
    blocks = [-(-n // BLOCK_SIZE) for n in lengths]
    runner = ModelRunner(model, sum(blocks), BLOCK_SIZE, device, dtype, max_num_seqs=len(lengths),
                         enforce_eager=True, packed_prefill=packed)
    generator = torch.Generator().manual_seed(0)
    chunks, first = [], 0
    for n, k in zip(lengths, blocks, strict=True):
        seq = Sequence(torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist())
        seq.block_table = list(range(first, first + k))
        first += k
        chunks.append(PrefillChunk(seq, 0, n, samples=True))
    times = []
    for _ in range(repeats + 1):
        sync(device)
        started = time.perf_counter()
        runner.run(chunks, [])
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def compare(model: GPT, chunks: int, longest: int, repeats: int, device: torch.device,
            dtype: str = "auto") -> dict[str, Any]:
    """Per mix of lengths: prefill tokens/s packed and padded, and packed / padded."""
    results: dict[str, Any] = {}
    for name, lengths in length_mixes(chunks, longest).items():
        packed, padded = (time_prefill(model, lengths, p, repeats, device, dtype) for p in (True, False))
        tokens = sum(lengths)
        results[name] = {"lengths": lengths, "tokens": tokens, "padded_tokens": len(lengths) * max(lengths),
                         "packed_tokens_per_second": tokens / packed, "padded_tokens_per_second": tokens / padded,
                         "packed_over_padded": padded / packed}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--longest", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(args.depth, args.vocab_size, 2 * args.longest, head_dim=64, n_kv_head=2,
                                    window_pattern="SL"))  # the tiny-cpu preset's shape at d4
    model.init_weights()
    print(f"d{args.depth} (random weights, vocab {args.vocab_size}) on {device}, {args.chunks} chunks of at most "
          f"{args.longest} tokens, median of {args.repeats} steps; prefill tokens/s:")
    print(f"{'mix':10s} {'tokens':>7s} {'padded to':>9s} {'packed':>9s} {'padded':>9s} {'packed/padded':>14s}")
    for name, r in compare(model, args.chunks, args.longest, args.repeats, device).items():
        print(f"{name:10s} {r['tokens']:7d} {r['padded_tokens']:9d} {r['packed_tokens_per_second']:9.0f} "
              f"{r['padded_tokens_per_second']:9.0f} {r['packed_over_padded']:13.2f}x")


if __name__ == "__main__":
    main()
