"""Structured output over the API (response_format), with the official `openai` client against a real server
over a real engine running a tiny random GPT: json_object replies parse and json_schema replies validate (200
samples at temperature 1, every one ended by its grammar), in chat and completions, streamed or not, with n
choices, the prefix cache, penalties and logit_bias; text is plain text; a bad schema is a 400 naming
response_format."""

import asyncio
import json
import re
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from nanochat.tokenizer import Tokenizer
from tests.serving.engine.test_grammar import MAX_TOKENS, SCHEMA
from tests.system.test_api import serve_scrambled_model, tiny_tokenizer

MODEL = "nanochat-test"
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def base_url(tok) -> Iterator[str]:
    """A context and a max_tokens limit that hold a whole reply to SCHEMA, and room for 32 sequences at once."""
    with serve_scrambled_model(tok, sequence_len=256, max_num_seqs=32, max_tokens_limit=MAX_TOKENS,
                               model_name=MODEL) as url:
        yield url


@pytest.fixture
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_200_json_schema_replies_at_temperature_1_all_validate(base_url):
    async def main() -> list:
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        replies = await asyncio.gather(*(
            client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=PERSON, temperature=1.0,
                                           n=8, seed=seed, max_tokens=MAX_TOKENS)
            for seed in range(25)))
        await client.close()
        return [choice for reply in replies for choice in reply.choices]

    choices = asyncio.run(main())
    assert len(choices) == 200
    for choice in choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert len({c.message.content for c in choices}) > 150  # samples, not one reply 200 times


def test_json_object_replies_parse_as_objects_in_chat_and_completions(client):
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "json_object"},
                                          n=4, seed=1, max_tokens=MAX_TOKENS)
    text = client.completions.create(model=MODEL, prompt="A JSON object:", seed=1, n=4, max_tokens=MAX_TOKENS,
                                     extra_body={"response_format": {"type": "json_object"}})
    replies = [c.message.content for c in chat.choices] + [c.text for c in text.choices]
    reasons = [c.finish_reason for c in chat.choices + text.choices]
    # an object's keys and strings are unbounded: a reply cut by max_tokens ("length") need not parse
    finished = [r for r, reason in zip(replies, reasons, strict=True) if reason == "stop"]
    assert finished, reasons
    assert all(isinstance(json.loads(r), dict) for r in finished)
    assert all(r.startswith("{") for r in replies)


def test_streamed_choices_validate_and_end_with_stop(client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=PERSON, n=3, seed=4,
                                            max_tokens=MAX_TOKENS, stream=True)
    texts, reasons = ["", "", ""], [None, None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert reasons == ["stop"] * 3
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    streamed = client.completions.create(model=MODEL, prompt="A person:", seed=2, max_tokens=MAX_TOKENS, stream=True,
                                         extra_body={"response_format": PERSON})
    jsonschema.validate(json.loads("".join(c.choices[0].text for c in streamed if c.choices)), SCHEMA)


def test_the_prefix_cache_penalties_and_logit_bias_work_with_a_schema(client, tok):
    long = [{"role": "user", "content": "Describe a person as JSON, with a name and an age. " * 3}]
    options = dict(model=MODEL, messages=long, response_format=PERSON, max_tokens=MAX_TOKENS, seed=3,
                   frequency_penalty=0.5, presence_penalty=0.5, logit_bias={str(tok.encode("z")[0]): 30})
    first = client.chat.completions.create(**options)
    second = client.chat.completions.create(**options)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.choices[0].message.content == first.choices[0].message.content  # the same seed
    reply = json.loads(second.choices[0].message.content)
    jsonschema.validate(reply, SCHEMA)
    assert reply["name"].endswith("z" * 7)  # the bias acts where the grammar lets it


def test_text_is_plain_text_and_strict_false_is_enforced_too(client):
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "text"},
                                           seed=0, max_tokens=8)
    assert plain.choices[0].message.content and not plain.choices[0].message.content.startswith("{")
    loose = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": False,
                                                    "description": "someone"}}
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=loose, seed=0,
                                           max_tokens=MAX_TOKENS)
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)


@pytest.mark.parametrize("response_format,param,words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
     "response_format", "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "response_format", "strin"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "null"}}}}, "response_format", "not"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}, "response_format.json_schema.name",
     "pattern"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name", "required"),
    ({"type": "json_schema"}, "response_format", "json_schema is required"),
    ({"type": "json_object", "json_schema": {"name": "x"}}, "response_format", "only with it"),
    ({"type": "yaml"}, "response_format.type", "json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}, "response_format.json_schema.schema",
     "dict"),
])
def test_a_bad_response_format_is_a_400_naming_it(client, response_format, param, words):
    for call in (lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=response_format),
                 lambda: client.completions.create(model=MODEL, prompt="x",
                                                   extra_body={"response_format": response_format})):
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        assert refused.value.param == param, refused.value.body
        assert words in refused.value.body["message"], refused.value.body


def test_a_response_with_a_json_schema_format_validates_streamed_or_not(client):
    """/v1/responses takes the schema as text.format, OpenAI's shape of the same grammar."""
    text = {"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}}
    response = client.responses.create(model=MODEL, input=MESSAGES[0]["content"], text=text, temperature=1.0,
                                       max_output_tokens=MAX_TOKENS)
    assert response.status == "completed", response
    jsonschema.validate(json.loads(response.output_text), SCHEMA)
    assert response.text.format.type == "json_schema" and response.text.format.name == "person"
    # the SDK's stream helper rebuilds the response from the events, and wants them in OpenAI's order
    with client.responses.stream(model=MODEL, input=MESSAGES[0]["content"], text=text,
                                 max_output_tokens=MAX_TOKENS) as stream:
        deltas = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        streamed = stream.get_final_response()
    assert streamed.status == "completed" and streamed.output_text == deltas
    jsonschema.validate(json.loads(deltas), SCHEMA)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", text={"format": {"type": "json_schema", "name": "bad",
                                                                          "schema": {"type": "nonsense"}}})
    assert e.value.body["param"] == "text.format", e.value.body


# ---------------------------------------------------------------------------------------------
# vLLM's structured_outputs: json, regex, choice, a Lark grammar, json_object

CODE = r"[A-Z]{2}-[0-9]{3}"
CHOICES = ["positive", "negative", "mixed (both)"]
LARK = 'start: ANSWER " because " REASON\nANSWER: "yes" | "no"\nREASON: /[a-z]{1,12}/'


def constrained(client, structured_outputs: dict, n: int = 6) -> list[str]:
    """Each choice's text in chat and in completions, every one ended by its grammar (a finite language:
    every reply ends within MAX_TOKENS)."""
    body = {"structured_outputs": structured_outputs}
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=n, seed=7, temperature=1.0,
                                          max_tokens=MAX_TOKENS, extra_body=body)
    text = client.completions.create(model=MODEL, prompt="Answer:", n=n, seed=7, max_tokens=MAX_TOKENS,
                                     extra_body=body)
    assert {c.finish_reason for c in chat.choices + text.choices} == {"stop"}
    return [c.message.content for c in chat.choices] + [c.text for c in text.choices]


def test_structured_outputs_constrain_chat_and_completions(client):
    assert all(re.fullmatch(CODE, reply) for reply in constrained(client, {"regex": CODE}))
    chosen = constrained(client, {"choice": CHOICES}, n=12)
    assert set(chosen) <= set(CHOICES) and len(set(chosen)) > 1
    assert all(re.fullmatch(r"(yes|no) because [a-z]{1,12}", reply) for reply in constrained(client, {"grammar": LARK}))
    for schema in (SCHEMA, json.dumps(SCHEMA)):  # vLLM takes the schema or its JSON text
        for reply in constrained(client, {"json": schema}, n=2):
            jsonschema.validate(json.loads(reply), SCHEMA)
    # an object's keys and strings are unbounded: the random model's replies are cut by max_tokens
    objects = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=4, seed=7, max_tokens=16, extra_body={
        "structured_outputs": {"json_object": True, "regex": None}})
    for choice in objects.choices:
        assert choice.message.content.startswith("{")
        assert choice.finish_reason == "length" or isinstance(json.loads(choice.message.content), dict)


def test_a_streamed_choice_is_the_unstreamed_one(client):
    ask = dict(model=MODEL, messages=MESSAGES, seed=11, temperature=1.0, extra_body={"structured_outputs": {
        "choice": CHOICES}})
    whole = client.chat.completions.create(**ask).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True)
                       if c.choices)
    assert streamed == whole and whole in CHOICES


@pytest.mark.parametrize("structured_outputs,param", [
    ({"regex": "(["}, "structured_outputs.regex"),
    ({"grammar": "start: undefined_rule"}, "structured_outputs.grammar"),
    ({"json": {"type": "strin"}}, "structured_outputs.json"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"json": "[1]"}, "structured_outputs.json"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
    ({}, "structured_outputs"),
    ({"json_object": False}, "structured_outputs"),
    ({"whitespace_pattern": " "}, "structured_outputs.whitespace_pattern"),
])
def test_a_bad_structured_outputs_is_a_400_naming_it(client, structured_outputs, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                       extra_body={"structured_outputs": structured_outputs})
    assert refused.value.param == param, refused.value.body


def test_structured_outputs_and_another_constraint_are_a_400(client):
    for extra, param in (({"response_format": {"type": "json_object"}}, "structured_outputs"),
                         ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
                          "structured_outputs")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                           extra_body={"structured_outputs": {"regex": "a"}, **extra})
        assert refused.value.param == param, refused.value.body
