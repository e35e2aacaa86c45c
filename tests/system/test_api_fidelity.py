"""OpenAI fidelity of the API (serving/api/) over a real engine, through the official `openai` client (and
httpx where the client cannot say it): every field OpenAI defines is honoured or refused with a 400
naming it, unknown fields too; nulls are defaults; `developer` is `system`; every response and stream
chunk validates against the openai package's own types in strict mode, with the fields OpenAI's schema
requires; a stream cut by shutdown ends with an error event, never an "abort" finish reason; usage
reports the prefix cache's hits; /tokenize, /detokenize and /version; log-probabilities checked against a
full forward of the model; presence/frequency penalties and logit_bias against OpenAI's definition."""

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager

import httpx
import openai
import pytest
import torch
from openai.types import Completion as OpenAICompletion
from openai.types.chat import ChatCompletion as OpenAIChatCompletion
from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk
from pydantic import BaseModel

from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from serving.api import app as api_app
from serving.api.app import create_app
from serving.engine.async_engine import AsyncEngine
from tests.system import test_api
from tests.system.test_api import (
    CONTEXT,
    MAX_PROMPT,
    MAX_TOKENS,
    MODEL,
    RecordingEngine,
    SwitchedModel,
    assert_error,
    chat_prompt,
    greedy,
    serve,
    text_of,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello, quick fox"}]
BLOCK_SIZE = 8  # make_engine's
FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}  # OpenAI's set


# the same server as tests/system/test_api.py's: its fixtures, over a tiny model and engine of this module's own
tok, model, engine, base_url, client, http = (test_api.tok, test_api.model, test_api.engine, test_api.base_url,
                                              test_api.client, test_api.http)


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "the lazy dog", "max_tokens": 4, **fields}


# ---------------------------------------------------------------------------------------------
# shapes: the openai package's own types, strictly, and the fields OpenAI's schema requires

# required by OpenAI's published schema, although the python types give them defaults
REQUIRED = {
    OpenAIChatCompletion: {"id", "choices", "created", "model", "object"},
    OpenAIChatCompletionChunk: {"id", "choices", "created", "model", "object"},
    OpenAICompletion: {"id", "choices", "created", "model", "object"},
}
CHAT_CHOICE = {"index", "message", "finish_reason", "logprobs"}
CHAT_MESSAGE = {"role", "content", "refusal"}
CHUNK_CHOICE = {"index", "delta", "finish_reason"}
TEXT_CHOICE = {"index", "text", "finish_reason", "logprobs"}


PART_TYPES = {"text", "python", "python_output"}


def check_content_parts(parts: object, where: str) -> None:
    """Our one extension of a message and a delta (serving/api/parts.py): the calculator's parts."""
    assert where.endswith((".message", ".delta")), f"{where}: content_parts only belongs to a message or a delta"
    assert isinstance(parts, list) and parts, where
    for part in parts:
        keys = {"type", "text", "index"} if where.endswith(".delta") else {"type", "text"}
        assert set(part) == keys and part["type"] in PART_TYPES and isinstance(part["text"], str), (where, part)
        if where.endswith(".message"):
            assert part["type"] != "text" or part["text"], (where, parts)
    if where.endswith(".message"):
        assert any(part["type"] != "text" for part in parts), f"{where}: content_parts without a tool part"


def no_extras(value: object, where: str = "") -> None:
    """Every field of a parsed openai object is one its type declares (they allow extras), but our
    documented extension content_parts, whose shape is checked instead."""
    if isinstance(value, BaseModel):
        extra = dict(value.model_extra or {})
        if "content_parts" in extra:
            check_content_parts(extra.pop("content_parts"), where)
        assert not extra, f"{where}: fields openai does not define: {extra}"
        for name in type(value).model_fields:
            no_extras(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            no_extras(item, f"{where}[{i}]")


def check_shape(kind: type[BaseModel], body: dict) -> BaseModel:
    typed = body
    if kind is OpenAICompletion and body.get("choices") and body["choices"][0]["finish_reason"] is None:
        # a streamed text completion's chunk is a Completion whose finish_reason is null until the end (as
        # OpenAI streams it), which the python type, written for the whole object, does not allow
        typed = {**body, "choices": [{**c, "finish_reason": "stop"} for c in body["choices"]]}
    parsed = kind.model_validate(typed, strict=True)
    no_extras(parsed, kind.__name__)
    assert REQUIRED[kind] <= set(body), body
    for choice in body["choices"]:
        if kind is OpenAIChatCompletion:
            assert CHAT_CHOICE <= set(choice) and CHAT_MESSAGE <= set(choice["message"]), choice
        elif kind is OpenAIChatCompletionChunk:
            assert CHUNK_CHOICE <= set(choice), choice
        else:
            assert TEXT_CHOICE <= set(choice), choice
        assert choice["finish_reason"] in FINISH_REASONS | {None}, choice
    if body.get("usage") is not None:
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
    return parsed


def events(r: httpx.Response) -> list[dict]:
    """The JSON events of a whole SSE body that ends with [DONE]."""
    parts = r.text.split("\n\n")
    assert parts[-2:] == ["data: [DONE]", ""], parts[-3:]
    return [json.loads(p.removeprefix("data: ")) for p in parts[:-2]]


@pytest.mark.parametrize("n", [1, 2])
def test_every_response_and_chunk_is_openais_type_in_strict_mode(http, n):
    options = {"n": n, "temperature": 1.0, "seed": 3}
    body = http.post(CHAT, json=chat(**options)).json()
    parsed = check_shape(OpenAIChatCompletion, body)
    assert all(c.message.refusal is None for c in parsed.choices)
    assert "refusal" in body["choices"][0]["message"]
    for chunk in events(http.post(CHAT, json=chat(stream=True, stream_options={"include_usage": True}, **options))):
        check_shape(OpenAIChatCompletionChunk, chunk)
    check_shape(OpenAICompletion, http.post(COMPLETIONS, json=completion(**options)).json())
    for chunk in events(http.post(COMPLETIONS, json=completion(stream=True, stream_options={"include_usage": True},
                                                               echo=True, **options))):
        check_shape(OpenAICompletion, chunk)


# ---------------------------------------------------------------------------------------------
# every field honoured or refused

UNIQUE_ITEMS = {"type": "array", "uniqueItems": True}
# (route, field, a value we do not implement): each is a 400 naming the field
REFUSED = [
    (CHAT, "logit_bias", {"fox": 10}),  # keys are token ids
    (CHAT, "logit_bias", {"100000": 10}),  # past the vocabulary
    (CHAT, "top_logprobs", 2),  # without logprobs: true
    (CHAT, "top_logprobs", 21),  # OpenAI's limit is 20
    (CHAT, "presence_penalty", 2.5),  # OpenAI's range is [-2, 2]
    (CHAT, "frequency_penalty", -2.5),
    # a schema with a keyword the grammar cannot enforce (tests/test_structured_output.py has more)
    (CHAT, "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": UNIQUE_ITEMS}}),
    (COMPLETIONS, "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": UNIQUE_ITEMS}}),
    (CHAT, "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    (CHAT, "tool_choice", "auto"),
    (CHAT, "functions", [{"name": "f"}]),
    (CHAT, "function_call", "auto"),
    (CHAT, "audio", {"voice": "alloy", "format": "wav"}),
    (CHAT, "modalities", ["text", "audio"]),
    (CHAT, "prediction", {"type": "content", "content": "x"}),
    (CHAT, "store", True),
    (CHAT, "metadata", {"k": "v"}),
    (CHAT, "reasoning_effort", "low"),
    (CHAT, "verbosity", "low"),
    (CHAT, "web_search_options", {}),
    (CHAT, "service_tier", "flex"),
    (CHAT, "prompt_cache_retention", "24h"),
    (CHAT, "stream_options", {"include_obfuscation": True}),
    (COMPLETIONS, "logit_bias", {"5": "10"}),
    (COMPLETIONS, "logprobs", 6),  # OpenAI's limit is 5
    (COMPLETIONS, "max_tokens", 0),  # only with echo, which scores the prompt
    (COMPLETIONS, "presence_penalty", "1"),
    (COMPLETIONS, "frequency_penalty", 3.0),
    (COMPLETIONS, "best_of", 2),
    (COMPLETIONS, "suffix", " the end"),
]
# the value of each that means "off", which is accepted
OFF = {"logit_bias": {}, "logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0.0,
       "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "modalities": ["text"],
       "store": False, "metadata": {}, "service_tier": "auto", "parallel_tool_calls": True, "user": "u",
       "safety_identifier": "s", "prompt_cache_key": "k"}


@pytest.mark.parametrize("route,field,value", REFUSED, ids=[f"{r[4:]}-{f}-{i}" for i, (r, f, _) in enumerate(REFUSED)])
def test_a_field_we_do_not_implement_is_a_400_naming_it(http, route, field, value):
    body = (chat if route == CHAT else completion)(**{field: value})
    if field == "top_logprobs" and value > 20:
        body["logprobs"] = True
    nested = {"stream_options": "stream_options.include_obfuscation", "logit_bias": "logit_bias"}
    if route == COMPLETIONS and field == "logit_bias":
        nested["logit_bias"] = "logit_bias.5"
    error = assert_error(http.post(route, json=body), 400, param=nested.get(field, field))
    assert field in error["message"]


def test_the_openai_client_sees_each_refusal_with_its_param(client):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    calls = {
        "tools": lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=tools),
        "top_logprobs": lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, top_logprobs=2),
        "response_format": lambda: client.chat.completions.create(
            model=MODEL, messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": UNIQUE_ITEMS}}),
        "presence_penalty": lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                                   presence_penalty=3.0),
        "best_of": lambda: client.completions.create(model=MODEL, prompt="fox", best_of=3),
        "suffix": lambda: client.completions.create(model=MODEL, prompt="fox", suffix="dog", stream=True),
    }
    for param, call in calls.items():
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        assert refused.value.param == param, refused.value.body
    with pytest.raises(openai.BadRequestError, match="not trained"):
        calls["tools"]()


def test_the_off_value_of_every_refused_field_is_accepted(client, http):
    r = http.post(CHAT, json=chat(**OFF))
    assert r.status_code == 200, r.text
    off = {k: OFF[k] for k in ("logit_bias", "presence_penalty", "frequency_penalty", "user")}
    r = http.post(COMPLETIONS, json=completion(best_of=1, suffix="", logprobs=None, **off))
    assert r.status_code == 200, r.text
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, logprobs=False,
                                           response_format={"type": "text"}, tool_choice="none",
                                           presence_penalty=0, frequency_penalty=0)
    assert reply.usage.completion_tokens >= 1


def test_unknown_fields_are_refused_as_openai_does_except_vllms_extensions(client, http):
    for route, body in [(CHAT, chat(typical_p=0.1)), (COMPLETIONS, completion(typical_p=0.1))]:
        error = assert_error(http.post(route, json=body), 400, param="typical_p")
        assert error["message"] == "Unrecognized request argument supplied: typical_p"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"guided_json": {}})
    assert refused.value.param == "guided_json"
    assert_error(http.post(CHAT, json=chat(messages=[{"role": "user", "content": "hi", "nickname": "x"}])), 400,
                 param="messages[0].nickname")
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"top_k": 5})
    assert reply.usage.completion_tokens >= 1
    # min_p 1 keeps the likeliest token only: greedy at any temperature
    greedy = client.completions.create(model=MODEL, prompt="fox", max_tokens=MAX_TOKENS, temperature=0)
    kept = client.completions.create(model=MODEL, prompt="fox", max_tokens=MAX_TOKENS, temperature=1.5,
                                     extra_body={"min_p": 1.0})
    assert kept.choices[0].text == greedy.choices[0].text
    # ignore_eos: every reply runs to max_tokens (a load generator's request)
    for seed in range(4):
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, seed=seed,
                                               extra_body={"ignore_eos": True})
        assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (MAX_TOKENS, "length")
    assert_error(http.post(CHAT, json=chat(min_p=1.5)), 400, param="min_p")


def test_explicit_nulls_are_the_defaults(client, http, tok):
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "stop", "seed", "max_completion_tokens",
                           "stream_options", "user", "logprobs", "top_logprobs", "logit_bias", "tools",
                           "tool_choice", "response_format", "presence_penalty", "frequency_penalty"])
    r = http.post(CHAT, json=chat(**nulls))
    assert r.status_code == 200, r.text
    check_shape(OpenAIChatCompletion, r.json())
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "stop", "seed", "echo", "best_of", "suffix",
                           "logprobs", "stream_options", "presence_penalty", "frequency_penalty", "logit_bias"])
    r = http.post(COMPLETIONS, json=completion(**nulls))
    assert r.status_code == 200, r.text
    # the client sends an explicit None as null
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=None,
                                           top_p=None, n=None, stop=None, seed=None, stream=None)
    assert len(reply.choices) == 1 and reply.usage.completion_tokens <= 3
    # with no max_tokens at all, the server's limit applies
    r = http.post(COMPLETIONS, json={"prompt": "fox", "max_tokens": None, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= MAX_TOKENS


def test_the_developer_role_is_the_system_role(client):
    def ask(role: str):
        messages = [{"role": role, "content": "be brief"}, {"role": "user", "content": "hello, quick fox"}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)

    system, developer = ask("system"), ask("developer")
    assert developer.choices[0].message.content == system.choices[0].message.content
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens


def test_max_completion_tokens_wins_over_max_tokens(client, http):
    r = http.post(CHAT, json=chat(max_tokens=MAX_TOKENS + 1, max_completion_tokens=2, temperature=0))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2, r.text
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=1, temperature=0)
    assert reply.usage.completion_tokens == 1


def test_an_assistant_message_sent_back_as_received_is_accepted(client, http):
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    returned = first.choices[0].message.model_dump()  # refusal, tool_calls, audio, ... all None
    assert "refusal" in returned and "tool_calls" in returned
    messages = [*MESSAGES, returned, {"role": "user", "content": "and then?"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    tool_calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    bad = [*MESSAGES, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y", "tool_calls": tool_calls}]
    assert_error(http.post(CHAT, json=chat(messages=bad)), 400, param="messages[3].tool_calls")
    named = [{"role": "user", "content": "hi", "name": "ada"}]
    assert_error(http.post(CHAT, json=chat(messages=named)), 400, param="messages[0].name")


def test_echo_puts_the_prompt_before_the_completion(client):
    plain = client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=5, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "the lazy dog" + plain.choices[0].text
    assert echoed.usage == plain.usage
    stream = client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=5, temperature=0, echo=True,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == echoed.choices[0].text


# ---------------------------------------------------------------------------------------------
# usage: the prefix cache's hits


def test_cached_tokens_are_the_prompt_tokens_the_prefix_cache_held(client, tok):
    # a prompt no earlier request shares a block with, several blocks long
    messages = [{"role": "user", "content": f"{uuid.uuid4().hex} the quick brown fox jumps over the lazy dog"}]
    prompt = chat_prompt(tok, messages)
    assert len(prompt) > 3 * BLOCK_SIZE
    cached = (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE  # whole blocks, never the prompt's last token
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens == len(prompt)
    assert again.usage.prompt_tokens_details.cached_tokens == cached
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None]
    assert [u.prompt_tokens_details.cached_tokens for u in usage] == [cached]
    text = client.completions.create(model=MODEL, prompt=messages[0]["content"], max_tokens=2)
    assert text.usage.prompt_tokens_details.cached_tokens == 0  # <|bos|> then the text: another prefix


# ---------------------------------------------------------------------------------------------
# a stream cut by shutdown


class SlowEngine(RecordingEngine):
    """The real engine, a step at a time slowly, so a stream is still running when the test shuts it down."""

    def step(self):
        time.sleep(0.05)
        return super().step()


@pytest.fixture
def slow_engine(model, tok) -> Iterator[AsyncEngine]:
    """A SlowEngine of its own (a test shuts it down), shut down after the test whatever happened."""
    engine = AsyncEngine(SlowEngine(model, tok, num_blocks=64, block_size=8, max_num_seqs=8,
                                    max_num_batched_tokens=64))
    yield engine
    engine.shutdown()


def slow_server(engine: AsyncEngine, tok: Tokenizer) -> AbstractContextManager[str]:
    """The API over engine, served: its URL."""
    return serve(create_app(engine, tok, model_name=MODEL, max_prompt_tokens=MAX_PROMPT,
                            max_tokens_limit=MAX_TOKENS))


def test_a_stream_cut_by_shutdown_ends_with_an_error_event_not_an_abort(slow_engine, tok):
    with slow_server(slow_engine, tok) as url, httpx.Client(base_url=url, timeout=30) as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        chat_stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                     stream=True, extra_body={"min_tokens": MAX_TOKENS})
        first = next(iter(chat_stream))
        assert first.choices[0].delta.role == "assistant"
        # min_tokens: a sampled end-of-text could finish it before the shutdown reaches it
        long_completion = completion(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, stream=True)
        with http.stream("POST", COMPLETIONS, json=long_completion) as raw:
            lines = raw.iter_lines()
            assert next(lines).startswith("data: ")
            threading.Thread(target=slow_engine.shutdown).start()
            rest = [line for line in lines if line]
        with pytest.raises(openai.APIError, match="shutting down"):
            for chunk in chat_stream:
                assert chunk.choices[0].finish_reason in FINISH_REASONS | {None}
    *chunks, last = [json.loads(line.removeprefix("data: ")) for line in rest]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert last["error"]["code"] == "unavailable" and "shutting down" in last["error"]["message"]


def test_a_response_stream_cut_by_shutdown_ends_with_an_error_event(slow_engine, tok):
    with slow_server(slow_engine, tok) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        # greedy, and a reply that runs to the limit (a turn that ended first would not be cut)
        ask = dict(model=MODEL, input="hello", max_output_tokens=MAX_TOKENS, temperature=0)
        assert client.responses.create(**ask).status == "incomplete"
        stream = iter(client.responses.create(**ask, stream=True))
        assert next(stream).type == "response.created"
        threading.Thread(target=slow_engine.shutdown).start()
        rest = list(stream)
    assert rest[-1].type == "error" and rest[-1].code == "unavailable" and "shutting down" in rest[-1].message
    assert not any(e.type in ("response.completed", "response.incomplete") for e in rest)


# ---------------------------------------------------------------------------------------------
# /tokenize, /detokenize, /version


def test_tokenize_gives_the_tokens_the_completions_run(http, client, tok):
    text = "the quick brown fox"
    r = http.post("/tokenize", json={"model": MODEL, "prompt": text})
    assert r.status_code == 200, r.text
    expected = tok.encode(text, prepend="<|bos|>")
    assert r.json() == {"count": len(expected), "max_model_len": CONTEXT, "tokens": expected}
    assert client.completions.create(model=MODEL, prompt=text, max_tokens=1).usage.prompt_tokens == len(expected)
    assert http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"] == tok.encode(text)
    r = http.post("/tokenize", json={"messages": MESSAGES})
    assert r.json()["tokens"] == chat_prompt(tok, MESSAGES)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert reply.usage.prompt_tokens == r.json()["count"]
    assert_error(http.post("/tokenize", json={}), 400, param="prompt")
    assert_error(http.post("/tokenize", json={"prompt": "x", "model": "gpt-4"}), 404, param="model")
    assert_error(http.post("/tokenize", json={"prompt": "x", "foo": 1}), 400, param="foo")


def test_detokenize_gives_the_text_back(http, tok):
    tokens = tok.encode("the lazy dog")
    assert http.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": "the lazy dog"}
    assert_error(http.post("/detokenize", json={"tokens": [1, tok.vocab_size]}), 400, param="tokens[1]")
    assert_error(http.post("/detokenize", json={"tokens": [-1]}), 400, param="tokens[0]")
    assert_error(http.post("/detokenize", json={"tokens": "1"}), 400, param="tokens")


def test_version_and_the_tokenizer_routes_before_a_model_and_with_keys(engine, tok):
    served = SwitchedModel()
    app = create_app(engine, served, model_name=MODEL, api_keys=["k"])
    with serve(app) as url, httpx.Client(base_url=url, timeout=30, headers={"Authorization": "Bearer k"}) as http:
        version = http.get("/version", headers={"Authorization": ""})
        assert version.status_code == 200 and version.json()["version"], version.text
        for path, body in [("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})]:
            error = assert_error(http.post(path, json=body), 503)
            assert error["code"] == "model_not_loaded"
            assert_error(http.post(path, json=body, headers={"Authorization": "Bearer wrong"}), 401)
        served.model = api_app.ServedModel(tok)
        assert http.post("/tokenize", json={"prompt": "x"}).json()["count"] == len(tok.encode("x", prepend="<|bos|>"))


# ---------------------------------------------------------------------------------------------
# log-probabilities: the model's own, checked against a full forward


def token_ids(tok: Tokenizer, pieces: list) -> list[int]:
    """The ids of logprobs entries (each with .token and .bytes), by their exact bytes or special name."""
    by_bytes = {tok.id_to_bytes(i): i for i in range(tok.vocab_size) if tok.id_to_bytes(i)}
    return [by_bytes[bytes(p.bytes)] if p.bytes is not None else tok.encode_special(p.token) for p in pieces]


def full_forward_logprobs(model: GPT, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of ids, in one forward over the whole sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids])).float().log_softmax(dim=-1)[0]


def check_against_forward(model: GPT, tok: Tokenizer, prompt: list[int], content: list, k: int) -> None:
    ids = token_ids(tok, content)
    reference = full_forward_logprobs(model, prompt + ids)
    for i, (entry, token) in enumerate(zip(content, ids, strict=True)):
        row = reference[len(prompt) + i - 1]
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4), i
        assert len(entry.top_logprobs) == k
        top_values, top_ids = row.topk(k)
        assert token_ids(tok, entry.top_logprobs) == top_ids.tolist(), i
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top_values.tolist(), abs=1e-4)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.7, "top_p": 0.5, "seed": 11}],
                         ids=["greedy", "sampled"])
def test_chat_logprobs_are_the_models_distribution_before_sampling(client, model, tok, sampling):
    """Greedy or sampled with temperature and top_p: the log-probabilities are the raw distribution's (the
    sampling settings do not change them), per generated token but the stop token, for every choice."""
    prompt = chat_prompt(tok, MESSAGES)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, n=2, logprobs=True,
                                           top_logprobs=3, **sampling)
    check_shape(OpenAIChatCompletion, reply.model_dump(mode="json", exclude_unset=True))
    for choice in reply.choices:
        content = choice.logprobs.content
        assert b"".join(bytes(e.bytes or b"") for e in content).decode("utf-8", "replace") == choice.message.content
        check_against_forward(model, tok, prompt, content, 3)
    if sampling["temperature"] == 0:  # the tokens are the reference generator's, but the stop token
        ends = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
        expected = [t for t in greedy(model, tok, prompt, 12) if t not in ends]
        assert token_ids(tok, reply.choices[0].logprobs.content) == expected
        assert all(e.top_logprobs[0].logprob == e.logprob for e in reply.choices[0].logprobs.content)
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_streamed_chat_logprobs_are_the_same_as_unstreamed(client, http, model, tok):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True,
                                           top_logprobs=2)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for c in stream for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    # the same tokens and numbers but for float rounding (the prompt may come from the prefix cache)
    expected = whole.choices[0].logprobs.content
    assert [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in expected]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in expected], abs=1e-4)
    body = chat(max_tokens=10, temperature=0, logprobs=True, top_logprobs=2, stream=True)
    for chunk in events(http.post(CHAT, json=body)):
        check_shape(OpenAIChatCompletionChunk, chunk)
    only = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in only.choices[0].logprobs.content)


def test_completion_logprobs_in_openais_legacy_shape(client, http, model, tok):
    prompt = tok.encode("the lazy dog", prepend="<|bos|>")
    r = http.post(COMPLETIONS, json=completion(max_tokens=8, temperature=0, logprobs=2))
    body = r.json()
    parsed = check_shape(OpenAICompletion, body)
    (choice,) = parsed.choices
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset)
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    generated = [t for t in greedy(model, tok, prompt, 8) if t != tok.get_bos_token_id()]  # <|bos|> ends it
    assert len(generated) == len(logprobs.token_logprobs)
    reference = full_forward_logprobs(model, prompt + generated)
    for i, (token, value) in enumerate(zip(generated, logprobs.token_logprobs, strict=True)):
        row = reference[len(prompt) + i - 1]
        assert value == pytest.approx(row[token].item(), abs=1e-4)
        top = row.topk(2)
        # two tokens whose text is the same (a cut character, U+FFFD) share one key of the legacy dict
        assert 1 <= len(logprobs.top_logprobs[i]) <= 2
        assert max(logprobs.top_logprobs[i].values()) == pytest.approx(top.values[0].item(), abs=1e-4)
    stream = client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=8, temperature=0, logprobs=2,
                                       stream=True)
    streamed = [v for c in stream for ch in c.choices if ch.logprobs for v in ch.logprobs.token_logprobs]
    assert streamed == pytest.approx(logprobs.token_logprobs, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# penalties and logit_bias


def reference_with_penalties(model: GPT, tok: Tokenizer, prompt: list[int], max_tokens: int, presence: float,
                             frequency: float, repetition: float = 1.0) -> list[int]:
    """Greedy decoding with OpenAI's penalties (and vLLM's repetition penalty first), one full forward per token."""
    ends = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([prompt + out]))[0, -1].float()
            for token in set(prompt + out):
                logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
            for token in set(out):
                logits[token] -= frequency * out.count(token) + presence
            out.append(int(logits.argmax()))
            if out[-1] in ends:
                break
    return out


def test_presence_and_frequency_penalties_are_openais(client, model, tok):
    prompt = chat_prompt(tok, MESSAGES)
    expected = reference_with_penalties(model, tok, prompt, 16, presence=1.2, frequency=0.8)
    plain = reference_with_penalties(model, tok, prompt, 16, presence=0.0, frequency=0.0)
    assert expected != plain, "the penalties should change this reply"
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
                                           presence_penalty=1.2, frequency_penalty=0.8)
    assert reply.choices[0].message.content == text_of(tok, expected)
    assert reply.usage.completion_tokens == len(expected)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
                                            presence_penalty=1.2, frequency_penalty=0.8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text_of(tok, expected)


def test_logit_bias_forces_and_bans_tokens(client, tok):
    fox = tok.encode("fox")[0]
    piece = text_of(tok, [fox])
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, logit_bias={str(fox): 100})
    assert reply.choices[0].message.content == piece * 6 and reply.choices[0].finish_reason == "length"
    text = client.completions.create(model=MODEL, prompt="the", max_tokens=5, logit_bias={str(fox): 100}, n=2)
    assert [c.text for c in text.choices] == [piece * 5] * 2
    greedy_reply = client.completions.create(model=MODEL, prompt="the", max_tokens=1, temperature=0, logprobs=1)
    first = greedy_reply.choices[0].logprobs.tokens[0]
    banned = [t for t in range(tok.vocab_size) if text_of(tok, [t]) == first]
    again = client.completions.create(model=MODEL, prompt="the", max_tokens=1, temperature=0,
                                      logit_bias={str(t): -100 for t in banned})
    assert again.choices[0].text != first


def test_the_async_client_gets_logprobs_penalties_and_refusals(base_url, model, tok):
    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)
        reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                                     logprobs=True, top_logprobs=1, frequency_penalty=0.5)
        content = reply.choices[0].logprobs.content
        text = b"".join(bytes(e.bytes or b"") for e in content).decode("utf-8", "replace")
        assert text == reply.choices[0].message.content
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                                      logprobs=True, top_logprobs=1, frequency_penalty=0.5,
                                                      stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
        # the same numbers but for float rounding: the second request's prompt comes from the prefix cache
        assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model=MODEL, messages=MESSAGES,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": UNIQUE_ITEMS}})
        assert refused.value.param == "response_format"
        await client.close()

    asyncio.run(main())


def test_stop_token_ids_and_min_tokens_our_extensions(client, http, tok):
    """vLLM's extensions: a stop token id ends the choice (showing no text); min_tokens keeps it out until
    that many tokens are generated."""
    fox = tok.encode("fox")[0]
    options = {"stop_token_ids": [fox], "logit_bias": {str(fox): 100}}  # the model would say fox at once
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, extra_body=options)
    assert reply.choices[0].message.content == "" and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 1
    later = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                           extra_body={**options, "min_tokens": 3})
    assert later.choices[0].finish_reason == "stop" and later.usage.completion_tokens == 4
    assert text_of(tok, [fox]) not in later.choices[0].message.content
    text = client.completions.create(model=MODEL, prompt="the", max_tokens=6, extra_body={**options, "min_tokens": 2})
    assert text.usage.completion_tokens == 3 and text.choices[0].finish_reason == "stop"
    assert_error(http.post(CHAT, json=chat(max_tokens=2, min_tokens=3)), 400, param="min_tokens")
    assert_error(http.post(CHAT, json=chat(stop_token_ids=[1, tok.vocab_size])), 400, param="stop_token_ids[1]")
    assert_error(http.post(COMPLETIONS, json=completion(stop_token_ids=[-1])), 400, param="stop_token_ids[0]")


def test_repetition_penalty_our_extension_is_vllms(client, http, model, tok):
    prompt = chat_prompt(tok, MESSAGES)
    expected = reference_with_penalties(model, tok, prompt, 16, presence=0.0, frequency=0.0, repetition=1.8)
    assert expected != reference_with_penalties(model, tok, prompt, 16, presence=0.0, frequency=0.0)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
                                           extra_body={"repetition_penalty": 1.8})
    assert reply.choices[0].message.content == text_of(tok, expected)
    assert_error(http.post(CHAT, json=chat(repetition_penalty=0)), 400, param="repetition_penalty")
