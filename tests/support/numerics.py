"""Floats compared across machines: the precision each dtype gives, and another thread count to test against.

Two CPUs (or one CPU at another thread count) may order a sum differently, so a comparison between two
computations of the same quantity holds only to the rounding of the dtype it runs in, never to the bit.
Tolerances are therefore written as a number of units of that rounding times the magnitude involved, with
the reason beside each; a test of such a comparison runs it at more than one thread count (torch_threads)
so that a tolerance too tight for another summation order fails here, not on someone else's machine.
Comparisons of one computation with itself (a resume, a same-seed rerun, a checkpoint round trip) stay exact.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: one unit of fp32 rounding, relative to the value


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with n torch threads (another blocking of matmuls and reductions, so another summation
    order), then go back to the suite's count (tests/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def perturbed(x: np.ndarray, seed: int) -> np.ndarray:
    """x with every element moved by one unit of its dtype's rounding, up or down at random: what another
    machine's rounding of the same computation could have given. Zeros stay zero."""
    eps = np.finfo(x.dtype).eps
    signs = np.random.default_rng(seed).choice(np.array([-1, 1], dtype=x.dtype), size=x.shape)
    return (x * (1 + signs * eps)).astype(x.dtype)
