"""
The request and response bodies of the OpenAI-compatible API, as pydantic models in OpenAI's shapes.

Notable:
- requests validate strictly: a string is not a number, true is not 1, NaN and Infinity are not
  temperatures. A bad field fails with its location, which errors.py turns into OpenAI's `param`.
- no field is silently ignored. Every field OpenAI defines is honoured, or accepted only with the value
  that means "off" (`tools` [], `best_of` 1, ...) and otherwise refused with a 400 naming it (REFUSED says why for each). A field OpenAI does not define is a
  400 too ("Unrecognized request argument supplied", as OpenAI answers), unless it is one of our
  extensions (`top_k`, `min_p`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `repetition_penalty`,
  `structured_outputs`): a client that sends vLLM's other extensions learns at once that they do nothing
  here.
- an explicit null is the field's default, as OpenAI takes it (`"temperature": null` is 1).
- the `developer` role is the `system` role (OpenAI's newer name for it).
- assistant messages a client sends back as it got them (with `refusal`, `tool_calls`, ... null) are
  accepted; those fields with a value are refused.
- the built-in calculator's calls and outputs come back in `content_parts`, our extension of the message
  and of the streamed delta (serving/api/parts.py says why not `tool_calls`); an assistant message sent
  back with them is rendered part by part, as in training. A client's functions (`tools`, `tool_choice`)
  are called when tool_choice forces a call (serving/api/tools.py); the deprecated `functions` and
  `function_call` are refused.
- OpenAI's either-or fields (`stop`: a string or a list, `content`: a string or a list of text parts,
  `prompt`: a string, a list of token ids, or a list of one of those) are normalised to the list form
  before validation, rather than typed as unions, so an error names the field ("stop[1]") instead of a
  union member.
- completions' `echo` with `logprobs` scores the prompt too (vLLM's prompt log-probabilities), and
  `max_tokens: 0` is accepted with `echo` (the prompt scored, nothing generated), as vLLM accepts it.
- `response_format` is OpenAI's shape: text, json_object, or json_schema {name, description, schema,
  strict}. Both routes take it (vLLM's completions do too). `strict` is accepted either way: the schema
  is always enforced; a json_schema without `schema` allows any JSON value.
- `top_k`, `min_p`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `repetition_penalty`,
  `include_stop_str_in_output`, `allowed_token_ids`, `bad_words`, `truncate_prompt_tokens`, `priority`,
  `return_tokens_as_token_ids` and `structured_outputs` (json, regex, choice, a Lark grammar or
  json_object), chat's `continue_final_message`, `add_generation_prompt` and `echo`, and completions'
  `use_beam_search` and `length_penalty` (serving/api/beam_search.py), are our
  extensions (vLLM's names; OpenAI has none). Chat's `max_completion_tokens` is OpenAI's newer name for
  `max_tokens`, and wins when both are given.
- responses are plain models dumped to JSON; streamed chunks are the same models, one per SSE event.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_N = 16  # completions per request: each is a sequence holding KV blocks
MAX_STOP = 4  # stop strings per request, OpenAI's limit
MAX_STOP_TOKEN_IDS = 64
MAX_BAD_WORDS = 64
MAX_PROMPTS = 64  # prompts per completion request (each with its n choices)
MAX_SEED = 2**63 - 1  # OpenAI's seed is an int64; torch's generators take it
MAX_CHOICES = 1024  # structured_outputs.choice's alternatives


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


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _prompts(value: Any) -> Any:
    """A completion's prompt: one text or one list of token ids becomes a list of one; a list of those
    is validated item by item afterwards."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(map(_is_token_id, value))):
        return [value]
    return value


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, str):
        return _unicode(value)
    if isinstance(value, list) and value and all(map(_is_token_id, value)):
        return value
    raise ValueError("should be a string or a non-empty list of token ids (integers >= 0)")


Prompt = Annotated[Any, AfterValidator(_prompt)]  # a text, or the token ids of one
StopString = Annotated[str, Field(min_length=1), AfterValidator(_unicode)]
StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOP)]


def _off(*values: Any) -> Any:
    """A check that a field holds one of values (compared by type too: False is not 0), i.e. is off."""
    return lambda value: any(type(value) is type(v) and value == v for v in values)


def _empty(value: Any) -> bool:
    return value in ([], {}) and isinstance(value, (list, dict))


# each field OpenAI defines that we do not implement: when its value is "off" and why it is refused otherwise
REFUSED: dict[str, tuple[Any, str]] = {
    "functions": (_empty, "functions is OpenAI's deprecated form of tools: send tools and tool_choice"),
    "function_call": (_off("none"), "function_call is OpenAI's deprecated form of tool_choice: send tools and "
                                    "tool_choice"),
    "audio": (lambda v: False, "audio output is not supported"),
    "modalities": (_off(["text"]), 'modalities: only ["text"] is supported'),
    "prediction": (lambda v: False, "prediction (predicted outputs) is not supported"),
    "store": (_off(False), "store is not supported: this server keeps no completions"),
    "metadata": (_empty, "metadata is only for stored completions, and this server keeps none"),
    "reasoning_effort": (lambda v: False, "reasoning_effort: this model does not reason before it answers"),
    "verbosity": (lambda v: False, "verbosity is not supported"),
    "web_search_options": (lambda v: False, "web search is not supported"),
    "service_tier": (_off("auto", "default"), 'service_tier: only "auto" and "default" are served'),
    "moderation": (lambda v: False, "moderation is not supported"),
    "prompt_cache_options": (_empty, "prompt_cache_options is not supported (the prefix cache is automatic)"),
    "prompt_cache_retention": (lambda v: False, "prompt_cache_retention is not supported"),
    "best_of": (_off(1), "best_of is not supported: only 1 is accepted (use n for several choices)"),
    "suffix": (_off(""), "suffix (insertion) is not supported"),
    "use_beam_search": (_off(False), "use_beam_search serves /v1/completions: a chat reply may call the calculator, "
                                     "which a beam search does not run"),
}
CHAT_REFUSED = [k for k in REFUSED if k not in ("best_of", "suffix")]
COMPLETION_REFUSED = ["best_of", "suffix"]
MAX_LOGIT_BIAS = 300  # entries
MAX_TOOLS = 128  # OpenAI's limit
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; 5 for completions' logprobs
MAX_COMPLETION_LOGPROBS = 5


def _refuse(cls: type, value: Any, info: ValidationInfo) -> Any:
    is_off, reason = REFUSED[info.field_name]
    if not is_off(value):
        raise ValueError(reason)
    return value


class StrictModel(BaseModel):
    """A request body or part of one."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        """OpenAI takes an explicit null as the field's default: drop it, so the default applies."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(StrictModel):
    include_usage: bool = False
    include_obfuscation: Literal[False] = False  # its padding field only hides lengths from an eavesdropper
    continuous_usage_stats: bool = False  # vLLM's: every chunk also carries the usage so far (with include_usage)

    @model_validator(mode="after")
    def _continuous_needs_usage(self) -> StreamOptions:
        if self.continuous_usage_stats and not self.include_usage:
            raise ValueError("continuous_usage_stats needs include_usage: true")
        return self


class JSONSchemaFormat(StrictModel):
    """response_format's json_schema, in OpenAI's shape."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule
    description: str | None = None  # accepted: OpenAI shows it to the model; the grammar does not need it
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # absent: any JSON value
    strict: bool | None = None  # accepted: the schema is always enforced


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema", and only with it')
        return self


class StructuredOutputs(StrictModel):
    """vLLM's structured_outputs extension: exactly one constraint on the reply."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")  # a JSON Schema (or its JSON text)
    regex: str | None = None  # the whole reply matches it (Rust regex syntax)
    choice: Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)] | None = None  # exactly one of them
    grammar: str | None = None  # a context-free grammar in Lark syntax (llguidance's), its rule `start` the reply
    json_object: bool | None = None  # any JSON object

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        if len(self.given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar and json_object, not "
                             f"{self.given or 'none'}")
        return self

    @property
    def given(self) -> list[str]:
        """The constraints given, by their names in the request."""
        return [name for name in ("json", "regex", "choice", "grammar", "json_object")
                if getattr(self, "json_" if name == "json" else name) not in (None, False)]


class SamplingRequest(StrictModel):
    """The parameters chat and text completions share."""

    model: str | None = None  # None: the served model (OpenAI requires it; vLLM does not)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)  # no stop token or stop string before this many tokens
    include_stop_str_in_output: bool = False  # the text ends with the stop string that ended it
    allowed_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = None  # only these
    # vLLM's: only the prompt's last k tokens are run (left truncation); -1: as many as the context holds
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    priority: int = 0  # vLLM's: the request's place in the engine's queue under priority scheduling, lower first
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs write each token as "token_id:<id>"
    bad_words: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_BAD_WORDS)] = []  # never written
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # only tokens at least min_p times as likely as the likeliest
    ignore_eos: bool = False  # the end-of-turn tokens neither end the reply nor are sampled (benchmarks)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)  # > 1 discourages every token seen (prompt too)
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] = []
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Annotated[StopStrings | None, BeforeValidator(_one_or_many)] = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # token id (a decimal string, as JSON keys are) -> bias added to its logit
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS)] = {}
    user: str | None = None  # accepted: an end-user id for abuse tracking; we keep no per-user state
    safety_identifier: str | None = None  # the same, OpenAI's newer name
    prompt_cache_key: str | None = None  # accepted: a routing hint; our prefix cache needs none
    response_format: ResponseFormat | None = None  # None: text
    structured_outputs: StructuredOutputs | None = None  # vLLM's extension; not with response_format

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field requested_max_tokens came from, for an error to name."""
        return "max_tokens"

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float]) -> dict[str, float]:
        for key in value:
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be token ids, got {key!r}")
        return value

    @property
    def num_logprobs(self) -> int | None:
        """The engine's SamplingParams.logprobs: None for none, k for k top tokens at each position."""
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Whether every chunk carries the usage so far (vLLM's continuous_usage_stats)."""
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class TextPart(StrictModel):
    type: Literal["text"]
    text: Text


class MessagePart(StrictModel):
    """A part of an assistant message as the API returned it in content_parts (serving/api/parts.py)."""

    type: Literal["text", "python", "python_output"]
    text: Text


class FunctionCall(StrictModel):
    name: str
    arguments: str  # JSON text of the arguments object, as the model wrote it


class ToolCall(StrictModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments object; None: no arguments
    strict: bool | None = None  # accepted: the arguments always follow the schema


class FunctionTool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


TOOL_CHOICE_MODES = ("none", "auto", "required")


def tool_choice_check(named: type[StrictModel], shape: str) -> Callable[[Any], Any]:
    """tool_choice's check: a mode, or the function to call as a `named` model (written `shape` in the error).
    One type, not a union, so that an error names tool_choice itself."""

    def check(value: Any) -> str | StrictModel | None:
        if value is None or value in TOOL_CHOICE_MODES:
            return value
        if isinstance(value, dict):
            try:
                return named.model_validate(value)
            except ValidationError:
                pass
        raise ValueError(f'should be "none", "auto", "required" or {shape}')

    return check


ToolChoice = Annotated[Any, AfterValidator(tool_choice_check(NamedToolChoice,
                                                             '{"type": "function", "function": {"name": ...}}'))]


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[list[TextPart], BeforeValidator(_text_parts)]
    name: Any = None  # refused: the chat format has no participant names
    # an assistant message's text, calculator calls and outputs in order (our extension; see parts.py)
    content_parts: list[MessagePart] | None = None
    tool_calls: list[ToolCall] = []  # an assistant message's calls of the client's functions (serving/api/tools.py)
    tool_call_id: str | None = Field(None, validate_default=True)  # a tool message's: the call it answers
    # what an assistant message we answered carries, sent back as is: accepted only when null (or empty)
    refusal: None = None
    function_call: None = None
    audio: None = None
    annotations: Annotated[list[Any], Field(max_length=0)] = []

    @model_validator(mode="before")
    @classmethod
    def _content_from_parts(cls, data: Any) -> Any:
        """With content_parts, content may be left out or null (as OpenAI's with tool calls): it is then
        the text parts. With tool_calls and no parts, it may be null: no text."""
        if not isinstance(data, dict) or data.get("content") is not None:
            return data
        if isinstance(data.get("content_parts"), list):
            parts = data["content_parts"]
            return {**data, "content": "".join(p.get("text", "") for p in parts
                                               if isinstance(p, dict) and p.get("type") == "text"
                                               and isinstance(p.get("text"), str))}
        if data.get("tool_calls"):
            return {**data, "content": ""}
        return data

    @field_validator("name")
    @classmethod
    def _no_name(cls, value: Any) -> Any:
        raise ValueError("name is not supported: the chat format has no participant names")

    @field_validator("content_parts")
    @classmethod
    def _parts_match(cls, value: list[MessagePart] | None, info: ValidationInfo) -> list[MessagePart] | None:
        if value is None:
            return value
        if info.data.get("role") != "assistant":
            raise ValueError("only an assistant message has content parts (the calculator's calls and outputs)")
        content = info.data.get("content")
        text = "".join(part.text for part in value if part.type == "text")
        if content is not None and "".join(part.text for part in content) != text:
            raise ValueError("the text parts must add up to the message's content (or leave content out)")
        return value

    @field_validator("tool_calls")
    @classmethod
    def _assistant_calls(cls, value: list[ToolCall], info: ValidationInfo) -> list[ToolCall]:
        if value and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message has tool calls")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _answers_a_call(cls, value: str | None, info: ValidationInfo) -> str | None:
        if (value is None) == (info.data.get("role") == "tool"):
            raise ValueError("a tool message needs the tool_call_id of the call it answers, and only a tool "
                             "message has one")
        return value

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.content)

    @property
    def parts(self) -> list[dict]:
        """The content as parts {"type", "text"}: content_parts when given, else one text part."""
        if self.content_parts is None:
            return [{"type": "text", "text": self.text}]
        return [{"type": part.type, "text": part.text} for part in self.content_parts]

    @property
    def rendered_content(self) -> str | list[dict]:
        """The content as nanochat/tokenizer.py's conversations hold it: the parts when given, else the text."""
        return self.text if self.content_parts is None else self.parts


class _ChatRefused(StrictModel):
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    store: Any = None
    metadata: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    moderation: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    use_beam_search: Any = None

    _refused = field_validator(*CHAT_REFUSED)(classmethod(_refuse))


class _CompletionRefused(StrictModel):
    best_of: Any = None
    suffix: Any = None

    _refused = field_validator(*COMPLETION_REFUSED)(classmethod(_refuse))


class ChatCompletionRequest(_ChatRefused, SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    # None: "auto" with tools, "none" without (OpenAI's defaults); serving/api/tools.py says what each does
    tool_choice: ToolChoice = None
    parallel_tool_calls: bool | None = None  # with tool_choice "required": false allows one call only
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens, which it wins over
    # vLLM's: the reply goes on with the final (assistant) message, as far as it is written, rather than
    # starting a new one; echo begins the reply with that message. add_generation_prompt false goes only
    # with it: this format's reply opens with <|assistant_start|>, which the generation prompt is
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    echo: bool = False
    logprobs: bool = False  # each content token's log-probability
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # and the most likely tokens at each

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):  # 0 asks for nothing: accepted
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class CompletionRequest(_CompletionRefused, SamplingRequest):
    # a text or its token ids, or a list of those (each prompt's n choices in turn)
    prompt: Annotated[list[Prompt], BeforeValidator(_prompts), Field(min_length=1, max_length=MAX_PROMPTS)]
    echo: bool = False  # the prompt before the completion (and with logprobs, the prompt's log-probabilities)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)  # top tokens' log-probabilities too
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo (the route checks): score the prompt only
    use_beam_search: bool = False  # vLLM's: the n best of a beam search n wide, instead of n samples
    length_penalty: float = 1.0  # vLLM's: a beam's score is its log-probability over its length ** length_penalty

    @property
    def scores_prompt_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its log-probabilities), no completion."""
        return self.echo and self.requested_max_tokens == 0

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


# ---------------------------------------------------------------------------------------------- responses


def now() -> int:
    return int(time.time())


FinishReason = Literal["stop", "length", "tool_calls"]  # of OpenAI's set, the ones this server ends a choice with


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV the prefix cache already held


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    bytes: list[int] | None  # the token's exact UTF-8 bytes (None: a special token, which has no text)
    logprob: float


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token, which nothing predicts
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]  # where each token's text starts in the choice's text


def _unset(value: Any) -> bool:
    return value is None


class ContentPart(BaseModel):
    """A part of a reply: text, a calculator call the model wrote, or the output the server fed back."""

    type: Literal["text", "python", "python_output"]
    text: str


class ContentPartDelta(BaseModel):
    """A streamed piece of a reply's part `index` (its place in the message's content_parts)."""

    index: int
    type: Literal["text", "python", "python_output"]
    text: str


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # the text parts: the calculator's calls and outputs are in content_parts; None: calls
    refusal: None = None  # OpenAI's schema requires it (null: the model did not refuse)
    # our extension, only when the reply called the calculator: every part in order (serving/api/parts.py)
    content_parts: list[ContentPart] | None = Field(None, exclude_if=_unset)
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=_unset)


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = Field(None, exclude_if=_unset)  # in a call's first delta
    arguments: str


class ToolCallDelta(BaseModel):
    """A piece of a streamed tool call: its first carries the id, type and name, the rest more arguments."""

    index: int  # the call's place among the choice's calls
    id: str | None = Field(None, exclude_if=_unset)
    type: Literal["function"] | None = Field(None, exclude_if=_unset)
    function: FunctionDelta


class ChunkChoice(BaseModel):
    index: int
    # {"role": "assistant", "content": ""} first, then {"content": ...} or (a calculator call or output)
    # {"content_parts": [ContentPartDelta]}, and {} with the finish_reason; with tools, {"tool_calls": [...]}
    # (serving/api/tools.py)
    delta: dict[str, str | None | list[ContentPartDelta] | list[ToolCallDelta]]
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # the last chunk's, with stream_options.include_usage (every one's, continuous)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


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
    max_model_len: int | None = None  # vLLM's: the most tokens a prompt and its reply may hold together


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(StrictModel):
    """vLLM's /tokenize: a prompt (as /v1/completions reads it) or messages (as /v1/chat/completions)."""

    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    # messages: the functions, shown to the model when tool_choice forces a call (serving/api/tools.py)
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice = None
    parallel_tool_calls: bool | None = None  # accepted as on the chat route: it shapes the call, not the prompt
    add_special_tokens: bool = True  # prompt: the <|bos|> the completions put before it
    add_generation_prompt: bool = True  # messages: end with <|assistant_start|>, as the chat completions do
    continue_final_message: bool = False  # messages: end where the final (assistant) message does


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None  # None: the engine does not say
    tokens: list[int]


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
