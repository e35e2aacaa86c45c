"""The RL stage's parts (trainer/stages/rl.py) in plain torch: advantages, which tokens carry the policy
gradient, the prompt stream and its cursor, and that a few steps on a toy reward raise the reward."""

import shutil
import tempfile

import pytest
import torch

from nanochat.checkpoint import read_checkpoint
from nanochat.config import Config, RLConfig, load_config
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from services.checkpoints import CheckpointManager
from tests.support.numerics import EPS32, torch_threads
from trainer.optim import apply_schedule, build_optimizers, lr_multiplier
from trainer.pipeline.jobs import run_stage
from trainer.stages.rl import (
    PromptIterator,
    Rollout,
    advantages,
    policy_gradient_loss,
    rl_optim_config,
    rl_step,
    sample_rollout,
    train_rl,
    training_batch,
)
from trainer.tasks.base import Task, TaskMixture
from trainer.worker import Worker

CPU = Worker(rank=0, world_size=1, device=torch.device("cpu"))
PAD = 0


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(["abc 0123456789"], 256 + len(SPECIAL_TOKENS))


def tiny_model(vocab_size: int, seed: int = 0, sequence_len: int = 64) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1,
                          n_embd=32))
    model.init_weights()
    return model


class Digits(Task):
    """Toy reward: 1 if the reply contains a digit (about 4% of the tokens of an untrained model)."""

    name = "digits"

    def __init__(self, n: int = 4):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"q{index}"}, {"role": "assistant", "content": "7"}],
                "index": index}

    def reward(self, conversation: dict, response: str) -> float:
        return float(any(c.isdigit() for c in response))


class Constant(Digits):
    def reward(self, conversation: dict, response: str) -> float:
        return 1.0


# ---------------------------------------------------------------------------------------------
# advantages and the loss


def test_advantage_is_reward_minus_the_group_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    assert advantages(rewards).tolist() == pytest.approx([0.4, -0.6, -0.6, 0.4, 0.4])
    assert advantages(torch.ones(4)).abs().sum() == 0


def test_targets_leave_out_prompt_forced_and_padding():
    rollout = Rollout(prompt=[1, 2, 3], completions=[[10, 11, 12, 13], [20]], forced=[[0, 1, 1, 0], [0]],
                      rewards=[1.0, 0.0])
    inputs, targets, adv = training_batch(rollout, PAD, torch.device("cpu"))
    assert inputs.tolist() == [[1, 2, 3, 10, 11, 12], [1, 2, 3, 20, PAD, PAD]]
    # position t predicts token t + 1: the prompt's last token predicts the first sampled one
    assert targets.tolist() == [[-1, -1, 10, -1, -1, 13], [-1, -1, 20, -1, -1, -1]]
    assert adv.tolist() == [0.5, -0.5]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("order", [1, -1], ids=["forward", "reversed"])
def test_loss_is_minus_advantage_weighted_log_prob_per_sampled_token(tok, threads, order):
    """The loss against the same sum by hand, from log-probabilities computed apart, summed in either order
    and at two thread counts: the two sides agree to fp32 rounding, not to the bit."""
    model = tiny_model(tok.vocab_size)
    rollout = Rollout(prompt=[5, 6, 7], completions=[[40, 41, 42], [50, 51]], forced=[[0, 1, 0], [0, 0]],
                      rewards=[1.0, 0.0])
    inputs, targets, adv = training_batch(rollout, PAD, torch.device("cpu"))
    with torch_threads(threads):
        loss = policy_gradient_loss(model, inputs, targets, adv)
        with torch.no_grad():
            logp = torch.log_softmax(model(inputs), dim=-1)
    # by hand: sampled tokens are 40 (row 0, pos 2), 42 (row 0, pos 4), 50 and 51 (row 1, pos 2, 3)
    terms = [adv[r] * logp[r, t, token] for r, t, token in [(0, 2, 40), (0, 4, 42), (1, 2, 50), (1, 3, 51)]]
    expected = -sum(terms[::order]) / len(terms)
    # The advantages (+-0.5) make the terms (each ~0.5 ln V ~ 2.8) cancel to a loss of ~1e-3, so an fp32 sum
    # of them is exact only to a unit of rounding of a term (2.4e-7), 2e-4 of the loss: a tolerance
    # relative to the loss asks for more than fp32 holds. Each term is itself an fp32 log-softmax over V
    # logits, good to a few units of rounding: allow 8 units of the terms' mean magnitude (2.7e-6). A wrong
    # token, sign or count is off by a sizeable fraction of one term.
    scale = sum(abs(term) for term in terms).item() / len(terms)
    assert loss.item() == pytest.approx(expected.item(), abs=8 * EPS32 * scale)


def test_forced_and_prompt_positions_get_no_gradient(tok):
    model = tiny_model(tok.vocab_size)
    logits_seen = []

    def keep_logits(module, args, out):
        out.retain_grad()
        logits_seen.append(out)

    model.lm_head.register_forward_hook(keep_logits)
    rollout = Rollout(prompt=[5, 6, 7], completions=[[40, 41, 42, 43]], forced=[[0, 1, 1, 0]], rewards=[1.0])
    inputs, targets, _ = training_batch(rollout, PAD, torch.device("cpu"))
    policy_gradient_loss(model, inputs, targets, torch.tensor([1.0])).backward()
    grad = logits_seen[0].grad[0].abs().sum(dim=-1)  # per position
    # positions 0, 1 predict prompt tokens; 3, 4 predict the forced 41, 42; 2 and 5 predict sampled 40, 43
    assert grad[[0, 1, 3, 4]].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert (grad[[2, 5]] > 0).all()


# ---------------------------------------------------------------------------------------------
# the prompt stream


def test_prompts_are_sharded_by_rank_and_cycle():
    task = Digits(5)
    rank1 = PromptIterator(task, rank=1, world_size=2)
    assert [next(rank1)[1]["index"] for _ in range(5)] == [1, 3, 1, 3, 1]
    assert [next(PromptIterator(task, rank=0, world_size=2))[1]["index"]] == [0]


def test_the_cursor_resumes_the_stream_exactly():
    task = TaskMixture([Digits(7)])
    first = PromptIterator(task, rank=0, world_size=2)
    for _ in range(3):
        next(first)
    resumed = PromptIterator(task, rank=0, world_size=2, state=first.state_dict())
    assert [next(resumed) for _ in range(4)] == [next(first) for _ in range(4)]


def test_too_few_prompts_for_the_workers_is_an_error():
    with pytest.raises(ValueError, match="too few"):
        PromptIterator(Digits(1), rank=1, world_size=2)


# ---------------------------------------------------------------------------------------------
# steps


def test_the_learning_rate_decays_linearly_to_zero_without_weight_decay():
    cfg = rl_optim_config(Config.model_validate({"rl": {"lr_frac": 0.05}}))
    multipliers = [lr_multiplier(s, 10, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac) for s in range(10)]
    assert multipliers == pytest.approx([1 - s / 10 for s in range(10)])
    assert cfg.weight_decay == 0.0
    assert cfg.matrix_lr == pytest.approx(Config().train.matrix_lr * 0.05)


def mean_reward(model: GPT, tok: Tokenizer, task: Task) -> float:
    """Reward over 4 x 32 samples with fixed seeds: the same measurement before and after training."""
    model.eval()
    probe = RLConfig(samples_per_prompt=32, max_new_tokens=8, temperature=1.0, top_k=0)
    rewards = [r for i in range(4) for r in sample_rollout(model, tok, task, task[i], probe, seed=1000 + i).rewards]
    return sum(rewards) / len(rewards)


def test_a_few_steps_raise_the_reward(tok):
    model, task = tiny_model(tok.vocab_size), Digits()
    cfg = Config.model_validate({"rl": {"lr_frac": 1.0, "samples_per_prompt": 8, "max_new_tokens": 8, "top_k": 0}})
    optim_cfg = rl_optim_config(cfg)
    optimizers = build_optimizers(model, optim_cfg)
    before = mean_reward(model, tok, task)
    steps = 15
    for step in range(steps):
        apply_schedule(optimizers, step, 2 * steps, optim_cfg)
        prompts = [(2 * step + j, task[(2 * step + j) % len(task)]) for j in range(2)]
        stats = rl_step(model, model, tok, task, prompts, cfg.rl, CPU)
        assert stats.prompts == 2 and stats.samples == 16
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    after = mean_reward(model, tok, task)
    assert after > before + 0.3, f"mean reward {before:.3f} -> {after:.3f}"


def test_a_step_where_every_sample_earns_the_same_reward_changes_nothing(tok):
    model, task = tiny_model(tok.vocab_size), Constant()
    cfg = Config.model_validate({"rl": {"samples_per_prompt": 4, "max_new_tokens": 4}})
    optim_cfg = rl_optim_config(cfg)
    optimizers = build_optimizers(model, optim_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_schedule(optimizers, 0, 10, optim_cfg)
    stats = rl_step(model, model, tok, task, [(0, task[0]), (1, task[1])], cfg.rl, CPU)
    assert stats.reward == stats.samples == 8
    for opt in optimizers:
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_step_past_the_training_context_can_backpropagate(tok):
    # sampling runs under inference mode and grows the rotary tables when a prompt and its completion
    # pass the rotary tables (4 x sequence_len = 256 here): the training forward after it must still work
    model, task = tiny_model(tok.vocab_size), Digits()
    long_prompt = {"messages": [{"role": "user", "content": "a long question " * 20}], "index": 0}
    cfg = RLConfig(samples_per_prompt=2, max_new_tokens=8)
    stats = rl_step(model, model, tok, task, [(0, long_prompt)], cfg, CPU)
    assert stats.samples == 2
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# the stage, as a Ray Train job


@pytest.mark.system  # a Ray job
@pytest.mark.slow
@pytest.mark.parametrize("shard", [False, True], ids=["ddp", "sharded-optimizer"])
def test_rl_stage_on_ray_resumes_after_a_worker_crash(tok, local_storage, shared_data, tmp_path, shard):
    from tests.trainer.evals.test_chat import publish_checkpoint

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    # <stem>.jsonl serves every split: GSM8K's test items stand in for its train split
    shutil.copy(shared_data / "chat" / "gsm8k_test.jsonl", tasks_dir / "gsm8k.jsonl")
    # GSM8K prompts are ~300 byte tokens: a context that holds them with their completions
    publish_checkpoint(local_storage, "rl", "sft", tiny_model(tok.vocab_size, sequence_len=512), tok)
    cfg = load_config(preset="tiny-cpu", overrides=[
        "run=rl", f"data.tasks_dir={tasks_dir}", "data.offline=true", "train.workers=2", "train.checkpoint_every=2",
        "log.tensorboard=false", "rl.max_steps=4", "rl.prompts_per_step=2", "rl.samples_per_prompt=3",
        "rl.max_new_tokens=6", "rl.tasks={gsm8k: 1}", f"train.shard_optimizer={shard}"])
    summary = run_stage("rl", train_rl, cfg, local_storage, fail_at_step=3, show_progress=False)
    assert summary["stage"] == "rl" and summary["steps"] == 4
    assert summary["metrics"]["resumed_from"] == [2], "the crash at step 3 resumes from the step-2 checkpoint"
    assert 0.0 <= summary["metrics"]["reward_last"] <= 1.0 and summary["tokens"] > 0
    assert list(summary["metrics"]["mixture"]) == ["gsm8k"] and summary["metrics"]["skipped_tasks"] == {}
    state_bytes = summary["metrics"]["optimizer_state_bytes"]
    assert (state_bytes[0] != state_bytes[1]) if shard else (state_bytes[0] == state_bytes[1])
    manager = CheckpointManager(local_storage, "rl", "rl")
    assert manager.list_steps() == [2, 4] and manager.is_complete()
    with tempfile.TemporaryDirectory() as tmp:
        _, folder = manager.latest_valid(tmp)
        ckpt = read_checkpoint(folder, load_optimizer=False)
    # each rank's cursor: 4 steps x 1 prompt per rank
    assert ckpt.cursor == [{"position": 4}, {"position": 4}]
    assert [h["step"] for h in ckpt.meta["history"]] == [1, 2, 3, 4]
    assert all({"reward", "pass_at_k", "sequence_length"} <= set(h) for h in ckpt.meta["history"])
