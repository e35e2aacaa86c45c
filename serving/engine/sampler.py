"""
Next-token sampling for a batch of sequences, each with its own SamplingParams.

Notable:
- float32 throughout, whatever dtype the logits come in.
- first the logits are adjusted, as OpenAI defines it: presence and frequency penalties over each row's
  generated tokens (logit -= frequency_penalty * count + presence_penalty * (count > 0)), vLLM's
  repetition_penalty over the prompt's and the generated tokens (applied first, as vLLM does), then
  logit_bias added, then masked out: the stop tokens of rows short of their min_tokens, the rows' banned
  tokens (ignore_eos's end-of-turn tokens), the last token of each bad word (vLLM's bad_words) whose
  other tokens the row has just generated, and every token but a row's allowed_token_ids. On the batch: the rows' tokens go in flat, with one index_put_ each; rows that ask
  for neither cost nothing. Then the grammar's mask of the constrained rows (structured output), a bias
  of 0 or -inf from serving/engine/grammar.py, added to those rows in one index_add. Greedy rows see the
  adjusted logits too.
- temperature 0 is greedy (argmax); otherwise logits / temperature, then min-p (vLLM's: only tokens at least
  min_p times as likely as the most likely one), top-k, then top-p (the nucleus: the fewest most likely
  tokens whose probability mass reaches top_p, of what min-p and top-k kept), then one draw.
- the draw is inverse-CDF sampling with a single uniform per row, taken from that row's own CPU
  torch.Generator: a row's token depends only on its logits, its params and its generator, never on
  which other requests share the batch, so a seeded request is reproducible (on any device).
- rows that filter (top-k below the vocabulary, top_p < 1) draw in sorted order (stable sort, most likely
  first; when every such row has a top-k, only the largest top-k of the batch is sorted): top-k and the
  nucleus are both a prefix of it, which also bounds the draw to the kept tokens whatever the float
  rounding. The draw takes the first position whose cumulative mass reaches it: a token of probability 0
  (masked by a grammar or min_tokens, or outside the nucleus) shares that mass with the token before it,
  so it is never drawn.
- rows that keep every token draw in vocabulary order instead, with no sort (sorting the vocabulary of
  every row would cost more than the rest of sampling; vLLM skips it likewise): the first token whose
  cumulative mass exceeds the uniform's share of the total, so a token of probability 0 is never drawn
  there either. Inverse-CDF sampling is exact in any fixed order.
"""

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from serving.engine.sequence import SamplingParams
from serving.engine.transfer import to_device


@dataclass
class TokenMask:
    """The tokens some rows may take next (a grammar's): bias[i] (0 allowed, -inf not) is added to rows[i]."""

    rows: list[int]
    bias: Tensor  # (len(rows), V) float32


def make_generator(seed: int | None) -> torch.Generator:
    """The generator of one sequence: seeded by its request, or from OS entropy when it has no seed."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           output_ids: list[list[int]] | None = None, prompt_ids: list[list[int]] | None = None,
           mask: TokenMask | None = None) -> Tensor:
    """Token ids (B,) for logits (B, V): row b follows params[b] and draws from generators[b].
    output_ids[b]: the tokens row b generated so far, prompt_ids[b] its prompt (only read for rows with
    penalties or min_tokens, and for repetition_penalty). mask: the allowed tokens of constrained rows."""
    B, V = logits.shape
    if len(params) != B or len(generators) != B:
        raise ValueError(f"{B} rows of logits need {B} params and {B} generators, "
                         f"got {len(params)} and {len(generators)}")
    for p in params:
        _check(p)  # SamplingParams validates on construction, but it is mutable
    logits = adjust_logits(logits.float(), params, output_ids, prompt_ids)
    if mask is not None and mask.rows:
        logits = logits.index_add(0, to_device(mask.rows, logits.device), to_device(mask.bias, logits.device))
    # max's indices are argmax's (the first maximal one), and a CPU computes them several times faster
    greedy = logits.max(dim=-1).indices
    # below MIN_TEMPERATURE, logits / temperature overflows to inf/NaN: such requests are greedy (as vLLM)
    sampled = [b for b, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
    if not sampled:
        return greedy
    rows = to_device(sampled, logits.device)
    chosen = _draw(logits[rows], [params[b] for b in sampled], [generators[b] for b in sampled])
    return greedy.index_copy(0, rows, chosen)


MIN_TEMPERATURE = 1e-5


def _counts(rows: list[int], ids: list[list[int]], B: int, V: int, device: torch.device) -> Tensor:
    """(B, V) float: how often each token occurs in ids[b], for b in rows (zeros elsewhere), from one
    index_put_ over the rows' tokens laid end to end."""
    lengths = to_device([len(ids[b]) for b in rows], device)
    flat = to_device(list(itertools.chain.from_iterable(ids[b] for b in rows)), device, torch.long)
    index = torch.repeat_interleave(to_device(rows, device), lengths)
    counts = torch.zeros(B, V, device=device)
    counts.index_put_((index, flat), torch.ones(len(flat), device=device), accumulate=True)
    return counts


def adjust_logits(logits: Tensor, params: list[SamplingParams], output_ids: list[list[int]] | None,
                  prompt_ids: list[list[int]] | None = None) -> Tensor:
    """logits (float32) with the rows' penalties, logit_bias and min_tokens applied; the input itself when
    none asks."""
    penalized = [b for b, p in enumerate(params) if p.penalized]
    repeated = [b for b, p in enumerate(params) if p.repetition_penalty != 1.0]
    biased = [b for b, p in enumerate(params) if p.logit_bias]
    banned = [b for b, p in enumerate(params) if p.banned_token_ids or p.bad_words_ids]
    restricted = [b for b, p in enumerate(params) if p.allowed_token_ids is not None]
    if output_ids is None and any(p.needs_outputs for p in params):
        raise ValueError("penalties and min_tokens need each row's output_ids")
    if repeated and prompt_ids is None:
        raise ValueError("repetition_penalty needs each row's prompt_ids")
    short = [b for b, p in enumerate(params) if p.min_tokens and len(output_ids[b]) < p.min_tokens]
    if not penalized and not repeated and not biased and not short and not banned and not restricted:
        return logits
    logits = logits.clone()
    B, V = logits.shape
    device = logits.device
    if repeated:  # vLLM's (from CTRL): seen tokens' positive logits divided, negative ones multiplied
        seen = (_counts(repeated, output_ids, B, V, device) + _counts(repeated, prompt_ids, B, V, device)) > 0
        penalty = to_device([p.repetition_penalty for p in params], device)[:, None].expand(B, V)
        factor = torch.where(logits > 0, 1.0 / penalty, penalty)
        logits = torch.where(seen, logits * factor, logits)
    if penalized:
        counts = _counts(penalized, output_ids, B, V, device)
        frequency = to_device([p.frequency_penalty for p in params], device)[:, None]
        presence = to_device([p.presence_penalty for p in params], device)[:, None]
        logits -= frequency * counts + presence * (counts > 0)
    if biased:
        rows = [b for b in biased for _ in params[b].logit_bias]
        tokens = [t for b in biased for t in params[b].logit_bias]
        values = [v for b in biased for v in params[b].logit_bias.values()]
        keep = [i for i, t in enumerate(tokens) if t < V]  # a bias on an id past the vocabulary has no token
        index = (to_device([rows[i] for i in keep], device, torch.long),
                 to_device([tokens[i] for i in keep], device, torch.long))
        logits.index_put_(index, to_device([values[i] for i in keep], device, torch.float32), accumulate=True)
    if short or banned:  # the stop tokens of rows short of their min_tokens, and banned tokens, kept out
        pairs = [(b, t) for b in short for t in params[b].stop_token_ids if t < V]
        pairs += [(b, t) for b in banned for t in params[b].banned_token_ids if t < V]
        pairs += [(b, word[-1]) for b in banned for word in params[b].bad_words_ids
                  if word[-1] < V and _ends_with(output_ids[b] if len(word) > 1 else [], word[:-1])]
        index = (to_device([b for b, _ in pairs], device, torch.long), to_device([t for _, t in pairs], device, torch.long))
        logits.index_put_(index, torch.full((len(pairs),), float("-inf"), device=device))
    if restricted:  # every token but the allowed ones kept out
        pairs = [(i, t) for i, b in enumerate(restricted) for t in params[b].allowed_token_ids if t < V]
        allowed = torch.zeros(len(restricted), V, dtype=torch.bool, device=device)
        allowed[to_device([i for i, _ in pairs], device, torch.long), to_device([t for _, t in pairs], device, torch.long)] = True
        rows = to_device(restricted, device, torch.long)
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits


def _ends_with(tokens: list[int], prefix: list[int]) -> bool:
    """Whether tokens end with prefix (always, for an empty one)."""
    return not prefix or tokens[-len(prefix):] == prefix


def _draw(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> Tensor:
    """One token per row from softmax(logits / temperature), filtered by the row's top-k and top-p."""
    device, V = logits.device, logits.size(1)
    temperature = to_device([p.temperature for p in params], device, torch.float32)
    scaled = logits / temperature[:, None]
    u = to_device(torch.cat([torch.rand(1, generator=g) for g in generators]), device)
    filters = [(p.top_k is not None and p.top_k < V) or p.top_p < 1.0 or p.min_p > 0.0 for p in params]
    filtered = [b for b, f in enumerate(filters) if f]
    if not filtered:
        return _draw_in_order(scaled, u)
    kept = [b for b, f in enumerate(filters) if not f]
    tokens = torch.empty(len(params), dtype=torch.long, device=device)
    if kept:
        rows = to_device(kept, device)
        tokens[rows] = _draw_in_order(scaled[rows], u[rows])
    rows = to_device(filtered, device)
    tokens[rows] = _draw_sorted(scaled[rows], [params[b] for b in filtered], u[rows])
    return tokens


def _draw_in_order(scaled: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draws over the whole vocabulary in its own order (module docstring)."""
    cdf = scaled.softmax(dim=-1).cumsum(dim=-1)
    total = cdf[:, -1]
    # u * total may round up to the total: held just below it, the draw is the last token of positive probability
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp(max=cdf.size(1) - 1)


def _draw_sorted(scaled: Tensor, params: list[SamplingParams], u: Tensor) -> Tensor:
    """Inverse-CDF draws over each row's top-k and nucleus, most likely first (module docstring)."""
    device, V = scaled.device, scaled.size(1)
    ks = [V if p.top_k is None else p.top_k for p in params]
    top_k = to_device(ks, device)
    top_p = to_device([p.top_p for p in params], device, torch.float32)
    ordered, order = _most_likely(scaled, max(ks))  # from the params: no wait on the device
    keep = torch.arange(ordered.size(1), device=device) < top_k[:, None]
    probs = ordered.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    if any(p.min_p > 0.0 for p in params):
        # min-p (vLLM's order: min-p, then top-k and top-p): a ratio to the most likely token's probability,
        # which the top-k cut does not change; the nucleus is then taken over what is left, renormalised
        min_p = to_device([p.min_p for p in params], device, torch.float32)
        keep &= probs >= min_p[:, None] * probs[:, :1]
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    # a token is in the nucleus if the mass before it has not reached top_p yet; top_p = 1 keeps every
    # token outright, as rounding can push the cumulative mass to 1 before the last ones
    keep &= (probs.cumsum(dim=-1) - probs < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep[:, 0] = True  # the most likely token is always in the nucleus, however small top_p (it may round to 0)
    cdf = probs.masked_fill(~keep, 0.0).cumsum(dim=-1)
    position = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1)
    position = torch.minimum(position, keep.sum(dim=-1) - 1)
    return order.gather(1, position[:, None]).squeeze(1)


def _most_likely(scaled: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of each row and their token ids, in the order of a stable descending sort of the whole
    row (equal values by token id), so a row's order never depends on the k its batch asks for. A top-k of k
    elements costs far less than sorting the vocabulary when k is small (nanochat's chat uses top_k 50)."""
    if k >= scaled.size(1):
        return scaled.sort(dim=-1, descending=True, stable=True)
    # topk alone may keep any of the values equal to the k-th: keep the lowest ids among them, as the sort does
    threshold = scaled.topk(k, dim=-1).values[:, -1:]
    above, equal = scaled > threshold, scaled == threshold
    wanted = k - above.sum(dim=-1, keepdim=True)
    chosen = above | (equal & (equal.cumsum(dim=-1) <= wanted))
    # the k chosen ids of each row, lowest first, by a top-k of a key (no nonzero(): its size would have to be
    # read back from the device)
    V = scaled.size(1)
    ids = V - torch.where(chosen, V - torch.arange(V, device=scaled.device), -1).topk(k, dim=-1).values
    values, by_value = scaled.gather(1, ids).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(1, by_value)


def _check(p: SamplingParams) -> None:
    if not p.temperature >= 0:  # also catches NaN
        raise ValueError(f"temperature must be >= 0, got {p.temperature}")
    if p.top_k is not None and p.top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {p.top_k}")
    if not 0 < p.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p.top_p}")
    if not 0 <= p.min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {p.min_p}")
