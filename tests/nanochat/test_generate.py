"""Generation with the KV cache (nanochat/generate.py): equal to recomputing, seeded, stopping, and the calculator tool."""

import pytest
import torch

from nanochat.generate import DONE, complete_chat, generate, generate_batch
from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import KVCache
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from tests.support.bigram import bigram_model, chain, tool_model
from tests.support.gpt_fixtures import scrambled_model


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # 256 bytes + the special tokens and no merges: every character is one token
    return Tokenizer.train_from_iterator(["calculator 0123456789 +-*/"], 256 + len(SPECIAL_TOKENS))


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    """A tiny model whose every path matters: nanochat's init zeroes the output projections, which
    would make the model ignore its context and the cache comparisons pass without attention."""
    config = GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=3, n_head=4, n_kv_head=2,
                       n_embd=64, window_pattern="SL")
    return scrambled_model(config, scale=2.0)


def prompt(tok: Tokenizer, text: str = "calculator") -> list[int]:
    return tok.encode(text, prepend="<|bos|>")


def stop_ids(tok: Tokenizer) -> set[int]:
    return {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}


def greedy_by_recomputing(model: GPT, ids: list[int], max_tokens: int, stops: set[int]) -> list[int]:
    """The reference: a full forward over the whole sequence at every step, no cache."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids + out]))[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] in stops:
                break
    return out


# ---------------------------------------------------------------------------------------------
# the cache and sampling


def test_greedy_generation_with_the_cache_equals_recomputing(model, tok):
    # past sequence_len (32) too: the sliding window and the rotary tables must follow
    ids = prompt(tok)
    expected = greedy_by_recomputing(model, ids, 40, stop_ids(tok))
    assert len(expected) > 10, "the reference stopped too early to compare much"
    (completion,), (mask,) = generate_batch(model, tok, ids, max_tokens=40, temperature=0.0)
    assert completion == expected
    assert mask == [0] * len(completion)


def test_greedy_generation_with_smear_and_backout_equals_recomputing(tok):
    """smear reads the token before each new one: the prompt's last for the first decode, then each row's own."""
    config = GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=3, n_head=4, n_kv_head=2,
                       n_embd=64, window_pattern="SL", smear=True, backout=True)
    model = scrambled_model(config, scale=2.0)
    ids = prompt(tok)
    expected = greedy_by_recomputing(model, ids, 40, stop_ids(tok))
    assert len(expected) > 10, "the reference stopped too early to compare much"
    rows, _ = generate_batch(model, tok, ids, num_samples=2, max_tokens=40, temperature=0.0)
    assert rows == [expected] * 2


def test_greedy_rows_are_all_the_single_row_completion(model, tok):
    (single,), _ = generate_batch(model, tok, prompt(tok), max_tokens=20, temperature=0.0)
    rows, _ = generate_batch(model, tok, prompt(tok), num_samples=3, max_tokens=20, temperature=0.0)
    assert rows == [single] * 3


def test_sampled_rows_differ(model, tok):
    rows, _ = generate_batch(model, tok, prompt(tok), num_samples=4, max_tokens=20, temperature=1.0, seed=0)
    assert len({tuple(row) for row in rows}) == 4


def test_a_seed_reproduces_its_samples_and_another_seed_does_not(model, tok):
    def run(seed: int) -> list[list[int]]:
        return generate_batch(model, tok, prompt(tok), num_samples=3, max_tokens=20, temperature=1.0,
                              top_k=50, seed=seed)[0]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_1_is_greedy(model, tok):
    greedy, _ = generate_batch(model, tok, prompt(tok), num_samples=2, max_tokens=20, temperature=0.0)
    top1, _ = generate_batch(model, tok, prompt(tok), num_samples=2, max_tokens=20, temperature=1.0,
                             top_k=1, seed=3)
    assert top1 == greedy


def test_copy_row_to_all_gives_every_row_the_history_of_one():
    cache = KVCache.empty(batch_size=3, max_len=8, n_layer=2, n_kv_head=1, head_dim=4)
    cache.k[:, 1, :5] = torch.randn(2, 5, 1, 4)
    cache.v[:, 1, :5] = torch.randn(2, 5, 1, 4)
    cache.lengths[1] = 5
    cache.copy_row_to_all(1)
    assert cache.lengths.tolist() == [5, 5, 5]
    for row in (0, 2):
        assert torch.equal(cache.k[:, row, :5], cache.k[:, 1, :5])
        assert torch.equal(cache.v[:, row, :5], cache.v[:, 1, :5])


def test_invalid_sampling_arguments_are_rejected(model, tok):
    for kwargs in ({"temperature": -1.0}, {"top_k": 0}, {"num_samples": 0}):
        with pytest.raises(ValueError):
            generate_batch(model, tok, prompt(tok), **{"max_tokens": 2, **kwargs})
    with pytest.raises(ValueError, match="empty"):
        generate_batch(model, tok, [], max_tokens=2)


# ---------------------------------------------------------------------------------------------
# a scripted model: stopping and the calculator tool


def test_a_row_stops_at_assistant_end_and_keeps_it(tok):
    sp = tok.encode_special
    text = tok.encode("hi")
    model = bigram_model(tok, chain(sp("<|assistant_start|>"), *text, sp("<|assistant_end|>")), default=text[0])
    (completion,), _ = generate_batch(model, tok, [tok.get_bos_token_id(), sp("<|assistant_start|>")],
                                      max_tokens=20, temperature=0.0)
    assert completion == [*text, sp("<|assistant_end|>")]


def test_a_row_stops_at_bos(tok):
    sp = tok.encode_special
    text = tok.encode("hi")
    model = bigram_model(tok, chain(sp("<|assistant_start|>"), *text, tok.get_bos_token_id()), default=text[0])
    columns = list(generate(model, tok, [sp("<|assistant_start|>")], max_tokens=20, temperature=0.0))
    assert [column[0] for column, _ in columns] == [*text, tok.get_bos_token_id()]


def test_a_row_without_a_stop_token_ends_at_max_tokens(tok):
    a = tok.encode("a")[0]
    model = bigram_model(tok, {}, default=a)
    (completion,), _ = generate_batch(model, tok, [tok.get_bos_token_id()], max_tokens=7, temperature=0.0)
    assert completion == [a] * 7


def test_streaming_reports_done_for_rows_that_stopped(tok):
    a, end = tok.encode("a")[0], tok.encode_special("<|assistant_end|>")
    model = bigram_model(tok, {a: (a, end)}, default=a)  # after each "a": another, or the end, 50/50
    columns = list(generate(model, tok, [a], num_samples=4, max_tokens=30, temperature=1.0, seed=0))
    rows, _ = generate_batch(model, tok, [a], num_samples=4, max_tokens=30, temperature=1.0, seed=0)
    assert len({len(row) for row in rows}) > 1, "rows should stop at different steps"
    assert len(columns) == max(len(row) for row in rows)  # the stream ends when the last row stops
    for i, row in enumerate(rows):
        assert row[-1] == end and set(row[:-1]) <= {a}
        streamed = [column[i] for column, _ in columns]
        assert streamed == row + [DONE] * (len(columns) - len(row))
        assert all(mask[i] == 0 for _, mask in columns)


def test_the_calculator_result_is_forced_into_the_row(tok):
    sp = tok.encode_special
    model = tool_model(tok, "3+1")
    prompt_ids = tok.render_for_completion({"messages": [{"role": "user", "content": "3+1?"}]})
    rows, masks = generate_batch(model, tok, prompt_ids, num_samples=2, max_tokens=20, temperature=0.0)
    call = [sp("<|python_start|>"), *tok.encode("3+1"), sp("<|python_end|>")]
    output = [sp("<|output_start|>"), *tok.encode("4"), sp("<|output_end|>")]
    for completion, mask in zip(rows, masks, strict=True):
        assert completion == [*call, *output, sp("<|assistant_end|>")]
        assert mask == [0] * len(call) + [1] * len(output) + [0]


def test_a_rejected_tool_call_forces_nothing(tok):
    sp = tok.encode_special
    model = tool_model(tok, "x")  # a name: the evaluator refuses it
    (completion,), (mask,) = generate_batch(model, tok, [sp("<|assistant_start|>")], max_tokens=20,
                                            temperature=0.0)
    assert completion == [sp("<|python_start|>"), *tok.encode("x"), sp("<|python_end|>"), sp("<|assistant_end|>")]
    assert mask == [0] * len(completion)


def test_complete_chat_returns_the_reply_text_without_special_tokens(tok):
    model = tool_model(tok, "3+1")
    conversation = {"messages": [{"role": "user", "content": "what is 3+1?"}, {"role": "assistant", "content": "old"}]}
    # the final assistant message is replaced, not continued; tool call and output keep their text
    assert complete_chat(model, tok, conversation, max_tokens=20) == "3+1" + "4"
