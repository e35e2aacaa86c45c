"""
The serving engine: requests in, token events out. LLMEngine is the synchronous core (one step = schedule,
run the model, sample, postprocess); serving/engine/async_engine.py steps it on a thread and serves it to
asyncio servers, and serving/engine/kv_cache_size.py sizes its KV cache.

Notable:
- a request with n choices is n sequences (one per choice index), each with its own torch.Generator:
  choice 0 is seeded with the request's seed, choice i > 0 with a seed derived from (seed, i), so a
  seeded request reproduces every choice and its choices differ. The prompt is computed once: choice 0
  prefills it and the others fork off it (serving/engine/scheduler.py), sampling their first token in
  the same step from the same logits and taking copies of its prompt logprobs.
- every request also stops at <|assistant_end|> and <|bos|> (end of turn, start of a new document),
  besides its own stop_token_ids; a stop token is reported as a token (no text, even for an ordinary
  token given in stop_token_ids) and counts as a completion token, like vLLM's EOS. min_tokens: the
  sampler keeps the stop tokens out until a choice has that many tokens, and stop strings only match
  from then on. ignore_eos (vLLM's): the end-of-turn tokens are no stop tokens and are never sampled, so
  the reply runs to max_tokens unless a stop string or one of its own stop_token_ids ends it.
- the context is bounded by max_model_len (the model's training sequence_len unless given, and never
  more than the KV cache holds): a prompt that leaves no room to generate is refused with a ValueError
  naming the limits; max_tokens is cut to the room the prompt leaves, and a choice that reaches the end
  of the context finishes with "length".
- incremental detokenisation: each token's exact bytes (tokenizer.id_to_bytes; special tokens have none)
  go through an incremental UTF-8 decoder, so only complete characters are emitted and a character
  split across tokens appears with its last token. Stop strings are matched on the decoded text; text
  that could still be the start of a stop string is held back until it cannot, so a stop string never
  reaches the client even in part. A matched stop string ends the choice ("stop"), the text cut just
  before it (or just after, with include_stop_str_in_output), and its blocks are freed at once.
- the calculator tool runs per choice, as in nanochat/generate.py: tokens between <|python_start|> and
  <|python_end|> go through safe_eval, and a result is forced as <|output_start|> result <|output_end|>.
  Forced tokens wait in the choice's queue and take the place of the sampled token, one per step: they
  are appended to the sequence like sampled ones, so the next step computes their KV like any token;
  they count as completion tokens and are streamed as text.
- a tool delimiter (<|python_start|>, <|python_end|>, <|output_start|>, <|output_end|>) is a boundary of
  the text: everything before it is sent with its event (no text held back for a stop string, a cut
  UTF-8 character flushed as U+FFFD) and no stop string matches across it, so the API can cut a reply
  into its text, tool call and tool output parts by these tokens alone.
- structured output (SamplingParams.grammar, serving/engine/grammar.py): each choice has its own matcher;
  a step masks the constrained rows' logits on the batch (unconstrained rows pay nothing), the matcher
  takes each token the choice appends, and the choice ends with "stop" as soon as its grammar is complete.
  The end-of-turn and stop tokens are allowed only where the grammar may end, and min_tokens cannot hold
  a completed grammar open. The grammar is compiled on the engine thread when the request is added: the
  API has already checked that it compiles, and a huge schema delays the running requests' next step.
- each event carries its choice's cached_tokens: the prompt tokens the prefix cache held at admission
  (whole blocks, never the prompt's last token), for usage's prompt_tokens_details.
- logprobs (SamplingParams.logprobs = k): each generated token's log-probability and the k most likely
  tokens', from the model's own distribution: log_softmax of the raw logits, before temperature, top-k
  and top-p (vLLM's default), so they do not depend on the sampling settings. Computed on the batch, for
  the rows that asked, and clamped at -9999 (JSON has no -inf). A stop token gets them too (an API that
  shows no end token drops them); a calculator token forced into the sequence gets the model's
  log-probability of it.
- prompt_logprobs (SamplingParams.prompt_logprobs = k, vLLM's): the same for every prompt token but the
  first (nothing predicts it: None), from the prefill's logits at the prompt positions, on the batch with
  the other rows; they come with the choice's first token event. Such a sequence takes no prefix cache
  hits until then (BlockManager), so every position is computed: cached_tokens is 0.
- abort(request_id) frees every block of the request at once; its "abort" final events come with the
  next step(), so a consumer sees every choice end.
- async scheduling (async_scheduling, vLLM's): step() schedules and launches the next step before it reads
  the tokens of the one launched by the call before, and returns that one's events; on a GPU the host's
  reading, detokenising, streaming and scheduling then overlap the device's step, which otherwise waits
  for them (the launch sends its inputs without waiting for the device: transfer.py). A sampled token is
  pending until read (sequence.py): the next step takes it from the device, or from the choice's calculator
  queue when a forced token will take the draw's place (a draw made meanwhile is dropped, so a seeded
  request that calls the calculator may draw differently from a sync engine afterwards). A choice whose
  sampling reads its own tokens on the host (a grammar's mask, penalties, min_tokens) has its step read
  before the next is scheduled; a choice that stops ends with the step it is read in, and the step
  launched meanwhile computed one token for nothing. On a CPU the step runs as it is launched, so there is
  nothing to overlap.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from nanochat.tools import safe_eval
from serving.engine.block_manager import BlockManager
from serving.engine.grammar import Grammars
from serving.engine.kv_cache_size import (
    free_memory,
    kv_cache_blocks,
    kv_cache_split,
    resolve_kv_memory_fraction,
)
from serving.engine.model_runner import (
    ModelRunner,
    PromptLogits,
    ServeAttention,
    ServeDtype,
    StepLogits,
    resolve_dtype,
    resolve_kv_dtype,
)
from serving.engine.sampler import TokenMask, make_generator, sample
from serving.engine.scheduler import ScheduledBatch, Scheduler, SchedulingPolicy
from serving.engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus
from serving.engine.transfer import to_device

if TYPE_CHECKING:
    from llguidance import LLMatcher

logger = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    """One generated token of one choice, or (token_id None) the end of that choice."""

    request_id: str
    index: int  # choice index, for n > 1
    token_id: int | None  # None on the final event
    text: str  # new text: "" while a character is incomplete or held back for a stop string, and on the end
    finish_reason: FinishReason | None  # set on the final event only
    prompt_tokens: int
    completion_tokens: int  # so far, for this choice
    cached_tokens: int = 0  # prompt tokens the prefix cache held when this choice was admitted
    logprob: float | None = None  # the token's log-probability, when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely tokens and theirs, likeliest first
    # on a choice's first token event when the request asked for prompt_logprobs: one entry per prompt
    # token, None for the first
    prompt_logprobs: list[Logprobs | None] | None = None


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request seeded with `seed`: choice 0 keeps it, so n=1 and the first
    of n choices agree; the others get a hash of (seed, index), unrelated to other requests' seeds."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes a non-negative 63-bit int


@dataclass(eq=False)
class _Choice:
    """Engine-side state of one sequence: detokenisation, stop strings and the calculator tool."""

    request_id: str
    index: int
    seq: Sequence
    generator: torch.Generator
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    text: str = ""  # everything decoded so far (cut at a stop string)
    emitted: int = 0  # characters of text already sent
    forced: deque[int] = field(default_factory=deque)  # calculator output waiting to be fed
    expr: list[int] | None = None  # tool call being written, None outside one
    floor: int = 0  # where text stood at the last tool delimiter: stop strings only match after it
    grammar: LLMatcher | None = None  # structured output: where the choice stands in its grammar
    prompt_logprobs: list[Logprobs | None] | None = None  # filled by position while the prompt is scored

    @property
    def samples_from_its_tokens(self) -> bool:
        """Whether its next draw reads its last token on the host (a grammar's mask, penalties, min_tokens),
        so no step of it can be scheduled before that token is known."""
        return self.grammar is not None or self.seq.sampling.needs_outputs


@dataclass(eq=False)
class _Step:
    """A step the model has, until its tokens are read: what it computes, whose tokens it samples (the
    choices of batch.sampled_seqs, in order), those tokens on the device, and what the host will read."""

    batch: ScheduledBatch
    choices: list[_Choice]
    logits: StepLogits
    tokens: torch.Tensor  # (N,) each sampled row's token: its draw, or its forced token when known at launch
    rows: dict[int, int]  # row of each sampled sequence, by id
    output: _StepOutput


@dataclass(eq=False)
class _LogprobTensors:
    """Log-probabilities of the rows that asked (wanted[row] = k): each one's token, and its k most likely
    tokens with theirs (topped up to the largest k), as tensors on the device until copied."""

    rows: list[int]
    ks: list[int]
    chosen: torch.Tensor  # (R,)
    top_values: torch.Tensor  # (R, max k)
    top_ids: torch.Tensor  # (R, max k)

    def to_host(self, copy: Callable[[torch.Tensor], torch.Tensor]) -> _LogprobTensors:
        return _LogprobTensors(self.rows, self.ks, copy(self.chosen), copy(self.top_values), copy(self.top_ids))

    def lists(self, n: int) -> list[Logprobs | None]:
        """Per row of n (None for those that did not ask): (log-probability, [(token, log-probability)])."""
        out: list[Logprobs | None] = [None] * n
        chosen, values, ids = self.chosen.tolist(), self.top_values.tolist(), self.top_ids.tolist()
        for j, (row, k) in enumerate(zip(self.rows, self.ks, strict=True)):
            out[row] = (chosen[j], list(zip(ids[j][:k], values[j][:k], strict=True)))
        return out


class _StepOutput:
    """What the host reads of a launched step (its tokens, and the log-probabilities asked for), copied to
    the host as the device produces them: on a GPU into pinned memory without waiting, with an event that
    read() waits for, so reading step k never waits for step k+1, launched meanwhile (a plain .tolist()
    would wait for every kernel queued)."""

    def __init__(self, tokens: torch.Tensor, sampled: _LogprobTensors | None, prompt: _LogprobTensors | None):
        self.event = torch.cuda.Event() if tokens.device.type == "cuda" else None

        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.to("cpu", non_blocking=True) if self.event is not None else t

        self.tokens = copy(tokens)
        self.sampled = sampled.to_host(copy) if sampled is not None else None
        self.prompt = prompt.to_host(copy) if prompt is not None else None
        if self.event is not None:
            self.event.record()

    def read(self) -> _StepOutput:
        if self.event is not None:
            self.event.synchronize()
        return self


@dataclass(frozen=True)
class RequestCheck:
    """What a request must fit: the engine's fixed limits, plain data, so the side that queues requests (a
    thread's or another process's) refuses a bad one before it reaches the engine."""

    vocab_size: int
    max_model_len: int
    end_of_turn: list[int]

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """The params the request's sequences run with (max_tokens cut to the context left, end-of-turn
        stop tokens added), or a ValueError saying what does not fit."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: it needs at least one token")
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size}), got {bad[0]!r}")
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, but the model's maximum context length "
                             f"is {self.max_model_len} tokens, including at least 1 to generate")
        ends = [t for t in self.end_of_turn if t not in params.stop_token_ids]
        # ignore_eos: the end-of-turn tokens are kept out rather than generated, as nothing after them would be
        # a reply of the chat format
        stops, banned = (params.stop_token_ids, ends) if params.ignore_eos else (params.stop_token_ids + ends, [])
        return dataclasses.replace(params, max_tokens=min(params.max_tokens, room), stop_token_ids=stops,
                                   min_tokens=min(params.min_tokens, room), banned_token_ids=banned)


def check_servable(model: GPT, tokenizer: Tokenizer) -> None:
    """A ValueError when tokenizer's tokens are not all the model's: what makes a checkpoint unservable
    whatever the engine's settings (a server checks it before it gives up the engine it has)."""
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the "
                         f"tokenizer's ({tokenizer.vocab_size})")


class LLMEngine:
    """Continuous-batching generation over a paged KV cache; every method runs on one thread."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, num_blocks: int, block_size: int = 16,
                 max_num_seqs: int = 16, max_num_batched_tokens: int = 512, device: torch.device | str = "cpu",
                 max_model_len: int | None = None, dtype: ServeDtype = "auto", enforce_eager: bool = False,
                 attention: ServeAttention = "auto", kv_cache_dtype: ServeDtype = "auto", hybrid_kv_cache: bool = True,
                 compile_decode: bool = False, async_scheduling: bool = False,
                 scheduling_policy: SchedulingPolicy = "fcfs"):
        """num_blocks: the KV cache's size, in blocks of every layer's keys and values for block_size tokens;
        hybrid_kv_cache: sliding-window layers keep only their window, in a pool of their own, when that
        leaves the full-context layers more blocks (kv_cache_split); async_scheduling: each step schedules
        and launches the next before it reads its own tokens (module docstring); scheduling_policy: fcfs, or
        priority, by each request's SamplingParams.priority (scheduler.py)."""
        check_servable(model, tokenizer)
        self.tokenizer = tokenizer
        split = kv_cache_split(model, num_blocks, block_size, max_num_seqs, max_num_batched_tokens,
                               max_model_len) if hybrid_kv_cache else None
        window, num_window_blocks = None, 0
        if split:
            logger.info("KV cache: the sliding-window layers keep only their %d-token window: %d blocks for the "
                        "full-context layers and %d for the window layers, in the memory of %d blocks of all layers",
                        split.window, split.num_full_blocks, split.num_window_blocks, num_blocks)
            window, num_window_blocks, num_blocks = split.window, split.num_window_blocks, split.num_full_blocks
        self.block_manager = BlockManager(num_blocks, block_size, window, num_window_blocks)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, scheduling_policy)
        # a sequence can never outgrow the cache, whatever the model would accept
        self.max_model_len = min(max_model_len or model.config.sequence_len, num_blocks * block_size)
        self.runner = ModelRunner(model, num_blocks, block_size, device, dtype, max_num_seqs=max_num_seqs,
                                  max_model_len=self.max_model_len, enforce_eager=enforce_eager,
                                  attention=attention, kv_cache_dtype=kv_cache_dtype,
                                  num_window_blocks=num_window_blocks, compile_decode=compile_decode)
        self.vocab_size = model.config.vocab_size
        sp = tokenizer.encode_special
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.tool_delimiters = frozenset({self.python_start, self.python_end, self.output_start, self.output_end})
        self.end_of_turn = [sp("<|assistant_end|>"), tokenizer.get_bos_token_id()]
        self.check = RequestCheck(self.vocab_size, self.max_model_len, self.end_of_turn)
        self.grammars = Grammars(tokenizer, self.vocab_size, self.end_of_turn)
        self.requests: dict[str, list[_Choice]] = {}  # unfinished choices of each request
        self.choices: dict[int, _Choice] = {}  # by sequence id
        self.pending: list[TokenEvent] = []  # final events of aborted choices, returned by the next step
        self.async_scheduling = async_scheduling
        self.in_flight: _Step | None = None  # launched by the last step(), tokens not read yet (async only)

    # ------------------------------------------------------------------ requests

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        return self.check.validate(prompt_ids, params)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} is already running")
        seq_params = self.validate(prompt_ids, params)
        matcher = None if params.grammar is None else self.grammars.matcher(params.grammar)
        choices = []
        for index in range(params.n):
            seq = Sequence(list(prompt_ids), seq_params)
            choices.append(_Choice(request_id, index, seq, make_generator(choice_seed(params.seed, index)),
                                   grammar=matcher if index == 0 or matcher is None else matcher.deep_copy()))
        self.scheduler.add(choices[0].seq, [c.seq for c in choices[1:]])
        for choice in choices:
            self.choices[choice.seq.id] = choice
        self.requests[request_id] = choices

    def abort(self, request_id: str) -> None:
        """Free the request's blocks now; its unfinished choices end with "abort" at the next step().
        An unknown or already finished request is ignored (its client may go just after the end)."""
        for choice in self.requests.pop(request_id, []):
            self.scheduler.abort(choice.seq.id)
            del self.choices[choice.seq.id]
            self.pending.append(self._event(choice, None, "", "abort"))

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.pending) or self.in_flight is not None

    # ------------------------------------------------------------------ the step

    def step(self) -> list[TokenEvent]:
        """Advance every scheduled sequence by one step; the token (and final) events it produced. With
        async scheduling the events are those of the step launched by the call before: this call schedules
        and launches the next step first, so the device computes it while the host reads the tokens."""
        events, self.pending = self.pending, []
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None and any(c.samples_from_its_tokens for c in in_flight.choices):
            events.extend(self._resolve(in_flight))
            in_flight = None
        batch = self.scheduler.schedule()
        launched = self._launch(batch, in_flight) if batch.num_tokens else None
        if in_flight is not None:
            events.extend(self._resolve(in_flight))
        if launched is not None and not self.async_scheduling:
            events.extend(self._resolve(launched))
        elif launched is not None:
            self.in_flight = launched
        return events

    def _launch(self, batch: ScheduledBatch, in_flight: _Step | None) -> _Step:
        """Run the batch's forward and draw its tokens, without waiting for the device."""
        choices = [self.choices[seq.id] for seq in batch.sampled_seqs]
        logits = self.runner.run(batch.prefills, batch.decodes, batch.block_copies,
                                 self._decode_tokens(batch.decodes, in_flight))
        tokens = self._draw(logits.sampled, choices)
        sampled = _logprob_tensors(logits.sampled, tokens, [c.seq.sampling.logprobs for c in choices])
        output = _StepOutput(tokens, sampled, _prompt_logprob_tensors(logits.prompt))
        self.scheduler.launched(batch)
        rows = {seq.id: i for i, seq in enumerate(batch.sampled_seqs)}
        return _Step(batch, choices, logits, tokens, rows, output)

    def _decode_tokens(self, decodes: list[Sequence], in_flight: _Step | None) -> torch.Tensor | None:
        """The decodes' input tokens on the device when some are pending (async scheduling): a pending one
        is in_flight's draw, or its choice's first forced token, which will take the draw's place."""
        if not any(seq.num_pending for seq in decodes):
            return None
        assert in_flight is not None and all(seq.num_pending <= 1 for seq in decodes)
        known, rows, sources = [], [], []
        for i, seq in enumerate(decodes):
            forced = self.choices[seq.id].forced
            if not seq.num_pending:
                known.append(seq.token_ids[-1])
            elif forced:
                known.append(forced[0])
            else:  # in_flight's draw
                known.append(0)
                rows.append(i)
                sources.append(in_flight.rows[seq.id])
        tokens = to_device(known, in_flight.tokens.device)
        if rows:
            tokens[to_device(rows, tokens.device)] = in_flight.tokens[to_device(sources, tokens.device)]
        return tokens

    def _draw(self, logits: torch.Tensor, choices: list[_Choice]) -> torch.Tensor:
        """Each choice's token, on the device: a sample, or its forced token when the choice's calculator
        output is known now (the queue holds more than its pending tokens will take), which draws nothing
        from its generator."""
        known = [c.forced[c.seq.num_pending] if len(c.forced) > c.seq.num_pending else None for c in choices]
        rows = [i for i, token in enumerate(known) if token is None]
        if not rows:
            return to_device(known, logits.device, torch.long)
        seqs = [choices[i].seq for i in rows]
        outputs = [seq.output_token_ids if seq.sampling.needs_outputs else [] for seq in seqs]
        prompts = [seq.token_ids[: seq.num_prompt_tokens] if seq.sampling.repetition_penalty != 1.0 else []
                   for seq in seqs]
        params, generators = [seq.sampling for seq in seqs], [choices[i].generator for i in rows]
        mask = self._grammar_mask([choices[i] for i in rows])
        if len(rows) == len(choices):
            return sample(logits, params, generators, outputs, prompts, mask)
        index = to_device(rows, logits.device)
        drawn = sample(logits.index_select(0, index), params, generators, outputs, prompts, mask)
        placeholders = [0 if token is None else token for token in known]
        return to_device(placeholders, logits.device, torch.long).index_copy(0, index, drawn)

    def _resolve(self, step: _Step) -> list[TokenEvent]:
        """Read a launched step's tokens (waiting for the device to finish that step, not the ones launched
        after it) and account for them: forced tokens in place of draws, logprobs, the scheduler's
        postprocess, text and stops. Choices that ended meanwhile (aborted, or stopped by the step before)
        are skipped."""
        output = step.output.read()
        tokens = output.tokens.tolist()
        logprobs = output.sampled.lists(len(tokens)) if output.sampled is not None else [None] * len(tokens)
        live = [i for i, c in enumerate(step.choices) if not c.seq.is_finished]
        for i in live:
            forced, wanted = step.choices[i].forced, step.choices[i].seq.sampling.logprobs
            if not forced:
                continue
            token = forced.popleft()
            if token != tokens[i]:  # forced since the launch: it replaces the draw
                tokens[i] = token
                if wanted is not None:  # rare (a calculator call with logprobs): computed now, waiting
                    logprobs[i] = _logprobs(step.logits.sampled[i : i + 1], [token], [wanted])[0]
        self._store_prompt_logprobs(step.logits.prompt, output.prompt)
        for chunk in step.batch.prefills:  # forks share their leader's prompt, hence its prompt logprobs
            for sib in chunk.forks:
                if not sib.is_finished and not chunk.seq.is_finished:
                    self.choices[sib.id].prompt_logprobs = self.choices[chunk.seq.id].prompt_logprobs
        choices = [step.choices[i] for i in live]
        live_tokens = [tokens[i] for i in live]
        completed = self._completed_grammars(choices, live_tokens)
        self.scheduler.postprocess(step.batch, tokens, completed)
        events = []
        for i, choice, token in zip(live, choices, live_tokens, strict=True):
            events.extend(self._advance(choice, token, logprobs[i]))
        return events

    def _store_prompt_logprobs(self, prompt: list[PromptLogits], found: _LogprobTensors | None) -> None:
        """Each scored prompt row's log-probabilities (_prompt_logprob_tensors, read) into its choice, by
        position; a sequence that ended meanwhile has none to keep."""
        if not prompt or found is None:
            return
        rows = iter(found.lists(sum(len(p.logits) for p in prompt)))
        for p in prompt:
            scored = [next(rows) for _ in range(len(p.logits))]
            if p.seq.is_finished:
                continue
            choice = self.choices[p.seq.id]
            if choice.prompt_logprobs is None:
                choice.prompt_logprobs = [None] * p.seq.num_prompt_tokens
            choice.prompt_logprobs[p.start + 1 : p.start + 1 + len(scored)] = scored

    def _grammar_mask(self, choices: list[_Choice]) -> TokenMask | None:
        """The allowed tokens of the choices that follow a grammar (None when none does)."""
        rows = [j for j, c in enumerate(choices) if c.grammar is not None]
        if not rows:
            return None
        return TokenMask(rows, self.grammars.bias([choices[j].grammar for j in rows],
                                                  [choices[j].seq.sampling.stop_token_ids for j in rows]))

    def _completed_grammars(self, choices: list[_Choice], tokens: list[int]) -> set[Sequence]:
        """Feed each constrained choice's matcher its new token (a stop token ends the choice anyway); the
        sequences whose grammar that token completed."""
        return {c.seq for c, token in zip(choices, tokens, strict=True)
                if c.grammar is not None and token not in c.seq.sampling.stop_token_ids
                and self.grammars.advance(c.grammar, token)}

    def _advance(self, choice: _Choice, token: int, logprobs: Logprobs | None = None) -> list[TokenEvent]:
        """Account for the token postprocess just appended: tool state, text, stop strings, the end."""
        seq = choice.seq
        if not seq.is_finished:
            self._tool(choice, token)
        before = len(choice.text)
        is_stop = token in seq.sampling.stop_token_ids  # a stop token shows no text, whatever it stands for
        choice.text += choice.decoder.decode(b"" if is_stop else self.tokenizer.id_to_bytes(token))
        reason = seq.finish_reason
        stops = seq.sampling.stop if seq.num_output_tokens >= seq.sampling.min_tokens else []
        stop_at = _find_stop(choice.text, stops, before, choice.floor)
        if not is_stop and token in self.tool_delimiters:  # it adds no text: no stop string ends here
            choice.text += choice.decoder.decode(b"", final=True)
            choice.floor = len(choice.text)  # nothing before it is held back for a stop string
        if stop_at is not None:
            start, end = stop_at
            choice.text = choice.text[:end if seq.sampling.include_stop_str_in_output else start]
            reason = "stop"
            if not seq.is_finished:
                self.scheduler.finish(seq, "stop")
        elif reason is not None:
            choice.text += choice.decoder.decode(b"", final=True)  # a cut character becomes U+FFFD
        if reason is None:
            end = len(choice.text) - _held_back(choice.text, max(choice.emitted, choice.floor), seq.sampling.stop)
            return [self._event(choice, token, self._emit(choice, end), None, logprobs)]
        del self.choices[seq.id]
        remaining = self.requests[choice.request_id]
        remaining.remove(choice)
        if not remaining:
            del self.requests[choice.request_id]
        return [self._event(choice, token, self._emit(choice, len(choice.text)), None, logprobs),
                self._event(choice, None, "", reason)]

    def _tool(self, choice: _Choice, token: int) -> None:
        """The calculator state machine of nanochat/generate.py, on the token just appended."""
        if token == self.python_start:
            choice.expr = []
        elif token == self.python_end and choice.expr is not None:
            result = safe_eval(self.tokenizer.decode(choice.expr))
            if result is not None:
                choice.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
            choice.expr = None
        elif choice.expr is not None:
            choice.expr.append(token)

    @staticmethod
    def _emit(choice: _Choice, end: int) -> str:
        text = choice.text[choice.emitted : end]
        choice.emitted = max(choice.emitted, end)
        return text

    @staticmethod
    def _event(choice: _Choice, token: int | None, text: str, reason: FinishReason | None,
               logprobs: Logprobs | None = None) -> TokenEvent:
        seq = choice.seq
        logprob, top = logprobs if logprobs is not None else (None, None)
        prompt = None
        if token is not None and seq.sampling.prompt_logprobs is not None and seq.num_output_tokens == 1:
            prompt = choice.prompt_logprobs or [None] * seq.num_prompt_tokens  # a 1-token prompt has no rows
            choice.prompt_logprobs = None
        return TokenEvent(choice.request_id, choice.index, token, text, reason, seq.num_prompt_tokens,
                          seq.num_output_tokens, seq.num_prompt_cache_hits or 0, logprob, top, prompt)

    # ------------------------------------------------------------------ numbers

    def stats(self) -> dict:
        """Requests running (some choice computing) and waiting (none yet), and the cache's counters."""
        running = sum(1 for choices in self.requests.values()
                      if any(c.seq.status is SequenceStatus.RUNNING for c in choices))
        bm = self.block_manager
        return {
            "running": running,
            "waiting": len(self.requests) - running,
            "kv_cache_usage": bm.usage,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "preemptions": self.scheduler.num_preemptions,
            "free_blocks": bm.num_free_blocks,
            "total_blocks": bm.num_blocks,
            # the sliding-window layers' pool, when they keep only their window (0 and 0 otherwise)
            "free_window_blocks": len(bm.window_pool.free_blocks) if bm.window_pool else 0,
            "total_window_blocks": bm.window_pool.num_blocks if bm.window_pool else 0,
        }


Logprobs = tuple[float, list[tuple[int, float]]]  # a token's log-probability, and the top tokens' ones
MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps at the same value


def _logprob_tensors(logits: torch.Tensor, tokens: torch.Tensor,
                     wanted: list[int | None]) -> _LogprobTensors | None:
    """For each row that wants them (wanted[i] = k, not None): the log-probability of tokens[i] under the
    row's raw logits, and the k most likely tokens with theirs; None when no row does. One logsumexp and one
    topk for all, on the device: a log-probability is the logit minus its row's logsumexp, so no second
    (rows, vocab) tensor is made (a scored prompt has a row per position)."""
    rows = [i for i, k in enumerate(wanted) if k is not None]
    if not rows:
        return None
    if len(rows) < len(wanted):
        index = to_device(rows, logits.device)
        logits, tokens = logits.index_select(0, index), tokens.index_select(0, index)
    logits = logits.float()
    lse = logits.logsumexp(dim=-1, keepdim=True)
    chosen = (logits.gather(1, tokens[:, None]) - lse).squeeze(1).clamp(min=MIN_LOGPROB)
    k = max(wanted[i] for i in rows)
    top_values, top_ids = logits.topk(k, dim=-1) if k else (logits[:, :0], logits[:, :0].long())
    top_values = (top_values - lse).clamp(min=MIN_LOGPROB)
    return _LogprobTensors(rows, [wanted[i] for i in rows], chosen, top_values, top_ids)


def _prompt_logprob_tensors(prompt: list[PromptLogits]) -> _LogprobTensors | None:
    """_logprob_tensors of every scored prompt row of a step, each predicting the prompt token after it."""
    if not prompt:
        return None
    rows = torch.cat([p.logits for p in prompt])
    targets = [t for p in prompt for t in p.seq.token_ids[p.start + 1 : p.start + 1 + len(p.logits)]]
    wanted = [p.seq.sampling.prompt_logprobs for p in prompt for _ in range(len(p.logits))]
    return _logprob_tensors(rows, to_device(targets, rows.device, torch.long), wanted)


def _logprobs(logits: torch.Tensor, tokens: list[int], wanted: list[int | None]) -> list[Logprobs | None]:
    """_logprob_tensors of host tokens, read at once."""
    found = _logprob_tensors(logits, to_device(tokens, logits.device, torch.long), wanted)
    return found.lists(len(tokens)) if found is not None else [None] * len(tokens)


def _find_stop(text: str, stops: list[str], before: int, floor: int = 0) -> tuple[int, int] | None:
    """Where the earliest stop string in text starts and ends (the shorter of two starting there), looking
    only at matches that end in the new text and start at floor or after."""
    found = [(i, i + len(s)) for s in stops if (i := text.find(s, max(floor, before - len(s) + 1))) != -1]
    return min(found) if found else None


def _held_back(text: str, emitted: int, stops: list[str]) -> int:
    """How many trailing characters might begin a stop string: the longest suffix that is a prefix of
    one, never reaching back into text already sent."""
    longest = max((len(s) - 1 for s in stops), default=0)
    for k in range(min(longest, len(text) - emitted), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


def build_engine(model: GPT, tokenizer: Tokenizer, device: str, *, num_blocks: int,
                 kv_cache_memory_fraction: float | None = None, block_size: int = 16, dtype: ServeDtype = "auto",
                 kv_cache_dtype: ServeDtype = "auto", **settings: Any) -> LLMEngine:
    """An LLMEngine on device with serve's settings: num_blocks KV-cache blocks, or as many as fit in
    kv_cache_memory_fraction of the memory free once the model is loaded (when it is, or resolves to, more
    than 0)."""
    fraction = resolve_kv_memory_fraction(kv_cache_memory_fraction, device)
    if fraction:
        free = free_memory(device)
        pools = resolve_kv_dtype(kv_cache_dtype, resolve_dtype(dtype, device))
        num_blocks = kv_cache_blocks(model, block_size, pools, fraction, free)
        logger.info("KV cache: %d blocks of %d tokens in %g of the %.0f MiB free", num_blocks, block_size,
                    fraction, free / 2**20)
    return LLMEngine(model, tokenizer, num_blocks=num_blocks, block_size=block_size, device=device, dtype=dtype,
                     kv_cache_dtype=kv_cache_dtype, **settings)
