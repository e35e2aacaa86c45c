"""Prompt log-probabilities (completions' `echo` with `logprobs`, as vLLM returns them) over a real engine and
server, through the official `openai` client: every prompt token's entry equals a full forward of the model,
computed on the batch (several requests at once, prompts longer than a step's token budget), never skipped
by the prefix cache (not even after a preemption); `max_tokens: 0` scores the prompt only; token-id prompts; a completion's stop token
keeps its entry (chat shows none)."""

import asyncio
import random

import openai
import pytest
import torch

from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from serving.engine.llm_engine import LLMEngine
from serving.engine.sequence import SamplingParams
from tests.system import test_api
from tests.system.test_api import CONTEXT, MODEL, greedy

tok, model, engine, base_url, client, http = (test_api.tok, test_api.model, test_api.engine, test_api.base_url,
                                              test_api.client, test_api.http)

TEXT = "the quick brown fox jumps over the lazy dog"


def forward_logprobs(model: GPT, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of ids, one forward over the whole sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids])).float().log_softmax(dim=-1)[0]


def piece(tok: Tokenizer, token: int) -> str:
    """A token as the legacy logprobs write it: its text, or a special token's name."""
    data = tok.id_to_bytes(token)
    return data.decode("utf-8", errors="replace") if data else tok.decode([token])


def check_prompt_entries(model: GPT, tok: Tokenizer, prompt: list[int], logprobs, k: int) -> None:
    """The first len(prompt) entries are the prompt's: null first, then each token's log-probability and
    the k likeliest tokens' under the full forward."""
    reference = forward_logprobs(model, prompt)
    assert logprobs.tokens[: len(prompt)] == [piece(tok, t) for t in prompt]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for i in range(1, len(prompt)):
        row = reference[i - 1]
        assert logprobs.token_logprobs[i] == pytest.approx(row[prompt[i]].item(), abs=1e-4), i
        top = logprobs.top_logprobs[i]
        assert 1 <= len(top) <= k  # two tokens with the same text share a key
        assert max(top.values()) == pytest.approx(row.max().item(), abs=1e-4), i


def test_echo_with_logprobs_scores_every_prompt_token_as_the_full_forward(client, model, tok):
    prompt = tok.encode(TEXT, prepend="<|bos|>")
    reply = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=4, temperature=0, logprobs=3,
                                      echo=True)
    (choice,) = reply.choices
    logprobs = choice.logprobs
    assert choice.text.startswith(TEXT)
    generated = greedy(model, tok, prompt, 4)
    assert len(logprobs.tokens) == len(prompt) + reply.usage.completion_tokens == len(prompt) + len(generated)
    check_prompt_entries(model, tok, prompt, logprobs, 3)
    reference = forward_logprobs(model, prompt + generated)
    for i, token in enumerate(generated):  # the completion's entries follow, as without echo
        assert logprobs.token_logprobs[len(prompt) + i] == pytest.approx(reference[len(prompt) + i - 1, token].item(),
                                                                         abs=1e-4)
    # offsets index the choice's text: the added <|bos|> shows no text, the prompt's tokens spell it out
    assert logprobs.text_offset[:2] == [0, 0] and logprobs.text_offset == sorted(logprobs.text_offset)
    assert "".join(logprobs.tokens[1 : len(prompt)]) == TEXT
    assert all(TEXT[o:].startswith(t) for o, t in zip(logprobs.text_offset[1 : len(prompt)], logprobs.tokens[1:]))
    assert reply.usage.prompt_tokens_details.cached_tokens == 0


def test_max_tokens_zero_with_echo_scores_the_prompt_only(client, http, model, tok):
    prompt = tok.encode(TEXT, prepend="<|bos|>")
    reply = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=0, echo=True, logprobs=1, temperature=0)
    (choice,) = reply.choices
    assert choice.text == TEXT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(prompt)
    check_prompt_entries(model, tok, prompt, choice.logprobs, 1)
    assert reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == len(prompt)
    stream = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=0, echo=True, logprobs=1, stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.text for c in chunks) == TEXT and chunks[-1].finish_reason == "length"
    streamed = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(choice.logprobs.token_logprobs, abs=1e-4)
    plain = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=0, echo=True)
    assert plain.choices[0].text == TEXT and plain.choices[0].logprobs is None
    r = http.post("/v1/completions", json={"prompt": TEXT, "max_tokens": 0})  # nothing to echo: nothing to do
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_the_prefix_cache_never_skips_a_scored_prompt(client, model, tok):
    """A prompt the cache holds is still computed in full for a request that scores it (it takes no hits),
    and its blocks serve the requests after it."""
    long_text = f"{TEXT}, and then {TEXT} again"
    prompt = tok.encode(long_text, prepend="<|bos|>")
    assert len(prompt) > 2 * 8  # several of the engine's 8-token blocks
    first = client.completions.create(model=MODEL, prompt=long_text, max_tokens=1, temperature=0)
    again = client.completions.create(model=MODEL, prompt=long_text, max_tokens=0, echo=True, logprobs=2)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    check_prompt_entries(model, tok, prompt, again.choices[0].logprobs, 2)
    after = client.completions.create(model=MODEL, prompt=long_text, max_tokens=1, temperature=0)
    assert after.usage.prompt_tokens_details.cached_tokens > 0
    assert after.choices[0].text == first.choices[0].text


def test_scored_prompts_longer_than_a_step_batched_with_others(base_url, model, tok):
    """Several requests at once, n=2 and prompts longer than a step's token budget (64: chunked prefill):
    each choice's prompt entries equal the full forward."""
    words = (TEXT + " ").split()
    texts = [(" ".join(words[i:] + words[:i]) + ", ") * (6 if i % 2 else 1) for i in range(4)]
    prompts = [tok.encode(t, prepend="<|bos|>")[: CONTEXT - 4] for t in texts]
    assert max(map(len, prompts)) > 64

    async def main() -> list:
        async_client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
        return await asyncio.gather(*(async_client.completions.create(
            model=MODEL, prompt=p, max_tokens=2, echo=True, logprobs=2, n=2, temperature=1.0, seed=i)
            for i, p in enumerate(prompts)))

    for prompt, reply in zip(prompts, asyncio.run(main()), strict=True):
        for choice in reply.choices:
            check_prompt_entries(model, tok, prompt, choice.logprobs, 2)


def test_token_id_prompts_run_as_given_and_echo_their_decoding(client, http, model, tok):
    """Token ids go to the engine as they are (no <|bos|> added); the echo decodes them, special tokens by
    name, and their entries index that text."""
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "quick fox?"}]})
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    (choice,) = reply.choices
    assert choice.text == tok.decode(prompt) and reply.usage.prompt_tokens == len(prompt)
    check_prompt_entries(model, tok, prompt, choice.logprobs, 1)
    assert all(choice.text[o:].startswith(t) for o, t in zip(choice.logprobs.text_offset, choice.logprobs.tokens))
    plain = client.completions.create(model=MODEL, prompt=[prompt], max_tokens=3, temperature=0)  # a batch of one
    assert plain.choices[0].text == test_api.text_of(tok, greedy(model, tok, prompt, 3))
    for bad in ([], [[]], [1, "a"], [True], [tok.vocab_size]):
        r = http.post("/v1/completions", json={"prompt": bad})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), (bad, r.text)


def test_a_completions_stop_token_keeps_its_entry_and_chats_does_not(client, model, tok):
    """vLLM's completions list every completion token, the stop token too (a client scoring a prompt with
    max_tokens 1 counts on one entry after the prompt's); OpenAI's chat shows no end of turn."""
    prompt = tok.encode(TEXT, prepend="<|bos|>")
    first = greedy(model, tok, prompt, 1)[0]
    reply = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=1, temperature=0, logprobs=1, echo=True,
                                      extra_body={"stop_token_ids": [first]})
    (choice,) = reply.choices
    assert choice.finish_reason == "stop" and choice.text == TEXT
    assert len(choice.logprobs.token_logprobs) == len(prompt) + 1 == reply.usage.prompt_tokens + 1
    assert choice.logprobs.token_logprobs[-1] == pytest.approx(forward_logprobs(model, prompt)[-1, first].item(),
                                                               abs=1e-4)
    messages = [{"role": "user", "content": TEXT}]
    chat_first = greedy(model, tok, tok.render_for_completion({"messages": messages}), 1)[0]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0, logprobs=True,
                                          extra_body={"stop_token_ids": [chat_first]})
    assert chat.choices[0].finish_reason == "stop" and chat.choices[0].logprobs.content == []


def test_a_scored_prompt_preempted_mid_prefill_is_recomputed_without_cache_hits(model, tok):
    """The engine preempts the scoring sequence half-way through its chunked prefill (a decode needs its
    blocks); it comes back after the other finishes and computes its prompt again from the start, without
    hitting its first block, which is still in the prefix cache: its prompt entries equal the full forward,
    sent once, with its first token."""
    engine = LLMEngine(model, tok, num_blocks=8, block_size=4, max_num_seqs=4, max_num_batched_tokens=4)
    rng = random.Random(3)
    ordinary = [rng.randrange(256) for _ in range(8)]
    scored = [rng.randrange(256) for _ in range(20)]
    engine.add_request("long", ordinary, SamplingParams(temperature=0, max_tokens=20, min_tokens=20))
    events = engine.step()
    engine.add_request("scored", scored, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2))
    while engine.has_work():
        events += engine.step()
    assert engine.scheduler.num_preemptions >= 1
    assert engine.block_manager.prefix_cache_hits == 0
    mine = [e for e in events if e.request_id == "scored"]
    assert [e.prompt_logprobs is not None for e in mine] == [True] + [False] * (len(mine) - 1)
    assert mine[0].cached_tokens == 0
    entries = mine[0].prompt_logprobs
    reference = forward_logprobs(model, scored)
    assert len(entries) == len(scored) and entries[0] is None
    for i in range(1, len(scored)):
        logprob, top = entries[i]
        assert logprob == pytest.approx(reference[i - 1, scored[i]].item(), abs=1e-4), i
        assert [t for t, _ in top] == reference[i - 1].topk(2).indices.tolist(), i
