"""The training path's attention kernels (nanochat/gpt.py, config key model.attention): FlexAttention with a
cached block mask against SDPA with a dense mask. On a CPU FlexAttention runs forward only (torch has no
backward for it there), compiled as the model runs it; the gradient comparison needs a GPU."""

import pytest
import torch

from nanochat.checkpoint import model_from_checkpoint, read_checkpoint, write_checkpoint
from nanochat.config import ConfigError, load_config
from nanochat.gpt import GPT, GPTConfig, causal_attention, window_block_mask
from nanochat.kv_cache import KVCache
from tests.support.gpt_fixtures import scrambled_model as scrambled
from tests.support.numerics import EPS32

VOCAB = 97
CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))]


def qkv(B: int, T: int, n_head: int, n_kv_head: int, D: int, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g).to(device) for h in (n_head, n_kv_head, n_kv_head))
    return q, k, v


def tiny(**overrides) -> GPTConfig:
    fields = dict(sequence_len=256, vocab_size=VOCAB, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
    return GPTConfig(**{**fields, **overrides})


# (T, window, n_head, n_kv_head): a window inside one 128-token tile and one across tiles, and None (full
# context); T not a multiple of the tile; GQA and plain heads. Each case compiles FlexAttention anew (seconds).
CASES = [(200, 37, 4, 2), (256, 200, 4, 4), (256, None, 4, 1)]


@pytest.mark.parametrize(("T", "window", "n_head", "n_kv_head"), CASES)
@torch.no_grad()
def test_flex_attention_equals_the_masked_sdpa_path(T, window, n_head, n_kv_head):
    q, k, v = qkv(2, T, n_head, n_kv_head, 16)
    flex = causal_attention(q, k, v, window, window_block_mask(T, window, torch.device("cpu")))
    sdpa = causal_attention(q, k, v, window)
    # the same softmax over the same keys, summed in another order: a few fp32 roundings of values of size ~1
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=64 * EPS32)


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_the_windowed_sdpa_path_equals_explicit_attention_and_so_do_its_gradients(n_kv_head):
    """The dense-mask path takes grouped key/value heads as they are on a CPU (enable_gqa): the output and
    the gradients of q, k and v equal attention written out by hand, each query head reading the key/value
    head of its group."""
    T, window, n_head, D = 40, 9, 4, 16
    q, k, v = (t.double().requires_grad_() for t in qkv(2, T, n_head, n_kv_head, D, seed=3))
    group = n_head // n_kv_head
    scores = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(group, dim=2)) / D**0.5
    delta = torch.arange(T)[:, None] - torch.arange(T)
    scores = scores.masked_fill(~((delta >= 0) & (delta <= window)), float("-inf"))
    expected = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v.repeat_interleave(group, dim=2))
    got = causal_attention(q, k, v, window)
    torch.testing.assert_close(got, expected)
    upstream = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), upstream)
    for grad, want in zip(grads, torch.autograd.grad(expected, (q, k, v), upstream), strict=True):
        torch.testing.assert_close(grad, want)


@torch.no_grad()
def test_flex_attention_follows_autocast_as_sdpa_does():
    """Under autocast (as training runs on a GPU) both kernels compute in bfloat16 whatever their inputs' dtypes:
    here q in float32 beside k, v in bfloat16, the mix that QK-norm and the value embeddings can leave."""
    q, k, v = qkv(2, 200, 4, 2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flex = causal_attention(q, k.bfloat16(), v.bfloat16(), 37, window_block_mask(200, 37, torch.device("cpu")))
        sdpa = causal_attention(q, k.bfloat16(), v.bfloat16(), 37)
    assert flex.dtype == sdpa.dtype == torch.bfloat16
    torch.testing.assert_close(flex.float(), sdpa.float(), rtol=0, atol=2e-2)  # a few bfloat16 roundings of ~1


@pytest.mark.skipif(not CUDA, reason="FlexAttention has no backward pass on a CPU")
@pytest.mark.parametrize(("T", "window", "n_head", "n_kv_head"), CASES)
def test_flex_attention_gradients_equal_the_masked_sdpa_path(T, window, n_head, n_kv_head):
    device = torch.device("cuda")
    inputs = [t.requires_grad_() for t in qkv(2, T, n_head, n_kv_head, 16, "cuda")]
    grad_out = torch.randn(2, T, n_head, 16, device=device, generator=torch.Generator(device).manual_seed(1))
    grads = []
    for block_mask in (window_block_mask(T, window, device), None):
        y = causal_attention(*inputs, window, block_mask)
        grads.append(torch.autograd.grad(y, inputs, grad_out))
    for flex, sdpa in zip(*grads, strict=True):
        torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-4)  # TF32-free fp32 kernels, other orders


def test_the_block_mask_of_a_window_skips_the_tiles_it_hides():
    """T = 8 tiles of 128: full causal attention touches the 36 tiles on or below the diagonal; a window of
    128 only the diagonal and the one before it (15), and a wholly visible tile needs no per-score mask."""
    cpu = torch.device("cpu")

    def tiles(mask) -> tuple[int, int]:
        partial, full = mask.kv_num_blocks.sum().item(), mask.full_kv_num_blocks.sum().item()
        return partial + full, full

    assert tiles(window_block_mask(1024, None, cpu)) == (36, 28)
    assert tiles(window_block_mask(1024, 128, cpu)) == (15, 0)
    assert tiles(window_block_mask(1024, 300, cpu)) == (8 + 7 + 6 + 5, 7)  # 300 reaches three tiles back, fully sees one
    assert window_block_mask(1024, 128, cpu) is window_block_mask(1024, 128, cpu)  # built once


@torch.no_grad()
def test_a_flex_model_gives_the_sdpa_models_logits_and_its_cache_path_is_unchanged():
    sdpa = scrambled(tiny(attention="sdpa"))
    flex = GPT(tiny(attention="flex"))
    flex.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, VOCAB, (2, 200), generator=torch.Generator().manual_seed(2))
    expected = sdpa(idx)
    torch.testing.assert_close(flex.eval()(idx), expected, rtol=0, atol=1e-4)
    cache = KVCache.for_model(flex, batch_size=2, max_len=200)
    cached = torch.cat([flex.forward_cached(idx[:, :150], cache), flex.forward_cached(idx[:, 150:], cache)], dim=1)
    torch.testing.assert_close(cached, expected, rtol=0, atol=1e-4)


def test_auto_trains_through_sdpa_on_a_cpu_and_flex_refuses_to_train_there():
    idx = torch.randint(0, VOCAB, (1, 64))
    assert GPT(tiny(attention="auto"))._block_masks(64, torch.device("cpu")) == [None, None, None]
    model = GPT(tiny(attention="flex"))
    model.init_weights()
    with pytest.raises(ValueError, match="model.attention"):
        model(idx, idx)


@pytest.mark.parametrize("device", DEVICES)
def test_auto_sends_only_the_window_layers_through_flex_on_a_gpu(device):
    masks = GPT(tiny(attention="auto"))._block_masks(256, torch.device(device))
    assert [m is not None for m in masks] == ([True, False, False] if device == "cuda" else [False] * 3)


def test_the_attention_key_is_validated_with_a_clear_error():
    with pytest.raises(ValueError, match="attention='fast'"):
        tiny(attention="fast")
    with pytest.raises(ConfigError, match="model.attention"):
        load_config("tiny-cpu", overrides=["model.attention=fast"])
    assert load_config("tiny-cpu").model.attention == "auto"


@torch.no_grad()
def test_a_checkpoint_written_before_the_attention_key_loads_and_behaves_as_before(tmp_path):
    model = scrambled(tiny(attention="sdpa"))
    old_config = {k: v for k, v in vars(model.config).items() if k != "attention"}
    write_checkpoint(tmp_path, model_state=model.state_dict(), optimizer_state=None, cursor=None, config={}, rng=None,
                     meta={"model_config": old_config})
    loaded = model_from_checkpoint(read_checkpoint(tmp_path, load_optimizer=False))
    assert loaded.config.attention == "auto"
    idx = torch.randint(0, VOCAB, (2, 100))
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)  # auto is SDPA on a CPU: the same kernels
