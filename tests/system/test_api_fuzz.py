"""Property-based fuzz of the API (serving/api/) over a real engine: arbitrary JSON bodies (each known field
given a plausible value, a value of any JSON type, or left out, plus unknown fields) and raw garbage bytes,
posted to both completion routes, and /v1/responses' input items and tools in any combination. No answer is
a 5xx, every error body is in OpenAI's shape, and every success is a well-formed completion, response or
event stream."""

import json
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from openai.types.responses import Response as OpenAIResponse
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from serving.api.app import create_app
from serving.api.schemas import ChatCompletion, ChatCompletionChunk, Completion, ErrorResponse
from tests.system.test_api import MODEL, make_engine, serve, tiny_model, tiny_tokenizer

ROUTES = ["/v1/chat/completions", "/v1/completions"]

# ---------------------------------------------------------------------------------------------
# bodies

text = st.text(max_size=24)
# any text, lone surrogates included: JSON can carry them ("\ud800") though they are no Unicode text
any_text = st.text(st.characters(exclude_categories=()), max_size=24)
json_leaves = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats()
               | any_text)
json_values = st.recursive(json_leaves, lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(any_text, children, max_size=3), max_leaves=8)


def conversation(system: str | None, turns: list[tuple[str, str]], last: str) -> list[dict]:
    messages = [] if system is None else [{"role": "system", "content": system}]
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return [*messages, {"role": "user", "content": last}]


text_part = st.fixed_dictionaries({"type": st.just("text") | json_values, "text": any_text | json_values})
text_parts = st.lists(text_part, max_size=2)
any_message = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["system", "user", "assistant", "tool"]) | json_values,
    "content": any_text | text_parts | json_values,
})
# values a client could mean, at and around the edges of what is allowed
PLAUSIBLE = {
    "model": st.sampled_from([MODEL, "gpt-4"]),
    "max_tokens": st.integers(0, 5),
    "max_completion_tokens": st.integers(0, 5),
    "temperature": st.floats(0, 2.2),
    "top_p": st.floats(0, 1),
    "min_p": st.floats(-0.1, 1.1),
    "ignore_eos": st.booleans(),
    "top_k": st.integers(0, 2**70),
    "n": st.integers(1, 3) | st.sampled_from([0, 16, 17]),
    "stop": text | st.lists(text, max_size=5),
    "seed": st.integers(-1, 2**64),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                          "continuous_usage_stats": st.booleans()}),
    "user": text,
    # OpenAI's other fields: honoured, or refused unless off
    "logprobs": st.booleans() | st.integers(0, 6),
    "top_logprobs": st.integers(0, 21),
    "presence_penalty": st.floats(-2.5, 2.5),
    "frequency_penalty": st.floats(-2.5, 2.5),
    "logit_bias": st.dictionaries(st.integers(0, 400).map(str) | text, st.floats(-101, 101), max_size=2),
    "echo": st.booleans(),
    "best_of": st.integers(0, 2),
    "suffix": text,
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    "structured_outputs": st.sampled_from([{"choice": ["a", "b"]}, {"regex": "[0-9]{2}"}, {"json_object": True},
                                           {"grammar": 'start: "x"'}, {"regex": "(["}, {"json": "[]"}, {}]),
    "tools": st.just([]) | st.just([{"type": "function", "function": {"name": "f"}}]) | st.just(
        [{"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {
            "x": {"enum": [1, "a", None]}}, "required": ["x"]}}}, {"type": "function", "function": {"name": "f"}}]),
    "tool_choice": st.sampled_from(["none", "auto", "required", {"type": "function", "function": {"name": "g"}}]),
    "parallel_tool_calls": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "continue_final_message": st.booleans(),
    "add_generation_prompt": st.booleans(),
    "allowed_token_ids": st.lists(st.integers(-1, 400), max_size=3),
    "bad_words": st.lists(text, max_size=2),
    "truncate_prompt_tokens": st.integers(-2, 200),
    "return_tokens_as_token_ids": st.booleans(),
    "priority": st.integers(-1, 1),
    "use_beam_search": st.booleans(),
    "length_penalty": st.floats(-1, 2),
}
PROMPTS = {  # each route's required field
    "/v1/chat/completions": ("messages", st.builds(conversation, st.none() | text, st.lists(st.tuples(text, text),
                                                   max_size=2), text) | st.lists(any_message, max_size=4)),
    "/v1/completions": ("prompt", any_text | st.lists(any_text, max_size=2)),
}


def with_unknown_fields(known: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    """Bodies of known fields over unknown ones (which the known fields win over)."""
    extra = st.dictionaries(st.text(max_size=8), json_values, max_size=2)
    return st.builds(lambda extra, known: {**extra, **known}, extra, known)


def plausible_bodies(route: str) -> st.SearchStrategy[dict]:
    """The route's prompt and optional fields a client could mean, valid or just past an edge."""
    name, prompt = PROMPTS[route]
    return with_unknown_fields(st.fixed_dictionaries({name: prompt}, optional=PLAUSIBLE))


def wild_bodies(route: str) -> st.SearchStrategy[dict]:
    """Each known field absent, plausible or any JSON value at all."""
    name, prompt = PROMPTS[route]
    fields = {key: value | json_values for key, value in {**PLAUSIBLE, name: prompt}.items()}
    return with_unknown_fields(st.fixed_dictionaries({}, optional=fields))


# ---------------------------------------------------------------------------------------------
# the server


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """A server whose every request is short: 4 tokens at most, prompts of 64 tokens at most."""
    tok = tiny_tokenizer()
    engine = make_engine(tiny_model(tok), tok)
    app = create_app(engine, tok, model_name=MODEL, max_prompt_tokens=64, max_tokens_limit=4)
    try:
        with serve(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            yield http
    finally:
        engine.shutdown()


def check(r: httpx.Response, route: str) -> None:
    event(f"{r.status_code} {r.headers['content-type'].split(';')[0]}")  # the mix, in --hypothesis-show-statistics
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        body = r.json()
        ErrorResponse.model_validate(body)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        return
    assert r.status_code == 200
    if r.headers["content-type"].startswith("text/event-stream"):
        events = r.text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""], events[-3:]
        chunk = ChatCompletionChunk if route == ROUTES[0] else Completion
        for sse in events[:-2]:
            data = json.loads(sse.removeprefix("data: "))
            assert "error" not in data, data
            chunk.model_validate(data)
    else:
        result = (ChatCompletion if route == ROUTES[0] else Completion).model_validate(r.json())
        assert result.usage.completion_tokens <= 4 * len(result.choices)


# ---------------------------------------------------------------------------------------------
# properties

# sized for ~20 s in all on a 2-core machine; a request that runs takes a few ms (4 tokens at most)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def post_json(http: httpx.Client, route: str, body: object) -> httpx.Response:
    # json.dumps writes NaN and Infinity, which Python's parser (and so the server's) accepts
    return http.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


@settings(FUZZ, max_examples=700)
@given(data=st.data(), route=st.sampled_from(ROUTES))
def test_plausible_bodies_get_a_completion_or_a_4xx(http, data, route):
    check(post_json(http, route, data.draw(plausible_bodies(route), label="body")), route)


@settings(FUZZ, max_examples=600)
@given(data=st.data(), route=st.sampled_from(ROUTES))
def test_wild_bodies_and_any_json_get_a_4xx_or_a_completion(http, data, route):
    check(post_json(http, route, data.draw(wild_bodies(route) | json_values, label="body")), route)


@settings(FUZZ, max_examples=200)
@given(raw=st.binary(max_size=64), route=st.sampled_from(ROUTES),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]))
def test_garbage_bytes_get_a_400_in_openais_shape(http, raw, route, content_type):
    r = http.post(route, content=raw, headers={"content-type": content_type})
    check(r, route)
    if r.status_code != 400:  # a few bytes can happen to be a valid request
        assert r.status_code in (200, 404) and content_type == "application/json", r.text


# ---------------------------------------------------------------------------------------------
# /v1/responses: input items of every type, function tools, and their fields in any combination

RESPONSE_TOOLS = [{"type": "function", "name": "f"},
                  {"type": "function", "name": "g", "parameters": {"type": "object", "properties": {
                      "x": {"enum": [1, "a"]}}, "required": ["x"], "additionalProperties": False}}]
input_item = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "function_call", "function_call_output"]) | json_values,
    "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | json_values,
    "content": any_text | st.just([{"type": "input_text", "text": "hi"}, {"type": "output_text", "text": "yo"}])
    | json_values,
    "call_id": st.sampled_from(["call_1", "call_2"]) | json_values,
    "name": st.sampled_from(["f", "g", "h"]) | json_values,
    "arguments": st.sampled_from(["{}", '{"x": 1}', "{oops"]) | json_values,
    "output": any_text | json_values,
    "id": st.none() | text,
    "status": st.sampled_from(["completed", "incomplete"]),
})
RESPONSE_FIELDS = {
    "tools": st.just(RESPONSE_TOOLS) | st.just(RESPONSE_TOOLS[:1]) | st.just([{"type": "web_search"}]) | json_values,
    "tool_choice": st.sampled_from(["none", "auto", "required", {"type": "function", "name": "g"},
                                    {"type": "function", "name": "h"}]) | json_values,
    "parallel_tool_calls": st.booleans() | json_values,
    "instructions": text | json_values,
    "max_output_tokens": st.integers(0, 5) | json_values,
    "stream": st.booleans(),
    "temperature": st.floats(0, 2.2),
    "text": st.just({"format": {"type": "json_object"}}) | json_values,
    "include": st.lists(st.sampled_from(["message.output_text.logprobs", "reasoning.encrypted_content", "x"]),
                        max_size=2) | json_values,
    "top_logprobs": st.integers(-1, 21) | json_values,
}
RESPONSE_EVENTS = TypeAdapter(ResponseStreamEvent)


@settings(FUZZ, max_examples=400)
@given(body=with_unknown_fields(st.fixed_dictionaries(
    {"input": st.lists(input_item, max_size=4) | any_text | json_values}, optional=RESPONSE_FIELDS)))
def test_responses_bodies_get_a_response_or_a_4xx(http, body):
    r = post_json(http, "/v1/responses", body)
    event(f"{r.status_code} {r.headers['content-type'].split(';')[0]}")
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [json.loads(block.split("\ndata: ", 1)[1]) for block in r.text.split("\n\n") if block]
        for data in events:
            RESPONSE_EVENTS.validate_python(data)
        assert events[-1]["type"] in ("response.completed", "response.incomplete"), events[-1]
    else:
        OpenAIResponse.model_validate(r.json())
