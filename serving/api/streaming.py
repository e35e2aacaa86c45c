"""
A request in the engine (Run) and its answer: collected whole, or streamed as server-sent events.

Notable:
- a request's fate is decided before its first byte: start() waits for the engine's first event, so a full
  queue (QueueFull) is a 429 and a prompt the context cannot hold (ValueError) a 400, never a stream that
  breaks off. Errors are OpenAI-shaped (errors.py).
- a client that goes away stops its generation. While the route waits (for the first event, or for the
  whole completion when not streaming) it also listens for the disconnect and cancels the wait; once
  streaming, Starlette cancels the stream on disconnect and SSEResponse closes the event generator
  whatever happened, which aborts the request in the engine and frees its KV blocks.
- a stream writes each list of events the engine sends (one step's, or several) as one piece, and a
  choice's consecutive text within one list as one chunk (not one per token): with many concurrent
  streams on few cores, fewer writes through the server (and Ray Serve's proxy) and fewer chunks for the
  client to parse per token.
- usage counts the prompt's tokens and, summed over the n choices, the generated ones, stop tokens and
  the calculator's forced tokens included; prompt_tokens_details.cached_tokens is how many of the
  prompt's tokens the engine's prefix cache held (first choice's count: the others share its blocks).
- a stream only ever ends a choice with OpenAI's finish reasons. A request the engine aborts while
  streaming (the replica shutting down) ends with an error event in OpenAI's shape (code "unavailable",
  no [DONE]); the official client raises it as an APIError. Unstreamed, the same case is a 503.
- the calculator: a chat reply is cut into text, call and output parts (parts.py); `content` holds the
  text, and a reply that called the tool also has `content_parts`, streamed as deltas of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from nanochat.tokenizer import Tokenizer
from serving.api.errors import ClientDisconnected, bad_request, engine_failed, queue_full, unavailable
from serving.api.logprobs import Echo, TokenInfo, chat_logprobs, completion_logprobs
from serving.api.parts import PartSplitter, Piece
from serving.api.schemas import (
    ChatCompletionChunk,
    ChunkChoice,
    Completion,
    CompletionChoice,
    ContentPart,
    ContentPartDelta,
    ErrorResponse,
    PromptTokensDetails,
    ResponseMessage,
    SamplingRequest,
    Usage,
    now,
)
from serving.api.tools import CallStream, ToolCalling
from serving.engine.async_engine import QueueFull
from serving.engine.llm_engine import Logprobs, TokenEvent
from serving.engine.sequence import SamplingParams

log = logging.getLogger(__name__)

T = TypeVar("T")


class Engine(Protocol):
    """What the API needs of an engine: AsyncEngine's generate_batches() and alive()."""

    def generate_batches(self, request_id: str, prompt_ids: list[int],
                         params: SamplingParams) -> AsyncGenerator[list[TokenEvent], None]: ...

    def alive(self) -> bool | Awaitable[bool]: ...


def response_message(parts: PartSplitter) -> ResponseMessage:
    """A reply's message: its text, and all its parts when it called the calculator."""
    content_parts = [ContentPart(**part) for part in parts.parts] if parts.has_tool_parts else None
    return ResponseMessage(content=parts.content, content_parts=content_parts)


def piece_delta(piece: Piece) -> dict:
    """A streamed piece as a delta: text as OpenAI's content, a calculator part as our content_parts."""
    if piece.type == "text":
        return {"content": piece.text}
    return {"content_parts": [ContentPartDelta(index=piece.index, type=piece.type, text=piece.text)]}


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


class Runs:
    """The runs of a completion's prompts (OpenAI takes a list of them), answered as one: choice p * n + i is
    prompt p's choice i, as OpenAI orders them, and the usage is their sum. The runs go on side by side; a
    stream interleaves their events as they come."""

    def __init__(self, runs: list[Run]):
        self.runs = runs
        self.id, self.created = runs[0].id, runs[0].created
        self.per_prompt = runs[0].n
        self.n = sum(run.n for run in runs)

    @property
    def texts(self) -> list[str]:
        return [text for run in self.runs for text in run.texts]

    @property
    def finish_reasons(self) -> list[str | None]:
        return [reason for run in self.runs for reason in run.finish_reasons]

    @property
    def logprobs(self) -> list[list[TokenInfo]]:
        return [infos for run in self.runs for infos in run.logprobs]

    @property
    def prompt_logprobs(self) -> list[list[Logprobs | None] | None]:
        return [entries for run in self.runs for entries in run.prompt_logprobs]

    def usage(self) -> Usage:
        usages = [run.usage() for run in self.runs]
        return Usage(prompt_tokens=sum(u.prompt_tokens for u in usages),
                     completion_tokens=sum(u.completion_tokens for u in usages),
                     total_tokens=sum(u.total_tokens for u in usages),
                     prompt_tokens_details=PromptTokensDetails(
                         cached_tokens=sum(u.prompt_tokens_details.cached_tokens for u in usages)))

    def choice(self, index: int) -> tuple[Run, int]:
        """The run of choice `index` among all the choices, and its index in that run."""
        return self.runs[index // self.per_prompt], index % self.per_prompt

    async def collect(self) -> None:
        """Every event of every run; should one fail (or the wait be cancelled), the others stop too, which
        aborts their requests."""
        await side_by_side([run.collect() for run in self.runs])

    async def batches(self) -> AsyncIterator[Iterator[TokenEvent]]:
        """Every run's lists as they come, each event's index made its place among all the choices. A run's
        list is handed on as it is, so its events are still recorded as the consumer reaches them."""
        if len(self.runs) == 1:
            async for batch in self.runs[0].batches():
                yield batch
            return
        arrived: asyncio.Queue[tuple[int, Iterator[TokenEvent] | BaseException | None]] = asyncio.Queue()

        async def pump(p: int, run: Run) -> None:
            try:
                async for batch in run.batches():
                    await arrived.put((p, batch))
            except Exception as e:  # noqa: BLE001 - raised where the lists are read
                await arrived.put((p, e))
            await arrived.put((p, None))

        pumps = [asyncio.create_task(pump(p, run)) for p, run in enumerate(self.runs)]
        try:
            running = len(pumps)
            while running:
                p, batch = await arrived.get()
                if batch is None:
                    running -= 1
                elif isinstance(batch, BaseException):
                    raise batch
                else:
                    yield (dataclasses.replace(e, index=p * self.per_prompt + e.index) for e in batch)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def close(self) -> None:
        for run in self.runs:
            await run.close()


async def side_by_side(awaitables: list[Awaitable[T]]) -> list[T]:
    """The results of awaitables, run side by side; should one fail (or the wait be cancelled), the others are
    cancelled and waited for, so none goes on alone."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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


class SSEResponse(StreamingResponse):
    """Server-sent events that close their run however the response ends: finished, failed, or
    cancelled by Starlette when the client disconnects (which leaves the body iterator suspended)."""

    def __init__(self, run: Run | Runs, chunks: AsyncGenerator[str, None]):
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


async def event_stream(run: Run | Runs, render: Callable[[TokenEvent], list[Choice]],
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
        logprobs = (chat_logprobs(tokenizer, run.logprobs[event.index][-1:], body.return_tokens_as_token_ids)
                    if event.logprob is not None else None)
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
        logprobs = (chat_logprobs(tokenizer, run.logprobs[event.index][-1:], body.return_tokens_as_token_ids)
                    if event.logprob is not None else None)
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


async def completion_chunks(run: Runs, model: str, body: SamplingRequest, tokenizer: Tokenizer,
                            echoes: list[Echo] | None, logprobs_wanted: bool) -> AsyncGenerator[str, None]:
    """text_completion events: text pieces (each choice's first one after its echoed prompt, echoes[p] of
    prompt p, and its log-probabilities, if asked), each choice's finish_reason; then the usage (if asked)
    and [DONE]. With continuous usage every chunk carries the usage so far."""

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        usage = usage or (run.usage() if body.continuous_usage else None)
        return sse(Completion(id=run.id, created=run.created, model=model, choices=choices, usage=usage))

    echoed: set[int] = set()

    def render(event: TokenEvent) -> list[CompletionChoice]:
        prompt_run, i = run.choice(event.index)  # the prompt's run holds the choice's log-probabilities
        echo = echoes[event.index // run.per_prompt] if echoes is not None else None
        text, infos, first = event.text, [], echo is not None and event.index not in echoed
        if event.logprob is not None:
            infos = prompt_run.logprobs[i][-1:]
        if first:
            echoed.add(event.index)
            text = echo.text + text
        logprobs = None
        if logprobs_wanted and (infos or first):
            logprobs = completion_logprobs(tokenizer, infos, echo, prompt_run.prompt_logprobs[i] if first else None,
                                           body.return_tokens_as_token_ids)
        if text or event.finish_reason is not None or logprobs is not None:
            return [CompletionChoice(index=event.index, text=text, finish_reason=event.finish_reason,
                                     logprobs=logprobs)]
        return []

    async for piece in event_stream(run, render, merge_completion, chunk,
                                    (lambda: chunk([], run.usage())) if body.include_usage else None):
        yield piece
