"""OpenAI's Responses API (/v1/responses) with the official `openai` client, against tests/system/test_api.py's
server: a response is the chat turn of the same messages (its text and token counts), streamed as OpenAI's
event sequence, with earlier output sent back as input; what needs stored state is a 400 naming the field.
(Function calls: tests/system/test_tool_calls.py.)"""

import openai
import pytest

from tests.system import test_api
from tests.system.test_api import MAX_TOKENS, MODEL

tok, model, engine, base_url, client, http = (test_api.tok, test_api.model, test_api.engine, test_api.base_url,
                                              test_api.client, test_api.http)

INSTRUCTIONS, QUESTION = "be brief", "hello, quick fox"
FIRST_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                "response.content_part.added"]
LAST_EVENTS = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def ask(client: openai.OpenAI, **fields):
    return client.responses.create(model=MODEL, instructions=INSTRUCTIONS, input=QUESTION, temperature=0,
                                   max_output_tokens=8, **fields)


def test_a_response_is_the_chat_turn_of_the_same_messages(client):
    response = ask(client)
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}])
    assert response.object == "response" and response.id.startswith("resp_") and response.model == MODEL
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [part.type for part in message.content] == ["output_text"]
    assert response.output_text == chat.choices[0].message.content
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    if chat.choices[0].finish_reason == "length":
        assert (response.status, response.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    else:
        assert response.status == "completed" and response.incomplete_details is None
    assert (response.instructions, response.max_output_tokens, response.temperature) == (INSTRUCTIONS, 8, 0)


def test_a_cut_reply_is_incomplete_and_a_finished_one_completed(client):
    cut = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=1,
                                  extra_body={"temperature": 0})
    assert cut.usage.output_tokens == 1
    finished_or_cut = [client.responses.create(model=MODEL, input=QUESTION, temperature=1.0,
                                               max_output_tokens=MAX_TOKENS) for _ in range(6)]
    assert cut.status == "incomplete" or cut.output_text == ""  # one token: cut, unless it ended the turn
    for response in finished_or_cut:
        cut_short = response.usage.output_tokens == MAX_TOKENS and response.status == "incomplete"
        assert cut_short or response.status == "completed", response


def test_a_streamed_response_sends_openais_events_in_order(client):
    unstreamed = ask(client)
    events = list(ask(client, stream=True))
    types = [event.type for event in events]
    assert types[:4] == FIRST_EVENTS and types[-4:] == [*LAST_EVENTS, f"response.{unstreamed.status}"]
    deltas = events[4:-4]
    assert deltas and {event.type for event in deltas} == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in deltas)
    assert text == events[-4].text == unstreamed.output_text
    created, final = events[0].response, events[-1].response
    assert created.status == "in_progress" and created.output == [] and created.id == final.id
    assert final.output_text == text and final.usage == unstreamed.usage
    assert {e.item_id for e in deltas} == {final.output[0].id}


def test_input_messages_render_as_the_chat_messages_and_an_output_can_be_sent_back(client, http):
    first = ask(client)
    turns = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
             first.output[0].model_dump(exclude_none=True),
             {"role": "user", "content": QUESTION}]
    response = client.responses.create(model=MODEL, input=turns, max_output_tokens=2)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": QUESTION}]
    assert response.usage.input_tokens == http.post("/tokenize", json={"messages": messages}).json()["count"]


@pytest.mark.parametrize(("field", "value"), [
    ("previous_response_id", "resp_123"),
    ("background", True),
    ("reasoning", {"effort": "low"}),
    ("truncation", "auto"),
])
def test_what_needs_stored_state_is_a_400_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=QUESTION, **{field: value})
    assert e.value.body["param"] == field, e.value.body


def test_bad_input_is_a_400_naming_the_field(client):
    cases = [
        ("frobnicate", dict(extra_body={"frobnicate": 1})),
        ("max_output_tokens", dict(max_output_tokens=MAX_TOKENS + 1)),
        ("input[0].content[0].type", dict(input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/x.png"}]}])),
        ("input[0].role", dict(input=[{"role": "tool", "content": "x"}])),
        ("text.format", dict(text={"format": {"type": "json_schema", "schema": {"type": "object"}}})),
        ("text.format", dict(text={"format": {"type": "json_schema", "name": "a name!", "schema": {}}})),
        ("input[1].role", dict(input=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                               instructions=INSTRUCTIONS)),
        ("input", dict(input=[{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}])),
    ]
    for param, fields in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**{"model": MODEL, "input": QUESTION, **fields})
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-5", input=QUESTION)


def test_the_texts_log_probabilities_are_the_chat_routes_streamed_or_not(client, http):
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3,
                                          messages=[{"role": "system", "content": INSTRUCTIONS},
                                                    {"role": "user", "content": QUESTION}])
    expected = [(e.token, e.bytes, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
                for e in chat.choices[0].logprobs.content]
    response = ask(client, include=["message.output_text.logprobs"], top_logprobs=3)
    (text,) = response.output[0].content
    assert [(e.token, e.bytes, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
            for e in text.logprobs] == expected
    assert "".join(e.token for e in text.logprobs) == text.text and response.top_logprobs == 3
    # a number of top tokens asks for the log-probabilities too
    assert [len(e.top_logprobs) for e in ask(client, top_logprobs=2).output[0].content[0].logprobs] == \
        [2] * len(expected)
    assert not ask(client).output[0].content[0].logprobs  # not asked for: none
    events = list(ask(client, include=["message.output_text.logprobs"], top_logprobs=3, stream=True))
    streamed = [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
                for event in events if event.type == "response.output_text.delta" for e in event.logprobs]
    assert streamed == [(token, logprob, top) for token, _, logprob, top in expected]
    done = next(event for event in events if event.type == "response.output_text.done")
    assert [(e.token, e.logprob) for e in done.logprobs] == [(token, logprob) for token, _, logprob, _ in expected]
    assert events[-1].response.output[0].content[0].logprobs == text.logprobs
    r = http.post("/v1/responses", json={"input": QUESTION, "include": ["message.output_text.tokens"]})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "include[0]")
