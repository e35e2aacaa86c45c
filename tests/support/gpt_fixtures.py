"""Tiny GPTs with random weights everywhere, for tests whose point needs every path of the model to matter:
comparisons of two computations of the same logits (a cache against recomputing, torch against JAX), and
engines and evals whose output must depend on the prompt and the seed."""

import torch

from nanochat.gpt import GPT, GPTConfig


def scrambled_model(config: GPTConfig, seed: int = 0, scale: float = 1.0) -> GPT:
    """Random weights everywhere, in eval mode: nanochat's init zeroes the output projections, which would
    let a comparison pass without any attention (or MLP) happening, and would make the model ignore its
    context. Each matrix is drawn with std scale / sqrt(fan_in); scale 2 gives logits far enough apart that
    different prompts and seeds give different text. smear (where on) is opened fully."""
    model = GPT(config)
    torch.manual_seed(seed)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, scale * p.size(1) ** -0.5)
        if model.smear_lambda is not None:
            model.smear_lambda.fill_(1.0)  # it starts at zero, where smear would change nothing
    return model.eval()
