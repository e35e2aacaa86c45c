"""
Optimizers and schedules for training: Muon for the weight matrices, AdamW for everything else.

Notable:
- Muon (https://kellerjordan.github.io/posts/muon/): Nesterov momentum, then the update is orthogonalised
  (Polar Express by default, Keller Jordan's Newton-Schulz quintic as a fallback), then NorMuon variance
  reduction, then a step scaled by max(1, rows/cols)**0.5 with cautious weight decay, all as in nanochat
- orthogonalisation runs in bf16 on CUDA (fast, and the iteration is stable there) and fp32 elsewhere
- AdamW for the embedding, the unembedding (lm_head) and the scalars; the first two have their learning
  rates scaled by (n_embd/768)**-0.5 because nanochat tuned them at width 768
- two recipes (OptimConfig.recipe): "classic", one set of AdamW betas and no AdamW decay, and "record",
  nanochat's record run: per-group AdamW betas, decays and learning-rate multipliers (ADAMW_GROUP_SETTINGS,
  the one place they are set) and NorMuon beta2 0.9 (MUON_BETA2)
- by default plain optimizers: under DDP every rank holds all state and applies the identical,
  deterministic update to identical averaged gradients, so ranks stay bit-identical
- ZeroSharding (train.shard_optimizer), ZeRO-1: each rank keeps optimizer state for the whole parameters it
  owns, receives their summed gradients, updates them and broadcasts them, the reduces overlapping the last
  backward and the broadcasts the optimizer steps; checkpoints gather the state into the unsharded format, so
  a run resumes with the flag on or off
- schedule: linear warmup, constant, linear warmdown to final_lr_frac; Muon momentum ramps 0.85 -> 0.97
  over 400 steps and eases to 0.90 during the warmdown; Muon weight decay follows a cosine to zero
- depth dial: the training horizon from a tokens:params ratio, gradient accumulation from batch sizes,
  and nanochat's batch-size corrections of learning rate and weight decay
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nanochat.config import Config

log = logging.getLogger(__name__)

OrthoMethod = Literal["polar_express", "newton_schulz"]
Recipe = Literal["classic", "record"]


@dataclass(frozen=True)
class AdamWGroup:
    """How one AdamW group trains: its learning rate is OptimConfig.<lr> x lr_mult (x the width scale where
    width_scaled); its decay is decoupled (p -= lr x weight_decay x p) and constant over the run."""

    lr: str  # the OptimConfig field its learning rate comes from
    lr_mult: float
    width_scaled: bool
    betas: tuple[float, float] | None  # None: OptimConfig.adam_betas
    weight_decay: float


# The AdamW groups of each recipe, keyed by model.param_groups() names (fine=True for "record").
ADAMW_GROUP_SETTINGS: dict[str, dict[str, AdamWGroup]] = {
    "classic": {
        "embedding": AdamWGroup("embedding_lr", 1.0, True, None, 0.0),  # token and value embeddings
        "unembedding": AdamWGroup("unembedding_lr", 1.0, True, None, 0.0),
        "scalar": AdamWGroup("scalar_lr", 1.0, False, None, 0.0),  # resid_lambdas and x0_lambdas
    },
    # nanochat's record run (its GPT.setup_optimizer). The values are its tuning; a reason is nanochat's own
    # where it states one (resid_lambdas) and otherwise our reading of what the setting does
    "record": {
        # lm_head: a little more second-moment memory than 0.95 and a light decay on the logits' weights
        "unembedding": AdamWGroup("unembedding_lr", 1.0, True, (0.8, 0.96), 0.01),
        # token embedding: a rare token's row sees a gradient only now and then; beta2 0.995 keeps its
        # second moment from decaying to nothing in between (a huge step when it next appears)
        "embedding": AdamWGroup("embedding_lr", 1.0, True, (0.8, 0.995), 0.001),
        # value embeddings: as sparse as the token embedding, but one per alternate layer, each added straight
        # into v: half the embedding lr keeps their sum from outrunning the token embedding
        "value_embedding": AdamWGroup("embedding_lr", 0.5, True, (0.8, 0.995), 0.01),
        # resid_lambdas multiply the whole residual stream at every layer and so are far more sensitive
        # (nanochat: "they accumulate in the residual stream"): 1% of the scalar lr, 0.005, not 0.5
        "resid": AdamWGroup("scalar_lr", 0.01, False, (0.8, 0.95), 0.05),
        # x0_lambdas blend the embedding back in at every layer; beta1 0.96 (nanochat: "higher beta1 for
        # x0") averages their momentum over ~25 steps instead of 5, a slower-moving blend
        "x0": AdamWGroup("scalar_lr", 1.0, False, (0.96, 0.95), 0.0),
        # smear's gate and lambda and backout's lambda (model.smear, model.backout; empty when off): nanochat
        # trains them at a fixed lr 0.2, here 0.4 x scalar_lr's 0.5 so that the one scalar lr still moves them all
        "smear": AdamWGroup("scalar_lr", 0.4, False, (0.8, 0.95), 0.0),
    },
}
# NorMuon's second-moment decay: nanochat's record run shortened its memory from 0.95 to 0.9
MUON_BETA2: dict[str, float] = {"classic": 0.95, "record": 0.9}


@dataclass
class OptimConfig:
    """nanochat's optimizer and schedule hyperparameters (scripts/base_train.py defaults).

    The typed run config (`train` section of nanochat/config.py) maps field by field onto this.
    """

    embedding_lr: float = 0.3  # AdamW, token embedding; times the width scale
    unembedding_lr: float = 0.008  # AdamW, lm_head; times the width scale
    matrix_lr: float = 0.02  # Muon, all 2D weights inside the blocks
    scalar_lr: float = 0.5  # AdamW, norm gains and per-layer scalars; no width scale
    weight_decay: float = 0.28  # Muon only, cautious; decays on a cosine to zero over the run
    adam_betas: tuple[float, float] = (0.8, 0.95)  # lower beta1 than usual: faster-moving embeddings
    adam_eps: float = 1e-10
    muon_method: OrthoMethod = "polar_express"
    muon_steps: int = 5  # orthogonalisation iterations
    muon_beta2: float | None = MUON_BETA2["classic"]  # NorMuon second-moment decay; None: no variance reduction
    recipe: Recipe = "classic"  # which ADAMW_GROUP_SETTINGS the AdamW groups take
    warmup_ratio: float = 0.01  # nanochat warms up for 40 steps, about 1% of a d20-d26 run
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05


# -----------------------------------------------------------------------------
# Orthogonalisation: map G = U S V^T to (approximately) U V^T

# Polar Express (Amsel, Persson, Musco, Gower 2025, https://arxiv.org/abs/2505.16932): a different quintic
# per iteration, optimal for 5 iterations (safety factor 2e-2, cushion 2). nanochat's coefficients.
# Singular values land in about [0.86, 1.14] for any input with condition number up to ~100.
POLAR_EXPRESS_COEFFS: list[tuple[float, float, float]] = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
# Keller Jordan's Newton-Schulz quintic: one polynomial with the steepest useful slope at zero. It does not
# converge to 1 but oscillates in about [0.68, 1.2], which costs the model nothing.
NEWTON_SCHULZ_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)



def optim_config(cfg: Config, lr_frac: float = 1.0, weight_decay: float | None = None, **schedule: float
                 ) -> OptimConfig:
    """The train section's optimizer settings, learning rates scaled by lr_frac, Muon's weight decay and the
    schedule overridable."""
    t = cfg.train
    settings = dict(warmup_ratio=t.warmup_ratio, warmdown_ratio=t.warmdown_ratio, final_lr_frac=t.final_lr_frac)
    settings.update(schedule)
    return OptimConfig(
        embedding_lr=t.embedding_lr * lr_frac, unembedding_lr=t.unembedding_lr * lr_frac,
        matrix_lr=t.matrix_lr * lr_frac, scalar_lr=t.scalar_lr * lr_frac,
        weight_decay=t.weight_decay if weight_decay is None else weight_decay,
        recipe=t.recipe, muon_beta2=MUON_BETA2[t.recipe], **settings,
    )


def orthogonalize(g: Tensor, steps: int = 5, method: OrthoMethod = "polar_express") -> Tensor:
    """Approximate U V^T for g = U S V^T over the last two dims (leading dims are a batch)."""
    x = g.bfloat16() if g.is_cuda else g.float()
    # iterate on the wide orientation so that X X^T is the smaller Gram matrix
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    if method == "polar_express":
        # the 1.01 keeps the top singular value safely inside the interval the coefficients were fit on
        x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
        # more steps than the table repeat the last polynomial, as the paper does
        coeffs = [POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)] for i in range(steps)]
    elif method == "newton_schulz":
        x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
        coeffs = [NEWTON_SCHULZ_COEFFS] * steps
    else:
        raise ValueError(
            f"unknown orthogonalisation method {method!r}; allowed: polar_express, newton_schulz"
        )
    for a, b, c in coeffs:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


# -----------------------------------------------------------------------------
# Muon


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, nanochat's variant, for parameters with ndim >= 2.

    Not for embeddings, the lm_head or 0/1-D parameters: give those to AdamW.
    Per parameter: Nesterov momentum -> orthogonalise -> NorMuon variance reduction -> cautious update.
    Parameters of one shape are orthogonalised together as one batch (fewer, larger matmuls).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        beta2: float | None = 0.95,
        ns_steps: int = 5,
        method: OrthoMethod = "polar_express",
    ):
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, beta2=beta2, ns_steps=ns_steps, method=method
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"Muon needs parameters with ndim >= 2, got shape {tuple(p.shape)}; use AdamW"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for shape in dict.fromkeys(p.shape for p in params):  # ordered, so identical on every rank
                bucket = [p for p in params if p.shape == shape]
                updates = torch.stack([self._nesterov(p, group["momentum"]) for p in bucket])
                updates = orthogonalize(updates, group["ns_steps"], group["method"])
                for p, update in zip(bucket, updates.unbind(0), strict=True):
                    if group["beta2"] is not None:
                        update = self._variance_reduce(p, update, group["beta2"])
                    # an orthogonal update has RMS 1/sqrt(max(rows, cols)); boosting tall ones by
                    # sqrt(rows/cols) makes it 1/sqrt(cols), relative to fan-in, for every shape
                    lr = group["lr"] * max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                    _cautious_update(p, update, lr, group["weight_decay"])
        return loss

    def _nesterov(self, p: Tensor, momentum: float) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - momentum)
        return p.grad.lerp(buf, momentum)

    def _variance_reduce(self, p: Tensor, update: Tensor, beta2: float) -> Tensor:
        """NorMuon (https://arxiv.org/abs/2510.05491): equalise per-neuron update scales, keep the total norm.

        The second moment is factored: one value per row of a tall matrix, per column of a wide one.
        """
        state = self.state[p]
        reduce_dim = -1 if p.size(-2) >= p.size(-1) else -2
        mean_sq = update.float().square().mean(dim=reduce_dim, keepdim=True)
        if "second_momentum_buffer" not in state:
            state["second_momentum_buffer"] = torch.zeros_like(mean_sq)
        buf = state["second_momentum_buffer"]
        buf.lerp_(mean_sq, 1 - beta2)
        scaled = update.float() * buf.clamp_min(1e-10).rsqrt()
        norm_ratio = update.float().norm(dim=(-2, -1), keepdim=True) / scaled.norm(
            dim=(-2, -1), keepdim=True
        ).clamp_min(1e-10)
        return (scaled * norm_ratio).to(update.dtype)


def _cautious_update(p: Tensor, update: Tensor, lr: float, weight_decay: float) -> None:
    """p -= lr * (update + wd * p), decaying only where the update already pulls p toward zero.

    This "cautious" weight decay never pushes a weight against the direction its gradient wants.
    """
    mask = (update * p) >= 0
    p.sub_(lr * (update + weight_decay * p * mask))


# -----------------------------------------------------------------------------
# Building the optimizers


class GroupedModel(Protocol):
    """What build_optimizers needs from a model (nanochat/gpt.py's GPT provides it)."""

    config: Any  # has n_embd

    def param_groups(self, fine: bool = False) -> dict[str, list[nn.Parameter]]: ...

    def parameters(self) -> Iterable[nn.Parameter]: ...


ADAMW_GROUPS = tuple(ADAMW_GROUP_SETTINGS["classic"])  # model.param_groups()'s AdamW keys
REQUIRED_GROUPS = ("matrix", *ADAMW_GROUPS)


def _check_partition(model: GroupedModel, groups: dict[str, list[nn.Parameter]],
                     required: tuple[str, ...] = REQUIRED_GROUPS) -> None:
    """Every trainable parameter in exactly one group: a forgotten one would silently never train."""
    if set(groups) != set(required):
        raise ValueError(
            f"model.param_groups() must have keys {sorted(required)}, got {sorted(groups)}"
        )
    seen: dict[int, str] = {}
    for name, params in groups.items():
        for p in params:
            if id(p) in seen:
                raise ValueError(
                    f"parameter of shape {tuple(p.shape)} is in both {seen[id(p)]!r} and {name!r}"
                )
            seen[id(p)] = name
    missing = [tuple(p.shape) for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"parameters of shapes {missing} are in no group of model.param_groups()")


def build_optimizers(
    model: GroupedModel, cfg: OptimConfig, lr_scale: float = 1.0
) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] over the model's parameter groups, with the recipe's per-group settings.

    lr_scale multiplies every learning rate (nanochat's batch-size correction, see batch_lr_scale).
    Each group records `initial_lr` (and Muon groups `initial_weight_decay`) for apply_schedule.
    """
    if cfg.recipe not in ADAMW_GROUP_SETTINGS:
        raise ValueError(f"unknown optimizer recipe {cfg.recipe!r}; allowed: {', '.join(ADAMW_GROUP_SETTINGS)}")
    settings = ADAMW_GROUP_SETTINGS[cfg.recipe]
    groups = model.param_groups() if cfg.recipe == "classic" else model.param_groups(fine=True)
    _check_partition(model, groups, ("matrix", *settings))
    width_scale = (model.config.n_embd / 768) ** -0.5
    log.info(
        "AdamW embedding/unembedding lr scaled by (%d/768)**-0.5 = %.4f", model.config.n_embd, width_scale
    )
    adamw_groups = [
        dict(name=name, params=groups[name],
             lr=getattr(cfg, s.lr) * s.lr_mult * (width_scale if s.width_scaled else 1.0) * lr_scale,
             betas=s.betas or cfg.adam_betas, weight_decay=s.weight_decay)
        for name, s in settings.items()
        if groups[name]
    ]
    # foreach/fused off: the single-tensor loop is the same arithmetic on every device and rank
    adamw = torch.optim.AdamW(
        adamw_groups, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=0.0, foreach=False, fused=False
    )
    muon = Muon(
        [dict(name="matrix", params=groups["matrix"])],
        lr=cfg.matrix_lr * lr_scale,
        momentum=0.95,  # overwritten every step by apply_schedule
        weight_decay=cfg.weight_decay,
        beta2=cfg.muon_beta2,
        ns_steps=cfg.muon_steps,
        method=cfg.muon_method,
    )
    for group in adamw.param_groups + muon.param_groups:
        group["initial_lr"] = group["lr"]
    for group in muon.param_groups:
        group["initial_weight_decay"] = group["weight_decay"]
    return [adamw, muon]


def optimizers_state_dict(optimizers: list[torch.optim.Optimizer]) -> list[dict[str, Any]]:
    """One state dict per optimizer, tagged with its type; loads with torch.load(weights_only=True)."""
    return [{"type": type(opt).__name__, "state": opt.state_dict()} for opt in optimizers]


def load_optimizers_state_dict(optimizers: list[torch.optim.Optimizer], states: list[dict[str, Any]],
                               sharding: ZeroSharding | None = None) -> None:
    """Restore what optimizers_state_dict saved, into optimizers built the same way; with a sharding, only
    the state of the parameters this rank owns (the saved state is the whole, unsharded one either way)."""
    types = [type(opt).__name__ for opt in optimizers]
    saved = [s["type"] for s in states]
    if types != saved:
        raise ValueError(f"optimizer state holds {saved}, but the optimizers are {types}")
    for opt, s in zip(optimizers, states, strict=True):
        state = s["state"]
        if sharding is not None:
            params = _params(opt)
            state = {**state, "state": {i: v for i, v in state["state"].items() if sharding.owns(params[int(i)])}}
        opt.load_state_dict(state)


def warm_start_optimizers(optimizers: list[torch.optim.Optimizer], states: list[dict[str, Any]],
                          sharding: ZeroSharding | None = None) -> None:
    """Load the state another stage's optimizers saved (momentum buffers, Adam moments and step counts) into
    optimizers built the same way, keeping their own hyperparameters (learning rates, betas, decays,
    schedule anchors), which load_state_dict would overwrite. A ValueError when they were not built the same
    way (other optimizers, groups or parameters), before anything is loaded."""
    for opt, saved in zip(optimizers, states, strict=True):
        groups = saved["state"]["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in opt.param_groups]:
            raise ValueError(f"the saved {saved['type']} state has groups of {[len(g['params']) for g in groups]} "
                             f"parameters, this one {[len(g['params']) for g in opt.param_groups]}")
    own = [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups] for opt in optimizers]
    load_optimizers_state_dict(optimizers, states, sharding)
    for opt, settings in zip(optimizers, own, strict=True):
        for group, kept in zip(opt.param_groups, settings, strict=True):
            group.update(kept)


def state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes of tensors this process holds as optimizer state (moments, momentum buffers, step counts)."""
    return sum(t.numel() * t.element_size() for opt in optimizers for state in opt.state.values()
               for t in state.values() if isinstance(t, Tensor))


def _params(opt: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The optimizer's parameters in state_dict order (the integer keys of its "state")."""
    return [p for group in opt.param_groups for p in group["params"]]


# -----------------------------------------------------------------------------
# Sharded optimizer state (ZeRO-1)


def balanced_owners(costs: list[int], world_size: int) -> list[int]:
    """A rank for each item: largest first, each to the rank with the least cost so far (lowest rank on a
    tie), so every rank's total is within one item of the mean. Deterministic: every rank computes the same."""
    loads = [0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def _state_elements(opt: torch.optim.Optimizer, p: nn.Parameter) -> int:
    """Optimizer-state elements a parameter costs: AdamW two moments, Muon a momentum buffer (NorMuon's
    per-row vector is negligible)."""
    return 2 * p.numel() if isinstance(opt, torch.optim.AdamW) else p.numel()


class ZeroSharding:
    """ZeRO-1 over the data-parallel ranks: each parameter's optimizer state lives on one rank, its owner.

    Owners hold whole parameters, since Muon orthogonalises whole matrices; balanced_owners spreads them by
    state size. A step (`step`) replaces DDP's gradient all-reduce: gradients, accumulated locally over the
    micro-steps, are summed onto each parameter's owner and averaged there, while the other ranks drop theirs;
    then the optimizers step, and both AdamW and Muon skip parameters without a gradient, so state is only
    ever created for owned ones; then every owner broadcasts its updated parameters. param_groups still list
    every parameter, so apply_schedule reaches every group. The model must not be under DDP.

    Communication overlaps computation (overlap=True), as DDP's does: inside `last_backward()` (the last
    micro-step's backward) each gradient's reduce starts as soon as that gradient is final, while the backward
    goes on computing the others; and each optimizer's parameters are broadcast while the next one steps.
    Collectives must start in the same order on every rank, so reduces start in one agreed order: the order in
    which rank 0's gradients became final in the first step's backward (DDP keeps its buckets in one order
    for the same reason); a gradient final before its turn waits for the ones ahead of it.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], rank: int, world_size: int, overlap: bool = True):
        self.rank, self.world_size, self.overlap = rank, world_size, overlap
        pairs = [(opt, p) for opt in optimizers for p in _params(opt)]
        self.params = [p for _, p in pairs]
        self.owners = balanced_owners([_state_elements(opt, p) for opt, p in pairs], world_size)
        self._owned = {id(p) for p, owner in zip(self.params, self.owners, strict=True) if owner == rank}
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._order: list[int] | None = None  # the agreed order of the reduces, by index into params
        self._final: list[int] = []  # the order the first step's gradients became final in (rank 0's is agreed)
        self._ready: set[int] = set()
        self._launched = 0  # _order[:_launched] have their reduce started
        self._works: list[dist.Work] = []
        self._armed = False
        self.reduces_in_backward = 0  # of the last step: how many started before its backward returned
        if overlap:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._gradient_final)

    def owns(self, p: nn.Parameter) -> bool:
        return id(p) in self._owned

    def owned_elements(self) -> int:
        return sum(p.numel() for p in self.params if self.owns(p))

    @contextmanager
    def last_backward(self) -> Iterator[None]:
        """Around the backward after which the optimizers step: its gradients start their reduces as they
        become final (earlier micro-steps' gradients are still accumulating)."""
        self._armed, self.reduces_in_backward = True, 0
        try:
            yield
        finally:
            self._armed = False

    def _gradient_final(self, p: nn.Parameter) -> None:
        """Autograd's hook once p.grad holds this backward's whole gradient."""
        if not self._armed:
            return
        i = self._index[id(p)]
        if self._order is None:  # the first step: only learn the order
            self._final.append(i)
            return
        self._ready.add(i)
        while self._launched < len(self._order) and self._order[self._launched] in self._ready:
            self._reduce(self._order[self._launched])
            self._launched += 1
            self.reduces_in_backward += 1

    def _reduce(self, i: int) -> None:
        """Start summing params[i]'s gradient onto its owner. A parameter without a gradient on this rank
        contributes zeros, so every rank joins every reduce."""
        p = self.params[i]
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        self._works.append(dist.reduce(p.grad, dst=self.owners[i], op=dist.ReduceOp.SUM, async_op=True))

    def _agree_on_order(self) -> list[int]:
        """Rank 0's order of final gradients (the parameters that had none last, in index order), on every
        rank; plain index order without overlap."""
        if not self.overlap:
            return list(range(len(self.params)))
        seen = dict.fromkeys(self._final)
        order = [[*seen, *(i for i in range(len(self.params)) if i not in seen)]]
        dist.broadcast_object_list(order, src=0)
        return order[0]

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Each gradient summed onto its owner and divided there by the ranks (DDP's mean); dropped elsewhere.
        Starts the reduces last_backward() did not, then waits for all of them."""
        if self._order is None:
            self._order = self._agree_on_order()
        for i in self._order[self._launched:]:
            self._reduce(i)
        for work in self._works:
            work.wait()
        self._works, self._final, self._ready, self._launched = [], [], set(), 0
        for p in self.params:
            if self.owns(p):
                p.grad.div_(self.world_size)
            else:
                p.grad = None

    def step(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Gradients to their owners; then each optimizer steps and broadcasts its parameters from their
        owners, while the next one steps."""
        self.reduce_gradients()
        works = []
        for opt in optimizers:
            opt.step()
            works += [dist.broadcast(p.detach(), src=self.owners[self._index[id(p)]], async_op=True)
                      for p in _params(opt)]
            if not self.overlap:  # each optimizer's broadcasts finish before the next one steps
                for work in works:
                    work.wait()
                works = []
        for work in works:
            work.wait()

    def gathered_state_dict(self, optimizers: list[torch.optim.Optimizer]) -> list[dict[str, Any]] | None:
        """optimizers_state_dict of the whole, unsharded state, on rank 0 (None elsewhere): each rank's owned
        state, moved to the CPU, gathered and merged. Every rank must call it."""
        local = [{**s, "state": {**s["state"], "state": _to_cpu(s["state"]["state"])}}
                 for s in optimizers_state_dict(optimizers)]
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if gathered is None:
            return None
        merged = gathered[0]
        for other in gathered[1:]:
            for mine, theirs in zip(merged, other, strict=True):
                mine["state"]["state"].update(theirs["state"]["state"])
        for s in merged:
            s["state"]["state"] = dict(sorted(s["state"]["state"].items()))
        return merged


def _to_cpu(state: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {i: {k: v.cpu() if isinstance(v, Tensor) else v for k, v in s.items()} for i, s in state.items()}


def step_optimizers(optimizers: list[torch.optim.Optimizer], sharding: ZeroSharding | None = None) -> None:
    """Every optimizer steps; with a sharding, through it (gradients to owners, parameters back)."""
    if sharding is not None:
        sharding.step(optimizers)
        return
    for opt in optimizers:
        opt.step()


# -----------------------------------------------------------------------------
# Schedules

MUON_MOMENTUM_START, MUON_MOMENTUM_PEAK, MUON_MOMENTUM_END = 0.85, 0.97, 0.90
MUON_MOMENTUM_RAMP_STEPS = 400


def lr_multiplier(
    step: int, total_steps: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float
) -> float:
    """Linear warmup to 1, constant, then linear warmdown reaching final_lr_frac at total_steps."""
    warmup = round(warmup_ratio * total_steps)
    warmdown = round(warmdown_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if warmdown == 0 or step <= total_steps - warmdown:
        return 1.0
    progress = max(0.0, (total_steps - step) / warmdown)  # 1 as the warmdown starts, 0 at the end
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, total_steps: int, warmdown_ratio: float) -> float:
    """0.85 -> 0.97 over the first 400 steps, then 0.97 -> 0.90 across the LR warmdown."""
    if step < MUON_MOMENTUM_RAMP_STEPS:
        frac = step / MUON_MOMENTUM_RAMP_STEPS
        return (1 - frac) * MUON_MOMENTUM_START + frac * MUON_MOMENTUM_PEAK
    warmdown = round(warmdown_ratio * total_steps)
    warmdown_start = total_steps - warmdown
    if warmdown > 0 and step >= warmdown_start:
        progress = min(1.0, (step - warmdown_start) / warmdown)
        return (1 - progress) * MUON_MOMENTUM_PEAK + progress * MUON_MOMENTUM_END
    return MUON_MOMENTUM_PEAK


def weight_decay_multiplier(step: int, total_steps: int) -> float:
    """Cosine from 1 at step 0 to 0 at total_steps (Muon's weight decay)."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def apply_schedule(
    optimizers: list[torch.optim.Optimizer], step: int, total_steps: int, cfg: OptimConfig
) -> dict[str, float]:
    """Set every group's lr (and Muon's momentum and weight decay) for this step; returns them for logging."""
    lrm = lr_multiplier(step, total_steps, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
    momentum = muon_momentum(step, total_steps, cfg.warmdown_ratio)
    wdm = weight_decay_multiplier(step, total_steps)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if isinstance(opt, Muon):
                group["momentum"] = momentum
                group["weight_decay"] = group["initial_weight_decay"] * wdm
    return {"lr_multiplier": lrm, "muon_momentum": momentum, "weight_decay_multiplier": wdm}


# -----------------------------------------------------------------------------
# Depth dial: how long to train and how to split a batch

REFERENCE_BATCH_SIZE = 2**19  # tokens; nanochat's measured optimum at d12, where the lrs were tuned


class TrainingHorizon(NamedTuple):
    num_steps: int
    num_tokens: int  # num_steps * total_batch_size, what will actually be trained on


def num_scaling_params(model: GroupedModel) -> int:
    """Parameters that count for the tokens:params ratio: block matrices + lm_head, as nanochat counts
    (its scaling-law fits came out cleanest with exactly these)."""
    groups = model.param_groups()
    return sum(p.numel() for p in groups["matrix"] + groups["unembedding"])


def training_horizon(
    scaling_params: int, target_param_data_ratio: float, total_batch_size: int
) -> TrainingHorizon:
    """Steps to see target_param_data_ratio tokens per scaling parameter (nanochat: 12; Chinchilla: ~20)."""
    target_tokens = int(target_param_data_ratio * scaling_params)
    num_steps = target_tokens // total_batch_size
    if num_steps < 1:
        raise ValueError(
            f"train.target_param_data_ratio ({target_param_data_ratio}) x {scaling_params:,} scaling params = "
            f"{target_tokens:,} tokens is less than one batch (train.total_batch_size = {total_batch_size:,})"
        )
    return TrainingHorizon(num_steps, num_steps * total_batch_size)


def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step so that all workers together see total_batch_size tokens."""
    tokens_per_micro_step = device_batch_size * seq_len * world_size
    if total_batch_size % tokens_per_micro_step != 0:
        raise ValueError(
            f"train.total_batch_size ({total_batch_size}) must be divisible by train.device_batch_size x "
            f"train.seq_len x train.workers ({device_batch_size} x {seq_len} x {world_size} = {tokens_per_micro_step})"
        )
    return total_batch_size // tokens_per_micro_step


def optimal_batch_size(target_tokens: float, reference_tokens: float,
                       reference_batch_size: int = REFERENCE_BATCH_SIZE) -> int:
    """nanochat's batch size for a horizon of target_tokens: B_ref x (D/D_ref)**0.383 (Power Lines,
    https://arxiv.org/abs/2505.13738), rounded to the nearest power of two. reference_tokens is the d12
    model's horizon at the same tokens:params ratio, so the ratio cancels: d20 to d26 all get 2**20."""
    predicted = reference_batch_size * (target_tokens / reference_tokens) ** 0.383
    return 2 ** round(math.log2(predicted))


def batch_lr_scale(total_batch_size: int, reference_batch_size: int = REFERENCE_BATCH_SIZE) -> float:
    """sqrt(B / B_ref): the AdamW rule for larger batches; nanochat assumes it for Muon too."""
    return (total_batch_size / reference_batch_size) ** 0.5


def scaled_weight_decay(
    weight_decay: float,
    total_batch_size: int,
    num_tokens: int,
    reference_tokens: int,
    reference_batch_size: int = REFERENCE_BATCH_SIZE,
) -> float:
    """lambda_ref * sqrt(B/B_ref) * (D_ref/D): keeps B/(lr * lambda * D) constant under batch_lr_scale
    (https://arxiv.org/abs/2405.13698). reference_tokens is the d12 model's horizon at the same ratio."""
    return weight_decay * (total_batch_size / reference_batch_size) ** 0.5 * (reference_tokens / num_tokens)
