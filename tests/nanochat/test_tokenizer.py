"""Behaviour of nanochat.tokenizer: exact round trips, special tokens, batching, serialisation, chat rendering."""

import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
VOCAB_SIZE = 1024

# a little of several scripts, emoji and digits, so that the corpus is not only English
UNICODE_SAMPLE = """\
Größe, Übermaß und Äpfel. Ça coûte 12,50 € — très cher!
Привет, как дела? Всё хорошо, спасибо.
日本語のテキストも少し入れます。東京は大きい都市です。
안녕하세요, 만나서 반갑습니다.
مرحبا بالعالم. שלום עולם.
The year 1984 had 365 days; π ≈ 3.14159 and e ≈ 2.71828. 🚀🎉 naïve café
"""


def corpus() -> list[str]:
    shakespeare = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000]
    code = [Path(__file__).read_text(encoding="utf-8"), Path(__file__).parents[2].joinpath("nanochat", "tokenizer.py").read_text(encoding="utf-8")]
    return shakespeare.split("\n\n") + code + [UNICODE_SAMPLE] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(corpus(), VOCAB_SIZE)


# text mixing arbitrary Unicode with the literal special-token strings
text_with_specials = st.lists(st.one_of(st.text(), st.sampled_from(SPECIAL_TOKENS))).map("".join)

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute."},
                {"type": "python", "text": "2+2"},
                {"type": "python_output", "text": "4"},
                {"type": "text", "text": "It is 4."},
            ],
        },
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]
}


# ---------------------------------------------------------------------- training and vocabulary


def test_trained_vocab_size_is_the_requested_one_specials_included(tok):
    assert tok.vocab_size == VOCAB_SIZE
    special_ids = sorted(tok.encode_special(name) for name in SPECIAL_TOKENS)
    assert special_ids == list(range(VOCAB_SIZE - len(SPECIAL_TOKENS), VOCAB_SIZE))


def test_small_vocab_size_is_honoured():
    small = Tokenizer.train_from_iterator([UNICODE_SAMPLE] * 5, 300)
    assert small.vocab_size == 300


def test_vocab_size_without_room_for_bytes_and_specials_is_rejected():
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train_from_iterator(["abc"], 264)


# ---------------------------------------------------------------------- round trips


@settings(deadline=None)
@given(st.text())
def test_any_text_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(deadline=None)
@given(st.text())
def test_token_bytes_concatenate_to_the_utf8_of_the_text(tok, text):
    assert b"".join(tok.id_to_bytes(i) for i in tok.encode(text)) == text.encode("utf-8")


def test_training_text_round_trips_and_compresses(tok):
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[300_000:400_000]  # unseen in training
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(text.encode("utf-8")) / len(ids) > 2.0  # merges at work: one token per byte would be 1.0


# ---------------------------------------------------------------------- special tokens


def test_each_special_token_is_one_id_that_decodes_to_its_name(tok):
    ids = [tok.encode_special(name) for name in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>")
    for name, i in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tok.decode([i]) == name
        assert tok.id_to_token(i) == name
        assert tok.id_to_bytes(i) == b""


def test_encode_special_rejects_ordinary_strings(tok):
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("the")


@settings(deadline=None)
@given(text_with_specials)
def test_special_strings_inside_text_encode_as_ordinary_bytes(tok, text):
    special_ids = {tok.encode_special(name) for name in SPECIAL_TOKENS}
    ids = tok.encode(text)
    assert not special_ids & set(ids)
    assert tok.decode(ids) == text


# ---------------------------------------------------------------------- encode API


@settings(deadline=None, max_examples=50)
@given(st.lists(text_with_specials, max_size=8))
def test_batched_encode_equals_encoding_each_text(tok, texts):
    assert tok.encode(texts) == [tok.encode(t) for t in texts]


def test_prepend_and_append_take_names_or_ids(tok):
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    body = tok.encode("hello world")
    assert tok.encode("hello world", prepend="<|bos|>", append=end) == [bos, *body, end]
    assert tok.encode(["hello world", ""], prepend=bos) == [[bos, *body], [bos]]
    assert tok.encode(["hello world"], append="<|assistant_end|>") == [[*body, end]]


def test_encode_rejects_other_types(tok):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_id_to_token_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.id_to_token(VOCAB_SIZE)


# ---------------------------------------------------------------------- serialisation


def test_json_round_trip_encodes_identically(tok):
    loaded = Tokenizer.from_json(tok.to_json())
    texts = [UNICODE_SAMPLE, "<|bos|>To be, or not to be<|user_end|>", "def f(x):\n    return x ** 2\n"]
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode(texts) == tok.encode(texts)  # also: specials in text stay bytes after loading
    assert [loaded.encode_special(n) for n in SPECIAL_TOKENS] == [tok.encode_special(n) for n in SPECIAL_TOKENS]


def test_save_and_load_a_file(tok, tmp_path):
    path = tmp_path / "tokenizer" / "tokenizer.json"
    tok.save(path)
    assert Tokenizer.load(path).encode(UNICODE_SAMPLE) == tok.encode(UNICODE_SAMPLE)


def test_json_without_the_special_tokens_is_rejected(tok):
    data = json.loads(tok.to_json())
    data["added_tokens"] = []
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer.from_json(json.dumps(data))


# ---------------------------------------------------------------------- chat rendering


def test_render_conversation_text_merges_system_and_marks_tool_parts(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    assert len(ids) == len(mask)
    assert ids[0] == tok.get_bos_token_id()
    assert tok.decode(ids) == (
        "<|bos|><|user_start|>Be brief.\n\nWhat is 2+2?<|user_end|>"
        "<|assistant_start|>Let me compute.<|python_start|>2+2<|python_end|>"
        "<|output_start|>4<|output_end|>It is 4.<|assistant_end|>"
        "<|user_start|>Thanks<|user_end|><|assistant_start|>You're welcome.<|assistant_end|>"
    )


def test_render_conversation_mask_covers_exactly_what_the_assistant_writes(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    trained = [i for i, m in zip(ids, mask, strict=True) if m == 1]
    # tool output and <|assistant_start|> come from outside the model: not trained on
    assert tok.decode(trained) == (
        "Let me compute.<|python_start|>2+2<|python_end|>It is 4.<|assistant_end|>You're welcome.<|assistant_end|>"
    )


def test_render_conversation_leaves_the_input_unchanged(tok):
    conversation = copy.deepcopy(CONVERSATION)
    tok.render_conversation(conversation)
    assert conversation == CONVERSATION


def test_render_conversation_truncates_to_max_tokens(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    short_ids, short_mask = tok.render_conversation(CONVERSATION, max_tokens=10)
    assert (short_ids, short_mask) == (ids[:10], mask[:10])


@pytest.mark.parametrize(
    "messages, error",
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "assistant", "content": "a"}], "alternate"),
        ([{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}], "followed by a user"),
        ([], "at least one user message"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text"}]}], "needs a str 'text'"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": ""}]}], "unknown part type"),
        ([{"role": "user", "content": ["a"]}], "user content must be a str"),
    ],
)
def test_render_conversation_rejects_malformed_conversations(tok, messages, error):
    with pytest.raises(ValueError, match=error):
        tok.render_conversation({"messages": messages})


def test_render_for_completion_primes_the_assistant(tok):
    prompt = tok.render_for_completion(CONVERSATION)
    without_last = {"messages": CONVERSATION["messages"][:-1]}
    assert prompt == tok.render_conversation(without_last)[0] + [tok.encode_special("<|assistant_start|>")]
    assert tok.decode(prompt).endswith("<|user_start|>Thanks<|user_end|><|assistant_start|>")


def test_render_for_completion_of_a_conversation_ending_with_the_user_is_the_same_prompt(tok):
    ending_with_user = {"messages": CONVERSATION["messages"][:-1]}
    assert tok.render_for_completion(ending_with_user) == tok.render_for_completion(CONVERSATION)


def test_render_for_completion_rejects_a_conversation_without_a_user_message(tok):
    with pytest.raises(ValueError, match="at least one user message"):
        tok.render_for_completion({"messages": [{"role": "assistant", "content": "hi"}]})


def test_render_for_continuation_leaves_the_final_message_open(tok):
    prompt = tok.render_for_continuation(CONVERSATION)
    assert prompt == tok.render_conversation(CONVERSATION)[0][:-1]
    assert tok.decode(prompt).endswith("<|user_start|>Thanks<|user_end|><|assistant_start|>" +
                                       CONVERSATION["messages"][-1]["content"])
    with pytest.raises(ValueError, match="the assistant's"):
        tok.render_for_continuation({"messages": CONVERSATION["messages"][:-1]})
