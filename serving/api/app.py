"""
The OpenAI-compatible HTTP API and the web UI's files, as a plain FastAPI app over an AsyncEngine.

Notable:
- create_app takes anything with AsyncEngine's generate_batches() and alive() (a bool, or an awaitable one):
  the engine itself (tests, one process) or serving/deployments.py's handle on Ray Serve replicas. No Ray
  here, so the tests run it under uvicorn.
- a stream writes each list of events the engine sends (one step's, or several) as one piece, and a
  choice's consecutive text within one list as one chunk (not one per token): with many concurrent
  streams on few cores, fewer writes through the server (and Ray Serve's proxy) and fewer chunks for the
  client to parse per token.
- what is served can change while the app runs: the routes ask `model` (a ServedModels) for the current
  tokenizer and checkpoint step on every request. Before any model exists it has none: /v1/models lists
  nothing and every route that needs the tokenizer answers 503 saying how to train one (/health stays 200).
- /health follows the engine: 503 once it has failed (a step raised) or is draining for shutdown, when new
  requests get a 503 with Retry-After too, while the requests in flight go on streaming.
- a request's fate is decided before its first byte: the route waits for the engine's first event, so
  a full queue (QueueFull) is a 429 and a prompt the context cannot hold (ValueError) a 400, never a
  stream that breaks off. Errors are OpenAI-shaped (errors.py).
- a client that goes away stops its generation. While the route waits (for the first event, or for the
  whole completion when not streaming) it also listens for the disconnect and cancels the wait; once
  streaming, Starlette cancels the stream on disconnect and SSEResponse closes the event generator
  whatever happened, which aborts the request in the engine and frees its KV blocks.
- chat: messages -> conversation -> tokenizer.render_for_completion (ends with <|assistant_start|>), the
  turn ends at <|assistant_end|>; completions: the prompt text after <|bos|>, ending at the next <|bos|>.
  The engine adds both stop tokens to every request anyway; a stop token counts as a completion token.
- usage counts the prompt's tokens and, summed over the n choices, the generated ones, stop tokens and
  the calculator's forced tokens included; prompt_tokens_details.cached_tokens is how many of the
  prompt's tokens the engine's prefix cache held (first choice's count: the others share its blocks).
- a stream only ever ends a choice with OpenAI's finish reasons. A request the engine aborts while
  streaming (the replica shutting down) ends with an error event in OpenAI's shape (code "unavailable",
  no [DONE]); the official client raises it as an APIError. Unstreamed, the same case is a 503.
- logprobs: chat's logprobs/top_logprobs and completions' logprobs come from the engine (the model's
  own distribution, before temperature, top-k and top-p: vLLM's default), in OpenAI's shapes; a token is
  its text (a cut UTF-8 character shows as U+FFFD, its exact bytes in `bytes`), a special token its
  name. Chat has one entry per generated token but the stop token (OpenAI shows no end of turn);
  completions one per completion token, the stop token included, as vLLM (clients that score a prompt
  with max_tokens 1, such as lm-evaluation-harness, count on exactly one entry after the prompt's). A
  completion's text_offset is where the text sent so far stood when the token came (text held back for
  a stop string comes later).
- completions take a text (encoded after <|bos|>) or token ids (run as given). echo puts the prompt
  before each choice's text, with its first streamed chunk: a text as sent, token ids decoded (special
  tokens by name, as /detokenize writes them). With logprobs, echo also scores the prompt (the engine's
  prompt_logprobs): an entry per prompt token, the first one's logprob and top_logprobs null, as vLLM
  returns them; with max_tokens 0 only the prompt is scored (the engine runs one step, whose token is
  not returned: vLLM's way), finish_reason "length".
- response_format (both routes): json_object and json_schema become a grammar (serving/engine/grammar.py)
  that the engine enforces token by token, so a reply that ends with "stop" parses, and validates against
  the schema; one cut by max_tokens ends with "length". A schema that is invalid or uses a keyword the
  grammar cannot enforce is a 400 naming response_format, never a looser grammar.
- the calculator: a chat reply is cut into text, call and output parts (parts.py); `content` holds the
  text, and a reply that called the tool also has `content_parts`, streamed as deltas of their own. An
  assistant message sent back with its content_parts renders them as in training. A text completion's
  text keeps the call and output inline: the prompt is raw text, with no turns to hold parts.
- /v1/responses: OpenAI's Responses API, answered as the chat turn of the same messages (responses.py).
- /tokenize, /detokenize and /version follow vLLM's routes: a prompt or messages to the token ids the
  completions would run (and the engine's max_model_len), token ids back to text, the server's version.
  The first two need the served tokenizer (503 before a model exists) and, like /v1/, an API key when
  keys are set; /version needs neither.
- API keys: a pure ASGI middleware guards /v1/ (and the tokenizer routes) before the body is even parsed, so a caller without a key
  learns nothing about the API; /health and the UI stay open (the UI sends the key the user types).
- the UI is static files served with a strict Content-Security-Policy (the page has no inline script or
  style) and the usual hardening headers.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import hmac
import importlib.metadata
import inspect
import json
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from nanochat.tokenizer import Tokenizer
from serving.api.errors import (
    APIError,
    ClientDisconnected,
    bad_request,
    engine_failed,
    install_error_handlers,
    invalid_api_key,
    model_not_found,
    no_model,
    queue_full,
    unavailable,
)
from serving.api.logprobs import TokenInfo, token_piece
from serving.api.parts import PartSplitter, Piece
from serving.api.responses import ResponseBuilder, ResponsesRequest, response_events, responses_param
from serving.api.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ContentPart,
    ContentPartDelta,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ResponseFormat,
    ResponseMessage,
    SamplingRequest,
    StructuredOutputs,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
    now,
)
from serving.api.tools import CallStream, ToolCalling, conversation, tool_calling
from serving.engine.async_engine import QueueFull
from serving.engine.grammar import ANY_OBJECT, choice_grammar, json_grammar, lark_grammar, regex_grammar
from serving.engine.llm_engine import Logprobs, TokenEvent
from serving.engine.sequence import SamplingParams

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
CONTENT_TYPES = {  # the only files served: a name with another suffix is a 404
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}

SAMPLING_EPS = 1e-5  # temperatures under it are 0 (greedy), top_p under it is it

T = TypeVar("T")


class Engine(Protocol):
    """What the API needs of an engine: AsyncEngine's generate_batches() and alive()."""

    def generate_batches(self, request_id: str, prompt_ids: list[int],
                         params: SamplingParams) -> AsyncGenerator[list[TokenEvent], None]: ...

    def alive(self) -> bool | Awaitable[bool]: ...


@dataclass(frozen=True)
class ServedModel:
    """The model being served: its tokenizer, its checkpoint's step (None: not known), when it came, and the
    engine's longest context (None: ask the engine the app was given)."""

    tokenizer: Tokenizer
    step: int | None = None
    created: int = field(default_factory=now)
    max_model_len: int | None = None


class ServedModels(Protocol):
    """Which model is served right now (None: none yet), and, for the 503 until then, how to get one, or why
    the checkpoint there is not served."""

    hint: str
    refused: str | None

    async def current(self) -> ServedModel | None: ...


class FixedModel:
    """One model for the app's whole life (tests, tools that load it themselves)."""

    hint = "no model was given to this server"
    refused = None

    def __init__(self, tokenizer: Tokenizer | None, step: int | None = None):
        self.model = None if tokenizer is None else ServedModel(tokenizer, step)

    async def current(self) -> ServedModel | None:
        return self.model


def create_app(engine: Engine, model: Tokenizer | ServedModels | None, *, model_name: str = "nanochat",
               api_keys: list[str] | None = None, max_prompt_tokens: int = 2048,
               max_tokens_limit: int = 1024, priority_scheduling: bool = False) -> FastAPI:
    """The API over engine. model: the tokenizer of a model served for good, or a ServedModels whose model
    may come and change while the app runs. api_keys: when given, /v1/ needs `Authorization: Bearer <one
    of them>`. max_prompt_tokens and max_tokens_limit bound what one request may ask for (400 beyond).
    priority_scheduling: the engine orders its queue by each request's priority (else a priority is a 400)."""
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None)  # the docs pages load scripts from a CDN
    install_error_handlers(app)
    if api_keys:
        app.add_middleware(APIKeyMiddleware, keys=api_keys)
    served: ServedModels = FixedModel(model) if model is None or isinstance(model, Tokenizer) else model

    async def current() -> ServedModel:
        found = await served.current()
        if found is None:
            raise no_model(served.hint, served.refused)
        return found

    def model_card(found: ServedModel) -> ModelCard:
        return ModelCard(id=model_name, created=found.created, step=found.step)

    def sampling_params(body: SamplingRequest, tokenizer: Tokenizer, stop_token_ids: list[int],
                        grammar: str | None = None) -> SamplingParams:
        if body.model is not None and body.model != model_name:
            raise model_not_found(body.model)
        max_tokens = body.requested_max_tokens
        if max_tokens is None:
            max_tokens = max_tokens_limit  # the engine cuts it to the context the prompt leaves
        elif max_tokens == 0:  # echo's prompt scoring (the completions route checks): one step, not returned
            max_tokens = 1
        elif max_tokens > max_tokens_limit:
            param = body.max_tokens_param
            raise bad_request(f"{param} is {max_tokens}, more than this server's limit of {max_tokens_limit}",
                              param=param)
        # a top_k beyond the vocabulary keeps every token; cutting it also keeps it in int64
        top_k = None if body.top_k is None else min(body.top_k, tokenizer.vocab_size)
        # the sampler works in float32: dividing by a tiny temperature overflows it (vLLM's rule: below
        # 1e-5 is greedy), and a tiny top_p rounds to 0, keeping no token; 1e-5 keeps just the top one
        temperature = 0.0 if body.temperature < SAMPLING_EPS else body.temperature
        top_p = max(body.top_p, SAMPLING_EPS)
        if body.min_tokens > max_tokens:
            raise bad_request(f"min_tokens is {body.min_tokens}, more than max_tokens ({max_tokens})",
                              param="min_tokens")
        for i, token in enumerate(body.stop_token_ids):
            if token >= tokenizer.vocab_size:
                raise bad_request(f"stop_token_ids[{i}] is {token}, not below the vocabulary's size "
                                  f"{tokenizer.vocab_size}", param=f"stop_token_ids[{i}]")
        if body.priority and not priority_scheduling:
            raise bad_request("priority needs priority scheduling, which this server does not use (it serves "
                              "first come first served; serve.scheduling_policy=priority turns it on)",
                              param="priority")
        for i, token in enumerate(body.allowed_token_ids or []):
            if token >= tokenizer.vocab_size:
                raise bad_request(f"allowed_token_ids[{i}] is {token}, not below the vocabulary's size "
                                  f"{tokenizer.vocab_size}", param=f"allowed_token_ids[{i}]")
        bias = {int(token): value for token, value in body.logit_bias.items()}
        if any(token >= tokenizer.vocab_size for token in bias):
            raise bad_request(f"logit_bias: token ids must be below the vocabulary's size {tokenizer.vocab_size}",
                              param="logit_bias")
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=body.min_p, seed=body.seed,
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                              repetition_penalty=body.repetition_penalty,
                              logit_bias=bias,
                              max_tokens=max_tokens, stop=body.stop or [], n=body.n, logprobs=body.num_logprobs,
                              include_stop_str_in_output=body.include_stop_str_in_output,
                              # ignore_eos: the route's end tokens are no stop tokens either (the engine bans them)
                              stop_token_ids=([] if body.ignore_eos else stop_token_ids) + body.stop_token_ids,
                              min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
                              allowed_token_ids=body.allowed_token_ids, priority=body.priority,
                              bad_words_ids=bad_words_ids(tokenizer, body.bad_words),
                              grammar=grammar)

    async def truncated(prompt_ids: list[int], body: SamplingRequest) -> list[int]:
        """prompt_ids cut to the last truncate_prompt_tokens (vLLM's left truncation; -1: as many as leave one
        token of the context to generate), or as they are."""
        keep = body.truncate_prompt_tokens
        if keep is None:
            return prompt_ids
        if keep == 0:
            raise bad_request("truncate_prompt_tokens: 0 would leave no prompt; give at least 1, or -1 for as "
                              "many as the context holds", param="truncate_prompt_tokens")
        if keep == -1:
            longest = (await current()).max_model_len or getattr(engine, "max_model_len", None)
            if longest is None:
                raise bad_request("truncate_prompt_tokens: -1 needs the model's context length, which this "
                                  "server does not know; give a number of tokens", param="truncate_prompt_tokens")
            keep = longest - 1
        return prompt_ids[-keep:]

    def check_prompt_length(prompt_ids: list[int], param: str) -> None:
        if len(prompt_ids) > max_prompt_tokens:
            raise bad_request(f"The prompt has {len(prompt_ids)} tokens, more than this server's limit of "
                              f"{max_prompt_tokens}", param=param, code="context_length_exceeded")

    @app.get("/health")
    async def health() -> dict[str, str]:
        alive = engine.alive()
        if inspect.isawaitable(alive):  # an engine elsewhere (Ray Serve replicas) is asked
            alive = await alive
        if not alive:  # failed, stopped, or draining for shutdown: send traffic elsewhere
            raise unavailable("The engine is not taking requests (it failed, or the server is shutting down)")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        found = await served.current()
        return ModelList(data=[] if found is None else [model_card(found)])

    @app.get("/v1/models/{model}")
    async def retrieve_model(model: str) -> ModelCard:
        found = await served.current()
        if model != model_name or found is None:
            raise model_not_found(model)
        return model_card(found)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        tokenizer = (await current()).tokenizer
        calling = await asyncio.to_thread(tool_calling, body)
        if not (body.add_generation_prompt or body.continue_final_message):
            raise bad_request("add_generation_prompt: false goes only with continue_final_message: true (a reply "
                              "opens with <|assistant_start|>, which is the generation prompt)",
                              param="add_generation_prompt")
        continuing = continues_final_message(body, calling)
        params = sampling_params(body, tokenizer, end_of_turn(tokenizer), await request_grammar(body, calling))
        prompt_ids = await truncated(await asyncio.to_thread(chat_prompt, tokenizer, body.messages, calling,
                                                              continuing), body)
        check_prompt_length(prompt_ids, "messages")
        run = await start(engine, request, f"chatcmpl-{uuid.uuid4().hex}", prompt_ids, params, "messages",
                          hidden_logprobs=frozenset(params.stop_token_ids))
        echo = body.messages[-1].parts if continuing and body.echo else []
        if body.stream:
            return SSEResponse(run, chat_chunks(run, model_name, body, tokenizer, calling, echo))
        splitters = [PartSplitter(tokenizer) for _ in range(run.n)]
        for splitter in splitters:
            splitter.begin_with(echo)
        await until_disconnected(request, run.collect(lambda e: splitters[e.index].add(e.token_id, e.text)))
        choices = []
        for i, (parts, reason, infos) in enumerate(zip(splitters, run.finish_reasons, run.logprobs)):
            message = response_message(parts)
            if calling is not None:
                message, reason = calling.reply(parts.content, reason)
            choices.append(ChatChoice(index=i, message=message, finish_reason=reason,
                                      logprobs=chat_logprobs(tokenizer, infos) if body.logprobs else None))
        return json_response(ChatCompletion(id=run.id, created=run.created, model=model_name, choices=choices,
                                            usage=run.usage()))

    @app.post("/v1/responses", response_model=None)
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API: one chat turn (serving/api/responses.py)."""
        tokenizer = (await current()).tokenizer
        if body.max_output_tokens is not None and body.max_output_tokens > max_tokens_limit:
            raise bad_request(f"max_output_tokens is {body.max_output_tokens}, more than this server's limit of "
                              f"{max_tokens_limit}", param="max_output_tokens")
        chat, origins = body.as_chat()
        try:  # the chat route's checks, their errors named as this route names the fields
            calling = await asyncio.to_thread(tool_calling, chat)
            params = sampling_params(chat, tokenizer, end_of_turn(tokenizer), await request_grammar(chat, calling))
            prompt_ids = await asyncio.to_thread(chat_prompt, tokenizer, chat.messages, calling)
        except APIError as e:
            e.detail.param = responses_param(e.detail.param, origins)
            raise
        check_prompt_length(prompt_ids, "input")
        run = await start(engine, request, f"resp_{uuid.uuid4().hex}", prompt_ids, params, "input",
                          hidden_logprobs=frozenset(params.stop_token_ids))
        builder = ResponseBuilder(body, model_name, run, calling, tokenizer)
        if body.stream:
            return SSEResponse(run, response_events(builder))
        await until_disconnected(request, run.collect(builder.add))
        return json_response(builder.finished())

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        tokenizer = (await current()).tokenizer
        if body.requested_max_tokens == 0 and not body.echo:
            raise bad_request("max_tokens: 0 is only accepted with echo (which scores the prompt)",
                              param="max_tokens")
        params = sampling_params(body, tokenizer, [tokenizer.get_bos_token_id()],
                                 await request_grammar(body))
        if body.echo and body.logprobs is not None:
            params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
        prompt = body.prompt[0]
        if isinstance(prompt, str):
            prompt_ids = await asyncio.to_thread(tokenizer.encode, prompt, prepend="<|bos|>")
        else:
            check_token_ids(prompt, tokenizer, "prompt[0]")
            prompt_ids = prompt
        whole, prompt_ids = prompt_ids, await truncated(prompt_ids, body)
        check_prompt_length(prompt_ids, "prompt")
        run = await start(engine, request, f"cmpl-{uuid.uuid4().hex}", prompt_ids, params, "prompt",
                          score_only=body.scores_prompt_only)
        # the prompt run, as sent or, cut, as its tokens write it
        echo = Echo.of(tokenizer, prompt_ids, isinstance(prompt, str) and len(whole) == len(prompt_ids)) if body.echo else None
        if body.stream:
            return SSEResponse(run, completion_chunks(run, model_name, body, tokenizer, echo,
                                                      body.logprobs is not None))
        await until_disconnected(request, run.collect())
        choices = []
        for i, (text, reason, infos) in enumerate(zip(run.texts, run.finish_reasons, run.logprobs)):
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(tokenizer, infos, echo, run.prompt_logprobs[i])
            choices.append(CompletionChoice(index=i, text=(echo.text if echo else "") + text, finish_reason=reason,
                                            logprobs=logprobs))
        return json_response(Completion(id=run.id, created=run.created, model=model_name, choices=choices,
                                        usage=run.usage()))

    def check_token_ids(tokens: list[int], tokenizer: Tokenizer, param: str) -> None:
        for i, token in enumerate(tokens):
            if token >= tokenizer.vocab_size:
                raise bad_request(f"{param}[{i}] is {token}, not below the vocabulary's size {tokenizer.vocab_size}",
                                  param=f"{param}[{i}]")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise model_not_found(name)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        served = await current()
        tokenizer = served.tokenizer
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("Give either prompt or messages", param="prompt")
        if body.prompt is not None:
            prepend = "<|bos|>" if body.add_special_tokens else None
            tokens = await asyncio.to_thread(tokenizer.encode, body.prompt, prepend=prepend)
        else:
            calling = await asyncio.to_thread(tool_calling, body)
            continuing = continues_final_message(body, calling)
            tokens = await asyncio.to_thread(chat_prompt, tokenizer, body.messages, calling, continuing)
            if not (body.add_generation_prompt or continuing):
                tokens = tokens[:-1]  # the <|assistant_start|> render_for_completion ends with
        max_model_len = served.max_model_len or getattr(engine, "max_model_len", None)
        return TokenizeResponse(count=len(tokens), max_model_len=max_model_len, tokens=tokens)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        tokenizer = (await current()).tokenizer
        check_model(body.model)
        check_token_ids(body.tokens, tokenizer, "tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": package_version()}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return static_file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        return static_file(name)

    return app


def package_version() -> str:
    try:
        return importlib.metadata.version("nanochat")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def json_response(body: BaseModel) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------- prompts


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


# ---------------------------------------------------------------------------------------------- generation


def chat_logprobs(tokenizer: Tokenizer, infos: list[TokenInfo]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprob(**token_piece(tokenizer, i.token), logprob=i.logprob,
                     top_logprobs=[TopLogprob(**token_piece(tokenizer, t), logprob=lp) for t, lp in i.top])
        for i in infos])


def response_message(parts: PartSplitter) -> ResponseMessage:
    """A reply's message: its text, and all its parts when it called the calculator."""
    content_parts = [ContentPart(**part) for part in parts.parts] if parts.has_tool_parts else None
    return ResponseMessage(content=parts.content, content_parts=content_parts)


def piece_delta(piece: Piece) -> dict:
    """A streamed piece as a delta: text as OpenAI's content, a calculator part as our content_parts."""
    if piece.type == "text":
        return {"content": piece.text}
    return {"content_parts": [ContentPartDelta(index=piece.index, type=piece.type, text=piece.text)]}


def top_dict(tokenizer: Tokenizer, top: list[tuple[int, float]]) -> dict[str, float]:
    """The legacy shape's {token text: logprob}; of two tokens with the same text (a cut character shows
    as U+FFFD) the likelier one keeps the key."""
    found: dict[str, float] = {}
    for token, logprob in top:
        found.setdefault(token_piece(tokenizer, token)["token"], logprob)
    return found


@dataclass
class Echo:
    """An echoed prompt: its text, and where each of its tokens starts in it."""

    ids: list[int]
    text: str
    offsets: list[int]

    @classmethod
    def of(cls, tokenizer: Tokenizer, ids: list[int], added_bos: bool) -> Echo:
        """added_bos: ids[0] is the <|bos|> the server put before a text prompt, which shows no text (the
        text is then the prompt as sent); other special tokens show their names."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text, offsets = "", []
        for i, token in enumerate(ids):
            offsets.append(len(text))
            data = tokenizer.id_to_bytes(token)
            if data:
                text += decoder.decode(data)
            elif not (added_bos and i == 0):
                text += decoder.decode(b"", final=True) + tokenizer.decode([token])
        return cls(ids, text + decoder.decode(b"", final=True), offsets)


def completion_logprobs(tokenizer: Tokenizer, infos: list[TokenInfo], echo: Echo | None = None,
                        prompt: list[Logprobs | None] | None = None) -> CompletionLogprobs:
    """The generated tokens' entries, after the echoed prompt's (when echoed with its log-probabilities:
    prompt, one per prompt token) and offset by its text."""
    start = len(echo.text) if echo is not None else 0
    entries = [(i.token, i.logprob, top_dict(tokenizer, i.top), start + i.offset) for i in infos]
    if echo is not None and prompt is not None:
        entries = [(token, None if lp is None else lp[0], None if lp is None else top_dict(tokenizer, lp[1]), offset)
                   for token, lp, offset in zip(echo.ids, prompt, echo.offsets, strict=True)] + entries
    return CompletionLogprobs(tokens=[token_piece(tokenizer, token)["token"] for token, _, _, _ in entries],
                              token_logprobs=[lp for _, lp, _, _ in entries],
                              top_logprobs=[top for _, _, top, _ in entries],
                              text_offset=[offset for _, _, _, offset in entries])


@dataclass
class Run:
    """One request in the engine: its first events (already received) and the rest to come, in the lists
    the engine sends them in (a stream writes each list as one piece)."""

    id: str
    n: int
    prompt_tokens: int
    first: list[TokenEvent]
    events: AsyncGenerator[list[TokenEvent], None]
    created: int = field(default_factory=now)
    hidden_logprobs: frozenset[int] = frozenset()  # tokens whose log-probabilities are not shown (chat's ends)
    score_only: bool = False  # echo with max_tokens 0: the engine's one generated token is not the answer's
    texts: list[str] = field(init=False)
    finish_reasons: list[str | None] = field(init=False)
    completion_tokens: list[int] = field(init=False)
    cached_tokens: int = field(init=False, default=0)
    logprobs: list[list[TokenInfo]] = field(init=False)
    prompt_logprobs: list[list[Logprobs | None] | None] = field(init=False)

    def __post_init__(self) -> None:
        self.logprobs = [[] for _ in range(self.n)]
        self.prompt_logprobs = [None] * self.n
        self.texts = [""] * self.n
        self.finish_reasons = [None] * self.n
        self.completion_tokens = [0] * self.n

    async def batches(self) -> AsyncIterator[Iterator[TokenEvent]]:
        """Every event, in the engine's lists. Each event is recorded (texts, logprobs and the rest, which
        then stand as of that event) as the consumer reaches it, and comes as the response shows it."""
        yield (self._record(event) for event in self.first)
        async for batch in self.events:
            yield (self._record(event) for event in batch)

    async def collect(self, observe: Callable[[TokenEvent], object] | None = None) -> None:
        """Every event, each one also given to observe."""
        try:
            async for batch in self.batches():
                for event in batch:
                    if observe is not None:
                        observe(event)
        except Exception:
            # answered here rather than by the catch-all handler, after which uvicorn drops the connection
            log.exception("request %s failed", self.id)
            raise engine_failed() from None
        if "abort" in self.finish_reasons:  # only the engine shutting down aborts a request we still want
            raise unavailable("The server is shutting down: retry on another replica")

    async def close(self) -> None:
        await self.events.aclose()  # aborts the request in the engine if it is still running

    def usage(self) -> Usage:
        completion = sum(self.completion_tokens)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens))

    def _record(self, event: TokenEvent) -> TokenEvent:
        """Records the event, as the response shows it: without the log-probabilities of hidden tokens, and
        when scoring the prompt only, without the generated token (its text, log-probability and count)."""
        if event.prompt_logprobs is not None:
            self.prompt_logprobs[event.index] = event.prompt_logprobs
        if self.score_only:
            reason = event.finish_reason if event.finish_reason in (None, "abort") else "length"
            event = dataclasses.replace(event, text="", logprob=None, top_logprobs=None, completion_tokens=0,
                                        finish_reason=reason)
        elif event.token_id in self.hidden_logprobs:
            event = dataclasses.replace(event, logprob=None, top_logprobs=None)
        if event.token_id is not None and event.logprob is not None:
            self.logprobs[event.index].append(TokenInfo(event.token_id, event.logprob, event.top_logprobs or [],
                                                        len(self.texts[event.index])))
        self.texts[event.index] += event.text
        self.completion_tokens[event.index] = event.completion_tokens
        if event.index == 0:
            self.cached_tokens = event.cached_tokens
        if event.finish_reason is not None:
            self.finish_reasons[event.index] = event.finish_reason
        return event


async def start(engine: Engine, request: Request, request_id: str, prompt_ids: list[int], params: SamplingParams,
                prompt_param: str, *, hidden_logprobs: frozenset[int] = frozenset(), score_only: bool = False) -> Run:
    """Submit the request and wait for its first event, turning the engine's refusals into API errors.
    Whatever goes wrong here comes out of the event generator (or cancels it), which has then ended:
    nothing is left running in the engine. hidden_logprobs and score_only: see Run."""
    events = engine.generate_batches(request_id, prompt_ids, params)
    try:
        first = await until_disconnected(request, anext(events))
    except QueueFull:
        raise queue_full() from None
    except ValueError as e:  # the prompt does not fit the model's context
        raise bad_request(str(e), param=prompt_param) from None
    except RuntimeError as e:  # the engine is shut down, or its step failed
        log.warning("request %s refused: %s", request_id, e)
        raise unavailable("The engine is unavailable: retry shortly") from None
    except StopAsyncIteration:
        raise engine_failed() from None
    except Exception:
        log.exception("request %s failed", request_id)
        raise engine_failed() from None
    return Run(request_id, params.n, len(prompt_ids), first, events, hidden_logprobs=hidden_logprobs,
               score_only=score_only)


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """awaitable's result, unless the client disconnects first: then it is cancelled (which closes an
    engine stream it was reading) and ClientDisconnected raised."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait({work})  # let it unwind before anyone touches what it was reading
    if work.cancelled():
        raise ClientDisconnected()
    return work.result()


async def _disconnect(request: Request) -> None:
    # the body has been read: the only message left to receive is the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------------------------- streaming


class SSEResponse(StreamingResponse):
    """Server-sent events that close their run however the response ends: finished, failed, or
    cancelled by Starlette when the client disconnects (which leaves the body iterator suspended)."""

    def __init__(self, run: Run, chunks: AsyncGenerator[str, None]):
        super().__init__(_guarded(chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self.run.close()


def sse(data: BaseModel | str) -> str:
    """One server-sent event: a model as JSON, or a bare string ("[DONE]")."""
    return f"data: {data.model_dump_json() if isinstance(data, BaseModel) else data}\n\n"


async def _guarded(chunks: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
    """The chunks, and an error event in OpenAI's shape if producing them fails half-way (the status
    line has gone: an error event is the only way left to tell the client)."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception:
        log.exception("stream failed")
        yield sse(ErrorResponse(error=engine_failed().detail))
    finally:
        await chunks.aclose()


def shutting_down() -> str:
    """The event that ends a stream the engine aborted: "abort" is no finish reason OpenAI defines."""
    error = unavailable("The server is shutting down: the completion was cut short; retry on another replica")
    return sse(ErrorResponse(error=error.detail))


Choice = TypeVar("Choice", ChunkChoice, CompletionChoice)


async def event_stream(run: Run, render: Callable[[TokenEvent], list[Choice]],
                       merge: Callable[[Choice, Choice], Choice | None], chunk: Callable[[list[Choice]], str],
                       usage: Callable[[], str] | None) -> AsyncGenerator[str, None]:
    """The stream's events, each list the engine sent written as one piece (render gives an event's
    choices, each one SSE chunk), then the usage chunk (if asked) and [DONE]. Within a list, a choice's
    consecutive text pieces go out as one chunk where merge allows it: a list holds several tokens of a
    stream only when the ingress fell behind or serve.stream_interval_s holds them back, and then one
    chunk, not one per token, is what every hop and the client parse. An abort (the engine shutting
    down) ends the stream with an error event instead."""
    async for batch in run.batches():
        choices: list[Choice] = []
        aborted = False
        for event in batch:
            if event.finish_reason == "abort":
                aborted = True
                break
            choices += render(event)
        written = "".join(chunk([c]) for c in merged(choices, merge))
        if aborted:
            yield written + shutting_down()
            return
        if written:
            yield written
    if usage is not None:
        yield usage()
    yield sse("[DONE]")


def merged(choices: list[Choice], merge: Callable[[Choice, Choice], Choice | None]) -> list[Choice]:
    """choices with each choice's (index's) runs merged where merge(earlier, later) allows; the order of a
    choice's pieces is kept (those of different choices are independent streams)."""
    out: list[Choice] = []
    last: dict[int, int] = {}  # index -> position in out of its latest piece
    for choice in choices:
        at = last.get(choice.index)
        joined = merge(out[at], choice) if at is not None else None
        if joined is not None:
            out[at] = joined
        else:
            last[choice.index] = len(out)
            out.append(choice)
    return out


def merge_chat(earlier: ChunkChoice, later: ChunkChoice) -> ChunkChoice | None:
    """Two content deltas of a choice as one, or two deltas of a call's arguments, when neither carries
    log-probabilities or a finish reason (a calculator part, the role, a call's start and the finish stay
    chunks of their own, as OpenAI sends them)."""
    if (earlier.logprobs is not None or later.logprobs is not None or earlier.finish_reason is not None
            or later.finish_reason is not None):
        return None
    if earlier.delta.keys() == later.delta.keys() == {"content"}:
        return ChunkChoice(index=earlier.index, delta={"content": earlier.delta["content"] + later.delta["content"]})
    before, after = earlier.delta.get("tool_calls"), later.delta.get("tool_calls")
    if (earlier.delta.keys() == later.delta.keys() == {"tool_calls"} and len(before) == len(after) == 1
            and before[0].index == after[0].index and after[0].id is None):
        arguments = before[0].function.arguments + after[0].function.arguments
        call = before[0].model_copy(update={"function": before[0].function.model_copy(update={"arguments": arguments})})
        return ChunkChoice(index=earlier.index, delta={"tool_calls": [call]})
    return None


def merge_completion(earlier: CompletionChoice, later: CompletionChoice) -> CompletionChoice | None:
    """Two text pieces of a choice as one (the later one's finish reason with it), when neither carries
    log-probabilities: their text offsets are per token."""
    if earlier.logprobs is None and later.logprobs is None and earlier.finish_reason is None:
        return CompletionChoice(index=earlier.index, text=earlier.text + later.text, finish_reason=later.finish_reason)
    return None


async def chat_chunks(run: Run, model: str, body: SamplingRequest, tokenizer: Tokenizer,
                      calling: ToolCalling | None = None, echo: list[dict] | None = None) -> AsyncGenerator[str, None]:
    """chat.completion.chunk events: each choice's role, the echoed parts (if any), its content (or tool
    call) deltas, its finish_reason; then the usage (if asked) and [DONE]. With continuous usage every chunk
    carries the usage so far."""

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        usage = usage or (run.usage() if body.continuous_usage else None)
        return sse(ChatCompletionChunk(id=run.id, created=run.created, model=model, choices=choices, usage=usage))

    splitters = [PartSplitter(tokenizer) for _ in range(run.n)]
    calls = [CallStream(calling) for _ in range(run.n)] if calling is not None else None

    def render_call(event: TokenEvent, stream: CallStream) -> list[ChunkChoice]:
        written = []
        logprobs = chat_logprobs(tokenizer, run.logprobs[event.index][-1:]) if event.logprob is not None else None
        delta = stream.add(event.text)
        if delta is not None or logprobs is not None:
            written.append(ChunkChoice(index=event.index, delta=delta or {}, logprobs=logprobs))
        if event.finish_reason is not None:
            delta, reason = stream.finish(event.finish_reason)
            if delta is not None:  # a reply cut before its first call: its text
                written.append(ChunkChoice(index=event.index, delta=delta))
            written.append(ChunkChoice(index=event.index, delta={}, finish_reason=reason))
        return written

    def render(event: TokenEvent) -> list[ChunkChoice]:
        if calls is not None:
            return render_call(event, calls[event.index])
        written = []
        pieces = splitters[event.index].add(event.token_id, event.text)
        logprobs = chat_logprobs(tokenizer, run.logprobs[event.index][-1:]) if event.logprob is not None else None
        for j, piece in enumerate(pieces):
            token_logprobs = logprobs if j == len(pieces) - 1 else None  # the token's: with the part it went to
            if piece.text or piece.type != "text" or token_logprobs is not None:
                written.append(ChunkChoice(index=event.index, delta=piece_delta(piece), logprobs=token_logprobs))
        if event.finish_reason is not None:
            written.append(ChunkChoice(index=event.index, delta={}, finish_reason=event.finish_reason))
        return written

    for index in range(run.n):
        opening = calls[index].opening() if calls is not None else {"role": "assistant", "content": ""}
        yield chunk([ChunkChoice(index=index, delta=opening)])
        for piece in splitters[index].begin_with(echo or []):
            yield chunk([ChunkChoice(index=index, delta=piece_delta(piece))])
    async for piece in event_stream(run, render, merge_chat, chunk,
                                    (lambda: chunk([], run.usage())) if body.include_usage else None):
        yield piece


async def completion_chunks(run: Run, model: str, body: SamplingRequest, tokenizer: Tokenizer, echo: Echo | None,
                            logprobs_wanted: bool) -> AsyncGenerator[str, None]:
    """text_completion events: text pieces (each choice's first one after the echoed prompt and its
    log-probabilities, if asked), each choice's finish_reason; then the usage (if asked) and [DONE]. With
    continuous usage every chunk carries the usage so far."""

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        usage = usage or (run.usage() if body.continuous_usage else None)
        return sse(Completion(id=run.id, created=run.created, model=model, choices=choices, usage=usage))

    echoed: set[int] = set()

    def render(event: TokenEvent) -> list[CompletionChoice]:
        text, infos, first = event.text, [], echo is not None and event.index not in echoed
        if event.logprob is not None:
            infos = run.logprobs[event.index][-1:]
        if first:
            echoed.add(event.index)
            text = echo.text + text
        logprobs = None
        if logprobs_wanted and (infos or first):
            logprobs = completion_logprobs(tokenizer, infos, echo, run.prompt_logprobs[event.index] if first else None)
        if text or event.finish_reason is not None or logprobs is not None:
            return [CompletionChoice(index=event.index, text=text, finish_reason=event.finish_reason,
                                     logprobs=logprobs)]
        return []

    async for piece in event_stream(run, render, merge_completion, chunk,
                                    (lambda: chunk([], run.usage())) if body.include_usage else None):
        yield piece


# ---------------------------------------------------------------------------------------------- the rest


GUARDED_PATHS = ("/tokenize", "/detokenize")  # besides /v1/: they use the model's tokenizer


class APIKeyMiddleware:
    """Refuses /v1/ requests without `Authorization: Bearer <key>` for one of keys (compared in
    constant time), before routing or body parsing."""

    def __init__(self, app: ASGIApp, keys: list[str]):
        self.app = app
        self.keys = [key.encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        guarded = path == "/v1" or path.startswith("/v1/") or path in GUARDED_PATHS
        if scope["type"] == "http" and guarded and not self._authorized(scope):
            await invalid_api_key().response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        # check every key, so the time taken does not tell which one came close
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return scheme.lower() == b"bearer" and any(matches)


def static_file(name: str) -> Response:
    """A file of the web UI, with its content type and the hardening headers."""
    content_type = CONTENT_TYPES.get(Path(name).suffix)
    path = STATIC_DIR / name
    if content_type is None or name.startswith(".") or path.parent != STATIC_DIR:
        raise APIError(404, f"No such file: {name}", code="not_found")
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        if name == "index.html":
            raise unavailable("The web UI is not installed (serving/static/index.html is missing)") from None
        raise APIError(404, f"No such file: {name}", code="not_found") from None
    return Response(content, headers={**UI_HEADERS, "Content-Type": content_type})
