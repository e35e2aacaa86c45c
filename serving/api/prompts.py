"""
What a request asks of the engine, besides its sampling: the prompt a chat renders to, the tokens that end
its turn, the grammar that shapes its reply.

Notable:
- chat: messages -> conversation (tools.py: functions and earlier calls as text) ->
  tokenizer.render_for_completion (ends with <|assistant_start|>), the turn ends at <|assistant_end|>;
  with continue_final_message (vLLM's) render_for_continuation instead: the final, assistant, message
  goes on from where it stands. Completions: the prompt text after <|bos|>, ending at the next <|bos|>.
  The engine adds both stop tokens to every request anyway; a stop token counts as a completion token.
- response_format (both routes): json_object and json_schema become a grammar (serving/engine/grammar.py)
  that the engine enforces token by token, so a reply that ends with "stop" parses, and validates against
  the schema; one cut by max_tokens ends with "length". A schema that is invalid or uses a keyword the
  grammar cannot enforce is a 400 naming response_format, never a looser grammar. vLLM's
  structured_outputs (choice, regex, a Lark grammar, json, json_object) go the same way, one per request.
"""

from __future__ import annotations

import asyncio
import json

from nanochat.tokenizer import Tokenizer
from serving.api.errors import bad_request
from serving.api.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    ResponseFormat,
    SamplingRequest,
    StructuredOutputs,
    TokenizeRequest,
)
from serving.api.tools import ToolCalling, conversation
from serving.engine.grammar import ANY_OBJECT, choice_grammar, json_grammar, lark_grammar, regex_grammar


def bad_words_ids(tokenizer: Tokenizer, words: list[str]) -> list[list[int]]:
    """Each bad word's token sequences, as vLLM makes them: the word alone and after a space (as it is
    written mid-sentence), the same sequence once."""
    sequences = {tuple(tokenizer.encode(text)) for word in words for text in (word.lstrip(), " " + word.lstrip())}
    return [list(sequence) for sequence in sorted(sequences) if sequence]


def end_of_turn(tokenizer: Tokenizer) -> list[int]:
    """The tokens that end an assistant's turn: <|assistant_end|>, and <|bos|> (a new document)."""
    return [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]


def chat_prompt(tokenizer: Tokenizer, messages: list[ChatMessage], calling: ToolCalling | None = None,
                continuing: bool = False) -> list[int]:
    """The prompt that asks for the assistant's next message (which calls a function with calling), or with
    continuing, for the rest of its final message (continues_final_message checked that it is one)."""
    last = len(messages) - 1
    if messages[last].role not in ("user", "tool") and not continuing:
        # render_for_completion would silently drop a final assistant message: say so instead
        raise bad_request("The last message must be from the user (or a tool's result), or the assistant's with "
                          "continue_final_message: true", param=f"messages[{last}].role")
    try:
        rendered = {"messages": conversation(messages, calling)}
        if continuing:
            return tokenizer.render_for_continuation(rendered)
        return tokenizer.render_for_completion(rendered)
    except ValueError as e:  # roles out of order: the chat format alternates user and assistant
        raise bad_request(str(e), param="messages") from None


def continues_final_message(body: ChatCompletionRequest | TokenizeRequest, calling: ToolCalling | None) -> bool:
    """Whether the reply goes on with the final message (vLLM's continue_final_message), or a 400 naming what
    cannot go with it. add_generation_prompt left out is taken as false, as it must be."""
    if not body.continue_final_message:
        return False
    last = len(body.messages or []) - 1
    if "add_generation_prompt" in body.model_fields_set and body.add_generation_prompt:
        raise bad_request("continue_final_message goes on with the final message instead of starting a new one: "
                          "it cannot go with add_generation_prompt: true", param="continue_final_message")
    if calling is not None:
        raise bad_request("continue_final_message cannot go with a tool_choice that makes the reply a function "
                          "call", param="continue_final_message")
    if last >= 0 and body.messages[last].role != "assistant":
        raise bad_request("continue_final_message goes on with the assistant's message: the last message must "
                          "be the assistant's", param=f"messages[{last}].role")
    return True


async def request_grammar(body: SamplingRequest, calling: ToolCalling | None = None) -> str | None:
    """The grammar body's function call (calling), response_format or structured_outputs asks for (None:
    plain text), or a 400 saying why there is none. Compiled on a worker thread: a big schema takes a while."""
    grammar = await _grammar(body, calling)
    for name in ("allowed_token_ids", "bad_words"):
        if grammar is not None and getattr(body, name):
            # the two masks could leave a step no token at all, where the grammar allows one: a 400 here rather
            # than a token the grammar refuses
            raise bad_request(f"{name} cannot go with a grammar (response_format, structured_outputs or a forced "
                              "function call): the grammar alone decides which tokens may come", param=name)
    return grammar


async def _grammar(body: SamplingRequest, calling: ToolCalling | None) -> str | None:
    response_format = body.response_format
    constrained = response_format is not None and response_format.type != "text"
    if calling is not None:
        if constrained or body.structured_outputs is not None:
            param = "response_format" if constrained else "structured_outputs"
            raise bad_request(f"{param} cannot shape a reply that tool_choice makes a function call", param=param)
        return calling.grammar
    if body.structured_outputs is not None:
        if constrained:
            raise bad_request("give response_format or structured_outputs, not both", param="structured_outputs")
        return await asyncio.to_thread(structured_grammar, body.structured_outputs)
    if not constrained:
        return None
    return await asyncio.to_thread(format_grammar, response_format)


def structured_grammar(wanted: StructuredOutputs) -> str:
    """The grammar of vLLM's structured_outputs, or a 400 naming the constraint that has none."""
    if wanted.json_object:
        return json_grammar(ANY_OBJECT)
    param = f"structured_outputs.{wanted.given[0]}"
    try:
        if wanted.regex is not None:
            return regex_grammar(wanted.regex)
        if wanted.choice is not None:
            return choice_grammar(wanted.choice)
        if wanted.grammar is not None:
            return lark_grammar(wanted.grammar)
        schema = json.loads(wanted.json_) if isinstance(wanted.json_, str) else wanted.json_
        if not isinstance(schema, dict):
            raise ValueError("a JSON Schema is an object")
        return json_grammar(schema)
    except ValueError as e:  # json.JSONDecodeError too
        raise bad_request(f"{param}: {e}", param=param) from None


def format_grammar(response_format: ResponseFormat) -> str:
    if response_format.json_schema is None:  # json_object
        return json_grammar(ANY_OBJECT)
    spec = response_format.json_schema
    try:
        return json_grammar(spec.schema_)
    except ValueError as e:
        raise bad_request(f"Invalid schema for response_format {spec.name!r}: {e}", param="response_format") from None
