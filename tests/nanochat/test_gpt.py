"""The GPT model (nanochat/gpt.py) and its dense KV cache (nanochat/kv_cache.py): tiny fp32 configs on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.checkpoint import model_from_checkpoint, read_checkpoint, write_checkpoint
from nanochat.gpt import GPT, GPTConfig, apply_rotary, rotary_tables
from nanochat.kv_cache import KVCache
from tests.support.gpt_fixtures import scrambled_model as scrambled
from tests.support.numerics import EPS32

VOCAB = 97


def tiny(**overrides) -> GPTConfig:
    fields = dict(sequence_len=32, vocab_size=VOCAB, n_layer=4, n_head=4, n_kv_head=4, n_embd=64)
    return GPTConfig(**{**fields, **overrides})


def fresh(config: GPTConfig, seed: int = 0) -> GPT:
    model = GPT(config)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# config and the depth dial


@pytest.mark.parametrize(("depth", "n_embd", "n_head"), [(12, 768, 6), (20, 1280, 10), (26, 1664, 13)])
def test_from_depth_gives_nanochat_widths_and_heads(depth, n_embd, n_head):
    cfg = GPTConfig.from_depth(depth, vocab_size=65536, sequence_len=2048)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head) == (depth, n_embd, n_head, n_head)
    assert (cfg.vocab_size, cfg.sequence_len, cfg.head_dim) == (65536, 2048, 128)


def test_from_depth_adjusts_heads_to_split_the_width_evenly():
    # 3 * 64 = 192 wide: ceil(192 / 128) = 2 heads of 96
    cfg = GPTConfig.from_depth(3, vocab_size=VOCAB, sequence_len=64)
    assert (cfg.n_embd, cfg.n_head, cfg.head_dim) == (192, 2, 96)
    # 5 * 64 = 320 wide: ceil(320 / 128) = 3 heads do not divide 320, 4 heads of 80 do
    cfg = GPTConfig.from_depth(5, vocab_size=VOCAB, sequence_len=64)
    assert (cfg.n_embd, cfg.n_head, cfg.head_dim) == (320, 4, 80)


def test_from_depth_passes_kv_heads_and_overrides():
    cfg = GPTConfig.from_depth(4, VOCAB, 64, head_dim=32, n_kv_head=2, window_pattern="SSL", activation="swiglu")
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head) == (256, 8, 2)
    assert (cfg.window_pattern, cfg.activation) == ("SSL", "swiglu")


def test_from_depth_rejects_kv_heads_that_do_not_divide_heads():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig.from_depth(12, VOCAB, 64, n_kv_head=4)  # 6 heads


@pytest.mark.parametrize(("field", "value"), [
    ("window_pattern", "SXL"), ("window_pattern", ""), ("norm", "batchnorm"), ("activation", "tanh"),
    ("n_head", 5), ("n_kv_head", 3), ("softcap", 0.0),
])
def test_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny(**{field: value})


def test_window_pattern_cycles_and_keeps_the_last_layer_full():
    model = GPT(tiny(n_layer=5, window_pattern="ssl"))
    assert model.window_sizes == [8, 8, None, 8, None]  # a quarter of sequence_len=32; the last layer forced to L


# ---------------------------------------------------------------------------------------------
# initialisation


def test_fresh_model_predicts_uniformly():
    model = fresh(tiny())
    idx = tokens(2, 32)
    logits = model(idx)
    assert logits.shape == (2, 32, VOCAB) and logits.dtype == torch.float32
    loss = model(idx, targets=tokens(2, 32, seed=2)).item()
    # zero output projections and a tiny lm_head: the loss is within 1% of ln(vocab) (measured 0.01%)
    assert math.isfinite(loss) and abs(loss - math.log(VOCAB)) < 0.01 * math.log(VOCAB)


def test_loss_ignores_targets_of_minus_one_and_reduces_as_asked():
    model = scrambled(tiny())
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (32,)
    targets[:, 8:] = -1
    # two fp32 means of the same 16 losses, summed in different orders: each is good to 16 units of rounding
    # relative (the bound of a 16-term sum), where atol=1e-6 asked for two at a loss of ~5
    torch.testing.assert_close(model(idx, targets), per_token.view(2, 16)[:, :8].mean(), rtol=16 * EPS32, atol=0)


def test_meta_device_build_then_init_matches_a_direct_build():
    direct = fresh(tiny(n_kv_head=2))
    with torch.device("meta"):
        model = GPT(tiny(n_kv_head=2))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    for (name, a), b in zip(direct.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(direct.cos, model.cos) and torch.equal(direct.sin, model.sin)


# ---------------------------------------------------------------------------------------------
# the inference path agrees with the training path

VARIANTS = {
    "mha": tiny(),
    "gqa": tiny(n_kv_head=2),
    "mqa-window": tiny(n_kv_head=1, window_pattern="SL"),
    "gqa-window": tiny(n_kv_head=2, window_pattern="SSL"),
    "layernorm": tiny(norm="layernorm", window_pattern="SL"),
    "gelu": tiny(activation="gelu"),
    "swiglu": tiny(activation="swiglu", n_kv_head=2),
    "no-qk-norm": tiny(qk_norm=False),
    "record": tiny(rope_base=100000.0, qk_scale=1.2, window_pattern="SSSL"),  # nanochat's record architecture
    "smear-backout": tiny(n_kv_head=2, window_pattern="SL", smear=True, backout=True),
}


def decode(model: GPT, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits for idx fed through a fresh KV cache in chunks of the given sizes, each with the token before it
    (smear reads it)."""
    cache = KVCache.for_model(model, idx.size(0), max_len=idx.size(1))
    out, start = [], 0
    for size in chunks:
        prev = idx[:, start - 1] if start else torch.zeros(idx.size(0), dtype=torch.long)
        out.append(model.forward_cached(idx[:, start:start + size], cache, prev_idx=prev))
        start += size
    assert start == idx.size(1) and cache.lengths.tolist() == [start] * idx.size(0)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_cached_inference_matches_the_full_forward(variant):
    model = scrambled(VARIANTS[variant])
    idx = tokens(2, 32)
    full = model(idx)
    prefill_then_decode = decode(model, idx, [12] + [1] * 20)
    multi_chunk_prefill = decode(model, idx, [5, 11, 9, 7])
    torch.testing.assert_close(prefill_then_decode, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(multi_chunk_prefill, full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_sliding_window_hides_only_tokens_beyond_the_window():
    idx = tokens(1, 32)
    full_context = scrambled(tiny())(idx)
    windowed = scrambled(tiny(window_pattern="SL"))(idx)  # same weights, window 8 on layers 0 and 2
    torch.testing.assert_close(windowed[:, :9], full_context[:, :9])  # positions 0..8 see everything anyway
    assert (windowed[:, 9:] - full_context[:, 9:]).abs().amax(dim=-1).min() > 1e-3


@torch.no_grad()
def test_cache_rows_hold_different_lengths():
    model = scrambled(tiny(n_kv_head=2, window_pattern="SL"))
    prompts = [tokens(1, 7, seed=3), tokens(1, 13, seed=4)]
    cache = KVCache.for_model(model, batch_size=2)
    for row, prompt in enumerate(prompts):  # prefill one slot at a time, as a continuous batch does
        model.forward_cached(prompt, cache.rows(row, row + 1))
    assert cache.lengths.tolist() == [7, 13]
    steps = tokens(2, 10, seed=5)
    decoded = torch.cat([model.forward_cached(steps[:, t:t + 1], cache) for t in range(10)], dim=1)
    for row, prompt in enumerate(prompts):
        full = model(torch.cat([prompt, steps[row:row + 1]], dim=1))
        torch.testing.assert_close(decoded[row], full[0, -10:], atol=1e-5, rtol=0)


@torch.no_grad()
def test_reset_row_is_reused_for_a_new_prompt():
    model = scrambled(tiny())
    cache = KVCache.for_model(model, batch_size=1)
    model.forward_cached(tokens(1, 20, seed=6), cache)
    cache.reset()
    prompt = tokens(1, 9, seed=7)
    torch.testing.assert_close(model.forward_cached(prompt, cache), model(prompt), atol=1e-5, rtol=0)


@torch.no_grad()
def test_decoding_past_the_rotary_table_grows_it():
    model = scrambled(tiny(sequence_len=8, window_pattern="SL"))
    table = model.cos.size(0)
    idx = tokens(1, 3 * table)  # longer than the training context and the table
    cached = decode(model, idx, [table - 1] + [1] * (2 * table + 1))
    assert model.cos.size(0) >= 3 * table
    torch.testing.assert_close(cached, model(idx), atol=1e-5, rtol=0)


def test_full_cache_refuses_more_tokens():
    model = scrambled(tiny())
    cache = KVCache.for_model(model, batch_size=1, max_len=10)
    model.forward_cached(tokens(1, 8), cache)
    with pytest.raises(RuntimeError, match="KV cache full"):
        model.forward_cached(tokens(1, 3), cache)


# ---------------------------------------------------------------------------------------------
# optimizer groups, size, FLOPs


# ---------------------------------------------------------------------------------------------
# the record run's architecture keys: q/k scale, RoPE base; checkpoints written before them


@torch.no_grad()
def test_qk_scale_multiplies_the_attention_logits_by_its_square():
    """q and k each times s after QK-norm: the attention of a block is SDPA at scale s**2 / sqrt(head_dim)."""
    model = scrambled(tiny(qk_scale=1.2))
    attn, D = model.transformer.h[0].attn, model.config.head_dim
    x = torch.randn(2, 16, model.config.n_embd, generator=torch.Generator().manual_seed(3))
    cos, sin = model.cos[None, :16, None], model.sin[None, :16, None]
    q = attn.c_q(x).view(2, 16, 4, D)
    k = attn.c_k(x).view(2, 16, 4, D)
    v = attn.c_v(x).view(2, 16, 4, D)
    q, k = (F.rms_norm(apply_rotary(t, cos, sin), (D,)) for t in (q, k))
    y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, scale=1.44 / D**0.5)
    expected = attn.c_proj(y.transpose(1, 2).reshape(2, 16, -1))
    torch.testing.assert_close(attn(x, None, cos, sin, None, None), expected, atol=1e-5, rtol=1e-5)
    plain = GPT(tiny())
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain.eval()(tokens(2, 16)), model(tokens(2, 16)), atol=1e-3)


def test_rope_base_sets_the_rotary_frequencies():
    model = fresh(tiny(rope_base=100000.0))
    cos, sin = rotary_tables(model.cos.size(0), model.config.head_dim, 100000.0)
    torch.testing.assert_close(model.cos, cos, rtol=0, atol=0)
    torch.testing.assert_close(model.sin, sin, rtol=0, atol=0)
    assert not torch.allclose(model.cos, fresh(tiny()).cos)


@torch.no_grad()
def test_a_checkpoint_written_before_qk_scale_loads_with_the_old_attention(tmp_path):
    """model_from_checkpoint builds GPTConfig(**meta["model_config"]): a config without qk_scale (every
    checkpoint written before the key) must give the model it was trained as, q and k unscaled."""
    model = scrambled(tiny())
    old_config = {k: v for k, v in vars(model.config).items() if k != "qk_scale"}
    write_checkpoint(tmp_path, model_state=model.state_dict(), optimizer_state=None, cursor=None, config={}, rng=None,
                     meta={"model_config": old_config})
    loaded = model_from_checkpoint(read_checkpoint(tmp_path, load_optimizer=False))
    assert loaded.config.qk_scale == 1.0 and loaded.config.rope_base == 10000.0
    idx = tokens(2, 16)
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


@pytest.mark.parametrize("config", [tiny(n_kv_head=2), tiny(activation="swiglu", n_layer=3),
                                    tiny(smear=True, backout=True)])
def test_param_groups_cover_every_parameter_once(config):
    model = GPT(config)
    groups = model.param_groups()
    assert set(groups) == {"matrix", "embedding", "unembedding", "scalar"}
    grouped = [id(p) for group in groups.values() for p in group]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    block_params = {id(p) for p in model.transformer.h.parameters()}
    assert all(p.ndim == 2 and id(p) in block_params for p in groups["matrix"])
    assert groups["unembedding"] == [model.lm_head.weight]
    assert model.transformer.wte.weight in groups["embedding"] and len(groups["embedding"]) == 1 + len(model.value_embeds)
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    fine = model.param_groups(fine=True)  # the record recipe's split of the AdamW parameters
    assert set(fine) == {"matrix", "embedding", "value_embedding", "unembedding", "resid", "x0", "smear"}
    optional = [model.smear_gate.weight, model.smear_lambda] if config.smear else []
    optional += [model.backout_lambda] if config.backout else []
    assert fine["smear"] == optional and groups["scalar"] == [model.resid_lambdas, model.x0_lambdas, *optional]
    assert fine["embedding"] == [model.transformer.wte.weight]
    assert fine["value_embedding"] == list(model.value_embeds.parameters())
    assert (fine["resid"], fine["x0"]) == ([model.resid_lambdas], [model.x0_lambdas])
    assert sorted(id(p) for g in fine.values() for p in g) == sorted(id(p) for g in groups.values() for p in g)


def test_estimate_flops_grows_linearly_with_depth():
    flops = [GPT(tiny(n_layer=n)).estimate_flops() for n in (2, 4, 6, 8)]
    assert flops[0] > 0
    # value embeddings sit on every other layer, so each pair of layers costs the same
    steps = [b - a for a, b in zip(flops, flops[1:], strict=False)]
    assert steps[0] > 0 and steps[0] == steps[1] == steps[2]
    # 6 FLOPs per matmul weight: at least 6x the parameters outside the embeddings
    model = GPT(tiny())
    embeddings = sum(p.numel() for p in model.value_embeds.parameters()) + model.transformer.wte.weight.numel()
    assert model.estimate_flops() > 6 * (model.num_params() - embeddings)


def test_estimate_flops_counts_only_the_keys_a_window_sees():
    cfg = tiny(n_layer=4, window_pattern="SSSL")  # three layers see 8 keys instead of 32
    saved = GPT(tiny(n_layer=4)).estimate_flops() - GPT(cfg).estimate_flops()
    assert saved == 3 * 12 * cfg.n_head * cfg.head_dim * (32 - 8)


# ---------------------------------------------------------------------------------------------
# training


def test_gradients_flow_and_adamw_reduces_loss_on_a_fixed_batch():
    model = fresh(tiny(n_kv_head=2, window_pattern="SL"))
    idx, targets = tokens(4, 32), tokens(4, 32, seed=2)
    loss = model(idx, targets)
    loss.backward()
    # at init the zeroed output projections block the gradient into the blocks, but not to them
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert all(block.attn.c_proj.weight.grad.abs().sum() > 0 for block in model.transformer.h)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = [loss.item()]
    for _ in range(8):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = model(idx, targets)
        loss.backward()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    # once the projections moved, every parameter learns
    silent = [name for name, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not silent
