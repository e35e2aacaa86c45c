"""Bits per byte: the formula by hand, what it leaves out, that training lowers it, autocast, and the
sum over ranks."""

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from tests.support.ranks import run_ranks
from trainer.evals.loss import evaluate_bpb

B, T = 4, 64


@functools.cache
def corpus_and_tokenizer(path: Path) -> tuple[list[int], Tokenizer]:
    text = path.read_text(encoding="utf-8")[:200_000]
    tokenizer = Tokenizer.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], vocab_size=512)
    docs = [text[i : i + 400] for i in range(0, len(text), 400)]  # short: batches cross document boundaries
    ids = [i for row in tokenizer.encode(docs, prepend=tokenizer.get_bos_token_id()) for i in row]
    return ids, tokenizer


@pytest.fixture
def corpus(shared_data: Path) -> tuple[list[int], Tokenizer]:
    return corpus_and_tokenizer(shared_data / "tinyshakespeare.txt")


def byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """Bytes per token id; the special tokens stand for none."""
    return torch.tensor([len(tokenizer.id_to_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=torch.int32)


def batches(ids: list[int], start: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n batches of (inputs, targets) (B, T) from consecutive windows of the token stream."""
    data = torch.tensor(ids[start : start + n * B * T + 1])
    return [(data[k * B * T : (k + 1) * B * T].view(B, T).clone(),
             data[k * B * T + 1 : (k + 1) * B * T + 1].view(B, T).clone()) for k in range(n)]


def tiny_gpt(vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=T, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    return model.eval()


def test_bpb_is_nats_over_ln2_bytes_of_counted_targets(corpus):
    ids, tokenizer = corpus
    table = byte_lengths(tokenizer)
    model = tiny_gpt(tokenizer.vocab_size, seed=1)
    with torch.no_grad():  # perturb the zero-initialised projections so that losses differ per token
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = batches(ids, 0, 2)
    data[1][1][0, :10] = -1  # ignored targets (a masked prompt, say)
    bos = tokenizer.get_bos_token_id()
    assert any((y == bos).any() for _, y in data), "the batches should hold a document boundary"

    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for x, y in data:
            logp = F.log_softmax(model(x).double(), dim=-1)
            for b in range(B):
                for t in range(T):
                    target = int(y[b, t])
                    if target >= 0 and table[target] > 0:  # BOS and ignored targets are left out
                        nats -= float(logp[b, t, target])
                        n_bytes += int(table[target])
    expected = nats / (math.log(2) * n_bytes)
    assert evaluate_bpb(model, iter(data), 2, table) == pytest.approx(expected, rel=1e-5)
    assert evaluate_bpb(model, iter(data), 1, table) != pytest.approx(expected, rel=1e-5)  # steps bounds the batches


def test_untrained_model_is_uniform_and_training_lowers_bpb(corpus):
    ids, tokenizer = corpus
    table = byte_lengths(tokenizer)
    val = batches(ids, len(ids) - 4 * B * T - 1, 4)
    model = tiny_gpt(tokenizer.vocab_size)
    # nanochat's init gives near-uniform logits: ln V nats per counted token
    counted = [y[table[y] > 0] for _, y in val]
    uniform = sum(len(c) for c in counted) * math.log(tokenizer.vocab_size) / (
        math.log(2) * sum(int(table[c].sum()) for c in counted))
    before = evaluate_bpb(model, iter(val), 4, table)
    assert before == pytest.approx(uniform, rel=0.01)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for x, y in batches(ids, 0, 40):
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = evaluate_bpb(model.eval(), iter(val), 4, table)
    assert after < 0.9 * before, (before, after)  # about 0.8 here

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert evaluate_bpb(model, iter(val), 4, table) == pytest.approx(after, rel=0.02)


def _rank_main(rank: int, world: int, store: str, weights: str, vocab_size: int, shards: list, table, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = tiny_gpt(vocab_size)
        model.load_state_dict(torch.load(weights))
        bpb = evaluate_bpb(model, iter(shards[rank]), len(shards[rank]), table)
        Path(f"{out}.{rank}").write_text(json.dumps(bpb))
    finally:
        dist.destroy_process_group()


def test_ranks_sum_their_batches(corpus, tmp_path):
    """Two ranks with one and three batches return the bpb of all four batches, not a mean of means."""
    ids, tokenizer = corpus
    table = byte_lengths(tokenizer)
    model = tiny_gpt(tokenizer.vocab_size, seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    data = batches(ids, 0, 4)
    expected = evaluate_bpb(model, iter(data), 4, table)
    shards = [data[:1], data[1:]]
    args = (str(tmp_path / "store"), str(tmp_path / "weights.pt"), tokenizer.vocab_size, shards, table, str(tmp_path / "out"))
    run_ranks(_rank_main, args)
    got = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in range(2)]
    assert got == [pytest.approx(expected, rel=1e-6)] * 2
    single = evaluate_bpb(model, iter(data[:1]), 1, table)
    assert single != pytest.approx(expected, rel=1e-3)  # the first rank alone would have said something else
