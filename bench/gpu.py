"""
What one CUDA GPU does with nanochat, in one run sized for a short lease: correctness first (the GPU's
bf16/fp32 paths against float64 and float32 references), then training and serving throughput.

Checks (relative error ||got - ref|| / ||ref|| unless said otherwise):
- forward: logits on the GPU, fp32 (TF32 off) and bf16 autocast (what training runs), against float64 on the CPU
- kv_cache: the inference path (forward_cached through nanochat/kv_cache.py) against the full forward, fp32
- paged: the serving runner (paged KV cache, chunked prefill, then decodes, replayed as CUDA graphs on a GPU)
  against the float32 full forward, serving in float32 and in bfloat16 (serve.dtype auto on a GPU), and in
  bfloat16 with the window layers' KV in a pool of their own (serve.hybrid_kv_cache)
- train_step: one optimizer step (bf16 autocast, Muon in bf16) against the same step in float32 on the CPU:
  the loss, and the parameter change
Throughput:
- attention: a sliding-window layer's attention (a quarter of the context, as the S of SSSL) forward and backward,
  FlexAttention with its block mask against SDPA with a dense mask (model.attention flex vs sdpa), full causal
  SDPA beside them; then whole training steps of an SSSL model with attention auto against sdpa. Ratios
  sdpa / flex (above 1: flex faster). On a CPU, forward only (FlexAttention has no backward there)
- train: the trainer's optimizer_step (forward, backward, Muon + AdamW) on random batches, eager and under
  torch.compile, tokens/s, MFU and peak memory, per depth; with --fp8 also compiled in FP8 (GPUs of compute
  capability 8.9 or newer; elsewhere a line says why not)
- kv_cache_memory: the KV cache serve sizes by default (0.9 of the free memory on a GPU), and whether a second
  engine sized after the first is dropped finds the same memory (a checkpoint reload drains the old engine
  first for that); again_over_first should be about 1
- serve: the serving engine (continuous batching over the paged cache) on concurrent requests with random
  prompts, output tokens/s, float32 against bfloat16, CUDA-graph decodes against eager ones and against the
  graphs of the compiled decode step (serve.compile_decode), with async scheduling (serve.async_scheduling:
  each step launched before the one before is read; its row also counts the stream syncs its launches and
  reads made, which should be none), and one request
  alone; for that request also its decode's memory-bandwidth utilisation: the bytes a decode step reads
  (every weight but the embedding tables, of which it reads one row, and the keys and values of its
  context: all of it in a full layer, the last window in a window layer) times its decode steps per second,
  over the GPU's peak bandwidth (the roofline of a decode that reads each byte once); and prefill tokens/s of
  chunks of mixed lengths packed back to back (the runner's default) against rows padded to the longest
  (bench/prefill.py)

    .venv/bin/python -m bench.gpu --json results.json   # on a GPU machine (~4 minutes on an H100/H200)
    .venv/bin/python -m bench.gpu --only train --fp8 --depths 20   # bf16 and FP8 training side by side
    .venv/bin/python -m bench.gpu --small               # the same on tiny models: runs on a CPU in seconds
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench import prefill
from nanochat.gpt import GPT, GPTConfig, causal_attention, window_block_mask
from nanochat.kv_cache import KVCache
from nanochat.tokenizer import Tokenizer
from serving.engine.kv_cache_size import resolve_kv_memory_fraction
from serving.engine.llm_engine import LLMEngine, build_engine
from serving.engine.model_runner import ModelRunner
from serving.engine.scheduler import PrefillChunk
from serving.engine.sequence import SamplingParams, Sequence
from trainer import fp8 as fp8_training
from trainer.batch_size import choose_rows
from trainer.data.corpus import stdlib_documents
from trainer.optim import OptimConfig, build_optimizers
from trainer.stages.loop import compiled, optimizer_step
from trainer.worker import Worker, peak_flops


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny models and workloads (CPU smoke run)")
    parser.add_argument("--depths", type=int, nargs="*", default=None, help="training depths (default 12 20)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile training runs")
    parser.add_argument("--rows", type=int, default=16, help="training rows of 2048 tokens per step (d20's preset: 16)")
    parser.add_argument("--fp8", action="store_true", help="also train in FP8 (train.fp8), compiled, after bf16")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here (after each section)")
    parser.add_argument("--only", default=None, help="comma-separated sections to run: checks, attention, train, serve")
    return parser.parse_args()


def scrambled(config: GPTConfig, device: torch.device | str, seed: int = 0) -> GPT:
    """Random weights everywhere (nanochat's init zeroes output projections, hiding attention and MLPs)."""
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.size(1) ** -0.5)
    return model.to(device).eval()


def relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - ref).norm() / ref.norm()).item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- checks


def check_forward(config: GPTConfig, device: torch.device) -> dict[str, float]:
    model = scrambled(config, "cpu")
    idx = torch.randint(0, config.vocab_size, (4, config.sequence_len))
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(idx)
        gpu = model.to(device)
        fp32 = gpu(idx.to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            bf16 = gpu(idx.to(device))
    return {"forward_fp32_vs_fp64": relative(fp32, ref), "forward_bf16_vs_fp64": relative(bf16, ref)}


def check_kv_cache(config: GPTConfig, device: torch.device) -> dict[str, float]:
    model = scrambled(config, device)
    idx = torch.randint(0, config.vocab_size, (2, 48), device=device)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, batch_size=2, max_len=64)
        rows = [model.forward_cached(idx[:, :32], cache)]
        rows += [model.forward_cached(idx[:, t : t + 1], cache) for t in range(32, 48)]
    return {"kv_cache_fp32_vs_full": relative(torch.cat(rows, dim=1), full)}


def check_paged(config: GPTConfig, device: torch.device) -> dict[str, float]:
    """Two sequences: a prompt prefilled in two chunks, then teacher-forced decodes of both together; last
    with the window layers' KV in a pool of their own, whose blocks behind the window are given back."""
    model = scrambled(config, device)
    window = max(w for w in model.window_sizes if w is not None)
    tokens = torch.randint(0, config.vocab_size, (2, 64)).tolist()
    with torch.no_grad():
        refs = [model(torch.tensor([t], device=device))[0] for t in tokens]
    results = {}
    for dtype, attention, window_pool in (("float32", "sdpa", False), ("float32", "flex", False),
                                          ("bfloat16", "auto", False), ("bfloat16", "auto", True)):
        runner = ModelRunner(copy.deepcopy(model), num_blocks=16, block_size=16, device=device, dtype=dtype,
                             attention=attention, num_window_blocks=16 if window_pool else 0)
        seqs = [Sequence(t[:40]) for t in tokens]
        for i, seq in enumerate(seqs):
            seq.block_table = list(range(8 * i, 8 * i + 4))
            seq.window_table = list(range(8 * i + 4, 8 * i + 8)) if window_pool else []
        got: list[list[torch.Tensor]] = [[], []]
        first = runner.run([PrefillChunk(s, 0, 24, samples=False) for s in seqs], []).sampled
        assert first.shape[0] == 0
        last = runner.run([PrefillChunk(s, 24, 16, samples=True) for s in seqs], []).sampled
        for i, seq in enumerate(seqs):
            got[i].append(last[i])
            seq.num_cached_tokens = len(seq)
        while len(seqs[0]) < 64:
            for i, seq in enumerate(seqs):
                seq.token_ids.append(tokens[i][len(seq)])
                behind = max(0, seq.num_cached_tokens - window) // 16 if window_pool else 0
                seq.window_table[:behind] = [-1] * behind  # as the block manager gives them back
            rows = runner.run([], seqs).sampled
            for i, seq in enumerate(seqs):
                got[i].append(rows[i])
                seq.num_cached_tokens += 1
        stacked = torch.cat([torch.stack(g) for g in got])
        expected = torch.cat([ref[39:] for ref in refs])
        name = f"paged_{dtype}_{runner.attention}{'_window_pool' if window_pool else ''}_vs_full_fp32"
        results[name] = relative(stacked, expected)
    return results


def check_train_step(config: GPTConfig, device: torch.device) -> dict[str, float]:
    """The same optimizer step on the CPU in float32 and on the device as training runs it there."""
    idx = torch.randint(0, config.vocab_size, (4, config.sequence_len + 1))
    batch = (idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
    before = scrambled(config, "cpu").train()
    outcomes = {}
    for where in ("cpu", device.type):
        dev = torch.device(where)
        model = copy.deepcopy(before).to(dev).train()
        optimizers = build_optimizers(model, OptimConfig())
        loader = iter([(batch[0].to(dev), batch[1].to(dev))])
        loss, _ = optimizer_step(model, model, optimizers, loader, 1, Worker(0, 1, dev))
        delta = torch.cat([(p.detach().cpu().double() - q.detach().double()).flatten()
                           for p, q in zip(model.parameters(), before.parameters(), strict=True)])
        outcomes[where] = (loss.item(), delta)
    (cpu_loss, cpu_delta), (dev_loss, dev_delta) = outcomes["cpu"], outcomes[device.type]
    return {"train_loss_rel_diff": abs(dev_loss - cpu_loss) / abs(cpu_loss),
            "train_update_vs_cpu_fp32": relative(dev_delta, cpu_delta)}


# ------------------------------------------------------------------------------------------ throughput


def random_batches(vocab: int, rows: int, seq_len: int, device: torch.device, n: int) -> Iterator:
    batches = [torch.randint(0, vocab, (rows, seq_len + 1), device=device) for _ in range(n)]
    while True:
        for b in batches:
            yield b[:, :-1].contiguous(), b[:, 1:].contiguous()


def time_attention(rows: int, seq_len: int, n_head: int, head_dim: int, steps: int,
                   device: torch.device) -> dict[str, Any]:
    """Seconds per call of one layer's attention (forward and backward where the device has FlexAttention's
    backward) in bfloat16 on a GPU: a window of a quarter of the context through FlexAttention and through
    SDPA's dense mask, and full causal attention through SDPA."""
    window = seq_len // 4
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backward = device.type == "cuda"
    q, k, v = (torch.randn(rows, seq_len, n_head, head_dim, device=device, dtype=dtype, requires_grad=backward)
               for _ in range(3))
    block_mask = window_block_mask(seq_len, window, device)

    def timed(fn: Callable[[], torch.Tensor]) -> float:
        for _ in range(2):  # compiles FlexAttention at the first call
            run_once(fn)
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            run_once(fn)
        sync(device)
        return (time.perf_counter() - started) / steps

    def run_once(fn: Callable[[], torch.Tensor]) -> None:
        with torch.set_grad_enabled(backward):
            y = fn()
            if backward:
                y.sum().backward()

    flex = timed(lambda: causal_attention(q, k, v, window, block_mask))
    sdpa = timed(lambda: causal_attention(q, k, v, window))
    causal = timed(lambda: causal_attention(q, k, v, None))
    return {"rows": rows, "seq_len": seq_len, "window": window, "backward": backward, "dtype": str(dtype),
            "window_flex_seconds": flex, "window_sdpa_seconds": sdpa, "causal_sdpa_seconds": causal,
            "sdpa_over_flex": sdpa / flex, "causal_sdpa_over_window_flex": causal / flex}


def time_training(config: GPTConfig, rows: int, steps: int, warmup: int, compile: bool, device: torch.device,
                  fp8: bool = False, rows_per_step: int = 0) -> dict[str, Any]:
    """The trainer's optimizer step at `rows` x config.sequence_len tokens: tokens/s, MFU, peak memory.
    fp8: the Linear layers in FP8 (trainer/fp8.py). rows 0: the most of rows_per_step's divisors that fit the
    GPU, measured as train.device_batch_size=0 measures them (trainer/batch_size.py)."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    model.init_weights()
    model.train()
    if fp8:
        fp8_training.require_device(device)
        fp8_training.convert(model)
    optimizers = build_optimizers(model, OptimConfig())
    forward = compiled(model, compile, device)  # as the training loop does
    worker = Worker(0, 1, device)
    if rows == 0:
        rows = choose_rows(forward, model, config.sequence_len, config.vocab_size, rows_per_step, device,
                           worker.autocast, ddp=False)
    loader = random_batches(config.vocab_size, rows, config.sequence_len, device, 4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(warmup):
        optimizer_step(forward, model, optimizers, loader, 1, worker)
    sync(device)
    warm_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        loss, _ = optimizer_step(forward, model, optimizers, loader, 1, worker)
    sync(device)
    seconds = (time.perf_counter() - started) / steps
    tokens_per_second = rows * config.sequence_len / seconds
    peak = peak_flops(device)
    result = {"depth": config.n_layer, "window_pattern": config.window_pattern, "attention": config.attention,
              "params": model.num_params(), "compiled": compile, "fp8": fp8, "rows": rows,
              "seq_len": config.sequence_len, "step_seconds": seconds, "tokens_per_second": tokens_per_second,
              "warmup_seconds": warm_seconds, "loss": loss.item()}
    if peak:  # MFU against the bf16 peak, FP8 runs included (nanochat's convention)
        result["mfu_percent"] = 100 * model.estimate_flops() * tokens_per_second / peak
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, optimizers, forward
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def stdlib_text(max_chars: int) -> list[str]:
    """About max_chars of the tiny preset's corpus (whole standard-library files), to train a tokenizer on."""
    texts, total = [], 0
    for text in stdlib_documents():
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return texts


# peak memory bandwidth, bytes/s, by a part of the device's name (the first that matches): the decode roofline
PEAK_BANDWIDTH = [("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H200", 4.8e12),
                  ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
                  ("L4", 0.3e12), ("A10G", 0.6e12), ("B200", 8.0e12)]


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bandwidth for key, bandwidth in PEAK_BANDWIDTH if key in name), None)


def decode_step_bytes(model: GPT, kv_dtype: torch.dtype, contexts: list[int]) -> int:
    """What one decode step of sequences with these contexts reads: every weight but the embedding tables
    (of which a step reads only its rows) once for the whole batch, and each sequence's keys and values: its
    whole context in a full-context layer, its last window (and the new token) in a window layer."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in embeddings)
    per_token = 2 * model.config.n_kv_head * model.config.head_dim * torch.tensor([], dtype=kv_dtype).element_size()
    kv = sum(per_token * (n if w is None else min(n, w + 1)) for n in contexts for w in model.window_sizes)
    return weights + kv


def time_serving(model: GPT, tokenizer: Tokenizer, dtype: str, enforce_eager: bool, attention: str, requests: int,
                 prompt_len: int, max_tokens: int, device: torch.device, compile_decode: bool = False,
                 async_scheduling: bool = False) -> dict[str, Any]:
    block_size = 16
    per_request = -(-(prompt_len + max_tokens) // block_size)
    engine = LLMEngine(copy.deepcopy(model), tokenizer, num_blocks=requests * per_request + 8, block_size=block_size,
                       max_num_seqs=requests, max_num_batched_tokens=max(2048, prompt_len), device=device,
                       dtype=dtype, enforce_eager=enforce_eager, attention=attention, compile_decode=compile_decode,
                       async_scheduling=async_scheduling)
    step_syncs = count_step_syncs(engine) if async_scheduling and device.type == "cuda" else None
    plain = tokenizer.vocab_size - 16  # below the special tokens
    generator = torch.Generator().manual_seed(1)

    def run(n: int) -> tuple[float, int, float]:
        for i in range(n):
            prompt = torch.randint(0, plain, (prompt_len,), generator=generator).tolist()
            engine.add_request(f"r{i}-{time.monotonic_ns()}", prompt,
                               SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens))
        started, first_token, generated = time.perf_counter(), None, 0
        while engine.has_work():
            events = engine.step()
            generated += sum(1 for e in events if e.token_id is not None)
            if first_token is None and generated:
                first_token = time.perf_counter() - started
        sync(device)
        return time.perf_counter() - started, generated, first_token or 0.0

    run(min(requests, 4))  # warm-up: allocator, kernels
    seconds, generated, ttft = run(requests)
    alone_seconds, alone_generated, alone_ttft = run(1)
    # the lone request's decode: the steps after its first token, at its mean context
    decode_steps_per_second = (alone_generated - 1) / (alone_seconds - alone_ttft)
    step_bytes = decode_step_bytes(engine.runner.model, engine.runner.cache.k.dtype,
                                   [prompt_len + alone_generated // 2])
    peak = peak_bandwidth(device)
    graphs = engine.runner.graphs
    return {"dtype": dtype, "attention": engine.runner.attention, "cuda_graphs": graphs is not None,
            "compiled_decode": graphs is not None and graphs.compiled, "async_scheduling": async_scheduling,
            "step_syncs": None if step_syncs is None else len(step_syncs),
            "first_step_sync": step_syncs[0] if step_syncs else None,
            "requests": requests, "prompt_len": prompt_len, "max_tokens": max_tokens,
            "seconds": seconds, "output_tokens": generated, "output_tokens_per_second": generated / seconds,
            "total_tokens_per_second": (generated + requests * prompt_len) / seconds, "first_token_seconds": ttft,
            "single_request_tokens_per_second": alone_generated / alone_seconds,
            "single_request_decode_tokens_per_second": decode_steps_per_second,
            "single_request_decode_bytes_per_step": step_bytes,
            "single_request_decode_bytes_per_second": step_bytes * decode_steps_per_second,
            "single_request_bandwidth_utilisation": None if peak is None else step_bytes * decode_steps_per_second / peak}


def check_kv_memory(model: GPT, tokenizer: Tokenizer, device: torch.device, requests: int) -> dict[str, Any]:
    """The KV cache serve sizes with kv_cache_memory_fraction unset (0.9 of the free memory on a GPU; on a
    CPU, where unset means num_blocks, 0.001 of the RAM available), twice: an engine serves `requests`
    requests and is dropped, then another is sized. A checkpoint reload that drains the old engine first
    relies on the second finding the first one's memory (its pools and CUDA graphs) free again."""
    fraction = None if device.type == "cuda" else 0.001
    blocks = []
    for _ in range(2):
        engine = build_engine(copy.deepcopy(model), tokenizer, str(device), num_blocks=16,
                              kv_cache_memory_fraction=fraction, max_num_seqs=requests, dtype="bfloat16")
        for i in range(requests):
            engine.add_request(f"r{i}", [1 + i, 2, 3], SamplingParams(temperature=0.0, max_tokens=8))
        while engine.has_work():
            engine.step()
        blocks.append(engine.block_manager.num_blocks)
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"fraction": resolve_kv_memory_fraction(fraction, device), "blocks": blocks[0],
            "tokens": blocks[0] * 16, "again_over_first": blocks[1] / blocks[0]}


def count_step_syncs(engine: LLMEngine) -> list[str]:
    """Record every stream sync the engine's step launches and reads make (torch's sync debug mode, as
    warnings): with async scheduling one that waits for the queue serialises the steps it should overlap."""
    syncs: list[str] = []

    def recording(method: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any) -> Any:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return method(*args)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    syncs.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))

        return recorded

    engine._launch, engine._resolve = recording(engine._launch), recording(engine._resolve)
    return syncs


# ------------------------------------------------------------------------------------------------ main


class Results(dict):
    """Every figure, by section; written to `path` (when given) after each section, so that a run stopped at
    its time limit still leaves what it measured."""

    def __init__(self, path: Path | None, **fields: Any):
        super().__init__(**fields)
        self.path = path

    def save(self) -> None:
        if self.path:
            self.path.write_text(json.dumps(self, indent=2, default=str))


def section(name: str, results: Results, fn: Callable[[], Any]) -> None:
    started = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as error:  # a failing section must not cost the rest of the lease
        traceback.print_exc()
        results[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    results.save()
    print(f"[{time.perf_counter() - started:6.1f}s] {name}: {json.dumps(results[name], default=str)}", flush=True)


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks are fp32; bf16 runs use autocast
    torch.backends.cudnn.allow_tf32 = False
    small = args.small or device.type == "cpu"
    results = Results(args.json, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      torch=torch.__version__)
    check_config = GPTConfig(sequence_len=128, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                             window_pattern="SL")
    wanted = set(args.only.split(",")) if args.only else {"checks", "attention", "train", "serve"}
    if "checks" in wanted:
        section("forward", results, lambda: check_forward(check_config, device))
        section("kv_cache", results, lambda: check_kv_cache(check_config, device))
        section("paged", results, lambda: check_paged(check_config, device))
        section("train_step", results, lambda: check_train_step(check_config, device))

    # eager training and serving first, the compiled runs (slow to compile) last
    depths = [] if "train" not in wanted else args.depths if args.depths is not None else ([2] if small else [12, 20])
    vocab, seq_len, rows, steps = (512, 128, 4, 3) if small else (32768, 2048, args.rows, 10)

    def train(depth: int, compile: bool, fp8: bool = False) -> None:
        config = GPTConfig.from_depth(depth, vocab, seq_len)
        section(f"train_d{depth}{'_compiled' if compile else ''}{'_fp8' if fp8 else ''}", results,
                lambda: time_training(config, rows, steps, 2, compile, device, fp8=fp8))

    if "attention" in wanted:
        attention_shape = (2, 256, 4, 64) if small else (rows, seq_len, 10, 128)  # d20: 10 heads of 128
        section("attention_window", results, lambda: time_attention(*attention_shape, steps, device))
    if "attention" in wanted and device.type == "cuda":  # flex cannot train on a CPU, and auto is SDPA there
        # whole training steps of an SSSL stack whose S layers go through FlexAttention (auto) or SDPA
        for attention in ("sdpa", "auto"):
            section(f"train_d12_sssl_{attention}", results,
                    lambda a=attention: time_training(
                        GPTConfig.from_depth(12, vocab, seq_len, window_pattern="SSSL", attention=a),
                        rows, steps, 2, False, device))
        sdpa, flex = results["train_d12_sssl_sdpa"], results["train_d12_sssl_auto"]
        if "step_seconds" in sdpa and "step_seconds" in flex:
            results["train_d12_sssl_sdpa_over_flex"] = sdpa["step_seconds"] / flex["step_seconds"]
            results.save()
            print(f"train d12 SSSL step, sdpa / flex: {results['train_d12_sssl_sdpa_over_flex']:.3f}", flush=True)

    for depth in depths:
        train(depth, compile=False)

    serve_depth, serve_vocab, requests, prompt_len, max_tokens = (2, 512, 4, 32, 16) if small else (20, 8192, 64, 512, 256)
    tokenizer = Tokenizer.train_from_iterator(stdlib_text(200_000 if small else 3_000_000), serve_vocab)
    serve_model = scrambled(GPTConfig.from_depth(serve_depth, tokenizer.vocab_size, 2048), "cpu")
    # decodes replay CUDA graphs on a GPU; the eager runs beside them give the ratio, the gather path
    # (sdpa) beside FlexAttention over the pools (flex, what auto picks on a GPU) the attention's, the
    # graphs of the compiled decode step (serve.compile_decode) the compiler's, and async scheduling the overlap's
    runs = (("float32", False, "auto", False, False), ("bfloat16", False, "sdpa", False, False),
            ("bfloat16", False, "flex", False, False), ("bfloat16", True, "flex", False, False),
            ("bfloat16", False, "flex", True, False), ("bfloat16", False, "flex", False, True),
            ("bfloat16", False, "flex", True, True))
    if "serve" in wanted:
        section("kv_cache_memory", results, lambda: check_kv_memory(serve_model, tokenizer, device, 8))
    if "serve" in wanted:  # a step's prefill chunks packed back to back against rows padded to the longest
        section(f"prefill_d{serve_depth}_packed_vs_padded", results, lambda: prefill.compare(
            serve_model, 8, 64 if small else 2048, 5, device, "auto"))
    for dtype, eager, attention, compile_decode, overlap in runs if "serve" in wanted else ():
        name = (f"serve_d{serve_depth}_{dtype}_{attention}{'_eager' if eager else ''}"
                f"{'_compiled' if compile_decode else ''}{'_async' if overlap else ''}")
        section(name, results, lambda dt=dtype, e=eager, a=attention, c=compile_decode, o=overlap: time_serving(
            serve_model, tokenizer, dt, e, a, requests, prompt_len, max_tokens, device, compile_decode=c,
            async_scheduling=o))

    for depth in [] if args.no_compile else depths:
        train(depth, compile=True)
    if args.fp8 and fp8_training.device_problem(device):
        print(f"FP8 rows skipped: {fp8_training.device_problem(device)}")
    for depth in depths if args.fp8 and not fp8_training.device_problem(device) else []:
        train(depth, compile=not args.no_compile, fp8=True)

    print_table(results)


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{results['device']}, torch {results['torch']}")
    for name, value in results.items():
        if not isinstance(value, dict):
            continue
        figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
        print(f"{name:24s} {figures}")


if __name__ == "__main__":
    main()
