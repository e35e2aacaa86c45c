"""
Scheduler: continuous batching, chunked prefill, preemption, abort and finishing, driven by a fake model.

FakeModel is a test driver standing in for the model runner: it writes each computed token into a
shadow KV cache at the slot the block table gives, checks that every position a step attends to reads
back the sequence's own token (so a wrongly shared or overwritten block fails the test), and
"generates" (last token + 1) % V, which makes every sequence's expected output known in advance. With a
window pool it does the same through the window tables for the positions a window layer attends to.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.engine.block_manager import BlockManager, window_pool_blocks
from serving.engine.scheduler import ScheduledBatch, Scheduler
from serving.engine.sequence import SamplingParams, Sequence, SequenceStatus

V = 50
BS = 4


class FakeModel:
    def __init__(self, bm: BlockManager):
        self.bs, self.window = bm.block_size, bm.window
        self.kv: dict[tuple[int, int], int] = {}  # (block id, slot) -> token whose KV is there
        self.window_kv: dict[tuple[int, int], int] = {}  # the same in the window pool

    def step(self, sched: Scheduler) -> tuple[ScheduledBatch, list[Sequence]]:
        busy = sched.has_unfinished()
        batch = sched.schedule()
        assert batch.num_tokens > 0 or not busy, "unfinished sequences but nothing scheduled"
        spans = [(c.seq, c.start, c.length) for c in batch.prefills]
        spans += [(s, len(s) - 1, 1) for s in batch.decodes]
        for seq, start, length in spans:
            assert start == seq.num_cached_tokens and length > 0
            assert len(seq.block_table) * self.bs >= len(seq)
            for pos in range(start, start + length):
                self.kv[seq.block_table[pos // self.bs], pos % self.bs] = seq.token_ids[pos]
            for pos in range(start + length):  # the context this step attends to
                assert self.kv[seq.block_table[pos // self.bs], pos % self.bs] == seq.token_ids[pos]
            if self.window is not None:
                self._window_step(seq, start, length)
        for copy in batch.block_copies:  # after the prefill, as the model runner does
            for kv, src, dst in ((self.kv, copy.src, copy.dst), (self.window_kv, copy.window_src, copy.window_dst)):
                for slot in range(self.bs):
                    if (src, slot) in kv:
                        kv[dst, slot] = kv[src, slot]
        new_tokens = [(s.token_ids[-1] + 1) % V for s in batch.sampled_seqs]
        sched.launched(batch)
        return batch, sched.postprocess(batch, new_tokens)

    def _window_step(self, seq: Sequence, start: int, length: int) -> None:
        table = seq.window_table
        for pos in range(start, start + length):
            self.window_kv[table[pos // self.bs], pos % self.bs] = seq.token_ids[pos]
        for pos in range(max(0, start - self.window), start + length):  # what the first query's window sees on
            assert table[pos // self.bs] >= 0, f"sequence {seq.id}: position {pos} is in the window but given back"
            assert self.window_kv[table[pos // self.bs], pos % self.bs] == seq.token_ids[pos]


def expected_output(prompt: list[int], n: int) -> list[int]:
    return [(prompt[-1] + k) % V for k in range(1, n + 1)]


def make(num_blocks=32, max_num_seqs=8, max_num_batched_tokens=64, window=None,
         policy="fcfs") -> tuple[Scheduler, FakeModel]:
    """With a window, a window pool of just the blocks it needs never to run short."""
    window_blocks = window and window_pool_blocks(window, BS, max_num_seqs, max_num_batched_tokens)
    bm = BlockManager(num_blocks, BS, window, window_blocks or 0)
    return Scheduler(bm, max_num_seqs, max_num_batched_tokens, policy), FakeModel(bm)


def run_to_completion(sched: Scheduler, model: FakeModel, max_steps: int = 1000) -> int:
    for step in range(max_steps):
        if not sched.has_unfinished():
            return step
        model.step(sched)
    raise AssertionError("sequences did not finish")


def seq(prompt: list[int], max_tokens: int = 5, **kw) -> Sequence:
    return Sequence(prompt, SamplingParams(max_tokens=max_tokens, **kw))


def test_admits_several_sequences_in_one_step_then_decodes_them_together():
    sched, model = make()
    seqs = [seq([i, i + 1, i + 2]) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch, _ = model.step(sched)
    assert [c.seq for c in batch.prefills] == seqs and not batch.decodes
    assert sched.num_running == 3 and sched.num_waiting == 0
    batch, _ = model.step(sched)
    assert batch.decodes == seqs and not batch.prefills
    run_to_completion(sched, model)
    for s in seqs:
        assert s.output_token_ids == expected_output(s.token_ids[:3], 5) and s.finish_reason == "length"


def test_respects_max_num_seqs():
    sched, model = make(max_num_seqs=2)
    seqs = [seq([i]) for i in range(5)]
    for s in seqs:
        sched.add(s)
    while sched.has_unfinished():
        model.step(sched)
        assert sched.num_running <= 2
    assert all(s.num_output_tokens == 5 for s in seqs)


def test_chunked_prefill_within_the_token_budget():
    sched, model = make(max_num_batched_tokens=16)
    short, long = seq([1, 2, 3]), seq(list(range(40)), max_tokens=2)
    sched.add(short)
    sched.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        batch, _ = model.step(sched)
        assert batch.num_tokens <= 16
        chunks += [(c.start, c.length, c.samples) for c in batch.prefills if c.seq is long]
    # 13 tokens left after the short prompt, then 15 beside its decode, then the last 12
    assert chunks == [(0, 13, False), (13, 15, False), (28, 12, True)]
    run_to_completion(sched, model)
    assert long.output_token_ids == expected_output(list(range(40)), 2)


def test_preempts_the_newest_when_blocks_run_out_and_it_still_finishes_correctly():
    sched, model = make(num_blocks=6, max_num_seqs=4)
    prompts = [[10 + i] * 3 for i in range(3)]  # 1 block each now, 4 blocks each at the end
    seqs = [seq(p, max_tokens=12) for p in prompts]
    for s in seqs:
        sched.add(s)
    model.step(sched)
    newest = seqs[-1]
    while newest.status is SequenceStatus.RUNNING:
        model.step(sched)
    assert sched.num_preemptions >= 1 and sched.waiting[0] is newest and newest.block_table == []
    run_to_completion(sched, model)
    for s, p in zip(seqs, prompts, strict=True):
        assert s.output_token_ids == expected_output(p, 12) and s.finish_reason == "length"
    assert sched.block_manager.num_free_blocks == 6


@pytest.mark.parametrize("policy, order", [("fcfs", [0, 1, 2, 3]), ("priority", [2, 0, 3, 1])])
def test_priority_scheduling_admits_by_priority_then_arrival(policy, order):
    sched, model = make(max_num_seqs=1, policy=policy)
    seqs = [seq([i], max_tokens=2, priority=p) for i, p in enumerate([0, 5, -1, 0])]
    for s in seqs:
        sched.add(s)
    admitted = []
    while sched.has_unfinished():
        batch, _ = model.step(sched)
        admitted += [seqs.index(c.seq) for c in batch.prefills]
    assert admitted == order


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_priority_scheduling_preempts_the_least_urgent_running_sequence(policy):
    sched, model = make(num_blocks=6, max_num_seqs=4, policy=policy)
    # the first to come is the least urgent: first come first served preempts the newest instead
    seqs = [seq([10 + i] * 3, max_tokens=12, priority=p) for i, p in enumerate([3, 0, 1])]
    for s in seqs:
        sched.add(s)
    model.step(sched)
    if policy == "priority":
        assert sched.running == [seqs[1], seqs[2], seqs[0]]  # decoded in rank order: urgent first
    while sched.num_preemptions == 0:
        model.step(sched)
    victim = seqs[0] if policy == "priority" else seqs[2]
    assert victim.status is SequenceStatus.WAITING and victim.block_table == []
    run_to_completion(sched, model)
    for s in seqs:
        assert s.output_token_ids == expected_output(s.token_ids[:3], 12)


def test_abort_frees_every_block_waiting_prefilling_or_decoding():
    sched, model = make(num_blocks=16, max_num_batched_tokens=10)
    decoding, prefilling, waiting = seq([1, 2]), seq(list(range(20))), seq(list(range(30)))
    for s in (decoding, prefilling, waiting):
        sched.add(s)
    model.step(sched)
    model.step(sched)
    assert decoding.num_output_tokens == 2 and 0 < prefilling.num_cached_tokens < 20
    for s in (waiting, prefilling, decoding):
        assert sched.abort(s.id) is s and s.finish_reason == "abort" and s.block_table == []
    assert sched.block_manager.num_free_blocks == 16 and not sched.has_unfinished()
    assert sched.abort(decoding.id) is None


def test_sequence_aborted_during_its_step_is_skipped():
    sched, model = make()
    s = seq([1, 2, 3])
    sched.add(s)
    batch = sched.schedule()
    sched.launched(batch)
    sched.abort(s.id)
    assert sched.postprocess(batch, [7]) == [] and s.token_ids == [1, 2, 3]


def test_finish_by_stop_token_and_by_max_tokens():
    sched, model = make()
    stopped = seq([5], max_tokens=10, stop_token_ids=[8])
    capped = seq([20], max_tokens=4)
    sched.add(stopped)
    sched.add(capped)
    run_to_completion(sched, model)
    assert stopped.output_token_ids == [6, 7, 8] and stopped.finish_reason == "stop"
    assert capped.output_token_ids == [21, 22, 23, 24] and capped.finish_reason == "length"
    assert sched.block_manager.num_free_blocks == 32


def test_a_token_that_completes_a_grammar_ends_the_sequence_with_stop_even_at_max_tokens():
    sched, _ = make()
    early, last = seq([1, 2], max_tokens=5), seq([3], max_tokens=1)
    sched.add(early)
    sched.add(last)
    batch = sched.schedule()
    sched.launched(batch)
    assert sched.postprocess(batch, [9, 9], completed={early, last}) == [early, last]
    assert (early.finish_reason, last.finish_reason) == ("stop", "stop")
    assert early.output_token_ids == [9] and sched.block_manager.num_free_blocks == 32


def test_finish_called_by_the_engine_for_a_stop_string():
    sched, model = make()
    s = seq([1, 2, 3], max_tokens=10)
    sched.add(s)
    model.step(sched)
    sched.finish(s, "stop")
    assert s.is_finished and s.finish_reason == "stop" and sched.num_running == 0
    assert sched.block_manager.num_free_blocks == 32


def test_next_turn_reuses_the_previous_turns_blocks():
    sched, model = make()
    first = seq(list(range(10)), max_tokens=6)  # 16 tokens: 4 full blocks once finished
    sched.add(first)
    run_to_completion(sched, model)
    second = seq(first.token_ids + [1, 2, 3])
    sched.add(second)
    batch, _ = model.step(sched)
    # the decoded tokens' blocks hit too; the last generated token's KV was never computed
    assert batch.prefills[0].start == 12 and sched.block_manager.prefix_cache_hits == 12
    run_to_completion(sched, model)
    assert second.output_token_ids == expected_output([3], 5)


@pytest.mark.parametrize("prompt_len", [10, 12])  # a partly filled last block (copied), and none
def test_siblings_fork_off_one_prefill_and_sample_in_the_same_step(prompt_len):
    sched, model = make(max_num_batched_tokens=8)  # the prompt takes two chunks
    leader, *siblings = [seq(list(range(prompt_len)), max_tokens=6) for _ in range(4)]
    sched.add(leader, siblings)
    prefilled, first_sampled = 0, None
    while first_sampled is None:
        batch, _ = model.step(sched)
        prefilled += sum(c.length for c in batch.prefills)
        if batch.sampled_seqs:
            first_sampled = batch.sampled_seqs
    assert prefilled == prompt_len and first_sampled == [leader, *siblings]
    assert len(batch.block_copies) == (3 if prompt_len % BS else 0)
    bm = sched.block_manager
    full = prompt_len // BS
    assert all(s.block_table[:full] == leader.block_table[:full] for s in siblings)
    assert all(bm.full.ref_counts[b] == 4 for b in leader.block_table[:full])
    check_block_accounting(sched)
    run_to_completion(sched, model)  # the fake model checks every sibling reads its own tokens back
    for s in (leader, *siblings):
        assert s.output_token_ids == expected_output(list(range(prompt_len)), 6)
    assert bm.num_free_blocks == 32 and not any(bm.full.ref_counts)
    assert bm.prefix_cache_queries == prompt_len  # a fork is no lookup


def test_siblings_that_cannot_fork_queue_as_ordinary_sequences_and_hit_the_prefix_cache():
    sched, model = make(max_num_seqs=2)
    leader, *siblings = [seq(list(range(10)), max_tokens=3) for _ in range(3)]
    sched.add(leader, siblings)
    batch, _ = model.step(sched)
    assert batch.sampled_seqs == [leader, siblings[0]] and list(sched.waiting) == [siblings[1]]
    run_to_completion(sched, model)
    assert siblings[1].num_prompt_cache_hits == 8  # two full blocks; the partly filled one is recomputed
    assert all(s.output_token_ids == expected_output(list(range(10)), 3) for s in siblings)


def test_aborting_a_leader_before_its_prompt_is_computed_lets_its_siblings_run():
    sched, model = make(max_num_batched_tokens=4)
    leader, *siblings = [seq(list(range(10)), max_tokens=3) for _ in range(3)]
    sched.add(leader, siblings)
    model.step(sched)
    sched.abort(siblings[1].id)  # a sibling still waiting to fork
    sched.abort(leader.id)
    assert list(sched.waiting) == [siblings[0]] and siblings[1].finish_reason == "abort"
    run_to_completion(sched, model)
    assert siblings[0].output_token_ids == expected_output(list(range(10)), 3)
    assert sched.block_manager.num_free_blocks == 32


def test_add_refuses_a_sequence_that_can_never_fit():
    sched, _ = make(num_blocks=4)
    with pytest.raises(ValueError, match="needs 5 KV cache blocks"):
        sched.add(seq(list(range(10)), max_tokens=10))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_k": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"seed": -1},
        {"max_tokens": 0},
        {"max_tokens": True},
        {"n": 0},
        {"stop": "END"},
        {"stop": [""]},
        {"stop_token_ids": [-3]},
    ],
)
def test_sampling_params_reject_bad_values(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


add_op = st.tuples(st.just("add"), st.integers(0, 2), st.integers(1, 6), st.integers(1, 20), st.integers(1, 3),
                  st.integers(-2, 2))
ops = st.lists(
    st.one_of(
        add_op,
        add_op,  # twice as likely as the others: a busy server, where preemption happens
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("step"), st.integers(1, 6)),
    ),
    min_size=8,
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, num_blocks=st.integers(6, 12), budget=st.integers(1, 24), max_num_seqs=st.integers(1, 6),
       window=st.sampled_from([None, 1, 3, 6]), policy=st.sampled_from(["fcfs", "priority"]))
def test_blocks_are_never_double_allocated_and_all_come_back(ops, num_blocks, budget, max_num_seqs, window, policy):
    """Random adds (with shared prefixes, forks and priorities), aborts and steps under either policy: the
    fake model reads every position back (through the window tables too), the blocks add up after every op,
    all come back."""
    sched, model = make(num_blocks, max_num_seqs, budget, window, policy)
    bm = sched.block_manager
    prefixes = [[1] * 8, [2] * 4, [3] * 2]  # shared prefixes, so prefix caching is exercised
    added: list[Sequence] = []
    for op in ops:
        if op[0] == "add":
            _, which, extra, max_tokens, n, priority = op  # n sequences: a leader and the siblings that fork off it
            group = [seq(prefixes[which] + [len(added) % V] * extra, max_tokens=max_tokens, priority=priority)
                     for _ in range(n)]
            if bm.num_blocks_for(len(group[0]) + max_tokens) <= num_blocks:
                sched.add(group[0], group[1:])
                added += group
        elif op[0] == "abort":
            if added:
                sched.abort(added[op[1] % len(added)].id)
        else:
            for _ in range(op[1]):
                model.step(sched)
        check_block_accounting(sched)
        if policy == "priority":  # both queues stay in rank order
            for queue in (list(sched.waiting), sched.running):
                assert queue == sorted(queue, key=lambda s: (s.sampling.priority, s.id))
    run_to_completion(sched, model)
    assert bm.num_free_blocks == num_blocks and not any(bm.full.ref_counts)
    if window is not None:
        assert len(bm.window_pool.free_blocks) == bm.window_pool.num_blocks and not any(bm.window_pool.ref_counts)
    for s in added:
        if s.finish_reason != "abort":
            prompt = s.token_ids[: s.num_prompt_tokens]
            assert s.finish_reason == "length"
            assert s.output_token_ids == expected_output(prompt, s.sampling.max_tokens)


def check_block_accounting(sched: Scheduler) -> None:
    bm = sched.block_manager
    holders = [0] * bm.num_blocks
    for s in sched.running:
        assert len(set(s.block_table)) == len(s.block_table)
        for b in s.block_table:
            holders[b] += 1
    for s in [*sched.waiting, *(sib for sibs in sched.siblings.values() for sib in sibs)]:
        assert s.block_table == []
    assert holders == bm.full.ref_counts
    # a block is shared only through the prefix cache or a fork, both of computed blocks, which are keyed
    # (the fake model checks that their tokens match)
    assert all(bm.full.block_hash[b] is not None for b in range(bm.num_blocks) if holders[b] > 1)
    assert set(bm.full.free_blocks) == {b for b in range(bm.num_blocks) if holders[b] == 0}
    if bm.window_pool is not None:
        check_window_accounting(sched)


def check_window_accounting(sched: Scheduler) -> None:
    """The window pool's blocks add up, and a running sequence holds only those of its last window."""
    bm, pool = sched.block_manager, sched.block_manager.window_pool
    holders = [0] * pool.num_blocks
    for s in sched.running:
        live = [b for b in s.window_table if b >= 0]
        assert len(set(live)) == len(live)
        first = max(0, s.num_cached_tokens - bm.window) // bm.block_size
        assert all(b < 0 for b in s.window_table[:first]) and all(b >= 0 for b in s.window_table[first:])
        for b in live:
            holders[b] += 1
    for s in [*sched.waiting, *(sib for sibs in sched.siblings.values() for sib in sibs)]:
        assert s.window_table == []
    assert holders == pool.ref_counts
    assert set(pool.free_blocks) == {b for b in range(pool.num_blocks) if holders[b] == 0}
