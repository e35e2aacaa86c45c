"""
How big the serving engine's KV cache is: as many blocks as fit in a fraction of the memory free once the
model is loaded (vLLM's gpu_memory_utilization), counting on a CPU what a container's memory cgroup has left
below its limit; and how those blocks split between the full-context layers and the sliding-window layers
when the window layers keep only their window.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.gpt import GPT
from serving.engine.block_manager import window_pool_blocks


def free_memory(device: torch.device | str, cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes free now on device: the GPU's free memory, or on a CPU the memory the kernel says is
    available (MemAvailable: free plus what it can reclaim), and no more than the memory cgroup mounted at
    cgroup_root (a container's own) has left below its limit: a container (a Kubernetes pod with a memory
    limit) is killed past its limit however much the node has free."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    left = cgroup_memory_left(cgroup_root)
    return available if left is None else min(available, left)


def cgroup_memory_left(root: Path) -> int | None:
    """Bytes the memory cgroup mounted at root has left below its limit, or None without a limit: the limit
    less the working set, as the kubelet counts it (the usage less the inactive file cache, which the kernel
    reclaims before it would kill); cgroup v2's memory.max, memory.current and memory.stat, or v1's files."""
    for limit_file, usage_file, stat_file, inactive_key in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
             "total_inactive_file")):
        try:
            limit, usage, stat = ((root / name).read_text() for name in (limit_file, usage_file, stat_file))
        except OSError:
            continue
        limit = limit.strip()
        # no limit: "max" (v2), or a number near 2**63 (v1)
        if limit == "max" or int(limit) >= 2**60:
            return None
        inactive = next((int(line.split()[1]) for line in stat.splitlines()
                         if line.split()[:1] == [inactive_key]), 0)
        return max(0, int(limit) - (int(usage) - inactive))
    return None


def kv_cache_block_bytes(model: GPT, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV-cache block: keys and values of every layer for block_size tokens."""
    cfg = model.config
    return 2 * cfg.n_layer * block_size * cfg.n_kv_head * cfg.head_dim * dtype.itemsize


def kv_cache_blocks(model: GPT, block_size: int, dtype: torch.dtype, fraction: float, free_bytes: int) -> int:
    """How many KV-cache blocks fit in fraction of free_bytes (vLLM's gpu_memory_utilization, of the memory
    left once the model is loaded): keys and values of every layer for block_size tokens each. A ValueError
    naming serve.kv_cache_memory_fraction when fewer than 2 fit."""
    per_block = kv_cache_block_bytes(model, block_size, dtype)
    blocks = int(fraction * free_bytes) // per_block
    if blocks < 2:
        raise ValueError(f"serve.kv_cache_memory_fraction={fraction} of the {free_bytes / 2**20:.0f} MiB free holds "
                         f"{blocks} KV-cache blocks of {per_block / 2**20:.2f} MiB; the engine needs at least 2")
    return blocks


@dataclass(frozen=True)
class KVCacheSplit:
    """The KV cache split between the full-context layers' pool and the sliding-window layers' one."""

    window: int  # the window layers' window, in tokens (the widest, if they differ)
    num_window_blocks: int  # the window layers' pool, in blocks of those layers
    num_full_blocks: int  # the full-context layers' pool, in blocks of those layers


def kv_cache_split(model: GPT, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                   max_model_len: int | None = None) -> KVCacheSplit | None:
    """How the memory of num_blocks blocks (every layer's KV for block_size tokens each) splits when the
    sliding-window layers keep only their window. In proportion to what a sequence of the longest
    context holds in each pool (its whole context in the full layers' one, its last window in the
    window layers'), so the window pool keeps the last windows of as many cached sequences as the full
    pool keeps whole ones (a prefix hit needs both); but never fewer than window_pool_blocks, which the
    running sequences may need. None when the model has no window layer or the split would not give
    the full layers more blocks than num_blocks."""
    windows = [w for w in model.window_sizes if w is not None]
    if not windows:
        return None
    window, n_window, n_layer = max(windows), len(windows), model.config.n_layer
    n_full, layer_blocks = n_layer - n_window, num_blocks * n_layer  # the memory, in blocks of one layer
    context = -(-(max_model_len or model.config.sequence_len) // block_size)  # blocks of the longest sequence
    last_window = min(context, (window - 1) // block_size + 2)  # blocks its last window spans
    num_full_blocks = layer_blocks * context // (n_full * context + n_window * last_window)
    num_window_blocks = (layer_blocks - num_full_blocks * n_full) // n_window
    needed = window_pool_blocks(window, block_size, max_num_seqs, max_num_batched_tokens)
    if num_window_blocks < needed:
        num_window_blocks, num_full_blocks = needed, (layer_blocks - needed * n_window) // n_full
    if num_full_blocks <= num_blocks:
        return None
    return KVCacheSplit(window, num_window_blocks, num_full_blocks)


GPU_KV_CACHE_MEMORY_FRACTION = 0.9  # vLLM's default gpu_memory_utilization


def resolve_kv_memory_fraction(setting: float | None, device: torch.device | str) -> float:
    """serve.kv_cache_memory_fraction on device: unset, GPU_KV_CACHE_MEMORY_FRACTION on a GPU (the engine is
    all its memory is for, as in vLLM) and 0 on a CPU, whose memory the host shares with everything else (the
    cache is then serve.num_blocks blocks)."""
    if setting is not None:
        return setting
    return GPU_KV_CACHE_MEMORY_FRACTION if torch.device(device).type == "cuda" else 0.0
