"""
Serving throughput, side by side in one run on one model: requests one at a time through nanochat's own
generator (a contiguous KV cache, as `nanochat chat` serves) against the continuous-batching engine at several
concurrencies, with its KV cache in the weights' dtype and in each of --kv-cache-dtypes (default bfloat16),
and with async scheduling (serve.async_scheduling; --no-async leaves it out); time to first token on a long
shared prefix with and without the prefix cache holding it; with --n, one request of n choices (one shared
prefill) against n requests of one choice sent together (what n choices cost when each prefilled the prompt);
optionally (--http) the same sweep and TTFTs over HTTP through `nanochat serve` (Ray Serve on an embedded
local Ray, the model published as a checkpoint in a temporary folder) with the official `openai` client, whose
ratios are against the same server at concurrency 1, then a burst of 32 requests more than the engine runs and
queues, sent at once (--bursts times, one after another), with how soon the refusals (429 + Retry-After) come;
--rounds R runs the HTTP levels in turn R times, each ratio the median of the rounds' own. It does that for
each serve.engine_core of --engine-cores (default: the engine on a thread of its replica, then in a process of
its own), each serve.transport of --transports (grpc,ray: both) and each serve.ingress of --ingresses
(default haproxy: HAProxy straight to the API replica; proxy: Serve's HTTP proxy).

    .venv/bin/python -m bench.serving [--depth 4] [--vocab-size 4096] [--model URI] [--concurrency 1,4,16,32,64]
        [--kv-cache-dtypes bfloat16] [--max-tokens 32] [--prefix-tokens 1000] [--n 4] [--http | --http-only]
        [--transports grpc,ray] [--engine-cores thread,process] [--ingresses proxy,haproxy]
        [--serve-set serve.KEY=VALUE] [--threads 1] [--no-async]

Without --model the model is a d<depth> GPT with random weights and a --vocab-size tokenizer trained here, with
the tiny-cpu preset's heads (grouped-query) and sliding windows (d4 and 4096: the shape of the speedrun
model): what is measured is the serving machinery, not the text.
Every request asks for exactly --max-tokens tokens (min_tokens keeps the stop tokens out); the sequential
baseline stops at a stop token, so its tokens/s counts the tokens it produced. The server's engine gets
--threads CPUs (serve.num_cpus) and room for the largest concurrency; --serve-set changes any of it. Run it
as a module (-m): as a script, its name would hide the serving package.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanochat.config import load_config
from nanochat.generate import generate
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from services.network import free_port
from serving.engine.async_engine import AsyncEngine
from serving.engine.llm_engine import LLMEngine
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
    cpu: Counter[str] | None = None  # over HTTP: CPU seconds by process role (Server.cpu_seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def median_ttft(self) -> float:
        return statistics.median(self.ttft) if self.ttft else float("nan")


def random_model(depth: int, tokenizer: Tokenizer, sequence_len: int, **config: Any) -> GPT:
    """A d<depth> GPT (config: more of GPTConfig.from_depth's settings) with random weights everywhere
    (nanochat's init zeroes output projections)."""
    model = GPT(GPTConfig.from_depth(depth, vocab_size=tokenizer.vocab_size, sequence_len=sequence_len, **config))
    torch.manual_seed(0)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 2.0 * p.size(1) ** -0.5)
    return model.eval()


def tiny_shaped_model(tokenizer: Tokenizer, sequence_len: int, depth: int | None = None, **overrides: Any) -> GPT:
    """A random_model with the tiny-cpu preset's heads (grouped-query) and sliding windows, at its depth
    unless told (overrides: more of GPTConfig.from_depth's settings)."""
    tiny = load_config("tiny-cpu").model
    shape = dict(head_dim=tiny.head_dim, n_kv_head=tiny.n_kv_head, window_pattern=tiny.window_pattern)
    return random_model(depth or tiny.depth, tokenizer, sequence_len, **{**shape, **overrides})


def made_up_words(count: int, seed: int = 0) -> str:
    """count words of 1-4 random syllables: text with enough distinct pieces to train a large vocabulary."""
    rng = random.Random(seed)
    syllables = sorted({a + b for a in "bcdfghjklmnprstvwz" for b in "aeiouy"}
                       | {a + b + c for a in "bcdfgklmnprst" for b in "aeiou" for c in "nrst"})
    return "".join(" " + "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(count))


def bench_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer of vocab_size tokens trained here on Python source (torch.nn's, which every install has),
    and past 4096 tokens on made-up words too (enough distinct pieces for a real model's 65536): the
    vocabulary's size is what costs in a step (the logits), not what the tokens mean."""
    files = sorted((Path(torch.__file__).parent / "nn").rglob("*.py"))
    texts = [TEXT * 20] + [f.read_text() for f in files]
    if vocab_size > 4096:
        words = made_up_words(max(300_000, 10 * vocab_size))
        texts += [words[i : i + 10_000] for i in range(0, len(words), 10_000)]
    return Tokenizer.train_from_iterator(texts, vocab_size)


def prompts(tokenizer: Tokenizer, count: int) -> list[list[int]]:
    """count different short prompts (~20 tokens)."""
    words = TEXT.split()
    return [tokenizer.encode(" ".join(words[i % len(words):] + words[: i % len(words)])[:100], prepend="<|bos|>")
            for i in range(count)]


def cache_blocks(batch: list[list[int]], max_tokens: int, concurrency: int) -> int:
    """KV-cache blocks (of 16) enough for `concurrency` of the longest request at once, and for the prefix
    TTFT's prompts: what is measured is batching, not preemption."""
    longest = max(len(prompt) for prompt in batch) + max_tokens
    return max(1024, concurrency * -(-longest // 16))


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


def concurrent(engine: AsyncEngine, batch: list[list[int]], max_tokens: int, concurrency: int,
               label: str = "engine") -> Result:
    start = time.perf_counter()
    tokens, ttft = asyncio.run(run_engine(engine, batch, max_tokens, concurrency, f"{label}-c{concurrency}"))
    return Result(f"{label}, {concurrency} concurrent", len(batch), tokens, time.perf_counter() - start, ttft)


def long_prompt(tokenizer: Tokenizer, prefix_tokens: int, seed: int, question: int) -> list[int]:
    """~prefix_tokens tokens of text starting at word `seed`, then a question numbered `question`: the same
    seed gives prompts that share all but their last few tokens."""
    words = (TEXT * (prefix_tokens // 10 + 10)).split()
    body = tokenizer.encode(" ".join(words[seed:]), prepend="<|bos|>")[:prefix_tokens]
    return body + tokenizer.encode(f" question {question}?")


def prefix_ttft(engine: AsyncEngine, tokenizer: Tokenizer, prefix_tokens: int, repeats: int,
                score_prompt: bool = False) -> tuple[float, float, float | None]:
    """Median TTFT of a ~prefix_tokens prompt: each time a new prefix (nothing cached), and a shared prefix
    the cache already holds (a warm-up request put it there) with a different question at the end; with
    score_prompt, also new prefixes whose every position is scored (prompt_logprobs=1: echo + logprobs)."""

    async def ttft_of(prompts_: list[list[int]], tag: str, prompt_logprobs: int | None = None) -> list[float]:
        times = []
        for i, prompt in enumerate(prompts_):  # one at a time: TTFT alone, not queued behind another
            _, [t] = await run_engine(engine, [prompt], 1, 1, f"{tag}{i}", prompt_logprobs)
            times.append(t)
        return times

    def prompts_from(seed: int, count: int) -> list[list[int]]:
        return [long_prompt(tokenizer, prefix_tokens, seed + i, i) for i in range(count)]

    cold = asyncio.run(ttft_of(prompts_from(1, repeats), "cold"))
    scored = None
    if score_prompt:
        scored = statistics.median(asyncio.run(ttft_of(prompts_from(100, repeats), "scored", 1)))
    asyncio.run(ttft_of([long_prompt(tokenizer, prefix_tokens, 0, 999)], "warmup"))
    warm = asyncio.run(ttft_of([long_prompt(tokenizer, prefix_tokens, 0, i) for i in range(repeats)], "warm"))
    return statistics.median(cold), statistics.median(warm), scored


async def choices_timed(engine: AsyncEngine, prompt: list[int], n: int, max_tokens: int, tag: str,
                        together: bool) -> tuple[float, float, float]:
    """Seconds until every one of n greedy choices of prompt has its first token, until all have ended, and
    the CPU seconds this process spent meanwhile (the engine's work, less sensitive than the wall clock to
    other load on the machine): one request with n choices, or (together) n requests of one choice sent
    at once."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
    firsts: list[float] = []
    t0, cpu0 = time.perf_counter(), time.process_time()

    async def one(request_id: str, request_params: SamplingParams) -> None:
        seen: set[int] = set()
        async for event in engine.generate(request_id, prompt, request_params):
            if event.token_id is not None and event.index not in seen:
                seen.add(event.index)
                firsts.append(time.perf_counter() - t0)

    if together:
        await asyncio.gather(*(one(f"{tag}-{i}", params) for i in range(n)))
    else:
        await one(tag, dataclasses.replace(params, n=n))
    return max(firsts), time.perf_counter() - t0, time.process_time() - cpu0


def n_choices(engine: AsyncEngine, tokenizer: Tokenizer, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Median (first token of every choice, end, CPU) seconds of --n choices on new --prefix-tokens prompts: one
    request with n choices, then n single-choice requests sent together; a new prompt each time (made-up
    words first), so the prefix cache holds none of it beforehand."""
    shared, separate = [], []
    for i in range(args.prefix_repeats):
        for together, out in ((False, shared), (True, separate)):
            head = tokenizer.encode(made_up_words(4, seed=1000 + 2 * i + together), prepend="<|bos|>")
            prompt = head + long_prompt(tokenizer, args.prefix_tokens, 0, i)[1:]
            out.append(asyncio.run(choices_timed(engine, prompt, args.n, args.max_tokens, f"n{i}{together}",
                                                 together)))
    return ([statistics.median(t[k] for t in shared) for k in range(3)],
            [statistics.median(t[k] for t in separate) for k in range(3)])


def publish(model: GPT, tokenizer: Tokenizer, root: Path) -> str:
    """The model as a checkpoint in local storage, laid out as training leaves it; its --model URI."""
    from nanochat.checkpoint import write_checkpoint
    from services.checkpoints import CheckpointManager
    from services.layout import TOKENIZER_KEY, stage_prefix, step_dir_name
    from services.storage import open_storage

    storage = open_storage(str(root / "storage"))
    storage.write_text(TOKENIZER_KEY, tokenizer.to_json())
    step_dir = root / "storage" / stage_prefix("bench", "sft") / step_dir_name(1)  # local storage is a folder
    write_checkpoint(step_dir, model_state=model.state_dict(), optimizer_state=None, cursor=None, config={},
                     rng=None, meta={"stage": "sft", "world_size": 1, "model_config": vars(model.config)})
    CheckpointManager(storage, "bench", "sft").mark_latest(1)
    return str(step_dir)


OVERFLOW = 32  # requests of the overload burst past what the engine runs and queues
SERVER_ROLES = (("nanochat:engine", "engine replica"), ("serving.engine.engine_process", "engine process"),
                ("nanochat:api", "API replica"), ("ProxyActor", "Serve proxy"), ("bin/haproxy", "HAProxy"))
CLIENT, OTHER_RAY = "client", "Ray, the rest"  # this process; the server's processes of no role above
ROLES = (*(name for _, name in SERVER_ROLES), CLIENT, OTHER_RAY)


class Server:
    """`nanochat serve` on a model URI in a subprocess (Ray Serve on an embedded local Ray), until closed."""

    def __init__(self, model_uri: str, settings: list[str], log_path: Path, replicas: int = 1):
        self.port, self.metrics_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        nanochat = str(Path(sys.executable).parent / "nanochat")
        command = [nanochat, "serve", "--model", model_uri, "--port", str(self.port), "--metrics-port",
                   str(self.metrics_port), "--replicas", str(replicas)] + [arg for s in settings for arg in ("--set", s)]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "NANOCHAT_API_KEYS": ""})
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nanochat serve exited:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.base + "/v1/models", timeout=2) as response:
                    if json.loads(response.read())["data"]:
                        return
            except OSError:
                pass
            time.sleep(1)
        self.close()
        raise RuntimeError(f"nanochat serve did not serve the model within 240 s:\n{log_path.read_text()[-3000:]}")

    def cpu_seconds(self) -> Counter[str]:
        """CPU seconds so far of this process (the client) and of the server's processes, by role."""
        import psutil

        seconds: Counter[str] = Counter()
        for proc in [psutil.Process(), *psutil.Process(self.proc.pid).children(recursive=True)]:
            try:
                times, command = proc.cpu_times(), " ".join(proc.cmdline())
            except psutil.Error:  # ended meanwhile
                continue
            role = next((name for key, name in SERVER_ROLES if key in command), OTHER_RAY)
            seconds[CLIENT if proc.pid == os.getpid() else role] += times.user + times.system
        return seconds

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def stream_completion(client, text: str, max_tokens: int) -> tuple[int, float]:
    """One streamed completion of exactly max_tokens tokens: (completion tokens, seconds to the first text)."""
    t0 = time.perf_counter()
    ttft, tokens = float("nan"), 0
    stream = client.completions.create(model="nanochat", prompt=text, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"min_tokens": max_tokens})
    for chunk in stream:
        if ttft != ttft and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, ttft


def over_http(client, texts: list[str], max_tokens: int, concurrency: int) -> Result:
    """The requests as streamed completions with the official openai client, `concurrency` at a time."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(lambda text: stream_completion(client, text, max_tokens), texts))
    seconds = time.perf_counter() - start
    return Result(f"HTTP (nanochat serve), {concurrency} concurrent", len(texts), sum(t for t, _ in done), seconds,
                  [ttft for _, ttft in done])


def prefix_ttft_http(client, tokenizer: Tokenizer, prefix_tokens: int, repeats: int) -> tuple[float, float]:
    """prefix_ttft through the server: long prompts as text, one request at a time."""
    def ttft_of(prompts_: list[list[int]]) -> list[float]:
        return [stream_completion(client, tokenizer.decode(p[1:]), 1)[1] for p in prompts_]

    cold = ttft_of([long_prompt(tokenizer, prefix_tokens, 1 + i, i) for i in range(repeats)])
    ttft_of([long_prompt(tokenizer, prefix_tokens, 0, 999)])
    warm = ttft_of([long_prompt(tokenizer, prefix_tokens, 0, i) for i in range(repeats)])
    return statistics.median(cold), statistics.median(warm)


@dataclass
class Overload:
    """A burst of requests sent at once, more than the server runs and queues."""

    answered: int
    refusal_seconds: list[float]  # to each refusal (429 or 503)
    retry_after: set[str | None]  # the refusals' Retry-After values
    bursts: int = 1

    @classmethod
    def merged(cls, bursts: list[Overload]) -> Overload:
        return cls(sum(b.answered for b in bursts), [s for b in bursts for s in b.refusal_seconds],
                   set().union(*(b.retry_after for b in bursts)), len(bursts))

    def describe(self, bound: int) -> str:
        refused = len(self.refusal_seconds)
        refusals = (f"refused {refused} in {statistics.median(self.refusal_seconds) * 1000:.0f} ms median, "
                    f"{max(self.refusal_seconds) * 1000:.0f} ms at most "
                    f"(Retry-After: {', '.join(sorted(map(str, self.retry_after)))})" if refused else "refused none")
        bursts = f"{self.bursts} bursts of " if self.bursts > 1 else ""
        return (f"overload: {bursts}{(self.answered + refused) // self.bursts} requests at once against {bound} the "
                f"engine runs or queues: answered {self.answered}, {refusals}")


def overload_http(client, text: str, count: int, max_tokens: int) -> Overload:
    """count streamed requests of max_tokens sent at once, more than the server runs and queues."""
    import openai

    def send(_: int) -> tuple[bool, float, str | None]:
        started = time.perf_counter()
        try:
            stream_completion(client, text, max_tokens)
            return True, time.perf_counter() - started, None
        except (openai.RateLimitError, openai.InternalServerError) as e:  # 429; 503 is an InternalServerError
            return False, time.perf_counter() - started, e.response.headers.get("retry-after")

    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(send, range(count)))
    refused = [(seconds, retry) for ok, seconds, retry in results if not ok]
    return Overload(len(results) - len(refused), [seconds for seconds, _ in refused], {retry for _, retry in refused})


def http_sweep(model: GPT, tokenizer: Tokenizer, args: argparse.Namespace, levels: list[int],
               batch: list[list[int]], variant: list[str]) -> HTTPResults:
    """The sweep, the prefix TTFT and an overload burst through `nanochat serve` on the same model, the
    server set up as `variant` says (serve.transport, serve.engine_core); level 1 is the baseline."""
    import openai

    top = max(levels)
    settings = [f"serve.max_num_seqs={top}", f"serve.max_ongoing_requests={top}", f"serve.max_queued_requests={top}",
                # num_blocks on a GPU too: the server must leave this process's engines their memory
                f"serve.num_blocks={cache_blocks(batch, args.max_tokens, top)}", "serve.kv_cache_memory_fraction=0",
                f"serve.max_num_batched_tokens={max(512, args.prefix_tokens + 64)}",
                f"serve.num_cpus={args.threads}", f"serve.max_prompt_tokens={args.prefix_tokens + 64}",
                "serve.reload_interval_s=0", *variant] + args.serve_set
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(publish(model, tokenizer, Path(tmp)), settings, Path(tmp) / "serve.log")
        try:
            client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=600)
            texts = [tokenizer.decode(p[1:]) for p in batch]
            over_http(client, texts[:2], 4, 2)  # warm-up
            rounds = []
            for _ in range(args.rounds):
                results = []
                for level in levels:
                    before = server.cpu_seconds()
                    result = over_http(client, texts[: max(2 * level, args.sequential_requests)], args.max_tokens,
                                       level)
                    result.cpu = server.cpu_seconds() - before
                    results.append(result)
                rounds.append(results)
            ttft = prefix_ttft_http(client, tokenizer, args.prefix_tokens, args.prefix_repeats)
            bursts = [overload_http(client, texts[0], 2 * top + OVERFLOW, args.max_tokens) for _ in range(args.bursts)]
            return HTTPResults(variant, rounds, *ttft, 2 * top, Overload.merged(bursts))
        finally:
            server.close()


@dataclass
class HTTPResults:
    variant: list[str]
    rounds: list[list[Result]]  # each round: one Result per concurrency level, level 1 first
    cold_ttft: float
    warm_ttft: float
    bound: int  # requests the engine runs and queues
    overload: Overload

    def sweep(self) -> list[Result]:
        """Each level's rounds as one Result: their requests, tokens, seconds and TTFTs together."""
        return [Result(level[0].name, sum(r.requests for r in level), sum(r.tokens for r in level),
                       sum(r.seconds for r in level), [t for r in level for t in r.ttft],
                       sum((r.cpu for r in level), Counter()))
                for level in zip(*self.rounds)]

    def ratios(self) -> list[list[float]]:
        """Each level's tokens/s against level 1's of the same round, round by round."""
        return [[results[i].tokens_per_s / results[0].tokens_per_s for results in self.rounds]
                for i in range(len(self.rounds[0]))]

    def print(self, args: argparse.Namespace) -> None:
        settings = ", ".join([*self.variant, *args.serve_set])
        sweep, ratios = self.sweep(), self.ratios()
        over = (f"; {len(self.rounds)} rounds, the levels in turn: tokens/s over all of them, ratios the median "
                "of each round's own" if len(self.rounds) > 1 else "")
        print_table(f"Over HTTP through `nanochat serve` ({settings}) with the openai client "
                    f"(ratios against 1 concurrent{over}):", sweep, sweep[0].tokens_per_s, self.cold_ttft,
                    self.warm_ttft, args, [statistics.median(r) for r in ratios])
        if len(self.rounds) > 1:
            for r, level_ratios in zip(sweep[1:], ratios[1:]):
                print(f"  {r.name}, each round: {' '.join(f'{x:.2f}x' for x in level_ratios)}")
        print(f"CPU milliseconds per output token, by process ({os.cpu_count()} cores give {os.cpu_count()} CPU seconds a second):")
        print(f"{'':40} " + " ".join(f"{role:>14}" for role in ROLES) + f" {'all':>7}")
        for r in sweep:
            per_token = {role: 1000 * r.cpu[role] / r.tokens for role in ROLES}
            print(f"{r.name:40} " + " ".join(f"{per_token[role]:14.2f}" for role in ROLES)
                  + f" {sum(per_token.values()):7.2f}")
        print(self.overload.describe(self.bound))


def print_table(title: str, results: list[Result], base: float, cold: float, warm: float, args,
                ratios: list[float] | None = None) -> None:
    """results with their tokens/s against base (or the ratios given, one per result)."""
    print(f"\n{title}")
    print(f"{'':40} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs seq':>7} {'TTFT p50':>9}")
    for i, r in enumerate(results):
        ratio = ratios[i] if ratios else r.tokens_per_s / base
        print(f"{r.name:40} {r.requests:8d} {r.tokens:7d} {r.seconds:8.2f} {r.tokens_per_s:8.1f} "
              f"{ratio:6.2f}x {r.median_ttft * 1000:7.0f}ms")
    print(f"TTFT on a {args.prefix_tokens}-token prompt, one request at a time (median of {args.prefix_repeats}): "
          f"prefix not cached {cold * 1000:.0f} ms; shared prefix cached {warm * 1000:.0f} ms; "
          f"speedup {cold / warm:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4, help="depth of the random model (without --model)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the random model (without --model)")
    parser.add_argument("--score-prompt", action="store_true",
                        help="also the TTFT of a prompt scored at every position (prompt_logprobs, echo + logprobs)")
    parser.add_argument("--model", default=None, help="a checkpoint: <storage>/runs/<run>/<stage>[/step_XXXXXX]")
    parser.add_argument("--concurrency", default="1,4,16,32,64")
    parser.add_argument("--requests", type=int, default=0, help="requests per engine run (default: 2 x the largest concurrency)")
    parser.add_argument("--sequential-requests", type=int, default=16,
                        help="requests of the one-at-a-time baselines (a second or two of work: a steadier base)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--prefix-repeats", type=int, default=3)
    parser.add_argument("--bursts", type=int, default=1, help="overload bursts over HTTP, one after another")
    parser.add_argument("--rounds", type=int, default=1, help="times the HTTP sweep runs its levels in turn on "
                        "one server; each ratio is the median of the rounds' own (the machine's speed drifts)")
    parser.add_argument("--n", type=int, default=1, help="with n > 1, also time one request of n choices on a "
                        "--prefix-tokens prompt against n single-choice requests sent together")
    parser.add_argument("--http", action="store_true", help="also the sweep through `nanochat serve` (Ray Serve) "
                        "with the openai client; its baseline is the same server at concurrency 1")
    parser.add_argument("--http-only", action="store_true", help="only the sweep through `nanochat serve`")
    parser.add_argument("--transports", default="grpc", help="serve.transport of the servers swept over HTTP, "
                        "one after the other (grpc,ray: both)")
    parser.add_argument("--kv-cache-dtypes", default="bfloat16", help="the in-process engine also with these "
                        "serve.kv_cache_dtype values, comma-separated ('' for none); over HTTP: --serve-set")
    parser.add_argument("--no-async", action="store_true", help="leave out the in-process engine's sweep with "
                        "async scheduling")
    parser.add_argument("--engine-cores", default="thread,process", help="serve.engine_core of the servers swept "
                        "over HTTP, one after the other: where an engine replica's engine steps")
    parser.add_argument("--ingresses", default="haproxy", help="serve.ingress of the servers swept over HTTP, one "
                        "after the other (haproxy,proxy: both)")
    parser.add_argument("--serve-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the server (repeatable), e.g. serve.num_cpus=1")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and serve.num_cpus of the server's engine (on 2 cores, 2 threads contend with the server's other processes)")
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
        model = tiny_shaped_model(tokenizer, max(2048, args.prefix_tokens + 256), args.depth)
        described = f"d{args.depth} random weights, vocab {tokenizer.vocab_size}"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {described} ({n_params / 1e6:.1f}M parameters), {args.max_tokens} output tokens per request, "
          f"{args.threads} torch threads")

    count = args.requests or 2 * max(levels)
    batch = prompts(tokenizer, count)
    if not args.http_only:
        results = [sequential(model, tokenizer, batch[: args.sequential_requests], args.max_tokens)]

        def engine_with(kv_cache_dtype: str, async_scheduling: bool = False) -> AsyncEngine:
            blocks = cache_blocks(batch, args.max_tokens, max(levels))
            return AsyncEngine(LLMEngine(model, tokenizer, num_blocks=blocks, block_size=16,
                                         max_num_seqs=max(*levels, args.n), kv_cache_dtype=kv_cache_dtype,
                                         max_num_batched_tokens=max(512, args.prefix_tokens + 64),
                                         async_scheduling=async_scheduling),
                               max_queue=4 * count)

        def sweep(engine: AsyncEngine, label: str) -> None:
            """Warm the engine up, then time it at every concurrency level."""
            asyncio.run(run_engine(engine, batch[:2], 4, 2, "warmup"))
            results.extend(concurrent(engine, batch, args.max_tokens, level, label) for level in levels)

        engine = engine_with("auto")
        try:
            sweep(engine, "engine")
            cold, warm, scored = prefix_ttft(engine, tokenizer, args.prefix_tokens, args.prefix_repeats,
                                             args.score_prompt)
            shared = n_choices(engine, tokenizer, args) if args.n > 1 else None
        finally:
            engine.shutdown()
        variants = [(dtype, False, f"engine, {dtype} KV") for dtype in filter(None, args.kv_cache_dtypes.split(","))]
        variants += [] if args.no_async else [("auto", True, "engine, async scheduling")]
        for kv_cache_dtype, async_scheduling, label in variants:
            engine = engine_with(kv_cache_dtype, async_scheduling)
            try:
                sweep(engine, label)
            finally:
                engine.shutdown()
        print_table("In process (ratios against nanochat's own generator, one request at a time):", results,
                    results[0].tokens_per_s, cold, warm, args)
        if scored is not None:
            print(f"TTFT of the same prompts scored at every position (prompt_logprobs=1): {scored * 1000:.0f} ms, "
                  f"{scored / cold:.2f}x the plain one")
        if shared is not None:
            (first, end, cpu), (first_sep, end_sep, cpu_sep) = shared
            print(f"n={args.n} greedy choices of a new {args.prefix_tokens}-token prompt, {args.max_tokens} tokens each "
                  f"(median of {args.prefix_repeats}): one request {first * 1000:.0f} ms to every choice's first token, "
                  f"{end:.2f} s to the end, {cpu:.2f} CPU s; {args.n} requests sent together {first_sep * 1000:.0f} ms, "
                  f"{end_sep:.2f} s, {cpu_sep:.2f} CPU s; speedup {first_sep / first:.2f}x to first tokens, "
                  f"{end_sep / end:.2f}x to the end, {cpu_sep / cpu:.2f}x in CPU time")
    if args.http or args.http_only:
        if levels[0] != 1:
            levels = [1, *levels]
        for transport, core, ingress in itertools.product(args.transports.split(","), args.engine_cores.split(","),
                                                          args.ingresses.split(",")):
            variant = [f"serve.transport={transport}", f"serve.engine_core={core}", f"serve.ingress={ingress}"]
            http_sweep(model, tokenizer, args, levels, batch, variant).print(args)


if __name__ == "__main__":
    main()
