"""
Serving throughput, side by side in one run on one model: requests one at a time through nanochat's own
generator (a contiguous KV cache, as `nanochat chat` serves) against the continuous-batching engine at
several concurrencies; time to first token on a long shared prefix with and without the prefix cache
holding it; optionally the same concurrency sweep over HTTP through the local app with the official
`openai` client.

    .venv/bin/python -m bench.serving [--depth 4] [--model URI] [--concurrency 1,4,16,32] [--max-tokens 32]
                                       [--prefix-tokens 1000] [--http] [--threads 2] [--vocab-size 512] [--score-prompt]

Without --model the model is a d<depth> GPT with random weights (a tiny tokenizer trained here): what is
measured is the serving machinery, not the text. --vocab-size past 512 trains that tokenizer on made-up
words instead, for a vocabulary of a real model's size (nanochat's: 65536), whose lm_head weighs on a
prefill. Every request asks for exactly --max-tokens tokens
(min_tokens keeps the stop tokens out); the sequential baseline stops at a stop token, so its tokens/s
counts the tokens it produced. Run it as a module (-m): as a script, its name would hide the serving package.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import socket
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from nanochat.generate import generate
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from serving.engine.llm_engine import AsyncEngine, LLMEngine
from serving.engine.sequence import SamplingParams

TEXT = ("the quick brown fox jumps over the lazy dog while the cat sleeps by the fire; "
        "numbers like 12, 345 and 6789 appear now and then, as do questions: how are you today? ")


@dataclass
class Result:
    name: str
    requests: int
    tokens: int
    seconds: float
    ttft: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def median_ttft(self) -> float:
        return statistics.median(self.ttft) if self.ttft else float("nan")


def made_up_words(count: int, seed: int = 0) -> str:
    """count words of 1-4 random syllables: text with enough distinct pieces to train a large vocabulary."""
    rng = random.Random(seed)
    syllables = sorted({a + b for a in "bcdfghjklmnprstvwz" for b in "aeiouy"}
                       | {a + b + c for a in "bcdfgklmnprst" for b in "aeiou" for c in "nrst"})
    return "".join(" " + "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(count))


def bench_tokenizer(vocab_size: int) -> Tokenizer:
    if vocab_size <= 512:
        return Tokenizer.train_from_iterator([TEXT * 20], vocab_size)
    text = TEXT * 20 + made_up_words(max(300_000, 10 * vocab_size))
    return Tokenizer.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], vocab_size)


def random_model(depth: int, tokenizer: Tokenizer, sequence_len: int) -> GPT:
    """A d<depth> GPT with random weights everywhere (nanochat's init zeroes output projections)."""
    model = GPT(GPTConfig.from_depth(depth, vocab_size=tokenizer.vocab_size, sequence_len=sequence_len))
    torch.manual_seed(0)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 2.0 * p.size(1) ** -0.5)
    return model.eval()


def prompts(tokenizer: Tokenizer, count: int) -> list[list[int]]:
    """count different short prompts (~20 tokens)."""
    words = TEXT.split()
    return [tokenizer.encode(" ".join(words[i % len(words):] + words[: i % len(words)])[:100], prepend="<|bos|>")
            for i in range(count)]


def sequential(model: GPT, tokenizer: Tokenizer, batch: list[list[int]], max_tokens: int) -> Result:
    """nanochat's generator, one request at a time, greedy."""
    tokens, ttft = 0, []
    start = time.perf_counter()
    for prompt in batch:
        t0 = time.perf_counter()
        for i, (column, _) in enumerate(generate(model, tokenizer, prompt, max_tokens=max_tokens, temperature=0.0)):
            if i == 0:
                ttft.append(time.perf_counter() - t0)
            tokens += column[0] >= 0
    return Result("sequential (contiguous cache)", len(batch), tokens, time.perf_counter() - start, ttft)


async def run_engine(engine: AsyncEngine, batch: list[list[int]], max_tokens: int, concurrency: int,
                     tag: str, prompt_logprobs: int | None = None) -> tuple[int, list[float]]:
    """batch through the engine, at most `concurrency` requests at a time: tokens produced, TTFTs."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens,
                            prompt_logprobs=prompt_logprobs)
    gate = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    tokens = 0

    async def one(i: int, prompt: list[int]) -> None:
        nonlocal tokens
        async with gate:
            t0 = time.perf_counter()
            first = True
            async for event in engine.generate(f"{tag}-{i}", prompt, params):
                if event.token_id is not None:
                    if first:
                        ttft.append(time.perf_counter() - t0)
                        first = False
                    tokens += 1

    await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)))
    return tokens, ttft


def concurrent(engine: AsyncEngine, batch: list[list[int]], max_tokens: int, concurrency: int) -> Result:
    start = time.perf_counter()
    tokens, ttft = asyncio.run(run_engine(engine, batch, max_tokens, concurrency, f"c{concurrency}"))
    return Result(f"engine, {concurrency} concurrent", len(batch), tokens, time.perf_counter() - start, ttft)


def prefix_ttft(engine: AsyncEngine, tokenizer: Tokenizer, prefix_tokens: int, repeats: int,
                score_prompt: bool = False) -> tuple[float, float, float | None]:
    """Median TTFT of a ~prefix_tokens prompt: each time a new prefix (nothing cached), and a shared prefix
    the cache already holds (a warm-up request put it there) with a different question at the end; with
    score_prompt, also new prefixes whose every position is scored (prompt_logprobs=1: echo + logprobs)."""
    words = (TEXT * (prefix_tokens // 10 + 10)).split()

    def long_prompt(seed: int, question: int) -> list[int]:
        body = tokenizer.encode(" ".join(words[seed:]), prepend="<|bos|>")[:prefix_tokens]
        return body + tokenizer.encode(f" question {question}?")

    async def ttft_of(prompts_: list[list[int]], tag: str, prompt_logprobs: int | None = None) -> list[float]:
        times = []
        for i, prompt in enumerate(prompts_):  # one at a time: TTFT alone, not queued behind another
            _, [t] = await run_engine(engine, [prompt], 1, 1, f"{tag}{i}", prompt_logprobs)
            times.append(t)
        return times

    cold = asyncio.run(ttft_of([long_prompt(1 + i, i) for i in range(repeats)], "cold"))
    scored = None
    if score_prompt:
        scored = statistics.median(asyncio.run(ttft_of([long_prompt(100 + i, i) for i in range(repeats)], "scored", 1)))
    asyncio.run(ttft_of([long_prompt(0, 999)], "warmup"))
    warm = asyncio.run(ttft_of([long_prompt(0, i) for i in range(repeats)], "warm"))
    return statistics.median(cold), statistics.median(warm), scored


def over_http(engine: AsyncEngine, tokenizer: Tokenizer, batch_texts: list[str], max_tokens: int,
              concurrency: int) -> Result:
    """The same requests as streamed completions through the local app under uvicorn, `concurrency`
    client threads at a time, with the official openai client."""
    import openai
    import uvicorn

    from serving.api.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tokenizer, max_tokens_limit=max(max_tokens, 1024)),
                                           host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    lock = threading.Lock()
    tokens, ttft = 0, []
    queue = list(batch_texts)

    def worker() -> None:
        nonlocal tokens
        while True:
            with lock:
                if not queue:
                    return
                text = queue.pop()
            t0 = time.perf_counter()
            first = True
            stream = client.completions.create(model="nanochat", prompt=text, max_tokens=max_tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"min_tokens": max_tokens})
            for chunk in stream:
                if first and chunk.choices and chunk.choices[0].text:
                    with lock:
                        ttft.append(time.perf_counter() - t0)
                    first = False
                if chunk.usage is not None:
                    with lock:
                        tokens += chunk.usage.completion_tokens

    start = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(concurrency)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - start
    server.should_exit = True
    thread.join(timeout=10)
    return Result(f"HTTP + openai client, {concurrency} concurrent", len(batch_texts), tokens, seconds, ttft)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4, help="depth of the random model (without --model)")
    parser.add_argument("--model", default=None, help="a checkpoint: <storage>/runs/<run>/<stage>[/step_XXXXXX]")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--requests", type=int, default=0, help="requests per engine run (default: 2 x the largest concurrency)")
    parser.add_argument("--sequential-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--prefix-repeats", type=int, default=3)
    parser.add_argument("--http", action="store_true", help="also the sweep over HTTP with the openai client")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=512, help="the tokenizer's (without --model)")
    parser.add_argument("--score-prompt", action="store_true",
                        help="also the TTFT of a prompt scored at every position (prompt_logprobs, echo + logprobs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]

    if args.model:
        from serving.model_source import ModelSource

        model, tokenizer, _ = ModelSource.parse(args.model).load("cpu")
        described = args.model
    else:
        tokenizer = bench_tokenizer(args.vocab_size)
        model = random_model(args.depth, tokenizer, sequence_len=max(2048, args.prefix_tokens + 256))
        described = f"d{args.depth} random weights, vocab {tokenizer.vocab_size}"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {described} ({n_params / 1e6:.1f}M parameters), {args.max_tokens} output tokens per request, "
          f"{args.threads} torch threads")

    count = args.requests or 2 * max(levels)
    batch = prompts(tokenizer, count)
    results = [sequential(model, tokenizer, batch[: args.sequential_requests], args.max_tokens)]
    engine = AsyncEngine(LLMEngine(model, tokenizer, num_blocks=1024, block_size=16, max_num_seqs=max(levels),
                                   max_num_batched_tokens=max(512, args.prefix_tokens + 64)), max_queue=4 * count)
    try:
        asyncio.run(run_engine(engine, batch[:2], 4, 2, "warmup"))
        for level in levels:
            results.append(concurrent(engine, batch, args.max_tokens, level))
        cold, warm, scored = prefix_ttft(engine, tokenizer, args.prefix_tokens, args.prefix_repeats,
                                         args.score_prompt)
        if args.http:
            texts = [tokenizer.decode(p[1:]) for p in batch]
            for level in (1, max(levels)):
                results.append(over_http(engine, tokenizer, texts, args.max_tokens, level))
    finally:
        engine.shutdown()

    base = results[0].tokens_per_s
    print(f"\n{'':40} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs seq':>7} {'TTFT p50':>9}")
    for r in results:
        print(f"{r.name:40} {r.requests:8d} {r.tokens:7d} {r.seconds:8.2f} {r.tokens_per_s:8.1f} "
              f"{r.tokens_per_s / base:6.2f}x {r.median_ttft * 1000:7.0f}ms")
    print(f"\nTTFT on a {args.prefix_tokens}-token prompt, one request at a time (median of {args.prefix_repeats}):")
    print(f"  prefix not cached: {cold * 1000:.0f} ms; shared prefix cached: {warm * 1000:.0f} ms; "
          f"speedup {cold / warm:.1f}x")
    if scored is not None:
        print(f"  scored at every position (prompt_logprobs=1): {scored * 1000:.0f} ms, {scored / cold:.2f}x the plain one")


if __name__ == "__main__":
    main()
