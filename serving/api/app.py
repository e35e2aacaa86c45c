"""
The OpenAI-compatible HTTP API and the web UI's files, as a plain FastAPI app over an AsyncEngine.

Notable:
- create_app takes anything with AsyncEngine's generate_batches() and alive() (a bool, or an awaitable one):
  the engine itself (tests, one process) or serving/deployments.py's handle on Ray Serve replicas. No Ray
  here, so the tests run it under uvicorn.
- what is served can change while the app runs: the routes ask `model` (a ServedModels) for the current
  tokenizer and checkpoint step on every request. Before any model exists it has none: /v1/models lists
  nothing and every route that needs the tokenizer answers 503 saying how to train one (/health stays 200).
- /health follows the engine: 503 once it has failed (a step raised) or is draining for shutdown, when new
  requests get a 503 with Retry-After too, while the requests in flight go on streaming.
- the request's prompt, end tokens and grammar: prompts.py; its run in the engine, collected or streamed,
  the usage and the disconnects: streaming.py; log-probabilities and completions' echo: logprobs.py; the
  calculator's parts: parts.py; function calls: tools.py.
- completions take a text (encoded after <|bos|>) or token ids (run as given). With echo and max_tokens 0
  only the prompt is scored (the engine runs one step, whose token is not returned: vLLM's way),
  finish_reason "length". A text completion's text keeps the calculator's call and output inline: the
  prompt is raw text, with no turns to hold parts.
- /v1/responses: OpenAI's Responses API, answered as the chat turn of the same messages (responses.py).
- /tokenize, /detokenize and /version follow vLLM's routes: a prompt or messages to the token ids the
  completions would run (and the engine's max_model_len), token ids back to text, the server's version.
  The first two need the served tokenizer (503 before a model exists) and, like /v1/, an API key when
  keys are set; /version needs neither.
- CORS (allowed_origins, vLLM's --allowed-origins): other sites' pages may call the API from a browser;
  the middleware is outside the API keys', so a preflight (which carries no key) is answered, and an
  answer, a 401 included, carries the headers that let the page read it.
- API keys: a pure ASGI middleware guards /v1/ (and the tokenizer routes) before the body is even parsed, so a caller without a key
  learns nothing about the API; /health and the UI stay open (the UI sends the key the user types).
- the UI is static files served with a strict Content-Security-Policy (the page has no inline script or
  style) and the usual hardening headers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.metadata
import inspect
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from nanochat.tokenizer import Tokenizer
from serving.api.beam_search import BeamSearch
from serving.api.errors import (
    APIError,
    bad_request,
    install_error_handlers,
    invalid_api_key,
    model_not_found,
    no_model,
    unavailable,
)
from serving.api.logprobs import Echo, chat_logprobs, completion_logprobs
from serving.api.parts import PartSplitter
from serving.api.prompts import (
    bad_words_ids,
    chat_prompt,
    continues_final_message,
    end_of_turn,
    request_grammar,
)
from serving.api.responses import ResponseBuilder, ResponsesRequest, response_events, responses_param
from serving.api.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    now,
)
from serving.api.streaming import (
    Engine,
    Run,
    Runs,
    SSEResponse,
    chat_chunks,
    completion_chunks,
    response_message,
    start,
    until_disconnected,
)
from serving.api.tools import tool_calling
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
# what a beam search request may say besides the prompt: the rest shapes sampling or streaming, which it has none of
BEAM_SEARCH_FIELDS = {"model", "prompt", "n", "max_tokens", "use_beam_search", "length_penalty", "stop_token_ids",
                      "truncate_prompt_tokens", "priority", "user", "safety_identifier", "prompt_cache_key"}


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
               max_tokens_limit: int = 1024, priority_scheduling: bool = False,
               allowed_origins: list[str] | None = None) -> FastAPI:
    """The API over engine. model: the tokenizer of a model served for good, or a ServedModels whose model
    may come and change while the app runs. api_keys: when given, /v1/ needs `Authorization: Bearer <one
    of them>`. max_prompt_tokens and max_tokens_limit bound what one request may ask for (400 beyond).
    priority_scheduling: the engine orders its queue by each request's priority (else a priority is a 400).
    allowed_origins: other sites whose pages may call the API from a browser (CORS)."""
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None)  # the docs pages load scripts from a CDN
    install_error_handlers(app)
    if api_keys:
        app.add_middleware(APIKeyMiddleware, keys=api_keys)
    if allowed_origins:  # added last, so outermost: a browser's preflight carries no key, and is answered first
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    served: ServedModels = FixedModel(model) if model is None or isinstance(model, Tokenizer) else model

    async def current() -> ServedModel:
        found = await served.current()
        if found is None:
            raise no_model(served.hint, served.refused)
        return found

    def model_card(found: ServedModel) -> ModelCard:
        return ModelCard(id=model_name, created=found.created, step=found.step, max_model_len=context_length(found))

    def context_length(found: ServedModel) -> int | None:
        """The served model's longest context in the engine (None: not known)."""
        return found.max_model_len or getattr(engine, "max_model_len", None)

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
            longest = context_length(await current())
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
    @app.get("/ping")  # vLLM's (SageMaker's) name for it
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
                                      logprobs=chat_logprobs(tokenizer, infos, body.return_tokens_as_token_ids)
                                      if body.logprobs else None))
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
        prompts = await asyncio.gather(*(completion_prompt(body, tokenizer, p) for p in range(len(body.prompt))))
        if body.use_beam_search:
            return await beam_completion(body, request, tokenizer, [ids for ids, _ in prompts], params.max_tokens)
        runs = Runs(await start_all(request, f"cmpl-{uuid.uuid4().hex}", [ids for ids, _ in prompts], params,
                                    score_only=body.scores_prompt_only))
        echoes = [Echo.of(tokenizer, ids, added_bos) for ids, added_bos in prompts] if body.echo else None
        if body.stream:
            return SSEResponse(runs, completion_chunks(runs, model_name, body, tokenizer, echoes,
                                                       body.logprobs is not None))
        await until_disconnected(request, runs.collect())
        choices = []
        for i, (text, reason, infos) in enumerate(zip(runs.texts, runs.finish_reasons, runs.logprobs)):
            echo = echoes[i // runs.per_prompt] if echoes is not None else None
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(tokenizer, infos, echo, runs.prompt_logprobs[i],
                                               body.return_tokens_as_token_ids)
            choices.append(CompletionChoice(index=i, text=(echo.text if echo else "") + text, finish_reason=reason,
                                            logprobs=logprobs))
        return json_response(Completion(id=runs.id, created=runs.created, model=model_name, choices=choices,
                                        usage=runs.usage()))

    async def beam_completion(body: CompletionRequest, request: Request, tokenizer: Tokenizer,
                              prompts: list[list[int]], max_tokens: int) -> JSONResponse:
        """The n best beams of each prompt (serving/api/beam_search.py), prompt p's as choices p*n to p*n+n-1."""
        for name in sorted(body.model_fields_set - BEAM_SEARCH_FIELDS):
            if getattr(body, name) != CompletionRequest.model_fields[name].get_default(call_default_factory=True):
                raise bad_request(f"{name} does not apply to beam search, which scores with the model's own "
                                  "log-probabilities and answers whole", param=name)
        longest = context_length(await current())
        for p, ids in enumerate(prompts):
            if longest and len(ids) >= longest:
                raise bad_request(f"The prompt has {len(ids)} tokens: the model's context of {longest} leaves none to "
                                  "generate", param=prompt_param(len(prompts), p), code="context_length_exceeded")
        searches = [BeamSearch(body.n, min(max_tokens, longest - len(ids)) if longest else max_tokens,
                               body.length_penalty, frozenset([tokenizer.get_bos_token_id(), *body.stop_token_ids]),
                               body.priority)
                    for ids in prompts]
        found = await until_disconnected(request, asyncio.gather(*(
            search.run(engine, request, ids, prompt_param(len(prompts), p))
            for p, (search, ids) in enumerate(zip(searches, prompts, strict=True)))))
        choices, completion_tokens = [], 0
        for beams in found:
            for beam in beams:
                written = beam.tokens[:-1] if beam.finished else beam.tokens
                text = b"".join(tokenizer.id_to_bytes(t) for t in written).decode("utf-8", errors="replace")
                choices.append(CompletionChoice(index=len(choices), text=text,
                                                finish_reason="stop" if beam.finished else "length"))
                completion_tokens += len(beam.tokens)
        prompt_tokens = sum(map(len, prompts))
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens,
                      prompt_tokens_details=PromptTokensDetails(cached_tokens=0))
        return json_response(Completion(id=f"cmpl-{uuid.uuid4().hex}", created=now(), model=model_name,
                                        choices=choices, usage=usage))

    def prompt_param(count: int, p: int) -> str:
        """How an error names prompt p of count: "prompt" when it is the only one."""
        return "prompt" if count == 1 else f"prompt[{p}]"

    async def completion_prompt(body: CompletionRequest, tokenizer: Tokenizer, p: int) -> tuple[list[int], bool]:
        """Prompt p's tokens as they run, and whether they are its text after the <|bos|> the server put
        before it (an echo then shows the text as sent; token ids, or a prompt cut, show as their tokens)."""
        prompt = body.prompt[p]
        if isinstance(prompt, str):
            prompt_ids = await asyncio.to_thread(tokenizer.encode, prompt, prepend="<|bos|>")
        else:
            check_token_ids(prompt, tokenizer, f"prompt[{p}]")
            prompt_ids = prompt
        kept = await truncated(prompt_ids, body)
        check_prompt_length(kept, prompt_param(len(body.prompt), p))
        return kept, isinstance(prompt, str) and len(kept) == len(prompt_ids)

    async def start_all(request: Request, request_id: str, prompts: list[list[int]], params: SamplingParams,
                        score_only: bool) -> list[Run]:
        """A run for each prompt (the first has the request's id, the others it with their place), started
        side by side; should one be refused, the others are closed and the refusal is the answer."""
        ids = [request_id] + [f"{request_id}-{p}" for p in range(1, len(prompts))]
        started = await asyncio.gather(
            *(start(engine, request, ids[p], prompt, params, prompt_param(len(prompts), p), score_only=score_only)
              for p, prompt in enumerate(prompts)), return_exceptions=True)
        refused = [outcome for outcome in started if isinstance(outcome, BaseException)]
        if refused:
            for outcome in started:
                if isinstance(outcome, Run):
                    await outcome.close()
            raise refused[0]
        return started

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
        return TokenizeResponse(count=len(tokens), max_model_len=context_length(served), tokens=tokens)

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
