"""
Reinforcement learning on GSM8K, as nanochat's chat_rl: on-policy REINFORCE with the group mean as baseline.

Notable:
- starts from the SFT stage's newest valid checkpoint (from its own "rl" checkpoints when resuming)
- the prompts: the rl.tasks mixture's train split (tasks without data left out and recorded, as the chat
  stages do), rank r taking prompts r, r + world, ...; each step every rank takes prompts_per_step / world
  of them (rounded up), and the cursor is its next prompt
- per prompt, k completions sampled with the shared generate function (calculator included) from the
  unwrapped model in eval mode, each prompt seeded by its place in the stream (exact on resume)
- reward from the task (GSM8K: 1 for the right final answer); advantage = reward - mean of the k. No
  division by the std, no KL term, no PPO ratio: nanochat's simplifications of GRPO, fine on policy
- loss = -sum(advantage x log p(token)) / tokens over the sampled tokens only: the prompt and the
  calculator's forced output were not the model's choices, so they carry no gradient
- every rank does the same number of backward passes (one per prompt), DDP averaging the gradients
- learning rates: rl.lr_frac of the base rates, decaying linearly to 0 over the horizon, no weight decay
  (nanochat)
- the step loop, checkpoints, resume and fault injection are every stage's (trainer/stages/loop.py); RL
  plugs in its batch and its loss (RLStage.train_step)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nanochat.config import Config, RLConfig
from nanochat.generate import generate_batch
from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from services.checkpoints import CheckpointManager
from trainer.evals.chat import response_text
from trainer.optim import OptimConfig, optim_config, step_optimizers
from trainer.stages.loop import Stage, StepResult, TrainState, accumulating, train_stage
from trainer.stages.table import STAGES
from trainer.tasks import build_mixture
from trainer.tasks.base import Task, TaskMixture, TaskUnavailable
from trainer.worker import Worker, WorkerSettings

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"


class PromptIterator:
    """This rank's share of the prompts, in order and cycling; the cursor is the position of the next one."""

    def __init__(self, task: Task, rank: int, world_size: int, state: dict | None = None):
        self.task = task
        self.indices = range(rank, len(task), world_size)
        if not self.indices:
            raise ValueError(f"{task.name} has {len(task)} prompts: too few for {world_size} workers")
        self.position = 0 if state is None else int(state["position"])

    def __iter__(self) -> PromptIterator:
        return self

    def __next__(self) -> tuple[int, dict]:
        """(position in this rank's stream, conversation)."""
        position = self.position
        self.position += 1
        return position, self.task[self.indices[position % len(self.indices)]]

    def state_dict(self) -> dict:
        return {"position": self.position}


# ---------------------------------------------------------------------------
# rollouts and the policy-gradient loss


@dataclass
class Rollout:
    """k sampled completions of one prompt and their rewards."""

    prompt: list[int]
    completions: list[list[int]]
    forced: list[list[int]]  # 1 where the calculator wrote the token
    rewards: list[float]


def advantages(rewards: Tensor) -> Tensor:
    """Each sample's reward minus the mean of its group: better than its siblings is pushed up."""
    return rewards - rewards.mean()


def sample_rollout(model: nn.Module, tokenizer: Tokenizer, task: Task, conversation: dict, rl: RLConfig,
                   seed: int) -> Rollout:
    prompt = tokenizer.render_for_completion(conversation)
    completions, forced = generate_batch(model, tokenizer, prompt, rl.samples_per_prompt, max_tokens=rl.max_new_tokens,
                                         temperature=rl.temperature, top_k=rl.top_k or None, seed=seed)
    rewards = [task.reward(conversation, response_text(tokenizer, c)) for c in completions]
    return Rollout(prompt, completions, forced, rewards)


def training_batch(rollout: Rollout, pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs, targets, advantages) of a rollout's k sequences, prompt + completion, right-padded. Targets
    are -1 (no loss) on the prompt, on forced tokens and on padding."""
    rows, trainable = [], []
    for completion, forced in zip(rollout.completions, rollout.forced, strict=True):
        rows.append(rollout.prompt + completion)
        trainable.append([0] * len(rollout.prompt) + [1 - f for f in forced])
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    keep = torch.tensor([t + [0] * (width - len(t)) for t in trainable], dtype=torch.bool, device=device)
    targets = ids[:, 1:].masked_fill(~keep[:, 1:], -1)
    rewards = torch.tensor(rollout.rewards, dtype=torch.float32, device=device)
    return ids[:, :-1], targets, advantages(rewards)


def policy_gradient_loss(model: nn.Module, inputs: Tensor, targets: Tensor, advantages: Tensor) -> Tensor:
    """-sum(advantage x log p(target)) / number of targets, over the targets that are not -1."""
    nll = model(inputs, targets, loss_reduction="none").view_as(targets)  # 0 where the target is -1
    num_tokens = (targets >= 0).sum().clamp(min=1)
    return (nll * advantages[:, None]).sum() / num_tokens


@dataclass
class StepStats:
    """One rank's sums over a step's prompts."""

    prompts: int = 0
    passed: int = 0  # prompts with a positive reward in some sample (pass@k on the train prompts)
    samples: int = 0
    reward: float = 0.0
    tokens: int = 0  # sampled completion tokens
    loss: float = 0.0

    def reduced(self, worker: Worker) -> StepStats:
        values = torch.tensor([self.prompts, self.passed, self.samples, self.reward, self.tokens, self.loss],
                              dtype=torch.float64, device=worker.device)
        p, passed, s, r, t, loss = worker.sum(values).tolist()
        return StepStats(int(p), int(passed), int(s), r, int(t), loss)

    def metrics(self, world_size: int) -> dict[str, float]:
        return {"reward": self.reward / self.samples, "pass_at_k": self.passed / self.prompts,
                "sequence_length": self.tokens / self.samples, "loss": self.loss / world_size}


def rl_step(model: nn.Module, ddp: nn.Module, tokenizer: Tokenizer, task: Task, prompts: list[tuple[int, dict]],
            rl: RLConfig, worker: Worker, seed: int = 0) -> StepStats:
    """Sample every prompt's rollout, then accumulate the policy gradient (one backward per prompt, the
    loss averaged over prompts). The caller steps the optimizers."""
    stats = StepStats()
    model.eval()
    rollouts = [sample_rollout(model, tokenizer, task, conversation, rl, _sample_seed(seed, position, worker))
                for position, conversation in prompts]
    model.train()
    pad = tokenizer.encode_special("<|assistant_end|>")
    for i, rollout in enumerate(rollouts):
        inputs, targets, adv = training_batch(rollout, pad, worker.device)
        last = i == len(rollouts) - 1
        with accumulating(ddp, last):
            with worker.autocast():
                loss = policy_gradient_loss(ddp, inputs, targets, adv) / len(rollouts)
            loss.backward()
        stats.prompts += 1
        stats.passed += int(max(rollout.rewards) > 0)
        stats.samples += len(rollout.rewards)
        stats.reward += sum(rollout.rewards)
        stats.tokens += sum(len(c) for c in rollout.completions)
        stats.loss += loss.item()
    return stats


def _sample_seed(seed: int, position: int, worker: Worker) -> int:
    """A different seed for every prompt of the run: its place in the global stream."""
    return seed * 1_000_003 + position * worker.world_size + worker.rank


# ---------------------------------------------------------------------------
# the stage


def rl_prompts(cfg: Config, storage: Any) -> tuple[TaskMixture, dict[str, str]]:
    """The rl.tasks mixture's train split, and {task: reason} for tasks left out for lack of data."""
    mixture, skipped = build_mixture(cfg.rl.tasks, cfg, TRAIN_SPLIT, storage, cfg.rl.max_examples)
    if not mixture.tasks:
        raise TaskUnavailable(",".join(cfg.rl.tasks), f"no task of rl.tasks is available: {skipped}")
    return mixture, skipped


def prompts_per_worker(rl: RLConfig, world_size: int) -> int:
    """rl.prompts_per_step split over the workers, rounded up so that any worker count works (every rank
    must take part in each step's gradient all-reduce)."""
    return math.ceil(rl.prompts_per_step / world_size)


def rl_optim_config(cfg: Config) -> OptimConfig:
    """nanochat's RL settings: lr_frac of the base rates at step 0, linearly down to 0 at the last step, and
    no weight decay: a step whose samples all earned the same reward has no gradient, and must not shrink
    the weights either."""
    return optim_config(cfg, lr_frac=cfg.rl.lr_frac, weight_decay=0.0, warmup_ratio=0.0, warmdown_ratio=1.0,
                         final_lr_frac=0.0)


class RLStage(Stage):
    """RL plugs its batch (prompts and their sampled rollouts) and its loss (the policy gradient) into the
    shared step loop."""

    name = "rl"
    reports_mfu = False  # its tokens are sampled ones: most of a step is generation, not training

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.task, self.skipped = rl_prompts(self.cfg, self.storage)
        self.prompts_per_worker = prompts_per_worker(self.cfg.rl, self.worker.world_size)

    def build_model(self) -> GPT:
        [source] = STAGES[self.name].starts_from
        model, step = CheckpointManager(self.storage, self.cfg.run, source).load_model(self.worker.device)
        log.info("rl starts from %s step %d", source, step)
        return model

    def optim_config(self) -> OptimConfig:
        return rl_optim_config(self.cfg)

    def make_loader(self, cursor: dict | None) -> PromptIterator:
        return PromptIterator(self.task, self.worker.rank, self.worker.world_size, cursor)

    def horizon(self, model: GPT) -> int:
        rl = self.cfg.rl
        prompts_per_step = self.prompts_per_worker * self.worker.world_size
        return rl.max_steps if rl.max_steps > 0 else max(1, len(self.task) // prompts_per_step)

    def micro_steps(self) -> int:
        return self.prompts_per_worker

    def wrap(self, model: GPT) -> nn.Module:
        """DDP without buffer syncing: the rotary tables are the only buffers, alike on every rank but grown by
        each rank's own longest sequence, so syncing them at every forward would be wasted at best."""
        return self.data_parallel(model, forward_sync_buffers=False)

    def train_step(self, forward: nn.Module, model: GPT, optimizers: list, loader: PromptIterator) -> StepResult:
        batch = [next(loader) for _ in range(self.micro_steps())]
        stats = rl_step(model, forward, self.tokenizer, self.task, batch, self.cfg.rl, self.worker, self.cfg.train.seed)
        step_optimizers(optimizers, self.sharding)
        model.zero_grad(set_to_none=True)
        stats = stats.reduced(self.worker)  # also a sync point, so the step time is honest on GPU
        return StepResult(stats.metrics(self.worker.world_size), stats.tokens)

    def describe(self, model: GPT, horizon: int) -> str:
        return (f"rl: {horizon} steps of {self.micro_steps() * self.worker.world_size} prompts x "
                f"{self.cfg.rl.samples_per_prompt} samples, {self.worker.world_size} workers")

    def summary_extra(self, state: TrainState) -> dict[str, Any]:
        return {"mixture": self.task.counts(), "skipped_tasks": self.skipped, **reward_summary(state.history)}


def train_rl(settings: WorkerSettings) -> None:
    """Ray Train's train_loop_per_worker for `nanochat train rl`."""
    train_stage(settings, RLStage)


def reward_summary(history: list[dict[str, float]]) -> dict[str, float]:
    """The mean reward of the first and the last step, so DONE.json shows whether RL helped."""
    if not history:
        return {}
    return {"reward_first": history[0]["reward"], "reward_last": history[-1]["reward"],
            "pass_at_k_last": history[-1]["pass_at_k"]}
