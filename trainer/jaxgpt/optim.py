"""
The optimizer split of trainer/optim.py in JAX: Muon for the block matrices, AdamW (optax) for the rest.

Notable:
- the groups come from the torch model's own param_groups() (built on the meta device), so both backends
  always agree on which parameter gets which treatment and learning rate
- Muon step per matrix, as the torch Muon: Nesterov momentum, Polar Express orthogonalisation (the same
  coefficients), NorMuon variance reduction, lr * max(1, rows/cols)**0.5 and cautious weight decay
- the schedule is trainer/optim.py's: apply_schedule's multipliers are computed on the host each step and
  passed in as traced scalars (`Hyper`), so the jitted step never recompiles
- one pure update function over (params, grads, state): jit and the mesh shard it like everything else
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import torch

from nanochat.gpt import GPT, GPTConfig
from trainer.optim import ADAMW_GROUPS, POLAR_EXPRESS_COEFFS, OptimConfig

Params = dict[str, jax.Array]


class Hyper(NamedTuple):
    """This step's schedule multipliers (trainer/optim.py's apply_schedule), as scalars."""

    lr_multiplier: jax.Array
    muon_momentum: jax.Array
    weight_decay_multiplier: jax.Array


class OptState(NamedTuple):
    adam: optax.OptState  # optax.scale_by_adam over the AdamW parameters
    momentum: Params  # Muon's momentum buffer per matrix
    second_moment: Params  # NorMuon's factored second moment per matrix


class OptimSetup(NamedTuple):
    """Which parameters each optimizer takes and at which base learning rate."""

    matrix: tuple[str, ...]
    adamw_lr: dict[str, float]  # parameter name -> base AdamW lr
    matrix_lr: float
    weight_decay: float


def optim_setup(config: GPTConfig, cfg: OptimConfig) -> OptimSetup:
    """trainer/optim.py's build_optimizers, by parameter name: Muon for 'matrix', AdamW for the rest with
    the embedding/unembedding lrs scaled by (n_embd/768)**-0.5."""
    with torch.device("meta"):
        model = GPT(config)
    names = {id(p): name for name, p in model.named_parameters()}
    groups = {group: [names[id(p)] for p in params] for group, params in model.param_groups().items()}
    width_scale = (config.n_embd / 768) ** -0.5
    base_lr = {"embedding": cfg.embedding_lr * width_scale, "unembedding": cfg.unembedding_lr * width_scale,
               "scalar": cfg.scalar_lr}
    adamw_lr = {name: base_lr[group] for group in ADAMW_GROUPS for name in groups[group]}
    return OptimSetup(tuple(groups["matrix"]), adamw_lr, cfg.matrix_lr, cfg.weight_decay)


def _adam(cfg: OptimConfig) -> optax.GradientTransformation:
    b1, b2 = cfg.adam_betas
    return optax.scale_by_adam(b1=b1, b2=b2, eps=cfg.adam_eps)


def init_state(params: Params, setup: OptimSetup, cfg: OptimConfig) -> OptState:
    adam_params = {n: params[n] for n in setup.adamw_lr}
    momentum = {n: jnp.zeros_like(params[n]) for n in setup.matrix}
    second = {n: jnp.zeros(_second_moment_shape(params[n].shape), params[n].dtype) for n in setup.matrix}
    return OptState(_adam(cfg).init(adam_params), momentum, second)


def _second_moment_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One value per row of a tall matrix, per column of a wide one."""
    rows, cols = shape[-2], shape[-1]
    return (rows, 1) if rows >= cols else (1, cols)


def orthogonalize(g: jax.Array, steps: int = 5, dtype=jnp.float32) -> jax.Array:
    """Polar Express: approximately U V^T for g = U S V^T (trainer/optim.py's orthogonalize)."""
    x = g.astype(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.T
    x = x / (jnp.linalg.norm(x) * 1.01 + 1e-6)
    for i in range(steps):
        a, b, c = POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    if tall:
        x = x.T
    return x.astype(g.dtype)


def _variance_reduce(update: jax.Array, buf: jax.Array, beta2: float) -> tuple[jax.Array, jax.Array]:
    """NorMuon: equalise per-neuron update scales, keep the total norm (trainer/optim.py)."""
    reduce_axis = -1 if update.shape[-2] >= update.shape[-1] else -2
    mean_sq = jnp.mean(jnp.square(update), axis=reduce_axis, keepdims=True)
    buf = buf + (1 - beta2) * (mean_sq - buf)
    scaled = update * jax.lax.rsqrt(jnp.maximum(buf, 1e-10))
    ratio = jnp.linalg.norm(update) / jnp.maximum(jnp.linalg.norm(scaled), 1e-10)
    return scaled * ratio, buf


def _muon_step(p: jax.Array, g: jax.Array, momentum_buf: jax.Array, second_buf: jax.Array, lr: jax.Array,
               momentum: jax.Array, weight_decay: jax.Array, cfg: OptimConfig, ortho_dtype
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    momentum_buf = momentum_buf + (1 - momentum) * (g - momentum_buf)
    update = g + momentum * (momentum_buf - g)  # Nesterov
    update = orthogonalize(update, cfg.muon_steps, ortho_dtype)
    if cfg.muon_beta2 is not None:
        update, second_buf = _variance_reduce(update, second_buf, cfg.muon_beta2)
    lr = lr * max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5
    cautious = (update * p) >= 0  # decay only where the update already pulls toward zero
    return p - lr * (update + weight_decay * p * cautious), momentum_buf, second_buf


def apply_updates(params: Params, grads: Params, state: OptState, hyper: Hyper, setup: OptimSetup,
                  cfg: OptimConfig, ortho_dtype=jnp.float32) -> tuple[Params, OptState]:
    """One optimizer step of both optimizers; returns the new parameters and state."""
    new = dict(params)
    adam_grads = {n: grads[n] for n in setup.adamw_lr}
    adam_updates, adam_state = _adam(cfg).update(adam_grads, state.adam)
    for name, update in adam_updates.items():
        new[name] = params[name] - setup.adamw_lr[name] * hyper.lr_multiplier * update
    momentum, second = dict(state.momentum), dict(state.second_moment)
    lr = setup.matrix_lr * hyper.lr_multiplier
    weight_decay = setup.weight_decay * hyper.weight_decay_multiplier
    for name in setup.matrix:
        new[name], momentum[name], second[name] = _muon_step(
            params[name], grads[name], momentum[name], second[name], lr, hyper.muon_momentum, weight_decay,
            cfg, ortho_dtype)
    return new, OptState(adam_state, momentum, second)
