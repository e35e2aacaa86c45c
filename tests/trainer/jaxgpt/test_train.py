"""The JAX backend's training: the optimizer against torch's, the step sharded over 8 virtual CPU devices,
its loss against torch's over the first 30 steps, and `train base --backend jax` as a Ray Train job whose
checkpoints the torch side (serving, chat stages) loads."""

import numpy as np
import pytest
import torch

from nanochat.config import load_config
from nanochat.gpt import GPT, GPTConfig
from tests.support.numerics import EPS32, perturbed, torch_threads
from trainer.data.corpus import list_shards, prepare_corpus, split_shards
from trainer.data.loader import DataLoader
from trainer.data.tokenizer import load_tokenizer, train_tokenizer
from trainer.optim import OptimConfig, apply_schedule, build_optimizers, optim_config
from trainer.stages.base import model_config

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from trainer.jaxgpt import optim  # noqa: E402
from trainer.jaxgpt.model import loss_fn, params_from_torch  # noqa: E402
from trainer.jaxgpt.train import ShardedTrainer, make_mesh, schedule_at, shard_for  # noqa: E402


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, n_embd=64))
    model.init_weights()
    return model


def test_eight_virtual_cpu_devices():
    assert jax.device_count() == 8  # conftest sets XLA_FLAGS before jax is imported


# The two optimizers agree to fp32 rounding, not to the bit: XLA and torch order their sums differently. A
# Muon step (lr x update) comes out of Polar Express, five rounds of fp32 matmuls whose inner dimension is at
# most 256 here (the MLP's width), each good to about n units of rounding (the bound of an n-term dot
# product): 256 x 5 x 2**-23 = 1.5e-4 of the largest step, rounded up. The new weight is then rounded once by
# each side: one unit of its own rounding. Cautious weight decay acts on an element only where
# update x weight >= 0, so where the update is within that error of zero the mask can go either way on
# another machine, and the element may then differ by its whole decay, lr x wd x |p|.
STEP_RTOL = 2e-4


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rounding", ["same", "perturbed"])
def test_optimizer_step_equals_torch_on_the_same_gradients(threads, rounding):
    """Muon (Polar Express, NorMuon, cautious decay) and AdamW, step by step, on the torch gradients; at two
    torch thread counts, and with JAX's gradients moved by a unit of rounding, as another machine's backward
    could have given them."""
    model, cfg = tiny_model(), OptimConfig(warmup_ratio=0.2)
    torch_opts = build_optimizers(model, cfg)
    setup = optim.optim_setup(model.config, cfg)
    state = optim.init_state(params_from_torch(model.state_dict()), setup, cfg)
    g, moved = torch.Generator().manual_seed(3), dict.fromkeys(setup.matrix + tuple(setup.adamw_lr), 0.0)
    flips = 0
    for step in range(4):
        idx, targets = (torch.randint(0, 97, (2, 16), generator=g) for _ in range(2))
        before = params_from_torch(model.state_dict())
        apply_schedule(torch_opts, step, 10, cfg)
        with torch_threads(threads):
            model(idx, targets).backward()
            grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
            for opt in torch_opts:
                opt.step()
        model.zero_grad(set_to_none=True)
        if rounding == "perturbed":
            grads = {n: perturbed(grad, seed=step) for n, grad in grads.items()}
        grads = {n: jnp.asarray(grad) for n, grad in grads.items()}
        schedule = schedule_at(step, 10, cfg)
        hyper = optim.Hyper(*(jnp.float32(v) for v in schedule.values()))
        # the step without weight decay too, from the same state: where the update alone is near zero
        undecayed, _ = optim.apply_updates(before, grads, state, hyper._replace(weight_decay_multiplier=0.0),
                                           setup, cfg)
        after, state = optim.apply_updates(before, grads, state, hyper, setup, cfg)
        for name, p in model.named_parameters():
            ours, theirs, start = np.asarray(after[name]), p.detach().numpy(), np.asarray(before[name])
            moved[name] = max(moved[name], np.abs(theirs - start).max())
            update_step = start - np.asarray(undecayed[name])
            tol = STEP_RTOL * np.abs(update_step).max() + EPS32 * np.abs(start)
            decay_rate = 0.0  # lr x wd: Muon's matrices only, AdamW runs without weight decay
            if name in setup.matrix:
                rows, cols = start.shape[-2:]
                decay_rate = (setup.matrix_lr * schedule["lr_multiplier"] * max(1.0, rows / cols) ** 0.5
                              * setup.weight_decay * schedule["weight_decay_multiplier"])
            may_flip = np.abs(update_step) <= tol  # the update is within its error of zero
            allowed = tol + np.where(may_flip, (decay_rate + EPS32) * np.abs(start), 0.0)
            off = np.abs(ours - theirs) > allowed
            assert not off.any(), f"{name}, step {step}: {ours[off][:3]} vs {theirs[off][:3]} ({off.sum()} differ)"
            flips += int((np.abs(ours - theirs) > tol).sum())
    assert all(value > 0 for value in moved.values()), moved  # every parameter really trained
    assert flips <= 8, flips  # only the rare element at the mask's threshold


def test_groups_match_the_torch_optimizers():
    model = tiny_model()
    setup = optim.optim_setup(model.config, OptimConfig())
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(setup.matrix) == {names[id(p)] for p in model.param_groups()["matrix"]}
    assert set(setup.matrix) | set(setup.adamw_lr) == set(names.values())
    assert not set(setup.matrix) & set(setup.adamw_lr)


def test_mesh_shards_parameters_and_batch_over_all_devices():
    mesh = make_mesh(fsdp=2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert tuple(shard_for(mesh, (97, 64)).spec) == (None, "fsdp")  # 97 is not divisible: the next dimension
    assert tuple(shard_for(mesh, (3,)).spec) == ()  # replicated
    model = tiny_model()
    trainer = ShardedTrainer(model.config, OptimConfig(), model.state_dict(), mesh)
    wte = trainer.params["transformer.wte.weight"]
    assert len(wte.sharding.device_set) == 8 and wte.addressable_shards[0].data.shape == (97, 32)
    assert trainer.opt_state.momentum["transformer.h.0.attn.c_q.weight"].sharding.spec[0] == "fsdp"
    g = np.random.default_rng(0)
    inputs, targets = (g.integers(0, 97, (2, 8, 16), dtype=np.int32) for _ in range(2))
    loss = trainer.step(inputs, targets, schedule_at(0, 10, OptimConfig()))
    assert abs(loss - np.log(97)) < 0.5  # nanochat's init: a near-uniform first prediction
    with pytest.raises(ValueError, match="jax.fsdp=3"):
        make_mesh(fsdp=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from services.storage import LocalStorage

    storage = LocalStorage(tmp_path_factory.mktemp("jax-corpus"))
    cfg = load_config(preset="tiny-cpu", overrides=["tokenizer.max_chars=1000000", "data.docs_per_shard=100"])
    prepare_corpus(cfg.data, storage, limit=300)
    train_tokenizer(cfg, storage)
    return storage


@pytest.mark.slow
def test_loss_tracks_torch_over_the_first_30_steps_of_the_tiny_preset(corpus):
    """The tiny preset's model (depth 4, GQA, SL windows, vocab 4096) and optimizer, shorter rows so that it
    runs in a test; the same initial weights and the same 8 rows per step for both backends, the JAX step
    sharded over 8 devices (mesh data=4 x fsdp=2). Muon at full learning rate amplifies float rounding into
    single-step excursions on these 512-token batches, so the stated tolerance is: the first 5 steps within
    0.02 nats each (before trajectories can drift), every 10-step mean within 5%, and the final models'
    validation loss within 3%. The last two are set by how far rounding alone moves this run: torch against
    itself at another thread count or with its unvectorized kernels ends 1.2% apart in validation loss and
    up to 2.9% apart in a 10-step mean, and each backend carries that noise."""
    T, steps = 64, 30
    cfg = load_config(preset="tiny-cpu", overrides=[f"train.seq_len={T}", "train.device_batch_size=1",
                                                    f"train.total_batch_size={8 * T}"])
    tokenizer = load_tokenizer(corpus)
    train, valid = split_shards(list_shards(corpus, cfg.data.corpus_name), 1)
    torch.manual_seed(cfg.train.seed)
    model = GPT(model_config(cfg, tokenizer.vocab_size))
    model.init_weights()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ocfg = optim_config(cfg)

    torch_losses, opts = [], build_optimizers(model, ocfg)
    for step, (x, y) in zip(range(steps), DataLoader(corpus, train, tokenizer, batch_size=8, seq_len=T)):
        apply_schedule(opts, step, steps, ocfg)
        loss = model(x, y)
        loss.backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
        torch_losses.append(loss.item())

    trainer = ShardedTrainer(model.config, ocfg, initial, make_mesh(fsdp=2))
    jax_losses = []
    for step, (x, y) in zip(range(steps), DataLoader(corpus, train, tokenizer, batch_size=8, seq_len=T)):
        jax_losses.append(trainer.step(x.numpy()[None].astype(np.int32), y.numpy()[None].astype(np.int32),
                                       schedule_at(step, steps, ocfg)))

    ours, theirs = np.array(jax_losses), np.array(torch_losses)
    assert theirs[-10:].mean() < theirs[:5].mean() - 1.5  # it learns: the comparison is not of two flat lines
    np.testing.assert_allclose(ours[:5], theirs[:5], atol=0.02)
    for window in range(0, steps, 10):
        a, b = ours[window:window + 10].mean(), theirs[window:window + 10].mean()
        assert abs(a - b) / b < 0.05, (window, a, b)
    # the models they end with: validation loss on the same held-out rows, within 2%
    val = DataLoader(corpus, valid, tokenizer, batch_size=8, seq_len=T, loop=False)
    batches = [next(val) for _ in range(4)]
    with torch.no_grad():
        torch_val = np.mean([model(x, y).item() for x, y in batches])
    final = jax.device_get(trainer.params)  # gathered: the comparison runs on one device
    jax_val = np.mean([float(loss_fn(final, jnp.asarray(x.numpy()), jnp.asarray(y.numpy()), model.config))
                       for x, y in batches])
    assert abs(jax_val - torch_val) / torch_val < 0.03, (jax_val, torch_val)


@pytest.mark.system  # a Ray job
@pytest.mark.slow
def test_train_base_with_the_jax_backend_as_a_ray_train_job(corpus, tmp_path):
    """`train base --backend jax`: a JaxTrainer job on 4 virtual devices (data 2 x fsdp 2) that writes the
    stage's usual checkpoints, which the torch model (serving, chat stages) loads with the same logits,
    resumes from its own checkpoint (its compiled steps kept in the compilation cache), and refuses to be
    resumed by the torch backend."""
    from services.checkpoints import CheckpointManager
    from trainer.jaxgpt.model import forward
    from trainer.pipeline.jobs import StageFailed, run_stage, stage_function

    small = ["model.depth=2", "model.head_dim=32", "train.seq_len=64", "train.device_batch_size=2",
             "train.total_batch_size=1024", "train.checkpoint_every=3", "train.eval_every=-1", "train.eval_tokens=1024",
             "log.tensorboard=false", "train.max_failures=0", "run=jax"]
    cache = tmp_path / "jax-cache"
    jax_run = [*small, "train.backend=jax", "jax.cpu_devices=4", "jax.fsdp=2", f"jax.compilation_cache={cache}"]
    first = load_config(preset="tiny-cpu", overrides=[*jax_run, "train.max_steps=6"])
    summary = run_stage("base", stage_function("base", first), first, corpus, show_progress=False)
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 1024
    assert summary["metrics"]["backend"] == "jax" and summary["metrics"]["devices"] == 4
    assert 0 < summary["metrics"]["val_bpb"] < 10 and summary["tokens_per_second"] > 0
    assert any(cache.iterdir()), "the compiled train step went into the compilation cache"

    manager = CheckpointManager(corpus, "jax", "base")
    assert manager.latest_step() == 6 and set(manager.list_steps()) >= {3, 6}
    model, step = manager.load_model()
    idx = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(idx).numpy()
    got = np.asarray(forward(params_from_torch(model.state_dict()), jnp.asarray(idx.numpy()), model.config))
    assert np.abs(got - expected).max() < 1e-4

    again = load_config(preset="tiny-cpu", overrides=[*jax_run, "train.max_steps=9"])
    resumed = run_stage("base", stage_function("base", again), again, corpus, show_progress=False)
    assert resumed["steps"] == 9 and resumed["metrics"]["resumed_from"] == [6]

    torch_run = load_config(preset="tiny-cpu", overrides=[*small, "train.max_steps=12"])
    with pytest.raises(StageFailed, match="written by the jax backend"):
        run_stage("base", stage_function("base", torch_run), torch_run, corpus, show_progress=False)
