"""Function calling over the API (serving/api/tools.py), with the official `openai` client against a real server
over a real engine running a tiny random GPT: a named function and tool_choice "required" give calls whose
arguments validate against the function's schema, in OpenAI's shapes (strict), streamed or not; a reply cut
short keeps its finish_reason; a conversation's earlier calls and results render as text and round-trip; every
request the server cannot serve is a 400 naming the field."""

import json
import re
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion as OpenAIChatCompletion
from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk

from serving.api.schemas import ChatMessage, ChunkChoice, FunctionDelta, ToolCallDelta
from serving.api.streaming import merge_chat, merged
from serving.api.tools import NO_ARGUMENTS, CallPiece, CallScanner, ToolCalling, conversation
from tests.system import test_structured_output
from tests.system.test_api import serve_scrambled_model
from tests.system.test_api_fidelity import assert_error, check_shape, events

MODEL = "nanochat-test"
MAX_TOKENS = 96  # a whole call: bounded schemas (enum, integer range), at most 2 of them
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time"}}]  # no parameters: no arguments
SCHEMAS = {"get_weather": WEATHER, "get_time": NO_ARGUMENTS}
WEATHER_CHOICE = {"type": "function", "function": {"name": "get_weather"}}


tok, client = test_structured_output.tok, test_structured_output.client  # over this module's base_url


@pytest.fixture(scope="module")
def base_url(tok) -> Iterator[str]:
    """A context that holds the functions' listing and a whole call."""
    with serve_scrambled_model(tok, sequence_len=512, max_num_seqs=16, max_tokens_limit=MAX_TOKENS,
                               model_name=MODEL) as url:
        yield url


@pytest.fixture
def http(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as http:
        yield http


def check_calls(choice, single: bool = False) -> list[tuple[str, dict]]:
    """A choice that is a complete call: its (name, arguments), each valid against its function's schema."""
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    calls = choice.message.tool_calls
    assert calls and (len(calls) == 1 or not single)
    found = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        found.append((call.function.name, arguments))
    return found


def test_a_named_function_is_called_with_arguments_that_follow_its_schema(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=WEATHER_CHOICE,
                                           n=8, seed=3, temperature=1.0, max_tokens=MAX_TOKENS)
    calls = [check_calls(choice, single=True)[0] for choice in reply.choices]
    assert {name for name, _ in calls} == {"get_weather"}
    assert len({json.dumps(arguments) for _, arguments in calls}) > 1  # samples, not one call 8 times
    ids = [choice.message.tool_calls[0].id for choice in reply.choices]
    assert len(set(ids)) == 8 and reply.usage.completion_tokens > 8


def test_required_calls_one_or_more_of_the_functions_and_one_without_parallel_calls(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           n=8, seed=5, temperature=1.0, max_tokens=MAX_TOKENS)
    names = [name for choice in reply.choices for name, _ in check_calls(choice)]
    assert set(names) <= {"get_weather", "get_time"}
    single = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, n=8, seed=5, temperature=1.0,
                                            max_tokens=MAX_TOKENS)
    for choice in single.choices:
        check_calls(choice, single=True)


@pytest.mark.parametrize("tool_choice", [WEATHER_CHOICE, "required"], ids=["named", "required"])
def test_streamed_calls_are_the_calls_sent_whole(client, http, tool_choice):
    """Raw chunks in OpenAI's strict shapes: each call's id and name first (a named function's with the
    role), then its arguments as they are written, and every token's log-probabilities; the SDK's stream
    helper, which rebuilds the message from the deltas, gets the whole reply's calls."""
    ask = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, temperature=0.0,
               max_tokens=MAX_TOKENS)
    whole = client.chat.completions.create(**ask)
    expected = check_calls(whole.choices[0])
    with client.chat.completions.stream(**ask) as stream:
        final = stream.get_final_completion()
    assert check_calls(final.choices[0]) == expected
    chunks = events(http.post("/v1/chat/completions", json={**ask, "stream": True, "logprobs": True}))
    for chunk in chunks:
        check_shape(OpenAIChatCompletionChunk, chunk)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant" and deltas[0]["content"] is None
    assert ("tool_calls" in deltas[0]) == (tool_choice != "required")  # a named call starts with the role
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    logprobs = [t for c in chunks if c["choices"][0].get("logprobs") for t in c["choices"][0]["logprobs"]["content"]]
    assert len(logprobs) == whole.usage.completion_tokens
    calls: dict[int, dict] = {}
    for piece in (call for delta in deltas for call in delta.get("tool_calls", [])):
        if piece["index"] not in calls:  # a call's first piece: its id and name, no arguments yet
            assert piece["id"].startswith("call_") and piece["function"]["arguments"] == ""
            calls[piece["index"]] = {"name": piece["function"]["name"], "arguments": "", "pieces": 0}
        else:
            assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
            calls[piece["index"]]["arguments"] += piece["function"]["arguments"]
            calls[piece["index"]]["pieces"] += 1
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == expected
    assert [c["arguments"] for _, c in sorted(calls.items())] == [c.function.arguments for c in
                                                                  whole.choices[0].message.tool_calls]
    assert any(c["pieces"] > 1 for c in calls.values())  # written, not sent whole


def test_a_reply_cut_short_keeps_its_finish_reason(client):
    named = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=WEATHER_CHOICE,
                                           max_tokens=3, temperature=0.0)
    choice = named.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.function.arguments)
    required = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                              max_tokens=3, temperature=0.0)
    choice = required.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content == '[{"'  # three tokens of the tiny tokenizer


def test_every_reply_is_openais_chat_completion_in_strict_mode(http):
    for tool_choice in (WEATHER_CHOICE, "required", "none"):
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS, "tool_choice": tool_choice,
                                                    "max_tokens": MAX_TOKENS, "n": 2, "seed": 1})
        assert r.status_code == 200, r.text
        check_shape(OpenAIChatCompletion, r.json())
        assert ("tool_calls" in r.json()["choices"][0]["message"]) == (tool_choice != "none")


def test_a_conversation_of_calls_and_results_round_trips(client, http):
    """The assistant message sent back as the client got it, the tool's result, and a follow-up question:
    rendered as the chat format's alternating turns, the reply a text again (tool_choice none). /tokenize
    renders the same prompts."""
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=WEATHER_CHOICE,
                                           max_tokens=MAX_TOKENS, temperature=0.0)
    tokenized = http.post("/tokenize", json={"messages": MESSAGES, "tools": TOOLS, "tool_choice": WEATHER_CHOICE})
    plain = http.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    assert tokenized.json()["count"] == first.usage.prompt_tokens > plain  # the functions' listing
    assistant = first.choices[0].message
    result = {"role": "tool", "tool_call_id": assistant.tool_calls[0].id, "content": "sunny, 21 C"}
    messages = [*MESSAGES, assistant.model_dump(exclude_none=True), result]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                            max_tokens=8, temperature=0.0)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")
    followed = client.chat.completions.create(model=MODEL, messages=[*messages, {"role": "user", "content": "ok?"}],
                                              max_tokens=8, temperature=0.0)
    assert followed.usage.prompt_tokens > answer.usage.prompt_tokens
    tokenized = http.post("/tokenize", json={"messages": messages, "tools": TOOLS, "tool_choice": "none"})
    assert tokenized.json()["count"] == answer.usage.prompt_tokens


def test_calls_and_results_render_as_alternating_turns_and_the_functions_follow_the_system_message():
    calls = [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
             {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    messages = [ChatMessage.model_validate(m) for m in [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_b", "content": "noon"},
        {"role": "tool", "tool_call_id": "call_a", "content": "rain"},
        {"role": "user", "content": "Thanks. Umbrella?"}]]
    calling = ToolCalling(grammar="", listing="Functions you can call, as JSON:\n[...]", named=None)
    assert conversation(messages, calling) == [
        {"role": "system", "content": "Be brief.\n\nFunctions you can call, as JSON:\n[...]"},
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                                         '{"name": "get_time", "arguments": {}}]'},
        {"role": "user", "content": 'Function results, as JSON:\n[{"name": "get_time", "result": "noon"}, '
                                    '{"name": "get_weather", "result": "rain"}]\n\nThanks. Umbrella?'}]
    assert conversation(messages[1:3] + messages[4:5], None)[-1]["content"].startswith("Function results")


def test_the_scanner_reads_each_call_as_written_however_the_text_is_cut():
    """Calls whose arguments hold braces, brackets, quotes and escapes inside strings, fed in pieces cut at
    every place: the same calls, each started once its name is complete, the pieces adding up to the text."""
    items = [{"name": "get_weather", "arguments": {"city": "Oslo", "note": 'a "{[}]" \\ \u00e9'}},
             {"name": "get_time", "arguments": {}},
             {"name": "get_weather", "arguments": {"nested": {"list": [1, {"x": "]"}]}}}]
    text = json.dumps(items, ensure_ascii=False)
    expected = [[item["name"], json.dumps(item["arguments"], ensure_ascii=False)] for item in items]
    for cut in range(len(text) + 1):
        scanner = CallScanner(None)
        pieces = scanner.feed(text[:cut]) + scanner.feed(text[cut:])
        assert scanner.calls == expected and len(set(scanner.ids)) == 3
        starts = [p for p in pieces if p.name is not None]
        assert [(p.index, p.name) for p in starts] == [(0, "get_weather"), (1, "get_time"), (2, "get_weather")]
        assert ["".join(p.arguments for p in pieces if p.index == i) for i in range(3)] == [a for _, a in expected]
    named = CallScanner("get_time")
    assert named.opening()[0].name == "get_time" and named.feed('{"a"') + named.feed(": 1}") == [
        CallPiece(0, None, '{"a"'), CallPiece(0, None, ": 1}")]
    assert named.calls == [["get_time", '{"a": 1}']]
    cut = CallScanner(None)  # cut before the first name is complete: no call
    assert cut.feed('[{"name": "get_we') == [] and cut.calls == []


def test_a_calls_argument_deltas_that_arrive_together_go_out_as_one_chunk():
    """As content deltas do, when the engine hands several tokens over at once (serve.stream_interval_s)."""
    def piece(arguments: str, **start) -> ChunkChoice:
        return ChunkChoice(index=1, delta={"tool_calls": [ToolCallDelta(index=0, function=FunctionDelta(
            arguments=arguments, name=start.get("name")), id=start.get("id"), type=start.get("type"))]})

    [one] = merged([piece('{"ci'), piece('ty": '), piece('"Oslo"')], merge_chat)
    assert one == piece('{"city": "Oslo"')
    opening = piece("", id="call_x", type="function", name="get_weather")
    assert merged([piece("{"), opening], merge_chat) == [piece("{"), opening]  # a new call's start: its own chunk
    assert merged([piece("{"), ChunkChoice(index=1, delta={}, finish_reason="tool_calls")], merge_chat)[0] == piece("{")


BAD_ARGUMENTS = [{"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{oops"}}]
# (what the request changes, the param its 400 names)
REFUSED = [
    ({}, "tools"),  # tool_choice "auto", the default with tools: the model was not trained to decide
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_mood"}}}, "tool_choice.function.name"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [*TOOLS, TOOLS[1]], "tool_choice": "required"}, "tools[2].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "array", "uniqueItems": True}}}}}], "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}], "tool_choice": "required"},
     "tools[0].function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}], "tool_choice": "required"}, "tools[0].type"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "required", "messages": [*MESSAGES, {"role": "tool", "tool_call_id": "c", "content": "x"}]},
     "messages[1].tool_call_id"),
    ({"tool_choice": "required", "messages": [*MESSAGES, {"role": "tool", "content": "x"}]},
     "messages[1].tool_call_id"),
    ({"tool_choice": "required", "messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]},
     "messages[0].tool_call_id"),
    ({"tool_choice": "required", "messages": [{"role": "user", "content": "x", "tool_calls": BAD_ARGUMENTS}]},
     "messages[0].tool_calls"),
    ({"tool_choice": "required", "messages": [
        *MESSAGES, {"role": "assistant", "content": None, "tool_calls": BAD_ARGUMENTS},
        {"role": "tool", "tool_call_id": "c", "content": "noon"}]}, "messages[1].tool_calls[0].function.arguments"),
]


@pytest.mark.parametrize("change,param", REFUSED, ids=[f"{i}-{p}" for i, (_, p) in enumerate(REFUSED)])
def test_a_request_that_cannot_be_served_is_a_400_naming_the_field(http, change, param):
    body = {"messages": MESSAGES, "tools": TOOLS, "max_tokens": MAX_TOKENS, **change}
    body = {k: v for k, v in body.items() if v is not None}
    assert_error(http.post("/v1/chat/completions", json=body), 400, param=param)


def test_the_client_sees_why_auto_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="not trained") as refused:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    assert refused.value.param == "tools"


# ---------------------------------------------------------------------------------------------
# the Responses API (/v1/responses): the same calls as function_call output items

RESPONSE_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]  # the fields inline
NAMED = {"type": "function", "name": "get_weather"}
QUESTION = MESSAGES[0]["content"]


def response_calls(response) -> list[tuple[str, dict]]:
    assert response.status == "completed" and all(item.type == "function_call" for item in response.output)
    return [(item.name, json.loads(item.arguments)) for item in response.output]


@pytest.mark.parametrize(("tool_choice", "chat_choice"), [(NAMED, WEATHER_CHOICE), ("required", "required")],
                         ids=["named", "required"])
def test_a_response_calls_what_the_chat_route_calls_streamed_or_not(client, tool_choice, chat_choice):
    ask = dict(model=MODEL, input=QUESTION, tools=RESPONSE_TOOLS, tool_choice=tool_choice, temperature=0.0,
               max_output_tokens=MAX_TOKENS)
    response = client.responses.create(**ask)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=chat_choice,
                                          temperature=0.0, max_tokens=MAX_TOKENS)
    assert response_calls(response) == check_calls(chat.choices[0])
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert [item.id for item in response.output] == [f"fc_{item.call_id[5:]}" for item in response.output]
    choice = response.tool_choice
    assert response.tools[0].name == "get_weather" and (choice == tool_choice or choice.name == "get_weather")

    events = list(client.responses.create(**ask, stream=True))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # each call: added as soon as its name is known, its arguments as they are written, done when they end
    short = {"response.output_item.added": "A", "response.function_call_arguments.delta": "d",
             "response.function_call_arguments.done": "D", "response.output_item.done": "I"}
    written = "".join(short.get(kind, f" {kind} ") for kind in kinds)
    assert re.fullmatch(r" response\.created  response\.in_progress (Ad+DI)+ response\.completed ", written), written
    assert written.count("A") == len(response.output) and written.count("d") > 2 * len(response.output)
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [(a.call_id, a.status) for a in added] == [(item.call_id, "in_progress") for item in events[-1].response.output]
    deltas = {}
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            deltas[e.item_id] = deltas.get(e.item_id, "") + e.delta
    assert deltas == {item.id: item.arguments for item in events[-1].response.output}
    with client.responses.stream(**ask) as stream:
        final = stream.get_final_response()
    assert response_calls(final) == response_calls(response) == response_calls(events[-1].response)


def test_calls_and_their_outputs_sent_back_render_as_the_chat_messages(client):
    first = client.responses.create(model=MODEL, input=QUESTION, tools=RESPONSE_TOOLS, tool_choice="required",
                                    temperature=0.0, max_output_tokens=MAX_TOKENS)
    outputs = [{"type": "function_call_output", "call_id": item.call_id, "output": f"result {i}"}
               for i, item in enumerate(first.output)]
    items = [{"role": "user", "content": QUESTION}, *[item.model_dump(exclude_none=True) for item in first.output],
             *outputs, {"role": "user", "content": "and?"}]
    again = client.responses.create(model=MODEL, input=items, tools=RESPONSE_TOOLS, tool_choice="none",
                                    temperature=0.0, max_output_tokens=8)
    calls = [{"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
             for item in first.output]
    chat = client.chat.completions.create(model=MODEL, tools=TOOLS, tool_choice="none", temperature=0.0, max_tokens=8,
                                          messages=[*MESSAGES, {"role": "assistant", "content": None, "tool_calls": calls},
                                                    *[{"role": "tool", "tool_call_id": o["call_id"], "content": o["output"]}
                                                      for o in outputs], {"role": "user", "content": "and?"}])
    assert again.usage.input_tokens == chat.usage.prompt_tokens
    assert again.output_text == chat.choices[0].message.content


CALL = {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": "{}"}
RESPONSE_REFUSED = [
    ({}, "tools"),
    ({"tool_choice": {"type": "function", "name": "get_mood"}}, "tool_choice.name"),
    ({"tool_choice": {"type": "web_search"}}, "tool_choice"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]}, "tools[0].parameters"),
    ({"tools": [*RESPONSE_TOOLS, RESPONSE_TOOLS[0]]}, "tools[2].name"),
    ({"input": [{"role": "user", "content": "x"}, {**CALL, "arguments": None}]}, "input[1]"),
    ({"input": [{"role": "user", "content": "x"}, {**CALL, "role": "user"}]}, "input[1]"),
    ({"input": [{"role": "user", "content": "x"}, {**CALL, "arguments": "{oops"},
                {"type": "function_call_output", "call_id": "call_1", "output": "x"}]}, "input[1].arguments"),
    ({"input": [{"role": "user", "content": "x"}, CALL]}, "input[1]"),  # the input ends with a call, no output
    ({"input": [{"role": "user", "content": "x"}, CALL,
                {"type": "function_call_output", "call_id": "call_2", "output": "x"}]}, "input[2].call_id"),
]


@pytest.mark.parametrize("change,param", RESPONSE_REFUSED, ids=[f"{i}-{p}" for i, (_, p) in enumerate(RESPONSE_REFUSED)])
def test_a_response_that_cannot_be_served_is_a_400_naming_the_field(http, change, param):
    body = {"input": QUESTION, "tools": RESPONSE_TOOLS, "tool_choice": "required", **change}
    if not change:
        del body["tool_choice"]
    body = {k: v for k, v in body.items() if v is not None}
    body["input"] = [{k: v for k, v in item.items() if v is not None} if isinstance(item, dict) else item
                     for item in body["input"]] if isinstance(body["input"], list) else body["input"]
    assert_error(http.post("/v1/responses", json=body), 400, param=param)
