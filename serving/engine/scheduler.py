"""
Continuous batching: every step decides which tokens of which sequences the model computes next.

Notable:
- One token budget per step (max_num_batched_tokens) shared by decodes and prefill chunks, and at most
  max_num_seqs running sequences. Order of service: decodes of running sequences first (one token each,
  for steady inter-token latency), then the next chunk of running sequences still prefilling, then new
  sequences from the waiting queue: first come first served ("fcfs"), or with the "priority" policy
  (vLLM's) by each request's priority, lower first, then arrival.
- Chunked prefill: a prompt longer than the budget left is computed over several steps; each chunk is
  (sequence, start, length) with start == seq.num_cached_tokens, and only the chunk that reaches the end
  of the sequence samples a token.
- A sequence gets blocks for all its tokens when admitted, so only decodes need new blocks (a window
  pool, sized never to run short, gives a chunk its blocks when the chunk is scheduled). When none is
  left, the newest running sequence is preempted by recompute: its blocks are freed and it goes back to
  the front of the waiting queue, keeping its generated tokens (prefix caching makes most of the
  recompute cheap). No new sequence is admitted in a step that preempted. Under the priority policy both
  queues stay in (priority, arrival) order instead: the running sequence preempted is the one of the
  lowest priority that came last, and it waits in its place by the same order; decodes are scheduled in
  that order, so a sequence already given its step this time is never the one preempted.
- add() refuses a sequence that could never fit in the cache (prompt + max_tokens), which would
  otherwise block the queue forever.
- Siblings (the other choices of an n > 1 request) share one prefill: they wait, holding no blocks,
  until the step that schedules their leader's last prompt chunk, and then fork off it
  (BlockManager.fork): they sample their first token from the leader's logits in that same step and
  decode on their own from the next. A sibling that cannot fork then (no free block for the copy of a
  partly filled last block, max_num_seqs reached, or a step that preempted) joins the front of the
  waiting queue as an ordinary sequence, where the prefix cache gives it the prompt's full blocks.
- A step is recorded in two halves: launched() once the model has it (each computed token's KV is in
  the cache, each sampled token pending, sequence.py) and postprocess() once its tokens are known. With
  async scheduling the engine schedules and launches the next step between the two, so a sequence
  decodes its pending token; one whose pending token is its last (max_tokens) waits for postprocess.
- The scheduler is not thread safe: the engine calls schedule, launched, postprocess, abort and finish
  from one loop. A sequence that finished (or was aborted) while its step ran is skipped by postprocess;
  one preempted meanwhile still gets its token.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Literal

from serving.engine.block_manager import BlockCopy, BlockManager, window_pool_blocks
from serving.engine.sequence import FinishReason, Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # == seq.num_cached_tokens when scheduled
    length: int
    # the chunk reaches the end of the sequence, so its last logits give the next token; fixed at
    # schedule time because postprocess then appends to the sequence
    samples: bool
    # siblings forked off seq in this step: each samples its own first token from the same logits
    forks: list[Sequence] = field(default_factory=list)


@dataclass
class ScheduledBatch:
    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)  # each computes its last token, at len(seq) - 1
    # blocks to copy once the prefills are computed: forks' partly filled last blocks
    block_copies: list[BlockCopy] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.prefills) + len(self.decodes)

    @property
    def sampled_seqs(self) -> list[Sequence]:
        """The sequences that get a new token this step, in the order postprocess expects the tokens: each
        sampling chunk's sequence followed by its forks, then the decodes."""
        return [s for c in self.prefills if c.samples for s in (c.seq, *c.forks)] + self.decodes


def _is_prefill(seq: Sequence) -> bool:
    # prompt (or, after preemption, recompute) not done; a 1-token prompt's first step is still a prefill
    return seq.num_cached_tokens < len(seq) - 1 or len(seq) == seq.num_prompt_tokens


def _is_decode(seq: Sequence) -> bool:
    # one sampled token to compute, unless it is the last the sequence may have (it only waits to be known)
    return not _is_prefill(seq) and len(seq) - seq.num_prompt_tokens < seq.sampling.max_tokens


SchedulingPolicy = Literal["fcfs", "priority"]


def _rank(seq: Sequence) -> tuple[int, int]:
    """A sequence's place under the priority policy: its request's priority (lower first), then arrival."""
    return seq.sampling.priority, seq.id


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
        policy: SchedulingPolicy = "fcfs",
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_seqs and max_num_batched_tokens must be >= 1, got {max_num_seqs}, {max_num_batched_tokens}"
            )
        pool = block_manager.window_pool
        if pool is not None:
            needed = window_pool_blocks(block_manager.window, block_manager.block_size, max_num_seqs,
                                        max_num_batched_tokens)
            if pool.num_blocks < needed:
                raise ValueError(f"the window pool's {pool.num_blocks} blocks can run short: {max_num_seqs} "
                                 f"sequences and {max_num_batched_tokens} tokens a step need {needed}")
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy {policy!r}: fcfs or priority")
        self.block_manager = block_manager
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission (or rank) order: the last one is preempted first
        self.seqs: dict[int, Sequence] = {}  # unfinished sequences by id, for abort
        self.siblings: dict[Sequence, list[Sequence]] = {}  # by leader: those waiting to fork off it
        self.num_preemptions = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def add(self, seq: Sequence, siblings: list[Sequence] | tuple[()] = ()) -> None:
        """Queue seq; siblings (same prompt and sampling) fork off it when its prompt is computed."""
        bm = self.block_manager
        needed = bm.num_blocks_for(seq.num_prompt_tokens + seq.sampling.max_tokens)
        if needed > bm.num_blocks:
            raise ValueError(
                f"prompt ({seq.num_prompt_tokens} tokens) + max_tokens ({seq.sampling.max_tokens}) needs "
                f"{needed} KV cache blocks, the cache has {bm.num_blocks}"
            )
        for s in (seq, *siblings):
            assert s.status is SequenceStatus.WAITING and s.id not in self.seqs and s.token_ids == seq.token_ids
            self.seqs[s.id] = s
        self._wait([seq], front=False)
        if siblings:
            self.siblings[seq] = list(siblings)

    def _wait(self, seqs: Iterable[Sequence], front: bool) -> None:
        """Queue seqs, in order: at the back (new) or the front (preempted, or siblings that could not fork);
        under the priority policy in their rank's place either way."""
        seqs = list(seqs)
        if self.policy == "priority":
            for seq in seqs:
                self.waiting.insert(bisect.bisect_right(self.waiting, _rank(seq), key=_rank), seq)
        elif front:
            self.waiting.extendleft(reversed(seqs))
        else:
            self.waiting.extend(seqs)

    def _run(self, seq: Sequence) -> None:
        """seq runs: last in admission order, or in its rank's place under the priority policy."""
        seq.status = SequenceStatus.RUNNING
        if self.policy == "priority":
            self.running.insert(bisect.bisect_right(self.running, _rank(seq), key=_rank), seq)
        else:
            self.running.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:  # decodes; preemption only shortens the list's tail
            seq = self.running[i]
            if not _is_decode(seq):
                i += 1
                continue
            while not self.block_manager.can_append(seq):
                preempted = True
                if self._preempt(self.running.pop()) is seq:
                    break
            else:
                self.block_manager.append(seq)
                batch.decodes.append(seq)
                budget -= 1
                i += 1
        for seq in list(self.running):  # chunks of sequences admitted earlier and still prefilling (forks join)
            if budget > 0 and _is_prefill(seq):
                budget -= self._add_chunk(batch, seq, budget, preempted)
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break  # strict FIFO: a smaller request behind it waits too, so big ones never starve
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            self._run(seq)
            budget -= self._add_chunk(batch, seq, budget, preempted)
        return batch

    def _add_chunk(self, batch: ScheduledBatch, seq: Sequence, budget: int, preempted: bool) -> int:
        assert not seq.num_pending, f"sequence {seq.id} prefills before its pending token is known"
        length = min(len(seq) - seq.num_cached_tokens, budget)
        assert length > 0, f"sequence {seq.id} has nothing to compute: was postprocess skipped?"
        samples = seq.num_cached_tokens + length == len(seq)
        chunk = PrefillChunk(seq, seq.num_cached_tokens, length, samples)
        self.block_manager.cover(seq, chunk.start + length)
        batch.prefills.append(chunk)
        if samples and seq in self.siblings:
            self._fork(batch, chunk, self.siblings.pop(seq), preempted)
        return length

    def _fork(self, batch: ScheduledBatch, chunk: PrefillChunk, siblings: list[Sequence], preempted: bool) -> None:
        """Fork the siblings that fit off chunk.seq, whose prompt this chunk completes; queue the rest."""
        bm, leader = self.block_manager, chunk.seq
        left = []
        for sib in siblings:
            if preempted or len(self.running) >= self.max_num_seqs or not bm.can_fork(leader):
                left.append(sib)
                continue
            copy = bm.fork(leader, sib)
            if copy is not None:
                batch.block_copies.append(copy)
            self._run(sib)
            chunk.forks.append(sib)
        self._wait(left, front=True)

    def _preempt(self, seq: Sequence) -> Sequence:
        logger.debug("preempting sequence %d (%d tokens) for lack of KV cache blocks", seq.id, len(seq))
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self._wait([seq], front=True)
        self.num_preemptions += 1
        return seq

    def launched(self, batch: ScheduledBatch) -> None:
        """The model has the step: each sequence has the KV of its tokens up to its chunk's end (a fork: was
        given it), and each sampled one a pending token. Blocks are keyed for the prefix cache as far as
        their tokens are known (postprocess keys the rest)."""
        computed = [(s, c.start + c.length) for c in batch.prefills for s in (c.seq, *c.forks)]
        computed += [(s, len(s)) for s in batch.decodes]
        for seq, end in computed:
            seq.num_cached_tokens = end
            self.block_manager.cache_computed_blocks(seq)
        for seq in batch.sampled_seqs:
            seq.num_pending += 1

    def postprocess(self, batch: ScheduledBatch, new_token_ids: list[int],
                    completed: Collection[Sequence] = ()) -> list[Sequence]:
        """Record a launched step's results: new_token_ids[i] is batch.sampled_seqs[i]'s. completed: sequences
        whose new token ended them ("stop") whatever it is (it completed their grammar). Returns what
        finished."""
        sampled = batch.sampled_seqs
        if len(new_token_ids) != len(sampled):
            raise ValueError(f"{len(new_token_ids)} new tokens for {len(sampled)} sampled sequences")
        live = [(seq, token_id) for seq, token_id in zip(sampled, new_token_ids, strict=True)
                if not seq.is_finished]  # one aborted, or stopped by the step before: its token is moot
        for seq, token_id in live:
            seq.num_pending -= 1
            seq.token_ids.append(token_id)
        for seq in [s for c in batch.prefills for s in (c.seq, *c.forks)] + batch.decodes:
            if seq.status is SequenceStatus.RUNNING:  # not preempted (nor finished) meanwhile
                self.block_manager.cache_computed_blocks(seq)
        finished = []
        for seq, token_id in live:
            if token_id in seq.sampling.stop_token_ids or seq in completed:
                self.finish(seq, "stop")
            elif seq.num_output_tokens >= seq.sampling.max_tokens:
                self.finish(seq, "length")
            else:
                continue
            finished.append(seq)
        return finished

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End seq now (stop token or string, length, abort): its blocks go back at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:  # a sibling still waiting to fork
            next(sibs for sibs in self.siblings.values() if seq in sibs).remove(seq)
        # siblings left without their leader go ahead as ordinary sequences
        self._wait(self.siblings.pop(seq, []), front=True)
        self.block_manager.free(seq)
        seq.num_pending = 0  # a token still on its way is moot
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self.seqs[seq.id]

    def abort(self, seq_id: int) -> Sequence | None:
        """Cancel a sequence (client gone). Returns it, or None if it had already finished or is unknown."""
        seq = self.seqs.get(seq_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq
