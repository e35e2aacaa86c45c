"""
Generation with a KV cache: the one generate function of chat evals, RL and the terminal chat.

Notable:
- the prompt is prefilled once into row 0 of the cache, then copied to every row, and num_samples
  continuations are decoded together one token per step (nanochat's Engine.generate). Serving has its
  own continuous-batching engine (serving/engine/); this one is for one prompt at a time, no Ray.
- every row draws its own first token from the prefill logits (nanochat broadcasts row 0's).
- sampling: temperature 0 is greedy; otherwise top-k (if given), softmax of logits / temperature and
  one draw per row from a torch.Generator seeded by `seed`: same seed, same completions.
- a row stops at <|assistant_end|> or <|bos|> (which it keeps), or after max_tokens tokens.
- the calculator tool: when a row writes <|python_start|> expr <|python_end|>, expr goes through the
  safe evaluator (nanochat/tools.py) and, if it gives a result, the row is made to continue with
  <|output_start|> result <|output_end|>. Forced tokens are fed through the model like sampled ones
  and flagged 1 in the forced mask, so that RL can leave them out of the loss.
- float32 on CPU; bfloat16 autocast and a bfloat16 cache on CUDA.
"""

from collections import deque
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanochat.kv_cache import KVCache
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from nanochat.tools import safe_eval

DONE = -1  # what a row reports in the columns after it has stopped


@dataclass
class _Row:
    forced: deque[int] = field(default_factory=deque)  # tool output waiting to be fed
    expr: list[int] | None = None  # tokens of the tool call being written, None outside one
    done: bool = False


class _Specials:
    def __init__(self, tokenizer: Tokenizer):
        sp = tokenizer.encode_special
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.bos = tokenizer.get_bos_token_id()
        self.stop = {sp("<|assistant_end|>"), self.bos}


def sample_next(logits: Tensor, generator: torch.Generator, temperature: float, top_k: int | None) -> Tensor:
    """One token id per row (B,) from logits (B, V)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if top_k is not None and top_k < logits.size(-1):
        values, ids = logits.topk(top_k, dim=-1)
        choice = torch.multinomial(F.softmax(values / temperature, dim=-1), 1, generator=generator)
        return ids.gather(1, choice).squeeze(1)
    return torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=generator).squeeze(1)


@torch.inference_mode()
def generate(model: nn.Module, tokenizer: Tokenizer, prompt_ids: list[int], num_samples: int = 1,
             max_tokens: int = 256, temperature: float = 1.0, top_k: int | None = None,
             seed: int | None = None) -> Iterator[tuple[list[int], list[int]]]:
    """Stream num_samples continuations of prompt_ids (a GPT with forward_cached), one step at a time.

    Yields (token_column, forced_mask): the next token of each row and 1 where it was forced by the
    calculator tool. A row that has stopped reports DONE (-1) with mask 0; the generator ends when every
    row has stopped or after max_tokens steps."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: a prompt needs at least one token (e.g. <|bos|>)")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    cuda = device.type == "cuda"
    specials = _Specials(tokenizer)
    # the last token is sampled, never fed: the prompt plus max_tokens - 1 positions suffice
    cache = KVCache.for_model(model, num_samples, len(prompt_ids) + max_tokens,
                              dtype=torch.bfloat16 if cuda else None)
    rows = [_Row() for _ in range(num_samples)]

    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    logits = _forward(model, prompt, cache.rows(0, 1), torch.zeros(1, dtype=torch.long, device=device))
    cache.copy_row_to_all(0)
    logits = logits.expand(num_samples, -1)
    column: list[int] = []  # the previous step's tokens, fed at the start of the next one
    last_fed = [prompt_ids[-1]] * num_samples  # each row's newest token in the cache (smear reads it)
    for _ in range(max_tokens):
        if column:
            # stopped rows are fed a stop token: the batch stays rectangular, their output is dropped
            fed = [token if token != DONE else specials.bos for token in column]
            logits = _forward(model, torch.tensor(fed, dtype=torch.long, device=device)[:, None], cache,
                              torch.tensor(last_fed, dtype=torch.long, device=device))
            last_fed = fed
        sampled = sample_next(logits, generator, temperature, top_k).tolist()
        column, forced_mask = [], []
        for row, token in zip(rows, sampled, strict=True):
            token, forced = _next_token(row, token, specials, tokenizer)
            column.append(token)
            forced_mask.append(forced)
        yield column, forced_mask
        if all(row.done for row in rows):
            return


def _forward(model: nn.Module, ids: Tensor, cache: KVCache, prev_ids: Tensor) -> Tensor:
    """float32 logits (B, V) of the last position; prev_ids (B,) the token before each row's ids. Autocast
    is entered per call, never held across a yield, where it would leak into the caller's code."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ids.device.type == "cuda" else nullcontext()
    with autocast:
        return model.forward_cached(ids, cache, prev_idx=prev_ids)[:, -1].float()


def _next_token(row: _Row, sampled: int, sp: _Specials, tokenizer: Tokenizer) -> tuple[int, int]:
    """The token a row takes this step (waiting tool output wins over the sample), and whether it was
    forced; advances the row's tool and stop state."""
    if row.done:
        return DONE, 0
    forced = bool(row.forced)
    token = row.forced.popleft() if forced else sampled
    if token in sp.stop:
        row.done = True
    elif token == sp.python_start:
        row.expr = []
    elif token == sp.python_end and row.expr is not None:
        result = safe_eval(tokenizer.decode(row.expr))
        if result is not None:
            row.forced.extend([sp.output_start, *tokenizer.encode(result), sp.output_end])
        row.expr = None
    elif row.expr is not None:
        row.expr.append(token)
    return token, int(forced)


def generate_batch(model: nn.Module, tokenizer: Tokenizer, prompt_ids: list[int], num_samples: int = 1,
                   **kwargs) -> tuple[list[list[int]], list[list[int]]]:
    """generate() run to the end: each row's completion (without the prompt, ending with its stop
    token if it hit one) and its forced mask. kwargs: max_tokens, temperature, top_k, seed."""
    completions: list[list[int]] = [[] for _ in range(num_samples)]
    masks: list[list[int]] = [[] for _ in range(num_samples)]
    for column, forced_mask in generate(model, tokenizer, prompt_ids, num_samples, **kwargs):
        for completion, mask, token, forced in zip(completions, masks, column, forced_mask, strict=True):
            if token != DONE:
                completion.append(token)
                mask.append(forced)
    return completions, masks


def complete_chat(model: nn.Module, tokenizer: Tokenizer, conversation: dict, max_tokens: int = 256,
                  temperature: float = 0.0, top_k: int | None = None, seed: int | None = None) -> str:
    """The assistant's next message for a conversation, as text without special tokens (tool calls and
    outputs keep their text). Greedy by default: evals want the model's best answer."""
    prompt = tokenizer.render_for_completion(conversation)
    (completion,), _ = generate_batch(model, tokenizer, prompt, 1, max_tokens=max_tokens,
                                      temperature=temperature, top_k=top_k, seed=seed)
    special = {tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
    return tokenizer.decode([t for t in completion if t not in special])
