"""The paged KV cache (serving/engine/paged_cache.py) through the model runner (model_runner.py): every
logit the runner returns must equal the full forward model(idx) of that sequence at that position."""

import copy
import random

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from serving.engine import paged_cache
from serving.engine.block_manager import BlockCopy
from serving.engine.cuda_graphs import DecodeGraphs, batch_buckets
from serving.engine.model_runner import ModelRunner, resolve_attention, resolve_dtype, resolve_kv_dtype
from serving.engine.scheduler import PrefillChunk
from serving.engine.sequence import SamplingParams, Sequence
from tests.support.gpt_fixtures import scrambled_model

VOCAB, BLOCK, NUM_BLOCKS = 300, 4, 64
ATOL = 1e-4
CONFIGS = {
    "mha-full": dict(n_kv_head=4, window_pattern="L"),
    "gqa-window": dict(n_kv_head=2, window_pattern="SL"),  # layer 0 sees 4 keys back: sequence_len 16 // 4
    "smear-backout": dict(n_kv_head=2, window_pattern="SL", smear=True, backout=True),  # reads the token before
}


def scrambled(name: str) -> GPT:
    return scrambled_model(GPTConfig(sequence_len=16, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, **CONFIGS[name]))


def runner_for(model: GPT, **options) -> ModelRunner:
    runner = ModelRunner(model, NUM_BLOCKS, BLOCK, "cpu", **options)
    # stale values, as freed blocks hold: any slot attended by mistake changes the logits
    torch.manual_seed(0)
    runner.cache.k.normal_(0.0, 10.0)
    runner.cache.v.normal_(0.0, 10.0)
    return runner


def random_tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def reference(model: GPT, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0]  # (T, V)


def chunk_of(seq: Sequence, start: int, length: int) -> PrefillChunk:
    """The chunk the scheduler would make: it samples when it reaches the end of the sequence."""
    return PrefillChunk(seq, start, length, samples=start + length == len(seq))


def scattered_tables(lengths: list[int], seed: int) -> list[list[int]]:
    """Block tables for sequences of these lengths, from shuffled block ids: not contiguous, not ordered."""
    ids = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(ids)
    tables = []
    for n in lengths:
        k = -(-n // BLOCK)
        tables.append(ids[:k])
        ids = ids[k:]
    return tables


def drive(runner: ModelRunner, seqs: list[Sequence], full: list[list[int]], chunk: int, stagger: int,
          twin: ModelRunner | None = None) -> int:
    """Runs every sequence to the end of full[i], teacher-forced, as the engine would: sequence i joins at
    step i * stagger, prefills chunk tokens a step, then decodes one token a step in a batch with the
    others. Checks each returned row against the full forward, and against twin's (another attention path
    over pools that started equal) to 1e-5; returns the number of rows checked."""
    refs = [reference(runner.model, tokens) for tokens in full]
    checked, step = 0, 0
    while any(len(s) < len(f) or s.num_cached_tokens < len(s) for s, f in zip(seqs, full, strict=True)):
        prefills, decodes = [], []
        for i, seq in enumerate(seqs):
            if step < i * stagger or seq.num_cached_tokens == len(seq):
                continue
            if seq.num_cached_tokens < seq.num_prompt_tokens:
                length = min(chunk, seq.num_prompt_tokens - seq.num_cached_tokens)
                prefills.append(chunk_of(seq, seq.num_cached_tokens, length))
            else:
                decodes.append(seq)
        logits = runner.run(prefills, decodes).sampled
        if twin is not None:
            torch.testing.assert_close(twin.run(prefills, decodes).sampled, logits, atol=1e-5, rtol=0)
        sampled = [c.seq for c in prefills if c.samples] + decodes
        assert logits.shape == (len(sampled), VOCAB)
        for row, seq in zip(logits, sampled, strict=True):
            i = seqs.index(seq)
            torch.testing.assert_close(row, refs[i][len(seq) - 1], atol=ATOL, rtol=0)
            checked += 1
        for c in prefills:  # what the scheduler's postprocess does
            c.seq.num_cached_tokens += c.length
        for seq in decodes:
            seq.num_cached_tokens += 1
        for seq in sampled:
            i = seqs.index(seq)
            if len(seq) < len(full[i]):
                seq.token_ids.append(full[i][len(seq)])
        step += 1
    return checked


PROMPTS, NEW_TOKENS = [5, 13, 22, 9], 6


def four_prompts() -> tuple[list[Sequence], list[list[int]]]:
    """Four sequences holding their prompts (lengths PROMPTS) in scattered blocks sized for NEW_TOKENS more,
    and each one's full token list."""
    rng = random.Random(7)
    full = [random_tokens(n + NEW_TOKENS, rng) for n in PROMPTS]
    seqs = [Sequence(tokens[:n]) for tokens, n in zip(full, PROMPTS, strict=True)]
    for seq, table in zip(seqs, scattered_tables([len(f) for f in full], seed=3), strict=True):
        seq.block_table = table
    return seqs, full


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(("chunk", "stagger"), [(100, 0), (100, 1), (4, 1), (3, 2)],
                         ids=["one-chunk-together", "one-chunk-staggered", "chunks-of-4", "chunks-of-3"])
def test_paged_logits_match_the_full_forward(name, chunk, stagger):
    """Prefill in one chunk or in chunks, padded together or beside decodes of the others, then decode in
    a mixed batch: every logit row equals the full forward at its position."""
    seqs, full = four_prompts()
    checked = drive(runner_for(scrambled(name)), seqs, full, chunk, stagger)
    assert checked == len(PROMPTS) * (NEW_TOKENS + 1)  # one row at each prompt's end, then one per decode


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(("chunk", "stagger"), [(100, 1), (3, 2)], ids=["one-chunk-staggered", "chunks-of-3"])
def test_flex_attention_over_the_pools_equals_the_gather_path(name, chunk, stagger):
    """The same steps (chunks padded beside 1-token rows, decodes; GQA, a window) through FlexAttention
    reading the pools in place and through the gather + masked SDPA path, whose stale slots are the same."""
    seqs, full = four_prompts()
    model = scrambled(name)
    flex, sdpa = runner_for(model, attention="flex"), runner_for(model, attention="sdpa")
    assert (flex.attention, sdpa.attention) == ("flex", "sdpa")
    torch.testing.assert_close(flex.cache.k, sdpa.cache.k, atol=0, rtol=0)
    checked = drive(flex, seqs, full, chunk, stagger, twin=sdpa)
    assert checked == len(PROMPTS) * (NEW_TOKENS + 1)


@pytest.mark.slow  # compiling the CPU kernels takes a minute on 2 cores
def test_compiled_flex_attention_equals_the_gather_path():
    """One mixed step (a chunk late in its sequence beside a fresh prompt and a decode, a window, GQA)
    through flex_attention compiled, as a GPU runs it, over pools the gather path filled. The long chunk
    spans two query blocks, so the short rows' second block is padding only and visits nothing."""
    model = scrambled("gqa-window")
    flex = runner_for(model, attention="flex", compile_flex=True)
    sdpa = runner_for(model, attention="sdpa")
    rng = random.Random(9)
    late, fresh, decoding = (Sequence(random_tokens(n, rng)) for n in (40, 6, 11))
    for seq, table in zip((late, fresh, decoding), scattered_tables([40, 6, 11], seed=8), strict=True):
        seq.block_table = table
    sdpa.run([chunk_of(late, 0, 12), chunk_of(decoding, 0, 10)], [])
    flex.cache.k.copy_(sdpa.cache.k)
    flex.cache.v.copy_(sdpa.cache.v)
    late.num_cached_tokens, decoding.num_cached_tokens = 12, 10
    step = [chunk_of(late, 12, 28), chunk_of(fresh, 0, 6), chunk_of(decoding, 10, 1)]
    got, expected = flex.run(step, []).sampled, sdpa.run(step, []).sampled
    assert got.shape == (3, VOCAB)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_packed_prefill_equals_rows_padded_to_the_longest(name, attention):
    """Chunks of different lengths back to back in one row (the runner's default) against the same chunks
    right-padded to the longest: the same logits at every step, and the same keys and values in the pools
    (which started equal, stale values and all), through either attention path."""
    seqs, full = four_prompts()
    model = scrambled(name)
    packed, padded = runner_for(model, attention=attention), runner_for(model, attention=attention,
                                                                        packed_prefill=False)
    assert (packed.packed_prefill, padded.packed_prefill) == (True, False)
    assert drive(packed, seqs, full, chunk=100, stagger=1, twin=padded) == len(PROMPTS) * (NEW_TOKENS + 1)
    for pool, twin in ((packed.cache.k, padded.cache.k), (packed.cache.v, padded.cache.v)):
        torch.testing.assert_close(pool, twin, atol=1e-5, rtol=0)


def test_a_packed_prefill_computes_no_padding():
    """The token-wise parts of the forward (here the first MLP) see the chunks' tokens and nothing else:
    4 chunks of 5, 13, 22 and 9 tokens are 49 rows packed, 4 x 22 = 88 padded."""
    model = scrambled("gqa-window")
    rows_seen = []
    model.transformer.h[0].mlp.c_fc.register_forward_hook(
        lambda _m, args, _out: rows_seen.append(args[0].shape[:2]))
    for packed in (True, False):
        seqs, _ = four_prompts()
        runner_for(model, packed_prefill=packed).run([chunk_of(s, 0, len(s)) for s in seqs], [])
    assert rows_seen == [(1, sum(PROMPTS)), (len(PROMPTS), max(PROMPTS))]


def test_the_gather_path_attends_a_packed_prefills_rows_without_their_padding(monkeypatch):
    """Chunks of 5, 13, 22 and 9 tokens: each layer attends each row's own queries over its keys up to its
    last block (4 tokens a block), not 4 rows of 22 queries over 24 keys."""
    calls = []
    sdpa = paged_cache.F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        calls.append((q.size(-2), k.size(-2)))
        return sdpa(q, k, v, **kwargs)

    seqs, _ = four_prompts()
    runner = runner_for(scrambled("mha-full"), attention="sdpa")
    monkeypatch.setattr(paged_cache.F, "scaled_dot_product_attention", recording)
    runner.run([chunk_of(s, 0, len(s)) for s in seqs], [])
    rows = [(n, -(-n // BLOCK) * BLOCK) for n in PROMPTS]
    assert calls == rows * 2  # both layers


def test_flex_query_blocks_of_padding_only_visit_no_block():
    """Beside a 40-token chunk (three query blocks of 16), a 3-token chunk's second and third query blocks
    hold padding only: its block mask lists no key block for them; the long row visits its blocks in all."""
    runner = runner_for(scrambled("mha-full"), attention="flex")
    view = runner.cache.view([list(range(10)), [10]], starts=[0, 0], lengths=[40, 3], packed=True)
    mask = view.pools[0]._flex_mask(None)
    assert mask.kv_num_blocks[:, 0].tolist() == [[10, 10, 10], [1, 0, 0]]


def test_attention_auto_is_flex_on_gpus_only():
    assert resolve_attention("auto", "cpu") == "sdpa"
    assert resolve_attention("auto", torch.device("cuda", 0)) == "flex"
    assert resolve_attention("flex", "cpu") == "flex"
    with pytest.raises(ValueError, match="serve.attention='paged': must be one of auto, sdpa, flex"):
        resolve_attention("paged", "cpu")


def test_the_window_matters_in_the_windowed_config():
    """Guards the test above: a cache that ignored the window would not match these references."""
    windowed = scrambled("gqa-window")
    full_context = GPT(GPTConfig(**{**windowed.config.__dict__, "window_pattern": "L"}))
    full_context.load_state_dict(windowed.state_dict())
    tokens = random_tokens(20, random.Random(1))
    diff = (reference(windowed, tokens) - reference(full_context.eval(), tokens)).abs().amax(dim=-1)
    assert diff[:5].max() < 1e-5  # within the window both see everything
    assert diff[10:].min() > 1e-3


@pytest.mark.parametrize("chunk", [1, 2])  # decodes, and 2-token chunks
def test_a_window_layer_never_reads_the_blocks_before_its_window(chunk):
    """Layer 0 sees 4 positions back: once the prompt is in, poison its blocks wholly older than that
    (NaN values: even a masked key read would spread them); the logits still match the full forward."""
    model = scrambled("gqa-window")
    runner = runner_for(model)
    full = random_tokens(24, random.Random(11))
    seq = Sequence(full[:13])
    seq.block_table = scattered_tables([24], seed=5)[0]
    runner.run([chunk_of(seq, 0, 13)], [])
    seq.num_cached_tokens = 13
    refs = reference(model, full)
    while seq.num_cached_tokens < len(full) - 1:
        start = seq.num_cached_tokens
        seq.token_ids = full[: start + chunk]
        stale = seq.block_table[: (start - 4) // BLOCK]  # every position in them is more than 4 before start
        runner.cache.k[0, stale] = float("nan")
        runner.cache.v[0, stale] = float("nan")
        logits = runner.run([chunk_of(seq, start, chunk)], []).sampled
        torch.testing.assert_close(logits[0], refs[start + chunk - 1], atol=ATOL, rtol=0)
        seq.num_cached_tokens = start + chunk


def test_sequences_sharing_prefix_blocks():
    """A second sequence reuses the first one's two full prefix blocks (prefix caching) and computes only
    its own tail; both then decode together and neither disturbs the shared blocks."""
    model = scrambled("gqa-window")
    runner = runner_for(model)
    rng = random.Random(5)
    prefix = random_tokens(2 * BLOCK, rng)
    full = [prefix + random_tokens(5 + 4, rng), prefix + random_tokens(7 + 4, rng)]
    a, b = Sequence(full[0][:-4]), Sequence(full[1][:-4])
    a_table, b_own = scattered_tables([len(full[0]), len(full[1]) - 2 * BLOCK], seed=9)
    a.block_table, b.block_table = a_table, a_table[:2] + b_own
    runner.run([chunk_of(a, 0, len(a))], [])
    a.num_cached_tokens = len(a)
    a.token_ids.append(full[0][len(a)])
    b.num_cached_tokens = 2 * BLOCK  # the prefix cache hit
    checked = drive(runner, [a, b], full, chunk=100, stagger=0)
    assert checked == 4 + 5  # a's 4 decodes; b's prefill end and 4 decodes


def test_a_fork_gets_its_leaders_row_and_a_copy_of_its_last_block_then_decodes_its_own_tokens():
    """One prefill for two choices: the sibling shares the two full blocks, gets the partly filled third
    copied after the prefill, and both then decode different tokens beside each other."""
    model = scrambled("gqa-window")
    runner = runner_for(model)
    rng = random.Random(8)
    prompt = random_tokens(2 * BLOCK + 3, rng)
    full = [prompt + random_tokens(4, rng), prompt + random_tokens(4, rng)]
    leader, sib = Sequence(prompt), Sequence(prompt)
    table, own = scattered_tables([len(full[0]), len(full[1]) - 2 * BLOCK], seed=4)
    leader.block_table, sib.block_table = table, table[:2] + own
    chunk = chunk_of(leader, 0, len(prompt))
    chunk.forks.append(sib)
    logits = runner.run([chunk], [], [BlockCopy(table[2], own[0])]).sampled
    expected = reference(model, prompt)[-1]
    assert logits.shape == (2, VOCAB)
    torch.testing.assert_close(logits, torch.stack([expected, expected]), atol=ATOL, rtol=0)
    for seq, tokens in ((leader, full[0]), (sib, full[1])):
        seq.num_cached_tokens = len(prompt)
        seq.token_ids.append(tokens[len(prompt)])
    assert drive(runner, [leader, sib], full, chunk=100, stagger=0) == 2 * 4


def test_short_chunk_late_in_its_sequence_padded_beside_a_long_one():
    """Block tables as tight as the scheduler makes them: the 1-token row's padding would run 8 positions
    past its last block if padded tokens took positions of their own."""
    model = scrambled("gqa-window")
    runner = runner_for(model)
    rng = random.Random(6)
    fresh, late = Sequence(random_tokens(9, rng)), Sequence(random_tokens(17, rng))
    fresh.block_table, late.block_table = scattered_tables([9, 17], seed=2)
    runner.run([chunk_of(late, 0, 16)], [])
    logits = runner.run([chunk_of(fresh, 0, 9), chunk_of(late, 16, 1)], []).sampled
    torch.testing.assert_close(logits[0], reference(model, fresh.token_ids)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], reference(model, late.token_ids)[-1], atol=ATOL, rtol=0)


def test_runner_writes_only_the_slots_of_new_tokens():
    runner = runner_for(scrambled("gqa-window"))
    k_before, v_before = runner.cache.k.clone(), runner.cache.v.clone()
    seq = Sequence(random_tokens(7, random.Random(2)))
    seq.block_table = [41, 3]
    runner.run([chunk_of(seq, 0, 7)], [])
    k_changed = (runner.cache.k != k_before).flatten(3).any(dim=-1)  # (n_layer, num_blocks, block_size)
    v_changed = (runner.cache.v != v_before).flatten(3).any(dim=-1)
    expected = torch.zeros_like(k_changed)
    expected[:, 41, :] = True  # positions 0-3
    expected[:, 3, :3] = True  # positions 4-6; offset 3 stays as it was
    assert torch.equal(k_changed, expected) and torch.equal(v_changed, expected)


def test_only_rows_that_need_a_next_token_come_back():
    model = scrambled("mha-full")
    runner = runner_for(model)
    rng = random.Random(4)
    long, short = Sequence(random_tokens(10, rng)), Sequence(random_tokens(3, rng))
    long.block_table, short.block_table = scattered_tables([10, 3], seed=1)
    logits = runner.run([chunk_of(long, 0, 6), chunk_of(short, 0, 3)], []).sampled
    assert logits.shape == (1, VOCAB)  # the 6-token chunk of the 10-token prompt samples nothing
    torch.testing.assert_close(logits[0], reference(model, short.token_ids)[-1], atol=ATOL, rtol=0)
    assert runner.run([], []).sampled.shape == (0, VOCAB)


def test_a_sequence_scoring_its_prompt_gets_every_prompt_rows_logits_chunk_by_chunk():
    """prompt_logprobs: besides the sampling row, each chunk returns the rows of its prompt positions but
    the prompt's last (row i of a chunk from start predicts token start + i + 1), equal to the full
    forward's; a sequence beside it in the batch still gets its sampling row only."""
    model = scrambled("gqa-window")
    runner = runner_for(model)
    rng = random.Random(13)
    scored = Sequence(random_tokens(10, rng), SamplingParams(prompt_logprobs=2))
    plain = Sequence(random_tokens(5, rng))
    scored.block_table, plain.block_table = scattered_tables([10, 5], seed=5)
    rows = {}
    for start, length in ((0, 4), (4, 4), (8, 2)):
        chunks = [chunk_of(scored, start, length)] + ([chunk_of(plain, 0, 5)] if start == 0 else [])
        out = runner.run(chunks, [])
        for p in out.prompt:
            assert p.seq is scored
            rows.update({p.start + i: row for i, row in enumerate(p.logits)})
        if start == 0:
            assert out.sampled.shape == (1, VOCAB)  # plain's; scored's first chunk samples nothing
            torch.testing.assert_close(out.sampled[0], reference(model, plain.token_ids)[-1], atol=ATOL, rtol=0)
        scored.num_cached_tokens += length
    assert sorted(rows) == list(range(9))
    expected = reference(model, scored.token_ids)
    torch.testing.assert_close(torch.stack([rows[i] for i in range(9)]), expected[:9], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.sampled[0], expected[9], atol=ATOL, rtol=0)


def test_block_table_too_short_is_refused():
    runner = runner_for(scrambled("mha-full"))
    seq = Sequence(random_tokens(9, random.Random(0)))
    seq.block_table = [5, 6]  # 8 slots for 9 tokens
    with pytest.raises(ValueError, match="cannot hold 9 positions"):
        runner.run([chunk_of(seq, 0, 9)], [])


def test_window_tables_are_required_and_cannot_give_back_the_new_tokens_blocks():
    runner = runner_for(scrambled("gqa-window"), num_window_blocks=NUM_BLOCKS)
    seq = Sequence(random_tokens(9, random.Random(0)))
    seq.block_table = [5, 6, 7]
    with pytest.raises(ValueError, match="needs a window table per row"):
        runner.cache.view([seq.block_table], [0], [9])
    seq.window_table = [-1, 2, 3]  # column 0 holds positions 0..3, two of which the chunk from 2 computes
    with pytest.raises(ValueError, match="cannot be behind the window"):
        runner.run([chunk_of(seq, 2, 7)], [])
    seq.window_table = [-1, 2, -2]
    with pytest.raises(ValueError, match=r"block ids must lie in \[-1, 64\)"):
        runner.run([chunk_of(seq, 8, 1)], [])


def test_bfloat16_runner_tracks_the_float32_forward():
    """dtype=bfloat16 (what "auto" serves on a GPU) casts the weights and the pools; each logit row stays
    within bf16 rounding of the float32 full forward, through a chunked prefill and teacher-forced decodes."""
    model = scrambled("gqa-window")
    runner = ModelRunner(copy.deepcopy(model), NUM_BLOCKS, BLOCK, "cpu", dtype="bfloat16")
    assert runner.cache.k.dtype == torch.bfloat16
    assert {p.dtype for p in runner.model.parameters()} == {torch.bfloat16}
    full = random_tokens(16, random.Random(8))
    ref = reference(model, full)
    seq = Sequence(full[:10])
    seq.block_table = scattered_tables([len(full)], seed=4)[0]
    rows = [runner.run([chunk_of(seq, 0, 6)], []).sampled, runner.run([chunk_of(seq, 6, 4)], []).sampled[0]]
    assert rows[0].shape == (0, VOCAB)  # the first chunk samples nothing
    rows = rows[1:]
    seq.num_cached_tokens = len(seq)
    while len(seq) < len(full):
        seq.token_ids.append(full[len(seq)])
        rows.append(runner.run([], [seq]).sampled[0])
        seq.num_cached_tokens += 1
    got = torch.stack(rows)
    assert got.dtype == torch.float32
    expected = ref[9:]
    relative = ((got - expected).norm() / expected.norm()).item()
    assert 0 < relative < 2e-2, relative  # not float32 (0 would mean the cast did not happen), not garbage


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_a_bfloat16_kv_cache_under_float32_weights_tracks_the_float32_forward(attention):
    """kv_cache_dtype=bfloat16 keeps the weights in float32 and the pools (and the attention reading them) in
    bfloat16: each logit row stays within bf16 rounding of the float32 full forward, through a chunked prefill
    and teacher-forced decodes, on both attention paths."""
    model = scrambled("gqa-window")
    runner = ModelRunner(copy.deepcopy(model), NUM_BLOCKS, BLOCK, "cpu", kv_cache_dtype="bfloat16", attention=attention)
    assert runner.cache.k.dtype == runner.cache.v.dtype == torch.bfloat16
    assert {p.dtype for p in runner.model.parameters()} == {torch.float32}
    full = random_tokens(16, random.Random(8))
    seq = Sequence(full[:10])
    seq.block_table = scattered_tables([len(full)], seed=4)[0]
    runner.run([chunk_of(seq, 0, 6)], [])
    rows = [runner.run([chunk_of(seq, 6, 4)], []).sampled[0]]
    seq.num_cached_tokens = len(seq)
    while len(seq) < len(full):
        seq.token_ids.append(full[len(seq)])
        rows.append(runner.run([], [seq]).sampled[0])
        seq.num_cached_tokens += 1
    got, expected = torch.stack(rows), reference(model, full)[9:]
    assert got.dtype == torch.float32
    relative = ((got - expected).norm() / expected.norm()).item()
    assert 0 < relative < 2e-2, relative  # not float32 (0: the pools were not bfloat16), not garbage


def test_kv_cache_dtype_auto_follows_the_weights():
    assert resolve_kv_dtype("auto", torch.float32) == torch.float32
    assert resolve_kv_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_dtype("bfloat16", torch.float32) == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype='float16': must be one of auto, float32, bfloat16"):
        resolve_kv_dtype("float16", torch.float32)


def test_dtype_auto_is_bfloat16_on_gpus_only():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("float32", "cuda") == torch.float32
    with pytest.raises(ValueError, match="dtype='float16': must be one of auto, float32, bfloat16"):
        resolve_dtype("float16", "cpu")


# ---------------------------------------------------------------------------
# decode through the static buffers the CUDA graphs replay (run eagerly here: capture needs a GPU)


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_flex_graphs_cover_every_batch_up_to_max_num_seqs_and_the_gather_paths_stop_at_8(attention):
    """Flex reads only each row's own blocks, so its graphs go up to max_num_seqs; the gather path's would
    attend over max_model_len keys per row, so its stop at 8. Twelve sequences decode through flex's bucket
    of 16 (four padding rows) with the eager decode's logits, writing nothing outside their own slots and
    the scratch block."""
    model = scrambled("gqa-window")
    runner = ModelRunner(model, NUM_BLOCKS + 1, BLOCK, "cpu", attention=attention)  # block NUM_BLOCKS: scratch
    graphs = DecodeGraphs(model, runner.cache, max_num_seqs=16, max_model_len=20, capture=False)
    assert graphs.buckets == ([1, 2, 4, 8, 16] if attention == "flex" else [1, 2, 4, 8])
    assert graphs.serves(12) == (attention == "flex") and graphs.serves(8)
    if attention == "sdpa":
        return
    seqs = decoding_sequences(runner, 12, seed=22)
    held = {b for seq in seqs for b in seq.block_table}
    untouched = [b for b in range(NUM_BLOCKS) if b not in held]
    rng = random.Random(21)
    for _ in range(2):
        eager = runner.run([], seqs).sampled
        before = runner.cache.k.clone(), runner.cache.v.clone()
        with torch.inference_mode():
            through_buffers = graphs.run(seqs)
        torch.testing.assert_close(through_buffers, eager, atol=ATOL, rtol=0)
        for tensor, old in zip((runner.cache.k, runner.cache.v), before, strict=True):
            assert torch.equal(tensor[:, untouched], old[:, untouched])
        for seq in seqs:
            seq.num_cached_tokens += 1
            seq.token_ids.append(rng.randrange(VOCAB))


def decoding_sequences(runner: ModelRunner, n: int, seed: int) -> list[Sequence]:
    """n prefilled sequences of different lengths in scattered blocks, each given its next token."""
    rng = random.Random(seed)
    lengths = [rng.randrange(2, 12) for _ in range(n)]
    seqs = [Sequence(random_tokens(k, rng)) for k in lengths]
    for seq, table in zip(seqs, scattered_tables([k + 2 for k in lengths], seed=seed), strict=True):
        seq.block_table = table
        runner.run([chunk_of(seq, 0, len(seq))], [])
        seq.num_cached_tokens = len(seq)
        seq.token_ids.append(rng.randrange(VOCAB))
    return seqs


def test_the_compiled_decode_step_gives_the_eager_decodes_logits_at_every_bucket():
    """serve.compile_decode: the forward over the graph buffers compiled once with a symbolic batch size
    (here run without capture) gives the eager decode's logits in the buckets of 4 and of 8."""
    model = scrambled("smear-backout")
    runner = ModelRunner(model, NUM_BLOCKS + 1, BLOCK, "cpu")  # block NUM_BLOCKS: the scratch block
    graphs = DecodeGraphs(model, runner.cache, max_num_seqs=8, max_model_len=20, capture=False, compile=True)
    for n, seed in ((3, 31), (6, 32)):
        seqs = decoding_sequences(runner, n, seed)
        eager = runner.run([], seqs).sampled
        with torch.inference_mode():
            compiled = graphs.run(seqs)
        torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=0)
    assert graphs.compiled  # it did run compiled, not fallen back


def test_a_decode_step_that_fails_to_compile_is_logged_and_runs_uncompiled(monkeypatch, caplog):
    import serving.engine.cuda_graphs as cuda_graphs

    def failing_compile(fn, **options):
        def compiled(*args):
            raise RuntimeError("backend compiler failed\nwith a long story")
        return compiled

    monkeypatch.setattr(cuda_graphs.torch, "compile", failing_compile)
    model = scrambled("gqa-window")
    runner = ModelRunner(model, NUM_BLOCKS + 1, BLOCK, "cpu")
    graphs = DecodeGraphs(model, runner.cache, max_num_seqs=4, max_model_len=20, capture=False, compile=True)
    seqs = decoding_sequences(runner, 3, 33)
    eager = runner.run([], seqs).sampled
    with torch.inference_mode(), caplog.at_level("WARNING", logger="serving.engine.cuda_graphs"):
        through_buffers = graphs.run(seqs)
    torch.testing.assert_close(through_buffers, eager, atol=ATOL, rtol=0)
    assert "the decode step did not compile (RuntimeError: backend compiler failed)" in caplog.text
    assert not graphs.compiled


def behind_window(seq: Sequence, window: int) -> list[int]:
    """Mark seq's window blocks wholly behind the window of its next query -1, as the block manager gives
    them back; returns those blocks."""
    first = max(0, seq.num_cached_tokens - window) // BLOCK
    gone = [b for b in seq.window_table[:first] if b >= 0]
    seq.window_table[:first] = [-1] * first
    return gone


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_a_window_pool_that_keeps_only_the_window_serves_the_full_forwards_logits(attention, chunk):
    """Layer 0 (a window of 4) keeps its KV in a pool of its own, read through a window table whose blocks
    behind the window are given back (-1) and poisoned (NaN: even a masked read would spread it); the
    logits still match the full forward, prefilling in chunks and then decoding."""
    model = scrambled("gqa-window")
    runner = runner_for(model, attention=attention, num_window_blocks=NUM_BLOCKS)
    window_pool = runner.cache.window_pool
    assert runner.cache.k.size(0) == window_pool.k.size(0) == 1  # one layer in each pool
    full = random_tokens(26, random.Random(13))
    seq = Sequence(full[:14])
    seq.block_table = scattered_tables([26], seed=5)[0]
    seq.window_table = scattered_tables([26], seed=6)[0]
    refs = reference(model, full)
    checked = 0
    while seq.num_cached_tokens < len(full) - 1:
        start = seq.num_cached_tokens
        for block in behind_window(seq, model.window_sizes[0]):
            window_pool.k[0, block] = float("nan") if attention == "sdpa" else 1e4
            window_pool.v[0, block] = float("nan") if attention == "sdpa" else -1e4
        length = min(chunk, 14 - start) if start < 14 else 1
        seq.token_ids = full[: max(14, start + length)]
        logits = runner.run([chunk_of(seq, start, length)], []).sampled
        if start + length == len(seq):
            torch.testing.assert_close(logits[0], refs[start + length - 1], atol=ATOL, rtol=0)
            checked += 1
        seq.num_cached_tokens = start + length
    assert seq.window_table.count(-1) >= 4 and checked >= 12


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
@pytest.mark.parametrize("window_pool", [False, True], ids=["one-pool", "window-pool"])
def test_decode_through_the_graph_buffers_equals_the_eager_decode(attention, window_pool):
    """Three sequences of different lengths in scattered blocks decode through DecodeGraphs' static buffers
    (bucket 4: one padding row, block tables padded to the longest context with the scratch block): the same
    logits as the eager decode, and the pools untouched outside the scratch block. With a window pool, the
    window layer's table is a second one, its blocks behind the window given back."""
    model = scrambled("smear-backout")  # windows, GQA, and the token before each decode through the buffers
    # block NUM_BLOCKS of each pool: the scratch block
    runner = ModelRunner(model, NUM_BLOCKS + 1, BLOCK, "cpu", attention=attention,
                         num_window_blocks=NUM_BLOCKS + 1 if window_pool else 0)
    graphs = DecodeGraphs(model, runner.cache, max_num_seqs=6, max_model_len=40, capture=False)
    rng = random.Random(11)
    seqs = [Sequence(random_tokens(n, rng)) for n in (5, 13, 22)]
    lengths = [n + 3 for n in (5, 13, 22)]
    for seq, table, window_table in zip(seqs, scattered_tables(lengths, seed=12), scattered_tables(lengths, seed=13),
                                        strict=True):
        seq.block_table = table
        seq.window_table = window_table if window_pool else []
        runner.run([chunk_of(seq, 0, len(seq))], [])
        seq.num_cached_tokens = len(seq)
    pools = runner.cache.pools
    others = [[b for b in range(NUM_BLOCKS) if not any(b in table for seq in seqs for table in tables(seq))]
              for tables in (lambda s: [s.block_table], lambda s: [s.window_table])][: len(pools)]
    for _ in range(3):
        for seq in seqs:
            seq.token_ids.append(rng.randrange(VOCAB))
            if window_pool:
                behind_window(seq, model.window_sizes[0])
        eager = runner.run([], seqs).sampled  # writes each last token's key and value
        before = [(pool.k.clone(), pool.v.clone()) for pool in pools]
        with torch.inference_mode():  # as ModelRunner.run calls it
            through_buffers = graphs.run(seqs)  # the same keys and values again; padding into the scratch block
        torch.testing.assert_close(through_buffers, eager, atol=ATOL, rtol=0)
        for pool, (k_before, v_before), untouched in zip(pools, before, others, strict=True):
            for tensor, old in ((pool.k, k_before), (pool.v, v_before)):
                torch.testing.assert_close(tensor[:, :NUM_BLOCKS], old[:, :NUM_BLOCKS], atol=ATOL, rtol=0)
                assert torch.equal(tensor[:, untouched], old[:, untouched])  # blocks of no sequence: not a bit changed
        for seq in seqs:
            seq.num_cached_tokens += 1
    if window_pool:
        assert all(-1 in seq.window_table for seq in seqs[1:])
    padding_row = torch.full((graphs.max_blocks * len(pools),), NUM_BLOCKS)
    assert torch.equal(graphs.inputs[3, 3:], padding_row)
