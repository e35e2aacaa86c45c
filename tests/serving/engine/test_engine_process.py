"""The engine in a process of its own (serving/engine/engine_process.py), a real child process: it streams what
the thread engine streams, frees the blocks of a stream its consumer closes, refuses bad requests before they
reach the child, says why it could not start, and when the child is killed every open stream ends with an
error and the engine reports itself dead."""

import asyncio
import os
import signal
import time
from collections import defaultdict

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from serving.engine.async_engine import AsyncEngine, Delivery, EngineClient, EngineStopped
from serving.engine.engine_process import Outbox, ProcessEngine
from serving.engine.kv_cache_size import free_memory, kv_cache_blocks, kv_cache_split
from serving.engine.llm_engine import LLMEngine, TokenEvent
from serving.engine.sequence import SamplingParams
from tests.serving.engine.test_llm_engine import TEXT, Choice, collect
from tests.support.gpt_fixtures import scrambled_model

SETTINGS = dict(num_blocks=160, block_size=4, max_num_seqs=8, max_num_batched_tokens=24)  # pools of 243 and 77


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator([TEXT * 4], 300)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    """Random weights, sliding-window layers and GQA, as the thread engine's tests use."""
    config = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                       n_embd=64, window_pattern="SL")
    return scrambled_model(config, scale=2.0)


def all_free(stats: dict) -> bool:
    """No block held in either pool (the model's window layers have a pool of their own)."""
    assert stats["total_window_blocks"] > 0, "the model has window layers: expected a window pool"
    return stats["free_blocks"] == stats["total_blocks"] and stats["free_window_blocks"] == stats["total_window_blocks"]


def process_engine(model: GPT, tok: Tokenizer, stream_interval_s: float = 0.0, **settings) -> ProcessEngine:
    return ProcessEngine(model, tok, "cpu", {**SETTINGS, **settings}, stream_interval_s=stream_interval_s)


REQUESTS = [
    ("greedy", "hello world", SamplingParams(temperature=0.0, max_tokens=20)),
    ("seeded", "the quick brown", SamplingParams(temperature=1.0, max_tokens=16, seed=7, n=2)),
    ("stop", "calculator 12", SamplingParams(temperature=0.0, max_tokens=30, stop=["o"], logprobs=2)),
    ("long", "over the lazy dog", SamplingParams(temperature=0.8, top_k=20, max_tokens=40, seed=3)),
]


async def run_all(engine: EngineClient, tok: Tokenizer) -> dict:
    results: dict = defaultdict(Choice)

    async def one(request_id: str, text: str, params: SamplingParams) -> None:
        async for event in engine.generate(request_id, tok.encode(text, prepend="<|bos|>"), params):
            collect(results, [event])

    await asyncio.gather(*(one(*request) for request in REQUESTS))
    return dict(results)


@pytest.mark.parametrize("stream_interval_s", [0.0, 0.05])
def test_the_engine_process_streams_what_the_thread_engine_streams(model, tok, stream_interval_s):
    """Also when the child holds its steps' events back (its Outbox) for a stream interval."""
    thread = AsyncEngine(LLMEngine(model, tok, **SETTINGS))
    try:
        expected = asyncio.run(run_all(thread, tok))
    finally:
        thread.shutdown()
    engine = process_engine(model, tok, stream_interval_s)
    try:
        assert engine.alive()
        got = asyncio.run(run_all(engine, tok))
        assert all_free(engine.stats())
    finally:
        engine.shutdown()
    assert sorted(got) == sorted(expected) == [("greedy", 0), ("long", 0), ("seeded", 0), ("seeded", 1), ("stop", 0)]
    assert got == expected
    assert got["seeded", 0].tokens != got["seeded", 1].tokens
    assert not engine.core_running() and not engine.alive()


def test_a_closed_stream_aborts_its_request_in_the_process_and_frees_its_blocks(model, tok):
    engine = process_engine(model, tok)
    params = SamplingParams(temperature=0.0, max_tokens=50, min_tokens=50)

    async def two_events_then_leave() -> None:
        stream = engine.generate("leaver", tok.encode("hello", prepend="<|bos|>"), params)
        await anext(stream)
        await anext(stream)
        await stream.aclose()

    try:
        asyncio.run(two_events_then_leave())
        deadline = time.monotonic() + 10
        while not all_free(engine.stats()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all_free(engine.stats())
        assert engine.stats()["running"] == 0 and engine.unfinished() == 0
    finally:
        engine.shutdown()


def test_bad_requests_are_refused_in_the_parent_and_a_ctrl_c_leaves_the_child_running(model, tok):
    engine = process_engine(model, tok, num_blocks=8)  # 32 tokens of cache: the context limit
    assert engine.max_model_len == 32

    async def first(prompt: list[int], params: SamplingParams) -> TokenEvent:
        return await anext(engine.generate("r", prompt, params))

    try:
        with pytest.raises(ValueError, match="maximum context length is 32"):
            asyncio.run(first([tok.get_bos_token_id()] * 32, SamplingParams(max_tokens=4)))
        with pytest.raises(ValueError, match=r"integers in \[0, "):
            asyncio.run(first([tok.vocab_size], SamplingParams(max_tokens=4)))
        assert engine.unfinished() == 0 and engine.alive()
        os.kill(engine.pid, signal.SIGINT)  # what a Ctrl-C sends the whole process group
        event = asyncio.run(first([tok.get_bos_token_id()], SamplingParams(temperature=0.0, max_tokens=1)))
        assert event.token_id is not None and engine.alive()
    finally:
        engine.shutdown()


def test_the_child_sizes_the_kv_cache_from_the_memory_free_where_it_runs(model, tok):
    engine = process_engine(model, tok, kv_cache_memory_fraction=1e-4)
    try:
        blocks = engine.stats()["total_blocks"]
        budget = kv_cache_blocks(model, SETTINGS["block_size"], torch.float32, 1e-4, free_memory("cpu"))
        split = kv_cache_split(model, budget, SETTINGS["block_size"], SETTINGS["max_num_seqs"],
                               SETTINGS["max_num_batched_tokens"])
        expected = split.num_full_blocks if split else budget  # the full-context layers' pool
        assert 0.9 < blocks / expected < 1.1  # the RAM available moves a little between the two readings
        assert blocks != SETTINGS["num_blocks"] and engine.max_model_len == model.config.sequence_len
    finally:
        engine.shutdown()


def test_an_engine_process_that_cannot_build_its_engine_says_why(model, tok):
    with pytest.raises(RuntimeError, match="could not build the engine: ValueError: dtype='float64'"):
        process_engine(model, tok, dtype="float64")


def test_a_killed_engine_process_ends_every_stream_with_an_error_and_takes_no_more(tok):
    # a context long enough that the streams are still running when the child is killed
    config = GPTConfig(sequence_len=4096, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    engine = process_engine(scrambled_model(config, scale=2.0), tok, num_blocks=2048, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=4000, min_tokens=4000)
    prompt = tok.encode("hello", prepend="<|bos|>")

    async def stream(request_id: str) -> tuple[int, BaseException | None]:
        tokens = 0
        try:
            async for event in engine.generate(request_id, prompt, params):
                tokens += event.token_id is not None
                if request_id == "killer" and tokens == 5:
                    os.kill(engine.pid, signal.SIGKILL)
        except RuntimeError as e:
            return tokens, e
        return tokens, None

    async def main() -> list[tuple[int, BaseException | None]]:
        return await asyncio.gather(*(stream(name) for name in ("killer", "a", "b")))

    try:
        results = asyncio.run(main())
        for tokens, error in results:
            assert 0 < tokens < 4000
            assert str(error) == "engine failed: the engine process exited with code -9"
        assert not engine.alive() and not engine.core_running()
        assert engine.unfinished() == 0
        with pytest.raises(EngineStopped, match="failed"):
            asyncio.run(anext(engine.generate("late", prompt, params)))
    finally:
        engine.shutdown()


def token(request_id: str, n: int, end: bool = False) -> TokenEvent:
    return TokenEvent(request_id, 0, None if end else n, "" if end else f"t{n}", "length" if end else None, 3, n)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_outbox_holds_steps_back_only_while_nothing_is_urgent():
    sent: list[tuple] = []
    clock = Clock()
    outbox = Outbox(lambda events, stats, calls: sent.append((events, stats, calls)), 0.1, clock)
    update = lambda step: ("update", ({"step": step},), {})  # noqa: E731

    outbox.add({"a": [token("a", 1)]}, {"step": 1}, [("on_first_token", ("a",), {}), update(1)], idle=False)
    assert sent == [({"a": [token("a", 1)]}, {"step": 1}, [("on_first_token", ("a",), {}), update(1)])]  # a first token

    clock.now += 0.03
    outbox.add({"a": [token("a", 2)]}, {"step": 2}, [("on_token", ("a",), {}), update(2)], idle=False)
    clock.now += 0.03
    outbox.add({"a": [token("a", 3)]}, {"step": 3}, [("on_token", ("a",), {}), update(3)], idle=False)
    assert len(sent) == 1  # held: within the interval, nothing urgent

    clock.now += 0.03
    outbox.add({"b": [token("b", 1)]}, {"step": 4}, [update(4)], idle=False)  # b's first token: all at once
    assert sent[1] == ({"a": [token("a", 2), token("a", 3)], "b": [token("b", 1)]}, {"step": 4},
                       [("on_token", ("a",), {}), ("on_token", ("a",), {}), update(4)])

    clock.now += 0.05
    outbox.add({"a": [token("a", 4)], "b": [token("b", 2)]}, {"step": 5}, [update(5)], idle=False)
    clock.now += 0.06  # 0.11 since the last message
    outbox.add({"a": [token("a", 5)]}, {"step": 6}, [update(6)], idle=False)
    assert sent[2] == ({"a": [token("a", 4), token("a", 5)], "b": [token("b", 2)]}, {"step": 6}, [update(6)])

    clock.now += 0.01
    outbox.add({"a": [token("a", 6, end=True)]}, {"step": 7}, [], idle=False)  # an end goes at once
    clock.now += 0.01
    outbox.add({"b": [token("b", 3)]}, {"step": 8}, [], idle=False)
    outbox.add({}, {"step": 8}, [update(8)], idle=True)  # nothing more is coming: what is held goes
    error = RuntimeError("bad request")
    outbox.add({"c": [error]}, {"step": 9}, [], idle=False)  # an error goes at once too (a first event besides)
    assert [events for events, _, _ in sent[3:]] == [{"a": [token("a", 6, end=True)]}, {"b": [token("b", 3)]},
                                                      {"c": [error]}]


def test_an_outbox_without_an_interval_sends_every_step():
    sent: list[Delivery] = []
    outbox = Outbox(lambda events, stats, calls: sent.append(events), 0.0)
    for n in range(1, 4):
        outbox.add({"a": [token("a", n)]}, {}, [], idle=False)
    assert sent == [{"a": [token("a", n)]} for n in range(1, 4)]
