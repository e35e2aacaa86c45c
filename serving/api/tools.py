"""
OpenAI function calling (`tools`, `tool_choice`) for a model that was never trained to call a client's
functions: the reply is constrained to be the call, as vLLM serves tool_choice "required" and a named
function to any model.

Notable:
- a named function ({"type": "function", "function": {"name": ...}}): the reply is that function's
  arguments, a JSON object that follows its `parameters` schema (enforced by serving/engine/grammar.py).
  "required": the reply is a JSON array of one or more calls [{"name": ..., "arguments": {...}}], each
  item one of the functions with its own schema (one call only with parallel_tool_calls false). A
  complete reply comes back as the message's tool_calls, content null, finish_reason "tool_calls".
- "auto", OpenAI's default when tools are given, is refused with a 400 naming the field: whether to call
  a function or answer in text is the model's own decision, and this model was not trained to make it.
  "none" offers no function: the reply is text, as without tools.
- the model is shown the functions as JSON after the system message (the chat format has no place of its
  own for them), and a conversation's earlier calls and results as text: an assistant message's
  tool_calls as the JSON array a "required" reply is, the tool messages after it as one user turn that
  lists each result with its function's name (the format alternates user and assistant turns, so a user
  message right after the results joins that turn).
- a call's arguments are returned exactly as the model wrote them. A reply cut short (max_tokens, a stop
  string) before its calls are complete keeps the engine's finish_reason, and its calls carry their
  arguments as far as they go, as OpenAI's do; a "required" reply cut before its first call's name has no
  call, and its text comes back as the content.
- streamed: each call's id and name as soon as they are known (a named function's at once), then its
  arguments as they are written (CallScanner reads a "required" array as it grows).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from serving.api.errors import bad_request
from serving.api.schemas import (
    ChatMessage,
    FunctionCall,
    FunctionDelta,
    FunctionTool,
    NamedToolChoice,
    ResponseMessage,
    ToolCall,
    ToolCallDelta,
)
from serving.engine.grammar import json_grammar

NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
AUTO_REFUSED = ('tool_choice "auto" (the default with tools) has the model decide whether to call a function, and '
                'this model was not trained to: ask for "required", or name the function ({"type": "function", '
                '"function": {"name": ...}}), to have it call one; or "none" for a text reply')


@dataclass(frozen=True)
class ToolCalling:
    """A request whose reply calls its functions: the grammar of the reply, the functions as the model is
    shown them, and how the reply's text becomes tool calls."""

    grammar: str
    listing: str
    named: str | None  # the function a named tool_choice calls; None: "required"'s array of calls

    def reply(self, text: str, finish_reason: str | None,
              scanner: CallScanner | None = None) -> tuple[ResponseMessage, str | None]:
        """A finished choice's message and finish_reason (module docstring); scanner: the one that streamed
        text, whose call ids the message keeps."""
        if scanner is None:
            scanner = CallScanner(self.named)
            scanner.feed(text)
        if not scanner.calls:  # a "required" reply cut before its first call's name
            return ResponseMessage(content=text), finish_reason
        calls = [ToolCall(id=id_, type="function", function=FunctionCall(name=name, arguments=arguments))
                 for id_, (name, arguments) in zip(scanner.ids, scanner.calls, strict=True)]
        return ResponseMessage(content=None, tool_calls=calls), "tool_calls" if complete(text) else finish_reason


def complete(text: str) -> bool:
    """Whether a reply is whole: the grammar's JSON, not cut short."""
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallPiece:
    """What a reply's next text adds to its calls: a call's start (its function's name, arguments "") or more
    of its arguments."""

    index: int  # the call's place among the reply's calls
    name: str | None  # at the call's start
    arguments: str
    ends: bool = False  # its arguments end with this piece ("required"'s; a named call ends with the reply)


NAME_BEFORE, ARGUMENTS_BEFORE = '{"name": "', '", "arguments": '  # a "required" item, as the grammar writes it


class CallScanner:
    """A reply's calls read as it is written, for streaming: each call's start once its name is complete,
    then its arguments piece by piece, exactly as written. A named function's reply is its arguments; a
    "required" reply is the array of {"name", "arguments"} items with json.dumps's separators (the grammar's
    layout), so no JSON parser is needed: the name stands between fixed strings, and the arguments end
    where their nesting closes, outside strings."""

    def __init__(self, named: str | None):
        self.named = named
        self.text, self.at = "", 0  # what was written, and how far it was read
        self.calls: list[list[str]] = [[named, ""]] if named is not None else []  # [name, arguments]
        self.ids = [call_id() for _ in self.calls]
        self.in_arguments = named is not None
        self.depth, self.in_string, self.escaped = 0, False, False

    def opening(self) -> list[CallPiece]:
        """The pieces known before the reply: a named function's call starts at once."""
        return [CallPiece(0, self.named, "")] if self.named is not None else []

    def feed(self, text: str) -> list[CallPiece]:
        """The pieces that text, the reply's next, adds."""
        self.text += text
        if self.named is not None:
            self.calls[0][1] += text
            return [CallPiece(0, None, text)] if text else []
        pieces = []
        while True:
            if not self.in_arguments:
                start = self.text.find(NAME_BEFORE, self.at)
                end = self.text.find(ARGUMENTS_BEFORE, start + len(NAME_BEFORE)) if start >= 0 else -1
                if end < 0:
                    return pieces
                name = self.text[start + len(NAME_BEFORE):end]
                self.calls.append([name, ""])
                self.ids.append(call_id())
                pieces.append(CallPiece(len(self.calls) - 1, name, ""))
                self.at, self.in_arguments = end + len(ARGUMENTS_BEFORE), True
            begin, closed = self.at, self._read_arguments()
            if self.at > begin:
                self.calls[-1][1] += self.text[begin:self.at]
                pieces.append(CallPiece(len(self.calls) - 1, None, self.text[begin:self.at], ends=closed))
            if not closed:
                return pieces
            self.in_arguments = False

    def _read_arguments(self) -> bool:
        """Reads on through the current call's arguments; whether they ended."""
        for i in range(self.at, len(self.text)):
            ch = self.text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.at = i + 1
                    return True
        self.at = len(self.text)
        return False


# ---------------------------------------------------------------------------------------------- requests


class ToolRequest(Protocol):
    """What a request says of its functions (a chat completion's, a /tokenize's)."""

    tools: list[FunctionTool] | None
    tool_choice: str | NamedToolChoice | None
    parallel_tool_calls: bool | None


def tool_calling(body: ToolRequest) -> ToolCalling | None:
    """What body's tools and tool_choice ask of the reply (None: text), or a 400 naming the field that cannot
    be served. Compiles grammars: call it off the event loop."""
    tools = body.tools or []
    choice = tool_choice_or_default(body.tool_choice, tools)
    if choice == "none":
        return None
    if not tools:
        raise bad_request("tool_choice asks for a function call, but the request has no tools", param="tool_choice")
    names = [tool.function.name for tool in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise bad_request(f"function {name!r} is defined twice", param=f"tools[{i}].function.name")
    if choice == "auto":
        raise bad_request(AUTO_REFUSED, param="tool_choice" if body.tool_choice is not None else "tools")
    schemas = [arguments_schema(tool, i) for i, tool in enumerate(tools)]
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise bad_request(f"tool_choice names function {choice.function.name!r}, which is not among the tools",
                              param="tool_choice.function.name")
        named, schema = choice.function.name, schemas[names.index(choice.function.name)]
    else:
        named, schema = None, calls_schema(names, schemas, single=body.parallel_tool_calls is False)
    return ToolCalling(json_grammar(schema), listing(tools), named)


def tool_choice_or_default(choice: Any, tools: list) -> Any:
    """tool_choice as given, or OpenAI's default: "auto" with tools, "none" without."""
    return choice if choice is not None else ("auto" if tools else "none")


def arguments_schema(tool: FunctionTool, index: int) -> dict[str, Any]:
    """The schema of a function's arguments: an object (its parameters' type, unless they name none)."""
    parameters, param = tool.function.parameters, f"tools[{index}].function.parameters"
    if parameters is None:
        return NO_ARGUMENTS
    if parameters.get("type", "object") != "object":
        raise bad_request(f'function {tool.function.name!r}: parameters must be a JSON Schema of type "object" '
                          "(the arguments are an object)", param=param)
    schema = {"type": "object", **parameters}
    try:
        json_grammar(schema)
    except ValueError as e:
        raise bad_request(f"Invalid schema for function {tool.function.name!r}: {e}", param=param) from None
    return schema


def calls_schema(names: list[str], schemas: list[dict[str, Any]], single: bool) -> dict[str, Any]:
    """The schema of "required"'s reply: an array of one or more calls (one with single), each item one of
    the functions, its name and its arguments."""
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, schema in zip(names, schemas, strict=True)]
    schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "minItems": 1}
    if single:
        schema["maxItems"] = 1
    return schema


def listing(tools: list[FunctionTool]) -> str:
    functions = [{"name": tool.function.name,
                  **({"description": tool.function.description} if tool.function.description else {}),
                  "parameters": tool.function.parameters or NO_ARGUMENTS} for tool in tools]
    return "Functions you can call, as JSON:\n" + json.dumps(functions, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- conversations


def conversation(messages: list[ChatMessage], calling: ToolCalling | None) -> list[dict[str, Any]]:
    """messages as nanochat's chat format holds them ({"role", "content"}, roles system, user, assistant):
    earlier calls and their results as text, and the functions listed after the system message when the
    reply calls one (module docstring). A 400 naming the message for a result that answers no call."""
    rendered: list[dict[str, Any]] = []
    calls: dict[str, str] = {}  # id -> function name, of the assistant message the next results answer
    results: list[dict[str, str]] = []  # the tool messages of the turn being gathered
    for i, message in enumerate(messages):
        if message.role == "tool":
            if message.tool_call_id not in calls:
                raise bad_request(f"tool message {i} answers call {message.tool_call_id!r}, which is none of the "
                                  "calls of the assistant message before it", param=f"messages[{i}].tool_call_id")
            results.append({"name": calls[message.tool_call_id], "result": message.text})
            continue
        if results:
            rendered.append({"role": "user", "content": results_text(results)})
            results = []
            if message.role == "user":  # joins the results' turn: the format alternates user and assistant
                rendered[-1]["content"] += "\n\n" + message.text
                calls = {}
                continue
        calls = {call.id: call.function.name for call in message.tool_calls}
        role = "system" if message.role == "developer" else message.role
        rendered.append({"role": role, "content": message_content(message, i)})
    if results:
        rendered.append({"role": "user", "content": results_text(results)})
    if calling is not None:
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": rendered[0]["content"] + "\n\n" + calling.listing}
        else:
            rendered.insert(0, {"role": "system", "content": calling.listing})
    return rendered


def results_text(results: list[dict[str, str]]) -> str:
    return "Function results, as JSON:\n" + json.dumps(results, ensure_ascii=False)


def message_content(message: ChatMessage, index: int) -> str | list[dict[str, str]]:
    """A message's content as the chat format holds it; an assistant message's calls follow its text as the
    JSON array a "required" reply is."""
    content = message.rendered_content
    if not message.tool_calls:
        return content
    written = []
    for j, call in enumerate(message.tool_calls):
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            raise bad_request("the arguments of a call are JSON text", param=f"messages[{index}].tool_calls[{j}]"
                                                                              ".function.arguments") from None
        written.append({"name": call.function.name, "arguments": arguments})
    calls = json.dumps(written, ensure_ascii=False)
    if isinstance(content, list):
        return [*content, {"type": "text", "text": calls}]
    return f"{content}\n{calls}" if content else calls


# ---------------------------------------------------------------------------------------------- streaming


class CallStream:
    """One streamed choice's tool calls, as the deltas of its chunks."""

    def __init__(self, calling: ToolCalling):
        self.calling = calling
        self.scanner = CallScanner(calling.named)

    def opening(self) -> dict[str, Any]:
        """The choice's first delta: the role, and a named function's call id and name."""
        return {"role": "assistant", "content": None, **self._deltas(self.scanner.opening())}

    def add(self, text: str) -> dict[str, Any] | None:
        """The delta of the choice's next text: calls started and more of their arguments (None: nothing)."""
        return self._deltas(self.scanner.feed(text)) or None

    def finish(self, finish_reason: str) -> tuple[dict[str, Any] | None, str]:
        """The choice's last delta (None: nothing more to send) and its finish_reason: a reply cut before its
        first call's name comes as content."""
        message, reason = self.calling.reply(self.scanner.text, finish_reason, self.scanner)
        return ({"content": message.content} if message.tool_calls is None and message.content else None), reason

    def _deltas(self, pieces: list[CallPiece]) -> dict[str, Any]:
        deltas = [ToolCallDelta(index=p.index, id=self.scanner.ids[p.index], type="function",
                                function=FunctionDelta(name=p.name, arguments=""))
                  if p.name is not None else ToolCallDelta(index=p.index, function=FunctionDelta(arguments=p.arguments))
                  for p in pieces]
        return {"tool_calls": deltas} if deltas else {}
