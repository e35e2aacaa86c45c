"""CORE metric: prompts, continuation spans, centering, chance level, a model that knows the answers,
distribution over ranks, the bundle download. Real llm-foundry items from shared/data/core."""

import dataclasses
import functools
import http.server
import io
import json
import math
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from services.layout import EVAL_BUNDLE_KEY
from services.storage import LocalStorage
from tests.support.ranks import run_ranks
from trainer.evals import core as ce
from trainer.evals.core import CORE_TASKS, TaskSpec

SPECS = {spec.label: spec for spec in CORE_TASKS}
FILES = {  # shared/data/core file -> CORE label
    "arc_easy": "arc_easy", "arc_challenge": "arc_challenge", "piqa": "piqa", "copa": "copa",
    "commonsense_qa": "commonsense_qa", "openbook_qa": "openbook_qa", "boolq": "boolq",
    "winograd_wsc": "winograd", "winogrande": "winogrande",
    "lambada_openai": "lambada_openai", "jeopardy": "jeopardy", "bigbench_operators": "bigbench_operators",
}


@pytest.fixture
def core_dir(shared_data: Path) -> Path:
    return shared_data / "core"


@functools.cache
def train_tokenizer(corpus: Path) -> Tokenizer:
    """Trained once per session (0.5 s): a small BPE on the first 300 kB of Shakespeare."""
    text = corpus.read_text(encoding="utf-8")[:300_000]
    return Tokenizer.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], vocab_size=1024)


@pytest.fixture
def tokenizer(shared_data: Path) -> Tokenizer:
    return train_tokenizer(shared_data / "tinyshakespeare.txt")


def items_of(core_dir: Path, name: str) -> list[dict]:
    return ce.load_items(core_dir / f"{name}.jsonl")


def tiny_gpt(vocab_size: int, sequence_len: int = 256, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    return model.eval()


# ----------------------------------------------------------------------------- task definitions


def test_core_suite_is_dclms_22_tasks():
    assert len(SPECS) == len(CORE_TASKS) == 22
    types = [spec.task_type for spec in CORE_TASKS]
    assert (types.count("multiple_choice"), types.count("schema"), types.count("language_modeling")) == (11, 2, 9)
    answer_delimited = {s.label for s in CORE_TASKS if s.continuation_delimiter == "\nAnswer: "}
    assert answer_delimited == {"jeopardy", "arc_easy", "arc_challenge", "piqa", "boolq"}
    assert all(s.continuation_delimiter in (" ", "\nAnswer: ") for s in CORE_TASKS)


def test_task_specs_load_from_yaml_and_reject_unknown_keys(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text(
        "tasks:\n"
        "- {label: copa, file: commonsense_reasoning/copa.jsonl, task_type: multiple_choice, num_fewshot: 2, random_baseline: 50}\n"
        "- {label: qa, file: qa.jsonl, task_type: language_modeling, num_fewshot: 0, random_baseline: 0,\n"
        "   continuation_delimiter: \"\\nA: \"}\n"
    )
    assert ce.load_task_specs(path) == [
        TaskSpec("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 2, 50),
        TaskSpec("qa", "qa.jsonl", "language_modeling", 0, 0, "\nA: "),
    ]
    path.write_text(json.dumps([{"label": "x", "file": "x.jsonl", "task_type": "schema", "num_fewshot": 0,
                                 "random_baseline": 50, "shots": 3}]))
    with pytest.raises(ValueError, match=r"unknown keys \['shots'\]"):
        ce.load_task_specs(path)
    with pytest.raises(ValueError, match="task_type='mc'"):
        TaskSpec("x", "x.jsonl", "mc", 0, 25)


def test_centered_accuracy_is_zero_at_chance_and_one_at_perfect():
    assert ce.centered_accuracy(0.25, 25) == pytest.approx(0.0)
    assert ce.centered_accuracy(1.0, 62) == pytest.approx(1.0)
    assert ce.centered_accuracy(0.81, 62) == pytest.approx(0.5)  # (0.81 - 0.62) / 0.38
    assert ce.centered_accuracy(0.0, 50) == pytest.approx(-1.0)
    assert ce.centered_accuracy(0.3, 0) == pytest.approx(0.3)


# ----------------------------------------------------------------------------- prompts


def test_multiple_choice_prompt(core_dir):
    copa = items_of(core_dir, "copa")
    context = ("The girl found a bug in her cereal, therefore she lost her appetite.\n\n"
               "The man turned on the faucet, therefore ")
    assert ce.render_item("multiple_choice", copa[0], " ", [copa[1]]) == [
        (context, "the toilet filled with water."),
        (context, "water flowed from the spout."),
    ]


def test_multiple_choice_prompt_with_answer_delimiter(core_dir):
    arc = items_of(core_dir, "arc_easy")
    context = ("Question: Which statement best explains why photosynthesis is the foundation of most food webs?\n"
               "Answer: Sunlight is the source of energy for nearly all ecosystems.\n\n"
               "Question: Which piece of safety equipment is used to keep mold spores from entering the respiratory system?\n"
               "Answer: ")
    pairs = ce.render_item("multiple_choice", arc[1], "\nAnswer: ", [arc[0]])
    assert pairs == [(context, c) for c in ("safety goggles", "breathing mask", "rubber gloves", "lead apron")]


def test_schema_prompt(core_dir):
    wino = items_of(core_dir, "winogrande")
    shot = "They were worried the wine would ruin the bed and the blanket, but the bed was't ruined.\n\n"
    assert ce.render_item("schema", wino[0], " ", [wino[2]]) == [
        (shot + "Sarah was a much better surgeon than Maria so Sarah ", "always got the easier cases."),
        (shot + "Sarah was a much better surgeon than Maria so Maria ", "always got the easier cases."),
    ]


def test_language_modeling_prompt_trims_contexts(core_dir):
    jeopardy = items_of(core_dir, "jeopardy")
    assert ce.render_item("language_modeling", jeopardy[0], "\nAnswer: ", [jeopardy[1]]) == [(
        "WORLD HISTORY: Accused of accepting bribes, Francis Bacon was imprisoned in this forbidding complex in 1621\n"
        "Answer: Tower of London\n\n"
        "WORLD HISTORY: This Navy commander flew from a base at Little America to the South Pole & back Nov. 28-29, 1929\n"
        "Answer: ",
        "Admiral Richard Byrd",
    )]
    padded = {"context": "  2 + 2 = \n", "continuation": "4"}
    assert ce.render_item("language_modeling", padded, " ", [{"context": "1 + 1 =  ", "continuation": "2"}]) == [
        ("1 + 1 = 2\n\n2 + 2 = ", "4")
    ]


def test_fewshot_examples_are_seeded_and_never_the_item(core_dir):
    copa = items_of(core_dir, "copa")
    draws = [ce.sample_fewshot(copa, idx, 10) for idx in range(30)]
    for idx, shots in enumerate(draws):
        assert len(shots) == 10 and all(shot is not copa[idx] for shot in shots)
        assert len({id(s) for s in shots}) == 10
        assert shots == ce.sample_fewshot(copa, idx, 10)  # the same on every call, run and rank
    assert len({tuple(id(s) for s in shots) for shots in draws}) == 30  # but different per item
    assert ce.sample_fewshot(copa, 3, 0) == []


# ----------------------------------------------------------------------------- continuation spans


@pytest.mark.parametrize("name", sorted(FILES))
def test_scored_tokens_are_exactly_the_continuation(name, core_dir, tokenizer):
    """On every task file: the row is BOS + prompt, and the span [start, end) is the continuation's
    bytes, led at most by the delimiter's whitespace that BPE merged into its first token."""
    spec = SPECS[FILES[name]]
    items = items_of(core_dir, name)[:10]
    as_bytes = lambda ids: b"".join(tokenizer.id_to_bytes(i) for i in ids)
    for idx in range(len(items)):
        pairs = ce.render_item(spec.task_type, items[idx], spec.continuation_delimiter,
                               ce.sample_fewshot(items, idx, spec.num_fewshot))
        rows, spans = ce.encode_with_spans(tokenizer, pairs)
        for (context, continuation), row, (start, end) in zip(pairs, rows, spans, strict=True):
            assert row[0] == tokenizer.get_bos_token_id() and end == len(row) and 1 <= start < end
            assert as_bytes(row[1:]) == (context + continuation).encode()
            scored = as_bytes(row[start:end])
            lead = scored[: len(scored) - len(continuation.encode())]
            assert scored.endswith(continuation.encode()) and lead.strip() == b""
            assert len(lead) <= len(context) - len(context.rstrip())


def test_span_covers_words_the_choices_share(core_dir, tokenizer):
    item = items_of(core_dir, "arc_challenge")[0]  # every choice starts with "Planetary"
    rows, spans = ce.encode_with_spans(tokenizer, ce.render_item("multiple_choice", item, "\nAnswer: ", []))
    scored = [tokenizer.decode(row[s:e]) for row, (s, e) in zip(rows, spans, strict=True)]
    assert scored == [" " + c for c in item["choices"]]


def test_long_prompts_are_cropped_from_the_left(core_dir, tokenizer):
    spec, items = SPECS["arc_easy"], items_of(core_dir, "arc_easy")[:6]
    pairs = ce.render_item(spec.task_type, items[0], spec.continuation_delimiter, ce.sample_fewshot(items, 0, 5))
    rows, spans = ce.encode_with_spans(tokenizer, pairs)
    assert min(len(r) for r in rows) > 64
    cropped, cropped_spans = ce.crop_left(rows, spans, 64)
    for row, (s, e), crow, (cs, ce_) in zip(rows, spans, cropped, cropped_spans, strict=True):
        assert len(crow) == 64 and crow == row[-64:] and crow[cs:ce_] == row[s:e]

    model, widths = tiny_gpt(tokenizer.vocab_size, sequence_len=64), []
    model.register_forward_pre_hook(lambda _m, args: widths.append(args[0].size(1)))
    for idx in range(len(items)):
        ce.evaluate_item(model, tokenizer, items, idx, dataclasses.replace(spec, num_fewshot=5),
                         max_len=ce.model_max_len(model))
    assert widths and max(widths) == 64


# ----------------------------------------------------------------------------- scoring


def test_span_scores_match_each_row_scored_alone(core_dir, tokenizer):
    """Padding rows into one batch changes nothing: per row, the mean loss of the tokens in its span and
    the greedy check equal those of the row run on its own, position t predicting token t + 1."""
    model = tiny_gpt(tokenizer.vocab_size, seed=5)
    with torch.no_grad():  # the init zeroes the output projections: perturb so that positions matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    item = items_of(core_dir, "arc_easy")[1]
    rows, spans = ce.encode_with_spans(tokenizer, ce.render_item("multiple_choice", item, "\nAnswer: ", []))
    assert len({len(r) for r in rows}) > 1  # the batch needs padding
    mean_losses, exact = ce.score_rows(model, rows, spans, tokenizer.get_bos_token_id(), "cpu")
    for row, (start, end), got_loss, got_exact in zip(rows, spans, mean_losses, exact, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([row]))[0]
        nll = [-torch.log_softmax(logits[t - 1], -1)[row[t]].item() for t in range(start, end)]
        assert got_loss == pytest.approx(sum(nll) / len(nll), rel=1e-4)
        assert got_exact == all(int(logits[t - 1].argmax()) == row[t] for t in range(start, end))

    # a row whose continuation the model predicts greedily is exact, and a changed last token is not
    greedy = rows[0][:spans[0][0]]
    for _ in range(3):
        with torch.no_grad():
            greedy.append(int(model(torch.tensor([greedy]))[0, -1].argmax()))
    start = spans[0][0]
    wrong = greedy[:-1] + [(greedy[-1] + 1) % tokenizer.vocab_size]
    _, exact = ce.score_rows(model, [greedy, wrong], [(start, len(greedy))] * 2, tokenizer.get_bos_token_id(), "cpu")
    assert exact == [True, False]


def test_random_init_model_scores_near_chance(core_dir, tokenizer):
    """Four tasks whose choices are content (not letters or yes/no, where any fixed preference scores
    the majority class), all 100 items each. Per task, accuracy within 4 binomial standard deviations
    of chance; CORE (their mean centered accuracy, sd about 0.05) within 0.2 of 0."""
    tasks = ["copa", "openbook_qa", "winograd", "winogrande"]
    out = ce.evaluate_core(tiny_gpt(tokenizer.vocab_size), tokenizer, core_dir, tasks=tasks)
    assert out["num_items"] == {t: 100 for t in tasks} and out["missing"] == []
    for task in tasks:
        p = SPECS[task].random_baseline / 100
        assert abs(out["results"][task] - p) <= 4 * math.sqrt(p * (1 - p) / 100), (task, out["results"][task])
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 4)
    assert abs(out["core_metric"]) < 0.2


def _train_on(tokenizer: Tokenizer, texts: list[str], steps: int = 60) -> GPT:
    """A tiny GPT fitted to the given prompts until it reproduces them."""
    rows = [tokenizer.encode(t, prepend=tokenizer.get_bos_token_id()) for t in texts]
    width = max(len(r) for r in rows) - 1
    x = torch.zeros((len(rows), width), dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        x[i, : len(row) - 1], y[i, : len(row) - 1] = torch.tensor(row[:-1]), torch.tensor(row[1:])
    model = tiny_gpt(tokenizer.vocab_size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3, f"the model did not learn its prompts (loss {loss.item():.3f})"
    return model.eval()


def test_model_that_learned_the_answers_scores_them(core_dir, tokenizer, tmp_path):
    """A tiny GPT trained on the gold prompts of 3 items per task type and on a wrong answer for 3 more:
    the scorer must give exactly the first three right and the others wrong, and CORE = 1 on the first."""
    specs = [SPECS["copa"], SPECS["winogrande"], dataclasses.replace(SPECS["jeopardy"], num_fewshot=0)]
    data = {"copa": items_of(core_dir, "copa")[:6], "winogrande": items_of(core_dir, "winogrande")[10:16],
            "jeopardy": items_of(core_dir, "jeopardy")[:6]}
    texts = []
    for spec in specs:
        for i, item in enumerate(data[spec.label]):
            pairs = ce.render_item(spec.task_type, item, spec.continuation_delimiter, [])
            if spec.task_type == "language_modeling":
                context, answer = pairs[0]
                texts.append(context + (answer if i < 3 else "Banquo"))
            else:
                texts.append("".join(pairs[item["gold"] if i < 3 else 1 - item["gold"]]))
    model = _train_on(tokenizer, texts)

    for spec in specs:
        got = [ce.evaluate_item(model, tokenizer, data[spec.label], i, spec) for i in range(6)]
        assert got == [True] * 3 + [False] * 3, spec.label

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for label, items in data.items():
        (bundle / f"{label}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items[:3]))
    out = ce.evaluate_core(model, tokenizer, bundle, specs=specs)
    assert out["results"] == {"copa": 1.0, "winogrande": 1.0, "jeopardy": 1.0}
    assert out["core_metric"] == pytest.approx(1.0)


def test_only_present_tasks_count_and_missing_are_reported(core_dir, tokenizer, tmp_path):
    model = tiny_gpt(tokenizer.vocab_size)
    out = ce.evaluate_core(model, tokenizer, core_dir, tasks=["copa", "squad"], max_per_task=8)
    assert list(out["results"]) == ["copa"] and out["missing"] == ["squad"] and out["num_items"] == {"copa": 8}
    assert out["core_metric"] == pytest.approx(out["centered_results"]["copa"])
    with pytest.raises(ValueError, match="unknown CORE tasks"):
        ce.evaluate_core(model, tokenizer, core_dir, tasks=["copa", "mmlu"])
    with pytest.raises(FileNotFoundError, match="no CORE task file"):
        ce.evaluate_core(model, tokenizer, tmp_path)


def test_a_bundle_in_eval_bundle_layout_is_found(core_dir, tmp_path):
    nested = tmp_path / "eval_bundle" / "eval_data" / "world_knowledge"
    nested.mkdir(parents=True)
    (nested / "jeopardy_all.jsonl").write_text((core_dir / "jeopardy.jsonl").read_text())
    assert ce.find_task_file(tmp_path / "eval_bundle", SPECS["jeopardy"]) == nested / "jeopardy_all.jsonl"
    assert ce.find_task_file(core_dir, SPECS["winograd"]) == core_dir / "winograd_wsc.jsonl"  # flat, by file name
    assert ce.find_task_file(core_dir, SPECS["squad"]) is None


# ----------------------------------------------------------------------------- distributed


def _rank_main(rank: int, world: int, store: str, tokenizer_json: str, weights: str, items: list, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        tokenizer = Tokenizer.from_json(tokenizer_json)
        model = tiny_gpt(tokenizer.vocab_size)
        model.load_state_dict(torch.load(weights))
        counts = ce.evaluate_task(model, tokenizer, items, SPECS["copa"])
        Path(out).with_suffix(f".{rank}").write_text(json.dumps(counts))
    finally:
        dist.destroy_process_group()


def test_items_are_split_across_ranks_and_counts_summed(core_dir, tokenizer, tmp_path):
    items = items_of(core_dir, "copa")[:25]
    model = tiny_gpt(tokenizer.vocab_size, seed=3)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    expected = ce.evaluate_task(model, tokenizer, items, SPECS["copa"])
    args = (str(tmp_path / "store"), tokenizer.to_json(), str(tmp_path / "weights.pt"), items, str(tmp_path / "out"))
    run_ranks(_rank_main, args)
    per_rank = [tuple(json.loads((tmp_path / f"out.{rank}").read_text())) for rank in range(2)]
    assert per_rank == [expected, expected]  # both ranks return the all-reduced totals
    assert expected[1] == 25


# ----------------------------------------------------------------------------- the bundle download


class _FlakyBundleServer(http.server.BaseHTTPRequestHandler):
    """Serves a zip; the first `failures` requests get a 503."""

    payload, failures, hits = b"", 0, 0

    def do_GET(self):  # noqa: N802 (http.server's naming)
        cls = type(self)
        cls.hits += 1
        if cls.hits <= cls.failures:
            self.send_error(503, "busy")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(cls.payload)))
        self.end_headers()
        self.wfile.write(cls.payload)

    def log_message(self, *args):
        pass


def test_bundle_download_retries_then_is_reused_from_storage(core_dir, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(core_dir / "copa.jsonl", "eval_bundle/eval_data/commonsense_reasoning/copa.jsonl")
    handler = type("Handler", (_FlakyBundleServer,), {"payload": buf.getvalue(), "failures": 2, "hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
    storage = LocalStorage(tmp_path / "storage")
    try:
        bundle = ce.download_eval_bundle(tmp_path / "cache1", storage=storage, url=url, backoff_s=0.01)
        assert handler.hits == 3  # two 503s, then the zip
        assert ce.find_task_file(bundle, SPECS["copa"]) == bundle / "eval_data/commonsense_reasoning/copa.jsonl"
        assert storage.exists(EVAL_BUNDLE_KEY)
        # a second worker with an empty cache takes the zip from storage, not from the URL
        assert ce.download_eval_bundle(tmp_path / "cache2", storage=storage, url=url).is_dir()
        assert ce.download_eval_bundle(tmp_path / "cache1", url=url) == bundle  # already unpacked
        assert handler.hits == 3
        handler.failures = 10**6
        with pytest.raises(RuntimeError, match="after 2 attempts"):
            ce.download_eval_bundle(tmp_path / "cache3", url=url, attempts=2, backoff_s=0.01)
    finally:
        server.shutdown()
