"""tiktoken built from a tokenizer.json gives HF's ids exactly, and refuses the files where it could not."""

import json
import logging
import sysconfig
from pathlib import Path

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.tiktoken_bpe import NotExpressible, tiktoken_encoding
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, _byte_decoder

VOCAB_SIZE = 2048
TRICKY = [
    "",
    " ",
    "\n",
    "   \n\n\t  x  \r\n\r\n   ",
    "a" * 5000,
    " " * 3000 + "end",
    "Größe, Übermaß und Äpfel. Ça coûte 12,50 € — très cher!",
    "日本語のテキスト。안녕하세요. مرحبا بالعالم. שלום עולם. Привет!",
    "🚀🎉👩‍👩‍👧‍👦🏳️‍🌈 e\u0301 \u200b\u200d\ufeff \U0001f9d1\U0001f3fd\u200d\U0001f4bb",
    "1234567890 3.14159 ١٢٣ ⅷ ²³ 𝟙𝟚",
    "don't I'LL we'Ve THEY'RE 's 'd",
    "\x00\x01\x1c\x1d\x1e\x1f\x85\xa0\u2028\u2029\u3000 \t\x0b\x0c",
    "<|bos|>hello<|user_start|> <|assistant_end|>\n<|bos|",
    "def f(x):\n    return x  # comment\n\n\n",
    "\ufffd\U0010ffff\ue000",
]


def stdlib_files(limit_bytes: float = float("inf")) -> list[str]:
    """This Python's standard library .py files as text, in a fixed order, up to about limit_bytes."""
    docs, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        total += len(docs[-1])
        if total >= limit_bytes:
            break
    return docs


def train(vocab_size: int, texts: list[str]) -> str:
    return Tokenizer.train_from_iterator([*texts, *TRICKY], vocab_size).to_json()


@pytest.fixture(scope="module")
def spec() -> str:
    return train(VOCAB_SIZE, stdlib_files(1_000_000))


@pytest.fixture(scope="module")
def pair(spec) -> tuple[Tokenizer, Tokenizer]:
    """(tiktoken-encoding, HF-encoding) tokenizers from one tokenizer.json."""
    fast, hf = Tokenizer.from_json(spec), Tokenizer.from_json(spec, use_tiktoken=False)
    assert (fast.encoder, hf.encoder) == ("tiktoken", "hf")
    return fast, hf


def convert(spec: dict) -> tiktoken.Encoding:
    """tiktoken_encoding of an edited tokenizer.json, checked against HF's BPE as loaded from that file."""
    hf = Tokenizer.from_json(json.dumps(spec), use_tiktoken=False)._hf
    return tiktoken_encoding(spec, SPLIT_PATTERN, _byte_decoder(), lambda t: [x.id for x in hf.model.tokenize(t)])


# ---------------------------------------------------------------------- identical ids


def test_every_stdlib_file_gets_the_same_ids(pair):
    fast, hf = pair
    files = stdlib_files(4_000_000)
    assert fast.encode(files) == hf.encode(files)


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_text_gets_the_same_ids_and_round_trips(pair, text):
    fast, hf = pair
    assert fast.encode(text) == hf.encode(text)
    assert fast.decode(fast.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(), st.sampled_from(SPECIAL_TOKENS), st.sampled_from(TRICKY))).map("".join))
def test_any_text_gets_the_same_ids(pair, text):
    fast, hf = pair
    assert fast.encode(text) == hf.encode(text)


def test_special_token_strings_in_text_are_ordinary_bytes(pair):
    fast, _ = pair
    ids = fast.encode("<|bos|><|assistant_end|>")
    assert not set(ids) & {fast.encode_special(name) for name in SPECIAL_TOKENS}


def test_batches_of_any_size_equal_encoding_each_text(pair):
    fast, _ = pair
    texts = TRICKY * 3
    for n in (0, 1, 2, len(texts)):
        assert fast.encode(texts[:n]) == [fast.encode(t) for t in texts[:n]]


def test_code_points_split_alike_in_both_regex_engines(pair):
    """Every 17th code point in contexts that exercise each branch of the pattern (letters, digits,
    punctuation, whitespace runs, contractions); the slow test below takes all of them."""
    fast, hf = pair
    texts = code_point_probes(range(0, 0x110000, 17))
    assert fast.encode(texts) == hf.encode(texts)


@pytest.mark.slow
def test_every_code_point_splits_alike_in_both_regex_engines(pair):
    fast, hf = pair
    for start in range(0, 0x110000, 0x10000):
        texts = code_point_probes(range(start, start + 0x10000))
        assert fast.encode(texts) == hf.encode(texts), hex(start)


def code_point_probes(code_points: range) -> list[str]:
    chars = [chr(c) for c in code_points if not 0xD800 <= c < 0xE000]  # surrogates are not text
    return [f"a{c}b 1{c}2 {c}{c}x \n{c} '{c}s  {c}\n\n{c}.\t{c}" for c in chars]


@pytest.mark.slow
def test_a_32k_vocabulary_gets_the_same_ids_on_the_whole_standard_library():
    files = stdlib_files()
    spec = train(32768, files[: len(files) // 4])
    fast, hf = Tokenizer.from_json(spec), Tokenizer.from_json(spec, use_tiktoken=False)
    assert fast.encoder == "tiktoken"
    for i in range(0, len(files), 500):
        assert fast.encode(files[i : i + 500]) == hf.encode(files[i : i + 500]), i


# ---------------------------------------------------------------------- files tiktoken cannot reproduce


def test_merges_written_as_strings_by_older_tokenizers_still_convert(spec, pair):
    old = json.loads(spec)
    old["model"]["merges"] = [" ".join(m) for m in old["model"]["merges"]]
    tok = Tokenizer.from_json(json.dumps(old))
    assert tok.encoder == "tiktoken"
    assert tok.encode(TRICKY) == pair[1].encode(TRICKY)


def test_a_pair_hf_never_merges_would_be_merged_by_tiktoken_so_the_file_is_refused():
    """HF: merges b+c first, and has no merge a+bc, so "abc" stays [a, bc]. tiktoken would see that
    a+bc spells the token "abc" (made by ab+c) and merge it: the conversion must refuse."""
    vocab = {**_byte_decoder(), "bc": 256, "ab": 257, "abc": 258}  # bytes numbered by their value
    spec = minimal_spec(vocab, [["b", "c"], ["a", "b"], ["ab", "c"]])
    hf = Tokenizer.from_json(json.dumps(spec), use_tiktoken=False)
    assert [hf.id_to_token(i) for i in hf.encode("abc")] == ["a", "bc"]
    naive = tiktoken.Encoding("naive", pat_str=SPLIT_PATTERN, special_tokens={},
                              mergeable_ranks={bytes(_byte_decoder()[c] for c in t): i for t, i in vocab.items()})
    assert naive.encode_ordinary("abc") == [258]
    with pytest.raises(NotExpressible, match="does not encode token 'abc' to itself"):
        convert(spec)


def minimal_spec(vocab: dict[str, int], merges: list[list[str]]) -> dict:
    n = len(vocab)
    added = [{"id": n + i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, name in enumerate(SPECIAL_TOKENS)]
    tok = Tokenizer.train_from_iterator(["x"], 256 + len(SPECIAL_TOKENS))  # the pipeline around the model
    spec = json.loads(tok.to_json())
    spec["model"]["vocab"], spec["model"]["merges"], spec["added_tokens"] = vocab, merges, added
    return spec


def edited(spec: str, edit) -> dict:
    data = json.loads(spec)
    edit(data)
    return data


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda d: d.update(normalizer={"type": "NFC"}), "normalizer"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+|\s+"), "split is not SPLIT_PATTERN"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"].pop(0), r"\['ByteLevel'\]"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "prefix space"),
    (lambda d: d["model"].update(dropout=0.1), "dropout"),
    (lambda d: d["model"]["merges"].reverse(), "numbered in merge order"),
    (lambda d: d["added_tokens"][0].update(special=False), "not special"),
])
def test_what_tiktoken_cannot_reproduce_is_refused_with_the_reason(spec, edit, reason):
    with pytest.raises(NotExpressible, match=reason):
        convert(edited(spec, edit))


def test_a_refused_file_is_encoded_by_hf_with_a_warning(spec, pair, caplog):
    data = edited(spec, lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+|\s+"))
    with caplog.at_level(logging.WARNING, logger="nanochat.tokenizer"):
        tok = Tokenizer.from_json(json.dumps(data))
    assert tok.encoder == "hf"
    assert "split is not SPLIT_PATTERN" in caplog.text
    assert tok.decode(tok.encode("any text at all")) == "any text at all"
