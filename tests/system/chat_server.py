"""
A real nanochat server for the web UI and chat CLI tests: serving/api's app over an AsyncEngine over a
tiny GPT whose greedy reply is known in advance, under uvicorn on a thread on 127.0.0.1.

Notable:
- REPLY holds markdown and an <img onerror> tag, so one reply exercises rendering and escaping.
- the tokenizer is trained on REPLY alone with room for every merge: each pre-token of REPLY becomes one
  token, and all of them differ. So a bigram GPT (next token from the current one only, weights set by
  hand as in tests/nanochat/test_generate.py) spells REPLY out after <|assistant_start|> and then ends its turn,
  whatever the conversation before it.
- TOOL_PARTS is a reply that calls the calculator: tool_reply_model writes its text and its call, the
  server runs the call and forces the output, and the model goes on after <|output_end|> as trained.
- PacedGPT sleeps in every forward, as a bigger model on a busier machine would take time: a stream then
  spreads over visible time and clients can be seen to render it piece by piece.
"""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import uvicorn

from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from serving.api.app import create_app
from serving.engine.async_engine import AsyncEngine
from serving.engine.llm_engine import LLMEngine

REPLY = "Hello **world**, try `x`: <img src=x onerror=alert(1)> done"
REPLY_TEXT = "Hello world, try x: <img src=x onerror=alert(1)> done"  # REPLY rendered: markdown marks gone
XSS = "<img src=x onerror=alert(1)>"


# a reply with a calculator call: what the model writes, and (python_output) what the server feeds back
TOOL_PARTS = [{"type": "text", "text": "Twelve apples cost "}, {"type": "python", "text": "12*3"},
              {"type": "python_output", "text": "36"}, {"type": "text", "text": "36 dollars."}]
TOOL_TEXT = "Twelve apples cost 36 dollars."  # the text parts: the reply's content
TOOL_CORPUS = "Twelve apples cost 12*3 36 dollars."  # for reply_tokenizer: each piece one token


def reply_tokenizer(replies: tuple[str, ...] = (REPLY,)) -> Tokenizer:
    """A tokenizer in which every pre-token of the replies is one token."""
    return Tokenizer.train_from_iterator(list(replies), 256 + len(SPECIAL_TOKENS) + 100 * len(replies))


class PacedGPT(GPT):
    """A GPT that takes at least delay_s per forward; set delay_s at any time."""

    delay_s = 0.0

    def forward_cached(self, idx: torch.Tensor, cache, logits_at=None, prev_idx=None) -> torch.Tensor:
        time.sleep(self.delay_s)
        return super().forward_cached(idx, cache, logits_at, prev_idx)


def reply_model(tok: Tokenizer, cls: type[GPT] = GPT, reply_text: str = REPLY) -> GPT:
    """A real GPT that answers any conversation with reply_text (greedy; REPLY by default).

    With nanochat's init every block is the identity (zero output projections), so the last hidden
    state is the normalised token embedding; one-hot embeddings and an lm_head row per successor make
    the next token a function of the current one (script_model)."""
    sp = tok.encode_special
    reply = tok.encode(reply_text)
    assert len(set(reply)) == len(reply), "a bigram model cannot spell a reply that repeats a token"
    return script_model(tok, [sp("<|assistant_start|>"), *reply, sp("<|assistant_end|>")], cls)


def tool_reply_model(tok: Tokenizer, cls: type[GPT] = GPT) -> GPT:
    """A real GPT that answers any conversation with TOOL_PARTS (greedy): it writes the text and the
    call; the output is the server's, forced, and the model goes on from <|output_end|>."""
    ids, _ = tok.render_conversation({"messages": [{"role": "user", "content": "?"},
                                                   {"role": "assistant", "content": TOOL_PARTS}]})
    script = ids[ids.index(tok.encode_special("<|assistant_start|>")):]
    return script_model(tok, script, cls)


def script_model(tok: Tokenizer, script: list[int], cls: type[GPT] = GPT) -> GPT:
    """A real GPT whose greedy next token after script[i] is script[i + 1] (the last successor given for a
    token wins: a token forced by the calculator may repeat), and script[1] after any other token."""
    successors = dict(zip(script, script[1:], strict=False))
    V = tok.vocab_size
    n_embd = V + (-V) % 8  # one dimension per token, in 4 heads of even size
    model = cls(GPTConfig(sequence_len=512, vocab_size=V, n_layer=2, n_head=4, n_kv_head=4, n_embd=n_embd))
    model.init_weights()
    with torch.no_grad():
        model.transformer.wte.weight.copy_(torch.eye(V, n_embd))
        head = torch.zeros(V, n_embd)
        for token in range(V):
            head[successors.get(token, script[1]), token] = 1.0
        model.lm_head.weight.copy_(head)
    return model.eval()


@contextmanager
def serve(model: GPT, tok: Tokenizer, **app_options) -> Iterator[tuple[str, AsyncEngine]]:
    """(base URL, engine) of create_app(engine, tok, **app_options) running on 127.0.0.1."""
    engine = AsyncEngine(LLMEngine(model, tok, num_blocks=64, block_size=16, max_num_seqs=4,
                                   max_num_batched_tokens=512))
    config = uvicorn.Config(create_app(engine, tok, **app_options), host="127.0.0.1", port=0,
                            log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown()
