"""
A generated token's log-probabilities as the engine gave them, and a token as OpenAI's logprobs write it:
shared by the chat and completions routes (app.py) and the Responses API (responses.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from nanochat.tokenizer import Tokenizer


@dataclass
class TokenInfo:
    """A generated token's log-probabilities, and where its text starts in its choice's text."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int


def token_piece(tokenizer: Tokenizer, token: int) -> dict:
    """A token as OpenAI's logprobs write it: its text and exact bytes (a special token: its name, no bytes)."""
    if token >= tokenizer.vocab_size:  # the model's vocabulary can be padded beyond the tokenizer's
        return {"token": f"token_id:{token}", "bytes": None}
    data = tokenizer.id_to_bytes(token)
    if not data:
        return {"token": tokenizer.decode([token]), "bytes": None}
    return {"token": data.decode("utf-8", errors="replace"), "bytes": list(data)}
