"""
Training throughput of the two backends side by side: torch (what each DDP worker runs) against JAX (the
mesh-sharded jitted step), on the same model config, batch shape and optimizer, in one run.

Each backend runs the full optimizer step (forward, backward, Muon + AdamW) on the same random token
batches; the first --warmup steps (compilation, allocator warm-up) are not timed. On CPU both use every core
(torch threads = cores; XLA's own thread pool), on a GPU torch uses bf16 autocast and JAX bf16 matmuls.

    .venv/bin/python bench/jax_vs_torch.py [--preset tiny-cpu] [--set model.depth=6 ...] [--steps 20]
    .venv/bin/python bench/jax_vs_torch.py --cpu-devices 8 --fsdp 2   # the sharded path on virtual devices
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per backend")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--rows", type=int, default=None, help="rows per step (default: the preset's device_batch_size)")
    parser.add_argument("--cpu-devices", type=int, default=1, help="virtual CPU devices for JAX (XLA host device count)")
    parser.add_argument("--fsdp", type=int, default=1, help="mesh devices that shard the parameters")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from nanochat.config import JaxConfig
    from trainer.jaxgpt.train import configure_platform

    configure_platform(JaxConfig(cpu_devices=args.cpu_devices))  # read by XLA once, when jax is imported
    import jax
    import numpy as np
    import torch

    from nanochat.config import load_config
    from nanochat.gpt import GPT
    from trainer.jaxgpt.train import ShardedTrainer, make_mesh, schedule_at
    from trainer.optim import apply_schedule, build_optimizers, optim_config
    from trainer.stages.base import model_config

    cfg = load_config(preset=args.preset, overrides=args.overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    rows, seq_len = args.rows or cfg.train.device_batch_size, cfg.train.seq_len
    total_steps = args.warmup + args.steps
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg.tokenizer.vocab_size, (2, rows, seq_len), dtype=np.int32) for _ in range(total_steps)]
    tokens_per_step = rows * seq_len

    torch.manual_seed(cfg.train.seed)
    model = GPT(model_config(cfg, cfg.tokenizer.vocab_size))
    model.init_weights()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ocfg = optim_config(cfg)
    print(f"model: {model.num_params():,} params, depth {model.config.n_layer}, width {model.config.n_embd}, "
          f"seq_len {seq_len}, {rows} rows per step ({tokens_per_step:,} tokens)")

    # torch: one worker's step, exactly as the DDP loop runs it (no gradient accumulation)
    model = model.to(device).train()
    optimizers = build_optimizers(model, ocfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    torch_losses, started = [], 0.0
    for step, batch in enumerate(batches):
        if step == args.warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        x, y = (torch.from_numpy(b).long().to(device) for b in batch)
        apply_schedule(optimizers, step, total_steps, ocfg)
        with autocast:
            loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        torch_losses.append(loss.item())  # a sync point, as the loop's per-step metrics are
    torch_seconds = time.perf_counter() - started

    # JAX: the mesh-sharded jitted step over every local device
    mesh = make_mesh(args.fsdp)
    dtype = "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"
    trainer = ShardedTrainer(model.config, ocfg, initial, mesh, dtype)
    jax_losses = []
    for step, batch in enumerate(batches):
        if step == args.warmup:
            started = time.perf_counter()
        jax_losses.append(trainer.step(batch[0][None], batch[1][None], schedule_at(step, total_steps, ocfg)))
    jax_seconds = time.perf_counter() - started

    timed = args.steps * tokens_per_step
    torch_tps, jax_tps = timed / torch_seconds, timed / jax_seconds
    jax_devices = f"{jax.device_count()} x {jax.devices()[0].device_kind} (mesh {dict(mesh.shape)}, {dtype})"
    torch_device = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\n{'backend':<8} {'devices':<52} {'tokens/s':>12} {'ms/step':>9} {'first loss':>11} {'last loss':>10}")
    print(f"{'torch':<8} {torch_device:<52} {torch_tps:>12,.0f} {1000 * torch_seconds / args.steps:>9.1f} "
          f"{torch_losses[0]:>11.4f} {torch_losses[-1]:>10.4f}")
    print(f"{'jax':<8} {jax_devices:<52} {jax_tps:>12,.0f} {1000 * jax_seconds / args.steps:>9.1f} "
          f"{jax_losses[0]:>11.4f} {jax_losses[-1]:>10.4f}")
    print(f"\njax / torch tokens/s: {jax_tps / torch_tps:.2f}")


if __name__ == "__main__":
    main()
