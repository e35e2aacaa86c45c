"""
FP8 matmuls for base pretraining (train.fp8), through torchao's float8 training.

Notable:
- the model's Linear layers become torchao Float8Linear modules in place: each matmul (forward, and both
  backward ones) casts its operands to float8 with one dynamic scale per tensor ("tensorwise", the recipe
  nanochat's record run uses; it needs no extra collectives under DDP) and runs on the GPU's FP8 tensor
  cores; the weights stay the same Parameters in their own dtype, so optimizers, checkpoints (same keys,
  same dtypes) and a plain model loading them are unchanged
- not converted: lm_head (its logits are softcapped and feed the loss in float32, where float8's 3-bit
  mantissa costs most) and layers with a dimension that is not a multiple of 16 (what the FP8 GEMMs
  require) or under 128 (too small for the casts to pay off), as torchao and nanochat filter them
- convert before torch.compile (which fuses the casts into neighbouring kernels; eager FP8 is slower than
  bf16) and before DDP wraps the model
- needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); anywhere else a stage asked
  for it fails at its start with the device it found
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer
ALIGNMENT = 16  # the FP8 GEMMs want both dimensions multiples of 16
MIN_DIM = 128  # smaller matmuls lose more to the casts than FP8 gains
SKIPPED = ("lm_head",)  # kept in bf16: the logits' precision matters most
RECIPE = "tensorwise"


def device_problem(device: torch.device) -> str | None:
    """Why FP8 training cannot run on device; None if it can."""
    if device.type != "cuda":
        return f"train.fp8 needs a CUDA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer; this worker's device is {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"train.fp8 needs a CUDA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
                f"(Ada, Hopper, Blackwell); this worker's {name} has {capability[0]}.{capability[1]}")
    return None


def require_device(device: torch.device) -> None:
    problem = device_problem(device)
    if problem:
        raise ValueError(problem)


def eligible(module: nn.Module, fqn: str) -> bool:
    """Whether torchao should convert this module: a Linear of FP8-friendly shape that is not lm_head."""
    if not isinstance(module, nn.Linear) or fqn in SKIPPED:
        return False
    dims = (module.in_features, module.out_features)
    return all(d % ALIGNMENT == 0 and d >= MIN_DIM for d in dims)


def convert(model: nn.Module) -> list[str]:
    """Swap model's eligible Linear layers for torchao's Float8Linear in place; returns their names."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    names = [fqn for fqn, module in model.named_modules() if eligible(module, fqn)]
    convert_to_float8_training(model, module_filter_fn=eligible, config=Float8LinearConfig.from_recipe_name(RECIPE))
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    log.info("FP8 (%s scaling): %d of %d Linear layers converted", RECIPE, len(names), linears)
    return names
