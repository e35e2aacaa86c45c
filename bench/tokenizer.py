"""
Tokenizer benchmark: ours (HF `tokenizers` training; encoding by tiktoken from its merges, the same ids) against
nanochat's rustbpe (training) + tiktoken (encoding). bench/data_path.py compares our two encoders.

Both train on the same text at the same vocabulary size (special tokens included) with the same split
pattern. The text is this Python's own standard library sources, so the benchmark needs no download.
Encoding is timed one document per call ("single") and as one list ("batched", parallel in both).

    .venv/bin/python bench/tokenizer.py [--vocab-size 4096] [--mb 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import rustbpe
import tiktoken

from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer


def stdlib_documents(mb: float) -> list[str]:
    """About `mb` MB of .py files from the standard library, one document per file, in a fixed order."""
    budget, docs = int(mb * 1e6), []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        budget -= len(text.encode("utf-8"))
        if budget <= 0:
            break
    return docs


def best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, float, object]:
    """Fastest wall time and fastest CPU time (all threads) of `repeats` calls, and the last result.
    CPU time is the steadier figure on a shared machine; wall time shows what parallelism buys."""
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu, result


def train_rustbpe(docs: list[str], vocab_size: int) -> tiktoken.Encoding:
    """As nanochat's RustBPETokenizer: rustbpe learns the merges, tiktoken encodes with them."""
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(docs), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in tok.get_mergeable_ranks()}
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="rustbpe", pat_str=tok.get_pattern(), mergeable_ranks=ranks, special_tokens=specials)


def row(label: str, ours: float, theirs: float, unit: str) -> None:
    print(f"{label:<26}{ours:>12.3f}{theirs:>12.3f}   {unit:<6}{ours / theirs:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--mb", type=float, default=5.0, help="MB of stdlib source to train and encode")
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    args = parser.parse_args()

    docs = stdlib_documents(args.mb)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    mb = n_bytes / 1e6
    threads = os.cpu_count() or 1
    print(f"text: {len(docs)} stdlib .py files, {mb:.2f} MB; vocab {args.vocab_size}; {threads} CPUs")

    train_ours = best_of(args.repeats, lambda: Tokenizer.train_from_iterator(docs, args.vocab_size))
    train_rust = best_of(args.repeats, lambda: train_rustbpe(docs, args.vocab_size))
    ours, enc = train_ours[2], train_rust[2]
    assert ours.vocab_size == enc.n_vocab == args.vocab_size, (ours.vocab_size, enc.n_vocab)

    single_ours = best_of(args.repeats, lambda: [ours.encode(d) for d in docs])
    single_tik = best_of(args.repeats, lambda: [enc.encode_ordinary(d) for d in docs])
    batch_ours = best_of(args.repeats, lambda: ours.encode(docs))
    batch_tik = best_of(args.repeats, lambda: enc.encode_ordinary_batch(docs, num_threads=threads))
    ids_ours, ids_tik = single_ours[2], single_tik[2]
    assert batch_ours[2] == ids_ours and batch_tik[2] == ids_tik
    assert all(ours.decode(ids) == d for ids, d in zip(ids_ours, docs, strict=True))
    n_ours, n_tik = sum(map(len, ids_ours)), sum(map(len, ids_tik))

    print(f"\n{'':<26}{'ours (HF)':>12}{'rustbpe':>12}   {'unit':<6}{'ours/theirs':>8}")
    row("train, wall", train_ours[0], train_rust[0], "s")
    row("train, CPU (all threads)", train_ours[1], train_rust[1], "s")
    print(f"{'':<26}{'+' + ours.encoder:>12}{'+tiktoken':>12}")  # ours encodes with tiktoken from its own merges
    row("encode single", mb / single_ours[0], mb / single_tik[0], "MB/s")
    row("encode batched", mb / batch_ours[0], mb / batch_tik[0], "MB/s")
    row("compression", n_bytes / n_ours, n_bytes / n_tik, "B/tok")
    # ids are numbered differently (HF orders the byte alphabet by symbol), so compare token bytes
    n_ordinary = args.vocab_size - len(SPECIAL_TOKENS)
    same_vocab = {ours.id_to_bytes(i) for i in range(n_ordinary)} == {enc.decode_single_token_bytes(i) for i in range(n_ordinary)}
    pieces_ours = [[ours.id_to_bytes(i) for i in ids] for ids in ids_ours]
    pieces_tik = [[enc.decode_single_token_bytes(i) for i in ids] for ids in ids_tik]
    print(f"same vocabulary (as bytes): {same_vocab}; same segmentation of every file: {pieces_ours == pieces_tik}")

if __name__ == "__main__":
    main()
