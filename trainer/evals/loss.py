"""
Bits per byte: the validation loss in a form that does not depend on the tokenizer.

Notable:
- sum of per-token losses (nats) divided by ln 2 times the bytes those target tokens stand for, so a
  model with a larger vocabulary (fewer, longer tokens) is compared fairly with one with a smaller one
- token_bytes (vocab_size,) gives each id's byte length; 0 marks tokens left out of the metric (special
  tokens such as <|bos|>), and targets of -1 (ignore_index) are left out too
- distributed over workers: each rank sums over its own batches and the two sums are all-reduced, so
  every rank returns the same number
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from itertools import islice

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_bpb(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], steps: int, token_bytes: Tensor) -> float:
    """Bits per byte over `steps` batches of (inputs, targets) (B, T); model(x, y, loss_reduction="none")
    must return the per-token loss in nats. Runs as given under autocast; the sums are kept in float64."""
    if steps < 1:
        raise ValueError(f"steps={steps!r}: must be >= 1")
    total_nats = total_bytes = None  # on the batches' device, made at the first batch
    done = 0
    for x, y in islice(batches, steps):
        loss = model(x, y, loss_reduction="none").reshape(-1).double()
        y = y.reshape(-1)
        table = token_bytes.to(y.device)
        # ignored targets (-1) must not index the table: they count 0 bytes
        num_bytes = torch.where(y >= 0, table[y.clamp(min=0)], torch.zeros_like(y, dtype=table.dtype))
        nats, n_bytes = (loss * (num_bytes > 0)).sum(), num_bytes.sum()
        total_nats = nats if total_nats is None else total_nats + nats
        total_bytes = n_bytes if total_bytes is None else total_bytes + n_bytes
        done += 1
    if total_nats is None:  # still take part in the all-reduce below, or the other ranks would wait forever
        total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
        total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    if done < steps:
        log.warning("evaluate_bpb: the batches ended after %d of %d steps", done, steps)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    nats, n_bytes = total_nats.item(), total_bytes.item()
    if n_bytes == 0:
        raise ValueError("evaluate_bpb: the batches held no target token with a byte length > 0")
    return nats / (math.log(2) * n_bytes)
