"""
Where a training process stands in its Ray Train worker group, what its device can do, and the settings the
driver hands it.

Notable:
- WorkerSettings: everything a Ray Train worker function receives (its train_loop_config), typed
- a CPU worker's torch threads: its share of the node's CPUs (train.threads_per_worker overrides): one
  worker alone uses every core, and workers sharing a node never oversubscribe it, which slows every step
- bf16 autocast on GPU, fp32 on CPU
- small collectives (mean, all_gather of Python objects, barrier) that degrade to no-ops with one worker
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nanochat.config import Config

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class WorkerSettings:
    """What the driver hands every worker of a Ray Train job: a training stage or an evaluation."""

    config: Config
    storage: str  # the storage URI
    stage: str  # the stage trained, or whose newest checkpoint is evaluated
    threads_per_worker: int = 0  # torch threads of a CPU worker; 0: its share of the node's CPUs
    progress_actor: str | None = None  # the driver's progress board, which rank 0 keeps up to date
    tensorboard_dir: str | None = None  # where rank 0 writes event files; None: none
    fail_at_step: int | None = None  # test hook: the last rank exits once when it reaches this step
    evaluations: tuple[str, ...] = ()  # training jobs: evaluation kinds run on the final checkpoint
    kind: str | None = None  # evaluation jobs: loss, core or chat
    tasks: tuple[str, ...] | None = None  # evaluation jobs: the CORE or chat tasks (None: all)
    evaluated_in: str | None = None  # an evaluation run inside a training job says which


# bf16 dense peak FLOP/s per device, for MFU; unknown devices (CPUs included) report no MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


@dataclass
class Worker:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def mean(self, value: torch.Tensor) -> float:
        return (self.sum(value) / self.world_size).item()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def cpu_threads(configured: int, node_cpus: float, workers_on_node: int) -> int:
    """A CPU worker's torch threads: `configured` if set (> 0), else its share of the node's CPUs (at least
    one). Not OMP_NUM_THREADS: Ray sets that to a worker's reserved CPUs (1) in every worker."""
    if configured > 0:
        return configured
    return max(1, int(node_cpus) // max(1, workers_on_node))


def _node_cpus() -> float:
    """CPUs of this Ray node as Ray counts them (a pod's CPU limit, not the host's cores)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return next((node["Resources"].get("CPU", 1) for node in ray.nodes() if node["NodeID"] == node_id), 1)


def current_worker(threads_per_worker: int) -> Worker:
    """The Worker of this Ray Train process; on a CPU, torch gets cpu_threads() threads (threads_per_worker:
    the job's setting, 0 for a share of the node)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        threads = cpu_threads(threads_per_worker, _node_cpus(), ctx.get_local_world_size())
        torch.set_num_threads(threads)
        log.info("rank %d: %d torch threads", ctx.get_world_rank(), threads)
    return Worker(ctx.get_world_rank(), ctx.get_world_size(), device)
