"""
Architecture sweeps (`nanochat experiment sweep`): model variants trained for the same compute, compared by
validation bits per byte.

Notable:
- a variant is a set of `--set`-style overrides (experiment.variants) layered on the loaded config: model.* and
  train.* keys only, since every variant shares the corpus and the tokenizer. Every variant is validated (its
  config and its model's shape) before anything starts; an error names the variant and the field
- equal FLOPs, not equal steps: steps = round(budget / (FLOPs per token x train.total_batch_size)), so a variant
  that costs more per token trains on fewer tokens; the FLOPs actually spent are recorded
- one Ray task per variant, all submitted at once: Ray runs side by side as many as experiment.cpus_per_variant
  and gpus_per_variant allow. Inside, base training's parts in the shared step loop (trainer/stages/sweep.py)
- results in storage under runs/<run>/experiments/<name>/: results.json, results.md (the table, best first) and
  bpb_vs_flops.png; `nanochat report` shows every sweep it finds there
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from nanochat.config import Config, ConfigError, with_overrides
from nanochat.gpt import GPT
from services.layout import sweep_prefix
from services.ray_cluster import connect
from services.storage import Storage
from trainer.optim import (
    num_scaling_params,
    training_horizon,
)
from trainer.pipeline.prepare import prepare_data, prepare_tokenizer
from trainer.stages.base import model_config
from trainer.stages.sweep import VariantSettings, train_variant
from trainer.stages.table import StageFailed

log = logging.getLogger(__name__)

VARIABLE_SECTIONS = ("model", "train")  # data and tokenizer are shared: bits per byte stays comparable
RESULTS, TABLE, PLOT = "results.json", "results.md", "bpb_vs_flops.png"
EXAMPLE = "configs/sweeps/arch-tiny.yaml"


# ---------------------------------------------------------------------------
# planning: the variants and their share of the budget


@dataclass
class Variant:
    """One variant's config and what it costs; steps is its share of the sweep's FLOPs budget."""

    name: str
    overrides: dict[str, Any]
    cfg: Config
    params: int
    scaling_params: int
    flops_per_token: float
    steps: int = 0

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.cfg.train.total_batch_size


def make_variant(cfg: Config, name: str, overrides: dict[str, Any]) -> Variant:
    """cfg with the variant's overrides, its model sized on the meta device (no memory, no initialisation)."""
    fixed = sorted(key for key in overrides if key.split(".")[0] not in VARIABLE_SECTIONS)
    if fixed:
        raise ConfigError(f"experiment variant {name!r}: {', '.join(fixed)} cannot vary within a sweep (every "
                          f"variant shares the corpus and tokenizer); a variant sets model.* and train.* keys")
    try:
        variant_cfg = with_overrides(cfg, overrides)
        with torch.device("meta"):
            model = GPT(model_config(variant_cfg, cfg.tokenizer.vocab_size))
    except ConfigError as e:
        raise ConfigError(f"experiment variant {name!r}: {e}") from None
    except ValueError as e:  # the model's own shape rules, e.g. n_kv_head must divide the heads
        raise ConfigError(f"experiment variant {name!r}: model.{e}") from None
    return Variant(name, overrides, variant_cfg, model.num_params(), num_scaling_params(model), model.estimate_flops())


def default_budget(first: Variant) -> float:
    """The first variant's FLOPs at train.max_steps, or at its depth-dial horizon when that is -1."""
    t = first.cfg.train
    steps = t.max_steps if t.max_steps > 0 else training_horizon(
        first.scaling_params, t.target_param_data_ratio, t.total_batch_size).num_steps
    return steps * first.flops_per_step


def steps_for(budget: float, flops_per_step: float) -> int:
    return max(1, round(budget / flops_per_step))


def plan_sweep(cfg: Config) -> tuple[float, list[Variant]]:
    """(FLOPs budget per variant, the variants with their steps); raises ConfigError naming a bad variant."""
    if not cfg.experiment.variants:
        raise ConfigError(f"experiment.variants is empty: a sweep needs variants (name -> {{config key: value}}), "
                          f"e.g. `--config {EXAMPLE}`")
    variants = [make_variant(cfg, name, overrides) for name, overrides in cfg.experiment.variants.items()]
    budget = cfg.experiment.flops_budget or default_budget(variants[0])
    for variant in variants:
        variant.steps = steps_for(budget, variant.flops_per_step)
    return budget, variants


# ---------------------------------------------------------------------------
# the sweep


def run_sweep(cfg: Config, storage: Storage, ray_address: str | None = None) -> dict[str, Any]:
    """Train every variant as a Ray task at the same FLOPs budget and write the results into storage.
    Returns the sweep's record (results.json); raises StageFailed naming the variants that failed."""
    import ray

    from trainer.pipeline.jobs import worker_env

    budget, variants = plan_sweep(cfg)  # a bad variant fails here, before any work
    log.info("corpus: %s", prepare_data(cfg, storage))
    log.info("tokenizer: %s", prepare_tokenizer(cfg, storage))
    e = cfg.experiment
    log.info("sweep %s: %d variants at %.3g FLOPs each (%s)", e.name, len(variants), budget,
             ", ".join(f"{v.name} {v.steps} steps" for v in variants))

    connect(ray_address, dashboard=False)  # an embedded cluster: its CPUs are the variants'
    task = ray.remote(num_cpus=e.cpus_per_variant, num_gpus=e.gpus_per_variant,
                      runtime_env={"env_vars": worker_env()})(train_variant)
    refs = {task.options(name=f"experiment-{v.name}").remote(VariantSettings(
        v.name, v.cfg, storage.uri, v.steps, e.eval_points, e.gpus_per_variant, max(1, int(e.cpus_per_variant)),
    )): v for v in variants}
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    pending = list(refs)
    while pending:
        [ref], pending = ray.wait(pending, num_returns=1)
        variant = refs[ref]
        try:
            results[variant.name] = {"name": variant.name, "overrides": variant.overrides, **ray.get(ref)}
            log.info("variant %s done: val bpb %.4f (%d of %d finished)", variant.name,
                     results[variant.name]["val_bpb"], len(results) + len(failed), len(variants))
        except ray.exceptions.RayError as error:
            cause = getattr(error, "cause", None) or error
            failed[variant.name] = f"{type(cause).__name__}: {cause}"
            log.error("variant %s failed: %s", variant.name, failed[variant.name])

    prefix = sweep_prefix(cfg.run, e.name)
    sweep = {"name": e.name, "run": cfg.run, "preset": cfg.preset, "flops_budget": budget,
             "variants": [results[v.name] for v in variants if v.name in results], "failed": failed}
    if sweep["variants"]:
        write_results(storage, prefix, sweep)
    if failed:
        written = f"; the others' results are in {storage.uri}/{prefix}" if sweep["variants"] else ""
        raise StageFailed("; ".join(f"variant {name!r} failed: {cause}" for name, cause in failed.items()) + written)
    return sweep


def summary(sweep: dict[str, Any], storage: Storage) -> dict[str, Any]:
    """The sweep's fields of the command's JSON line: totals, and per variant what the table shows.
    tokens_per_second is the variants' combined steady-state rate: all tokens over all timed seconds."""
    variants = sweep["variants"]
    tokens = sum(r["tokens"] for r in variants)
    return {
        "steps": sum(r["steps"] for r in variants), "tokens": tokens,
        "tokens_per_second": tokens / sum(r["tokens"] / r["tokens_per_second"] for r in variants),
        "metrics": {
            "name": sweep["name"], "results": f"{storage.uri}/{sweep_prefix(sweep['run'], sweep['name'])}",
            "flops_budget": sweep["flops_budget"], "best": by_bpb(variants)[0]["name"],
            "variants": {r["name"]: {k: r[k] for k in ("val_bpb", "params", "steps", "flops", "tokens_per_second")}
                         for r in variants},
        },
    }


# ---------------------------------------------------------------------------
# results: the table and the plot


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _setting(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def by_bpb(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best (lowest validation bits per byte) first; a diverged variant (not finite) last."""
    return sorted(variants, key=lambda r: r["val_bpb"] if math.isfinite(r["val_bpb"]) else math.inf)


def results_table(variants: list[dict[str, Any]]) -> str:
    """The markdown table of a sweep's variants, best first."""
    lines = ["| variant | overrides | params | FLOPs | steps | val bpb | tokens/s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in by_bpb(variants):
        overrides = ", ".join(f"{k}={_setting(v)}" for k, v in r["overrides"].items()) or "(as configured)"
        lines.append(f"| {_cell(r['name'])} | {_cell(overrides)} | {r['params']:,} | {r['flops']:.3g} | "
                     f"{r['steps']:,} | {r['val_bpb']:.4f} | {r['tokens_per_second']:,.0f} |")
    return "\n".join(lines)


def describe(sweep: dict[str, Any]) -> str:
    """One sentence on what the sweep compared."""
    return (f"Run `{sweep['run']}`, preset `{sweep['preset']}`: {len(sweep['variants'])} variants trained for "
            f"{sweep['flops_budget']:.3g} FLOPs each (within one step), best first by validation bits per byte "
            f"(lower is better).")


def results_markdown(sweep: dict[str, Any]) -> str:
    lines = [f"# Architecture sweep `{sweep['name']}`", "", describe(sweep), "", results_table(sweep["variants"]), ""]
    if sweep["failed"]:
        lines += [*[f"- {name}: failed ({_cell(cause)})" for name, cause in sweep["failed"].items()], ""]
    return "\n".join(lines + [f"![bits per byte against FLOPs]({PLOT})", ""])


def plot_bpb_vs_flops(sweep: dict[str, Any]) -> bytes:
    """Validation bits per byte against training FLOPs (log scale), one line per variant (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in by_bpb(sweep["variants"]):
        ax.plot([p["flops"] for p in r["curve"]], [p["val_bpb"] for p in r["curve"]], marker="o", markersize=3,
                label=f"{r['name']} ({r['val_bpb']:.3f})")
    ax.set_xscale("log")
    ax.set(title=f"sweep {sweep['name']}: bits per byte against compute", xlabel="training FLOPs",
           ylabel="validation bits per byte")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_results(storage: Storage, prefix: str, sweep: dict[str, Any]) -> None:
    """results.json, results.md and bpb_vs_flops.png under prefix; the record last, so it names a complete set."""
    storage.write_bytes(prefix + PLOT, plot_bpb_vs_flops(sweep))
    storage.write_text(prefix + TABLE, results_markdown(sweep))
    storage.write_text(prefix + RESULTS, json.dumps(sweep, indent=1))
    log.info("sweep %s: results in %s/%s", sweep["name"], storage.uri, prefix)
