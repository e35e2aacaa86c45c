"""
XLA's persistent compilation cache (`jax.compilation_cache`): the JAX backend's time to its first optimizer
step in a fresh process, first with an empty cache, then with the cache that first process filled, side by
side in one run. The difference is what a run resumed after a crash or a preemption saves.

Each measurement runs in its own process (a process keeps compiled functions in memory, which would hide the
cache): the model and optimizer state are built, then the first step (tracing, compiling or loading from the
cache, running) is timed, then a second step for comparison.

    .venv/bin/python bench/jax_compile_cache.py [--preset tiny-cpu] [--set model.depth=6 ...] [--rows N]
    .venv/bin/python bench/jax_compile_cache.py --cpu-devices 8 --fsdp 2   # the sharded step on virtual devices
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rows", type=int, default=None, help="rows per step (default: the preset's device_batch_size)")
    parser.add_argument("--cpu-devices", type=int, default=1, help="virtual CPU devices (XLA host device count)")
    parser.add_argument("--fsdp", type=int, default=1, help="mesh devices that shard the parameters")
    parser.add_argument("--cache", help=argparse.SUPPRESS)  # set for the measuring child processes
    return parser.parse_args()


def first_steps(args: argparse.Namespace) -> dict[str, float | str]:
    """In this process: seconds to the first optimizer step (compile or cache load included) and the second."""
    from nanochat.config import JaxConfig
    from trainer.jaxgpt.train import configure_platform, use_compilation_cache

    configure_platform(JaxConfig(cpu_devices=args.cpu_devices))  # read by XLA once, when jax is imported
    import jax
    import numpy as np
    import torch

    from nanochat.config import load_config
    from nanochat.gpt import GPT
    from trainer.jaxgpt.train import ShardedTrainer, make_mesh, schedule_at
    from trainer.optim import optim_config
    from trainer.stages.base import model_config

    use_compilation_cache(args.cache)
    cfg = load_config(preset=args.preset, overrides=args.overrides)
    rows = args.rows or cfg.train.device_batch_size
    batch = np.random.default_rng(0).integers(0, cfg.tokenizer.vocab_size, (1, rows, cfg.train.seq_len), dtype=np.int32)
    torch.manual_seed(cfg.train.seed)
    model = GPT(model_config(cfg, cfg.tokenizer.vocab_size))
    model.init_weights()
    ocfg = optim_config(cfg)
    trainer = ShardedTrainer(model.config, ocfg, model.state_dict(), make_mesh(args.fsdp), cfg.jax.dtype)
    seconds = []
    for step in range(2):
        started = time.perf_counter()
        trainer.step(batch, batch, schedule_at(step, 10, ocfg))  # returns the loss as a float: a device sync
        seconds.append(time.perf_counter() - started)
    return {"first": seconds[0], "second": seconds[1], "params": model.num_params(),
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}


def measure(cache: str) -> dict[str, float | str]:
    """first_steps() in a fresh process given this command's own arguments and the cache folder."""
    argv = [sys.executable, __file__, *sys.argv[1:], "--cache", cache]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.cache is not None:
        print(json.dumps(first_steps(args)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="jax-cache-") as cache:
        cold = measure(cache)
        warm = measure(cache)
    print(f"preset {args.preset} {' '.join(args.overrides)}: {cold['params']:,} params on {cold['devices']}, "
          f"fsdp {args.fsdp}")
    print(f"{'':<28}{'empty cache':>12}{'filled cache':>14}{'ratio':>8}")
    for key, label in [("first", "first step (s, compile)"), ("second", "second step (s)")]:
        print(f"{label:<28}{cold[key]:>12.2f}{warm[key]:>14.2f}{warm[key] / cold[key]:>8.2f}")


if __name__ == "__main__":
    main()
