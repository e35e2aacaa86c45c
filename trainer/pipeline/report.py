"""
The report card: `nanochat report` writes report.md from what storage holds, like nanochat's report.

Notable:
- reads only what the stages left in storage: the corpus' _SUCCESS.json, tokenizer/meta.json and eval.json,
  each stage's DONE.json and the meta.json/config.json of its checkpoint (never the weights), the eval
  results under runs/<run>/evals/ and the speedrun record. Any subset works: every section is always there,
  and whatever is absent is listed with the command that produces it
- a stage that never finished is still described, from its newest committed checkpoint, and marked so
- the summary table has nanochat's shape: a row per metric, a column per stage (BASE, MID, SFT, RL), "-"
  where absent; evals skipped for lack of data are listed below it with their reason
- plots are drawn with matplotlib's Agg canvas (no display, no global pyplot state) into report/*.png,
  linked relatively from the markdown; a plot with no data is not drawn, and a stale one is removed
- each run keeps its own report in storage, runs/<run>/report.md with its plots in runs/<run>/report/, so a
  second run does not overwrite the first's; the newest is also copied to a local folder (the working
  directory by default) as report.md and report/. Fetch one later with
  `aws s3 cp s3://BUCKET/PREFIX/runs/<run>/report.md .`, or write it again from storage with
  `nanochat --storage s3://BUCKET/PREFIX --run <run> report`
- the environment section describes the machine writing the report; each stage records its own worker count
- architecture sweeps (`nanochat experiment sweep`) found under runs/<run>/experiments/ get their table and their
  bits-per-byte-against-FLOPs plot (copied to report/experiment-<name>.png)
"""

from __future__ import annotations

import datetime
import importlib.metadata
import io
import json
import logging
import os
import platform
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanochat.checkpoint import CONFIG, META
from nanochat.config import Config
from nanochat.gpt import GPT, GPTConfig
from services.checkpoints import CheckpointManager
from services.layout import (
    CORPUS_SUCCESS,
    DONE,
    REPORT_NAME,
    REPORT_PLOTS,
    TOKENIZER_EVAL_KEY,
    TOKENIZER_META_KEY,
    corpus_prefix,
    eval_result_key,
    experiments_prefix,
    run_prefix,
    speedrun_record_key,
    step_dir_name,
)
from services.storage import KeyNotFound, Storage
from trainer.data.tokenizer import format_table
from trainer.pipeline.sweeps import PLOT, RESULTS, describe, results_table
from trainer.stages.table import STAGES

log = logging.getLogger(__name__)

EVAL_COMMANDS = {"loss": "nanochat eval loss", "core": "nanochat eval core", "chat": "nanochat eval chat"}
# the summary table's rows, in nanochat's order; chat tasks outside this list get rows before ChatCORE
CHAT_ROWS = {"arc-easy": "ARC-Easy", "arc-challenge": "ARC-Challenge", "mmlu": "MMLU", "gsm8k": "GSM8K",
             "humaneval": "HumanEval"}
ROWS = ["CORE", *CHAT_ROWS.values(), "ChatCORE", "bits per byte"]
BPB = "bits per byte"



def train_how(stage: str) -> str:
    """What to run for a stage missing from storage."""
    how = f"run `nanochat train {stage}`"
    return f"optional: {how} (or `nanochat speedrun --rl`)" if STAGES[stage].optional else how

# ---------------------------------------------------------------------------
# what storage holds


@dataclass
class StageRecord:
    """One training stage as storage describes it: its DONE summary (if it finished) and its checkpoint's meta."""

    name: str
    done: bool
    step: int
    summary: dict[str, Any]
    meta: dict[str, Any]
    config: dict[str, Any]

    def metric(self, key: str) -> Any:
        return (self.summary.get("metrics") or {}).get(key)

    @property
    def tokens(self) -> int | None:
        return self.summary.get("tokens", self.meta.get("tokens"))

    @property
    def seconds(self) -> float | None:
        return self.summary.get("seconds", self.meta.get("train_seconds"))

    @property
    def tokens_per_second(self) -> float | None:
        if "tokens_per_second" in self.summary:
            return self.summary["tokens_per_second"]
        timed, seconds = self.meta.get("train_tokens_timed"), self.meta.get("train_seconds")
        return timed / seconds if timed and seconds else None

    @property
    def history(self) -> list[dict[str, float]]:
        return [h for h in self.meta.get("history", []) if h.get("loss") is not None]

    @property
    def final_loss(self) -> float | None:
        loss = self.metric("final_loss")
        return loss if loss is not None else (self.history[-1]["loss"] if self.history else None)

    @property
    def val_bpb(self) -> float | None:
        bpb = self.metric("val_bpb")
        evals = [e for e in self.meta.get("evals", []) if e.get("val_bpb") is not None]
        return bpb if bpb is not None else (evals[-1]["val_bpb"] if evals else None)

    @property
    def params(self) -> int | None:
        if self.metric("params") is not None:
            return self.metric("params")
        model_config = self.meta.get("model_config")
        if not model_config:
            return None
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            return GPT(GPTConfig(**model_config)).num_params()


@dataclass
class Findings:
    run: str
    storage_uri: str
    corpus: dict[str, Any] | None = None
    tokenizer_meta: dict[str, Any] | None = None
    tokenizer_eval: dict[str, Any] | None = None
    speedrun: dict[str, Any] | None = None
    stages: dict[str, StageRecord] = field(default_factory=dict)
    evals: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # stage -> kind -> result
    missing: list[str] = field(default_factory=list)
    experiments: list[dict[str, Any]] = field(default_factory=list)  # each sweep's results.json
    experiment_plots: dict[str, bytes] = field(default_factory=dict)  # sweep name -> its bpb_vs_flops.png


def _read_json(storage: Storage, key: str, missing: list[str], what: str, how: str) -> dict[str, Any] | None:
    """The object as a dict; None (and a line in missing: what, where, how to make it) if absent or unreadable."""
    try:
        value = json.loads(storage.read_text(key))
        if not isinstance(value, dict):
            raise ValueError(f"a JSON {type(value).__name__}, not an object")
        return value
    except KeyNotFound:
        missing.append(f"{what} (`{key}`): {how}")
    except ValueError as e:
        log.warning("%s/%s is unreadable (%s): reported as missing", storage.uri, key, e)
        missing.append(f"{what} (`{key}`): unreadable ({e}); {how}")
    return None


def _stage_record(storage: Storage, run: str, stage: str, missing: list[str]) -> StageRecord | None:
    manager = CheckpointManager(storage, run, stage)
    how = train_how(stage)
    summary = manager.done_summary()  # None unless DONE.json names a complete checkpoint
    if summary is not None:
        step = int(json.loads(storage.read_text(manager.stage_prefix + DONE))["checkpoint"].removeprefix("step_"))
    else:
        step = manager.latest_step()
        if step is None:
            missing.append(f"{stage}: not trained (`{manager.stage_prefix}`): {how}")
            return None
        missing.append(f"{stage}: not finished, newest checkpoint {step_dir_name(step)}: {how} to resume")
    folder = f"{manager.stage_prefix}{step_dir_name(step)}/"
    meta = _read_json(storage, folder + META, missing, f"{stage} checkpoint metadata", how) or {}
    config = _read_json(storage, folder + CONFIG, missing, f"{stage} checkpoint config", how) or {}
    return StageRecord(stage, summary is not None, step, summary or {}, meta, config)


def gather(cfg: Config, storage: Storage) -> Findings:
    """Everything the report needs from storage, and a list of what is not there."""
    f = Findings(run=cfg.run, storage_uri=storage.uri)
    corpus = cfg.data.corpus_name
    f.corpus = _read_json(storage, corpus_prefix(corpus) + CORPUS_SUCCESS, f.missing, f"corpus {corpus}",
                          "run `nanochat data prepare`")
    f.tokenizer_meta = _read_json(storage, TOKENIZER_META_KEY, f.missing, "tokenizer", "run `nanochat tok train`")
    f.tokenizer_eval = _read_json(storage, TOKENIZER_EVAL_KEY, f.missing, "tokenizer evaluation", "run `nanochat tok eval`")
    for stage in STAGES:
        record = _stage_record(storage, cfg.run, stage, f.missing)
        if record is None:
            continue
        f.stages[stage] = record
        for kind in EVAL_COMMANDS:
            key = eval_result_key(cfg.run, stage, kind)
            if kind not in STAGES[stage].evaluations and not storage.exists(key):
                continue  # an optional eval (e.g. bits per byte of a chat stage) that was never run
            how = f"run `{EVAL_COMMANDS[kind]} --stage {stage}`"
            result = _read_json(storage, key, f.missing, f"{stage} {kind} eval", how)
            if result is not None:
                f.evals.setdefault(stage, {})[kind] = result
    f.speedrun = _read_json(storage, speedrun_record_key(cfg.run), f.missing, "speedrun record",
                            "run `nanochat speedrun`")
    for key in storage.list(experiments_prefix(cfg.run)):
        if key.endswith(f"/{RESULTS}"):  # sweeps are optional: an absent one is not missing
            sweep = _read_json(storage, key, f.missing, "architecture sweep", "run `nanochat experiment sweep` again")
            plot = key.removesuffix(RESULTS) + PLOT
            if sweep is not None:
                f.experiments.append(sweep)
                if storage.exists(plot):
                    f.experiment_plots[sweep["name"]] = storage.read_bytes(plot)
    return f


# ---------------------------------------------------------------------------
# the summary table


def metric_table(f: Findings) -> tuple[dict[str, dict[str, float]], set[str]]:
    """({row: {stage: value}} in display order, stages whose bits per byte come from training, not eval loss)."""
    table: dict[str, dict[str, float]] = {row: {} for row in ROWS}
    extra: dict[str, dict[str, float]] = {}
    bpb_from_training: set[str] = set()
    for stage in STAGES:
        evals = f.evals.get(stage, {})
        core = evals.get("core", {}).get("core_metric")
        if core is not None:
            table["CORE"][stage] = core
        chat = evals.get("chat", {})
        for task, value in (chat.get("results") or {}).items():
            row = CHAT_ROWS.get(task.lower())
            (table[row] if row else extra.setdefault(task, {}))[stage] = value
        if chat.get("chatcore") is not None:
            table["ChatCORE"][stage] = chat["chatcore"]
        bpb = evals.get("loss", {}).get("val_bpb")
        if bpb is None and stage in f.stages and f.stages[stage].val_bpb is not None:
            bpb = f.stages[stage].val_bpb
            bpb_from_training.add(stage)
        if bpb is not None:
            table[BPB][stage] = bpb
    before_chatcore = ROWS.index("ChatCORE")
    order = ROWS[:before_chatcore] + sorted(extra) + ROWS[before_chatcore:]
    merged = {**table, **extra}
    return {row: merged[row] for row in order}, bpb_from_training


def skipped_evals(f: Findings) -> list[str]:
    """'what: why' for every evaluation skipped with a reason (chat tasks without data, speedrun stages)."""
    lines = []
    for stage in STAGES:
        for task, reason in (f.evals.get(stage, {}).get("chat", {}).get("skipped") or {}).items():
            lines.append(f"{stage.upper()} {CHAT_ROWS.get(task.lower(), task)}: {reason}")
    for name, entry in ((f.speedrun or {}).get("stages") or {}).items():
        outcome = str(entry.get("outcome", "")) if isinstance(entry, dict) else str(entry)
        if outcome.startswith("skipped:"):
            lines.append(f"speedrun `{name}`: {outcome.removeprefix('skipped:').strip()}")
    return lines


# ---------------------------------------------------------------------------
# environment


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # not every platform names these
        return None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    """The machine writing the report: code version, hardware, software."""
    root = Path(__file__).resolve().parents[1]
    commit = _git(root, "rev-parse", "--short", "HEAD")
    if commit is None:
        git = "not a git checkout"
    else:
        branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD") or "?"
        git = f"{commit} on {branch} ({'dirty' if _git(root, 'status', '--porcelain') else 'clean'})"
    memory = _memory_gib()
    if torch.cuda.is_available():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        names = ", ".join(sorted({p.name for p in props}))
        gpus = f"{len(props)}x {names}, {sum(p.total_memory for p in props) / 2**30:.1f} GiB in all, CUDA {torch.version.cuda}"
    else:
        gpus = "none"
    return {
        "Git commit": git,
        "Hostname": socket.gethostname(),
        "Platform": platform.platform(),
        "CPUs": str(os.cpu_count() or "unknown"),
        "Memory": f"{memory:.1f} GiB" if memory else "unknown",
        "GPUs": gpus,
        "Python": platform.python_version(),
        "PyTorch": torch.__version__,
        "Ray": _version("ray"),
    }


# ---------------------------------------------------------------------------
# plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_losses(f: Findings) -> bytes | None:
    """Training loss against step, one panel per stage: stages differ in data and length, so no shared axis."""
    from matplotlib.ticker import MaxNLocator

    stages = [s for s in STAGES if s in f.stages and f.stages[s].history]
    if not stages:
        return None
    fig = _figure(4 * len(stages), 3.2)
    for ax, stage in zip(fig.subplots(1, len(stages), squeeze=False)[0], stages, strict=True):
        history = f.stages[stage].history
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], linewidth=1)
        ax.set(title=stage.upper(), xlabel="step", ylabel="training loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _png(fig)


def plot_evals(table: dict[str, dict[str, float]]) -> bytes | None:
    """Grouped bars: each metric by stage; bits per byte (lower is better, another scale) in its own panel."""
    scores = {row: values for row, values in table.items() if row != BPB and values}
    bpb = table.get(BPB, {})
    if not scores and not bpb:
        return None
    panels = [p for p in (scores, bpb) if p]
    fig = _figure(max(5.0, 1.3 * len(scores) + 3) + (3 if bpb and scores else 0), 3.6)
    ratios = [max(len(scores), 1), 2][: len(panels)] if scores else [1]
    axes = list(fig.subplots(1, len(panels), squeeze=False, width_ratios=ratios)[0])
    if scores:
        ax = axes.pop(0)
        stages = [s for s in STAGES if any(s in v for v in scores.values())]
        width = 0.8 / len(stages)
        for i, stage in enumerate(stages):
            xs = [j + (i - (len(stages) - 1) / 2) * width for j, row in enumerate(scores) if stage in scores[row]]
            ax.bar(xs, [scores[row][stage] for row in scores if stage in scores[row]], width, label=stage.upper())
        ax.set_xticks(range(len(scores)), list(scores), rotation=20)
        ax.set(title="evaluation scores by stage", ylabel="score")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend(fontsize="small")
    if bpb:
        ax = axes.pop(0)
        stages = [s for s in STAGES if s in bpb]
        bars = ax.bar([s.upper() for s in stages], [bpb[s] for s in stages], color="tab:gray")
        ax.bar_label(bars, fmt="%.3f", fontsize="small")
        ax.margins(y=0.15)  # room for the labels
        ax.set(title="val bits per byte", ylabel="lower is better")
    return _png(fig)


def plot_throughput(f: Findings) -> bytes | None:
    """Steady-state training tokens per second of each stage."""
    rates = {s.upper(): f.stages[s].tokens_per_second for s in STAGES if s in f.stages}
    rates = {s: r for s, r in rates.items() if r}
    if not rates:
        return None
    fig = _figure(max(4.0, 1.2 * len(rates) + 2), 3.2)
    ax = fig.subplots()
    bars = ax.bar(list(rates), list(rates.values()), color="tab:green")
    ax.bar_label(bars, fmt="%.0f", fontsize="small")
    ax.margins(y=0.15)
    ax.set(title="training throughput (steady state)", ylabel="tokens / second")
    return _png(fig)


# ---------------------------------------------------------------------------
# markdown


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} s"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _items(pairs: dict[str, Any]) -> list[str]:
    return [f"- {k}: {v}" for k, v in pairs.items()]


def _section_environment() -> list[str]:
    return ["## Environment", "", "The machine that wrote this report.", "", *_items(environment()), ""]


def _section_missing(f: Findings) -> list[str]:
    lines = ["## Missing from storage", ""]
    return lines + ([f"- {m}" for m in f.missing] or ["Nothing: every stage and evaluation is in storage."]) + [""]


def _section_speedrun(f: Findings) -> list[str]:
    lines = ["## Speedrun", ""]
    stages = (f.speedrun or {}).get("stages") or {}
    if not stages:
        return lines + ["No speedrun record: run `nanochat speedrun`.", ""]
    lines += ["| stage | outcome | seconds |", "| --- | --- | ---: |"]
    total = 0.0
    for name, entry in stages.items():
        entry = entry if isinstance(entry, dict) else {"outcome": entry}
        seconds = entry.get("seconds")
        total += seconds or 0.0
        outcome = " ".join(str(entry[k]) for k in ("outcome", "reason") if entry.get(k))
        lines.append(f"| {_cell(name)} | {_cell(outcome or '-')} | {_fmt(seconds, 1)} |")
    return lines + ["", f"Total wall clock time: {total:.1f} s ({total / 60:.1f} min)", ""]


def _section_corpus(f: Findings) -> list[str]:
    lines = ["## Corpus", ""]
    c = f.corpus
    if c is None:
        return lines + ["Not prepared: run `nanochat data prepare`.", ""]
    return lines + _items({"Corpus": c.get("corpus"), "Source": c.get("source"), "Shards": len(c.get("shards", [])),
                           "Documents": _fmt(c.get("documents")), "Bytes": _fmt(c.get("bytes"))}) + [""]


def _section_tokenizer(f: Findings) -> list[str]:
    lines = ["## Tokenizer", ""]
    if f.tokenizer_meta is None:
        lines += ["Not trained: run `nanochat tok train`.", ""]
    else:
        m = f.tokenizer_meta
        lines += _items({"Vocabulary": _fmt(m.get("vocab_size")), "Trained on": f"{_fmt(m.get('chars'))} characters "
                         f"of {_fmt(m.get('documents'))} documents ({m.get('corpus')})",
                         "Training time": _seconds(m.get("seconds"))}) + [""]
    if f.tokenizer_eval is None:
        return lines + ["No compression table: run `nanochat tok eval`.", ""]
    return lines + ["Compression, in bytes per token (higher is better):", "", format_table(f.tokenizer_eval), ""]


def _model_line(record: StageRecord) -> str:
    mc = record.meta.get("model_config") or {}
    if not mc:
        return "-"
    heads = f"{mc.get('n_head')} heads ({mc.get('n_kv_head')} key/value)"
    return (f"{mc.get('n_layer')} layers, width {mc.get('n_embd')}, {heads}, window pattern "
            f"{mc.get('window_pattern', 'L')}, vocabulary {_fmt(mc.get('vocab_size'))}, context {mc.get('sequence_len')}")


def _training_config(record: StageRecord) -> dict[str, Any]:
    """The settings the stage ran with, from the checkpoint's config.json (not today's config)."""
    cfg = record.config
    t = cfg.get("train", {})
    lrs = ", ".join(f"{k.removesuffix('_lr')} {t[k]}" for k in ("embedding_lr", "unembedding_lr", "matrix_lr",
                                                                "scalar_lr") if k in t)
    if record.name == "base":
        return {
            "Batch": f"{_fmt(t.get('total_batch_size'))} tokens per step ({t.get('device_batch_size') or 'auto: measured'} rows of "
                     f"{t.get('seq_len')} tokens per worker per micro-step)",
            "Horizon": f"{_fmt(record.metric('horizon'))} steps",
            "Learning rates": lrs or "-",
            "Schedule": f"warmup {t.get('warmup_ratio')}, warmdown {t.get('warmdown_ratio')}, "
                        f"final {t.get('final_lr_frac')}",
        }
    stage_cfg = cfg.get(record.name, {})
    pairs = {k: v for k, v in stage_cfg.items() if k != "tasks"}
    if "tasks" in stage_cfg:
        pairs["tasks"] = ", ".join(f"{k} x{w}" for k, w in stage_cfg["tasks"].items())
    if lrs and "lr_frac" in stage_cfg:
        pairs["learning rates"] = f"{stage_cfg['lr_frac']} x base ({lrs})"
    return pairs


def _wall_seconds(f: Findings, stage: str) -> float | None:
    stages = (f.speedrun or {}).get("stages") or {}
    entry = stages.get(stage) or stages.get(f"train {stage}")
    return entry.get("seconds") if isinstance(entry, dict) else None


def _section_stage(f: Findings, stage: str) -> list[str]:
    lines = [f"## {STAGES[stage].title} ({stage})", ""]
    record = f.stages.get(stage)
    if record is None:
        return lines + [f"Not in storage: {train_how(stage)}.", ""]
    status = "complete" if record.done else "not finished"
    lines += [f"Status: {status}, checkpoint {step_dir_name(record.step)}", "", "### Configuration", ""]
    lines += _items({"Model": _model_line(record), "Parameters": _fmt(record.params),
                     "Workers": record.meta.get("world_size", "-"), **_training_config(record)})
    resumed = record.metric("resumed_from") or record.meta.get("resumed_from")
    lines += ["", "### Results", ""]
    lines += _items({
        "Steps": _fmt(record.summary.get("steps", record.meta.get("step", record.step))),
        "Tokens": _fmt(record.tokens),
        "Training time (steady state)": _seconds(record.seconds),
        "Wall clock (speedrun)": _seconds(_wall_seconds(f, stage)),
        "Tokens per second": _fmt(record.tokens_per_second, 0),
        "Final training loss": _fmt(record.final_loss),
        "Validation bits per byte": _fmt(record.val_bpb),
        "Resumed from": ", ".join(map(str, resumed)) if resumed else "never",
    })
    # whatever else the stage measured at its end (a chat stage's validation loss, say)
    shown = {"final_loss", "val_bpb", "params", "horizon", "resumed_from"}
    lines += _items({k: _fmt(v) for k, v in (record.summary.get("metrics") or {}).items() if k not in shown})
    for kind, result in f.evals.get(stage, {}).items():
        lines += ["", f"### Eval {kind} (step {result.get('step', '-')})", ""]
        lines += _eval_lines(kind, result)
    return lines + [""]


def _eval_lines(kind: str, result: dict[str, Any]) -> list[str]:
    if kind == "loss":
        return _items({"Train bits per byte": _fmt(result.get("train_bpb")), "Val bits per byte": _fmt(result.get("val_bpb"))})
    if kind == "core":
        lines = ["| task | accuracy | centered |", "| --- | ---: | ---: |"]
        centered = result.get("centered_results") or {}
        for task, acc in (result.get("results") or {}).items():
            lines.append(f"| {_cell(task)} | {_fmt(acc)} | {_fmt(centered.get(task))} |")
        return lines + ["", f"CORE: {_fmt(result.get('core_metric'))}"]
    lines = _items({CHAT_ROWS.get(t.lower(), t): _fmt(v) for t, v in (result.get("results") or {}).items()})
    lines += _items({f"{CHAT_ROWS.get(t.lower(), t)}": f"skipped ({r})" for t, r in (result.get("skipped") or {}).items()})
    return lines + [f"- ChatCORE: {_fmt(result.get('chatcore'))}"]


def _section_summary(f: Findings) -> list[str]:
    table, from_training = metric_table(f)
    width = max(len(row) for row in table)
    lines = ["## Summary", "", f"| {'Metric'.ljust(width)} | " + " | ".join(s.upper().ljust(8) for s in STAGES) + " |",
             f"|{'-' * (width + 2)}|" + "|".join("-" * 10 for _ in STAGES) + "|"]
    for row, values in table.items():
        cells = [(_fmt(values.get(s)) + ("*" if row == BPB and s in from_training else "")).ljust(8) for s in STAGES]
        lines.append(f"| {row.ljust(width)} | " + " | ".join(cells) + " |")
    lines.append("")
    if from_training:
        lines += ["\\* from the stage's own last validation during training: run `nanochat eval loss --stage "
                  "STAGE` for the comparable number.", ""]
    skipped = skipped_evals(f)
    if skipped:
        lines += ["Skipped evaluations:", "", *[f"- {s}" for s in skipped], ""]
    return lines


def _section_plots(plots: dict[str, bytes | None]) -> list[str]:
    captions = {"loss": "training loss", "evals": "evaluation scores by stage", "throughput": "training throughput"}
    lines = ["## Plots", ""]
    for name, png in plots.items():
        if png is None:
            lines += [f"No {captions[name]} plot: nothing in storage to draw yet.", ""]
        else:
            lines += [f"![{name}]({REPORT_PLOTS}/{name}.png)", ""]
    return lines


def _experiment_plot(name: str) -> str:
    return f"{REPORT_PLOTS}/experiment-{name}.png"


def _section_experiments(f: Findings) -> list[str]:
    lines = ["## Architecture experiments", ""]
    if not f.experiments:
        return lines + ["No sweep in storage: run `nanochat experiment sweep --config configs/sweeps/arch-tiny.yaml`.", ""]
    for sweep in f.experiments:
        lines += [f"### {sweep['name']}", "", describe(sweep), "", results_table(sweep["variants"]), ""]
        failed = sweep.get("failed") or {}
        if failed:
            lines += [*[f"- {name}: failed ({_cell(cause)})" for name, cause in failed.items()], ""]
        if sweep["name"] in f.experiment_plots:
            lines += [f"![{sweep['name']}: bits per byte against FLOPs]({_experiment_plot(sweep['name'])})", ""]
    return lines


def render(f: Findings, plots: dict[str, bytes | None]) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    lines = ["# nanochat training report", "", f"Generated: {now}", "", f"Run: `{f.run}` in `{f.storage_uri}`", ""]
    lines += _section_environment() + _section_missing(f) + _section_speedrun(f)
    lines += _section_corpus(f) + _section_tokenizer(f)
    for stage in STAGES:
        lines += _section_stage(f, stage)
    lines += _section_summary(f) + _section_plots(plots) + _section_experiments(f)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------


def write_report(cfg: Config, storage: Storage, out_dir: Path | None = None) -> Path:
    """Write report.md and report/*.png into storage under runs/<run>/ and into out_dir (default: the working
    directory). Returns the local report.md."""
    out_dir = Path.cwd() if out_dir is None else Path(out_dir)
    prefix = run_prefix(cfg.run)  # beside the run's stages: every run keeps its own report
    f = gather(cfg, storage)
    table, _ = metric_table(f)
    plots = {"loss": plot_losses(f), "evals": plot_evals(table), "throughput": plot_throughput(f)}
    markdown = render(f, plots)
    (out_dir / REPORT_PLOTS).mkdir(parents=True, exist_ok=True)
    for name, png in plots.items():
        key, local = f"{prefix}{REPORT_PLOTS}/{name}.png", out_dir / REPORT_PLOTS / f"{name}.png"
        if png is None:  # an earlier report's plot must not pass for this one's
            storage.delete(key)
            local.unlink(missing_ok=True)
        else:
            storage.write_bytes(key, png)
            local.write_bytes(png)
    for name, png in f.experiment_plots.items():
        storage.write_bytes(prefix + _experiment_plot(name), png)
        (out_dir / _experiment_plot(name)).write_bytes(png)
    storage.write_text(prefix + REPORT_NAME, markdown)
    path = out_dir / REPORT_NAME
    path.write_text(markdown)
    log.info("report written to %s/%s%s and %s (%d missing items)", storage.uri, prefix, REPORT_NAME, path,
             len(f.missing))
    return path
