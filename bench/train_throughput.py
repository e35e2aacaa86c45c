"""
Base pretraining throughput, side by side in one run on the same model, batch and data: a plain
single-process torch loop, plain torch DDP (spawned processes, gloo or NCCL), the same processes with the
optimizer state sharded instead (train.shard_optimizer's ZeroSharding, its communication overlapped with
the backward and the optimizer steps, and not), and our Ray Train stage (`nanochat train base`) at 1 and at N
workers. What the framework costs, not what the model costs.

Every arm runs the trainer's own optimizer step (trainer/stages/loop.py's optimizer_step: forward, backward, Muon +
AdamW) on the data loader's batches of the prepared corpus; the first --warmup steps of each are not timed
(our stage excludes the same number from its own figure). Each arm gets the whole machine in turn: the
plain loop every core, the DDP ranks and our workers a share each (our stage picks it itself,
train.threads_per_worker=0). Printed: steady-state tokens/s of each arm and the ratios ours / plain
(1 worker) and ours / DDP (N workers); and the optimizer-state bytes each rank holds, replicated (DDP) and
sharded, side by side. With --rounds R every arm runs R times, round after round, and the figures are
medians (a ratio: the median of the rounds' own ratios, whose arms ran minutes apart at most), since a
shared machine's speed drifts by more than the gaps measured.

On a CUDA GPU also, per GPU preset (--gpu-presets): the compiled optimizer step on random tokens at the
preset's model and device batch (auto where the preset measures it), in bf16 and then in FP8 at the same
rows: tokens/s, MFU (the model's FLOPs per token x tokens/s over the GPU's bf16 peak, trainer/worker.py's
table), peak memory, and FP8 / bf16. Without a GPU, or without FP8 tensor cores, a line says which rows
were skipped and why.

    .venv/bin/python -m bench.train_throughput                      # tiny-cpu: d4, 8 x 512 tokens a step
    .venv/bin/python -m bench.train_throughput --preset d20 --workers 8 --steps 20 --set train.max_steps=30
    .venv/bin/python -m bench.train_throughput --gpu-only           # MFU and bf16 vs FP8 of d20 and d24
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.config import Config, load_config
from nanochat.gpt import GPT
from services.storage import LocalStorage
from trainer import fp8
from trainer.batch_size import rows_per_worker
from trainer.data.corpus import list_shards, prepare_corpus, split_shards
from trainer.data.loader import DataLoader
from trainer.data.tokenizer import load_tokenizer, train_tokenizer
from trainer.optim import apply_schedule, build_optimizers, grad_accum_steps, optim_config, state_bytes
from trainer.stages.base import model_config
from trainer.stages.loop import compiled, optimizer_step, shard_optimizers
from trainer.worker import Worker

Shard = Literal["off", "overlapped", "sequential"]  # replicated state (DDP), or ZeroSharding's overlap on or off


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workers", type=int, default=2, help="DDP ranks and Ray Train workers of the N arm")
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per arm")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (our stage's own exclusion)")
    parser.add_argument("--rows", type=int, default=8, help="rows per optimizer step, all workers together")
    parser.add_argument("--docs", type=int, default=2000, help="corpus documents to prepare")
    parser.add_argument("--rounds", type=int, default=1, help="times every framework arm runs, one round after "
                        "another; figures are medians over rounds, ratios medians of each round's own")
    parser.add_argument("--gpu-presets", nargs="*", default=["d20", "d24"], help="presets timed on a GPU")
    parser.add_argument("--gpu-steps", type=int, default=10, help="timed steps of each GPU row")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU rows (skip the framework arms)")
    return parser.parse_args()


def bench_config(args: argparse.Namespace, workers: int, *extra: str) -> Config:
    """One step = --rows rows of seq_len tokens, split over `workers` with no accumulation; no evaluation or
    checkpoint within the timed steps."""
    if args.rows % workers:
        raise SystemExit(f"--rows ({args.rows}) must split over {workers} workers")
    seq_len = load_config(preset=args.preset, overrides=args.overrides).train.seq_len
    steps = args.warmup + args.steps
    return load_config(preset=args.preset, overrides=[
        *args.overrides, f"train.workers={workers}", f"train.device_batch_size={args.rows // workers}",
        f"train.total_batch_size={args.rows * seq_len}", f"train.max_steps={steps}", "train.eval_every=-1",
        f"train.checkpoint_every={steps + 1}", "log.tensorboard=false", *extra])


def prepare(args: argparse.Namespace, root: Path) -> LocalStorage:
    storage = LocalStorage(root)
    cfg = load_config(preset=args.preset, overrides=args.overrides)
    prepare_corpus(cfg.data, storage, limit=args.docs)
    train_tokenizer(cfg, storage)
    return storage


def train_loop(cfg: Config, storage_root: str, rank: int, world: int, device: torch.device,
               shard: Shard = "off") -> tuple[list[float], int]:
    """The plain loop (DDP when world > 1, or the sharded optimizer step instead when shard is not "off"):
    every step's seconds, synchronised at its end as our stage's are, and the optimizer-state bytes this rank
    ends with."""
    storage = LocalStorage(storage_root)
    tokenizer = load_tokenizer(storage)
    t = cfg.train
    torch.manual_seed(t.seed)
    model = GPT(model_config(cfg, tokenizer.vocab_size))
    model.init_weights()
    model = model.to(device).train()
    ocfg = optim_config(cfg)
    optimizers = build_optimizers(model, ocfg)
    worker = Worker(rank, world, device)
    sharding = shard_optimizers(shard != "off", optimizers, worker, overlap=shard == "overlapped")
    forward = compiled(model, t.compile, device)
    ddp = torch.nn.parallel.DistributedDataParallel(forward) if world > 1 and sharding is None else forward
    train, _ = split_shards(list_shards(storage, cfg.data.corpus_name), cfg.data.val_shards)
    loader = DataLoader(storage, train, tokenizer, t.device_batch_size, t.seq_len, rank=rank, world_size=world,
                        device=device)
    accum = grad_accum_steps(t.total_batch_size, t.device_batch_size, t.seq_len, world)
    seconds = []
    for step in range(t.max_steps):
        apply_schedule(optimizers, step, t.max_steps, ocfg)
        started = time.time()
        loss, tokens = optimizer_step(ddp, model, optimizers, loader, accum, worker, sharding)
        worker.sum(tokens).item()  # the sync our stage makes at the end of every step
        loss.item()
        seconds.append(time.time() - started)
    return seconds, state_bytes(optimizers)


def _ddp_rank(rank: int, world: int, init_file: str, cfg: Config, storage_root: str, threads: int, shard: Shard,
              out: str) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(threads)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        seconds, optimizer_bytes = train_loop(cfg, storage_root, rank, world, device, shard)
    finally:
        dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps({"seconds": seconds, "optimizer_bytes": optimizer_bytes}))


def steady_tokens_per_second(seconds: list[float], warmup: int, tokens_per_step: int) -> float:
    timed = seconds[warmup:]
    return tokens_per_step * len(timed) / sum(timed)


def plain(args: argparse.Namespace, storage: LocalStorage, cores: int) -> float:
    cfg = bench_config(args, 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(cores)
    seconds, _ = train_loop(cfg, str(storage.root), 0, 1, device)
    return steady_tokens_per_second(seconds, args.warmup, cfg.train.total_batch_size)


def ddp(args: argparse.Namespace, storage: LocalStorage, cores: int, shard: Shard = "off") -> tuple[float, list[int]]:
    """Spawned ranks' tokens/s (rank 0's step times) and every rank's optimizer-state bytes."""
    cfg = bench_config(args, args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/result"
        mp.start_processes(_ddp_rank, args=(args.workers, f"{tmp}/init", cfg, str(storage.root),
                                            max(1, cores // args.workers), shard, out),
                           nprocs=args.workers, start_method="spawn")
        ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(args.workers)]
    tps = steady_tokens_per_second(ranks[0]["seconds"], args.warmup, cfg.train.total_batch_size)
    return tps, [r["optimizer_bytes"] for r in ranks]


def ours(args: argparse.Namespace, storage: LocalStorage, workers: int, round_: int) -> float:
    """`nanochat train base` on an embedded Ray: its own steady-state figure (steps after its warm-up). A run
    of its own each round: a run already trained would be resumed at its end, and nothing timed."""
    from trainer.pipeline.jobs import run_stage, stage_function

    gpus = 1 if torch.cuda.is_available() else 0
    cfg = bench_config(args, workers, f"run=bench-{workers}-{round_}", "train.threads_per_worker=0",
                       f"train.gpus_per_worker={gpus}")
    summary = run_stage("base", stage_function("base", cfg), cfg, storage, show_progress=False)
    return summary["tokens_per_second"]


def _mib(sizes: list[int]) -> str:
    return " ".join(f"{b / 2**20:,.2f}" for b in sizes)


def gpu_rows(args: argparse.Namespace) -> None:
    """MFU per preset, bf16 against FP8 at the same model and rows, on this machine's GPU."""
    if not torch.cuda.is_available():
        print("\nGPU rows skipped: no CUDA device here (MFU per depth and bf16 vs FP8 need one)")
        return
    from bench.gpu import time_training

    device = torch.device("cuda")
    fp8_problem = fp8.device_problem(device)
    print(f"\n{torch.cuda.get_device_name(device)}, compiled optimizer step, random tokens, {args.gpu_steps} timed steps")
    print(f"  {'preset':<7} {'rows':>4} {'bf16 tok/s':>12} {'MFU':>6} {'peak GiB':>9} {'FP8 tok/s':>12} {'MFU':>6} "
          f"{'peak GiB':>9} {'FP8/bf16':>9}")
    for preset in args.gpu_presets:
        cfg = load_config(preset=preset)
        t = cfg.train
        config = model_config(cfg, cfg.tokenizer.vocab_size)
        per_step = rows_per_worker(t.total_batch_size, t.seq_len, t.workers)
        bf16 = time_training(config, t.device_batch_size, args.gpu_steps, 2, True, device, rows_per_step=per_step)
        row = f"  {preset:<7} {bf16['rows']:>4} {bf16['tokens_per_second']:>12,.0f} {bf16.get('mfu_percent', 0):>5.1f}% " \
              f"{bf16['peak_memory_gib']:>9.1f}"
        if not fp8_problem:
            low = time_training(config, bf16["rows"], args.gpu_steps, 2, True, device, fp8=True)
            row += f" {low['tokens_per_second']:>12,.0f} {low.get('mfu_percent', 0):>5.1f}% {low['peak_memory_gib']:>9.1f} " \
                   f"{low['tokens_per_second'] / bf16['tokens_per_second']:>8.2f}x"
        print(row, flush=True)
    if fp8_problem:
        print(f"  FP8 columns skipped: {fp8_problem}")


def main() -> None:
    args = parse_args()
    if args.gpu_only:
        gpu_rows(args)
        return
    os.environ.pop("OMP_NUM_THREADS", None)  # else our stage would take it as its threads per worker
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        storage = prepare(args, Path(tmp))
        for round_ in range(args.rounds):
            replicated, replicated_bytes = ddp(args, storage, cores)
            sharded, sharded_bytes = ddp(args, storage, cores, shard="overlapped")
            rounds.append({
                "plain loop, 1 process": plain(args, storage, cores),
                f"plain DDP, {args.workers} processes": replicated,
                "ours (Ray Train), 1 worker": ours(args, storage, 1, round_),
                f"ours (Ray Train), {args.workers} workers": ours(args, storage, args.workers, round_),
                f"sharded optimizer, {args.workers} processes": sharded,
                f"sharded, no overlap, {args.workers} processes": ddp(args, storage, cores, shard="sequential")[0],
            })
    seq_len = load_config(preset=args.preset, overrides=args.overrides).train.seq_len
    over = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"\nbase pretraining, preset {args.preset}: {args.rows} rows x {seq_len} tokens a step, "
          f"{args.steps} timed steps after {args.warmup}, {cores} cores{over}")
    for name in rounds[0]:
        print(f"  {name:<32} {statistics.median(r[name] for r in rounds):>10,.0f} tokens/s")
    names = list(rounds[0])
    for label, (a, b) in {"ours / plain loop (1 worker)     ": (2, 0),
                          f"ours / plain DDP ({args.workers} workers)     ": (3, 1),
                          f"sharded / plain DDP ({args.workers} processes)": (4, 1),
                          "sharded, overlapped / not       ": (4, 5)}.items():
        ratios = [r[names[a]] / r[names[b]] for r in rounds]
        each = f"  (rounds: {' '.join(f'{x:.2f}' for x in ratios)})" if len(ratios) > 1 else ""
        print(f"  {label} {statistics.median(ratios):.2f}x{each}")
    print(f"  optimizer state per rank, MiB: replicated (DDP) {_mib(replicated_bytes)} | "
          f"sharded (train.shard_optimizer) {_mib(sharded_bytes)} | largest shard / replicated "
          f"{max(sharded_bytes) / max(replicated_bytes):.2f}x")
    gpu_rows(args)


if __name__ == "__main__":
    main()
