"""
Does the pretraining data path keep up with a GPU? Encoding throughput per core, HF `tokenizers` against
tiktoken built from the same tokenizer.json (nanochat/tiktoken_bpe.py), side by side in one run, set
against the tokens/s one GPU worker consumes at the d20 and d24 presets.

Measured on this Python's standard library sources (no download), with a tokenizer trained on them at
the presets' vocabulary size:
- the loader's own encode call: trainer/data/loader.py's `tokenizer.encode(chunk, prepend=bos)`, each
  document cut as the loader cuts it (16 x (seq_len + 1) characters), tokenizer_batch documents a call;
- the whole loader (reading a local parquet shard, encoding, best-fit packing, tensors) at the preset's
  rows x seq_len, warmed up until its document buffer is full.
Figures per core are per CPU-second (all threads counted), the steady figure on a shared machine.
Then the stall: the seconds the training thread waits in next(loader) per d20 micro-batch while the GPU's
time for that micro-batch is simulated by sleeping (the GIL released, as while CUDA kernels run), with the
loader synchronous (prefetch=0, every micro-batch waited on: the worst case, the real loop exposes the
first of each step) and with the training loader's prefetch (trainer/stages/base.py TRAIN_PREFETCH).

What a GPU consumes: the model's training FLOPs per token (GPT.estimate_flops) at --mfu of an H100's
dense bf16 peak. Cores per GPU worker: CPU limit / GPUs of the worker pods in k8s/speedrun-job.yaml and
in the Helm chart's training values. Printed: headroom = tokens/s per core x cores per worker / tokens/s
the GPU consumes; below 1 the GPU waits for text.

    .venv/bin/python -m bench.data_path [--mb 5] [--batches 4] [--repeats 3] [--mfu 0.5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from bench.tokenizer import stdlib_documents
from nanochat.config import load_config
from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from services.storage import LocalStorage
from trainer.data.loader import MAX_CHARS_PER_TOKEN, DataLoader
from trainer.stages.base import TRAIN_PREFETCH, model_config
from trainer.worker import PEAK_FLOPS

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("d20", "d24")
TOKENIZER_BATCH = 128  # DataLoader's default tokenizer_batch


def cpu_seconds(repeats: int, fn: Callable[[], object]) -> tuple[float, object]:
    """Fewest CPU seconds (all threads) of `repeats` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        c0 = time.process_time()
        result = fn()
        best = min(best, time.process_time() - c0)
    return best, result


def cores_per_worker() -> dict[str, float]:
    """CPUs per GPU of the training worker pods: the RayJob manifest's and the Helm chart's defaults."""
    job = next(d for d in yaml.safe_load_all((ROOT / "k8s/speedrun-job.yaml").read_text()) if d and d.get("kind") == "RayJob")
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    helm = yaml.safe_load((ROOT / "helm/nanochat/values.yaml").read_text())["training"]["workers"]
    return {
        "k8s/speedrun-job.yaml": float(limits["cpu"]) / float(limits["nvidia.com/gpu"]),
        "helm training.workers": float(helm["resources"]["limits"]["cpu"]) / helm["gpus"],
    }


def gpu_tokens_per_second(preset: str, vocab_size: int, mfu: float) -> tuple[float, int, int]:
    """(tokens/s one H100 trains at `mfu`, rows per micro-batch, seq_len) for a preset."""
    cfg = load_config(preset=preset)
    with torch.device("meta"):  # shapes only
        flops = GPT(model_config(cfg, vocab_size)).estimate_flops()
    return mfu * PEAK_FLOPS["H100"] / flops, cfg.train.device_batch_size, cfg.train.seq_len


def encode_call(tok: Tokenizer, docs: list[str], seq_len: int) -> list[list[int]]:
    """The loader's encode calls over every document (cut as the loader cuts them)."""
    cut = [d[: MAX_CHARS_PER_TOKEN * (seq_len + 1)] for d in docs]
    bos, ids = tok.get_bos_token_id(), []
    for i in range(0, len(cut), TOKENIZER_BATCH):
        ids += tok.encode(cut[i : i + TOKENIZER_BATCH], prepend=bos)
    return ids


def loader_tokens_per_cpu_second(tok: Tokenizer, shard: Path, rows: int, seq_len: int, batches: int) -> float:
    """Tokens/s per core of the whole loader after its buffer filled (the first batch fills it)."""
    loader = DataLoader(LocalStorage(shard.parent), [shard.name], tok, batch_size=rows, seq_len=seq_len)
    next(loader)
    seconds, _ = cpu_seconds(1, lambda: [next(loader) for _ in range(batches)])
    return batches * rows * seq_len / seconds


def wait_per_batch(tok: Tokenizer, shard: Path, rows: int, seq_len: int, batches: int, gpu_seconds: float,
                   prefetch: int) -> float:
    """Mean wall seconds next(loader) takes while a GPU needing gpu_seconds a batch is simulated by sleeping."""
    loader = DataLoader(LocalStorage(shard.parent), [shard.name], tok, batch_size=rows, seq_len=seq_len,
                        prefetch=prefetch)
    next(loader)  # fills the buffer
    time.sleep(gpu_seconds)
    waited = 0.0
    for _ in range(batches):
        start = time.perf_counter()
        next(loader)
        waited += time.perf_counter() - start
        time.sleep(gpu_seconds)
    return waited / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=5.0, help="MB of stdlib source to train on and encode")
    parser.add_argument("--batches", type=int, default=4, help="loader batches timed after warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="encode timings are the best of this many runs")
    parser.add_argument("--mfu", type=float, default=0.5, help="model FLOPs utilisation assumed for the GPU")
    args = parser.parse_args()

    cfg = load_config(preset=PRESETS[0])
    vocab_size, seq_len = cfg.tokenizer.vocab_size, cfg.train.seq_len
    docs = stdlib_documents(args.mb)
    spec = Tokenizer.train_from_iterator(docs, vocab_size).to_json()
    tokenizers = {"HF": Tokenizer.from_json(spec, use_tiktoken=False), "tiktoken": Tokenizer.from_json(spec)}
    assert tokenizers["tiktoken"].encoder == "tiktoken", "the trained tokenizer did not convert"
    mb = sum(len(d[: MAX_CHARS_PER_TOKEN * (seq_len + 1)].encode("utf-8")) for d in docs) / 1e6
    print(f"text: {len(docs)} stdlib .py files, {mb:.2f} MB as the loader cuts them; vocab {vocab_size}; "
          f"{TOKENIZER_BATCH} documents per encode call")

    encode, ids = {}, {}
    for name, tok in tokenizers.items():
        encode[name], ids[name] = cpu_seconds(args.repeats, lambda tok=tok: encode_call(tok, docs, seq_len))
    n_tokens = sum(map(len, ids["HF"]))
    encode_rate = {name: n_tokens / s for name, s in encode.items()}
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "stdlib.parquet"
        pq.write_table(pa.table({"text": docs}), shard, row_group_size=256)
        consumed, rows, _ = gpu_tokens_per_second(PRESETS[0], vocab_size, args.mfu)
        loader_rate = {name: loader_tokens_per_cpu_second(tok, shard, rows, seq_len, args.batches)
                       for name, tok in tokenizers.items()}
        gpu_seconds = rows * seq_len / consumed
        waits = {(name, prefetch): wait_per_batch(tok, shard, rows, seq_len, args.batches, gpu_seconds, prefetch)
                 for name, tok in tokenizers.items() for prefetch in (0, TRAIN_PREFETCH)}

    print(f"\n{'per core (CPU-second)':<36}{'HF':>12}{'tiktoken':>12}{'tiktoken/HF':>13}")
    for label, amount, digits in (("encode call, MB/s", mb, 2), ("encode call, tokens/s", n_tokens, 0)):
        print(f"{label:<36}{amount / encode['HF']:>12,.{digits}f}{amount / encode['tiktoken']:>12,.{digits}f}"
              f"{encode['HF'] / encode['tiktoken']:>13.2f}")
    print(f"{f'loader {rows}x{seq_len} batches, tokens/s':<36}{loader_rate['HF']:>12,.0f}{loader_rate['tiktoken']:>12,.0f}"
          f"{loader_rate['tiktoken'] / loader_rate['HF']:>13.2f}")
    print(f"identical ids on every file: {ids['HF'] == ids['tiktoken']}")

    cores = cores_per_worker()
    print(f"\nGPU worker: one H100 at {args.mfu:.0%} MFU of {PEAK_FLOPS['H100'] / 1e12:.0f} TFLOP/s; "
          "headroom = tokens/s per core x cores / tokens/s the GPU consumes")
    print(f"{'preset':<8}{'GPU tokens/s':>14}  {'cores per worker':<32}{'encode HF':>10}{'tiktoken':>10}"
          f"{'loader HF':>11}{'tiktoken':>10}")
    for preset in PRESETS:
        consumed, _, _ = gpu_tokens_per_second(preset, vocab_size, args.mfu)
        for source, n in {"one core": 1.0, **cores}.items():
            where = f"{n:g} ({source})"
            print(f"{preset:<8}{consumed:>14,.0f}  {where:<32}"
                  f"{encode_rate['HF'] * n / consumed:>10.2f}{encode_rate['tiktoken'] * n / consumed:>10.2f}"
                  f"{loader_rate['HF'] * n / consumed:>11.2f}{loader_rate['tiktoken'] * n / consumed:>10.2f}")

    print(f"\nstall: a {PRESETS[0]} micro-batch of {rows}x{seq_len} tokens, the GPU's {gpu_seconds:.3f} s for it simulated; "
          "seconds the training thread waits for each batch (share of the GPU's time)")
    for (name, prefetch), wait in waits.items():
        print(f"  {name:<9} prefetch={prefetch}   {wait:.3f} s  ({wait / gpu_seconds:.0%})")


if __name__ == "__main__":
    main()
