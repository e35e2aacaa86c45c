"""Async scheduling (LLMEngine(async_scheduling=True)): each step schedules and launches the next before it
reads its own tokens. Every test of test_llm_engine.py runs in both modes; these check what only this mode
has: the step really is launched ahead, a pending token reaches the next step from the device (or from the
calculator's queue), requests whose sampling reads their tokens on the host draw what a sync engine draws,
and no token past max_tokens is computed."""

from collections import defaultdict

import pytest
import torch

from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from serving.engine.llm_engine import LLMEngine
from serving.engine.sequence import SamplingParams
from tests.serving.engine.test_grammar import SCHEMA, json_grammar
from tests.serving.engine.test_llm_engine import (
    Choice,
    collect,
    make_engine,
    model,
    no_block_held,
    prompts,
    run,
    tok,
)
from tests.support.bigram import bigram_model, tool_model

__all__ = ["model", "tok"]  # fixtures


def both(model: GPT, tok: Tokenizer, requests: list[tuple[list[int], SamplingParams]], **kwargs) -> list[dict]:
    """What a sync engine and an async one return for the same requests, added at once: each choice's tokens,
    text, finish reason and completion tokens."""
    return [{key: value[:4] for key, value in outputs.items()} for outputs in both_with_logprobs(
        model, tok, requests, **kwargs)]


def both_with_logprobs(model: GPT, tok: Tokenizer, requests: list[tuple[list[int], SamplingParams]],
                       **kwargs) -> list[dict]:
    """both's, and each choice's token log-probabilities (with the top ones') and prompt log-probabilities."""
    outputs = []
    for async_scheduling in (False, True):
        engine = make_engine(model, tok, async_scheduling=async_scheduling, **kwargs)
        for i, (prompt, params) in enumerate(requests):
            engine.add_request(f"r{i}", prompt, params)
        results, logprobs, prompt_logprobs = defaultdict(Choice), defaultdict(list), {}
        while engine.has_work():
            events = engine.step()
            collect(results, events)
            for e in events:
                if e.token_id is not None:
                    logprobs[e.request_id, e.index].append((e.logprob, e.top_logprobs))
                if e.prompt_logprobs is not None:
                    prompt_logprobs[e.request_id, e.index] = e.prompt_logprobs
        assert no_block_held(engine)
        outputs.append({key: (c.tokens, c.text, c.finish_reason, c.completion_tokens, logprobs[key],
                              prompt_logprobs.get(key)) for key, c in results.items()})
    return outputs


def close(got, expected) -> bool:
    """Log-probabilities (nested tuples and lists of token ids and floats) equal up to float rounding: the
    two engines batch the same rows in different steps."""
    if isinstance(expected, float):
        return got == pytest.approx(expected, abs=1e-5)
    if isinstance(expected, (list, tuple)):
        return len(got) == len(expected) and all(close(g, e) for g, e in zip(got, expected, strict=True))
    return got == expected


def test_the_next_step_is_launched_before_the_tokens_of_this_one_are_read(model, tok):
    engine = make_engine(model, tok, async_scheduling=True)
    engine.add_request("r", prompts(tok)[0], SamplingParams(temperature=0.0, max_tokens=8))
    assert engine.step() == []  # the prefill is launched; its token is read by the next step
    (seq,) = engine.scheduler.running
    assert engine.in_flight is not None and seq.num_pending == 1 and len(seq) == seq.num_prompt_tokens + 1
    results = defaultdict(Choice)
    collect(results, engine.step())  # launched the first decode, then read the prefill's token
    assert len(results["r", 0].tokens) == 1 and seq.num_pending == 1 and seq.num_output_tokens == 1
    assert engine.in_flight.batch.decodes == [seq]


def test_seeded_sampling_n_choices_and_logprobs_are_those_of_a_sync_engine(model, tok):
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, n=3, seed=11, logprobs=2)
    sync, async_ = both_with_logprobs(model, tok, [(prompts(tok)[0], sampled), (prompts(tok)[1], SamplingParams(
        temperature=0.7, max_tokens=12, seed=5, prompt_logprobs=1))])
    assert sync.keys() == async_.keys() and len(sync) == 4
    for key in sync:
        assert async_[key][:4] == sync[key][:4]
        assert close(async_[key][4:], sync[key][4:])
    assert all(logprob is not None for logprob, _ in sync["r0", 2][4]) and sync["r1", 0][5] is not None


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, max_tokens=16, seed=2, frequency_penalty=1.5, presence_penalty=1.0),
    SamplingParams(temperature=1.0, max_tokens=16, seed=2, repetition_penalty=1.8),
], ids=["penalties", "repetition"])
def test_a_request_whose_sampling_reads_its_tokens_draws_what_it_draws_in_a_sync_engine(model, tok, params):
    """Its step is read before the next is scheduled; a plain request in the same batch overlaps as usual."""
    plain = SamplingParams(temperature=1.0, max_tokens=16, seed=4)
    sync, async_ = both(model, tok, [(prompts(tok)[1], params), (prompts(tok)[0], plain)])
    assert sync == async_


def test_min_tokens_holds_the_stop_tokens_back_exactly_as_long_as_in_a_sync_engine(tok):
    end = tok.encode_special("<|assistant_end|>")
    model = bigram_model(tok, {}, default=end)  # ends at once unless held back
    held = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=3)
    sync, async_ = both(model, tok, [(prompts(tok)[0], held), (prompts(tok)[1], SamplingParams(max_tokens=10))])
    assert sync == async_
    tokens, _, reason, _ = sync["r0", 0]
    assert len(tokens) == 4 and tokens[-1] == end and reason == "stop"


def test_a_grammar_request_generates_what_it_generates_in_a_sync_engine(model, tok):
    grammar = SamplingParams(temperature=1.0, max_tokens=48, seed=9, grammar=json_grammar(SCHEMA))
    sync, async_ = both(model, tok, [(prompts(tok)[0], grammar), (prompts(tok)[1], SamplingParams(max_tokens=20, seed=1))],
                        num_blocks=128)
    assert sync == async_


def test_forced_calculator_tokens_get_the_log_probabilities_a_sync_engine_gives_them(tok):
    """The calculator's output is forced after the step that samples in its place was launched: that row's
    draw is replaced and its log-probabilities are those of the forced token, as in a sync engine."""
    model = tool_model(tok, "3+1")
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "3+1?"}]})
    outputs = []
    for async_scheduling in (False, True):
        engine = make_engine(model, tok, async_scheduling=async_scheduling)
        engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=20, logprobs=2))
        events = []
        while engine.has_work():
            events += [(e.token_id, e.logprob, e.top_logprobs) for e in engine.step() if e.token_id is not None]
        outputs.append(events)
    sync, async_ = outputs
    assert [token for token, _, _ in async_] == [token for token, _, _ in sync]
    assert tok.encode_special("<|output_start|>") in [token for token, _, _ in sync]
    for (_, logprob, top), (_, expected, expected_top) in zip(async_, sync, strict=True):
        assert logprob == pytest.approx(expected, abs=1e-5)
        assert [t for t, _ in top] == [t for t, _ in expected_top]


def test_no_token_past_max_tokens_is_computed(tok):
    """A sequence whose pending token is its last is not scheduled again: every decode row computes a token
    some request gets."""
    a = tok.encode("a")[0]
    engine = make_engine(bigram_model(tok, {}, default=a), tok, async_scheduling=True)  # never stops by itself
    rows = []
    real_run = engine.runner.run

    def run_and_count(prefills, decodes, *args):
        rows.append(len(decodes))
        return real_run(prefills, decodes, *args)

    engine.runner.run = run_and_count
    for i, max_tokens in enumerate((1, 5, 9)):
        engine.add_request(f"r{i}", prompts(tok)[i], SamplingParams(temperature=0.0, max_tokens=max_tokens))
    results = run(engine)
    assert [len(results[f"r{i}", 0].tokens) for i in range(3)] == [1, 5, 9]
    assert sum(rows) == 1 + 5 + 9 - 3  # each request's first token comes from its prefill
    assert no_block_held(engine)


def test_an_engine_that_is_aborted_with_a_step_in_flight_drops_its_tokens(model, tok):
    engine: LLMEngine = make_engine(model, tok, async_scheduling=True)
    engine.add_request("r", prompts(tok)[1], SamplingParams(temperature=0.0, max_tokens=20))
    results = defaultdict(Choice)
    for _ in range(4):
        collect(results, engine.step())
    assert engine.in_flight is not None
    engine.abort("r")
    assert no_block_held(engine)  # at once, while the step still runs
    collect(results, engine.step())
    assert results["r", 0].finish_reason == "abort" and len(results["r", 0].tokens) == 3
    assert not engine.has_work()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_neither_launching_nor_reading_a_step_waits_for_the_device_queue(model, tok):
    """What the host sends for a step goes from pinned memory (serving/engine/transfer.py) and what it reads
    comes back into pinned memory behind an event, so launching step k+1 does not wait for step k and reading
    step k does not wait for step k+1: torch's sync debug mode raises on any stream sync (an event's is
    not one)."""
    engine = make_engine(model, tok, async_scheduling=True, device="cuda")
    for name in ("_launch", "_resolve"):
        setattr(engine, name, without_stream_syncs(getattr(engine, name)))
    requests = [SamplingParams(temperature=0.0, max_tokens=12, n=2, logprobs=1, prompt_logprobs=1),
                SamplingParams(temperature=0.8, top_k=5, top_p=0.9, max_tokens=12, seed=1, logit_bias={3: 1.0}),
                SamplingParams(temperature=1.0, max_tokens=12, seed=2)]
    for i, params in enumerate(requests):
        engine.add_request(f"r{i}", prompts(tok)[i], params)
    results = run(engine)
    assert len(results) == 4 and all(c.tokens and c.finish_reason in ("stop", "length") for c in results.values())


def without_stream_syncs(method):
    def guarded(*args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return method(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return guarded
