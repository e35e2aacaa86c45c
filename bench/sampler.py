"""
What a decode step's sampling costs per batch, side by side in one run: rows that filter by top_p alone
(0.95), which sort each row's whole vocabulary first (the path every sampled row once took); rows with a
top_k (nanochat's chat: 50), which sort only the top-k's candidates; and rows that keep every token (no
top-k, top_p 1: OpenAI's and vLLM's defaults), which draw in vocabulary order with no sort. Ratios: the
whole sort's time over each. Then the tiny model's decode step (LLMEngine.step() on a batch in its decode
phase) at temperature 1 with top_p 0.95 and with neither, to put the sampling in proportion.

    .venv/bin/python -m bench.sampler [--batch 1,32,64] [--vocab 4096,32768] [--repeats 5]

Times are CPU times of this process (steadier than wall time on a shared machine), the best of --repeats
rounds of --steps calls. Run it as a module (-m).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.serving import bench_tokenizer, prompts, tiny_shaped_model
from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from serving.engine.llm_engine import LLMEngine
from serving.engine.sampler import make_generator, sample
from serving.engine.sequence import SamplingParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,32,64", help="rows per step (comma-separated)")
    parser.add_argument("--vocab", default="4096,32768", help="vocabulary sizes: tiny-cpu's, then d20's")
    parser.add_argument("--steps", type=int, default=20, help="sample() calls per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the best is kept")
    parser.add_argument("--engine-steps", type=int, default=64, help="decode steps of the engine comparison")
    return parser.parse_args()


def best_cpu_ms(fn, steps: int, repeats: int) -> float:
    fn()  # warm-up
    rounds = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(steps):
            fn()
        rounds.append((time.process_time() - started) / steps * 1e3)
    return min(rounds)


def sampling_ms(batch: int, vocab: int, params: SamplingParams, args: argparse.Namespace) -> float:
    logits = 3 * torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0))
    generators = [make_generator(i) for i in range(batch)]
    return best_cpu_ms(lambda: sample(logits, [params] * batch, generators), args.steps, args.repeats)


def engine_step_ms(model: GPT, tokenizer: Tokenizer, batch: int, params: SamplingParams,
                   args: argparse.Namespace) -> float:
    """One decode step of model with every row sampled by params (CPU ms)."""
    engine = LLMEngine(model, tokenizer, num_blocks=batch * 24, block_size=16, max_num_seqs=batch,
                       max_num_batched_tokens=1024)
    steps = args.engine_steps
    for i, prompt in enumerate(prompts(tokenizer, batch)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=params.temperature, top_p=params.top_p,
                                                           seed=i, max_tokens=2 * steps, min_tokens=2 * steps))
    while any(seq.num_cached_tokens < seq.num_prompt_tokens for seq in engine.scheduler.running) \
            or engine.scheduler.num_waiting:
        engine.step()  # the prefills: what is timed is decode steps only
    return best_cpu_ms(engine.step, steps // args.repeats, args.repeats)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    unfiltered, filtered = SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.95)
    top_k = SamplingParams(temperature=1.0, top_k=50)
    print("sample() per step, CPU ms (best of rounds), 1 torch thread")
    print(f"{'vocab':>6} {'batch':>6} {'top_p 0.95 (sort)':>18} {'top_k 50':>10} {'ratio':>7} "
          f"{'neither (no sort)':>18} {'ratio':>7}")
    for vocab in (int(v) for v in args.vocab.split(",")):
        for batch in (int(b) for b in args.batch.split(",")):
            sorted_ms = sampling_ms(batch, vocab, filtered, args)
            top_k_ms = sampling_ms(batch, vocab, top_k, args)
            plain_ms = sampling_ms(batch, vocab, unfiltered, args)
            print(f"{vocab:>6} {batch:>6} {sorted_ms:>18.3f} {top_k_ms:>10.3f} {sorted_ms / top_k_ms:>6.2f}x "
                  f"{plain_ms:>18.3f} {sorted_ms / plain_ms:>6.2f}x")
    batch = max(int(b) for b in args.batch.split(","))
    tokenizer = bench_tokenizer(4096)
    model = tiny_shaped_model(tokenizer, 1024)
    sorted_step = engine_step_ms(model, tokenizer, batch, filtered, args)
    plain_step = engine_step_ms(model, tokenizer, batch, unfiltered, args)
    print(f"\nLLMEngine decode step, d4 tiny-cpu shape, {batch} rows at temperature 1, CPU ms: "
          f"top_p 0.95 {sorted_step:.2f}, neither {plain_step:.2f} ({sorted_step / plain_step:.2f}x)")


if __name__ == "__main__":
    main()
