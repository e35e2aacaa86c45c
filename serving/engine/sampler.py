"""
Next-token sampling for a batch of sequences, each with its own SamplingParams.

Notable:
- float32 throughout, whatever dtype the logits come in.
- temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k, then top-p (the nucleus:
  the fewest most likely tokens whose probability mass reaches top_p), then one draw.
- the draw is inverse-CDF sampling with a single uniform per row, taken from that row's own CPU
  torch.Generator: a row's token depends only on its logits, its params and its generator, never on
  which other requests share the batch, so a seeded request is reproducible (on any device).
- filtering happens in sorted order (stable sort, most likely first): top-k and the nucleus are both a
  prefix of it, which also bounds the draw to the kept tokens whatever the float rounding.
"""

import torch
from torch import Tensor

from serving.engine.sequence import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """The generator of one sequence: seeded by its request, or from OS entropy when it has no seed."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> Tensor:
    """Token ids (B,) for logits (B, V): row b follows params[b] and draws from generators[b]."""
    B, V = logits.shape
    if len(params) != B or len(generators) != B:
        raise ValueError(f"{B} rows of logits need {B} params and {B} generators, "
                         f"got {len(params)} and {len(generators)}")
    for p in params:
        _check(p)  # SamplingParams validates on construction, but it is mutable
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    # below MIN_TEMPERATURE, logits / temperature overflows to inf/NaN: such requests are greedy (as vLLM)
    sampled = [b for b, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
    if not sampled:
        return greedy
    rows = torch.tensor(sampled, device=logits.device)
    chosen = _draw(logits[rows], [params[b] for b in sampled], [generators[b] for b in sampled])
    return greedy.index_copy(0, rows, chosen)


MIN_TEMPERATURE = 1e-5


def _draw(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> Tensor:
    device, V = logits.device, logits.size(1)
    temperature = torch.tensor([p.temperature for p in params], device=device)
    top_k = torch.tensor([V if p.top_k is None else p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    ordered, order = (logits / temperature[:, None]).sort(dim=-1, descending=True, stable=True)
    keep = torch.arange(V, device=device) < top_k[:, None]
    probs = ordered.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    # a token is in the nucleus if the mass before it has not reached top_p yet; top_p = 1 keeps every
    # token outright, as rounding can push the cumulative mass to 1 before the last ones
    keep &= (probs.cumsum(dim=-1) - probs < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep[:, 0] = True  # the most likely token is always in the nucleus, however small top_p (it may round to 0)
    cdf = probs.masked_fill(~keep, 0.0).cumsum(dim=-1)
    u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(device)
    position = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    position = torch.minimum(position, keep.sum(dim=-1) - 1)
    return order.gather(1, position[:, None]).squeeze(1)


def _check(p: SamplingParams) -> None:
    if not p.temperature >= 0:  # also catches NaN
        raise ValueError(f"temperature must be >= 0, got {p.temperature}")
    if p.top_k is not None and p.top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {p.top_k}")
    if not 0 < p.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p.top_p}")
