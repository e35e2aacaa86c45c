"""Muon/AdamW, the schedules and the depth-dial helpers of trainer/optim.py, on a tiny self-contained model."""

import copy
import io
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from trainer.optim import (
    MUON_BETA2,
    Muon,
    OptimConfig,
    apply_schedule,
    batch_lr_scale,
    build_optimizers,
    grad_accum_steps,
    load_optimizers_state_dict,
    lr_multiplier,
    muon_momentum,
    num_scaling_params,
    optimal_batch_size,
    optimizers_state_dict,
    orthogonalize,
    scaled_weight_decay,
    training_horizon,
    weight_decay_multiplier,
)

VOCAB = 32


class TinyModel(nn.Module):
    """Embedding -> MLP (tall and wide matrices) -> two square mixers -> gained norm -> lm_head."""

    def __init__(self, n_embd: int = 32):
        super().__init__()
        self.config = SimpleNamespace(n_embd=n_embd)
        self.wte = nn.Embedding(VOCAB, n_embd)
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=False)
        self.mix1 = nn.Linear(n_embd, n_embd, bias=False)
        self.mix2 = nn.Linear(n_embd, n_embd, bias=False)
        self.gain = nn.Parameter(torch.ones(n_embd))
        self.lm_head = nn.Linear(n_embd, VOCAB, bias=False)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "matrix": [self.fc.weight, self.proj.weight, self.mix1.weight, self.mix2.weight],
            "embedding": [self.wte.weight],
            "unembedding": [self.lm_head.weight],
            "scalar": [self.gain],
        }

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(self.wte(idx), (self.config.n_embd,))
        x = x + self.proj(F.relu(self.fc(x)).square())
        x = x + self.mix2(F.relu(self.mix1(x)))
        return self.lm_head(F.rms_norm(x, (self.config.n_embd,)) * self.gain)


def make_model(seed: int = 0) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel()


def batch(step: int, rank: int = 0, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed classification task, y = (5x + 3) mod V, with fresh inputs per step and rank."""
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randint(0, VOCAB, (size,), generator=gen)
    return x, (5 * x + 3) % VOCAB


def train_steps(model, optimizers, cfg, steps: range, total_steps: int) -> float:
    loss = torch.tensor(float("nan"))
    for step in steps:
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        apply_schedule(optimizers, step, total_steps, cfg)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return loss.item()


# -----------------------------------------------------------------------------
# orthogonalisation


def with_spectrum(rows: int, cols: int, smallest: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix 7 * U diag(s) V^T with s log-spaced from 1 down to `smallest`, and its polar factor U V^T."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
    s = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), k)
    return 7.0 * u @ torch.diag(s) @ v.T, u @ v.T


# measured bands (fp32): Polar Express ~[0.86, 1.14], Newton-Schulz ~[0.68, 1.20], for condition number <= 100
BANDS = {"polar_express": (0.82, 1.18), "newton_schulz": (0.62, 1.26)}


@pytest.mark.parametrize("method", ["polar_express", "newton_schulz"])
@pytest.mark.parametrize("shape", [(96, 24), (24, 96), (48, 48)], ids=["tall", "wide", "square"])
def test_orthogonalize_gives_singular_values_near_one(method, shape):
    g, polar = with_spectrum(*shape, smallest=1e-2)
    out = orthogonalize(g, steps=5, method=method)
    assert out.shape == g.shape and out.dtype == g.dtype
    sv = torch.linalg.svdvals(out)
    low, high = BANDS[method]
    assert low < sv.min() and sv.max() < high, (sv.min().item(), sv.max().item())
    # and it is the polar factor of g, not just any orthogonal matrix
    assert (out - polar).norm() / polar.norm() < 0.2


def test_orthogonalize_batches_over_leading_dims():
    g = torch.stack([with_spectrum(40, 20, 1e-2, seed=s)[0] for s in range(3)])
    batched = orthogonalize(g)
    for i in range(3):
        torch.testing.assert_close(batched[i], orthogonalize(g[i]))


def test_orthogonalize_rejects_unknown_method():
    with pytest.raises(ValueError, match="newton_schulz"):
        orthogonalize(torch.randn(4, 4), method="svd")


# -----------------------------------------------------------------------------
# Muon update rule


def one_muon_step(shape, weight_decay=0.0, beta2=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(shape, generator=gen))
    p.grad = torch.randn(shape, generator=gen)
    before = p.detach().clone()
    Muon([p], lr=0.1, momentum=0.0, weight_decay=weight_decay, beta2=beta2).step()
    return before, p.detach(), p.grad


def test_muon_step_is_shape_scaled_orthogonalised_gradient():
    # momentum 0 and no variance reduction: the step is exactly lr * sqrt(rows/cols) * orth(grad)
    before, after, grad = one_muon_step((128, 32))
    torch.testing.assert_close(before - after, 0.1 * 2.0 * orthogonalize(grad))
    # wide matrices are not boosted
    before, after, grad = one_muon_step((32, 128))
    torch.testing.assert_close(before - after, 0.1 * orthogonalize(grad))


def test_cautious_weight_decay_only_shrinks_where_update_agrees():
    before, no_wd, grad = one_muon_step((64, 32), weight_decay=0.0)
    _, with_wd, _ = one_muon_step((64, 32), weight_decay=0.5)
    update = (before - no_wd) / (0.1 * 2**0.5)
    agrees = update * before >= 0
    assert 0.2 < agrees.float().mean() < 0.8  # both cases are present
    decay = no_wd - with_wd
    torch.testing.assert_close(decay[agrees], (0.1 * 2**0.5 * 0.5 * before)[agrees])
    assert torch.all(decay[~agrees] == 0)


@pytest.mark.parametrize("shape", [(96, 24), (24, 96)], ids=["tall", "wide"])
def test_normuon_equalises_neuron_scales_and_keeps_norm(shape):
    before, plain, _ = one_muon_step(shape, beta2=None)
    _, reduced, _ = one_muon_step(shape, beta2=0.95)
    plain_step, reduced_step = before - plain, before - reduced
    torch.testing.assert_close(reduced_step.norm(), plain_step.norm())
    dim = -1 if shape[0] >= shape[1] else -2  # rows of a tall matrix, columns of a wide one
    neuron_norms = reduced_step.norm(dim=dim)
    assert neuron_norms.std() / neuron_norms.mean() < 1e-4
    assert plain_step.norm(dim=dim).std() / plain_step.norm(dim=dim).mean() > 1e-2


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="AdamW"):
        Muon([nn.Parameter(torch.zeros(8))])


# -----------------------------------------------------------------------------
# building the optimizers


def test_every_parameter_lands_in_exactly_one_optimizer():
    model = make_model()
    adamw, muon = build_optimizers(model, OptimConfig())
    ids = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {
        id(p) for p in model.param_groups()["matrix"]
    }


def test_learning_rates_follow_nanochat_groups_and_width_scale():
    model = make_model()  # n_embd 32: AdamW embedding lrs scale by (32/768)**-0.5 = sqrt(24)
    cfg = OptimConfig()
    adamw, muon = build_optimizers(model, cfg, lr_scale=0.5)
    lrs = {g["name"]: g["lr"] for g in adamw.param_groups}
    assert lrs["embedding"] == pytest.approx(0.5 * cfg.embedding_lr * 24**0.5)
    assert lrs["unembedding"] == pytest.approx(0.5 * cfg.unembedding_lr * 24**0.5)
    assert lrs["scalar"] == pytest.approx(0.5 * cfg.scalar_lr)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.5 * cfg.matrix_lr)
    assert all(g["weight_decay"] == 0.0 and g["betas"] == cfg.adam_betas for g in adamw.param_groups)
    assert muon.param_groups[0]["weight_decay"] == cfg.weight_decay


def record_gpt(seed: int = 0, **keys):
    """A tiny nanochat GPT (value embeddings, resid/x0 lambdas): the groups the record recipe splits; `keys`
    add GPTConfig settings."""
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=VOCAB, n_layer=3, n_head=2, n_kv_head=2, n_embd=32, **keys))
    model.init_weights()
    return model


def test_record_recipe_sets_nanochats_per_group_adamw_and_normuon_settings():
    model = record_gpt()  # n_embd 32: the width scale is (32/768)**-0.5 = sqrt(24)
    cfg = OptimConfig(recipe="record", muon_beta2=MUON_BETA2["record"])
    adamw, muon = build_optimizers(model, cfg)
    groups = {g["name"]: g for g in adamw.param_groups}
    expected = {  # name: (lr, betas, weight decay), nanochat's GPT.setup_optimizer
        "unembedding": (0.008 * 24**0.5, (0.8, 0.96), 0.01),
        "embedding": (0.3 * 24**0.5, (0.8, 0.995), 0.001),
        "value_embedding": (0.15 * 24**0.5, (0.8, 0.995), 0.01),
        "resid": (0.005, (0.8, 0.95), 0.05),
        "x0": (0.5, (0.96, 0.95), 0.0),
    }
    assert set(groups) == set(expected)
    for name, (lr, betas, wd) in expected.items():
        assert (groups[name]["lr"], groups[name]["betas"], groups[name]["weight_decay"]) == (
            pytest.approx(lr), betas, wd), name
    assert groups["resid"]["params"] == [model.resid_lambdas] and groups["x0"]["params"] == [model.x0_lambdas]
    assert groups["value_embedding"]["params"] == list(model.value_embeds.parameters())
    assert muon.param_groups[0]["beta2"] == 0.9
    ids = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_record_recipe_trains_smear_and_backout_at_nanochats_fixed_lr():
    from nanochat.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(sequence_len=16, vocab_size=VOCAB, n_layer=3, n_head=2, n_kv_head=2, n_embd=32,
                          smear=True, backout=True))
    model.init_weights()
    adamw, _ = build_optimizers(model, OptimConfig(recipe="record"))
    smear = next(g for g in adamw.param_groups if g["name"] == "smear")
    assert (smear["lr"], smear["betas"], smear["weight_decay"]) == (pytest.approx(0.2), (0.8, 0.95), 0.0)
    assert smear["params"] == [model.smear_gate.weight, model.smear_lambda, model.backout_lambda]


def test_classic_recipe_keeps_one_adamw_setting_and_the_scalars_at_scalar_lr():
    model = record_gpt()
    adamw, muon = build_optimizers(model, OptimConfig())
    groups = {g["name"]: g for g in adamw.param_groups}
    assert set(groups) == {"embedding", "unembedding", "scalar"}
    assert groups["scalar"]["lr"] == 0.5 and groups["scalar"]["params"] == [model.resid_lambdas, model.x0_lambdas]
    assert all(g["betas"] == (0.8, 0.95) and g["weight_decay"] == 0.0 for g in adamw.param_groups)
    assert muon.param_groups[0]["beta2"] == 0.95


def test_record_adamw_decay_is_decoupled_and_not_scheduled():
    """AdamW's decay shrinks a parameter by lr x wd per step whatever its gradient; apply_schedule moves the
    lr but leaves the decay (nanochat schedules only Muon's)."""
    model = record_gpt()
    cfg = OptimConfig(recipe="record", warmup_ratio=0.0, warmdown_ratio=0.5)
    adamw, muon = build_optimizers(model, cfg)
    apply_schedule([adamw, muon], 80, 100, cfg)
    resid = next(g for g in adamw.param_groups if g["name"] == "resid")
    assert resid["weight_decay"] == 0.05 and resid["lr"] == pytest.approx(0.005 * lr_multiplier(80, 100, 0.0, 0.5, 0.05))
    before = model.resid_lambdas.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    adamw.step()
    torch.testing.assert_close(model.resid_lambdas.detach(), before * (1 - resid["lr"] * 0.05))


def test_record_recipe_resumes_bit_identically():
    """Every record-run key on (RoPE base, q/k scale, window layers, smear, backout): a run stopped at step 5
    and resumed from its saved state ends on exactly the weights of the straight run."""
    cfg = OptimConfig(recipe="record", muon_beta2=0.9, warmup_ratio=0.1, warmdown_ratio=0.5)
    idx = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    keys = dict(window_pattern="SSL", rope_base=100000.0, qk_scale=1.2, smear=True, backout=True)

    def steps(model, opts, span):
        for step in span:
            model(idx, idx.roll(-1, 1)).backward()
            apply_schedule(opts, step, 10, cfg)
            for opt in opts:
                opt.step()
            model.zero_grad(set_to_none=True)

    straight = record_gpt(**keys)
    steps(straight, build_optimizers(straight, cfg), range(10))
    first = record_gpt(**keys)
    opts = build_optimizers(first, cfg)
    steps(first, opts, range(5))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": optimizers_state_dict(opts)}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = record_gpt(seed=7, **keys)
    resumed.load_state_dict(saved["model"])
    resumed_opts = build_optimizers(resumed, cfg)
    load_optimizers_state_dict(resumed_opts, saved["optim"])
    steps(resumed, resumed_opts, range(5, 10))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_parameter_missing_from_groups_is_an_error():
    model = make_model()
    model.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        build_optimizers(model, OptimConfig())


def test_parameter_in_two_groups_is_an_error():
    model = make_model()
    groups = model.param_groups()
    groups["scalar"].append(model.fc.weight)
    model.param_groups = lambda: groups
    with pytest.raises(ValueError, match="both 'matrix' and 'scalar'"):
        build_optimizers(model, OptimConfig())


@pytest.mark.parametrize("method", ["polar_express", "newton_schulz"])
def test_training_reduces_loss(method):
    model = make_model()
    cfg = OptimConfig(muon_method=method)
    optimizers = build_optimizers(model, cfg)
    x, y = batch(10_000)
    with torch.no_grad():
        initial = F.cross_entropy(model(x), y).item()
    train_steps(model, optimizers, cfg, range(40), total_steps=40)
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    assert final < 0.3 * initial, (initial, final)


# -----------------------------------------------------------------------------
# checkpoint round trip


def test_resume_from_saved_state_is_bit_identical():
    cfg = OptimConfig(warmup_ratio=0.1, warmdown_ratio=0.5)
    total = 20

    uninterrupted = make_model()
    train_steps(uninterrupted, build_optimizers(uninterrupted, cfg), cfg, range(total), total)

    first = make_model()
    first_opts = build_optimizers(first, cfg)
    train_steps(first, first_opts, cfg, range(10), total)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": optimizers_state_dict(first_opts)}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert "momentum_buffer" in next(iter(saved["optim"][1]["state"]["state"].values()))

    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    resumed_opts = build_optimizers(resumed, cfg)
    load_optimizers_state_dict(resumed_opts, saved["optim"])
    train_steps(resumed, resumed_opts, cfg, range(10, total), total)
    for a, b in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)

    # the comparison is sensitive: resuming without the optimizer state drifts
    fresh = make_model(seed=123)
    fresh.load_state_dict(saved["model"])
    train_steps(fresh, build_optimizers(fresh, cfg), cfg, range(10, total), total)
    assert not all(
        torch.equal(a, b) for a, b in zip(uninterrupted.parameters(), fresh.parameters(), strict=True)
    )


def test_loading_state_into_different_optimizers_is_an_error():
    model = make_model()
    adamw, muon = build_optimizers(model, OptimConfig())
    with pytest.raises(ValueError, match="Muon"):
        load_optimizers_state_dict([adamw, muon], optimizers_state_dict([muon, adamw]))


def test_a_warm_start_takes_the_saved_state_and_keeps_its_own_settings():
    """A chat stage's optimizers start from the previous stage's momentum and moments (warm_start_optimizers),
    with their own learning rates and decays, which load_state_dict alone would overwrite."""
    from trainer.optim import warm_start_optimizers

    model = make_model()
    base_cfg = OptimConfig()
    trained = build_optimizers(model, base_cfg)
    train_steps(model, trained, base_cfg, range(5), 10)
    saved = optimizers_state_dict(trained)
    chat = build_optimizers(model, OptimConfig(weight_decay=0.0), lr_scale=0.02)
    settings = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in chat]
    assert settings != [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in trained]
    warm_start_optimizers(chat, saved)
    for fresh, old in zip(chat, trained, strict=True):
        assert len(fresh.state) == len(old.state) > 0
        for p in fresh.state:
            for key, value in old.state[p].items():
                assert torch.equal(torch.as_tensor(fresh.state[p][key]), torch.as_tensor(value)), key
    assert [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in chat] == settings
    # the state of optimizers over other parameters: refused before anything is loaded
    other = copy.deepcopy(saved)
    other[1]["state"]["param_groups"][0]["params"].pop()
    fresh = build_optimizers(model, base_cfg)
    with pytest.raises(ValueError, match="groups"):
        warm_start_optimizers(fresh, other)
    assert all(not opt.state for opt in fresh)


# -----------------------------------------------------------------------------
# schedules


def test_lr_multiplier_shape():
    # 1000 steps: 20 warmup, constant to step 500, linear down to 0.1 at step 1000
    lrm = lambda step: lr_multiplier(step, 1000, warmup_ratio=0.02, warmdown_ratio=0.5, final_lr_frac=0.1)
    assert lrm(0) == pytest.approx(1 / 20)
    assert lrm(9) == pytest.approx(10 / 20)
    assert lrm(19) == 1.0  # end of warmup
    assert lrm(300) == 1.0
    assert lrm(500) == 1.0  # last constant step
    assert lrm(750) == pytest.approx(0.5 + 0.5 * 0.1)
    assert lrm(1000) == pytest.approx(0.1)
    assert lr_multiplier(0, 100, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0) == 1.0
    assert (
        lr_multiplier(99, 100, warmup_ratio=0.0, warmdown_ratio=0.0, final_lr_frac=0.0) == 1.0
    )  # no warmdown


def test_muon_momentum_ramps_up_then_eases_in_warmdown():
    m = lambda step: muon_momentum(step, 2000, warmdown_ratio=0.5)
    assert m(0) == pytest.approx(0.85)
    assert m(200) == pytest.approx(0.91)
    assert m(400) == pytest.approx(0.97)
    assert m(1000) == pytest.approx(0.97)  # warmdown starts
    assert m(1500) == pytest.approx(0.935)
    assert m(2000) == pytest.approx(0.90)


def test_weight_decay_multiplier_is_a_cosine_to_zero():
    assert weight_decay_multiplier(0, 100) == 1.0
    assert weight_decay_multiplier(50, 100) == pytest.approx(0.5)
    assert weight_decay_multiplier(100, 100) == pytest.approx(0.0)


def test_apply_schedule_sets_every_group_from_its_initial_values():
    cfg = OptimConfig(warmup_ratio=0.0, warmdown_ratio=0.5, final_lr_frac=0.0)
    optimizers = build_optimizers(make_model(), cfg)
    applied = apply_schedule(optimizers, step=75, total_steps=100, cfg=cfg)
    assert applied["lr_multiplier"] == pytest.approx(0.5)
    for opt in optimizers:
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(0.5 * group["initial_lr"])
    muon_group = optimizers[1].param_groups[0]
    assert muon_group["momentum"] == applied["muon_momentum"] == pytest.approx(0.85 + 75 / 400 * 0.12)
    assert muon_group["weight_decay"] == pytest.approx(cfg.weight_decay * weight_decay_multiplier(75, 100))


# -----------------------------------------------------------------------------
# depth dial


def test_training_horizon_from_scaling_params():
    model = make_model()
    params = num_scaling_params(model)
    assert params == 2 * (128 * 32) + 2 * (32 * 32) + VOCAB * 32  # fc, proj, two mixers, lm_head
    horizon = training_horizon(params, target_param_data_ratio=12, total_batch_size=1024)
    assert horizon.num_steps == 12 * params // 1024
    assert horizon.num_tokens == horizon.num_steps * 1024
    with pytest.raises(ValueError, match="train.total_batch_size"):
        training_horizon(params, target_param_data_ratio=12, total_batch_size=10**9)


def test_grad_accum_steps():
    assert grad_accum_steps(total_batch_size=8192, device_batch_size=4, seq_len=256, world_size=2) == 4
    assert grad_accum_steps(total_batch_size=2048, device_batch_size=4, seq_len=256, world_size=2) == 1


def test_grad_accum_indivisible_names_the_fields():
    with pytest.raises(ValueError) as err:
        grad_accum_steps(total_batch_size=5000, device_batch_size=4, seq_len=256, world_size=2)
    message = str(err.value)
    for field in (
        "train.total_batch_size",
        "train.device_batch_size",
        "train.seq_len",
        "train.workers",
        "5000",
        "2048",
    ):
        assert field in message


def test_batch_size_corrections():
    assert batch_lr_scale(2**21) == pytest.approx(2.0)
    # 4x the batch and 2x the tokens: sqrt(4) * (1/2) = 1
    assert scaled_weight_decay(0.28, 2**21, num_tokens=2_000, reference_tokens=1_000) == pytest.approx(0.28)
    assert scaled_weight_decay(0.28, 2**19, num_tokens=4_000, reference_tokens=1_000) == pytest.approx(0.07)


def test_optimal_batch_size_follows_power_lines_to_a_power_of_two():
    assert optimal_batch_size(1_000, 1_000) == 2**19  # the reference horizon keeps the reference batch
    assert optimal_batch_size(2**(1 / 0.383) * 1_000, 1_000) == 2**20  # D x 2**(1/0.383): B x 2
    assert optimal_batch_size(4_000, 1_000) == 2**20  # 2**19 x 4**0.383 = 2**19.77: rounds up
    assert optimal_batch_size(2_000, 1_000) == 2**19  # 2**19 x 2**0.383: rounds down


# -----------------------------------------------------------------------------
# distributed: DDP all-reduces gradients, the plain optimizers keep ranks identical


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = make_model(seed=rank)  # DDP broadcasts rank 0's weights at wrap time
        ddp = nn.parallel.DistributedDataParallel(model)
        cfg = OptimConfig(warmup_ratio=0.2)
        optimizers = build_optimizers(model, cfg)
        start = [p.detach().clone() for p in model.parameters()]
        for step in range(8):
            x, y = batch(step, rank=rank)  # different data on each rank
            F.cross_entropy(ddp(x), y).backward()
            apply_schedule(optimizers, step, 8, cfg)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
        torch.save(
            {"start": start, "end": [p.detach() for p in model.parameters()]},
            os.path.join(out_dir, f"{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~5 s idle, more under load: two fresh interpreters import torch
def test_ddp_ranks_stay_identical():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2))
    for a, b in zip(r0["end"], r1["end"], strict=True):
        assert torch.equal(a, b)
    assert all(not torch.equal(s, e) for s, e in zip(r0["start"], r0["end"], strict=True))


# ---------------------------------------------------------------------------
# train.compile: the loop's optimizer step through torch.compile


def test_compile_is_on_by_default_on_gpus_only():
    from trainer.stages.loop import compiled

    model = TinyModel()
    assert compiled(model, None, torch.device("cpu")) is model
    assert compiled(model, False, torch.device("cuda")) is model
    # torch.compile wraps lazily: building the wrapper needs no GPU
    assert isinstance(compiled(model, None, torch.device("cuda")), torch._dynamo.eval_frame.OptimizedModule)


@pytest.mark.slow
def test_compiled_optimizer_steps_track_eager_ones():
    """The loop's optimizer_step (two micro-batches, Muon + AdamW) through the compiled GPT: the same
    gradients as eager (1e-5), then losses that stay with eager's over three steps (Muon's orthogonalisation
    lifts rounding-level differences in a gradient's weak directions to full size, so the weights themselves
    part within a few steps, compiled or not), and the model that is checkpointed is the plain one, updated in
    place."""
    from nanochat.gpt import GPT, GPTConfig
    from trainer.stages.loop import compiled, optimizer_step
    from trainer.worker import Worker

    config = GPTConfig(sequence_len=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                       window_pattern="SL")
    torch.manual_seed(0)
    batches = [(x[:, :-1].contiguous(), x[:, 1:].contiguous()) for x in torch.randint(0, VOCAB, (6, 2, 17))]
    worker = Worker(0, 1, torch.device("cpu"))
    runs = {}
    for compile in (False, True):
        torch.manual_seed(1)
        model = GPT(config)
        model.init_weights()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        forward = compiled(model, compile, worker.device)
        assert (forward is model) != compile
        forward(*batches[0]).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        optimizers = build_optimizers(model, OptimConfig())
        loader = iter(batches)
        losses = [optimizer_step(forward, model, optimizers, loader, 2, worker)[0].item() for _ in range(3)]
        runs[compile] = grads, losses, model.state_dict()
        with torch.no_grad():  # the compiled module computes with the plain model's (updated) parameters
            assert forward(*batches[0]).item() == pytest.approx(model(*batches[0]).item(), rel=1e-5)
    (eager_grads, eager_losses, eager_state), (grads, losses, state) = runs[False], runs[True]
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert losses[0] == pytest.approx(eager_losses[0], rel=1e-5)
    assert losses == pytest.approx(eager_losses, rel=2e-3)
    assert state.keys() == eager_state.keys()  # no _orig_mod. prefix: checkpoints stay as they are
    assert all(not torch.equal(state[k], v) for k, v in initial.items() if "c_proj" in k)  # trained in place
