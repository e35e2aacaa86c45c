"""
Grammar-constrained decoding (structured output): the tokens a sequence may take next, from llguidance.

Notable:
- a grammar travels in SamplingParams as llguidance's serialised grammar (a str: picklable, so it crosses
  Ray like any param); json_grammar() builds one from a JSON Schema and refuses, with llguidance's
  reason, a schema that is invalid or uses a keyword it does not implement (uniqueItems, not, if/then/
  else, ...): such a schema is never silently loosened.
- JSON is written with fixed separators (", " and ": ", as json.dumps) and no other whitespace: with a
  schema whose strings, arrays and numbers are bounded (maxLength, maxItems, enum, minimum/maximum) the
  language is finite, so even a poor model's reply ends within a known number of tokens.
- each sequence has its own LLMatcher (compiled from the grammar when the request is added; the n
  choices of a request copy the first). A step fills the bitmasks of all the constrained rows in one
  parallel call and turns them into a logit bias (0 or -inf) with one table lookup; the sampler adds it
  to those rows in one op. Nothing here runs for unconstrained rows.
- the matcher knows the end-of-turn tokens as its end of sequence: they are allowed exactly where the
  grammar may end. A request's own stop_token_ids are allowed there too; where the grammar itself
  produces such a token, it ends the reply as a stop string would.
- a matcher that can take nothing more but the end (is_stopped) has completed its grammar: the engine
  ends the sequence there with "stop", without spending a step on an end token.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import torch
from torch import Tensor

from nanochat.tokenizer import Tokenizer

# no whitespace but the separators': a finite language for a bounded schema (see above)
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                                "lenient": False}
ANY_OBJECT: dict[str, Any] = {"type": "object"}  # response_format json_object
# the logit bias of each bit of a byte (lowest bit first): 0 where set, -inf where not
_BYTE_BIAS = torch.where(((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool(), 0.0, float("-inf"))


def json_grammar(schema: dict[str, Any]) -> str:
    """The grammar of JSON text that validates against schema, or a ValueError saying why there is none."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e:  # not a JSON object
        raise ValueError(f"not a JSON Schema object: {e}") from None
    check_grammar(grammar)
    return grammar


def regex_grammar(pattern: str) -> str:
    """The grammar of text that the regular expression (Rust regex syntax, as llguidance reads it) matches
    whole, or a ValueError saying why there is none."""
    grammar = llguidance.LLMatcher.grammar_from_regex(pattern)
    check_grammar(grammar)
    return grammar


def choice_grammar(choices: list[str]) -> str:
    """The grammar of exactly one of choices: a regex of the alternatives, each character written as its
    code point, so that no choice's text is read as regex syntax."""
    return regex_grammar("|".join("".join(f"\\x{{{ord(ch):x}}}" for ch in choice) or "()" for choice in choices))


def lark_grammar(text: str) -> str:
    """The grammar of a context-free grammar in llguidance's Lark syntax (its rule `start` is the whole
    reply), or a ValueError saying why there is none."""
    grammar = llguidance.LLMatcher.grammar_from_lark(text)
    check_grammar(grammar)
    return grammar


def check_grammar(grammar: str) -> None:
    """ValueError with llguidance's message when grammar cannot be compiled."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError("; ".join(messages))


def bitmask_bias(bitmask: Tensor, vocab_size: int) -> Tensor:
    """(G, vocab_size) float32, 0 where the (G, ceil(vocab_size / 32)) int32 bitmask sets token t's bit (bit
    t % 32 of word t // 32) and -inf elsewhere: a bias to add to logits. One table lookup per byte of the
    mask (a little-endian host's words are their bytes lowest first), then one addition; this beats
    unpacking bits and masked_fill by far on a CPU."""
    table = _BYTE_BIAS.to(bitmask.device)
    bias = table.index_select(0, bitmask.view(torch.uint8).flatten().int())
    return bias.view(bitmask.size(0), -1)[:, :vocab_size]


class Grammars:
    """One engine's grammar machinery: its vocabulary as llguidance sees it, and the executor that fills the
    constrained rows' masks in parallel. Every method runs on the engine's thread."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, end_tokens: list[int]):
        # vocab_size: the model's, which may pad the tokenizer's; the padding ids are never allowed
        self.vocab_size = vocab_size
        self.vocabulary = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=end_tokens)
        self.executor = llguidance.LLExecutor()

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher at the start of grammar; ValueError if it does not compile."""
        matcher = llguidance.LLMatcher(self.vocabulary, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar does not compile: {matcher.get_error()}")
        return matcher

    def bias(self, matchers: list[llguidance.LLMatcher], stop_token_ids: list[list[int]]) -> Tensor:
        """(G, vocab_size) float32: 0 for the tokens each matcher may take next, its row's stop tokens
        included where the grammar may end, and -inf for the others."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.zeros(len(matchers), words, dtype=torch.int32)
        # what llguidance.torch.fill_next_token_bitmask_par does, without importing that module (it compiles
        # a kernel with torch.compile on import, which takes seconds)
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                              words * 4, len(matchers))
        bias = bitmask_bias(bitmask, self.vocab_size).contiguous()
        ending = [(i, t) for i, m in enumerate(matchers) if m.is_accepting()
                  for t in stop_token_ids[i] if t < self.vocab_size]
        if ending:
            rows, tokens = zip(*ending)
            bias[list(rows), list(tokens)] = 0.0
        return bias

    @staticmethod
    def advance(matcher: llguidance.LLMatcher, token: int) -> bool:
        """Feed the token the sequence took; whether the grammar is now complete. A token outside the
        grammar is a bug (the mask allowed it): RuntimeError."""
        if not matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its mask allowed: {matcher.get_error()}")
        return matcher.is_stopped()
