"""train.fp8 on a CPU: which layers torchao converts, that weights and checkpoints stay plain, that the FP8
matmuls train close to full precision (torch._scaled_mm runs on a CPU too), and that a stage asked for FP8
anywhere but an FP8-capable GPU stops at its start naming the key and the device."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from nanochat.checkpoint import model_from_checkpoint, read_checkpoint, write_checkpoint
from nanochat.config import ConfigError, load_config
from nanochat.gpt import GPT, GPTConfig
from services.storage import LocalStorage
from trainer import fp8
from trainer.stages.base import BaseStage
from trainer.worker import Worker

pytest.importorskip("torchao")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

# depth 2, width 128 (two heads of 64): every block matmul is 128 x 128 or 128 x 512; layer 1 has a value
# embedding and its gate (12 channels in, 2 heads out)
CONFIG = GPTConfig.from_depth(2, vocab_size=512, sequence_len=64, head_dim=64)
BLOCK_LINEARS = ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def fresh_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    model.init_weights()
    with torch.no_grad():  # nanochat's init zeroes the output projections and all but zeroes the logits,
        nn.init.normal_(model.lm_head.weight, std=0.05)  # which would hide the matmuls from the loss
        for block in model.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, std=0.02)
            nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
    return model


def test_convert_swaps_the_block_matmuls_and_keeps_lm_head_and_the_gate():
    model = fresh_model()
    params = {name: id(p) for name, p in model.named_parameters()}
    converted = fp8.convert(model)
    assert converted == [f"transformer.h.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS]
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert isinstance(module, Float8Linear) == (name in converted), name
    assert type(model.lm_head) is nn.Linear and type(model.transformer.h[1].attn.ve_gate) is nn.Linear
    # the same Parameter objects: optimizers built before the conversion still step them
    assert {name: id(p) for name, p in model.named_parameters()} == params


@pytest.mark.parametrize("shape, fqn, expected", [((128, 128), "x", True), ((128, 512), "x", True),
                                                  ((120, 128), "x", False), ((128, 64), "x", False),
                                                  ((128, 512), "lm_head", False)])
def test_eligible_layers_are_aligned_large_enough_and_not_lm_head(shape, fqn, expected):
    assert fp8.eligible(nn.Linear(*shape, bias=False), fqn) is expected


def test_a_checkpoint_of_an_fp8_model_loads_into_a_plain_one(tmp_path: Path):
    plain = fresh_model()
    model = copy.deepcopy(plain)
    fp8.convert(model)
    state = model.state_dict()
    assert {k: (v.dtype, v.shape) for k, v in state.items()} == {
        k: (v.dtype, v.shape) for k, v in plain.state_dict().items()}
    assert all(type(v) is torch.Tensor for v in state.values())  # no float8 subclass leaks into the file
    write_checkpoint(tmp_path, model_state=state, optimizer_state=None, cursor=None, config={}, rng=None,
                     meta={"model_config": vars(CONFIG)})
    loaded = model_from_checkpoint(read_checkpoint(tmp_path))
    assert all(type(m) is not Float8Linear for m in loaded.modules())
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, plain.state_dict()[name]), name


def test_fp8_matmuls_train_close_to_full_precision():
    """One forward + backward in FP8 against float32: e4m3 keeps 3 mantissa bits, so the loss agrees to about
    a few parts in a thousand and every gradient points the same way; a wrong scale or transpose would not."""
    plain = fresh_model()
    model = copy.deepcopy(plain)
    fp8.convert(model)
    tokens = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.sequence_len + 1), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (plain, model):
        loss = m(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.005)
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        ref = grads[name].grad
        if p.ndim == 2:  # the matrices (the scalars' gradients are too small to compare)
            assert torch.cosine_similarity(p.grad.flatten(), ref.flatten(), dim=0) > 0.98, name
    # and the quantisation is real: FP8 gradients differ from float32 ones
    assert not torch.equal(model.transformer.h[0].attn.c_q.weight.grad, plain.transformer.h[0].attn.c_q.weight.grad)


def test_fp8_needs_an_fp8_gpu_and_says_which_device_it_found():
    with pytest.raises(ValueError, match=r"train\.fp8 .*compute capability 8\.9.*device is cpu"):
        fp8.require_device(torch.device("cpu"))


def test_base_stage_asked_for_fp8_on_a_cpu_worker_stops_at_its_start(tmp_path: Path):
    # the config passes (it promises GPU workers); the worker this stage runs on is a CPU
    cfg = load_config(preset="tiny-cpu", overrides=["train.fp8=true", "train.gpus_per_worker=1"])
    with pytest.raises(ValueError, match=r"train\.fp8 .*device is cpu"):
        BaseStage(cfg, Worker(0, 1, torch.device("cpu")), LocalStorage(tmp_path), None)


@pytest.mark.parametrize("overrides, found", [
    (["train.fp8=true"], "CPU workers"),
    (["train.fp8=true", "train.gpus_per_worker=1", "train.backend=jax"], "JAX backend"),
])
def test_config_refuses_fp8_without_gpu_workers(overrides, found):
    with pytest.raises(ConfigError, match=rf"train\.fp8 needs torch GPU workers.*{found}"):
        load_config(preset="tiny-cpu", overrides=overrides)
