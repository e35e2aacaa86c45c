"""
Log-probabilities in OpenAI's shapes: a generated token's as the engine gave them (TokenInfo), a token as
OpenAI's logprobs write it, chat's and completions' entries, and the echoed prompt's.

Notable:
- they come from the engine: the model's own distribution, before temperature, top-k and top-p (vLLM's
  default). A token is its text (a cut UTF-8 character shows as U+FFFD, its exact bytes in `bytes`), a
  special token its name.
- chat has one entry per generated token but the stop token (OpenAI shows no end of turn); completions one
  per completion token, the stop token included, as vLLM (clients that score a prompt with max_tokens 1,
  such as lm-evaluation-harness, count on exactly one entry after the prompt's). A completion's
  text_offset is where the text sent so far stood when the token came (text held back for a stop string
  comes later).
- completions' echo puts the prompt before each choice's text: a text as sent, token ids decoded (special
  tokens by name, as /detokenize writes them). With logprobs it also scores the prompt (the engine's
  prompt_logprobs): an entry per prompt token, the first one's logprob and top_logprobs null, as vLLM
  returns them.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from nanochat.tokenizer import Tokenizer
from serving.api.schemas import ChoiceLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from serving.engine.llm_engine import Logprobs


@dataclass
class TokenInfo:
    """A generated token's log-probabilities, and where its text starts in its choice's text."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int


def token_piece(tokenizer: Tokenizer, token: int, as_id: bool = False) -> dict:
    """A token as OpenAI's logprobs write it: its text and exact bytes (a special token: its name, no bytes).
    as_id: its text is "token_id:<id>" (vLLM's return_tokens_as_token_ids: the exact token for a client that
    trains on it, whatever its text)."""
    if token >= tokenizer.vocab_size:  # the model's vocabulary can be padded beyond the tokenizer's
        return {"token": f"token_id:{token}", "bytes": None}
    data = tokenizer.id_to_bytes(token)
    if as_id:
        return {"token": f"token_id:{token}", "bytes": list(data) if data else None}
    if not data:
        return {"token": tokenizer.decode([token]), "bytes": None}
    return {"token": data.decode("utf-8", errors="replace"), "bytes": list(data)}


def chat_logprobs(tokenizer: Tokenizer, infos: list[TokenInfo], as_ids: bool = False) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprob(**token_piece(tokenizer, i.token, as_ids), logprob=i.logprob,
                     top_logprobs=[TopLogprob(**token_piece(tokenizer, t, as_ids), logprob=lp) for t, lp in i.top])
        for i in infos])


def top_dict(tokenizer: Tokenizer, top: list[tuple[int, float]], as_ids: bool = False) -> dict[str, float]:
    """The legacy shape's {token text: logprob}; of two tokens with the same text (a cut character shows
    as U+FFFD) the likelier one keeps the key."""
    found: dict[str, float] = {}
    for token, logprob in top:
        found.setdefault(token_piece(tokenizer, token, as_ids)["token"], logprob)
    return found


@dataclass
class Echo:
    """An echoed prompt: its text, and where each of its tokens starts in it."""

    ids: list[int]
    text: str
    offsets: list[int]

    @classmethod
    def of(cls, tokenizer: Tokenizer, ids: list[int], added_bos: bool) -> Echo:
        """added_bos: ids[0] is the <|bos|> the server put before a text prompt, which shows no text (the
        text is then the prompt as sent); other special tokens show their names."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text, offsets = "", []
        for i, token in enumerate(ids):
            offsets.append(len(text))
            data = tokenizer.id_to_bytes(token)
            if data:
                text += decoder.decode(data)
            elif not (added_bos and i == 0):
                text += decoder.decode(b"", final=True) + tokenizer.decode([token])
        return cls(ids, text + decoder.decode(b"", final=True), offsets)


def completion_logprobs(tokenizer: Tokenizer, infos: list[TokenInfo], echo: Echo | None = None,
                        prompt: list[Logprobs | None] | None = None, as_ids: bool = False) -> CompletionLogprobs:
    """The generated tokens' entries, after the echoed prompt's (when echoed with its log-probabilities:
    prompt, one per prompt token) and offset by its text; as_ids: tokens written as their ids."""
    start = len(echo.text) if echo is not None else 0
    entries = [(i.token, i.logprob, top_dict(tokenizer, i.top, as_ids), start + i.offset) for i in infos]
    if echo is not None and prompt is not None:
        entries = [(token, None if lp is None else lp[0], None if lp is None else top_dict(tokenizer, lp[1], as_ids),
                    offset) for token, lp, offset in zip(echo.ids, prompt, echo.offsets, strict=True)] + entries
    return CompletionLogprobs(tokens=[token_piece(tokenizer, token, as_ids)["token"] for token, _, _, _ in entries],
                              token_logprobs=[lp for _, lp, _, _ in entries],
                              top_logprobs=[top for _, _, top, _ in entries],
                              text_offset=[offset for _, _, _, offset in entries])
