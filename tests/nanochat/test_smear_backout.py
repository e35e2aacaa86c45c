"""smear and backout (nanochat/gpt.py, config keys model.smear and model.backout): optional, off by default.
Their agreement of the cached and full forwards is in test_gpt.py, test_generate.py and the serving tests."""

import pytest
import torch

from nanochat.checkpoint import model_from_checkpoint, read_checkpoint, write_checkpoint
from nanochat.config import load_config
from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import KVCache
from tests.support.gpt_fixtures import scrambled_model as scrambled

VOCAB = 97
OPTIONAL = {"smear_gate.weight", "smear_lambda", "backout_lambda"}


def tiny(**overrides) -> GPTConfig:
    fields = dict(sequence_len=32, vocab_size=VOCAB, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
    return GPTConfig(**{**fields, **overrides})


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def with_weights_of(model: GPT, **overrides) -> GPT:
    """A model of model's config plus overrides, holding model's shared weights (its own optional ones at init)."""
    other = GPT(tiny(**overrides))
    other.init_weights()
    other.load_state_dict(model.state_dict(), strict=False)
    return other.eval()


@pytest.mark.parametrize(("keys", "extra"), [({}, set()), ({"smear": True}, {"smear_gate.weight", "smear_lambda"}),
                                             ({"backout": True}, {"backout_lambda"})])
def test_each_key_adds_only_its_own_parameters(keys, extra):
    names = set(GPT(tiny(**keys)).state_dict())
    assert names & OPTIONAL == extra
    assert names - extra == set(GPT(tiny()).state_dict())  # everything else as before: old checkpoints load
    assert load_config("tiny-cpu").model.smear is False and load_config("tiny-cpu").model.backout is False


@torch.no_grad()
def test_smear_at_zero_changes_nothing_and_open_mixes_in_the_previous_token_only():
    plain = scrambled(tiny())
    idx = tokens(2, 24)
    smeared = with_weights_of(plain, smear=True)
    torch.testing.assert_close(smeared(idx), plain(idx), rtol=0, atol=0)  # smear_lambda starts at 0: off
    smeared.smear_lambda.fill_(1.0)
    out, expected = smeared(idx), plain(idx)
    torch.testing.assert_close(out[:, 0], expected[:, 0], rtol=0, atol=0)  # nothing before the first token
    assert (out[:, 1:] - expected[:, 1:]).abs().amax(dim=-1).min() > 1e-3
    # after smear, position t holds tokens t and t - 1 alone: changing token 0 changes position 1, not 2 onwards
    other = idx.clone()
    other[:, 0] = (other[:, 0] + 1) % VOCAB
    x, y = (smeared._smear(smeared.norm(smeared.transformer.wte(t)), None) for t in (idx, other))
    assert torch.equal(x[:, 2:], y[:, 2:]) and not torch.equal(x[:, 1], y[:, 1])


@torch.no_grad()
def test_backout_subtracts_a_share_of_the_middle_layers_stream():
    plain = scrambled(tiny())
    backed = with_weights_of(plain, backout=True)
    assert backed.backout_lambda.item() == pytest.approx(0.2)  # nanochat's init
    idx = tokens(2, 24)
    assert (backed(idx) - plain(idx)).abs().amax() > 1e-3
    backed.backout_lambda.zero_()
    torch.testing.assert_close(backed(idx), plain(idx), rtol=0, atol=0)


def test_a_tiny_model_with_both_trains_and_both_learn():
    torch.manual_seed(0)
    model = GPT(tiny(smear=True, backout=True))
    model.init_weights()
    idx = tokens(4, 32)
    targets = idx.roll(-1, 1)  # learnable: the next token of the same rows
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert model.smear_lambda.item() != 0.0 and model.backout_lambda.item() != pytest.approx(0.2)


@torch.no_grad()
def test_a_checkpoint_round_trips_the_keys_and_the_weights(tmp_path):
    model = scrambled(tiny(smear=True, backout=True))
    write_checkpoint(tmp_path, model_state=model.state_dict(), optimizer_state=None, cursor=None, config={}, rng=None,
                     meta={"model_config": vars(model.config)})
    loaded = model_from_checkpoint(read_checkpoint(tmp_path, load_optimizer=False))
    assert (loaded.config.smear, loaded.config.backout) == (True, True)
    idx = tokens(2, 20)
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


def test_the_cached_path_of_a_smear_model_needs_the_token_before():
    model = scrambled(tiny(smear=True))
    cache = KVCache.for_model(model, batch_size=1)
    with pytest.raises(ValueError, match="prev_idx"):
        model.forward_cached(tokens(1, 4), cache)
