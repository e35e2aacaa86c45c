"""
train.device_batch_size = 0 (auto): the most rows per worker per micro-step that fit the GPU's memory and
divide the rows each worker trains per optimizer step, so gradient accumulation fills the rest exactly.

Notable:
- the decision is `rows_that_fit`, a pure function of a memory profile (bytes that do not grow with the
  batch, bytes per row), the device's capacity and the rows to split
- the profile is measured on the GPU (`measure`): real forward + backward passes of the module the loop
  trains (compiled, as it will run) at 1 and at 2 rows, torch.cuda.max_memory_allocated after each; what the
  probe cannot see is added: the optimizer state (allocated at the first step; at most two buffers the
  size of each parameter, AdamW's moments, Muon keeps one) and, under DDP, its gradient buckets (one more)
- the chosen size is then tried with one more real pass, and each smaller divisor in turn while it runs
  out of memory or past the headroom; every rank takes the smallest any rank chose
- HEADROOM leaves room for the allocator's fragmentation, the CUDA context and what peaks between probes
- on a CPU memory is rarely the limit and nothing is measured: FALLBACK_ROWS or the largest divisor below it
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

log = logging.getLogger(__name__)

HEADROOM = 0.85  # of the GPU's memory the training step's peak may take
FALLBACK_ROWS = 8  # auto where nothing is measured: CPU workers, evaluation jobs
PROBE_ROWS = (1, 2)  # two points of the line bytes = fixed + rows * per_row
GIB = 2**30


class MemoryProfile(NamedTuple):
    """Peak bytes of a training step as a line in the rows per micro-step."""

    fixed_bytes: float  # weights, gradients, optimizer state, workspaces: what does not grow with the batch
    bytes_per_row: float  # activations kept for backward, logits: what does

    def peak(self, rows: int) -> float:
        return self.fixed_bytes + rows * self.bytes_per_row


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def rows_per_worker(total_batch_size: int, seq_len: int, workers: int) -> int:
    """Rows each worker trains per optimizer step, over all its micro-steps."""
    return total_batch_size // (seq_len * workers)


def rows_that_fit(profile: MemoryProfile, capacity_bytes: float, rows_per_step: int,
                  headroom: float = HEADROOM) -> int:
    """The largest divisor of rows_per_step whose predicted peak fits headroom x capacity_bytes."""
    budget = headroom * capacity_bytes
    fitting = [d for d in divisors(rows_per_step) if profile.peak(d) <= budget]
    if not fitting:
        raise ValueError(
            f"train.device_batch_size=0 (auto): one row of train.seq_len tokens needs about "
            f"{profile.peak(1) / GIB:.1f} GiB, more than {headroom:.0%} of the GPU's {capacity_bytes / GIB:.1f} GiB; "
            f"shorten train.seq_len or train a smaller model")
    return max(fitting)


def fallback_rows(rows_per_step: int) -> int:
    """Auto where nothing is measured: the largest divisor of rows_per_step up to FALLBACK_ROWS."""
    return max(d for d in divisors(rows_per_step) if d <= FALLBACK_ROWS)


def smaller_divisors(rows: int, rows_per_step: int) -> list[int]:
    """rows and then every smaller divisor of rows_per_step, largest first: what to try if rows does not fit."""
    return [d for d in reversed(divisors(rows_per_step)) if d <= rows]


# ---------------------------------------------------------------------------------------------- CUDA only


def _peak_of_pass(forward: nn.Module, model: nn.Module, rows: int, seq_len: int, vocab_size: int,
                  device: torch.device, autocast: Callable) -> int:
    """max_memory_allocated over one forward + backward at rows x seq_len random tokens; gradients cleared."""
    generator = torch.Generator(device).manual_seed(0)  # leaves the training RNG alone
    tokens = torch.randint(0, vocab_size, (rows, seq_len + 1), device=device, generator=generator)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with autocast():
            loss = forward(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        loss.backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    finally:
        model.zero_grad(set_to_none=True)
        del tokens
        torch.cuda.empty_cache()


def unseen_bytes(model: nn.Module, ddp: bool) -> int:
    """What a probe's forward + backward does not allocate but the training step does: the optimizer state
    (created at the first step) and DDP's gradient buckets."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * param_bytes + (param_bytes if ddp else 0)


def measure(forward: nn.Module, model: nn.Module, seq_len: int, vocab_size: int, device: torch.device,
            autocast: Callable, ddp: bool) -> MemoryProfile:
    """The step's memory as a line in the rows, from real passes at PROBE_ROWS plus what they miss."""
    low, high = (_peak_of_pass(forward, model, r, seq_len, vocab_size, device, autocast) for r in PROBE_ROWS)
    per_row = max(0.0, (high - low) / (PROBE_ROWS[1] - PROBE_ROWS[0]))
    return MemoryProfile(low - PROBE_ROWS[0] * per_row + unseen_bytes(model, ddp), per_row)


def choose_rows(forward: nn.Module, model: nn.Module, seq_len: int, vocab_size: int, rows_per_step: int,
                device: torch.device, autocast: Callable, ddp: bool) -> int:
    """Auto rows on a CUDA device: the profile's choice, stepped down while a real pass at it does not fit."""
    capacity = torch.cuda.get_device_properties(device).total_memory
    budget, unseen = HEADROOM * capacity, unseen_bytes(model, ddp)
    # each probed size compiles its own static graph: the one training runs is cached, none is dynamic
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        profile = measure(forward, model, seq_len, vocab_size, device, autocast, ddp)
        for rows in smaller_divisors(rows_that_fit(profile, capacity, rows_per_step), rows_per_step):
            try:
                peak = _peak_of_pass(forward, model, rows, seq_len, vocab_size, device, autocast) + unseen
            except torch.OutOfMemoryError:
                peak = float("inf")
            log.info("auto device batch: %d rows predicted %.1f GiB, measured %.1f GiB, budget %.1f GiB",
                     rows, profile.peak(rows) / GIB, peak / GIB, budget / GIB)
            if peak <= budget:
                return rows
    raise ValueError(f"train.device_batch_size=0 (auto): not even one row of {seq_len} tokens fits "
                     f"{HEADROOM:.0%} of the GPU's {capacity / GIB:.1f} GiB")
