"""The JAX GPT against the torch GPT: same weights and tokens, same float32 logits, for every variant."""

import numpy as np
import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from tests.support.gpt_fixtures import scrambled_model

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from trainer.jaxgpt.model import forward, loss_fn, params_from_torch, params_to_torch  # noqa: E402

VOCAB = 97
VARIANTS = {
    "baseline (GQA, SL windows)": {},
    "MHA": dict(n_kv_head=4),
    "MQA": dict(n_kv_head=1),
    "sliding SSSL": dict(window_pattern="SSSL"),
    "layernorm": dict(norm="layernorm"),
    "gelu": dict(activation="gelu"),
    "swiglu": dict(activation="swiglu"),
    "no qk-norm": dict(qk_norm=False),
    "rope base 1e5": dict(rope_base=100000.0),
    "q/k scale 1.2": dict(qk_scale=1.2),
    "odd depth": dict(n_layer=3),
}


def scrambled(**overrides) -> GPT:
    fields = dict(sequence_len=32, vocab_size=VOCAB, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
    return scrambled_model(GPTConfig(**{**fields, **overrides}))


def tokens(B: int, T: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_logits_equal_torch_within_1e_4(overrides):
    model = scrambled(**overrides)
    idx = tokens(2, 32)  # T = sequence_len: the sliding windows (8) really cut the context
    with torch.no_grad():
        expected = model(idx).numpy()
    got = np.asarray(forward(params_from_torch(model.state_dict()), jnp.asarray(idx.numpy()), model.config))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(expected).max() > 1.0  # the comparison is not between two near-zero tensors


def test_loss_and_gradients_equal_torch():
    model = scrambled().train()
    idx, targets = tokens(2, 16), tokens(2, 16).roll(1, dims=1)
    targets[0, :3] = -1  # ignored positions take no part in the mean
    loss = model(idx, targets)
    loss.backward()
    params = params_from_torch(model.state_dict())
    value, grads = jax.value_and_grad(loss_fn)(params, jnp.asarray(idx.numpy()), jnp.asarray(targets.numpy()),
                                               model.config)
    assert abs(float(value) - loss.item()) < 1e-5
    for name, p in model.named_parameters():
        np.testing.assert_allclose(np.asarray(grads[name]), p.grad.numpy(), atol=1e-5, rtol=1e-3, err_msg=name)


def test_params_round_trip_into_a_torch_model():
    model = scrambled()
    state = params_to_torch(params_from_torch(model.state_dict()))
    assert set(state) == set(model.state_dict())
    other = scrambled(rope_base=5.0)  # different rotary tables are not part of the state
    other.load_state_dict(state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[name]), name


def test_bfloat16_compute_stays_close_to_float32():
    model = scrambled()
    params, idx = params_from_torch(model.state_dict()), jnp.asarray(tokens(2, 32).numpy())
    full = np.asarray(forward(params, idx, model.config))
    half = np.asarray(forward(params, idx, model.config, jnp.bfloat16))
    assert half.dtype == np.float32
    assert np.abs(half - full).max() < 0.25 * np.abs(full).max()
