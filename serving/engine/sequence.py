"""
One request's state as the engine sees it: its tokens, where their KV lives, and how far it has got.

Notable:
- No tensors: the scheduler and block manager work on these plain objects; the model runner reads
  token_ids, block_table (and window_table), num_cached_tokens and sampling to build its batch.
- token_ids holds the prompt followed by the generated tokens; the first num_prompt_tokens are the prompt.
- num_pending counts tokens sampled by a step still running on the device (async scheduling: the engine
  schedules the next step before it reads this one's tokens). They count in len(seq), so the scheduler and
  block manager plan the next step as if they were there, and are appended to token_ids when they arrive;
  everything that reads the tokens themselves (prefix-cache keys, stop checks, penalties) sees only those.
- num_cached_tokens counts the leading tokens whose KV is in the cache (prefix-cache hits plus what
  earlier steps computed). The next step computes token_ids[num_cached_tokens:], a chunk at a time
  while prefilling, one token while decoding. Preemption resets it to 0 (recompute).
- num_prompt_cache_hits counts the prompt tokens the prefix cache held when the sequence was first
  admitted (usage's cached_tokens); a recompute after preemption does not change it.
- SamplingParams validates on construction, so a bad request fails with a ValueError naming the field.
- a sequence that asks for prompt_logprobs needs logits at every prompt position: while it still does
  (scores_prompt), the prefix cache gives it no hits and the model runner computes those rows.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]

_next_id = itertools.count()


def _check_int(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; True as max_tokens is a client bug, not 1
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None  # None: no top-k filtering
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 keeps every token
    min_p: float = 0.0  # vLLM's: only tokens at least min_p times as likely as the most likely one; 0 keeps all
    seed: int | None = None  # per-request generator, so one request's output is reproducible
    max_tokens: int = 256  # generated tokens, not counting the prompt
    stop: list[str] = field(default_factory=list)  # stop strings: matched by the engine on the text
    include_stop_str_in_output: bool = False  # vLLM's: the text ends with the stop string that ended it
    stop_token_ids: list[int] = field(default_factory=list)  # the engine adds the end-of-turn tokens
    n: int = 1  # completions per prompt: the engine forks n sequences, which share the prompt's blocks
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely
    prompt_logprobs: int | None = None  # None: none; k: the same for each prompt token but the first (vLLM's)
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: times how often the token was generated so far
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to those tokens' logits
    repetition_penalty: float = 1.0  # vLLM's: > 1 discourages every token of the prompt and the output
    min_tokens: int = 0  # no stop token (nor stop string) before this many generated tokens (vLLM's)
    ignore_eos: bool = False  # vLLM's: the end-of-turn tokens neither end the reply nor are sampled
    banned_token_ids: list[int] = field(default_factory=list)  # never sampled (the engine's, for ignore_eos)
    allowed_token_ids: list[int] | None = None  # vLLM's: only these are sampled (None: any token)
    bad_words_ids: list[list[int]] = field(default_factory=list)  # vLLM's: token sequences never completed
    grammar: str | None = None  # structured output: an llguidance grammar the output follows (engine/grammar.py)
    priority: int = 0  # vLLM's: the request's place under the priority scheduling policy, lower first

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def needs_outputs(self) -> bool:
        """Whether the sampler reads the generated tokens (penalties, min_tokens, bad words of several tokens)."""
        return (self.penalized or self.min_tokens > 0 or self.repetition_penalty != 1.0
                or any(len(word) > 1 for word in self.bad_words_ids))

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise ValueError(f"top_p must be a number, got {self.top_p!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("n", self.n, 1)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list):
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        for token_id in self.stop_token_ids:
            _check_int("each of stop_token_ids", token_id, 0)
        for token_id in self.banned_token_ids:
            _check_int("each of banned_token_ids", token_id, 0)
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must hold at least one token (None allows every token)")
            for token_id in self.allowed_token_ids:
                _check_int("each of allowed_token_ids", token_id, 0)
        for word in self.bad_words_ids:
            if not isinstance(word, list) or not word:
                raise ValueError(f"each of bad_words_ids must be a non-empty list of token ids, got {word!r}")
            for token_id in word:
                _check_int("each token of bad_words_ids", token_id, 0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not 0.0 < rp <= 2.0:
            raise ValueError(f"repetition_penalty must be a number in (0, 2], got {rp!r}")
        _check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ValueError(f"priority must be an integer, got {self.priority!r}")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError(f"grammar must be a serialised llguidance grammar (a str), got {self.grammar!r}")
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id to bias, got {self.logit_bias!r}")
        for token_id, bias in self.logit_bias.items():
            _check_int("each token id of logit_bias", token_id, 0)
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{token_id}] must be a number in [-100, 100], got {bias!r}")


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: two requests with the same prompt are different sequences
class Sequence:
    token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    id: int = field(default_factory=lambda: next(_next_id))
    arrival_time: float = field(default_factory=time.monotonic)
    num_prompt_tokens: int = field(init=False)
    status: SequenceStatus = field(default=SequenceStatus.WAITING, init=False)
    block_table: list[int] = field(default_factory=list, init=False)  # physical block of each logical one
    # the window layers' blocks, when they have a pool of their own: -1 for those behind the window
    window_table: list[int] = field(default_factory=list, init=False)
    block_hashes: list[bytes] = field(default_factory=list, init=False)  # prefix-cache keys of its full blocks
    num_cached_tokens: int = field(default=0, init=False)
    num_pending: int = field(default=0, init=False)  # sampled, still on the device (module docstring)
    num_prompt_cache_hits: int | None = field(default=None, init=False)  # None until first admitted
    finish_reason: FinishReason | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.token_ids = list(self.token_ids)  # ours to append to; the caller's list stays untouched
        self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def scores_prompt(self) -> bool:
        """Whether its prompt's log-probabilities are still to be computed: asked for, and not delivered
        yet (they come with the first generated token)."""
        return self.sampling.prompt_logprobs is not None and self.num_output_tokens == 0
