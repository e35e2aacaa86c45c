"""The sampler (serving/engine/sampler.py): greedy, temperature, min-p, top-k, top-p, banned tokens and per-request
seeds."""

import math
from collections import Counter

import pytest
import torch

from serving.engine.sampler import make_generator, sample
from serving.engine.sequence import SamplingParams

V = 50


def random_logits(B: int, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(B, V, generator=torch.Generator().manual_seed(seed))


def draws(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> Counter:
    """n tokens drawn for the one row of logits, as one batch of n rows sharing one generator."""
    generator = make_generator(seed)
    tokens = sample(logits.expand(n, -1), [params] * n, [generator] * n)
    return Counter(tokens.tolist())


def test_temperature_zero_is_argmax():
    logits = random_logits(8)
    tokens = sample(logits, [SamplingParams(temperature=0.0)] * 8, [make_generator(None) for _ in range(8)])
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_top_k_one_is_greedy_at_any_temperature():
    logits = random_logits(8)
    params = [SamplingParams(temperature=t, top_k=1) for t in (0.5, 1.0, 2.0, 5.0, 0.5, 1.0, 2.0, 5.0)]
    tokens = sample(logits, params, [make_generator(b) for b in range(8)])
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_greedy_rows_are_exact_in_a_mixed_batch():
    logits = random_logits(6, seed=3)
    params = [SamplingParams(temperature=0.0 if b % 2 else 1.0) for b in range(6)]
    tokens = sample(logits, params, [make_generator(b) for b in range(6)])
    assert torch.equal(tokens[1::2], logits[1::2].argmax(dim=-1))


def test_top_k_never_samples_outside_the_k_most_likely():
    logits = random_logits(1, seed=5)
    counts = draws(logits, SamplingParams(temperature=3.0, top_k=4), 2000)
    allowed = set(logits[0].topk(4).indices.tolist())
    assert set(counts) == allowed  # all four drawn (high temperature), nothing else


def test_top_p_samples_only_the_nucleus_in_proportion():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.full((1, V), -30.0)
    logits[0, [7, 3, 11, 0]] = probs.log()  # most likely first: 7, then 3
    counts = draws(logits, SamplingParams(temperature=1.0, top_p=0.75), 4000)
    assert set(counts) == {7, 3}  # 0.5 < 0.75 <= 0.8: the nucleus is the two most likely tokens
    assert counts[7] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)


def test_min_p_keeps_the_tokens_at_least_min_p_times_the_likeliest_and_the_nucleus_is_taken_of_those():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = torch.full((1, V), -30.0)
    logits[0, [7, 3, 11, 0]] = probs.log()
    counts = draws(logits, SamplingParams(temperature=1.0, min_p=0.45), 4000)
    assert set(counts) == {7, 3, 11}  # 0.2 >= 0.45 * 0.4 > 0.1
    assert counts[11] / 4000 == pytest.approx(0.2 / 0.9, abs=0.03)
    # vLLM's order: top_p 0.75 of what min-p kept (0.4 / 0.9 + 0.3 / 0.9 = 0.78 reaches it): two tokens, where
    # the nucleus of the whole distribution (0.4 + 0.3 = 0.7 < 0.75) would have kept three
    counts = draws(logits, SamplingParams(temperature=1.0, min_p=0.45, top_p=0.75), 4000)
    assert set(counts) == {7, 3}
    assert set(draws(logits, SamplingParams(temperature=1.0, min_p=1.0), 500)) == {7}  # the likeliest only


def test_banned_tokens_are_never_drawn_nor_chosen_greedily():
    logits = random_logits(1, seed=2)
    top = logits[0].topk(3).indices.tolist()
    banned = SamplingParams(temperature=0.0, banned_token_ids=top[:2])
    assert sample(logits, [banned], [make_generator(0)]).item() == top[2]
    counts = draws(logits, SamplingParams(temperature=2.0, banned_token_ids=top[:2]), 3000)
    assert not set(counts) & set(top[:2]) and len(counts) > 10


def test_only_allowed_tokens_are_drawn_in_proportion_and_other_rows_keep_theirs():
    logits = random_logits(2, seed=4)
    allowed = [3, 17, 40]
    params = [SamplingParams(temperature=0.0, allowed_token_ids=allowed), SamplingParams(temperature=0.0)]
    tokens = sample(logits, params, [make_generator(0), make_generator(1)])
    assert tokens.tolist() == [allowed[logits[0, allowed].argmax()], logits[1].argmax()]
    counts = draws(logits[:1], SamplingParams(temperature=1.0, allowed_token_ids=allowed), 4000)
    expected = torch.softmax(logits[0, allowed], dim=-1)
    assert set(counts) <= set(allowed)
    for token, p in zip(allowed, expected.tolist()):
        assert abs(counts[token] / 4000 - p) < 0.03, (token, counts[token] / 4000, p)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])


def test_a_bad_word_loses_its_last_token_only_where_the_row_just_wrote_the_rest():
    from serving.engine.sampler import adjust_logits

    logits = random_logits(3, seed=6)
    words = [[5, 6, 7], [9]]  # a word of three tokens; one of a single token, never taken
    params = [SamplingParams(bad_words_ids=words)] * 3
    outputs = [[1, 5, 6], [5, 6, 1], [6]]  # completes "5 6 _"; wrote it earlier; wrote only its middle
    adjusted = adjust_logits(logits, params, outputs)
    assert params[0].needs_outputs
    inf = float("-inf")
    assert adjusted[0, 7] == inf and adjusted[1, 7] == logits[1, 7] and adjusted[2, 7] == logits[2, 7]
    assert (adjusted[:, 9] == inf).all()
    others = [t for t in range(V) if t not in (7, 9)]
    assert torch.equal(adjusted[:, others], logits[:, others])
    with pytest.raises(ValueError, match="bad_words_ids"):
        SamplingParams(bad_words_ids=[[]])


def test_top_p_one_keeps_every_token():
    logits = torch.zeros(1, V)
    counts = draws(logits, SamplingParams(temperature=1.0, top_p=1.0), 5000)
    assert len(counts) == V


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_follow_softmax_of_logits_over_temperature(temperature):
    logits = torch.full((1, V), -1e4)
    logits[0, :4] = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 4000
    counts = draws(logits, SamplingParams(temperature=temperature), n, seed=11)
    expected = torch.softmax(logits[0, :4] / temperature, dim=-1)
    for token in range(4):
        sigma = math.sqrt(expected[token] * (1 - expected[token]) / n)
        assert counts[token] / n == pytest.approx(float(expected[token]), abs=5 * sigma + 1e-3)
    assert set(counts) <= {0, 1, 2, 3}


def test_higher_temperature_flattens_the_distribution():
    logits = torch.zeros(1, V)
    logits[0, 0] = 3.0
    cold = draws(logits, SamplingParams(temperature=0.3), 2000)
    hot = draws(logits, SamplingParams(temperature=3.0), 2000)
    assert cold[0] > 1900 and hot[0] < 200 and len(hot) > len(cold)


FILTERED = SamplingParams(temperature=1.2, top_p=0.9, top_k=20, seed=1234)  # drawn in sorted order
UNFILTERED = SamplingParams(temperature=1.2, seed=1234)  # every token kept: drawn in vocabulary order


@pytest.mark.parametrize("mine", [FILTERED, UNFILTERED], ids=["filtered", "unfiltered"])
def test_same_seed_same_tokens_whatever_the_batch(mine):
    """A seeded request gets the same tokens alone and in batches of others, whether it filters (the
    others do not) or keeps every token (and then the others filter)."""
    logits = random_logits(5, seed=9)
    # the others: rows that keep every token, and rows whose larger top-k widens the batch's sorted prefix
    others = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, top_k=40)]

    def my_tokens(batch_rows: list[int], my_row: int, steps: int = 20) -> list[int]:
        """My request at row my_row of a batch whose other rows are other requests with their own seeds."""
        generators = [make_generator(1234 if b == my_row else 100 + b) for b in range(len(batch_rows))]
        params = [mine if b == my_row else others[b % 2] for b in range(len(batch_rows))]
        out = []
        for _ in range(steps):
            out.append(int(sample(logits[batch_rows], params, generators)[my_row]))
        return out

    alone = my_tokens([0], 0)
    assert my_tokens([3, 0, 4], 1) == alone
    assert my_tokens([2, 1, 3, 4, 0], 4) == alone
    assert len(set(alone)) > 1  # it does sample: 20 draws at temperature 1.2 are not all one token


def test_the_sorted_prefix_of_a_top_k_orders_equal_logits_by_token_id_whatever_its_width():
    """Ties (here many) come in token-id order, as the full stable sort gives them, so a row's top-k
    and draws are the same alone (its own k) and beside a row with a larger k."""
    from serving.engine.sampler import _most_likely

    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0, 2.0, 0.5, 1.0, 2.0, 1.0]])
    full_values, full_ids = logits.sort(dim=-1, descending=True, stable=True)
    for k in (3, 4, 6, 9):
        values, ids = _most_likely(logits, k)
        assert torch.equal(ids, full_ids[:, :k]) and torch.equal(values, full_values[:, :k])


def test_rows_that_keep_every_token_never_draw_one_of_probability_zero():
    """Drawn in vocabulary order, a masked token (first, last and inside) is never drawn, not even at the
    uniform's extremes, and the others come in proportion to their probabilities."""
    from serving.engine.sampler import _draw_in_order

    logits = random_logits(1, seed=4)
    masked = [0, 7, V - 1]
    logits[0, masked] = float("-inf")
    extremes = torch.tensor([0.0, math.nextafter(1.0, 0.0)])
    drawn = _draw_in_order(logits.expand(2, -1), extremes).tolist()
    assert not set(drawn) & set(masked)
    assert drawn[0] == 1 and drawn[1] == V - 2  # the first and the last token of positive probability
    counts = draws(logits, SamplingParams(temperature=1.0), 20_000, seed=5)
    assert not set(counts) & set(masked)
    probs = logits[0].softmax(-1)
    for token, p in enumerate(probs.tolist()):
        if p > 0.02:
            assert abs(counts[token] / 20_000 - p) < 4 * math.sqrt(p * (1 - p) / 20_000), token


def test_different_seeds_give_different_tokens():
    logits = random_logits(1, seed=2)
    params = SamplingParams(temperature=1.0)
    one = [int(sample(logits, [params], [g])[0]) for g in [make_generator(1)] for _ in range(20)]
    two = [int(sample(logits, [params], [g])[0]) for g in [make_generator(2)] for _ in range(20)]
    assert one != two


def test_half_precision_logits_are_sampled_in_float32():
    logits = random_logits(4).to(torch.bfloat16)
    tokens = sample(logits, [SamplingParams(temperature=0.0)] * 4, [make_generator(0)] * 4)
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, logits.float().argmax(dim=-1))


@pytest.mark.parametrize("field, value", [("temperature", -0.1), ("temperature", math.nan), ("top_k", 0),
                                          ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.5)])
def test_invalid_params_raise(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
    params = SamplingParams()
    setattr(params, field, value)  # params are mutable: the sampler checks again
    with pytest.raises(ValueError, match=field):
        sample(random_logits(1), [params], [make_generator(0)])


def test_one_params_and_one_generator_per_row():
    with pytest.raises(ValueError, match="3 rows"):
        sample(random_logits(3), [SamplingParams()] * 2, [make_generator(0)] * 3)
    with pytest.raises(ValueError, match="3 rows"):
        sample(random_logits(3), [SamplingParams()] * 3, [make_generator(0)] * 2)


def test_degenerate_temperature_and_top_p_do_not_crash():
    import torch

    from serving.engine.sampler import make_generator, sample
    from serving.engine.sequence import SamplingParams

    logits = torch.randn(2, 50)
    params = [SamplingParams(temperature=5e-324), SamplingParams(temperature=1.0, top_p=2.7e-308)]
    tokens = sample(logits, params, [make_generator(0), make_generator(1)])
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()


# ---------------------------------------------------------------------------------------------
# penalties and logit_bias


def reference_adjusted(logits: torch.Tensor, p: SamplingParams, outputs: list[int]) -> torch.Tensor:
    """OpenAI's definition, one token at a time."""
    row = logits.clone()
    for token in set(outputs):
        count = outputs.count(token)
        row[token] -= p.frequency_penalty * count + p.presence_penalty
    for token, bias in p.logit_bias.items():
        row[token] += bias
    return row


def test_penalties_and_logit_bias_follow_openais_definition_on_a_mixed_batch():
    from serving.engine.sampler import adjust_logits

    logits = random_logits(5, seed=4)
    params = [SamplingParams(presence_penalty=1.5), SamplingParams(),
              SamplingParams(frequency_penalty=0.7, presence_penalty=-0.5, logit_bias={3: 5.0}),
              SamplingParams(logit_bias={0: -100, 7: 2.5}), SamplingParams(frequency_penalty=2.0)]
    outputs = [[1, 1, 2], [4, 4], [3, 3, 3, 9], [], []]
    adjusted = adjust_logits(logits, params, outputs)
    for b, p in enumerate(params):
        assert torch.allclose(adjusted[b], reference_adjusted(logits[b], p, outputs[b])), b
    assert torch.equal(adjusted[1], logits[1])  # a row that asks for nothing is untouched
    assert adjust_logits(logits, [SamplingParams()] * 5, None) is logits  # nor is a batch that asks for nothing


def test_a_penalty_changes_the_greedy_choice_and_a_bias_forces_a_token():
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 6] = 2.0, 1.5
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, [greedy], [make_generator(0)], [[5]]).item() == 5
    penalized = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    assert sample(logits, [penalized], [make_generator(0)], [[5]]).item() == 6
    forced = SamplingParams(temperature=1.0, logit_bias={9: 100.0})
    assert set(draws(logits, forced, 200).elements()) == {9}


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3),
                                         ("logit_bias", {1: 101}), ("logit_bias", {-1: 1.0})])
def test_invalid_penalties_and_biases_raise(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_keeps_stop_tokens_out_of_short_rows_only():
    logits = torch.zeros(3, V)
    logits[:, 7] = 10.0  # the stop token is by far the likeliest
    params = [SamplingParams(temperature=0.0, stop_token_ids=[7], min_tokens=2, max_tokens=4)] * 2 + \
             [SamplingParams(temperature=1.0, stop_token_ids=[7], min_tokens=3, max_tokens=4)]
    tokens = sample(logits, params, [make_generator(b) for b in range(3)], [[1], [1, 2], [1, 2]])
    assert tokens[0].item() != 7 and tokens[1].item() == 7 and tokens[2].item() != 7
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    from serving.engine.sampler import adjust_logits

    logits = random_logits(3, seed=5)
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(),
              SamplingParams(repetition_penalty=0.8, presence_penalty=1.0)]
    prompts, outputs = [[1, 2], [1], [3]], [[2, 9], [], [4]]
    adjusted = adjust_logits(logits, params, outputs, prompts)
    for b, p in enumerate(params):
        expected = logits[b].clone()
        for t in set(prompts[b] + outputs[b]) if p.repetition_penalty != 1.0 else []:
            x = expected[t]
            expected[t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        expected = reference_adjusted(expected, p, outputs[b])
        assert torch.allclose(adjusted[b], expected), b
