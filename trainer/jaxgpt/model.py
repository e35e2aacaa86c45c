"""
The GPT of nanochat/gpt.py in JAX: pure functions over a flat dict of parameters.

Notable:
- the parameters are the torch model's state dict, name for name and in torch's layouts (a Linear's weight
  is (out, in)), so a torch checkpoint loads with a dtype conversion and a JAX-trained model is saved in
  the very same checkpoint format, which serving reads unchanged
- the architecture is read from the same GPTConfig, and the helpers that decide it (sliding-window sizes,
  which layers have value embeddings, the rotary tables' definition) are nanochat/gpt.py's own; every
  variant the torch model has (norm, activation, QK-norm, GQA/MQA, window pattern, rotary base) is here
- numerics follow torch's defaults: RMSNorm eps is the dtype's machine epsilon, LayerNorm's 1e-5, exact
  (erf) GELU; attention scales by 1/sqrt(head_dim)
- compute_dtype casts weights and activations for the matmuls (bf16 on TPU/GPU); logits, softcap and
  the loss are float32
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from nanochat.gpt import VE_GATE_CHANNELS, GPTConfig, has_value_embedding, window_sizes

Params = dict[str, jax.Array]


# -----------------------------------------------------------------------------
# conversion from and to the torch model's state dict


def params_from_torch(state_dict: dict[str, torch.Tensor]) -> Params:
    """float32 JAX arrays from a torch state dict (a checkpoint's model.safetensors or model.state_dict())."""
    return {name: jnp.asarray(t.detach().to(torch.float32).cpu().numpy()) for name, t in state_dict.items()}


def params_to_torch(params: Params) -> dict[str, torch.Tensor]:
    """A torch state dict that GPT.load_state_dict() and the checkpoint writer take."""
    return {name: torch.from_numpy(np.array(jax.device_get(p), dtype=np.float32)) for name, p in params.items()}


# -----------------------------------------------------------------------------
# building blocks


def rms_norm(x: jax.Array) -> jax.Array:
    eps = jnp.finfo(x.dtype).eps  # torch's F.rms_norm default
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def layer_norm(x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5)


NORMS = {"rmsnorm": rms_norm, "layernorm": layer_norm}


def linear(x: jax.Array, weight: jax.Array) -> jax.Array:
    return x @ weight.T  # torch layout: (out, in)


def rotary_tables(n_pos: int, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = jnp.outer(jnp.arange(n_pos, dtype=jnp.float32), inv_freq)
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate channel pairs (i, i + D/2) of x (B, T, H, D); cos/sin are (T, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos[None, :, None, :].astype(x.dtype), sin[None, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None) -> jax.Array:
    """(B, T, H, D) queries against (B, T, KV, D) keys/values: query head h reads kv head h // (H / KV),
    as torch's enable_gqa. A window w lets a query see itself and the w tokens before it. JAX picks the
    kernel (cuDNN flash attention on GPU where it applies, XLA elsewhere)."""
    local_window = None if window is None else (window, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local_window)


def attention(p: Params, prefix: str, cfg: GPTConfig, x: jax.Array, ve: jax.Array | None,
              cos: jax.Array, sin: jax.Array, window: int | None) -> jax.Array:
    B, T, _ = x.shape
    hd = cfg.head_dim
    q = linear(x, p[f"{prefix}.c_q.weight"]).reshape(B, T, cfg.n_head, hd)
    k = linear(x, p[f"{prefix}.c_k.weight"]).reshape(B, T, cfg.n_kv_head, hd)
    v = linear(x, p[f"{prefix}.c_v.weight"]).reshape(B, T, cfg.n_kv_head, hd)
    if ve is not None:
        channels = min(VE_GATE_CHANNELS, cfg.n_embd)
        gate = 3 * jax.nn.sigmoid(linear(x[..., :channels], p[f"{prefix}.ve_gate.weight"]))  # (B, T, n_kv_head)
        v = v + gate[..., None] * ve.reshape(v.shape)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if cfg.qk_norm:
        norm = NORMS[cfg.norm]
        q, k = norm(q), norm(k)
    if cfg.qk_scale != 1.0:
        q, k = q * cfg.qk_scale, k * cfg.qk_scale
    y = causal_attention(q, k, v, window)
    return linear(y.reshape(B, T, -1), p[f"{prefix}.c_proj.weight"])


def mlp(p: Params, prefix: str, cfg: GPTConfig, x: jax.Array) -> jax.Array:
    h = linear(x, p[f"{prefix}.c_fc.weight"])
    if cfg.activation == "relu2":
        h = jnp.square(jax.nn.relu(h))
    elif cfg.activation == "gelu":
        h = jax.nn.gelu(h, approximate=False)
    else:  # swiglu
        h = jax.nn.silu(linear(x, p[f"{prefix}.c_gate.weight"])) * h
    return linear(h, p[f"{prefix}.c_proj.weight"])


# -----------------------------------------------------------------------------
# the model


def forward(params: Params, idx: jax.Array, cfg: GPTConfig, compute_dtype=jnp.float32) -> jax.Array:
    """float32 logits (B, T, vocab_size) for token ids idx (B, T): torch's GPT.forward(idx)."""
    p = {name: w.astype(compute_dtype) for name, w in params.items()}
    T = idx.shape[1]
    cos, sin = rotary_tables(T, cfg.head_dim, cfg.rope_base)
    norm = NORMS[cfg.norm]
    x = norm(p["transformer.wte.weight"][idx])
    x0 = x
    for i, window in enumerate(window_sizes(cfg)):
        x = p["resid_lambdas"][i] * x + p["x0_lambdas"][i] * x0
        ve = p[f"value_embeds.{i}.weight"][idx] if has_value_embedding(i, cfg.n_layer) else None
        prefix = f"transformer.h.{i}"
        x = x + attention(p, f"{prefix}.attn", cfg, norm(x), ve, cos, sin, window)
        x = x + mlp(p, f"{prefix}.mlp", cfg, norm(x))
    x = norm(x)
    logits = linear(x, p["lm_head.weight"]).astype(jnp.float32)
    return cfg.softcap * jnp.tanh(logits / cfg.softcap)


def token_losses(params: Params, idx: jax.Array, targets: jax.Array, cfg: GPTConfig,
                 compute_dtype=jnp.float32) -> jax.Array:
    """Cross-entropy per target (B, T) in nats; targets of -1 are ignored (loss 0)."""
    logits = forward(params, idx, cfg, compute_dtype)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logprobs, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets >= 0, -picked, 0.0)


def loss_fn(params: Params, idx: jax.Array, targets: jax.Array, cfg: GPTConfig, compute_dtype=jnp.float32) -> jax.Array:
    """Mean cross-entropy over the targets that are not -1: torch's GPT.forward(idx, targets)."""
    losses = token_losses(params, idx, targets, cfg, compute_dtype)
    return losses.sum() / jnp.maximum((targets >= 0).sum(), 1)
