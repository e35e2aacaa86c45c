"""
Base pretraining in JAX: `nanochat train base --backend jax` (train.backend = jax).

Notable:
- one process per host drives all of its devices; the devices form a (data, fsdp) mesh. Batch rows are
  split over both axes; every parameter and its optimizer state are split along their largest dimension
  that the fsdp axis divides (ZeRO-3 style), the rest replicated. jit + GSPMD insert the collectives, so
  the same code runs on 8 virtual CPU devices, one GPU, or every chip of a TPU slice
- the run is a Ray Train job (JaxTrainer): on a TPU slice Ray starts one worker per host and initialises
  jax.distributed; on CPU one worker drives jax.cpu_devices virtual devices
- the same pieces as the torch trainer: the initial weights (torch's init, same seed), the data loader
  (each host reads its own row groups, train.device_batch_size rows per device per micro-step), the
  schedule, the stage's checkpoint layout and format (a JAX checkpoint is a torch state dict that serving
  and the chat stages load unchanged), the metrics, the progress bar and the summary line
- gradient accumulation runs inside the jitted step (lax.scan over micro-batches)
- resumable: the checkpoint holds the optimizer state (flattened by tree path) and each host's data cursor
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanochat.checkpoint import write_checkpoint
from nanochat.config import Config, ConfigError, JaxConfig
from nanochat.gpt import GPT, GPTConfig
from services.checkpoints import CheckpointManager
from services.storage import open_storage
from trainer.data.loader import DataLoader, token_bytes
from trainer.data.tokenizer import load_tokenizer
from trainer.optim import OptimConfig, lr_multiplier, muon_momentum, optim_config, weight_decay_multiplier
from trainer.stages.base import BaseStage, model_config
from trainer.stages.loop import (
    Publisher,
    StepHooks,
    StepResult,
    TrainState,
    load_latest,
    maybe_inject_fault,
    publish_checkpoint,
    resumed_state,
    step_loop,
)
from trainer.worker import Worker, WorkerSettings

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")  # batch rows are split over every device of the mesh
# virtual CPU devices are threads sharing the cores: on a busy machine a collective can wait longer than XLA's
# default before it aborts the process, so give them minutes
CPU_COLLECTIVE_TIMEOUTS = ("--xla_cpu_collective_timeout_seconds=900",
                           "--xla_cpu_collective_call_terminate_timeout_seconds=900")


def configure_platform(jax_cfg: JaxConfig) -> None:
    """Environment JAX reads once, at import: which platform, and how many virtual CPU devices."""
    platforms = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}
    if jax_cfg.platform:
        os.environ.setdefault("JAX_PLATFORMS", platforms[jax_cfg.platform])
    if jax_cfg.platform in (None, "cpu") and jax_cfg.cpu_devices > 1:
        flags = [f"--xla_force_host_platform_device_count={jax_cfg.cpu_devices}", *CPU_COLLECTIVE_TIMEOUTS]
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def use_compilation_cache(folder: str) -> None:
    """XLA's persistent compilation cache in folder (none if empty): a run resumed after a crash or a
    preemption loads its compiled steps instead of compiling them again (JAX keeps those that took over a
    second to compile; bench/jax_compile_cache.py measures the time to the first step with and without)."""
    if folder:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(Path(folder).expanduser()))


def expected_devices(cfg: Config) -> int | None:
    """The devices the run's mesh will hold, as far as the config says: virtual CPU devices, the chips of the
    TPU topology, or workers x GPUs; None when JAX picks the platform itself."""
    j, t = cfg.jax, cfg.train
    if j.platform == "cpu" or (j.platform is None and j.cpu_devices > 1):
        return j.cpu_devices
    if j.platform == "tpu" and j.tpu_topology:
        return math.prod(int(d) for d in j.tpu_topology.lower().split("x"))
    if j.platform == "gpu" and t.gpus_per_worker >= 1:
        return t.workers * int(t.gpus_per_worker)
    return None


def micro_steps(cfg: Config, devices: int) -> int:
    """Gradient-accumulation steps: train.device_batch_size rows of train.seq_len tokens on every device per
    micro-step, train.total_batch_size tokens per optimizer step; a split that does not divide names the fields."""
    t = cfg.train
    rows = t.device_batch_size * t.seq_len * devices
    if t.total_batch_size % rows:
        raise ConfigError(
            f"train.total_batch_size ({t.total_batch_size}) must be a multiple of train.device_batch_size x "
            f"train.seq_len x JAX devices ({t.device_batch_size} x {t.seq_len} x {devices} = {rows})")
    return t.total_batch_size // rows


def preflight(cfg: Config) -> None:
    """What the driver can check before Ray starts: JAX is installed, and the batch splits over the devices."""
    if importlib.util.find_spec("jax") is None:
        raise ConfigError("train.backend=jax needs JAX: install the jax extra (pip install -e '.[jax]'; "
                          "on a TPU VM also jax[tpu])")
    devices = expected_devices(cfg)
    if devices is not None:
        micro_steps(cfg, devices)


# -----------------------------------------------------------------------------
# mesh and sharding


def make_mesh(fsdp: int):
    """A (data, fsdp) mesh over every device of every process; fsdp = -1 puts all devices on fsdp."""
    import jax
    from jax.sharding import Mesh

    devices = jax.devices()
    fsdp = len(devices) if fsdp == -1 else fsdp
    if len(devices) % fsdp:
        raise ValueError(f"jax.fsdp={fsdp}: must divide the number of devices ({len(devices)})")
    return Mesh(np.array(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def shard_for(mesh, shape: tuple[int, ...]):
    """Split an array along its largest dimension that the fsdp axis divides; replicate it otherwise."""
    from jax.sharding import NamedSharding, PartitionSpec

    size = mesh.shape["fsdp"]
    if size > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % size == 0:
                spec = [None] * len(shape)
                spec[dim] = "fsdp"
                return NamedSharding(mesh, PartitionSpec(*spec))
    return NamedSharding(mesh, PartitionSpec())


def _host(array) -> np.ndarray:
    """The whole value of a (possibly multi-host sharded) array on this host."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


class ShardedTrainer:
    """Parameters, optimizer state and the jitted train and eval steps, laid out over a mesh."""

    def __init__(self, config: GPTConfig, optim_cfg: OptimConfig, state_dict: dict[str, torch.Tensor], mesh,
                 compute_dtype: str = "float32"):
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec

        from trainer.jaxgpt import optim
        from trainer.jaxgpt.model import loss_fn, params_from_torch, token_losses

        self.config, self.optim_cfg, self.mesh = config, optim_cfg, mesh
        dtype = jnp.dtype(compute_dtype)
        setup = optim.optim_setup(config, optim_cfg)
        params = params_from_torch(state_dict)
        opt_state = optim.init_state(params, setup, optim_cfg)
        self.param_sharding = {name: shard_for(mesh, p.shape) for name, p in params.items()}
        self.state_sharding = jax.tree.map(lambda a: shard_for(mesh, a.shape), opt_state)
        self.params = jax.device_put(params, self.param_sharding)
        self.opt_state = jax.device_put(opt_state, self.state_sharding)
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None))  # (micro, rows, T)
        self.row_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))  # (rows, T)
        replicated = NamedSharding(mesh, PartitionSpec())

        def train_step(params, opt_state, inputs, targets, hyper):
            def micro(grad_sum, batch):
                loss, grads = jax.value_and_grad(loss_fn)(params, batch[0], batch[1], config, dtype)
                return jax.tree.map(jnp.add, grad_sum, grads), loss

            grad_sum, losses = jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, params), (inputs, targets))
            grads = jax.tree.map(lambda g: g / inputs.shape[0], grad_sum)
            params, opt_state = optim.apply_updates(params, grads, opt_state, hyper, setup, optim_cfg, dtype)
            return params, opt_state, losses.mean()

        def eval_sums(params, inputs, targets, table):
            losses = token_losses(params, inputs, targets, config, dtype)
            num_bytes = jnp.where(targets >= 0, table[jnp.maximum(targets, 0)], 0)
            return (losses * (num_bytes > 0)).sum(), num_bytes.sum()

        self._train_step = jax.jit(
            train_step, donate_argnums=(0, 1),
            in_shardings=(self.param_sharding, self.state_sharding, self.batch_sharding, self.batch_sharding, replicated),
            out_shardings=(self.param_sharding, self.state_sharding, replicated))
        self._eval_sums = jax.jit(eval_sums, in_shardings=(self.param_sharding, self.row_sharding, self.row_sharding,
                                                           replicated))

    def _global(self, local: np.ndarray, sharding):
        """This host's rows as its part of the global batch."""
        import jax

        return jax.make_array_from_process_local_data(sharding, local)

    def step(self, inputs: np.ndarray, targets: np.ndarray, schedule: dict[str, float]) -> float:
        """One optimizer step over (micro-steps, rows, T) batches of this host; returns the mean loss."""
        import jax.numpy as jnp

        from trainer.jaxgpt.optim import Hyper

        hyper = Hyper(*(jnp.float32(schedule[k]) for k in Hyper._fields))
        self.params, self.opt_state, loss = self._train_step(
            self.params, self.opt_state, self._global(inputs, self.batch_sharding),
            self._global(targets, self.batch_sharding), hyper)
        return float(loss)

    def bits_per_byte(self, batches, steps: int, table: np.ndarray) -> float:
        """Validation bits per byte over `steps` batches of this host (trainer/evals/loss.py's metric)."""
        import jax.numpy as jnp

        nats = num_bytes = 0.0
        table = jnp.asarray(table)
        for _ in range(steps):
            try:
                x, y = next(batches)
            except StopIteration:
                log.warning("validation batches ended early")
                break
            n, b = self._eval_sums(self.params, self._global(x, self.row_sharding), self._global(y, self.row_sharding),
                                   table)
            nats, num_bytes = nats + float(n), num_bytes + float(b)
        if num_bytes == 0:
            raise ValueError("bits per byte: the validation batches held no target token with a byte length")
        return nats / (np.log(2) * num_bytes)

    # ---------------------------------------------------------------- checkpoint state

    def model_state(self) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(_host(p).astype(np.float32)) for name, p in self.params.items()}

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The optimizer state flattened by tree path ("adam[0].mu['lm_head.weight']" and so on)."""
        import jax

        leaves = jax.tree_util.tree_flatten_with_path(self.opt_state)[0]
        return {jax.tree_util.keystr(path): torch.from_numpy(_host(leaf).copy()) for path, leaf in leaves}

    def load(self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, torch.Tensor]) -> None:
        import jax

        from trainer.jaxgpt.model import params_from_torch

        self.params = jax.device_put(params_from_torch(model_state), self.param_sharding)
        paths, treedef = jax.tree_util.tree_flatten_with_path(self.opt_state)
        missing = [jax.tree_util.keystr(p) for p, _ in paths if jax.tree_util.keystr(p) not in optimizer_state]
        if missing:
            raise ValueError(f"the checkpoint's JAX optimizer state lacks {missing[:3]}")
        leaves = [np.asarray(optimizer_state[jax.tree_util.keystr(p)].numpy(), dtype=leaf.dtype) for p, leaf in paths]
        self.opt_state = jax.device_put(jax.tree_util.tree_unflatten(treedef, leaves), self.state_sharding)


def schedule_at(step: int, horizon: int, cfg: OptimConfig) -> dict[str, float]:
    """trainer/optim.py's schedule for this step, as apply_schedule sets it on the torch optimizers."""
    return {"lr_multiplier": lr_multiplier(step, horizon, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac),
            "muon_momentum": muon_momentum(step, horizon, cfg.warmdown_ratio),
            "weight_decay_multiplier": weight_decay_multiplier(step, horizon)}


# -----------------------------------------------------------------------------
# the Ray Train worker


def _allgather_json(obj: Any) -> list[Any]:
    """Every process's obj (the data cursors), in process order."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.array([data.size]))))
    padded = np.zeros(size, np.uint8)
    padded[: data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row).rstrip(b"\0")) for row in gathered]


def _numpy_batches(loader: DataLoader):
    """The loader's (inputs, targets) as int32 arrays, read lazily, so the loader's cursor stays exact."""
    for x, y in loader:
        yield x.numpy().astype(np.int32), y.numpy().astype(np.int32)


def _stacked(batches, micro_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The next micro_steps batches as (micro_steps, rows, T) inputs and targets."""
    inputs, targets = zip(*(next(batches) for _ in range(micro_steps)))
    return np.stack(inputs), np.stack(targets)


class JaxRun:
    """One host's part of a JAX base-training run."""

    def __init__(self, settings: WorkerSettings):
        cfg = settings.config
        configure_platform(cfg.jax)
        import jax

        use_compilation_cache(cfg.jax.compilation_cache)
        self.settings, self.cfg = settings, cfg
        storage = open_storage(settings.storage)
        self.worker = Worker(jax.process_index(), jax.process_count(), torch.device("cpu"))
        self.stage = BaseStage(cfg, self.worker, storage, load_tokenizer(storage))
        self.manager = CheckpointManager(storage, cfg.run, "base")
        self.mesh = make_mesh(cfg.jax.fsdp)
        t = cfg.train
        self.micro_steps = micro_steps(cfg, jax.device_count())
        self.rows = t.device_batch_size * jax.local_device_count()  # this host's rows per micro-step

        torch.manual_seed(t.seed)  # torch's init: both backends start from the same weights
        self.model = GPT(model_config(cfg, self.stage.tokenizer.vocab_size))
        self.model.init_weights()
        self.optim_cfg = optim_config(cfg)
        self.trainer = ShardedTrainer(self.model.config, self.optim_cfg, self.model.state_dict(), self.mesh,
                                      cfg.jax.dtype)
        self.horizon = self.stage.horizon(self.model)
        self.state, cursor = self._restore()
        self.loader = self._loader(self.stage.train_shards, cursor, loop=True)
        self.table = token_bytes(self.stage.tokenizer).numpy()

    def _loader(self, shards: list[str], cursor: dict | None, loop: bool) -> DataLoader:
        t = self.cfg.train
        return DataLoader(self.stage.storage, shards, self.stage.tokenizer, batch_size=self.rows, seq_len=t.seq_len,
                          rank=self.worker.rank, world_size=self.worker.world_size, state=cursor, loop=loop)

    def _restore(self) -> tuple[TrainState, dict | None]:
        found = load_latest(self.manager, self.worker, "jax")
        if found is None:
            return TrainState(), None
        step, ckpt = found
        self.trainer.load(ckpt.model_state, ckpt.optimizer_state["jax"])
        log.info("host %d resumed from step %d", self.worker.rank, step)
        return resumed_state(step, ckpt), ckpt.cursor[self.worker.rank]

    def save(self, metrics: dict[str, float]) -> float:
        """Write the step's checkpoint (host 0) and report it to Ray Train; returns the seconds it took."""
        cursors = _allgather_json(self.loader.state_dict())
        model_state, optimizer_state = self.trainer.model_state(), self.trainer.optimizer_state()
        return publish_checkpoint(self.worker, self.manager, self.state.step, metrics, lambda folder: write_checkpoint(
            folder, model_state=model_state, optimizer_state={"jax": optimizer_state}, cursor=cursors,
            config=self.cfg.model_dump(), rng=None,
            meta={"stage": "base", "backend": "jax", "world_size": self.worker.world_size,
                  "devices": len(self.mesh.devices.flat), "model_config": vars(self.model.config),
                  **self.state.__dict__}),
            barrier=lambda: _allgather_json(None))

    def evaluate(self) -> dict[str, float]:
        t = self.cfg.train
        steps = max(1, t.eval_tokens // (self.rows * t.seq_len * self.worker.world_size))
        val = _numpy_batches(self._loader(self.stage.val_shards, None, loop=False))
        return {"val_bpb": self.trainer.bits_per_byte(val, steps, self.table)}

    def train(self) -> None:
        """The shared step loop around the jitted step; checkpoints, metrics and the summary as the torch stages."""
        stage, horizon = self.stage, self.horizon
        publisher = Publisher.open(self.settings, "base", self.worker, self.manager, self.state, horizon, self.save)
        tokens_per_step = self.cfg.train.total_batch_size
        if self.worker.is_main:
            log.info("base (jax): %s params, %d steps, %d micro-steps per step, mesh %s", f"{self.model.num_params():,}",
                     horizon, self.micro_steps, dict(self.mesh.shape))
        batches = _numpy_batches(self.loader)

        def train(schedule: dict[str, float]) -> StepResult:
            inputs, targets = _stacked(batches, self.micro_steps)
            loss = self.trainer.step(inputs, targets, schedule)  # float(): waits for the step to finish
            return StepResult({"loss": loss}, tokens_per_step)

        # the first steps of an attempt include compilation: the loop leaves them out of the steady-state time
        step_loop(self.state, horizon, StepHooks(
            schedule=lambda step: schedule_at(step, horizon, self.optim_cfg),
            train=train,
            evaluates_at=lambda step: stage.evaluates_at(step, horizon),
            evaluate=self.evaluate,
            publish=publisher.step,
            before=lambda step: maybe_inject_fault(self.settings, stage.storage, step, self.worker,
                                                   self.manager.stage_prefix),
        ))
        publisher.finish(self.model, {"backend": "jax", "devices": len(self.mesh.devices.flat)})


def train_base_jax(settings: WorkerSettings) -> None:
    """Ray Train's train_loop_per_worker for `nanochat train base --backend jax`."""
    JaxRun(settings).train()
