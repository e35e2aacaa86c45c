"""
Sliding-window layers keeping only their window (serve.hybrid_kv_cache), side by side in one run:

1. capacity: for each preset, a KV cache of the same memory (the preset's serve.num_blocks blocks of
   every layer on the CPU preset; --gpu-kv-gib of bfloat16 on the GPU presets) at its serve settings:
   how many tokens of full context it holds with one pool and with a window pool, and the ratio.
   Arithmetic only (the engine's own kv_cache_split), on models built on the meta device.
2. under memory pressure: a random-weight model of the tiny-cpu preset's shape (d4, window pattern SL,
   512-token context; --window-pattern and --context change it), --concurrency requests of
   --prompt-tokens + --max-tokens each, all sent at once, through two engines of the same --num-blocks
   (the preset's serve.num_blocks) and max_num_seqs = --concurrency: one pool, then the window pool.
   Output tokens/s, preemptions, the most sequences running at once, the pools' blocks, and whether
   both gave the same (greedy) tokens.

    .venv/bin/python -m bench.window_kv [--num-blocks 512] [--concurrency 32] [--prompt-tokens 256]
        [--max-tokens 200] [--window-pattern SL] [--context 512] [--gpu-kv-gib 40]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.serving import bench_tokenizer, made_up_words, tiny_shaped_model
from nanochat.config import load_config
from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from serving.engine.kv_cache_size import kv_cache_blocks, kv_cache_split
from serving.engine.llm_engine import LLMEngine
from serving.engine.sequence import SamplingParams
from trainer.stages.base import model_config

PRESETS = {"tiny-cpu": None, "d20": "gpu", "d24": "gpu", "d26": "gpu"}


def capacity(preset: str, gpu_kv_gib: float) -> tuple[int, int]:
    """Full-context blocks with one pool and with a window pool, for the preset's model and serve settings
    in a KV cache of the same memory."""
    cfg = load_config(preset)
    serve = cfg.serve
    with torch.device("meta"):
        model = GPT(model_config(cfg, cfg.tokenizer.vocab_size))
    num_blocks = serve.num_blocks
    if PRESETS[preset] == "gpu":  # bfloat16 keys and values of every layer
        num_blocks = kv_cache_blocks(model, serve.block_size, torch.bfloat16, 1.0, int(gpu_kv_gib * 2**30))
    split = kv_cache_split(model, num_blocks, serve.block_size, serve.max_num_seqs, serve.max_num_batched_tokens)
    return num_blocks, split.num_full_blocks if split else num_blocks


def under_pressure(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], args: argparse.Namespace,
                   hybrid: bool) -> dict:
    """Every prompt at once through an engine of args.num_blocks blocks: tokens/s, preemptions, the most
    sequences running at once, and the tokens of each request."""
    engine = LLMEngine(model, tokenizer, num_blocks=args.num_blocks, block_size=16, max_num_seqs=args.concurrency,
                       max_num_batched_tokens=512, hybrid_kv_cache=hybrid)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, min_tokens=args.max_tokens)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    peak_running = 0
    start = time.perf_counter()
    while engine.has_work():
        for event in engine.step():
            if event.token_id is not None:
                tokens[event.request_id].append(event.token_id)
        peak_running = max(peak_running, engine.scheduler.num_running)
    seconds = time.perf_counter() - start
    stats = engine.stats()
    return {"tokens/s": sum(map(len, tokens.values())) / seconds, "preemptions": stats["preemptions"],
            "peak running": peak_running, "full blocks": stats["total_blocks"],
            "window blocks": stats["total_window_blocks"], "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-blocks", type=int, default=512, help="KV-cache blocks (of 16 tokens, every layer) "
                        "of both engines under pressure")
    parser.add_argument("--window-pattern", default=None, help="the model's (default: the tiny-cpu preset's)")
    parser.add_argument("--context", type=int, default=512, help="the model's sequence_len (its window: a quarter)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--gpu-kv-gib", type=float, default=40.0, help="KV memory of the GPU presets' capacity rows")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"capacity: tokens of full context a KV cache of the same memory holds (GPU presets: {args.gpu_kv_gib:g} "
          f"GiB of bfloat16)")
    print(f"{'preset':<10} {'one pool':>12} {'window pool':>12} {'ratio':>7}")
    for preset in PRESETS:
        one, split = capacity(preset, args.gpu_kv_gib)
        block = load_config(preset).serve.block_size
        print(f"{preset:<10} {one * block:>12,} {split * block:>12,} {split / one:>6.2f}x")

    tokenizer = bench_tokenizer(4096)
    model = tiny_shaped_model(tokenizer, args.context,
                              **({"window_pattern": args.window_pattern} if args.window_pattern else {}))
    ids = tokenizer.encode(made_up_words(4 * args.prompt_tokens))
    prompts = [[tokenizer.get_bos_token_id()] + ids[i : i + args.prompt_tokens - 1] for i in range(args.concurrency)]
    print(f"\nunder memory pressure: d{model.config.n_layer} {model.config.window_pattern} at a {args.context}-token context, "
          f"{args.concurrency} requests of {args.prompt_tokens} + {args.max_tokens} tokens, {args.num_blocks} blocks of "
          f"16 tokens ({args.num_blocks * 16:,} tokens in one pool)")
    results = {hybrid: under_pressure(model, tokenizer, prompts, args, hybrid) for hybrid in (False, True)}
    print(f"{'':<12} {'tokens/s':>9} {'preempted':>10} {'peak running':>13} {'full blocks':>12} {'window blocks':>14}")
    for hybrid, r in results.items():
        print(f"{'window pool' if hybrid else 'one pool':<12} {r['tokens/s']:>9.0f} {r['preemptions']:>10} "
              f"{r['peak running']:>13} {r['full blocks']:>12} {r['window blocks']:>14}")
    print(f"window pool / one pool: {results[True]['tokens/s'] / results[False]['tokens/s']:.2f}x tokens/s; "
          f"same tokens: {results[True]['tokens'] == results[False]['tokens']}")


if __name__ == "__main__":
    main()
