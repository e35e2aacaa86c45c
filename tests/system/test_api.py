"""The OpenAI-compatible API (serving/api/) under uvicorn on 127.0.0.1, over a real AsyncEngine running a tiny
random GPT, driven by the official `openai` client (and httpx where the wire format itself is the point):
results and usage equal the tokenizer's and the reference generator's, streaming, choices, seeds, stop
strings, models; every error in OpenAI's shape; API keys; overload; disconnects that free their blocks."""

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn

from nanochat.generate import generate_batch
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from services.network import free_port
from serving.api import app as api_app
from serving.api.app import create_app
from serving.engine.async_engine import AsyncEngine
from serving.engine.llm_engine import LLMEngine, TokenEvent
from tests.support.gpt_fixtures import scrambled_model

TEXT = "hello world, the quick brown fox jumps over the lazy dog. how are you today? fine, thanks. "
MODEL = "nanochat-test"
CONTEXT = 96  # the model's sequence_len: the engine's context limit
MAX_PROMPT = 120  # the API's prompt limit, above the context so that both limits can be reached
MAX_TOKENS = 64
ERROR_KEYS = {"message", "type", "param", "code"}


# ---------------------------------------------------------------------------------------------
# a real server over a real engine (test_api_fuzz.py uses these too)


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator([TEXT * 4], 320)


def tiny_model(tok: Tokenizer) -> GPT:
    """Random weights everywhere (nanochat's init zeroes the output projections, which would make the
    model ignore its context), so that different prompts and seeds give different text."""
    config = GPTConfig(sequence_len=CONTEXT, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                       n_embd=64)
    return scrambled_model(config, scale=2.0)


class RecordingEngine(LLMEngine):
    """The real engine, remembering which requests were aborted (only a consumer that stops reading
    before the end aborts one), so a test can tell an abort from a request that simply finished."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.aborted: list[str] = []

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        super().abort(request_id)


def make_engine(model: GPT, tok: Tokenizer, max_queue: int = 64, async_scheduling: bool = False) -> AsyncEngine:
    return AsyncEngine(RecordingEngine(model, tok, num_blocks=64, block_size=8, max_num_seqs=8,
                                       max_num_batched_tokens=64, async_scheduling=async_scheduling),
                       max_queue=max_queue)


@contextmanager
def serve(app) -> Iterator[str]:
    """app under uvicorn in a background thread on a free port of 127.0.0.1; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def serve_scrambled_model(tok: Tokenizer, *, sequence_len: int, max_num_seqs: int, max_tokens_limit: int,
                          model_name: str) -> Iterator[str]:
    """A server over an engine running a tiny GPT of random weights that make its replies depend on their
    context, with room for max_num_seqs sequences at once; yields its base URL."""
    config = GPTConfig(sequence_len=sequence_len, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                       n_embd=64)
    engine = AsyncEngine(LLMEngine(scrambled_model(config, scale=2.0), tok, num_blocks=1024, block_size=8,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=sequence_len), max_queue=64)
    app = create_app(engine, tok, model_name=model_name, max_tokens_limit=max_tokens_limit)
    try:
        with serve(app) as url:
            yield url
    finally:
        engine.shutdown()


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def all_blocks_free(engine: AsyncEngine) -> bool:
    stats = engine.stats()
    return (stats["free_blocks"] == stats["total_blocks"] and stats["free_window_blocks"] == stats["total_window_blocks"]
            and stats["running"] == stats["waiting"] == 0)


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    return tiny_model(tok)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(model, tok, request) -> Iterator[AsyncEngine]:
    """The API's engine, reading each step before the next (sync) and with async scheduling."""
    engine = make_engine(model, tok, async_scheduling=request.param)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def base_url(engine, tok) -> Iterator[str]:
    app = create_app(engine, tok, model_name=MODEL, max_prompt_tokens=MAX_PROMPT, max_tokens_limit=MAX_TOKENS)
    with serve(app) as url:
        yield url


@pytest.fixture
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def http(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        yield http


# ---------------------------------------------------------------------------------------------
# what the model would say


def greedy(model: GPT, tok: Tokenizer, prompt: list[int], max_tokens: int) -> list[int]:
    """The reference: nanochat's single-request generator (its own dense KV cache), greedy."""
    (completion,), _ = generate_batch(model, tok, prompt, max_tokens=max_tokens, temperature=0.0)
    return completion


def text_of(tok: Tokenizer, ids: list[int]) -> str:
    """The text of generated tokens: their exact bytes (special tokens have none), as UTF-8."""
    return b"".join(tok.id_to_bytes(i) for i in ids).decode("utf-8", errors="replace")


def chat_prompt(tok: Tokenizer, messages: list[dict]) -> list[int]:
    return tok.render_for_completion({"messages": messages})


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello, quick fox"}]
PROMPT = "the lazy dog"


# ---------------------------------------------------------------------------------------------
# results


def test_chat_completion_is_the_models_reply_with_the_tokenizers_counts(client, model, tok):
    prompt = chat_prompt(tok, MESSAGES)
    expected = greedy(model, tok, prompt, 20)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == text_of(tok, expected)
    assert choice.finish_reason == ("length" if len(expected) == 20 else "stop")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(expected)
    assert r.usage.total_tokens == len(prompt) + len(expected)


def test_streamed_chat_sends_the_role_the_deltas_the_finish_and_the_usage(client, model, tok):
    prompt = chat_prompt(tok, MESSAGES)
    expected = greedy(model, tok, prompt, 20)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == text_of(tok, expected)
    finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
    assert finishes == ["length" if len(expected) == 20 else "stop"]
    assert with_choices[-1].choices[0].finish_reason is not None
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.prompt_tokens == len(prompt)
    assert usage.usage.completion_tokens == len(expected)
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_continues_the_prompt_after_bos(client, model, tok):
    prompt = tok.encode(PROMPT, prepend="<|bos|>")
    expected = greedy(model, tok, prompt, 16)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == text_of(tok, expected)
    assert r.choices[0].finish_reason == ("length" if len(expected) == 16 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(expected))


def test_streamed_completion_is_server_sent_events_ending_with_done(http, model, tok):
    prompt = tok.encode(PROMPT, prepend="<|bos|>")
    expected = greedy(model, tok, prompt, 16)
    body = {"model": MODEL, "prompt": [PROMPT], "max_tokens": 16, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == text_of(tok, expected)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(expected),
                                   "total_tokens": len(prompt) + len(expected),
                                   "prompt_tokens_details": {"cached_tokens": 0}}


@pytest.mark.parametrize("route, body", [("/v1/completions", {"prompt": PROMPT}),
                                         ("/v1/chat/completions", {"messages": MESSAGES})])
def test_continuous_usage_stats_puts_the_usage_so_far_in_every_chunk(http, route, body):
    options = {"include_usage": True, "continuous_usage_stats": True}
    r = http.post(route, json={**body, "max_tokens": 12, "temperature": 0, "stream": True, "stream_options": options})
    chunks = [json.loads(e.removeprefix("data: ")) for e in r.text.split("\n\n")[:-2]]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == chunks[-1]["usage"]["total_tokens"] - chunks[-1]["usage"][
        "prompt_tokens"] and counts[-1] > counts[0]
    assert {c["usage"]["prompt_tokens"] for c in chunks} == {chunks[-1]["usage"]["prompt_tokens"]}
    assert_error(http.post(route, json={**body, "stream": True, "stream_options": {"continuous_usage_stats": True}}),
                 400, "stream_options")


class HeldBack:
    """The engine with serve.stream_interval_s's hold-back, as an engine replica sends its lists: every
    token made during interval_s after the first comes in one list."""

    def __init__(self, engine: AsyncEngine, interval_s: float):
        self.engine, self.interval_s = engine, interval_s

    def generate_batches(self, request_id, prompt_ids, params):
        return self.engine.generate_batches(request_id, prompt_ids, params, self.interval_s)

    def alive(self) -> bool:
        return self.engine.alive()


def test_tokens_that_come_together_stream_as_one_chunk_per_choice_unless_logprobs_are_asked(model, tok):
    """A list of several tokens (held back, or read late) is one text chunk per choice, not one per token:
    the same text, finish and usage with far fewer chunks. With logprobs each token keeps its own chunk.
    The interval is long (5 s) but costs nothing: the list that ends a request is never held back."""
    engine = make_engine(model, tok)
    ids = greedy(model, tok, chat_prompt(tok, MESSAGES), 20)
    expected, finish = text_of(tok, ids), "length" if len(ids) == 20 else "stop"
    try:
        with serve(create_app(HeldBack(engine, 5.0), tok, model_name=MODEL)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
            chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                                         n=2, stream=True, stream_options={"include_usage": True}))
            for index in (0, 1):
                mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
                texts = [c.delta.content for c in mine if c.delta.content]
                assert "".join(texts) == expected and len(texts) <= 2, texts  # the first token, then the rest
                assert [c.finish_reason for c in mine if c.finish_reason] == [finish]
            assert chunks[-1].usage.completion_tokens == 2 * len(ids) > 6

            pieces = [c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True) if c.choices]
            whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
            assert "".join(pieces) == whole.choices[0].text and len(pieces) <= 2, pieces

            with_logprobs = [c.choices[0] for c in client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, logprobs=True, stream=True)
                if c.choices and c.choices[0].logprobs is not None]
            assert all(len(c.logprobs.content) == 1 for c in with_logprobs) and len(with_logprobs) > 3
            assert "".join(c.delta.content or "" for c in with_logprobs) == expected
    finally:
        engine.shutdown()


def test_n_choices_are_indexed_and_counted_together(client, model, tok):
    expected = greedy(model, tok, chat_prompt(tok, MESSAGES), 12)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == [text_of(tok, expected)] * 2  # greedy: the same reply
    assert r.usage.completion_tokens == 2 * len(expected)


def test_sampled_choices_differ_and_a_seed_reproduces_them(client):
    def ask(seed: int) -> list[str]:
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, n=2,
                                           seed=seed)
        return [c.message.content for c in r.choices]

    first = ask(7)
    assert first[0] != first[1]
    assert ask(7) == first
    assert ask(8) != first


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_cuts_the_text_before_it_or_after_it_when_asked(client, include):
    def complete(**kwargs):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, **kwargs)

    full = complete().choices[0].text
    assert len(full) >= 6, f"the model said too little to test stop strings with: {full!r}"
    stop = full[4:6]
    kept = full[: full.index(stop) + (len(stop) if include else 0)]
    options = {"extra_body": {"include_stop_str_in_output": True}} if include else {}  # vLLM's
    r = complete(stop=[stop, "never said"], **options)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (kept, "stop")
    streamed = complete(stop=stop, stream=True, **options)  # a lone string, as OpenAI allows
    assert "".join(c.choices[0].text for c in streamed if c.choices) == kept


def test_allowed_token_ids_are_all_a_reply_is_made_of(client, tok):
    allowed = [tok.encode(ch)[0] for ch in "abc"]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.5, seed=3,
                                  extra_body={"allowed_token_ids": allowed})
    assert set(r.choices[0].text) <= set("abc") and r.usage.completion_tokens == 12


def test_a_bad_word_is_never_written_as_its_tokens(client, tok):
    from serving.api.prompts import bad_words_ids

    def tokens(**kwargs) -> list[str]:
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=0, **kwargs)
        return r.choices[0].logprobs.tokens

    written = tokens()
    word = next(t for t in written if len(t.strip()) > 1).strip()  # a word the model writes as one token
    single = {tok.decode(ids) for ids in bad_words_ids(tok, [word]) if len(ids) == 1}
    assert single & set(written)
    assert not single & set(tokens(extra_body={"bad_words": [word]}))


def test_truncate_prompt_tokens_runs_the_prompts_last_tokens(client, http, model, tok):
    long_text = words(completion_ids(tok), CONTEXT + 10, MAX_PROMPT)  # over the model's context
    prompt = tok.encode(long_text, prepend="<|bos|>")
    for keep, kept in [(20, prompt[-20:]), (-1, prompt[-(CONTEXT - 1):])]:
        r = client.completions.create(model=MODEL, prompt=long_text, max_tokens=4, temperature=0, echo=True,
                                      extra_body={"truncate_prompt_tokens": keep})
        expected = greedy(model, tok, kept, min(4, CONTEXT - len(kept)))  # the engine cuts it to the room left
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(kept), len(expected))
        assert r.choices[0].text == tok.decode(kept) + text_of(tok, expected)  # the prompt run, echoed
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                          extra_body={"truncate_prompt_tokens": 5})
    expected = greedy(model, tok, chat_prompt(tok, MESSAGES)[-5:], 4)
    assert (chat.usage.prompt_tokens, chat.choices[0].message.content) == (5, text_of(tok, expected))
    assert_error(http.post("/v1/completions", json={"prompt": "x", "truncate_prompt_tokens": 0}), 400,
                 "truncate_prompt_tokens")


def test_a_priority_needs_priority_scheduling(engine, tok):
    body = {"prompt": PROMPT, "max_tokens": 2, "priority": -1}
    for scheduling, status in [(False, 400), (True, 200)]:
        app = create_app(engine, tok, model_name=MODEL, priority_scheduling=scheduling)
        with serve(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            r = http.post("/v1/completions", json=body)
            assert r.status_code == status, r.text
            if status == 400:
                assert_error(r, 400, "priority")
            assert http.post("/v1/completions", json={**body, "priority": 0}).status_code == 200  # the default


BEGUN = [*MESSAGES, {"role": "assistant", "content": "the quick"}]


@pytest.mark.parametrize("generation_prompt", [{"add_generation_prompt": False}, {}])  # vLLM's way; left out
def test_continue_final_message_goes_on_with_the_assistants_message(client, http, model, tok, generation_prompt):
    prompt = chat_prompt(tok, MESSAGES) + tok.encode("the quick")  # no <|assistant_end|>: the message goes on
    expected = text_of(tok, greedy(model, tok, prompt, 12))
    options = {"continue_final_message": True, **generation_prompt}
    r = client.chat.completions.create(model=MODEL, messages=BEGUN, max_tokens=12, temperature=0, extra_body=options)
    assert r.choices[0].message.content == expected and r.usage.prompt_tokens == len(prompt)
    echoed = client.chat.completions.create(model=MODEL, messages=BEGUN, max_tokens=12, temperature=0,
                                            extra_body={**options, "echo": True})
    assert echoed.choices[0].message.content == "the quick" + expected
    assert echoed.usage.completion_tokens == r.usage.completion_tokens  # the echo is no generated token
    streamed = client.chat.completions.create(model=MODEL, messages=BEGUN, max_tokens=12, temperature=0,
                                              stream=True, extra_body={**options, "echo": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "the quick" + expected
    assert http.post("/tokenize", json={"messages": BEGUN, **options}).json()["tokens"] == prompt


BAD_CONTINUATIONS = {
    "with add_generation_prompt": ({"messages": BEGUN, "continue_final_message": True,
                                    "add_generation_prompt": True}, "continue_final_message"),
    "of a user message": ({"messages": MESSAGES, "continue_final_message": True}, "messages[1].role"),
    "no generation prompt, no continuation": ({"messages": MESSAGES, "add_generation_prompt": False},
                                              "add_generation_prompt"),
    "with a forced call": ({"messages": BEGUN, "continue_final_message": True, "tool_choice": "required",
                            "tools": [{"type": "function", "function": {"name": "f"}}]}, "continue_final_message"),
}


@pytest.mark.parametrize("case", BAD_CONTINUATIONS)
def test_what_cannot_go_with_continue_final_message_is_a_400_naming_it(http, case):
    body, param = BAD_CONTINUATIONS[case]
    assert_error(http.post("/v1/chat/completions", json=body), 400, param)


def test_a_list_of_prompts_answers_each_with_its_n_choices_in_turn(client, http, model, tok):
    prompts = [PROMPT, "hello world", [tok.get_bos_token_id(), *tok.encode("fine, thanks")]]
    ids = [tok.encode(PROMPT, prepend="<|bos|>"), tok.encode("hello world", prepend="<|bos|>"), prompts[2]]
    generated = [greedy(model, tok, p, 8) for p in ids]
    expected = [text_of(tok, tokens) for tokens in generated]
    body = {"prompt": prompts, "max_tokens": 8, "temperature": 0, "n": 2}
    whole = http.post("/v1/completions", json=body).json()
    assert [c["index"] for c in whole["choices"]] == list(range(6))
    assert [c["text"] for c in whole["choices"]] == [text for text in expected for _ in range(2)]
    assert whole["usage"]["prompt_tokens"] == sum(map(len, ids))  # each prompt once, as OpenAI counts
    assert whole["usage"]["completion_tokens"] == 2 * sum(map(len, generated))
    streamed: dict[int, str] = {}
    chunks = client.completions.create(model=MODEL, prompt=prompts[:2], max_tokens=8, temperature=0, n=2,
                                       stream=True, stream_options={"include_usage": True})
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
        usage = chunk.usage
    assert [streamed[i] for i in range(4)] == [text for text in expected[:2] for _ in range(2)]
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids[0]) + len(ids[1]),
                                                               2 * (len(generated[0]) + len(generated[1])))


def test_a_list_of_prompts_is_scored_as_each_alone(http):
    """lm-evaluation-harness's batches: echo with max_tokens 0 scores every prompt of the list."""
    prompts = [PROMPT, "hello world, the quick", "fine"]
    body = {"echo": True, "max_tokens": 0, "logprobs": 1, "temperature": 0}
    alone = [http.post("/v1/completions", json={**body, "prompt": p}).json()["choices"][0] for p in prompts]
    batch = http.post("/v1/completions", json={**body, "prompt": prompts}).json()["choices"]
    assert [c["index"] for c in batch] == [0, 1, 2]
    for together, single in zip(batch, alone, strict=True):
        mine, theirs = together["logprobs"], single["logprobs"]
        assert (together["text"], mine["tokens"], mine["text_offset"]) == (single["text"], theirs["tokens"],
                                                                            theirs["text_offset"])
        # computed in a batch of other rows: the same up to float32 rounding
        assert mine["token_logprobs"] == pytest.approx(theirs["token_logprobs"], abs=1e-4)
        assert mine["top_logprobs"] == [None if top is None else pytest.approx(top, abs=1e-4)
                                        for top in theirs["top_logprobs"]]


def test_a_refused_prompt_of_a_list_leaves_nothing_running(http, engine, tok):
    too_long = words(completion_ids(tok), CONTEXT, MAX_PROMPT)  # within the server's limit, over the model's
    for stream in (False, True):
        body = {"prompt": [PROMPT, too_long, "fine"], "max_tokens": 8, "stream": stream}
        assert_error(http.post("/v1/completions", json=body), 400, "prompt[1]")
    assert wait_until(lambda: all_blocks_free(engine))


def logprob_entries(http: httpx.Client, route: str, body: dict) -> list[tuple]:
    """Each token's (token, logprob, top tokens) of the first choice, streamed or not."""
    def entries(choice: dict) -> list[tuple]:
        if route == "/v1/chat/completions":
            return [(e["token"], e["logprob"], [t["token"] for t in e["top_logprobs"]])
                    for e in choice["logprobs"]["content"]]
        logprobs = choice["logprobs"]
        return list(zip(logprobs["tokens"], logprobs["token_logprobs"],
                        [None if top is None else list(top) for top in logprobs["top_logprobs"]], strict=True))

    r = http.post(route, json=body)
    if not body["stream"]:
        return entries(r.json()["choices"][0])
    chunks = [json.loads(e.removeprefix("data: ")) for e in r.text.split("\n\n")[:-2]]
    return [entry for c in chunks for choice in c["choices"] if choice.get("logprobs") for entry in entries(choice)]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route, body", [("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True,
                                                                   "top_logprobs": 2}),
                                         ("/v1/completions", {"prompt": PROMPT, "logprobs": 2, "echo": True})])
def test_return_tokens_as_token_ids_writes_each_token_as_its_id(http, stream, route, body):
    body = {**body, "max_tokens": 6, "temperature": 0, "stream": stream}
    named = logprob_entries(http, route, body)
    as_ids = logprob_entries(http, route, {**body, "return_tokens_as_token_ids": True})
    # the same tokens (the second request's prompt comes from the prefix cache: float32 rounding apart)
    assert [lp for _, lp, _ in as_ids] == pytest.approx([lp for _, lp, _ in named], abs=1e-4) and as_ids
    ids = [int(token.removeprefix("token_id:")) for token, _, _ in as_ids]
    detokenized = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert detokenized.endswith("".join(token for token, _, _ in named if not token.startswith("<|")))
    assert all(t.startswith("token_id:") for _, _, top in as_ids for t in top or [])


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve(MODEL).model_extra["max_model_len"] == CONTEXT  # vLLM's field
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.code == "model_not_found"


def test_health_is_ok(http):
    for route in ("/health", "/ping"):
        r = http.get(route)
        assert (r.status_code, r.json()) == (200, {"status": "ok"})


# ---------------------------------------------------------------------------------------------
# errors


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["param"] == param
    return body["error"]


def words(prompt_ids, low: int, high: int) -> str:
    """Text whose prompt (prompt_ids(text)) has more than low and at most high tokens."""
    for n in range(1, 1000):
        if low < len(prompt_ids("fox " * n)) <= high:
            return "fox " * n
    raise AssertionError(f"no prompt of {low}..{high} tokens")


def chat_ids(tok: Tokenizer):
    return lambda text: chat_prompt(tok, [{"role": "user", "content": text}])


def completion_ids(tok: Tokenizer):
    return lambda text: tok.encode(text, prepend="<|bos|>")


USER = [{"role": "user", "content": "hi"}]
BAD_CHAT_BODIES = {
    "no messages": ({"model": MODEL}, "messages"),
    "no message at all": ({"messages": []}, "messages"),
    "an unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    "content of the wrong type": ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    "a string temperature": ({"messages": USER, "temperature": "hot"}, "temperature"),
    "a boolean max_tokens": ({"messages": USER, "max_tokens": True}, "max_tokens"),
    "zero choices": ({"messages": USER, "n": 0}, "n"),
    "an empty stop string": ({"messages": USER, "stop": ["a", ""]}, "stop[1]"),
    "top_p out of range": ({"messages": USER, "top_p": 0}, "top_p"),
    "include_usage not a boolean": ({"messages": USER, "stream_options": {"include_usage": "yes"}},
                                    "stream_options.include_usage"),
    "the assistant speaking last": ({"messages": [*USER, {"role": "assistant", "content": "yo"}]},
                                    "messages[1].role"),
    "two user messages in a row": ({"messages": [*USER, *USER]}, "messages"),
    "max_tokens above the limit": ({"messages": USER, "max_tokens": MAX_TOKENS + 1}, "max_tokens"),
    "max_completion_tokens above the limit": ({"messages": USER, "max_completion_tokens": MAX_TOKENS + 1},
                                              "max_completion_tokens"),
    "an allowed token past the vocabulary": ({"messages": USER, "allowed_token_ids": [1, 10**6]},
                                             "allowed_token_ids[1]"),
    "no allowed token": ({"messages": USER, "allowed_token_ids": []}, "allowed_token_ids"),
    "an empty bad word": ({"messages": USER, "bad_words": ["ok", ""]}, "bad_words[1]"),
    # a grammar and a mask of their own could leave no token to take (seen in the fuzz: the engine failed)
    "allowed tokens with a grammar": ({"messages": USER, "allowed_token_ids": [1],
                                       "structured_outputs": {"choice": ["x"]}}, "allowed_token_ids"),
    "bad words with a grammar": ({"messages": USER, "bad_words": ["x"], "response_format": {"type": "json_object"}},
                                 "bad_words"),
}


@pytest.mark.parametrize("case", BAD_CHAT_BODIES)
def test_a_bad_chat_request_is_a_400_naming_the_field(http, case):
    body, param = BAD_CHAT_BODIES[case]
    error = assert_error(http.post("/v1/chat/completions", json=body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_a_bad_completion_request_is_a_400_naming_the_field(http):
    assert_error(http.post("/v1/completions", json={"prompt": ["one"] * 65}), 400, "prompt")  # MAX_PROMPTS
    assert_error(http.post("/v1/completions", json={"prompt": ["one", {"a": 1}]}), 400, "prompt[1]")
    assert_error(http.post("/v1/completions", json={"prompt": "x", "seed": -1}), 400, "seed")
    for chat_only in [{"max_completion_tokens": 2}, {"parallel_tool_calls": False}]:  # not OpenAI's completions'
        error = assert_error(http.post("/v1/completions", json={"prompt": "x", **chat_only}), 400, *chat_only)
        assert "Unrecognized" in error["message"]


def test_malformed_json_is_a_400_not_a_422(http):
    r = http.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert "JSON" in assert_error(r, 400)["message"]
    r = http.post("/v1/completions", content=b'["a list"]', headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_the_openai_client_sees_a_bad_request_with_its_param(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=5.0)
    assert e.value.param == "temperature"


def test_a_prompt_over_the_servers_limit_is_refused(http, tok):
    body = {"messages": [{"role": "user", "content": words(chat_ids(tok), MAX_PROMPT, MAX_PROMPT + 40)}]}
    error = assert_error(http.post("/v1/chat/completions", json=body), 400, "messages")
    assert error["code"] == "context_length_exceeded"


def test_a_prompt_over_the_models_context_is_refused_by_the_engine(http, tok):
    body = {"messages": [{"role": "user", "content": words(chat_ids(tok), CONTEXT, MAX_PROMPT)}]}
    error = assert_error(http.post("/v1/chat/completions", json=body), 400, "messages")
    assert "context" in error["message"]
    body = {"prompt": words(completion_ids(tok), CONTEXT, MAX_PROMPT), "stream": True}  # refused before any event
    assert_error(http.post("/v1/completions", json=body), 400, "prompt")


def test_an_unknown_model_is_a_404(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=USER)
    assert (e.value.code, e.value.param) == ("model_not_found", "model")
    assert_error(http.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "model")


def test_unknown_routes_and_methods_answer_in_openais_shape(http):
    assert_error(http.get("/v1/engines"), 404)
    assert_error(http.post("/nowhere", json={}), 404)
    assert_error(http.get("/v1/chat/completions"), 405)
    assert_error(http.delete("/v1/models"), 405)


def test_api_keys_guard_v1_but_not_health_or_the_page(engine, tok):
    app = create_app(engine, tok, model_name=MODEL, api_keys=["first-key", "second-key"])
    with serve(app) as url, httpx.Client(base_url=url) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "second-key"}):
            error = assert_error(http.get("/v1/models", headers=headers), 401)
            assert error["code"] == "invalid_api_key"
        # checked before the body is read: a caller without a key learns nothing about the request
        r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert_error(r, 401)
        assert http.get("/health").status_code == 200
        assert http.get("/").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="second-key", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4)
        assert r.choices[0].message.content is not None


# ---------------------------------------------------------------------------------------------
# overload and shutdown


def test_overload_is_a_429_with_retry_after_and_service_resumes(model, tok):
    engine = make_engine(model, tok, max_queue=2)
    app = create_app(engine, tok, model_name=MODEL, max_tokens_limit=MAX_TOKENS)
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(*[http.post("/v1/completions", json=body) for _ in range(8)])

    try:
        with serve(app) as url:
            responses = asyncio.run(burst(url))
            statuses = [r.status_code for r in responses]
            assert set(statuses) == {200, 429}, statuses
            for r in responses:
                if r.status_code == 429:
                    assert assert_error(r, 429)["type"] == "rate_limit_error"
                    assert int(r.headers["retry-after"]) > 0
            served = responses[statuses.index(200)].json()["choices"][0]["text"]
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == served  # greedy: the same again
    finally:
        engine.shutdown()


def test_a_shut_down_engine_is_a_503_with_retry_after_and_unhealthy(model, tok):
    engine = make_engine(model, tok)
    engine.shutdown()
    with serve(create_app(engine, tok)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER}, timeout=30)
        assert assert_error(r, 503)["type"] == "server_error"
        assert int(r.headers["retry-after"]) > 0
        assert_error(httpx.get(f"{url}/health"), 503)


class FailingEngine:
    """An engine that breaks after its first token: the one stand-in here, for a failure no real part
    produces on demand."""

    def alive(self) -> bool:
        return True

    async def generate_batches(self, request_id, prompt_ids, params):
        yield [TokenEvent(request_id, 0, 1, "a", None, len(prompt_ids), 1)]
        raise KeyError("broken")


def test_an_engine_failure_is_a_500_or_an_error_event_in_openais_shape(tok):
    with serve(create_app(FailingEngine(), tok)) as url, httpx.Client(base_url=url) as http:
        error = assert_error(http.post("/v1/completions", json={"prompt": "x"}), 500)
        assert error["type"] == "server_error"
        with http.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as r:
            assert r.status_code == 200  # sent with the first token, before the failure
            events = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line]
        assert events[0]["choices"][0]["text"] == "a"
        assert set(events[-1]) == {"error"} and set(events[-1]["error"]) == ERROR_KEYS


# ---------------------------------------------------------------------------------------------
# a client that leaves


def test_a_client_leaving_mid_stream_aborts_its_request_and_frees_its_blocks(base_url, engine):
    body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, "n": 4, "stream": True}
    with httpx.Client(base_url=base_url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept until the client leaves: a dropped line iterator closes the connection
            first = json.loads(next(lines).removeprefix("data: "))
            assert engine.stats()["free_blocks"] < engine.stats()["total_blocks"]  # it holds blocks now
    assert wait_until(lambda: first["id"] in engine.engine.aborted), "the request was not aborted"
    assert wait_until(lambda: all_blocks_free(engine)), engine.stats()


def test_a_client_leaving_while_waiting_for_a_whole_completion_aborts_it(base_url, engine):
    body = json.dumps({"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, "n": 4}).encode()
    host, port = base_url.removeprefix("http://").split(":")
    aborted_before = len(engine.engine.aborted)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: engine.stats()["running"] > 0), "the request never started"
    assert wait_until(lambda: len(engine.engine.aborted) > aborted_before), "the request was not aborted"
    assert engine.engine.aborted[-1].startswith("chatcmpl-")
    assert wait_until(lambda: all_blocks_free(engine)), engine.stats()


# ---------------------------------------------------------------------------------------------
# the web UI's files


def test_the_page_is_html_under_a_strict_content_security_policy(http):
    r = http.get("/")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert "<html" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"


def test_the_pages_scripts_are_served_with_their_type_and_nothing_else_is(http):
    r = http.get("/static/app.js")
    assert r.status_code == 200 and r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert r.headers["content-security-policy"].startswith("default-src 'self'")
    assert_error(http.get("/static/missing.js"), 404)
    assert_error(http.get("/static/..%2Fapi%2Fapp.py"), 404)


def test_a_missing_page_is_a_503_in_openais_shape(http, monkeypatch, tmp_path):
    monkeypatch.setattr(api_app, "STATIC_DIR", tmp_path)  # an installation without the UI's files
    assert_error(http.get("/"), 503)


# ---------------------------------------------------------------------------------------------
# a model that comes and changes while the app runs


class SwitchedModel:
    """A ServedModels whose model the test sets: none at first, as a server started on empty storage."""

    hint = "train one with `nanochat speedrun --storage /somewhere`"

    def __init__(self):
        self.model: api_app.ServedModel | None = None
        self.refused: str | None = None

    async def current(self) -> api_app.ServedModel | None:
        return self.model


def test_no_model_yet_is_a_503_saying_how_to_train_one_then_the_model_serves(engine, tok):
    """Before a model exists: /health 200, no models, the completions 503 with Retry-After and a message
    saying how to train one (to the official client, an APIStatusError); once the model comes, the same app
    lists it with its step and answers."""
    served = SwitchedModel()
    app = create_app(engine, served, model_name=MODEL, max_prompt_tokens=MAX_PROMPT, max_tokens_limit=MAX_TOKENS)
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        assert http.get("/health").status_code == 200
        assert http.get("/v1/models").json() == {"object": "list", "data": []}
        assert_error(http.get(f"/v1/models/{MODEL}"), 404, param="model")
        chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
        for path, body in [("/v1/chat/completions", chat), ("/v1/completions", {"prompt": "hello", "max_tokens": 4})]:
            r = http.post(path, json=body)
            error = assert_error(r, 503)
            assert r.headers["retry-after"].isdigit(), r.headers
            assert error["code"] == "model_not_loaded" and error["type"] == "server_error"
            assert "No model is trained yet" in error["message"] and "nanochat speedrun" in error["message"]
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model=MODEL, messages=chat["messages"], max_tokens=4)
        assert refused.value.status_code == 503
        assert http.get("/").status_code == 200  # the web UI still loads

        # a checkpoint there that the server cannot serve: the 503 says so, not that none is trained
        served.refused = "step 5 of /somewhere cannot be served (its vocabulary is smaller than the tokenizer's)"
        r = http.post("/v1/chat/completions", json=chat)
        error = assert_error(r, 503)
        assert error["code"] == "model_not_loaded" and r.headers["retry-after"].isdigit()
        assert error["message"] == f"No model is served: {served.refused}"
        served.refused = None

        served.model = api_app.ServedModel(tok, step=7)
        [card] = client.models.list().data
        assert card.id == MODEL and card.model_extra["step"] == 7
        reply = client.chat.completions.create(model=MODEL, messages=chat["messages"], max_tokens=4)
        assert reply.usage.completion_tokens >= 1


def test_allowed_origins_let_another_sites_page_call_the_api_and_no_other(engine, tok):
    app = create_app(engine, tok, model_name=MODEL, api_keys=["k"], allowed_origins=["https://app.example"])
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    body = {"prompt": PROMPT, "max_tokens": 2}
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        r = http.options("/v1/completions", headers={"Origin": "https://app.example", **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        other = http.options("/v1/completions", headers={"Origin": "https://elsewhere.example", **preflight})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        for key, status in [("k", 200), ("wrong", 401)]:  # the page can read a refusal too
            r = http.post("/v1/completions", json=body, headers={"Origin": "https://app.example",
                                                                 "Authorization": f"Bearer {key}"})
            assert r.status_code == status and r.headers["access-control-allow-origin"] == "https://app.example"
    with serve(create_app(engine, tok, model_name=MODEL)) as url, httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/v1/completions", json=body, headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # none by default
