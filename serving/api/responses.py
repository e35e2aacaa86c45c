"""
OpenAI's Responses API (`POST /v1/responses`) over the chat route's machinery: a response is one chat turn.

Notable:
- the request becomes a chat completion request: `instructions` a system message first, `input` (a text,
  or a list of messages whose content is a text or input_text/output_text parts) the messages, and
  max_output_tokens, temperature, top_p and text.format (as response_format: a grammar) its sampling. So
  prompts, limits, grammars and errors are the chat route's; a prompt renders exactly as the same messages
  sent to /v1/chat/completions.
- the server keeps no state: `store` is accepted (it stores nothing), and what needs stored responses
  (previous_response_id, conversation, background, ...) is a 400 naming the field.
- the output is one assistant message with one output_text part: the reply's text parts (the calculator's
  calls and outputs, which the chat route returns as content_parts, are left out). status is "completed",
  or "incomplete" with incomplete_details.reason "max_output_tokens" when the reply was cut by the limit.
- include ["message.output_text.logprobs"] (or a top_logprobs above 0) gives the output text its tokens'
  log-probabilities, each with top_logprobs of the likeliest tokens, as the chat route's logprobs: the
  model's own, one entry per token of the text (not the calculator's, not the end of the turn). OpenAI's
  other include values name built-in tools and inputs this server has none of: accepted, nothing to add.
- function tools ({"type": "function", "name", "parameters", ...}) and tool_choice ("required" or
  {"type": "function", "name"}) are the chat route's (serving/api/tools.py): the output is then the calls,
  function_call items; input function_call and function_call_output items sent back become an assistant
  message's tool calls and tool messages, so they render as the chat route renders them.
- streamed, the events are OpenAI's for one text message, each with its sequence_number and an SSE
  `event:` line: response.created, response.in_progress, response.output_item.added,
  response.content_part.added, response.output_text.delta (one per list of tokens the engine sends),
  response.output_text.done, response.content_part.done, response.output_item.done, then
  response.completed (or response.incomplete). No [DONE]: the stream ends after the last event. A request
  the engine aborts (the replica shutting down) ends with an `error` event (code "unavailable"). A named
  function's call is added first; a "required" reply's calls as soon as their names are written. Each
  call's arguments stream as response.function_call_arguments.delta, and its done events go out when its
  arguments end.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from nanochat.tokenizer import Tokenizer
from serving.api.logprobs import TokenInfo, token_piece
from serving.api.parts import PartSplitter
from serving.api.schemas import (
    FUNCTION_NAME,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    ChatCompletionRequest,
    JSONSchemaFormat,
    ResponseFormat,
    StrictModel,
    Text,
    Usage,
    tool_choice_check,
)
from serving.api.tools import CallPiece, CallScanner, ToolCalling, complete, tool_choice_or_default
from serving.engine.llm_engine import TokenEvent


class Run(Protocol):
    """What a response reads of the chat route's run (serving/api/streaming.py's Run)."""

    id: str
    created: int
    finish_reasons: list[str | None]
    logprobs: list[list[TokenInfo]]

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


ITEM_FIELDS = {  # each input item type's fields besides its type: required, then optional
    "message": ({"role", "content"}, {"id", "status"}),
    "function_call": ({"call_id", "name", "arguments"}, {"id", "status"}),
    "function_call_output": ({"call_id", "output"}, {"id", "status"}),
}


class InputItem(StrictModel):
    """An input message, or an earlier function call and its output sent back: one model rather than a union,
    so that an error names the item's own field ("input[0].role")."""

    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: Annotated[list[InputText], BeforeValidator(_text_as_parts)] | None = None
    id: str | None = None  # an output item as we returned it, sent back
    status: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: Text | None = None  # a function's result: text

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> InputItem:
        required, optional = ITEM_FIELDS[self.type]
        given = {name for name in type(self).model_fields if name != "type" and getattr(self, name) is not None}
        missing, extra = sorted(required - given), sorted(given - required - optional)
        if missing or extra:
            wrong = [f"needs {', '.join(missing)}"] * bool(missing) + [f"takes no {', '.join(extra)}"] * bool(extra)
            raise ValueError(f"a {self.type} item {' and '.join(wrong)}")
        return self

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.content or [])


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
OFF_WORDS = {"truncation": ["disabled"], "service_tier": ["auto", "default"]}
REFUSED = {  # field -> why it is refused unless off
    "previous_response_id": "previous_response_id is not supported: this server stores no responses; send the "
                            "conversation as input",
    "conversation": "conversation is not supported: this server stores no conversations; send them as input",
    "background": "background is not supported: responses run while the request is open",
    "reasoning": "reasoning is not supported: the model does not reason before it answers",
    "prompt": "prompt (a stored prompt template) is not supported",
    "truncation": 'truncation "auto" is not supported: a prompt over the context is refused',
    "service_tier": "service_tier is not supported",
}


LOGPROBS = "message.output_text.logprobs"
Includable = Literal["file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
                     "message.input_image.image_url", "computer_call_output.output.image_url",
                     "code_interpreter_call.outputs", "reasoning.encrypted_content", "message.output_text.logprobs"]


class FunctionToolSpec(StrictModel):
    """A function tool, as the Responses API writes one (the chat route's fields inline)."""

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(StrictModel):
    type: Literal["function"]
    name: str


ToolChoice = Annotated[Any, AfterValidator(tool_choice_check(NamedFunction, '{"type": "function", "name": ...}'))]


class ResponsesRequest(StrictModel):
    model: str | None = None
    input: Annotated[list[InputItem], BeforeValidator(_text_as_message), Field(min_length=1)]
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
    parallel_tool_calls: bool | None = None  # with tool_choice "required": false allows one call only
    max_tool_calls: int | None = None  # accepted: it bounds built-in tools' calls, and there are none
    tools: Annotated[list[FunctionToolSpec], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice = None
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    reasoning: Any = None
    # what else the output holds: the text's log-probabilities; OpenAI's other items belong to built-in tools
    # and inputs this server has none of, so there is nothing of them to include
    include: list[Includable] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # with the log-probabilities: the likeliest
    prompt: Any = None
    truncation: Any = None
    service_tier: Any = None

    @field_validator(*REFUSED)
    @classmethod
    def _refused(cls, value: Any, info: Any) -> Any:
        if value not in OFF + OFF_WORDS.get(info.field_name, []):
            raise ValueError(REFUSED[info.field_name])
        return value

    @property
    def wants_logprobs(self) -> bool:
        """Whether the output text carries its tokens' log-probabilities: asked for by include, or implied by a
        number of top tokens to show with them."""
        return LOGPROBS in (self.include or []) or bool(self.top_logprobs)

    def as_chat(self) -> tuple[ChatCompletionRequest, ChatOrigins]:
        """The chat completion request this response is, and where each of its messages came from. An input
        function call becomes an assistant message's tool call (consecutive calls, and calls right after an
        assistant message, one message's), its output a tool message."""
        messages: list[dict[str, Any]] = []
        origins = ChatOrigins()
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
            origins.messages.append(None)
        for j, item in enumerate(self.input):
            if item.type == "function_call":
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if not (messages and messages[-1]["role"] == "assistant"):
                    messages.append({"role": "assistant", "content": None})
                    origins.messages.append(j)
                    origins.of_calls.add(len(messages) - 1)
                calls = messages[-1].setdefault("tool_calls", [])
                origins.calls[len(messages) - 1, len(calls)] = j
                calls.append(call)
            elif item.type == "function_call_output":
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
                origins.messages.append(j)
            else:
                messages.append({"role": item.role, "content": item.text})
                origins.messages.append(j)
        tools = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                 for tool in self.tools or []]
        choice = self.tool_choice
        if isinstance(choice, NamedFunction):
            choice = {"type": "function", "function": {"name": choice.name}}
        return ChatCompletionRequest.model_validate({
            "model": self.model, "messages": messages, "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "response_format": self.text.format.response_format(),
            "tools": tools or None, "tool_choice": choice, "parallel_tool_calls": self.parallel_tool_calls,
            "logprobs": self.wants_logprobs, "top_logprobs": self.top_logprobs if self.wants_logprobs else None,
        }), origins


@dataclass
class ChatOrigins:
    """The input item each message of a response's chat request came from (None: the instructions), and each
    tool call's, by (message, call)."""

    messages: list[int | None] = field(default_factory=list)
    calls: dict[tuple[int, int], int] = field(default_factory=dict)
    of_calls: set[int] = field(default_factory=set)  # the assistant messages made of function_call items only


# a chat field's name on this route, after the input item or tool it belongs to
CALL_FIELDS = {"": "", ".id": ".call_id", ".function.name": ".name", ".function.arguments": ".arguments",
               ".function": ""}


def responses_param(param: str | None, origins: ChatOrigins) -> str | None:
    """A chat route's error param as this route names the same field: response_format is text.format, tools'
    and tool_choice's fields are inline, and a message's ("messages[3].role", "messages") is the input item's it
    came from ("input[2].role", "input"), a tool call's the function_call item's, the instructions being the
    system message first."""
    if param == "response_format":
        return "text.format"
    if param is None:
        return param
    if param.startswith(("tools", "tool_choice")):
        return param.replace(".function", "", 1)
    if not param.startswith("messages"):
        return param
    rest = param.removeprefix("messages")
    if not rest.startswith("["):
        return "input" + rest
    index, _, tail = rest[1:].partition("]")
    message = int(index)
    if tail.startswith(".tool_calls["):
        call, _, tail = tail.removeprefix(".tool_calls[").partition("]")
        return f"input[{origins.calls[message, int(call)]}]{CALL_FIELDS.get(tail, tail)}"
    item = origins.messages[message]
    if item is None:
        return "instructions"
    if message in origins.of_calls and tail == ".role":  # a function_call item has no role: the item itself
        tail = ""
    return f"input[{item}]" + (".call_id" if tail == ".tool_call_id" else tail)


# ---------------------------------------------------------------------------------------------- response


class TopTokenLogprob(BaseModel):
    token: str
    bytes: list[int]  # the token's exact UTF-8 bytes (a special token, which has no text: none)
    logprob: float


class TokenLogprob(TopTokenLogprob):
    top_logprobs: list[TopTokenLogprob]

    def as_delta(self) -> dict:
        """As the streamed events write it: without the bytes."""
        return {"token": self.token, "logprob": self.logprob,
                "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in self.top_logprobs]}


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[TokenLogprob] = []


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(BaseModel):
    cached_tokens: int
    cache_write_tokens: int = 0  # OpenAI's count of tokens written to an explicitly kept cache: none here


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
    output: list[OutputMessage | OutputFunctionCall]
    instructions: str | None
    max_output_tokens: int | None
    temperature: float
    top_p: float
    metadata: dict[str, str]
    text: dict[str, Any]
    usage: ResponseUsage | None = None
    parallel_tool_calls: bool = True
    tool_choice: str | dict[str, str] = "none"
    tools: list[dict[str, Any]] = []
    previous_response_id: None = None
    top_logprobs: int | None = None
    store: bool = False  # whatever was asked: nothing is stored
    truncation: str = "disabled"
    user: str | None = None


class ResponseBuilder:
    """One response's fixed fields (from its request) and its output; `response(...)` at any point."""

    def __init__(self, body: ResponsesRequest, model_name: str, run: Run, calling: ToolCalling | None,
                 tokenizer: Tokenizer):
        self.body, self.model_name, self.run, self.calling, self.tokenizer = body, model_name, run, calling, tokenizer
        self.id, self.message_id = run.id, f"msg_{uuid.uuid4().hex}"  # the engine's request id is the response's
        self.splitter = PartSplitter(tokenizer)
        self.logprobs: list[TokenLogprob] = []  # the text's tokens', when asked for

    def add(self, event: TokenEvent) -> tuple[str, list[TokenLogprob]]:
        """The text an event adds to the reply (the calculator's calls and outputs left out) and, when asked
        for, the log-probabilities of its token if that went to the text."""
        pieces = self.splitter.add(event.token_id, event.text)
        text = "".join(piece.text for piece in pieces if piece.type == "text")
        wanted = self.body.wants_logprobs and self.calling is None  # a call's arguments have none
        if not (wanted and event.logprob is not None and pieces and pieces[-1].type == "text"):
            return text, []
        info = self.run.logprobs[0][-1]  # the run recorded the event's as it came
        entry = TokenLogprob(**self._piece(info.token), logprob=info.logprob,
                             top_logprobs=[TopTokenLogprob(**self._piece(t), logprob=lp) for t, lp in info.top])
        self.logprobs.append(entry)
        return text, [entry]

    def _piece(self, token: int) -> dict:
        piece = token_piece(self.tokenizer, token)
        return {**piece, "bytes": piece["bytes"] or []}

    def message(self, text: str, status: str) -> OutputMessage:
        return OutputMessage(id=self.message_id, status=status,
                             content=[OutputText(text=text, logprobs=self.logprobs)])

    def response(self, output: list[OutputMessage | OutputFunctionCall], status: str, usage: bool = True) -> Response:
        body, run = self.body, self.run
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
        choice = tool_choice_or_default(body.tool_choice, tools)
        return Response(
            id=self.id, created_at=run.created, status=status, incomplete_details=incomplete, model=self.model_name,
            output=output, instructions=body.instructions, max_output_tokens=body.max_output_tokens,
            temperature=body.temperature, top_p=body.top_p, metadata=body.metadata,
            text=body.text.model_dump(by_alias=True, exclude_none=True), user=body.user,
            usage=self.usage() if usage else None, tools=tools, top_logprobs=body.top_logprobs,
            tool_choice=choice.model_dump() if isinstance(choice, NamedFunction) else choice,
            parallel_tool_calls=body.parallel_tool_calls is not False)

    def usage(self) -> ResponseUsage:
        chat = self.run.usage()
        return ResponseUsage(input_tokens=chat.prompt_tokens, output_tokens=chat.completion_tokens,
                             total_tokens=chat.total_tokens,
                             input_tokens_details=InputTokensDetails(cached_tokens=chat.prompt_tokens_details.cached_tokens))

    def finished(self, scanner: CallScanner | None = None) -> Response:
        """The whole response to the reply added: a message, or with tools the calls (module docstring);
        scanner: the one that streamed the calls, whose ids the response keeps."""
        text = self.splitter.content
        reason = self.run.finish_reasons[0]
        status = "incomplete" if reason == "length" else "completed"
        if self.calling is None:
            return self.response([self.message(text, status)], status)
        message, _ = self.calling.reply(text, reason, scanner)
        if message.tool_calls is None:
            return self.response([self.message(message.content, status)], status)
        return self.response([function_call(call.id, call.function.name, call.function.arguments,
                                            "completed" if complete(call.function.arguments) else "incomplete")
                              for call in message.tool_calls], status)


def function_call(call_id: str, name: str, arguments: str, status: str) -> OutputFunctionCall:
    """A tool call as an output item."""
    return OutputFunctionCall(id=item_id(call_id), call_id=call_id, name=name, arguments=arguments, status=status)


def item_id(call_id: str) -> str:
    """A call's output item id: the call's own."""
    return f"fc_{call_id.removeprefix('call_')}"


async def response_events(builder: ResponseBuilder) -> AsyncGenerator[str, None]:
    """The streamed response's events (module docstring)."""
    sequence = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def dumped(model: BaseModel) -> dict:
        return model.model_dump(mode="json")

    def message_opened() -> str:
        return (event("response.output_item.added", output_index=0,
                      item=dumped(OutputMessage(id=builder.message_id, status="in_progress", content=[])))
                + event("response.content_part.added", **where, part=dumped(OutputText(text=""))))

    def calls(pieces: list[CallPiece]) -> str:
        """A call's start as its output item, more of its arguments as a delta, its end as its done events."""
        written = ""
        for piece in pieces:
            id_ = scanner.ids[piece.index]
            if piece.name is not None:
                written += event("response.output_item.added", output_index=piece.index,
                                 item=dumped(function_call(id_, piece.name, "", "in_progress")))
                continue
            written += event("response.function_call_arguments.delta", item_id=item_id(id_),
                             output_index=piece.index, delta=piece.arguments)
            if piece.ends:
                name, arguments = scanner.calls[piece.index]
                written += call_done(piece.index, function_call(id_, name, arguments, "completed"))
        return written

    def call_done(index: int, item: OutputFunctionCall) -> str:
        done.add(index)
        return (event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                      name=item.name, arguments=item.arguments)
                + event("response.output_item.done", output_index=index, item=dumped(item)))

    def text_delta(delta: str, logprobs: list[TokenLogprob]) -> str:
        if scanner is not None:
            return calls(scanner.feed(delta))
        if not (delta or logprobs):
            return ""
        return event("response.output_text.delta", **where, delta=delta, logprobs=[e.as_delta() for e in logprobs])

    calling = builder.calling
    scanner = CallScanner(calling.named) if calling is not None else None
    done: set[int] = set()  # the calls whose done events went out
    where = {"item_id": builder.message_id, "output_index": 0, "content_index": 0}
    started = builder.response([], "in_progress", usage=False)
    yield (event("response.created", response=dumped(started)) + event("response.in_progress", response=dumped(started))
           + (message_opened() if scanner is None else calls(scanner.opening())))
    async for batch in builder.run.batches():
        delta, logprobs = "", []
        for item in batch:
            if item.finish_reason == "abort":
                yield text_delta(delta, logprobs) + event(
                    "error", code="unavailable", param=None,
                    message="The server is shutting down: the response was cut short; retry on another replica")
                return
            text, entries = builder.add(item)
            delta, logprobs = delta + text, logprobs + entries
        written = text_delta(delta, logprobs)
        if written:
            yield written
    final = builder.finished(scanner)
    closing = ""
    for index, item in enumerate(final.output):
        if isinstance(item, OutputFunctionCall):
            closing += call_done(index, item) if index not in done else ""
            continue
        if calling is not None:  # a "required" reply cut before its first call: its text, as a message
            closing += message_opened() + event("response.output_text.delta", **where, delta=item.content[0].text,
                                                logprobs=[])
        closing += (event("response.output_text.done", **where, text=item.content[0].text,
                          logprobs=[e.as_delta() for e in item.content[0].logprobs])
                    + event("response.content_part.done", **where, part=dumped(item.content[0]))
                    + event("response.output_item.done", output_index=0, item=dumped(item)))
    yield closing + event(f"response.{final.status}", response=dumped(final))
