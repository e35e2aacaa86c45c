"""Models for tests that compare two computations of the same logits."""

import torch

from nanochat.gpt import GPT, GPTConfig


def scrambled_model(config: GPTConfig, seed: int = 0) -> GPT:
    """Random weights everywhere, in eval mode: nanochat's init zeroes the output projections, which would
    let a comparison pass without any attention (or MLP) happening."""
    model = GPT(config)
    torch.manual_seed(seed)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.size(1) ** -0.5)
    return model.eval()
