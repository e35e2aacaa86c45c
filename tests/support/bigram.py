"""A scripted model for the generation tests (tests/nanochat/test_generate.py, tests/serving/engine/test_llm_engine.py): a real GPT
whose next token depends only on the current one, so a test can say exactly which tokens it writes, when it
stops, and which calculator call it makes, and check the engines' bookkeeping against that script."""

import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer


def bigram_model(tok: Tokenizer, successors: dict[int, int | tuple[int, ...]], default: int) -> GPT:
    """A real GPT whose next token depends only on the current one: successors[token] (a tuple: one
    of them, equally likely), else default.

    With nanochat's init every block starts as the identity (zero output projections), so the final
    hidden state is the normalised token embedding; one-hot embeddings make it sqrt(n_embd) * e_token,
    and lm_head maps each such direction to its successor's logit."""
    V = tok.vocab_size
    n_embd = V + (-V) % 8  # one dimension per token, split into 4 heads of even size
    model = GPT(GPTConfig(sequence_len=64, vocab_size=V, n_layer=2, n_head=4, n_kv_head=4, n_embd=n_embd))
    torch.manual_seed(0)
    model.init_weights()
    with torch.no_grad():
        model.transformer.wte.weight.copy_(torch.eye(V, n_embd))
        head = torch.zeros(V, n_embd)
        for token in range(V):
            head[successors.get(token, default), token] = 1.0  # a tuple index sets each of its rows
        model.lm_head.weight.copy_(head)  # logit sqrt(n_embd) ~ 17, softcapped to ~14, the others 0
    return model.eval()


def chain(*tokens: int) -> dict[int, int]:
    """Successors that spell tokens in order."""
    return dict(zip(tokens, tokens[1:], strict=False))


def tool_model(tok: Tokenizer, expr: str) -> GPT:
    """Writes <|python_start|> expr <|python_end|>; after the tool output (or, without one, after
    <|python_end|>) it ends its turn. expr must not repeat a token (a bigram model cannot count)."""
    sp = tok.encode_special
    call = [sp("<|python_start|>"), *tok.encode(expr), sp("<|python_end|>")]
    successors = chain(sp("<|assistant_start|>"), *call)
    successors[sp("<|python_end|>")] = successors[sp("<|output_end|>")] = sp("<|assistant_end|>")
    return bigram_model(tok, successors, default=tok.encode("?")[0])
