"""Sizing the serving engine's KV cache (serving/engine/kv_cache_size.py): as many blocks as fit in a fraction
of the memory free, a container's memory limit counted on a CPU, and the fraction's default per device.
(How the blocks split between full-context and sliding-window layers: test_llm_engine.py, beside the engine
that serves from the split.)"""

import pytest
import torch

from nanochat.config import ConfigError, load_config
from nanochat.gpt import GPT, GPTConfig
from serving.engine.kv_cache_size import (
    GPU_KV_CACHE_MEMORY_FRACTION,
    cgroup_memory_left,
    free_memory,
    kv_cache_blocks,
    resolve_kv_memory_fraction,
)
from serving.engine.paged_cache import PagedKVCache


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT(GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))



def test_the_kv_cache_fills_its_fraction_of_free_memory(model):
    """Blocks of keys and values for every layer: as many as fit in the fraction, and the cache really
    takes that much."""
    cfg = model.config
    per_block = 2 * cfg.n_layer * 16 * cfg.n_kv_head * cfg.head_dim * 4
    assert kv_cache_blocks(model, 16, torch.float32, 0.5, 100 * per_block) == 50
    assert kv_cache_blocks(model, 16, torch.bfloat16, 0.5, 100 * per_block) == 100
    blocks = kv_cache_blocks(model, 16, torch.float32, 0.25, 100 * per_block + per_block - 1)
    cache = PagedKVCache.for_model(model, blocks, 16)
    assert blocks == 25 and (cache.k.nbytes + cache.v.nbytes) == 25 * per_block
    assert 0 < free_memory("cpu")


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_free_memory_on_a_cpu_is_what_the_memory_cgroup_has_left_below_its_limit(tmp_path, version):
    """A pod's memory limit binds however much the node has free: the KV cache is sized from the smaller."""
    names = ("memory.max", "memory.current", "memory.stat") if version == "v2" else (
        "memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat")
    inactive_key = "inactive_file" if version == "v2" else "total_inactive_file"
    (tmp_path / "memory").mkdir()
    MiB = 2**20

    def cgroup(limit: str, usage: int, inactive_file: int = 0) -> None:
        stat = f"anon {usage}\nactive_file 7\n{inactive_key} {inactive_file}\n"
        for name, value in zip(names, (limit + "\n", f"{usage}\n", stat), strict=True):
            (tmp_path / name).write_text(value)

    node_free = free_memory("cpu", cgroup_root=tmp_path / "none")
    assert cgroup_memory_left(tmp_path / "none") is None and node_free > 0
    cgroup(str(3 * MiB), MiB)
    assert cgroup_memory_left(tmp_path) == 2 * MiB and free_memory("cpu", cgroup_root=tmp_path) == 2 * MiB
    # the inactive file cache (a checkpoint just read, say) is reclaimed before the limit would kill: not used
    cgroup(str(3 * MiB), 3 * MiB, inactive_file=2 * MiB)
    assert cgroup_memory_left(tmp_path) == 2 * MiB
    cgroup(str(MiB), 3 * MiB)  # a working set past the limit: nothing left
    assert free_memory("cpu", cgroup_root=tmp_path) == 0
    cgroup("max" if version == "v2" else str(2**63 - 4096), MiB)  # no limit: the node's
    assert cgroup_memory_left(tmp_path) is None
    assert abs(free_memory("cpu", cgroup_root=tmp_path) - node_free) < node_free / 2


def test_a_fraction_too_small_for_two_blocks_names_the_setting(model):
    with pytest.raises(ValueError, match="serve.kv_cache_memory_fraction"):
        kv_cache_blocks(model, 16, torch.float32, 0.001, 1000)


def test_an_unset_fraction_sizes_the_cache_from_a_gpus_memory_and_by_num_blocks_on_a_cpu():
    assert load_config().serve.kv_cache_memory_fraction is None
    assert resolve_kv_memory_fraction(None, "cuda") == GPU_KV_CACHE_MEMORY_FRACTION == 0.9
    assert resolve_kv_memory_fraction(None, "cpu") == 0.0
    assert resolve_kv_memory_fraction(0.0, "cuda") == 0.0 and resolve_kv_memory_fraction(0.5, "cpu") == 0.5


def test_the_fraction_is_validated_naming_the_field():
    assert load_config(overrides=["serve.kv_cache_memory_fraction=0.9"]).serve.kv_cache_memory_fraction == 0.9
    with pytest.raises(ConfigError, match="kv_cache_memory_fraction"):
        load_config(overrides=["serve.kv_cache_memory_fraction=1.5"])
