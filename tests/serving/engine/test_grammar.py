"""Structured output in the engine (serving/engine/grammar.py, sampler.py, llm_engine.py): a JSON Schema becomes
a grammar or a clear refusal; the mask is exactly the grammar's; constrained choices validate, end with "stop"
as soon as their grammar is complete, may end (by an end-of-turn or stop token) only where the grammar allows,
and keep the model's own log-probabilities; plain requests sharing their batch are untouched."""

import json
from collections import defaultdict

import jsonschema
import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from serving.engine.grammar import bitmask_bias, json_grammar
from serving.engine.llm_engine import LLMEngine
from serving.engine.sampler import TokenMask, make_generator, sample
from serving.engine.sequence import SamplingParams
from tests.serving.engine.test_llm_engine import no_block_held
from tests.support.bigram import bigram_model
from tests.support.gpt_fixtures import scrambled_model

TEXT = "hello world, the quick brown fox jumps over the lazy dog. 0123456789 {\"name\": [true, false]} "
# bounded everywhere (maxLength, maxItems, enum, minimum/maximum), so every reply fits MAX_TOKENS: at most
# 8 + 2 * 4 characters of strings, each 6 bytes at worst (a \uXXXX escape), and ~80 bytes of the rest
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "mood", "tags", "active"],
    "additionalProperties": False,
}
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator([TEXT * 4], 320)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    config = GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return scrambled_model(config, scale=2.0)


def make_engine(model: GPT, tok: Tokenizer, **kwargs) -> LLMEngine:
    options = dict(num_blocks=256, block_size=8, max_num_seqs=16, max_num_batched_tokens=128)
    return LLMEngine(model, tok, **{**options, **kwargs})


def run(engine: LLMEngine) -> dict:
    """(request id, choice index) -> {"tokens", "text", "finish_reason", "logprobs"} once every request ends."""
    results: dict = defaultdict(lambda: {"tokens": [], "text": "", "finish_reason": None, "logprobs": []})
    for _ in range(5000):
        if not engine.has_work():
            return results
        for e in engine.step():
            choice = results[e.request_id, e.index]
            choice["text"] += e.text
            if e.token_id is None:
                choice["finish_reason"] = e.finish_reason
            else:
                choice["tokens"].append(e.token_id)
                choice["logprobs"].append((e.logprob, e.top_logprobs))
    raise AssertionError("the engine did not finish")


def single(tok: Tokenizer, text: str) -> int:
    (token,) = tok.encode(text)
    return token


# ---------------------------------------------------------------------------------------------
# the grammar and its mask


@pytest.mark.parametrize("schema,reason", [
    ({"type": "foo"}, "Invalid type"),
    ({"type": "string", "maxLength": -1}, "maxLength"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "if"),
    ({"enum": []}, "Unsatisfiable"),
    ({"$ref": "#/$defs/missing"}, "missing"),
])
def test_a_schema_that_is_invalid_or_not_enforceable_is_refused_with_the_reason(schema, reason):
    with pytest.raises(ValueError, match=reason):
        json_grammar(schema)


def test_the_bias_is_zero_exactly_on_the_bits_the_mask_sets():
    generator = torch.Generator().manual_seed(0)
    for vocab_size in (32, 50, 321):
        words = (vocab_size + 31) // 32
        bitmask = torch.randint(-2**31, 2**31 - 1, (3, words), dtype=torch.int32, generator=generator)
        bias = bitmask_bias(bitmask, vocab_size)
        expected = [[(int(bitmask[g, t // 32]) >> (t % 32)) & 1 for t in range(vocab_size)] for g in range(3)]
        assert bias.shape == (3, vocab_size)
        assert (bias == 0).int().tolist() == expected
        assert bias[bias != 0].eq(float("-inf")).all()


def test_the_sampler_never_draws_a_masked_token_and_leaves_the_other_rows_alone():
    V = 40
    logits = 3 * torch.randn(2, V, generator=torch.Generator().manual_seed(1))
    allowed = [3, 17, 38]
    bias = torch.full((1, V), float("-inf"))
    bias[0, allowed] = 0.0
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0)]
    seen, plain, unmasked = set(), [], []
    for seed in range(300):
        tokens = sample(logits, params, [make_generator(seed), make_generator(10_000 + seed)],
                        mask=TokenMask([1], bias))
        seen.add(tokens[1].item())
        plain.append(tokens[0].item())
        unmasked.append(sample(logits, params, [make_generator(seed), make_generator(10_000 + seed)])[0].item())
    assert seen == set(allowed)
    assert plain == unmasked  # the unconstrained row draws what it draws without any mask in the batch
    greedy = sample(logits, [SamplingParams(temperature=0.0)] * 2, [make_generator(0)] * 2, mask=TokenMask([0], bias))
    assert greedy[0].item() == max(allowed, key=lambda t: logits[0, t].item())


# ---------------------------------------------------------------------------------------------
# the engine


def test_constrained_choices_validate_and_end_with_stop_when_their_grammar_is_complete(model, tok):
    engine = make_engine(model, tok)
    grammar = json_grammar(SCHEMA)
    prompt = tok.encode("hello", prepend="<|bos|>")
    for r in range(2):
        engine.add_request(f"r{r}", prompt, SamplingParams(temperature=1.0, n=8, seed=r, max_tokens=MAX_TOKENS,
                                                           grammar=grammar))
    results = run(engine)
    assert len(results) == 16
    ends = set(engine.end_of_turn)
    for choice in results.values():
        jsonschema.validate(json.loads(choice["text"]), SCHEMA)
        assert choice["finish_reason"] == "stop"
        # the grammar ended it: the last token is the closing brace's, no end-of-turn token was spent
        assert choice["tokens"][-1] not in ends and choice["text"].endswith("}")
    assert len({c["text"] for c in results.values()}) > 8  # temperature 1: the choices differ
    assert no_block_held(engine)


def test_a_plain_request_sharing_the_batch_generates_what_it_generates_alone(model, tok):
    prompt = tok.encode("the quick brown fox", prepend="<|bos|>")
    plain = SamplingParams(temperature=1.0, seed=7, max_tokens=30)
    alone = make_engine(model, tok)
    alone.add_request("plain", prompt, plain)
    shared = make_engine(model, tok)
    shared.add_request("json", prompt, SamplingParams(temperature=1.0, n=3, seed=1, max_tokens=MAX_TOKENS,
                                                      grammar=json_grammar(SCHEMA)))
    shared.add_request("plain", prompt, plain)
    results = run(shared)
    assert results["plain", 0] == run(alone)["plain", 0]
    assert all(json.loads(results["json", i]["text"]) for i in range(3))


def test_end_and_stop_tokens_are_allowed_exactly_where_the_grammar_may_end(tok):
    """A scripted model that wants to end its turn at once: the grammar (an integer up to 99) keeps the end
    token out until the reply is a number, then lets it through; a two-digit number completes the grammar,
    which ends the choice without an end token."""
    sp = tok.encode_special
    five, seven, a = single(tok, "5"), single(tok, "7"), single(tok, "a")
    end = sp("<|assistant_end|>")
    grammar = json_grammar({"type": "integer", "minimum": 0, "maximum": 99})
    prompt = [sp("<|assistant_start|>")]
    steer = {five: 5.0}  # among the tokens the grammar allows, the model has no preference: "5" it is

    wants_end = make_engine(bigram_model(tok, {}, default=end), tok)
    wants_end.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=10, grammar=grammar, logit_bias=steer))
    choice = run(wants_end)["r", 0]
    assert (choice["tokens"], choice["text"], choice["finish_reason"]) == ([five, end], "5", "stop")

    wants_a = make_engine(bigram_model(tok, {sp("<|assistant_start|>"): a}, default=a), tok)
    wants_a.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=10, grammar=grammar,
                                                    logit_bias=steer, stop_token_ids=[a]))
    choice = run(wants_a)["r", 0]
    assert (choice["tokens"], choice["text"], choice["finish_reason"]) == ([five, a], "5", "stop")

    completes = make_engine(bigram_model(tok, {five: seven}, default=end), tok)
    completes.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=10, grammar=grammar, logit_bias=steer))
    choice = run(completes)["r", 0]
    assert (choice["tokens"], choice["text"], choice["finish_reason"]) == ([five, seven], "57", "stop")


def test_penalties_and_logit_bias_act_within_the_grammar(model, tok):
    z = single(tok, "z")
    engine = make_engine(model, tok)
    engine.add_request("r", tok.encode("hello", prepend="<|bos|>"),
                       SamplingParams(temperature=1.0, n=4, seed=3, max_tokens=MAX_TOKENS, grammar=json_grammar(SCHEMA),
                                      logit_bias={z: 30.0}, frequency_penalty=0.5, presence_penalty=0.5))
    for choice in run(engine).values():
        reply = json.loads(choice["text"])
        jsonschema.validate(reply, SCHEMA)
        # the bias wins wherever the grammar allows "z" (the string's first character may come in the
        # token that opens it)
        assert reply["name"].endswith("z" * 7)


def test_log_probabilities_are_the_models_own_before_the_grammar(model, tok):
    engine = make_engine(model, tok)
    prompt = tok.encode("hello", prepend="<|bos|>")
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3,
                                                   grammar=json_grammar(SCHEMA)))
    choice = run(engine)["r", 0]
    with torch.no_grad():
        full = model(torch.tensor([prompt + choice["tokens"]])).float().log_softmax(dim=-1)[0]
    masked_top = 0
    for i, (token, (logprob, top)) in enumerate(zip(choice["tokens"], choice["logprobs"], strict=True)):
        position = full[len(prompt) - 1 + i]
        assert logprob == pytest.approx(position[token].item(), abs=1e-4)
        assert [t for t, _ in top] == position.topk(3).indices.tolist()
        masked_top += top[0][0] != token
    assert masked_top > 0  # the model's favourite was often a token the grammar ruled out


def test_a_grammar_survives_preemption_and_the_prefix_cache(model, tok):
    prompt = tok.encode("the quick brown fox jumps over the lazy dog", prepend="<|bos|>")
    params = SamplingParams(temperature=0.0, n=6, max_tokens=MAX_TOKENS, grammar=json_grammar(SCHEMA))
    roomy = make_engine(model, tok)
    roomy.add_request("r", prompt, params)
    expected = run(roomy)
    tight = make_engine(model, tok, num_blocks=40)  # 6 choices of ~100 tokens cannot all hold their blocks
    tight.add_request("r", prompt, params)
    assert run(tight) == expected
    assert tight.stats()["preemptions"] > 0 and tight.stats()["prefix_cache_hits"] > 0


def test_a_grammar_that_does_not_compile_is_refused_when_added(model, tok):
    engine = make_engine(model, tok)
    with pytest.raises(ValueError, match="grammar"):
        engine.add_request("r", [tok.get_bos_token_id()], SamplingParams(grammar="start: nonsense ::= ("))
    assert not engine.has_work()
