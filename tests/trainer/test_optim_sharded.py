"""train.shard_optimizer (trainer/optim.py's ZeroSharding) on real gloo ranks: sharded training matches DDP
training with gradient accumulation, each rank holds about half the optimizer state, and checkpoints
resume exactly, sharded or not, whichever way they were written."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nanochat.checkpoint import capture_rng_state, read_checkpoint, write_checkpoint
from nanochat.config import load_config
from nanochat.gpt import GPT, GPTConfig
from services.checkpoints import CheckpointManager
from services.storage import LocalStorage
from tests.support.checkpoints import upload_checkpoint
from tests.support.ranks import run_ranks
from trainer.optim import (
    OptimConfig,
    ZeroSharding,
    apply_schedule,
    balanced_owners,
    build_optimizers,
    optimizers_state_dict,
    state_bytes,
)
from trainer.stages.loop import TrainState, optimizer_step, restore_checkpoint, shard_optimizers
from trainer.worker import Worker

VOCAB, SEQ, ROWS, ACCUM, STEPS, SPLIT = 64, 16, 2, 2, 6, 3
CFG = OptimConfig(warmup_ratio=0.2, warmdown_ratio=0.5)


def tiny_gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=SEQ, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    model.init_weights()
    return model.train()


def batches(rank: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ACCUM micro-batches of one step on one rank: different on every rank and step."""
    gen = torch.Generator().manual_seed(1000 * rank + step)
    rows = torch.randint(0, VOCAB, (ACCUM, ROWS, SEQ + 1), generator=gen)
    return [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows]


def train(model: GPT, optimizers: list, sharding, worker: Worker, steps: range) -> None:
    """The loop's optimizer_step under the schedule; DDP around the model unless the state is sharded."""
    forward = model if sharding else torch.nn.parallel.DistributedDataParallel(model)
    for step in steps:
        apply_schedule(optimizers, step, STEPS, CFG)
        optimizer_step(forward, model, optimizers, iter(batches(worker.rank, step)), ACCUM, worker, sharding)


def setup(sharded: bool, worker: Worker, seed: int = 0):
    model = tiny_gpt(seed)
    optimizers = build_optimizers(model, CFG)
    return model, optimizers, shard_optimizers(sharded, optimizers, worker)


def save(storage: LocalStorage, run: str, model: GPT, optimizers: list, sharding, worker: Worker) -> None:
    """What save_checkpoint writes (the sharded state gathered first), put where a run's checkpoint lands."""
    state = sharding.gathered_state_dict(optimizers) if sharding else optimizers_state_dict(optimizers)
    rngs = worker.all_gather(capture_rng_state())
    if worker.is_main:
        folder = Path(storage.root).parent / run  # beside the storage, as a run's temporary folder
        meta = {"backend": "torch", "world_size": worker.world_size, **TrainState(step=SPLIT).__dict__}
        write_checkpoint(folder, model_state=model.state_dict(), optimizer_state={"optimizers": state},
                         cursor=[{}] * worker.world_size, config={}, rng={"ranks": rngs}, meta=meta)
        upload_checkpoint(storage, run, "base", SPLIT, folder)
    dist.barrier()


def resume(storage: LocalStorage, run: str, sharded: bool, worker: Worker):
    """A fresh model (other initial weights) and optimizers, through the loop's restore_checkpoint."""
    model, optimizers, sharding = setup(sharded, worker, seed=123)
    state, _ = restore_checkpoint(CheckpointManager(storage, run, "base"), worker, model, optimizers, sharding)
    assert state.step == SPLIT
    return model, optimizers, sharding


def params(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _rank(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    worker = Worker(rank, world, torch.device("cpu"))
    out: dict = {}
    try:
        ends = {}
        for sharded in (False, True):
            model, optimizers, sharding = setup(sharded, worker)
            train(model, optimizers, sharding, worker, range(STEPS))
            ends[sharded] = params(model)
            out[f"state_bytes_{sharded}"] = state_bytes(optimizers)
            out[f"state_params_{sharded}"] = sum(len(opt.state) for opt in optimizers)
        out["total_params"] = len(list(model.parameters()))
        out["owned_elements"] = sharding.owned_elements()
        out["reduces_in_backward"] = sharding.reduces_in_backward
        out["sharded_matches_ddp"] = max((ends[True][k] - ends[False][k]).abs().max().item() for k in ends[True])
        # without overlap: the same sums in another order of reduces, so the same weights, bit for bit
        model, optimizers, _ = setup(False, worker)
        sequential = ZeroSharding(optimizers, worker.rank, worker.world_size, overlap=False)
        train(model, optimizers, sequential, worker, range(STEPS))
        end = params(model)
        out["overlap_matches_sequential"] = all(end[k].equal(ends[True][k]) for k in end)
        out["sequential_reduces_in_backward"] = sequential.reduces_in_backward

        # checkpoints at step SPLIT, written sharded or not, resumed sharded or not
        storage = LocalStorage(Path(tmp) / "storage")
        for written in (False, True):
            model, optimizers, sharding = setup(written, worker)
            train(model, optimizers, sharding, worker, range(SPLIT))
            save(storage, f"written-{written}", model, optimizers, sharding, worker)
            for resumed in (False, True):
                model, optimizers, sharding = resume(storage, f"written-{written}", resumed, worker)
                train(model, optimizers, sharding, worker, range(SPLIT, STEPS))
                end = params(model)
                out[f"resume_{written}_{resumed}"] = max((end[k] - ends[resumed][k]).abs().max().item() for k in end)
        # the comparison is sensitive: the same resume without the optimizer state lands elsewhere
        model, optimizers, sharding = setup(True, worker, seed=123)
        model.load_state_dict(read_checkpoint(Path(storage.root).parent / "written-True").model_state)
        train(model, optimizers, sharding, worker, range(SPLIT, STEPS))
        end = params(model)
        out["resume_without_state"] = max((end[k] - ends[True][k]).abs().max().item() for k in end)
        out["ranks_agree"] = bool(all(worker.all_gather(end)[0][k].equal(end[k]) for k in end))
    finally:
        dist.destroy_process_group()
    Path(tmp, f"{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("zero")
    run_ranks(_rank, (str(tmp),), world=2, timeout=300)
    return [json.loads((tmp / f"{r}.json").read_text()) for r in range(2)]


def test_sharded_training_matches_ddp_with_accumulation(ranks):
    """Same gradients (summed onto owners and halved, where DDP all-reduces them), same updates: the weights
    after STEPS steps agree to 1e-6 (bit for bit on the machine this was written on) and on both ranks."""
    for out in ranks:
        assert out["sharded_matches_ddp"] < 1e-6
        assert out["ranks_agree"]


def test_gradients_start_their_reduces_during_the_last_backward(ranks):
    """From the second step on, every reduce starts inside the last micro-step's backward (the first step
    agrees on their order); with overlap off none does, and the weights come out the same, bit for bit."""
    for out in ranks:
        assert out["reduces_in_backward"] == out["total_params"]
        assert out["sequential_reduces_in_backward"] == 0
        assert out["overlap_matches_sequential"]


def test_each_rank_holds_about_half_the_optimizer_state(ranks):
    full = ranks[0]["state_bytes_False"]
    assert ranks[1]["state_bytes_False"] == full
    assert ranks[0]["state_params_False"] == ranks[0]["total_params"]  # unsharded: state for every parameter
    halves = [out["state_bytes_True"] for out in ranks]
    assert sum(halves) == pytest.approx(full, rel=1e-3)  # all of it, once (step counters aside)
    assert all(0.4 * full < h < 0.6 * full for h in halves), (halves, full)
    assert sum(out["state_params_True"] for out in ranks) == ranks[0]["total_params"]
    assert ranks[0]["owned_elements"] > 0 and ranks[1]["owned_elements"] > 0


@pytest.mark.parametrize("written", [True, False], ids=["written-sharded", "written-unsharded"])
@pytest.mark.parametrize("resumed", [True, False], ids=["resumed-sharded", "resumed-unsharded"])
def test_checkpoint_resumes_exactly_either_way(ranks, written, resumed):
    """Against an uninterrupted run in the resuming mode: bit-identical when written in that mode too; across
    modes as close as sharded and DDP training are to each other. The format is the same either way."""
    for out in ranks:
        if written == resumed:
            assert out[f"resume_{written}_{resumed}"] == 0.0
        else:
            assert out[f"resume_{written}_{resumed}"] < 1e-6
        assert out["resume_without_state"] > 1e-3


def test_balanced_owners_spread_whole_items_evenly():
    costs = [100, 1, 60, 50, 3, 40, 2]
    owners = balanced_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(2)]
    assert abs(loads[0] - loads[1]) <= max(costs)
    # largest first, each to the lighter rank: 100 -> 0, 60 -> 1, 50 -> 1, 40 -> 0, then 3, 2, 1 -> 1
    assert owners == [0, 1, 1, 1, 1, 0, 1]
    assert owners == balanced_owners(costs, 2)  # every rank computes the same
    assert set(balanced_owners(costs, 3)) == {0, 1, 2}


def test_one_worker_is_a_no_op():
    model = tiny_gpt(0)
    optimizers = build_optimizers(model, CFG)
    worker = Worker(0, 1, torch.device("cpu"))
    assert shard_optimizers(True, optimizers, worker) is None


def test_jax_backend_refuses_the_flag():
    with pytest.raises(ValueError, match="train.shard_optimizer"):
        load_config(preset="tiny-cpu", overrides=["train.backend=jax", "train.shard_optimizer=true"])
    assert load_config(preset="tiny-cpu", overrides=["train.shard_optimizer=true"]).train.shard_optimizer

