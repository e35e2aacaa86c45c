"""The serving engine (serving/engine/llm_engine.py, and its asyncio front serving/engine/async_engine.py):
continuous batching gives each request what it would get alone, choices and seeds, stopping, the context
limit, aborts that free blocks, preemption, the calculator tool, streaming text, and the asyncio wrapper
(streams, cancellation, the queue bound, shutdown)."""

import asyncio
import gc
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

from nanochat.generate import generate_batch
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from serving.engine.async_engine import AsyncEngine, QueueFull
from serving.engine.llm_engine import LLMEngine, TokenEvent
from serving.engine.sequence import SamplingParams
from tests.support.bigram import bigram_model, chain, tool_model
from tests.support.gpt_fixtures import scrambled_model

TEXT = "hello world, the quick brown fox jumps over the lazy dog. calculator 0123456789 +-*/ "


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator([TEXT * 4], 300)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    """Random weights everywhere (nanochat's init zeroes the output projections, which would make the
    model ignore its context), sliding-window layers, GQA: every path of the paged cache matters."""
    config = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                       n_embd=64, window_pattern="SL")
    return scrambled_model(config, scale=2.0)


def byte_token(tok: Tokenizer, byte: int) -> int:
    return next(i for i in range(tok.vocab_size) if tok.id_to_bytes(i) == bytes([byte]))


def no_block_held(engine: LLMEngine) -> bool:
    """Every block of both pools free (the window layers' pool too, when the engine split the cache)."""
    bm = engine.block_manager
    pools = [bm.full] + ([bm.window_pool] if bm.window_pool else [])
    return all(len(p.free_blocks) == p.num_blocks and not any(p.ref_counts) for p in pools)


SCHEDULING = {"async_scheduling": False}  # how make_engine's engines schedule: set by the fixture below


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "async"])
def scheduling(request):
    """Every test of this file with each step read before the next is scheduled, and with the next step
    launched first (async scheduling): both must serve the same."""
    SCHEDULING["async_scheduling"] = request.param
    yield request.param
    SCHEDULING["async_scheduling"] = False


def make_engine(model: GPT, tok: Tokenizer, **kwargs) -> LLMEngine:
    options = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=24, **SCHEDULING)
    return LLMEngine(model, tok, **{**options, **kwargs})


@dataclass
class Choice:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    texts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0


def collect(results: dict, events: list[TokenEvent]) -> None:
    for e in events:
        choice = results[e.request_id, e.index]
        assert choice.finish_reason is None, "an event after the final one"
        choice.text += e.text
        choice.prompt_tokens, choice.completion_tokens = e.prompt_tokens, e.completion_tokens
        if e.token_id is None:
            choice.finish_reason = e.finish_reason
        else:
            choice.tokens.append(e.token_id)
            choice.texts.append(e.text)


def run(engine: LLMEngine, results: dict | None = None, max_steps: int = 2000) -> dict:
    results = defaultdict(Choice) if results is None else results
    for _ in range(max_steps):
        if not engine.has_work():
            return results
        collect(results, engine.step())
    raise AssertionError("the engine did not finish")


GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def prompts(tok: Tokenizer) -> list[list[int]]:
    texts = ["hello", "the quick brown fox jumps over the lazy dog", "calculator 12+3", "fox"]
    return [tok.encode(t, prepend="<|bos|>") for t in texts]


def alone(model: GPT, tok: Tokenizer, prompt: list[int], max_tokens: int = 24) -> list[int]:
    (completion,), _ = generate_batch(model, tok, prompt, max_tokens=max_tokens, temperature=0.0)
    return completion


# ---------------------------------------------------------------------------------------------
# continuous batching


def test_concurrent_greedy_requests_equal_each_request_generated_alone(model, tok):
    engine = make_engine(model, tok)  # a 24-token budget: the long prompt is prefilled in chunks
    for i, prompt in enumerate(prompts(tok)):
        engine.add_request(f"r{i}", prompt, GREEDY)
    results = run(engine)
    for i, prompt in enumerate(prompts(tok)):
        expected = alone(model, tok, prompt)
        choice = results[f"r{i}", 0]
        assert choice.tokens == expected
        assert choice.finish_reason == ("length" if len(expected) == 24 else "stop")
        assert choice.completion_tokens == len(expected)
        assert choice.prompt_tokens == len(prompt)
    assert no_block_held(engine)


def test_flex_attention_serves_what_the_gather_path_serves(model, tok):
    """serve.attention=flex on a CPU (uncompiled): the same greedy tokens, n=2 forks, chunked prefill."""
    outputs = {}
    for attention in ("sdpa", "flex"):
        engine = make_engine(model, tok, attention=attention)
        assert engine.runner.attention == attention
        for i, prompt in enumerate(prompts(tok)):
            engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=12, n=2))
        outputs[attention] = {key: choice.tokens for key, choice in run(engine).items()}
        assert no_block_held(engine)
    assert outputs["flex"] == outputs["sdpa"] and len(outputs["flex"]) == 8


def test_a_request_added_mid_flight_is_admitted_while_others_run(model, tok, scheduling):
    engine = make_engine(model, tok)
    first, later = prompts(tok)[1], prompts(tok)[0]
    engine.add_request("first", first, GREEDY)
    results = defaultdict(Choice)
    for _ in range(5):
        collect(results, engine.step())
    engine.add_request("later", later, GREEDY)
    for _ in range(1 + scheduling):  # async: a step returns the tokens of the one before
        collect(results, engine.step())
    assert results["later", 0].tokens, "the new request got no token in its first step"
    assert results["first", 0].finish_reason is None
    run(engine, results)
    assert results["first", 0].tokens == alone(model, tok, first)
    assert results["later", 0].tokens == alone(model, tok, later)


def test_n_choices_are_indexed_and_sample_independently(model, tok):
    engine = make_engine(model, tok)
    engine.add_request("r", prompts(tok)[0], SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=7))
    results = run(engine)
    assert sorted(results) == [("r", 0), ("r", 1), ("r", 2)]
    assert all(c.finish_reason in ("stop", "length") for c in results.values())
    assert len({tuple(c.tokens) for c in results.values()}) == 3


def test_a_seed_reproduces_its_choices_and_another_seed_does_not(model, tok):
    def sampled(seed: int, n: int = 2) -> list[list[int]]:
        engine = make_engine(model, tok)
        engine.add_request("r", prompts(tok)[0], SamplingParams(temperature=1.0, max_tokens=12, n=n, seed=seed))
        # another request in the batch must not change what the seeded one draws
        engine.add_request("other", prompts(tok)[1], SamplingParams(temperature=1.0, max_tokens=12))
        results = run(engine)
        return [results["r", i].tokens for i in range(n)]

    assert sampled(1) == sampled(1)
    assert sampled(1) != sampled(2)
    assert sampled(1, n=1)[0] == sampled(1)[0]  # choice 0 runs on the request's seed


def counting_prefill_tokens(engine: LLMEngine) -> list[int]:
    """The prompt tokens each step computes, recorded around the engine's real model runner."""
    counts: list[int] = []
    real_run = engine.runner.run

    def run_and_count(prefills, decodes, *args):
        counts.append(sum(c.length for c in prefills))
        return real_run(prefills, decodes, *args)

    engine.runner.run = run_and_count
    return counts


@pytest.mark.parametrize("prompt_len", [22, 24])  # a partly filled last block (copied to each choice), and none
def test_n_choices_prefill_the_prompt_once_and_greedy_ones_equal_n_1(model, tok, prompt_len):
    prompt = prompts(tok)[1][:prompt_len]
    engine = make_engine(model, tok, max_num_batched_tokens=16)  # two chunks
    counts = counting_prefill_tokens(engine)
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=16, n=4))
    results = defaultdict(Choice)
    while not results:
        collect(results, engine.step())
    assert sorted(results) == [("r", i) for i in range(4)]  # every choice's first token in one step
    run(engine, results)
    assert sum(counts) == len(prompt)
    expected = alone(model, tok, prompt, max_tokens=16)
    assert all(results["r", i].tokens == expected for i in range(4))
    assert no_block_held(engine)


def test_n_choices_share_the_prompts_logprobs_computed_once(model, tok):
    prompt = prompts(tok)[1]

    def scored(n: int) -> tuple[list[TokenEvent], int]:
        engine = make_engine(model, tok)
        counts = counting_prefill_tokens(engine)
        engine.add_request("r", prompt, SamplingParams(temperature=1.0, max_tokens=3, n=n, seed=3, prompt_logprobs=2))
        events = [e for _ in range(20) for e in engine.step() if e.prompt_logprobs is not None]
        return events, sum(counts)

    (single,), computed = scored(1)
    assert computed == len(prompt) and single.prompt_logprobs[0] is None and len(single.prompt_logprobs) == len(prompt)
    events, computed = scored(3)
    assert computed == len(prompt) and sorted(e.index for e in events) == [0, 1, 2]
    assert all(e.prompt_logprobs == single.prompt_logprobs for e in events)


def test_choices_that_cannot_fork_run_after_with_the_prompts_full_blocks_cached(model, tok):
    prompt = prompts(tok)[1][:22]
    engine = make_engine(model, tok, max_num_seqs=2)  # two of the four choices wait for a free seat
    counts = counting_prefill_tokens(engine)
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=8, n=4))
    results = run(engine)
    assert sum(counts) == len(prompt) + 2 * (len(prompt) % 4)  # the two late ones recompute the partial block
    expected = alone(model, tok, prompt, max_tokens=8)
    assert all(results["r", i].tokens == expected for i in range(4))
    assert no_block_held(engine)


# ---------------------------------------------------------------------------------------------
# stopping and the context limit


@pytest.mark.parametrize("policy, finished", [("fcfs", ["low", "normal", "urgent"]),
                                              ("priority", ["urgent", "normal", "low"])])
def test_the_priority_policy_serves_urgent_requests_first(model, tok, policy, finished):
    engine = make_engine(model, tok, max_num_seqs=1, scheduling_policy=policy)
    for name, priority in [("low", 4), ("normal", 0), ("urgent", -2)]:
        engine.add_request(name, prompts(tok)[0][:6], SamplingParams(temperature=0.0, max_tokens=3, priority=priority))
    order = []
    while engine.has_work():
        order += [e.request_id for e in engine.step() if e.finish_reason is not None]
    assert order == finished and no_block_held(engine)


def test_a_stop_string_cuts_the_text_before_it_and_frees_the_blocks(tok):
    a, b, c = (tok.encode(ch)[0] for ch in "abc")
    model = bigram_model(tok, chain(a, b, c, a), default=a)  # writes abcabcabc...
    engine = make_engine(model, tok)
    engine.add_request("r", [tok.get_bos_token_id()], SamplingParams(temperature=0.0, max_tokens=20, stop=["ca"]))
    results = run(engine)
    choice = results["r", 0]
    assert choice.tokens == [a, b, c, a]  # ended by the token that completed "ca"
    assert choice.text == "ab"
    assert choice.texts == ["a", "b", "", ""]  # "c" was held back: it could have begun "ca"
    assert choice.finish_reason == "stop"
    assert no_block_held(engine)


def test_include_stop_str_in_output_ends_the_text_with_the_stop_string_that_ended_it(tok):
    a, b, c = (tok.encode(ch)[0] for ch in "abc")
    model = bigram_model(tok, chain(a, b, c, a), default=a)  # writes abcabcabc...
    engine = make_engine(model, tok)
    # "cab" and "ca" both start at the first "c": the shorter one completes first and ends the reply
    engine.add_request("r", [tok.get_bos_token_id()], SamplingParams(temperature=0.0, max_tokens=20,
                                                                     stop=["cab", "ca", "bcx"],
                                                                     include_stop_str_in_output=True))
    choice = run(engine)["r", 0]
    assert (choice.tokens, choice.text, choice.finish_reason) == ([a, b, c, a], "abca", "stop")
    assert choice.texts == ["a", "", "", "bca"]  # held back while it could begin a stop string, as without
    assert no_block_held(engine)


def test_held_back_text_is_sent_once_it_cannot_begin_a_stop_string(tok):
    a, b, c = (tok.encode(ch)[0] for ch in "abc")
    model = bigram_model(tok, chain(a, b, c, a), default=a)
    engine = make_engine(model, tok)
    engine.add_request("r", [tok.get_bos_token_id()], SamplingParams(temperature=0.0, max_tokens=5, stop=["bx"]))
    choice = run(engine)["r", 0]
    assert choice.texts == ["a", "", "bc", "a", "b"]  # the last "b" is flushed at the end
    assert (choice.text, choice.finish_reason) == ("abcab", "length")


def test_max_tokens_ends_with_length(tok):
    a = tok.encode("a")[0]
    engine = make_engine(bigram_model(tok, {}, default=a), tok)
    engine.add_request("r", [tok.get_bos_token_id()], SamplingParams(temperature=0.0, max_tokens=7))
    choice = run(engine)["r", 0]
    assert (choice.text, choice.finish_reason, choice.completion_tokens) == ("a" * 7, "length", 7)


def test_assistant_end_and_bos_always_stop_and_extra_stop_tokens_too(tok):
    sp = tok.encode_special
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    for end in (sp("<|assistant_end|>"), tok.get_bos_token_id()):
        engine = make_engine(bigram_model(tok, chain(sp("<|assistant_start|>"), a, b, end), default=a), tok)
        engine.add_request("r", [sp("<|assistant_start|>")], SamplingParams(temperature=0.0, max_tokens=20))
        choice = run(engine)["r", 0]
        assert (choice.tokens, choice.text, choice.finish_reason) == ([a, b, end], "ab", "stop")
    engine = make_engine(bigram_model(tok, chain(a, b), default=a), tok)
    engine.add_request("r", [a], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[b]))
    assert run(engine)["r", 0].tokens == [b]


def test_ignore_eos_keeps_the_end_tokens_out_while_stop_strings_and_own_stop_tokens_still_end(tok):
    """The model ends its turn after "ab": with ignore_eos it cannot (the end token is masked, greedy takes
    the next most likely), so it writes to max_tokens; a stop string or a stop token of its own still ends."""
    sp = tok.encode_special
    a, b, end = tok.encode("a")[0], tok.encode("b")[0], sp("<|assistant_end|>")
    model = bigram_model(tok, chain(sp("<|assistant_start|>"), a, b, end), default=a)
    asks = {"plain": SamplingParams(temperature=0.0, max_tokens=9),
            "ignore": SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
            "sampled": SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True, seed=1),
            "stop": SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, stop=["!a"]),
            "own": SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, stop_token_ids=[b])}
    engine = make_engine(model, tok)
    for name, params in asks.items():
        engine.add_request(name, [sp("<|assistant_start|>")], params)
    results = run(engine)
    assert (results["plain", 0].tokens, results["plain", 0].finish_reason) == ([a, b, end], "stop")
    for name in ("ignore", "sampled"):
        choice = results[name, 0]
        assert len(choice.tokens) == 9 and end not in choice.tokens and tok.get_bos_token_id() not in choice.tokens
        assert choice.finish_reason == "length" and choice.text.startswith("ab")
    assert (results["stop", 0].text, results["stop", 0].finish_reason) == ("ab", "stop")  # "ab!ab..." cut
    assert (results["own", 0].tokens, results["own", 0].finish_reason) == ([a, b], "stop")
    assert no_block_held(engine)


def test_a_character_split_across_tokens_is_sent_whole_with_its_last_byte(tok):
    first, second = "é".encode()
    t1, t2, bang = byte_token(tok, first), byte_token(tok, second), tok.encode("!")[0]
    model = bigram_model(tok, chain(tok.get_bos_token_id(), t1, t2, bang), default=bang)
    engine = make_engine(model, tok)
    engine.add_request("r", [tok.get_bos_token_id()], SamplingParams(temperature=0.0, max_tokens=3))
    assert run(engine)["r", 0].texts == ["", "é", "!"]


def test_a_prompt_longer_than_the_context_is_refused_naming_the_limits(model, tok):
    engine = make_engine(model, tok, max_model_len=32)
    with pytest.raises(ValueError, match="32 tokens .* 40 tokens|40 tokens.*32 tokens"):
        engine.add_request("r", [1] * 40, GREEDY)
    with pytest.raises(ValueError, match="32"):
        engine.add_request("r", [1] * 32, GREEDY)  # no room left for a single token
    assert not engine.has_work()


def test_generation_stops_at_the_end_of_the_context(tok):
    a = tok.encode("a")[0]
    engine = make_engine(bigram_model(tok, {}, default=a), tok, max_model_len=16)
    engine.add_request("r", [a] * 13, SamplingParams(temperature=0.0, max_tokens=10))
    choice = run(engine)["r", 0]
    assert (choice.completion_tokens, choice.finish_reason) == (3, "length")


def test_the_context_never_exceeds_the_kv_cache(model, tok):
    engine = make_engine(model, tok, num_blocks=8, block_size=4)  # 32 slots, the model's context is 64
    assert engine.max_model_len == 32
    with pytest.raises(ValueError, match="32"):
        engine.add_request("r", [1] * 40, GREEDY)


# ---------------------------------------------------------------------------------------------
# abort and preemption


def test_abort_mid_generation_frees_every_block_at_once(model, tok):
    engine = make_engine(model, tok)
    bm = engine.block_manager
    engine.add_request("gone", prompts(tok)[1], GREEDY)
    engine.add_request("stays", prompts(tok)[0], GREEDY)
    results = defaultdict(Choice)
    for _ in range(6):
        collect(results, engine.step())
    assert results["gone", 0].tokens and results["gone", 0].finish_reason is None
    stays = engine.requests["stays"][0].seq
    engine.abort("gone")
    assert bm.num_free_blocks == bm.num_blocks - len(stays.block_table)
    run(engine, results)
    assert results["gone", 0].finish_reason == "abort"
    assert results["stays", 0].tokens == alone(model, tok, prompts(tok)[0])
    assert bm.num_free_blocks == bm.num_blocks
    engine.abort("gone")  # already ended, and unknown ids: ignored
    engine.abort("never-seen")
    assert not engine.has_work()


def test_preempted_requests_finish_with_the_outputs_they_have_alone(model, tok):
    # 16 blocks of 4: the four requests cannot all hold their prompt + 24 tokens at once
    engine = make_engine(model, tok, num_blocks=16, max_num_batched_tokens=64)
    for i, prompt in enumerate(prompts(tok)):
        engine.add_request(f"r{i}", prompt, GREEDY)
    results = run(engine)
    assert engine.stats()["preemptions"] > 0
    for i, prompt in enumerate(prompts(tok)):
        assert results[f"r{i}", 0].tokens == alone(model, tok, prompt)
    assert no_block_held(engine)


def test_stats_count_requests_and_cache_use(model, tok):
    engine = make_engine(model, tok, max_num_seqs=1)
    prompt = prompts(tok)[1]
    engine.add_request("a", prompt, GREEDY)
    engine.add_request("b", prompt, SamplingParams(temperature=0.0, max_tokens=4, n=2))
    engine.step()
    stats = engine.stats()
    assert (stats["running"], stats["waiting"]) == (1, 1)
    total = stats["total_blocks"]  # the full-context layers' pool: more than 64, the window layers have their own
    assert total > 64 and 0 < stats["free_blocks"] < total
    assert stats["kv_cache_usage"] == pytest.approx(1 - stats["free_blocks"] / total)
    assert 0 < stats["free_window_blocks"] < stats["total_window_blocks"]
    run(engine)
    stats = engine.stats()
    # the three sequences share a prompt: the ones admitted after the first hit its full blocks
    assert stats["prefix_cache_queries"] >= 3 * len(prompt)
    assert stats["prefix_cache_hits"] >= 2 * 4 * ((len(prompt) - 1) // 4)
    assert (stats["running"], stats["waiting"], stats["kv_cache_usage"]) == (0, 0, 0.0)


# ---------------------------------------------------------------------------------------------
# the calculator tool


def test_the_calculator_result_is_forced_streamed_and_counted(tok):
    sp = tok.encode_special
    model = tool_model(tok, "3+1")
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "3+1?"}]})
    engine = make_engine(model, tok)
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=20, n=2))
    results = run(engine)
    call = [sp("<|python_start|>"), *tok.encode("3+1"), sp("<|python_end|>")]
    output = [sp("<|output_start|>"), *tok.encode("4"), sp("<|output_end|>")]
    reference, _ = generate_batch(model, tok, prompt, max_tokens=20, temperature=0.0)
    for index in (0, 1):
        choice = results["r", index]
        assert choice.tokens == [*call, *output, sp("<|assistant_end|>")] == reference[0]
        assert choice.text == "3+14"
        assert (choice.completion_tokens, choice.finish_reason) == (len(choice.tokens), "stop")


def test_a_rejected_tool_call_forces_nothing(tok):
    sp = tok.encode_special
    engine = make_engine(tool_model(tok, "x"), tok)  # a name: the evaluator refuses it
    engine.add_request("r", [sp("<|assistant_start|>")], SamplingParams(temperature=0.0, max_tokens=20))
    assert run(engine)["r", 0].tokens == [sp("<|python_start|>"), *tok.encode("x"), sp("<|python_end|>"),
                                          sp("<|assistant_end|>")]


def test_a_tool_delimiter_sends_the_text_before_it_and_no_stop_string_spans_it(tok):
    sp = tok.encode_special
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    call = [sp("<|python_start|>"), b, sp("<|python_end|>")]  # "b" is a name: no output is forced
    engine = make_engine(bigram_model(tok, chain(sp("<|assistant_start|>"), a, *call, sp("<|assistant_end|>")),
                                      default=a), tok)
    engine.add_request("r", [sp("<|assistant_start|>")], SamplingParams(temperature=0.0, max_tokens=9, stop=["ab"]))
    choice = run(engine)["r", 0]
    assert choice.tokens == [a, *call, sp("<|assistant_end|>")]
    assert choice.texts == ["", "a", "b", "", ""]  # "a" waits (it could begin "ab") until <|python_start|>
    assert (choice.text, choice.finish_reason) == ("ab", "stop")


# ---------------------------------------------------------------------------------------------
# AsyncEngine


async def consume(agen) -> Choice:
    choice = Choice()
    async for e in agen:
        collect({(e.request_id, e.index): choice}, [e])
    return choice


def test_concurrent_async_requests_stream_their_own_tokens(model, tok):
    engine = AsyncEngine(make_engine(model, tok))

    async def main() -> list[Choice]:
        return await asyncio.gather(*(consume(engine.generate(f"r{i}", p, GREEDY))
                                      for i, p in enumerate(prompts(tok))))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for choice, prompt in zip(results, prompts(tok)):
        assert choice.tokens == alone(model, tok, prompt)
        assert choice.finish_reason in ("stop", "length")


def test_held_back_lists_carry_every_token_and_the_last_one_goes_at_once(model, tok):
    """generate_batches with an interval: the first list at once (no delay to the first token; it holds
    whatever the engine made before it was read), then every later token in lists at most one per interval;
    the list that ends the request is not held back (with an interval of 60 s, a held-back end would stall
    this test for a minute)."""
    engine = AsyncEngine(make_engine(model, tok))
    prompt = prompts(tok)[0]

    async def lists() -> list[list[TokenEvent]]:
        params = SamplingParams(temperature=0.0, max_tokens=24)
        return [batch async for batch in engine.generate_batches("held", prompt, params, interval_s=60)]

    try:
        batches = asyncio.run(asyncio.wait_for(lists(), timeout=30))
    finally:
        engine.shutdown()
    assert len(batches) == 2 and sum(map(len, batches)) == 25  # 24 tokens and the end
    assert [e.token_id for b in batches for e in b][:-1] == alone(model, tok, prompt, 24)
    assert batches[-1][-1].finish_reason == "length"


def long_running(tok: Tokenizer) -> tuple[GPT, SamplingParams]:
    a = tok.encode("a")[0]
    return bigram_model(tok, {}, default=a), SamplingParams(temperature=0.0, max_tokens=500)


def test_closing_or_cancelling_a_stream_frees_its_blocks(tok):
    model, params = long_running(tok)
    core = make_engine(model, tok, num_blocks=256)
    engine = AsyncEngine(core)

    async def main() -> None:
        closed = engine.generate("closed", [tok.get_bos_token_id()], params)
        for _ in range(3):
            assert (await anext(closed)).token_id is not None
        started = asyncio.Event()

        async def cancelled_consumer() -> None:
            async for _ in engine.generate("cancelled", [tok.get_bos_token_id()], params):
                started.set()

        task = asyncio.create_task(cancelled_consumer())
        await started.wait()
        assert engine.stats()["free_blocks"] < 256
        await closed.aclose()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the aborts reach the engine thread within a step
            if engine.stats()["free_blocks"] == 256 and engine.stats()["running"] == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"blocks still held: {engine.stats()}")

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert no_block_held(core) and not core.requests


def test_queue_full_beyond_max_queue_and_normal_service_afterwards(model, tok):
    slow_model, params = long_running(tok)
    engine = AsyncEngine(make_engine(slow_model, tok, num_blocks=512), max_queue=2)

    async def main() -> Choice:
        streams = [engine.generate(f"r{i}", [tok.get_bos_token_id()], params) for i in range(2)]
        for stream in streams:
            await anext(stream)
        with pytest.raises(QueueFull):
            await anext(engine.generate("r2", [tok.get_bos_token_id()], params))
        for stream in streams:
            await stream.aclose()
        short = SamplingParams(temperature=0.0, max_tokens=3)
        return await consume(engine.generate("after", [tok.get_bos_token_id()], short))

    try:
        after = asyncio.run(main())
    finally:
        engine.shutdown()
    assert (len(after.tokens), after.finish_reason) == (3, "length")


def test_a_request_that_cannot_run_is_refused_before_any_event(model, tok):
    engine = AsyncEngine(make_engine(model, tok, max_model_len=16))

    async def main() -> None:
        with pytest.raises(ValueError, match="16"):
            await anext(engine.generate("r", [1] * 20, GREEDY))

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert engine.stats()["waiting"] == 0


def test_shutdown_ends_open_streams_with_abort_stops_the_thread_and_lets_the_cache_go(tok):
    """... and the stopped engine no longer holds the KV cache: a swap that drains the old engine first
    sizes the new one's cache in that memory."""
    model, params = long_running(tok)
    stepping = make_engine(model, tok, num_blocks=256)
    cache = weakref.ref(stepping.runner.cache)
    engine = AsyncEngine(stepping)

    async def main() -> Choice:
        stream = engine.generate("r", [tok.get_bos_token_id()], params)
        choice = Choice()
        collect({("r", 0): choice}, [await anext(stream)])
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        async for e in stream:
            collect({("r", 0): choice}, [e])
        return choice

    choice = asyncio.run(main())
    assert choice.finish_reason == "abort"
    assert not engine.core_running()
    assert no_block_held(stepping)
    del stepping
    gc.collect()
    assert cache() is None

    async def after() -> None:
        with pytest.raises(RuntimeError, match="shut down"):
            await anext(engine.generate("late", [tok.get_bos_token_id()], params))

    asyncio.run(after())


# ---------------------------------------------------------------------------------------------
# sliding-window layers keeping only their window (the hybrid KV cache)


def test_the_split_gives_the_full_context_layers_the_memory_the_window_layers_do_not_need(model):
    """Layer 0 has a window of 16 tokens (sequence_len 64 // 4), layer 1 full context. A 64-token sequence
    holds 16 blocks of 4 in the full layer's pool and at most 5 (its last window) in the window pool: the
    memory of num_blocks blocks of both layers splits 16 : 5, unless the window pool would then have
    fewer blocks than its running sequences may need. No split when it would not give the full layer
    more blocks."""
    from serving.engine.block_manager import window_pool_blocks
    from serving.engine.kv_cache_size import KVCacheSplit, kv_cache_split

    assert window_pool_blocks(16, 4, 8, 64) == 8 * (16 // 4 + 3) + 64 // 4 == 72
    # 2000 blocks of one layer: 2000 * 16 // 21 = 1523 for layer 1, the other 477 for layer 0
    assert kv_cache_split(model, 1000, 4, 8, 64) == KVCacheSplit(16, 477, 1523)
    assert kv_cache_split(model, 100, 4, 8, 64) == KVCacheSplit(16, 72, 128)  # 200 * 5 // 21 < 72
    assert kv_cache_split(model, 72, 4, 8, 64) is None  # the window pool's 72 would leave layer 1 just 72
    assert kv_cache_split(model, 1000, 4, 8, 64, max_model_len=32) == KVCacheSplit(16, 770, 1230)  # 8 : 5
    full_context = GPT(GPTConfig(**{**model.config.__dict__, "window_pattern": "L"}))
    assert kv_cache_split(full_context, 1000, 4, 8, 64) is None
    tok = Tokenizer.train_from_iterator([TEXT], 300)
    engine = make_engine(model, tok, num_blocks=1000, max_num_seqs=8, max_num_batched_tokens=64)
    assert (engine.block_manager.num_blocks, engine.block_manager.window_pool.num_blocks) == (1523, 477)
    one_pool = make_engine(model, tok, num_blocks=1000, hybrid_kv_cache=False)
    assert one_pool.block_manager.num_blocks == 1000 and one_pool.block_manager.window_pool is None
    cache = engine.runner.cache
    assert cache.k.nbytes + cache.window_pool.k.nbytes == one_pool.runner.cache.k.nbytes  # the same memory


def test_the_window_pool_keeps_only_the_window_and_the_engine_serves_what_one_pool_serves(model, tok):
    """Long prompts (chunked), an n=2 request (a fork) and a second turn over the first's tokens (a
    prefix hit, which needs the window layer's last window too): the same tokens as every request alone
    and as an engine with one pool. Sequences hold only their last window in the window pool, and every
    block comes back. (Preemption with a window pool: the scheduler's tests.)"""
    texts = [f"{i} {TEXT[:40]}" for i in range(4)]  # different from the first block on: no sharing
    long_prompts = [tok.encode(t * 2, prepend="<|bos|>")[:36] for t in texts]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    outputs = {}
    for hybrid in (True, False):
        engine = make_engine(model, tok, num_blocks=100, max_num_seqs=4, hybrid_kv_cache=hybrid)
        bm = engine.block_manager
        assert (bm.window_pool is not None) == hybrid
        for i, prompt in enumerate(long_prompts):
            engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=24, n=2 if i == 0 else 1))
        results, released = defaultdict(Choice), 0
        while engine.has_work():
            collect(results, engine.step())
            for seq in engine.scheduler.running if hybrid else ():
                first_live = max(0, seq.num_cached_tokens - 16) // 4
                assert seq.window_table[:first_live] == [-1] * first_live  # behind the window: given back
                assert all(b >= 0 for b in seq.window_table[first_live:])
                released = max(released, first_live)
        assert no_block_held(engine)
        if hybrid:
            assert (bm.num_blocks, bm.window_pool.num_blocks) == (152, 48) and released >= 10
        second = long_prompts[1] + results["r1", 0].tokens[:12]  # the next turn: 48 tokens, 11 full blocks cached
        hits = engine.stats()["prefix_cache_hits"]
        engine.add_request("turn2", second, params)
        collect(results, engine.step())
        assert engine.stats()["prefix_cache_hits"] - hits == 44
        run(engine, results)
        assert no_block_held(engine)
        outputs[hybrid] = {key: choice.tokens for key, choice in results.items()}
    assert outputs[True] == outputs[False]
    for i, prompt in enumerate(long_prompts):
        assert outputs[True][f"r{i}", 0] == alone(model, tok, prompt)
    assert outputs[True]["r0", 1] == outputs[True]["r0", 0]  # greedy: both choices alike
    assert outputs[True]["turn2", 0] == alone(model, tok, second, max_tokens=16)  # the context holds 16 more
