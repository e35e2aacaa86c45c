"""
The same BPE as a tokenizer.json, run by tiktoken: identical ids, faster encoding.

Notable:
- tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF merges the adjacent pair
  that comes first in its merge list. With rank = HF id, the two pick the same pair at every step when
  (a) each merge makes a new token, numbered in merge order (then ranks order pairs as the merge list
  does), and (b) HF's BPE encodes every token's own bytes to that one token. (b) matters because tiktoken
  merges any two adjacent tokens whose concatenation is in the vocabulary, HF only listed pairs: if HF
  ever held such a pair unmerged, the same pair would stay unmerged in that token's own bytes (merges
  inside a span happen in the same order with or without the text around it), and HF would not give
  back the token. Both checks run on every conversion, over the whole vocabulary.
- The split regex runs in another engine (fancy-regex, not Oniguruma), so only the pattern whose
  splits were compared over every Unicode code point (the tokenizer's SPLIT_PATTERN) is accepted.
- Anything else a tokenizer.json may hold that tiktoken cannot do (a normalizer, non-byte-level
  symbols, added tokens that match inside text, BPE dropout, word suffixes) makes the conversion
  refuse with the reason; the caller keeps HF then.
- Special tokens are given to tiktoken at their HF ids, for decoding; encode_ordinary never matches them
  in text, as HF with encode_special_tokens does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tiktoken


class NotExpressible(ValueError):
    """The tokenizer.json does something tiktoken cannot reproduce exactly."""


def tiktoken_encoding(
    spec: dict[str, Any],
    split_pattern: str,
    byte_decoder: dict[str, int],
    bpe_tokenize: Callable[[str], list[int]],
) -> tiktoken.Encoding:
    """A tiktoken Encoding giving the same ids as the HF tokenizer described by `spec` (tokenizer.json, parsed).

    split_pattern: the only pre-tokenizer regex accepted. byte_decoder: byte-level symbol -> byte.
    bpe_tokenize: HF's BPE model alone on one pre-tokenized word in byte-level symbols (ids out).
    Raises NotExpressible naming the first thing tiktoken cannot reproduce."""
    _check_pipeline(spec, split_pattern)
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    ranks = _mergeable_ranks(vocab, byte_decoder)
    _check_merge_order(model["merges"], vocab)
    _check_tokens_encode_to_themselves(vocab, bpe_tokenize)
    specials = _special_tokens(spec["added_tokens"], vocab)
    return tiktoken.Encoding(name="nanochat", pat_str=split_pattern, mergeable_ranks=ranks, special_tokens=specials)


def _check_pipeline(spec: dict[str, Any], split_pattern: str) -> None:
    """No normalizer; the pre-tokenizer is exactly split_pattern then byte-level symbols; plain BPE."""
    if spec.get("normalizer") is not None:
        raise NotExpressible(f"it has a normalizer ({spec['normalizer'].get('type')})")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if [s.get("type") for s in steps] != ["Split", "ByteLevel"]:
        raise NotExpressible(f"its pre-tokenizer is {[s.get('type') for s in steps]}, not [Split, ByteLevel]")
    split, byte_level = steps
    if split.get("pattern") != {"Regex": split_pattern} or split.get("behavior") != "Isolated" or split.get("invert"):
        raise NotExpressible("its split is not SPLIT_PATTERN, isolated (the one regex checked in both engines)")
    if byte_level.get("add_prefix_space") or byte_level.get("use_regex"):
        raise NotExpressible("its byte-level step adds a prefix space or splits by GPT-2's regex")
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise NotExpressible(f"its model is {model.get('type')}, not BPE")
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("byte_fallback"):
        raise NotExpressible("its BPE uses dropout, a subword prefix, a word suffix or byte fallback")


def _mergeable_ranks(vocab: dict[str, int], byte_decoder: dict[str, int]) -> dict[bytes, int]:
    """Token bytes -> HF id, every byte among them."""
    ranks = {}
    for token, id in vocab.items():
        if any(c not in byte_decoder for c in token):
            raise NotExpressible(f"token {token!r} is not made of byte-level symbols")
        ranks[bytes(byte_decoder[c] for c in token)] = id
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise NotExpressible(f"{len(missing)} bytes are not tokens (e.g. {missing[0]})")
    return ranks


def _check_merge_order(merges: list, vocab: dict[str, int]) -> None:
    """Each merge makes a token numbered after the previous merge's (so no two merges make the same token)."""
    previous = -1
    for i, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ")  # older files: "a b"
        id = vocab.get(left + right)
        if id is None or id <= previous:
            raise NotExpressible(f"merge {i} ({left!r}, {right!r}) does not make a new token numbered in merge order")
        previous = id


def _check_tokens_encode_to_themselves(vocab: dict[str, int], bpe_tokenize: Callable[[str], list[int]]) -> None:
    for token, id in vocab.items():
        if bpe_tokenize(token) != [id]:
            raise NotExpressible(f"HF's BPE does not encode token {token!r} to itself")


def _special_tokens(added_tokens: list[dict[str, Any]], vocab: dict[str, int]) -> dict[str, int]:
    """Added tokens must all be special (HF leaves those unmatched in text) and outside the BPE ids."""
    specials, ids = {}, set(vocab.values())
    for added in added_tokens:
        if not added.get("special"):
            raise NotExpressible(f"added token {added['content']!r} is not special, so HF matches it inside text")
        if added["id"] in ids or added["content"] in vocab:
            raise NotExpressible(f"added token {added['content']!r} shares an id or text with the BPE vocabulary")
        specials[added["content"]] = added["id"]
    return specials
