"""
The cost of grammar-constrained decoding per decode step, for three maintained libraries on our own
tokenizer's vocabulary, side by side with the decode step of the tiny model on this CPU.

    .venv/bin/python -m bench.grammar_mask [--vocab-size 4096] [--depth 4] [--batch 1,8] [--repeats 5]

llguidance is a dependency of the server; the other two come with the grammar-bench extra.

For each library (llguidance, xgrammar, outlines-core): the one-off preparation of the vocabulary, the
compilation of a JSON schema (the bounded one tests/test_grammar.py samples from), then, over JSON documents
that satisfy it (tokenized by our tokenizer, as a model would write them), the next-token mask and the
advance on the token, per row and step; and how many schemas with a keyword the library does not implement
it refuses (rather than compiling a looser grammar, whose replies would not validate). The mask's
application to the logits is the engine's own (serving/engine/grammar.py: one lookup and one addition for
all the constrained rows), the same whatever the library. The decode step is LLMEngine.step() on a batch
of sequences in their decode phase (model forward, sampling, bookkeeping): plain rows, and rows that all
follow a never-ending JSON grammar with llguidance as the engine runs it. Ratios: a step's grammar work
with every row of a batch of B constrained (B masks, B advances, one application) over the plain decode
step of that batch. Times are CPU times of the process (steadier than wall time on a shared machine), the
best of --repeats rounds. Our tokenizer is trained here on the standard library's sources at
--vocab-size (the tiny-cpu preset's 4096 by default; the bigger presets use 32768); the model is a
d<depth> GPT with random weights.
Run it as a module (-m): as a script, its name would hide the serving package.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import llguidance
import torch

from bench.serving import random_model
from bench.tokenizer import stdlib_documents
from nanochat.tokenizer import Tokenizer
from serving.engine.grammar import bitmask_bias
from serving.engine.llm_engine import LLMEngine
from serving.engine.sequence import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "mood", "tags", "active"],
    "additionalProperties": False,
}
DOCUMENTS = [  # valid instances, written with the separators the grammars are compiled with
    {"name": "Ada", "age": 36, "mood": "calm", "tags": ["math"], "active": True},
    {"name": "Grace Ho", "age": 85, "mood": "happy", "tags": ["navy", "ship"], "active": False},
    {"name": "x", "age": 0, "mood": "sad", "tags": [], "active": True},
    {"name": "Zoë", "age": 120, "mood": "calm", "tags": ["ün", "b"], "active": False},
]
SEPARATORS = (", ", ": ")
# JSON that never ends (an object whose array of short strings goes on): the engine's constrained decode
# step is timed on it, so no sequence leaves the batch while it is timed
ENDLESS = r'\{"tags": \[("[a-z ]{0,8}", )*'
UNSUPPORTED = [  # JSON Schema keywords some libraries do not implement: a grammar without them accepts too much
    {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    {"not": {"type": "string"}},
    {"if": {"type": "string"}, "then": {"maxLength": 3}},
    {"type": "object", "dependentRequired": {"a": ["b"]}},
]


@dataclass
class Library:
    """One library behind the same four calls."""

    name: str
    prepare: Callable[[Tokenizer, list[int]], object]  # the vocabulary, once per tokenizer
    compile: Callable[[object, dict], Callable[[], object]]  # a schema -> a factory of fresh matchers
    fill: Callable[[object, torch.Tensor], None]  # a matcher's next-token mask into a (1, W) int32 row
    advance: Callable[[object, int], None]


def _llguidance() -> Library:
    def prepare(tok: Tokenizer, stops: list[int]) -> object:
        return llguidance.LLTokenizer(tok.to_json(), n_vocab=tok.vocab_size, eos_token=stops)

    def compile_(vocab: object, schema: dict) -> Callable[[], object]:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False, "item_separator": SEPARATORS[0],
                               "key_separator": SEPARATORS[1]})
        matcher = llguidance.LLMatcher(vocab, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher.deep_copy

    def advance(matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    def fill(matcher, row: torch.Tensor) -> None:
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    return Library("llguidance", prepare, compile_, fill, advance)


def _xgrammar() -> Library:
    import xgrammar

    def prepare(tok: Tokenizer, stops: list[int]) -> object:
        vocab = [tok.id_to_bytes(i) for i in range(tok.vocab_size)]
        return xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=tok.vocab_size, stop_token_ids=stops)

    def compile_(info: object, schema: dict) -> Callable[[], object]:
        compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)
        return lambda: xgrammar.GrammarMatcher(compiled)

    def advance(matcher, token: int) -> None:
        assert matcher.accept_token(token)

    return Library("xgrammar", prepare, compile_, lambda m, row: m.fill_next_token_bitmask(row, 0), advance)


def _outlines_core() -> Library:
    import outlines_core

    def prepare(tok: Tokenizer, stops: list[int]) -> object:
        pieces: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            data = tok.id_to_bytes(i)
            if data:  # special tokens stand for no text; the end is its eos_token_id
                pieces.setdefault(data, []).append(i)
        return outlines_core.Vocabulary(stops[0], pieces)

    def compile_(vocab: object, schema: dict) -> Callable[[], object]:
        regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?")
        index = outlines_core.Index(regex, vocab)
        return lambda: outlines_core.Guide(index)

    def fill(guide, row: torch.Tensor) -> None:
        guide.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    return Library("outlines-core", prepare, compile_, fill, lambda g, token: g.advance(token, return_tokens=False))


_request_ids = itertools.count()
# CPU time of the whole process (every thread: torch's, llguidance's executor): on a shared machine it is
# far steadier than wall time, which counts the time other processes hold the cores
clock = time.process_time
LIBRARIES = {"llguidance": _llguidance, "xgrammar": _xgrammar, "outlines-core": _outlines_core}


def decode_step_s(engine: LLMEngine, tokenizer: Tokenizer, batch: int, steps: int, grammar: str | None = None) -> float:
    """Median CPU seconds of one engine step with `batch` sequences all decoding, each following grammar if given.
    The requests are new ones each time (ids from a counter)."""
    prompt = tokenizer.encode("def main(): return", prepend="<|bos|>")
    params = SamplingParams(temperature=1.0, max_tokens=steps + 8, min_tokens=steps + 8, grammar=grammar)
    ids = [f"decode-{next(_request_ids)}" for _ in range(batch)]
    for request_id in ids:
        engine.add_request(request_id, prompt, params)
    for _ in range(3):  # the prefill, and a couple of warm decodes
        engine.step()
    times = []
    for _ in range(steps):
        t0 = clock()
        events = engine.step()
        times.append(clock() - t0)
        assert not any(e.finish_reason for e in events), "a sequence ended: the batch shrank"
    for request_id in ids:
        engine.abort(request_id)
    engine.step()
    return statistics.median(times)


def matcher_step_s(library: Library, factory: Callable[[], object], documents: list[list[int]], vocab_size: int,
                   repeats: int) -> tuple[float, float]:
    """CPU seconds per token of (mask, advance) for one matcher over the documents, best of `repeats`: the
    documents are fed with a mask before each token, then fed alone; mask is the difference."""
    bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
    tokens = sum(len(d) for d in documents)
    for document in documents:  # first, that every mask lets the document through
        matcher = factory()
        for token in document:
            library.fill(matcher, bitmask)
            assert bitmask_bias(bitmask, vocab_size)[0, token] == 0, f"{library.name} left out a token of a valid document"
            library.advance(matcher, token)

    def feed(with_mask: bool) -> float:
        spent = 0.0
        for document in documents:
            matcher = factory()
            t0 = clock()
            for token in document:
                if with_mask:
                    library.fill(matcher, bitmask)
                library.advance(matcher, token)
            spent += clock() - t0
        return spent

    both = min(feed(True) for _ in range(repeats))
    advance = min(feed(False) for _ in range(repeats))
    return (both - advance) / tokens, advance / tokens


def apply_s(batch: int, vocab_size: int, repeats: int, calls: int = 200) -> float:
    """Seconds of masking `batch` constrained rows as the engine does, all at once: the bitmask made a bias
    (bitmask_bias), added to those rows in one index_add (the sampler's TokenMask)."""
    logits = torch.randn(batch, vocab_size)
    bitmask = torch.randint(-2**31, 2**31 - 1, (batch, (vocab_size + 31) // 32), dtype=torch.int32)
    rows = torch.arange(batch)
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            logits.index_add(0, rows, bitmask_bias(bitmask, vocab_size))
        best = min(best, (clock() - t0) / calls)
    return best


def refused(library: Library, vocab: object) -> int:
    """How many of UNSUPPORTED the library refuses to compile (rather than compiling a looser grammar)."""
    count = 0
    for schema in UNSUPPORTED:
        try:
            library.compile(vocab, schema)()
        except Exception:
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", default="1,8", help="decode batch sizes to compare against")
    parser.add_argument("--steps", type=int, default=40, help="decode steps timed per batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the grammar work is one thread)")
    parser.add_argument("--mb", type=float, default=5.0, help="MB of standard-library text the tokenizer learns from")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]

    tokenizer = Tokenizer.train_from_iterator(stdlib_documents(args.mb), args.vocab_size)
    stops = [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]
    documents = [tokenizer.encode(json.dumps(d, separators=SEPARATORS, ensure_ascii=False)) for d in DOCUMENTS]
    model = random_model(args.depth, tokenizer, sequence_len=512)
    engine = LLMEngine(model, tokenizer, num_blocks=256, block_size=16, max_num_seqs=max(batches))
    endless = llguidance.LLMatcher.grammar_from_regex(ENDLESS)
    steps, constrained = {}, {}
    for b in batches:  # interleaved, so that a change in the machine's load hits both alike; the best round
        rounds = [(decode_step_s(engine, tokenizer, b, args.steps), decode_step_s(engine, tokenizer, b, args.steps, endless))
                  for _ in range(args.repeats)]
        steps[b], constrained[b] = min(r[0] for r in rounds), min(r[1] for r in rounds)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocabulary {tokenizer.vocab_size}; d{args.depth} random model ({n_params / 1e6:.1f}M parameters), "
          f"{args.threads} torch threads; {sum(len(d) for d in documents)} tokens of JSON over {len(documents)} "
          f"documents")
    print("decode step (LLMEngine.step, plain rows): "
          + ", ".join(f"batch {b}: {s * 1e3:.2f} ms" for b, s in steps.items()))
    print("decode step with every row constrained (llguidance, as the engine runs it; the sampler's sort is quicker "
          "on rows that are mostly -inf): "
          + ", ".join(f"batch {b}: {constrained[b] * 1e3:.2f} ms ({100 * (constrained[b] / steps[b] - 1):+.1f}%)"
                      for b in batches))

    applies = {b: apply_s(b, tokenizer.vocab_size, args.repeats) for b in batches}
    print("apply (bitmask to logits, all rows at once): "
          + ", ".join(f"batch {b}: {s * 1e6:.1f} us" for b, s in applies.items()))

    ratios = "".join(f" {'vs batch ' + str(b):>11}" for b in batches)
    print(f"\n{'library':14} {'vocab prep':>10} {'compile':>9} {'mask':>8} {'advance':>8} {'refuses':>8}{ratios}")
    for name in args.libraries.split(","):
        try:
            library = LIBRARIES[name]()
        except ImportError:
            print(f"{name:14} not installed (the grammar-bench extra: pip install -e '.[grammar-bench]')")
            continue
        t0 = clock()
        vocab = library.prepare(tokenizer, stops)
        t1 = clock()
        factory = library.compile(vocab, SCHEMA)
        factory()
        t2 = clock()
        mask, advance = matcher_step_s(library, factory, documents, tokenizer.vocab_size, args.repeats)
        cells = "".join(f" {100 * (b * (mask + advance) + applies[b]) / steps[b]:10.1f}%" for b in batches)
        print(f"{name:14} {(t1 - t0) * 1e3:8.1f}ms {(t2 - t1) * 1e3:7.1f}ms {mask * 1e6:6.1f}us {advance * 1e6:6.1f}us "
              f"{refused(library, vocab):6d}/{len(UNSUPPORTED)}{cells}")
    print("\nmask, advance: per row and step (one matcher, one token); refuses: schemas with an unimplemented "
          "keyword refused rather than loosened;\nvs batch B: a step's grammar work with all B rows constrained "
          "(B masks one after another, B advances, one apply) over the decode step of a batch of B")


if __name__ == "__main__":
    main()
