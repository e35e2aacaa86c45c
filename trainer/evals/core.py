"""
The CORE metric (DCLM, arXiv:2406.11794), as nanochat computes it: 22 in-context-learning tasks, each
scored as accuracy, centered on its random baseline, averaged.

Notable:
- the 22 task definitions are embedded (`CORE_TASKS`: DCLM's core.yaml + eval_meta_data.csv, the values
  nanochat's eval bundle ships, boolq's majority-class 62 % included); another suite can be described by
  a small YAML/JSON file with the same fields (`load_task_specs`)
- items are read from a bundle folder in llm-foundry's jsonl formats: multiple_choice
  {"query", "choices", "gold"}, schema {"context_options", "continuation", "gold"}, language_modeling
  {"context", "continuation"}; both the unpacked eval_bundle layout (eval_data/<category>/<file>) and a
  flat folder of <file or label>.jsonl are found. Tasks whose file is absent are skipped and reported
- the prompts are nanochat's Jinja templates written out as plain string building: few-shot examples
  joined by a blank line, each "context + delimiter + answer"; examples drawn with random.Random(1234 + i),
  never the item itself; the item order shuffled with seed 1337 before `max_per_task` cuts, as nanochat
- the scored span is the whole continuation: the tokens of the prompt after the longest common token
  prefix with the context alone (BPE only re-merges at that boundary, so the span starts at the token
  carrying the continuation's first character). multiple_choice / schema pick the option with the lowest
  mean loss over its span (llm-foundry's rule); language_modeling needs the greedy argmax to reproduce
  every continuation token. nanochat's common prefix *across choices* would instead drop leading words
  the choices share ("Planetary density ..." vs "Planetary years ...") from the mean
- one forward pass per item: its options padded (with BOS) to the longest; rows longer than the model's
  sequence_len are cropped from the left, the span shifted with them
- distributed over workers: with torch.distributed initialised, rank r scores items r, r+world, ... and
  the correct/total counts are all-reduced
- the bundle download (`download_eval_bundle`) is explicit and never happens implicitly; it keeps the zip
  in storage so that other workers and pods do not download it again
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from nanochat.config import Config
from nanochat.tokenizer import Tokenizer
from services.layout import EVAL_BUNDLE_KEY
from services.settings import default_storage_uri
from services.storage import Storage

log = logging.getLogger(__name__)

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234  # nanochat: random.Random(FEWSHOT_SEED + item index)
SHUFFLE_SEED = 1337  # nanochat shuffles each task's items once, so that max_per_task takes a fair sample


@dataclass(frozen=True)
class TaskSpec:
    label: str
    file: str  # the jsonl, relative to the bundle's eval_data/ folder (DCLM's dataset_uri)
    task_type: str  # one of TASK_TYPES
    num_fewshot: int
    random_baseline: float  # accuracy of chance, in percent (DCLM's eval_meta_data.csv)
    continuation_delimiter: str = " "  # between a context and its answer

    def __post_init__(self):
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task {self.label!r}: task_type={self.task_type!r}, must be one of {list(TASK_TYPES)}")
        if self.num_fewshot < 0:
            raise ValueError(f"task {self.label!r}: num_fewshot={self.num_fewshot!r}, must be >= 0")
        if not 0 <= self.random_baseline < 100:
            raise ValueError(f"task {self.label!r}: random_baseline={self.random_baseline!r}, must be a percent in [0, 100)")


_ANSWER = "\nAnswer: "
# DCLM's low-variance suite in its order, with the settings of nanochat's eval bundle.
CORE_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", "multiple_choice", 0, 25),
    TaskSpec("jeopardy", "world_knowledge/jeopardy_all.jsonl", "language_modeling", 10, 0, _ANSWER),
    TaskSpec("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", "language_modeling", 10, 0),
    TaskSpec("arc_easy", "world_knowledge/arc_easy.jsonl", "multiple_choice", 10, 25, _ANSWER),
    TaskSpec("arc_challenge", "world_knowledge/arc_challenge.jsonl", "multiple_choice", 10, 25, _ANSWER),
    TaskSpec("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 0, 50),
    TaskSpec("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", "multiple_choice", 10, 20),
    TaskSpec("piqa", "commonsense_reasoning/piqa.jsonl", "multiple_choice", 10, 50, _ANSWER),
    TaskSpec("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", "multiple_choice", 0, 25),
    TaskSpec("lambada_openai", "language_understanding/lambada_openai.jsonl", "language_modeling", 0, 0),
    TaskSpec("hellaswag", "language_understanding/hellaswag.jsonl", "multiple_choice", 10, 25),
    TaskSpec("winograd", "language_understanding/winograd_wsc.jsonl", "schema", 0, 50),
    TaskSpec("winogrande", "language_understanding/winogrande.jsonl", "schema", 0, 50),
    TaskSpec("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl", "language_modeling", 10, 0),
    TaskSpec("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", "multiple_choice", 3, 20),
    TaskSpec("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", "language_modeling", 10, 0),
    TaskSpec("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", "language_modeling", 10, 0),
    TaskSpec("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", "language_modeling", 10, 0),
    TaskSpec("squad", "reading_comprehension/squad.jsonl", "language_modeling", 10, 0),
    TaskSpec("coqa", "reading_comprehension/coqa.jsonl", "language_modeling", 0, 0),
    TaskSpec("boolq", "reading_comprehension/boolq.jsonl", "multiple_choice", 10, 62, _ANSWER),
    TaskSpec("bigbench_language_identification", "language_understanding/bigbench_language_identification.jsonl", "multiple_choice", 10, 9.1),
)


def load_task_specs(path: str | Path) -> list[TaskSpec]:
    """Task definitions from a YAML or JSON file: a list of mappings with TaskSpec's fields (label, file,
    task_type, num_fewshot, random_baseline, optional continuation_delimiter), or {"tasks": [...]}."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))  # JSON is YAML
    entries = raw.get("tasks") if isinstance(raw, dict) else raw
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of tasks (or a mapping with a 'tasks' list)")
    allowed = {f.name for f in fields(TaskSpec)}
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: task {i} is not a mapping")
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ValueError(f"{path}: task {i} has unknown keys {unknown}; allowed: {sorted(allowed)}")
        try:
            specs.append(TaskSpec(**entry))
        except TypeError as e:  # a required field is missing
            raise ValueError(f"{path}: task {i}: {e}") from None
    return specs


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """0 at chance, 1 at perfect: (acc - b) / (1 - b) with the baseline b given in percent."""
    b = 0.01 * random_baseline
    return (accuracy - b) / (1.0 - b)


# ----------------------------------------------------------------------------- bundle files


def find_task_file(bundle_dir: Path, spec: TaskSpec) -> Path | None:
    """The task's jsonl in the unpacked eval_bundle layout, or in a flat folder (by file name or label)."""
    bundle_dir = Path(bundle_dir)
    for candidate in (
        bundle_dir / "eval_data" / spec.file,
        bundle_dir / spec.file,
        bundle_dir / Path(spec.file).name,
        bundle_dir / f"{spec.label}.jsonl",
    ):
        if candidate.is_file():
            return candidate
    return None


def load_items(path: Path) -> list[dict[str, Any]]:
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return items


def _http_download(url: str, dest: Path, attempts: int, backoff_s: float, timeout_s: float) -> None:
    """Stream url into dest, retrying network errors, 5xx/429 and truncated bodies with exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(dest, "wb") as out:
                expected = response.headers.get("Content-Length")
                shutil.copyfileobj(response, out, 8 << 20)
            size = dest.stat().st_size
            if expected is not None and size != int(expected):
                raise OSError(f"truncated: {size} of {expected} bytes")
            return
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500:
                raise RuntimeError(f"downloading {url}: HTTP {e.code} {e.reason}") from None
            error: Exception = e
        except OSError as e:  # URLError, timeouts, resets, truncation
            error = e
        if attempt == attempts:
            raise RuntimeError(f"downloading {url} failed after {attempts} attempts: {error}") from None
        log.warning("downloading %s: %s; retrying (%d/%d)", url, error, attempt, attempts)
        time.sleep(backoff_s * 2 ** (attempt - 1))


def download_eval_bundle(
    cache_dir: str | Path,
    storage: Storage | None = None,
    url: str = EVAL_BUNDLE_URL,
    attempts: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
) -> Path:
    """Make the eval bundle available unpacked at cache_dir/eval_bundle and return that folder.
    Sources in order: the folder already there; the zip in storage (EVAL_BUNDLE_KEY); the URL, whose
    zip is then put into storage. Unpacking goes through a temporary folder and a rename, so workers
    sharing cache_dir never see half a bundle."""
    cache_dir = Path(cache_dir)
    target = cache_dir / "eval_bundle"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".eval_bundle-") as tmp:
        archive = Path(tmp) / "eval_bundle.zip"
        if storage is not None and storage.exists(EVAL_BUNDLE_KEY):
            source = f"{storage!r} {EVAL_BUNDLE_KEY}"
            log.info("eval bundle: from %s", source)
            storage.download_file(EVAL_BUNDLE_KEY, archive)
        else:
            source = url
            log.info("eval bundle: downloading %s", url)
            _http_download(url, archive, attempts, backoff_s, timeout_s)
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(Path(tmp) / "unpacked")
        except zipfile.BadZipFile as e:
            raise RuntimeError(f"the eval bundle from {source} is not a valid zip: {e}") from None
        if storage is not None and source == url:  # only a zip that opened is shared with the others
            storage.upload_file(archive, EVAL_BUNDLE_KEY)
        unpacked = Path(tmp) / "unpacked"
        root = unpacked / "eval_bundle" if (unpacked / "eval_bundle").is_dir() else unpacked
        try:
            root.rename(target)
        except OSError:
            if not target.is_dir():  # not another worker winning the race
                raise
    return target


# ----------------------------------------------------------------------------- prompts


def core_bundle_dir(cfg: Config, storage: Storage, attempts: int = 5) -> Path:
    """The CORE bundle: eval.core_bundle if set, else the cached copy, the zip in storage or the download."""
    if cfg.eval.core_bundle:
        folder = Path(cfg.eval.core_bundle).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"eval.core_bundle: no such folder {folder}")
        return folder
    cache = Path(default_storage_uri()).expanduser() / "eval_cache"
    return download_eval_bundle(cache, storage, attempts=attempts)


def sample_fewshot(items: Sequence[dict], idx: int, k: int) -> list[dict]:
    """k examples for item idx, never the item itself; the same for every run and rank (nanochat's seed)."""
    if k == 0:
        return []
    others = [i for i in range(len(items)) if i != idx]
    return [items[i] for i in random.Random(FEWSHOT_SEED + idx).sample(others, min(k, len(others)))]


def render_item(task_type: str, item: dict, delimiter: str, fewshot: Sequence[dict]) -> list[tuple[str, str]]:
    """(context, continuation) per scored option; each full prompt is context + continuation.
    multiple_choice: one per choice; schema: one per context option; language_modeling: one."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [(f"{shots}{item['query']}{delimiter}", choice) for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [(f"{shots}{option}{delimiter}", item["continuation"]) for option in item["context_options"]]
    if task_type == "language_modeling":
        # contexts are trimmed: some datasets carry trailing whitespace that would merge into the answer
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [(f"{shots}{item['context'].strip()}{delimiter}", item["continuation"])]
    raise ValueError(f"unknown task_type {task_type!r}; expected one of {list(TASK_TYPES)}")


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def encode_with_spans(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Token rows (BOS first) of each context + continuation, and the span [start, end) of its continuation."""
    bos = tokenizer.get_bos_token_id()
    encoded = tokenizer.encode([c for c, _ in pairs] + [c + x for c, x in pairs], prepend=bos)
    contexts, rows = encoded[: len(pairs)], encoded[len(pairs):]
    spans = []
    for (context, continuation), ctx, row in zip(pairs, contexts, rows, strict=True):
        start = _common_prefix_len(ctx, row)
        if start >= len(row):
            raise ValueError(f"empty continuation {continuation!r} after context ending {context[-80:]!r}")
        spans.append((start, len(row)))
    return rows, spans


def crop_left(rows: list[list[int]], spans: list[tuple[int, int]],
              max_len: int | None) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Keep the last max_len tokens of each row. A continuation longer than the window loses its head:
    the first kept token has no prediction, so the span starts at 1 at the earliest."""
    if max_len is None:
        return rows, spans
    out_rows, out_spans = [], []
    for row, (start, end) in zip(rows, spans, strict=True):
        drop = max(0, len(row) - max_len)
        out_rows.append(row[drop:])
        out_spans.append((max(1, start - drop), end - drop))
    return out_rows, out_spans


def model_max_len(model: nn.Module) -> int | None:
    """The context the model was trained for: GPT.config.sequence_len, or a max_seq_len attribute."""
    config = getattr(model, "config", None)
    return getattr(config, "sequence_len", None) or getattr(model, "max_seq_len", None)


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_rows(model: nn.Module, rows: list[list[int]], spans: list[tuple[int, int]], pad_id: int,
               device: torch.device | str) -> tuple[list[float], list[bool]]:
    """One forward pass over the padded rows: per row, the mean loss over its span and whether greedy
    decoding reproduces every span token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    ids = ids.to(device)
    logits = model(ids).float()  # (B, T, V); position t predicts token t + 1
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T - 1)
    predictions = logits[:, :-1].argmax(dim=-1)
    mean_losses, exact = [], []
    for i, (start, end) in enumerate(spans):
        mean_losses.append(losses[i, start - 1 : end - 1].mean().item())
        exact.append(bool(torch.equal(predictions[i, start - 1 : end - 1], ids[i, start:end])))
    return mean_losses, exact


def evaluate_item(model: nn.Module, tokenizer: Tokenizer, items: Sequence[dict], idx: int, spec: TaskSpec,
                  device: torch.device | str = "cpu", max_len: int | None = None) -> bool:
    """Whether the model gets item idx right (its few-shot examples drawn from the other items)."""
    item = items[idx]
    pairs = render_item(spec.task_type, item, spec.continuation_delimiter, sample_fewshot(items, idx, spec.num_fewshot))
    rows, spans = crop_left(*encode_with_spans(tokenizer, pairs), max_len)
    mean_losses, exact = score_rows(model, rows, spans, tokenizer.get_bos_token_id(), device)
    if spec.task_type == "language_modeling":
        return exact[0]
    return min(range(len(mean_losses)), key=mean_losses.__getitem__) == item["gold"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_task(model: nn.Module, tokenizer: Tokenizer, items: Sequence[dict], spec: TaskSpec,
                  device: torch.device | str = "cpu") -> tuple[int, int]:
    """(correct, total) over all items; each rank scores its stride and the counts are summed."""
    rank, world = _world()
    max_len = model_max_len(model)
    correct = sum(evaluate_item(model, tokenizer, items, i, spec, device, max_len) for i in range(rank, len(items), world))
    counts = torch.tensor([correct, len(range(rank, len(items), world))], dtype=torch.long, device=device)
    if world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return int(counts[0]), int(counts[1])


def evaluate_core(
    model: nn.Module,
    tokenizer: Tokenizer,
    bundle_dir: str | Path,
    tasks: list[str] | None = None,
    max_per_task: int | None = None,
    device: torch.device | str = "cpu",
    specs: Sequence[TaskSpec] = CORE_TASKS,
) -> dict[str, Any]:
    """CORE over the tasks (labels; default all of specs) whose files the bundle holds.
    Returns {"results": {label: accuracy}, "centered_results": {label: centered accuracy},
    "core_metric": mean centered accuracy, "num_items": {label: n}, "missing": [labels without a file]}.
    The caller puts the model in eval mode."""
    by_label = {spec.label: spec for spec in specs}
    unknown = sorted(set(tasks or ()) - set(by_label))
    if unknown:
        raise ValueError(f"unknown CORE tasks {unknown}; known: {sorted(by_label)}")
    if max_per_task is not None and max_per_task < 1:
        raise ValueError(f"max_per_task={max_per_task!r}: must be >= 1 (or None for all items)")
    selected = [by_label[t] for t in tasks] if tasks else list(specs)
    results, centered, num_items, missing = {}, {}, {}, []
    for spec in selected:
        path = find_task_file(Path(bundle_dir), spec)
        if path is None:
            missing.append(spec.label)
            continue
        items = load_items(path)
        if not items:
            raise ValueError(f"{path}: the task file holds no items")
        random.Random(SHUFFLE_SEED).shuffle(items)
        items = items[:max_per_task]
        t0 = time.perf_counter()
        correct, total = evaluate_task(model, tokenizer, items, spec, device)
        results[spec.label] = correct / total if total else 0.0
        centered[spec.label] = centered_accuracy(results[spec.label], spec.random_baseline)
        num_items[spec.label] = total
        log.info("CORE %s: accuracy %.4f centered %.4f (%d items, %.1f s)", spec.label, results[spec.label],
                 centered[spec.label], total, time.perf_counter() - t0)
    if missing:
        log.warning("CORE: no file in %s for %d task(s): %s", bundle_dir, len(missing), ", ".join(missing))
    if not results:
        raise FileNotFoundError(f"no CORE task file found in {bundle_dir} (looked for {[s.label for s in selected]})")
    core = sum(centered.values()) / len(centered)
    return {"results": results, "centered_results": centered, "core_metric": core, "num_items": num_items,
            "missing": missing}
