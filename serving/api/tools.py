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
- a reply cut short (max_tokens, a stop string) before its call is complete keeps the engine's
  finish_reason: a named function's call carries its arguments as far as they go, as OpenAI's does; a
  "required" reply's cut array holds no call to read, so its text comes back as the content.
- streamed: a named function's call id and name come first, then its arguments as they are written; a
  "required" reply's calls come once the array is complete (its items are only known then), with the
  log-probabilities of all its tokens when they were asked for.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
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

    def reply(self, text: str, finish_reason: str | None) -> tuple[ResponseMessage, str | None]:
        """A finished choice's message and finish_reason (module docstring)."""
        calls = self.calls(text)
        if calls is not None:
            return ResponseMessage(content=None, tool_calls=calls), "tool_calls"
        if self.named is not None:
            return ResponseMessage(content=None, tool_calls=[new_call(self.named, text)]), finish_reason
        return ResponseMessage(content=text), finish_reason

    def calls(self, text: str) -> list[ToolCall] | None:
        """The calls of a complete reply; None when the reply was cut before its end."""
        try:
            written = json.loads(text)
        except json.JSONDecodeError:
            return None
        if self.named is not None:
            return [new_call(self.named, text)]
        return [new_call(call["name"], json.dumps(call["arguments"], ensure_ascii=False)) for call in written]


def new_call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=call_id(), type="function", function=FunctionCall(name=name, arguments=arguments))


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


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
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
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


@dataclass
class CallStream:
    """One streamed choice's tool calls, as the deltas of its chunks."""

    calling: ToolCalling
    text: str = ""
    call_id: str = field(default_factory=call_id)

    def opening(self) -> dict[str, Any]:
        """The choice's first delta: the role, and a named function's call id and name."""
        delta: dict[str, Any] = {"role": "assistant", "content": None}
        if self.calling.named is not None:
            delta["tool_calls"] = [ToolCallDelta(index=0, id=self.call_id, type="function",
                                                 function=FunctionDelta(name=self.calling.named, arguments=""))]
        return delta

    def add(self, text: str) -> dict[str, Any] | None:
        """The delta of the choice's next text: more of a named function's arguments (None otherwise)."""
        self.text += text
        if self.calling.named is None or not text:
            return None
        return {"tool_calls": [ToolCallDelta(index=0, function=FunctionDelta(arguments=text))]}

    def finish(self, finish_reason: str) -> tuple[dict[str, Any] | None, str]:
        """The choice's last delta (None: nothing more to send) and its finish_reason."""
        calls = self.calling.calls(self.text)
        if self.calling.named is not None:
            return None, "tool_calls" if calls is not None else finish_reason
        if calls is None:
            return ({"content": self.text} if self.text else None), finish_reason
        return {"tool_calls": [ToolCallDelta(index=j, id=call.id, type="function",
                                             function=FunctionDelta(name=call.function.name,
                                                                    arguments=call.function.arguments))
                               for j, call in enumerate(calls)]}, "tool_calls"
