"""
OpenAI's Responses API (`POST /v1/responses`) over the chat route's machinery: a response is one chat turn.

Notable:
- the request becomes a chat completion request: `instructions` a system message first, `input` (a text,
  or a list of messages whose content is a text or input_text/output_text parts) the messages, and
  max_output_tokens, temperature, top_p and text.format (as response_format: a grammar) its sampling. So
  prompts, limits, grammars and errors are the chat route's; a prompt renders exactly as the same messages
  sent to /v1/chat/completions.
- the server keeps no state: `store` is accepted (it stores nothing), and what needs stored responses or
  tools (previous_response_id, conversation, tools, background, ...) is a 400 naming the field.
- the output is one assistant message with one output_text part: the reply's text parts (the calculator's
  calls and outputs, which the chat route returns as content_parts, are left out). status is "completed",
  or "incomplete" with incomplete_details.reason "max_output_tokens" when the reply was cut by the limit.
- streamed, the events are OpenAI's for one text message, each with its sequence_number and an SSE
  `event:` line: response.created, response.in_progress, response.output_item.added,
  response.content_part.added, response.output_text.delta (one per list of tokens the engine sends),
  response.output_text.done, response.content_part.done, response.output_item.done, then
  response.completed (or response.incomplete). No [DONE]: the stream ends after the last event. A request
  the engine aborts (the replica shutting down) ends with an `error` event (code "unavailable").
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator, model_validator

from nanochat.tokenizer import Tokenizer
from serving.api.parts import PartSplitter
from serving.api.schemas import (
    ChatCompletionRequest,
    JSONSchemaFormat,
    ResponseFormat,
    StrictModel,
    Text,
    Usage,
)
from serving.engine.llm_engine import TokenEvent


class Run(Protocol):
    """What a response reads of the chat route's run (serving/api/app.py's Run)."""

    id: str
    created: int
    finish_reasons: list[str | None]

    def batches(self) -> AsyncIterator[Iterator[TokenEvent]]: ...

    def usage(self) -> Usage: ...


# ---------------------------------------------------------------------------------------------- request


class InputText(StrictModel):
    type: Literal["input_text", "output_text"]  # output_text: an earlier reply's text, sent back
    text: Text
    annotations: Annotated[list[Any], Field(max_length=0)] = []  # an output_text part as we returned it
    logprobs: list[Any] = []


def _text_as_parts(value: Any) -> Any:
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


class InputMessage(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[list[InputText], BeforeValidator(_text_as_parts)]
    id: str | None = None  # an output message as we returned it, sent back
    status: str | None = None


def _text_as_message(value: Any) -> Any:
    return [{"role": "user", "content": value}] if isinstance(value, str) else value


class TextFormat(StrictModel):
    """text.format: OpenAI's shape of response_format, the json_schema's fields inline."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _a_valid_json_schema_format(self) -> TextFormat:
        """Checked here, so that a bad one is a 400 naming text.format (the schema itself is checked where the
        grammar is built, as for response_format)."""
        if self.type == "json_schema":
            if self.name is None:
                raise ValueError('a "json_schema" format needs its name')
            try:
                self.response_format()
            except ValidationError as e:
                problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                raise ValueError(problems) from None
        return self

    def response_format(self) -> ResponseFormat | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ResponseFormat(type="json_object")
        fields = {"name": self.name, "description": self.description, "schema": self.schema_ or {},
                  "strict": self.strict}
        return ResponseFormat(type="json_schema", json_schema=JSONSchemaFormat.model_validate(fields))


class TextConfig(StrictModel):
    format: TextFormat = TextFormat()
    verbosity: Literal["medium"] | None = None  # the model has no verbosity to choose


OFF: list[Any] = [None, False, [], {}]  # what leaves a refused field off; some fields have a word for it too
OFF_WORDS = {"tool_choice": ["none", "auto"], "truncation": ["disabled"], "service_tier": ["auto", "default"]}
REFUSED = {  # field -> why it is refused unless off
    "tools": "tools are not supported: this model calls no client functions",
    "tool_choice": "tool_choice is not supported: this model calls no client functions",
    "previous_response_id": "previous_response_id is not supported: this server stores no responses; send the "
                            "conversation as input",
    "conversation": "conversation is not supported: this server stores no conversations; send them as input",
    "background": "background is not supported: responses run while the request is open",
    "reasoning": "reasoning is not supported: the model does not reason before it answers",
    "include": "include is not supported: there is nothing extra to include",
    "prompt": "prompt (a stored prompt template) is not supported",
    "top_logprobs": "top_logprobs is not supported on /v1/responses: use /v1/chat/completions",
    "truncation": 'truncation "auto" is not supported: a prompt over the context is refused',
    "service_tier": "service_tier is not supported",
}


class ResponsesRequest(StrictModel):
    model: str | None = None
    input: Annotated[list[InputMessage], BeforeValidator(_text_as_message), Field(min_length=1)]
    instructions: Text | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = True  # accepted: nothing is stored
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] = {}
    text: TextConfig = TextConfig()
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    parallel_tool_calls: bool | None = None  # accepted: it only matters with tools, which are refused
    max_tool_calls: int | None = None  # likewise
    tools: Any = None
    tool_choice: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    reasoning: Any = None
    include: Any = None
    prompt: Any = None
    top_logprobs: Any = None
    truncation: Any = None
    service_tier: Any = None

    @field_validator(*REFUSED)
    @classmethod
    def _refused(cls, value: Any, info: Any) -> Any:
        if value not in OFF + OFF_WORDS.get(info.field_name, []):
            raise ValueError(REFUSED[info.field_name])
        return value

    def as_chat(self) -> ChatCompletionRequest:
        """The chat completion request this response is."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        messages += [{"role": m.role, "content": "".join(part.text for part in m.content)} for m in self.input]
        return ChatCompletionRequest.model_validate({
            "model": self.model, "messages": messages, "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "response_format": self.text.format.response_format(),
        })


def responses_param(param: str | None, has_instructions: bool) -> str | None:
    """A chat route's error param as this route names the same field: response_format is text.format, and a
    message ("messages[3].role", "messages") the input message it came from ("input[2].role", "input"),
    instructions being the system message first."""
    if param == "response_format":
        return "text.format"
    if param is None or not param.startswith("messages"):
        return param
    rest = param.removeprefix("messages")
    if rest.startswith("["):
        index, _, tail = rest[1:].partition("]")
        index = int(index) - has_instructions
        return "instructions" if index < 0 else f"input[{index}]{tail}"
    return "input" + rest


# ---------------------------------------------------------------------------------------------- response


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    incomplete_details: dict[str, str] | None = None
    error: None = None
    model: str
    output: list[OutputMessage]
    instructions: str | None
    max_output_tokens: int | None
    temperature: float
    top_p: float
    metadata: dict[str, str]
    text: dict[str, Any]
    usage: ResponseUsage | None = None
    parallel_tool_calls: bool = True
    tool_choice: str = "none"
    tools: list[Any] = []
    previous_response_id: None = None
    store: bool = False  # whatever was asked: nothing is stored
    truncation: str = "disabled"
    user: str | None = None


class ResponseBuilder:
    """One response's fixed fields (from its request) and its message; `response(...)` at any point."""

    def __init__(self, body: ResponsesRequest, model_name: str, run: Run):
        self.body, self.model_name, self.run = body, model_name, run
        self.id, self.message_id = run.id, f"msg_{uuid.uuid4().hex}"  # the engine's request id is the response's

    def message(self, text: str, status: str) -> OutputMessage:
        return OutputMessage(id=self.message_id, status=status, content=[OutputText(text=text)])

    def response(self, output: list[OutputMessage], status: str, usage: bool = True) -> Response:
        body, run = self.body, self.run
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return Response(
            id=self.id, created_at=run.created, status=status, incomplete_details=incomplete, model=self.model_name,
            output=output, instructions=body.instructions, max_output_tokens=body.max_output_tokens,
            temperature=body.temperature, top_p=body.top_p, metadata=body.metadata,
            text=body.text.model_dump(by_alias=True, exclude_none=True), user=body.user,
            usage=self.usage() if usage else None)

    def usage(self) -> ResponseUsage:
        chat = self.run.usage()
        return ResponseUsage(input_tokens=chat.prompt_tokens, output_tokens=chat.completion_tokens,
                             total_tokens=chat.total_tokens,
                             input_tokens_details=InputTokensDetails(cached_tokens=chat.prompt_tokens_details.cached_tokens))

    def finished(self, text: str) -> Response:
        status = "incomplete" if self.run.finish_reasons[0] == "length" else "completed"
        return self.response([self.message(text, status)], status)


async def response_events(builder: ResponseBuilder, tokenizer: Tokenizer) -> AsyncGenerator[str, None]:
    """The streamed response's events (module docstring)."""
    sequence = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def dumped(model: BaseModel) -> dict:
        return model.model_dump(mode="json")

    where = {"item_id": builder.message_id, "output_index": 0, "content_index": 0}
    started = builder.response([], "in_progress", usage=False)
    yield (event("response.created", response=dumped(started)) + event("response.in_progress", response=dumped(started))
           + event("response.output_item.added", output_index=0,
                   item=dumped(OutputMessage(id=builder.message_id, status="in_progress", content=[])))
           + event("response.content_part.added", **where, part=dumped(OutputText(text=""))))
    splitter = PartSplitter(tokenizer)
    async for batch in builder.run.batches():
        delta = ""
        for item in batch:
            if item.finish_reason == "abort":
                yield (event("response.output_text.delta", **where, delta=delta, logprobs=[]) if delta else "") + \
                    event("error", code="unavailable", param=None,
                          message="The server is shutting down: the response was cut short; retry on another replica")
                return
            delta += "".join(piece.text for piece in splitter.add(item.token_id, item.text) if piece.type == "text")
        if delta:
            yield event("response.output_text.delta", **where, delta=delta, logprobs=[])
    text = splitter.content
    final = builder.finished(text)
    item = final.output[0]
    yield (event("response.output_text.done", **where, text=text, logprobs=[])
           + event("response.content_part.done", **where, part=dumped(item.content[0]))
           + event("response.output_item.done", output_index=0, item=dumped(item))
           + event(f"response.{final.status}", response=dumped(final)))
