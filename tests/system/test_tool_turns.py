"""The calculator's turns over the API (serving/api/parts.py), against a real server whose model calls the
tool (tests/chat_server.py's tool_reply_model), through the official `openai` client: the call and its
output come back as content_parts, unstreamed and streamed; sent back in a later turn they render to the
tokens of training and the next turn hits the prefix cache; a malformed turn gets a 400 naming the field."""

import asyncio
import json

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion as OpenAIChatCompletion
from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk

from serving.api.parts import PartSplitter
from tests.system.chat_server import (
    REPLY,
    TOOL_CORPUS,
    TOOL_PARTS,
    TOOL_TEXT,
    reply_tokenizer,
    serve,
    tool_reply_model,
)
from tests.system.test_api_fidelity import check_shape

BLOCK_SIZE = 16  # chat_server.serve's engine
QUESTION = [{"role": "user", "content": "how much do twelve apples cost, at three dollars each?"}]


@pytest.fixture(scope="module")
def tok():
    return reply_tokenizer((REPLY, TOOL_CORPUS))


@pytest.fixture(scope="module")
def base_url(tok):
    with serve(tool_reply_model(tok), tok) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as http:
        yield http


def ask(client, messages=QUESTION, **options):
    return client.chat.completions.create(model="nanochat", messages=messages, temperature=0, **options)


def rebuild(deltas: list[dict]) -> list[dict]:
    """The message's parts from its streamed deltas, by the rule serving/api/parts.py documents."""
    parts: list[dict] = []
    for delta in deltas:
        if delta.get("content"):
            if parts and parts[-1]["type"] == "text":
                parts[-1]["text"] += delta["content"]
            else:
                parts.append({"type": "text", "text": delta["content"]})
        for piece in delta.get("content_parts") or []:
            if piece["index"] == len(parts):
                parts.append({"type": piece["type"], "text": ""})
            assert parts[piece["index"]]["type"] == piece["type"], (parts, piece)
            parts[piece["index"]]["text"] += piece["text"]
    return parts


def test_the_call_and_its_output_come_back_as_content_parts(client, http):
    reply = ask(client)
    message = reply.choices[0].message
    assert message.content == TOOL_TEXT  # the text alone reads whole
    assert message.model_extra["content_parts"] == TOOL_PARTS
    assert message.tool_calls is None and reply.choices[0].finish_reason == "stop"
    check_shape(OpenAIChatCompletion, http.post("/v1/chat/completions", json={"messages": QUESTION,
                                                                               "temperature": 0}).json())


def test_a_plain_reply_has_no_content_parts(client):
    reply = ask(client, max_tokens=3)  # stops before the call
    assert reply.choices[0].message.content == "Twelve apples cost"
    assert "content_parts" not in reply.choices[0].message.model_extra


def test_a_reply_cut_inside_the_call_keeps_the_call_written_so_far(client):
    reply = ask(client, max_tokens=6)  # 4 text tokens, <|python_start|>, "12"
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == "Twelve apples cost "
    assert reply.choices[0].message.model_extra["content_parts"] == [
        {"type": "text", "text": "Twelve apples cost "}, {"type": "python", "text": "12"}]


def test_a_refused_call_has_no_output_part_and_the_text_after_it_is_a_part_again(tok):
    sp = tok.encode_special
    splitter = PartSplitter(tok)
    events = [(tok.encode("x")[0], "x"), (sp("<|python_start|>"), ""), (tok.encode("y")[0], "y"),
              (sp("<|python_end|>"), ""), (tok.encode("z")[0], "z"), (sp("<|assistant_end|>"), "")]
    pieces = [piece for token, text in events for piece in splitter.add(token, text)]
    assert splitter.parts == [{"type": "text", "text": "x"}, {"type": "python", "text": "y"},
                              {"type": "text", "text": "z"}]
    assert [(p.index, p.type, p.text) for p in pieces] == [
        (0, "text", "x"), (1, "python", ""), (1, "python", "y"), (1, "python", ""), (2, "text", "z"),
        (2, "text", "")]  # the stop token: no text, in the part it came in
    assert splitter.content == "xz" and splitter.has_tool_parts


def test_streamed_parts_are_deltas_of_their_own(client, http):
    chunks = list(ask(client, stream=True))
    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]
    assert rebuild(deltas) == TOOL_PARTS
    assert "".join(d.get("content", "") for d in deltas) == TOOL_TEXT
    opening = [d["content_parts"][0] for d in deltas if "content_parts" in d and d["content_parts"][0]["index"] == 1]
    assert opening[0] == {"index": 1, "type": "python", "text": ""}  # the call is announced before it is written
    with http.stream("POST", "/v1/chat/completions", json={"messages": QUESTION, "temperature": 0,
                                                            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                check_shape(OpenAIChatCompletionChunk, json.loads(line[6:]))


def test_every_token_has_its_logprobs_once_streamed_or_not(client):
    whole = ask(client, logprobs=True, top_logprobs=2)
    tokens = [entry.token for entry in whole.choices[0].logprobs.content]
    assert "<|python_start|>" in tokens and "<|output_end|>" in tokens
    assert len(tokens) == whole.usage.completion_tokens - 1  # all but the stop token
    streamed = [entry.token for c in ask(client, logprobs=True, top_logprobs=2, stream=True)
                if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert streamed == tokens


def test_sent_back_the_parts_render_as_in_training_and_hit_the_prefix_cache(client, http, tok):
    first = ask(client)
    returned = first.choices[0].message.model_dump(exclude_none=True)  # content_parts included
    follow_up = [*QUESTION, returned, {"role": "user", "content": "and thirteen?"}]
    trained = tok.render_for_completion({"messages": [*QUESTION, {"role": "assistant", "content": TOOL_PARTS},
                                                      {"role": "user", "content": "and thirteen?"}]})
    assert http.post("/tokenize", json={"messages": follow_up}).json()["tokens"] == trained
    # the first turn's prompt and reply, as the model generated them, begin the second prompt
    generated, _ = tok.render_conversation({"messages": [*QUESTION, {"role": "assistant", "content": TOOL_PARTS}]})
    assert trained[:len(generated)] == generated
    computed = len(generated) - 1  # the turn's last token, <|assistant_end|>, was sampled but never run
    output_end = len(generated) - 1 - generated[::-1].index(tok.encode_special("<|output_end|>"))
    assert BLOCK_SIZE * (computed // BLOCK_SIZE) > output_end, "the cached blocks should reach past the tool"
    second = ask(client, messages=follow_up)
    assert second.usage.prompt_tokens == len(trained)
    assert second.usage.prompt_tokens_details.cached_tokens == BLOCK_SIZE * (computed // BLOCK_SIZE)


def test_a_continued_message_with_parts_goes_on_after_them_and_echo_returns_them_all(client, http, tok):
    """continue_final_message (vLLM's): the model goes on after the call's output it was given; with echo the
    reply holds the parts it continued, unstreamed and streamed."""
    begun = [*QUESTION, {"role": "assistant", "content": None, "content_parts": TOOL_PARTS[:3]}]
    prompt, _ = tok.render_conversation({"messages": [*QUESTION, {"role": "assistant", "content": TOOL_PARTS[:3]}]})
    prompt = prompt[:-1]  # without <|assistant_end|>: the message goes on
    assert http.post("/tokenize", json={"messages": begun, "continue_final_message": True}).json()["tokens"] == prompt
    options = {"extra_body": {"continue_final_message": True, "add_generation_prompt": False}}
    rest = ask(client, messages=begun, **options)
    assert rest.choices[0].message.content == TOOL_PARTS[3]["text"] and rest.usage.prompt_tokens == len(prompt)
    assert "content_parts" not in rest.choices[0].message.model_extra  # the rest alone is plain text
    options["extra_body"]["echo"] = True
    whole = ask(client, messages=begun, **options).choices[0].message
    assert (whole.content, whole.model_extra["content_parts"]) == (TOOL_TEXT, TOOL_PARTS)
    chunks = list(ask(client, messages=begun, stream=True, **options))
    assert rebuild([c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]) == TOOL_PARTS


def test_content_may_be_left_out_when_the_parts_are_sent(http, tok):
    without = [*QUESTION, {"role": "assistant", "content": None, "content_parts": TOOL_PARTS},
               {"role": "user", "content": "and?"}]
    with_text = [*QUESTION, {"role": "assistant", "content": TOOL_TEXT, "content_parts": TOOL_PARTS},
                 {"role": "user", "content": "and?"}]
    tokens = [http.post("/tokenize", json={"messages": m}).json()["tokens"] for m in (without, with_text)]
    assert tokens[0] == tokens[1] == tok.render_for_completion({"messages": [
        *QUESTION, {"role": "assistant", "content": TOOL_PARTS}, {"role": "user", "content": "and?"}]})


def assert_400(response: httpx.Response, param: str, says: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error


@pytest.mark.parametrize(("message", "param", "says"), [
    ({"role": "user", "content": "x", "content_parts": [{"type": "text", "text": "x"}]},
     "messages[0].content_parts", "only an assistant message"),
    ({"role": "assistant", "content": "other text", "content_parts": TOOL_PARTS},
     "messages[1].content_parts", "add up to the message's content"),
    ({"role": "assistant", "content_parts": [{"type": "function", "text": "f()"}]},
     "messages[1].content_parts[0].type", "'text', 'python' or 'python_output'"),
    # the calculator's call is no client function's: a result sent back for it answers no call
    ({"role": "user", "content": "x",
      "tool_calls": [{"id": "c", "type": "function", "function": {"name": "python", "arguments": "{}"}}]},
     "messages[0].tool_calls", "only an assistant message"),
    ({"role": "tool", "tool_call_id": "c", "content": "36"}, "messages[1].tool_call_id", "none of the calls"),
])
def test_malformed_tool_turns_are_400s_naming_the_field(http, message, param, says):
    messages = [message] if message["role"] == "user" else [*QUESTION, message, {"role": "user", "content": "?"}]
    assert_400(http.post("/v1/chat/completions", json={"messages": messages}), param, says)


def test_the_async_client_gets_the_parts_streamed_and_not(base_url):
    async def main():
        async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0) as client:
            whole = await client.chat.completions.create(model="nanochat", messages=QUESTION, temperature=0)
            stream = await client.chat.completions.create(model="nanochat", messages=QUESTION, temperature=0,
                                                          stream=True)
            deltas = [c.choices[0].delta.model_dump(exclude_none=True) async for c in stream if c.choices]
            return whole.choices[0].message.model_extra["content_parts"], rebuild(deltas)

    assert asyncio.run(main()) == (TOOL_PARTS, TOOL_PARTS)
