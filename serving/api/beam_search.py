"""
Beam search (vLLM's use_beam_search) over the engine, run as vLLM's OpenAI server runs it: in the front end,
one token at a time, each step a request per live beam.

Notable:
- each step asks the engine, for every live beam, one token and the 2 x width likeliest next tokens with
  their log-probabilities (the model's own, as logprobs gives them). The prompt plus a beam's tokens is a
  prefix the engine's cache holds up to its last full block, so a step recomputes little more than each
  beam's last block. The engine's own draw is greedy and unused.
- candidates: every live beam extended by each of its likeliest tokens, scored by the sum of its tokens'
  log-probabilities over its length ** length_penalty (the score of Hugging Face's and vLLM's beam search;
  the length counts the generated tokens, an end token included). The width best go on; one that ends with
  an end token is finished, its text without it.
- the search ends when no beam is live or after max_tokens tokens (cut to the context the prompt leaves);
  the width best of the finished and live beams are the answer, best first: finish_reason "stop" for a
  finished beam, "length" for one cut.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from fastapi import Request

from serving.api.streaming import Engine, Run, side_by_side, start
from serving.engine.sequence import SamplingParams


@dataclass
class Beam:
    tokens: list[int] = field(default_factory=list)  # generated, an end token included when finished
    logprob: float = 0.0  # the sum of its tokens' log-probabilities
    finished: bool = False

    def score(self, length_penalty: float) -> float:
        return self.logprob / max(len(self.tokens), 1) ** length_penalty


@dataclass
class BeamSearch:
    """One search: its width, its length penalty, the tokens that end a beam, and its requests' priority (under
    the engine's priority policy)."""

    width: int
    max_tokens: int
    length_penalty: float
    end_tokens: frozenset[int]
    priority: int = 0

    async def run(self, engine: Engine, request: Request, prompt_ids: list[int], param: str) -> list[Beam]:
        """The width best beams after prompt_ids, best first; param names the prompt in an error."""
        live, finished = [Beam()], []
        params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * self.width, priority=self.priority)
        for _ in range(self.max_tokens):
            tops = await self._step(engine, request, [prompt_ids + beam.tokens for beam in live], params, param)
            candidates = [Beam(beam.tokens + [token], beam.logprob + logprob, token in self.end_tokens)
                          for beam, top in zip(live, tops, strict=True) for token, logprob in top]
            candidates.sort(key=lambda beam: beam.score(self.length_penalty), reverse=True)
            kept = candidates[:self.width]
            finished += [beam for beam in kept if beam.finished]
            live = [beam for beam in kept if not beam.finished]
            if not live:
                break
        return sorted(finished + live, key=lambda beam: beam.score(self.length_penalty), reverse=True)[:self.width]

    @staticmethod
    async def _step(engine: Engine, request: Request, prompts: list[list[int]], params: SamplingParams,
                    param: str) -> list[list[tuple[int, float]]]:
        """Each prompt's likeliest next tokens and their log-probabilities, asked side by side; should one
        request fail, the others are stopped."""
        step = uuid.uuid4().hex

        async def top(i: int, prompt: list[int]) -> list[tuple[int, float]]:
            run: Run = await start(engine, request, f"beam-{step}-{i}", prompt, params, param)
            try:
                await run.collect()
            finally:
                await run.close()
            return run.logprobs[0][0].top

        return await side_by_side([top(i, prompt) for i, prompt in enumerate(prompts)])
