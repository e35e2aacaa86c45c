"""
Host data onto the engine's device without waiting for the device.

torch.tensor(data, device="cuda"), like .to("cuda") of an ordinary CPU tensor, copies synchronously: it
waits for every kernel already queued on the stream. That costs nothing while the device is idle, but with
async scheduling the host builds step k+1 while step k runs, and one such copy would make it wait for step
k. Copied from pinned memory with non_blocking, the data goes in stream order and the host goes straight
on (vLLM keeps pinned buffers for the same reason); torch's pinned-memory allocator holds the host block
until the copy is done. On a CPU this is plain torch.tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def to_device(data: Any, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """data (a list, a number, or a CPU tensor) as a tensor on device, queued without waiting there."""
    if isinstance(data, Tensor):
        host = data if dtype is None else data.to(dtype)
    else:
        host = torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
