"""
The request and response bodies of the OpenAI-compatible API, as pydantic models in OpenAI's shapes.

Notable:
- requests validate strictly: a string is not a number, true is not 1, NaN and Infinity are not
  temperatures. A bad field fails with its location, which errors.py turns into OpenAI's `param`.
- fields OpenAI's clients may send that we do not use (frequency_penalty, logprobs, response_format, ...) are
  ignored, as vLLM does, so existing client code keeps working.
- OpenAI's either-or fields (`stop`: a string or a list, `content`: a string or a list of text parts,
  `prompt`: a string or a list of one) are normalised to the list form before validation, rather than
  typed as unions, so an error names the field ("stop[1]") instead of a union member.
- `top_k` is our extension (OpenAI has none); `max_completion_tokens` is OpenAI's newer name for
  `max_tokens`, and wins when both are given.
- responses are plain models dumped to JSON; streamed chunks are the same models, one per SSE event.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

MAX_N = 16  # completions per request: each is a sequence holding KV blocks
MAX_STOP = 4  # stop strings per request, OpenAI's limit
MAX_SEED = 2**63 - 1  # OpenAI's seed is an int64; torch's generators take it


def _unicode(value: str) -> str:
    """JSON can carry lone surrogates ("\\ud800"), which are no text: the tokenizer cannot encode them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("should be valid Unicode text (it has a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]  # a string the tokenizer will see


def _one_or_many(value: Any) -> Any:
    """A lone string becomes a list of one; the items of a list are validated afterwards."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, str):
        return [value]
    raise ValueError("should be a string or a list of strings")


def _text_parts(value: Any) -> Any:
    """Message content: a string is one text part; the parts of a list are validated afterwards."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    raise ValueError("should be a string or a list of text parts")


StopString = Annotated[str, Field(min_length=1), AfterValidator(_unicode)]
StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOP)]


class StrictModel(BaseModel):
    """A request body or part of one."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingRequest(StrictModel):
    """The parameters chat and text completions share."""

    model: str | None = None  # None: the served model (OpenAI requires it; vLLM does not)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Annotated[StopStrings | None, BeforeValidator(_one_or_many)] = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored: we keep no per-user state

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(StrictModel):
    type: Literal["text"]
    text: Text


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: Annotated[list[TextPart], BeforeValidator(_text_parts)]

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingRequest):
    # OpenAI also takes token ids and batches of prompts; we take one text
    prompt: Annotated[list[Text], BeforeValidator(_one_or_many), Field(min_length=1, max_length=1)]


# ---------------------------------------------------------------------------------------------- responses


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]  # {"role": "assistant"} first, then {"content": ...}, {} with the finish_reason
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only in the last chunk, when stream_options.include_usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A text completion, and also each streamed chunk of one (OpenAI uses the same object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanochat"
    step: int | None = None  # the served checkpoint's training step, when known (not an OpenAI field)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
