"""Architecture sweeps (trainer/pipeline/sweeps.py, `nanochat experiment sweep`): variants validated up front and named
in errors, equal FLOPs per variant, the results table and plot, the report's section, and one real sweep of
three variants trained as Ray tasks on a shrunken tiny preset."""

import json
import math
from pathlib import Path

import pytest

from cli.main import main
from nanochat.config import ConfigError, available_presets, load_config
from services.layout import sweep_prefix
from services.storage import LocalStorage
from trainer.data.corpus import list_shards, split_shards
from trainer.data.loader import DataLoader, token_bytes
from trainer.data.tokenizer import load_tokenizer
from trainer.pipeline.report import write_report
from trainer.pipeline.sweeps import (
    PLOT,
    RESULTS,
    TABLE,
    plan_sweep,
    results_markdown,
    results_table,
    summary,
    write_results,
)
from trainer.stages.sweep import eval_steps

SWEEP_FILE = "configs/sweeps/arch-tiny.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
THREE = "experiment.variants={baseline: {}, swiglu: {model.activation: swiglu}, mqa: {model.n_kv_head: 1}}"


def config(*overrides: str):
    return load_config(preset="tiny-cpu", overrides=list(overrides))


def plan_error(variants: str) -> str:
    with pytest.raises(ConfigError) as e:
        plan_sweep(config(f"experiment.variants={variants}"))
    return str(e.value)


# ---------------------------------------------------------------------------
# variants


def test_an_unknown_key_in_a_variant_names_the_variant_and_the_field():
    message = plan_error("{ok: {}, typo: {model.nrom: layernorm}}")
    assert "'typo'" in message and "model.nrom" in message and "did you mean 'norm'" in message


def test_a_bad_value_in_a_variant_names_the_variant_the_field_and_what_is_allowed():
    message = plan_error("{tanh: {model.activation: tanh}}")
    assert "'tanh'" in message and "model.activation" in message and "swiglu" in message


def test_a_model_shape_a_variant_cannot_have_is_a_config_error():
    message = plan_error("{three-kv: {model.n_kv_head: 3}}")  # the tiny preset has 4 heads
    assert "'three-kv'" in message and "model.n_kv_head=3" in message and "must divide" in message


def test_a_variant_may_not_change_the_shared_corpus_or_tokenizer():
    message = plan_error("{other-data: {data.source: local, model.norm: layernorm}}")
    assert "'other-data'" in message and "data.source" in message and "model.* and train.*" in message


def test_a_sweep_without_variants_names_the_setting():
    with pytest.raises(ConfigError, match=r"experiment\.variants is empty"):
        plan_sweep(config())


def test_cli_sweep_without_variants_exits_2_before_touching_storage(tmp_path, capsys):
    assert main(["experiment", "sweep", "--storage", str(tmp_path / "storage")]) == 2
    assert "experiment.variants" in capsys.readouterr().err
    assert not (tmp_path / "storage").exists()


def test_cli_sweep_with_a_bad_variant_exits_2_naming_it(tmp_path, capsys):
    code = main(["experiment", "sweep", "--storage", str(tmp_path), "--set", "experiment.variants={x: {model.depht: 2}}"])
    err = capsys.readouterr().err
    assert code == 2 and "'x'" in err and "model.depht" in err


# ---------------------------------------------------------------------------
# equal FLOPs


def test_every_variant_gets_the_budget_within_one_step():
    budget, variants = plan_sweep(load_config(config_files=[SWEEP_FILE]))
    by_name = {v.name: v for v in variants}
    baseline = by_name["baseline"]
    assert budget == baseline.flops_per_token * baseline.cfg.train.total_batch_size * baseline.cfg.train.max_steps
    for v in variants:
        assert abs(v.steps * v.flops_per_step - budget) <= v.flops_per_step / 2, v.name
    # costlier per token -> fewer steps; cheaper -> more
    assert by_name["mha"].flops_per_token > baseline.flops_per_token and by_name["mha"].steps < baseline.steps
    for cheaper in ("swiglu", "mqa", "sliding-window"):
        assert by_name[cheaper].flops_per_token < baseline.flops_per_token, cheaper
        assert by_name[cheaper].steps > baseline.steps, cheaper
    assert by_name["layernorm"].steps == baseline.steps  # no matmul changed


def test_an_explicit_budget_and_the_depth_dial_horizon():
    budget, [v] = plan_sweep(config("experiment.variants={a: {}}", "experiment.flops_budget=1e12"))
    assert budget == 1e12 and v.steps == round(1e12 / v.flops_per_step)
    budget, [v] = plan_sweep(config("experiment.variants={a: {}}", "train.max_steps=-1"))
    ratio = v.cfg.train.target_param_data_ratio
    assert v.steps == int(ratio * v.scaling_params) // v.cfg.train.total_batch_size
    _, [tiny] = plan_sweep(config("experiment.variants={a: {}}", "experiment.flops_budget=1"))
    assert tiny.steps == 1


def test_evaluations_are_evenly_spaced_and_the_last_is_at_the_end():
    assert eval_steps(20, 4) == [5, 10, 15, 20]
    assert eval_steps(7, 3) == [2, 5, 7]
    assert eval_steps(2, 4) == [1, 2]


def test_the_example_sweep_file_is_not_a_preset_and_covers_the_issue():
    assert Path(SWEEP_FILE).stem not in available_presets()  # configs/sweeps/ is not globbed as presets
    assert {"d12", "d20", "d26", "tiny-cpu"} <= set(available_presets())
    cfg = load_config(config_files=[SWEEP_FILE])
    assert cfg.preset == "tiny-cpu" and len(cfg.experiment.variants) >= 8
    settings = {key: value for overrides in cfg.experiment.variants.values() for key, value in overrides.items()}
    assert settings["model.norm"] == "layernorm" and settings["model.n_kv_head"] == 1
    assert settings["model.window_pattern"] == "SSSL" and settings["model.qk_norm"] is False
    assert settings["model.rope_base"] == 100000 and settings["model.activation"] in ("gelu", "swiglu")


# ---------------------------------------------------------------------------
# results


def fake_result(name: str, overrides: dict, bpb: float, params: int = 1000) -> dict:
    curve = [{"step": s, "flops": s * 1e9, "val_bpb": bpb + 1 / s} for s in (5, 10)]
    return {"name": name, "overrides": overrides, "params": params, "flops_per_token": 1e6, "steps": 10,
            "tokens": 10_000, "flops": 1e10, "val_bpb": bpb, "train_loss": 3.0, "tokens_per_second": 2000.0,
            "seconds": 5.0, "curve": curve}


SWEEP = {"name": "demo", "run": "r1", "preset": "tiny-cpu", "flops_budget": 1e10, "failed": {},
         "variants": [fake_result("baseline", {}, 2.5, 1_671_196), fake_result("no-qk", {"model.qk_norm": False}, 2.25),
                      fake_result("diverged", {"train.matrix_lr": 10}, math.nan)]}


def test_the_table_lists_variants_best_first_with_their_settings():
    lines = results_table(SWEEP["variants"]).splitlines()
    assert lines[0] == "| variant | overrides | params | FLOPs | steps | val bpb | tokens/s |"
    assert lines[2] == "| no-qk | model.qk_norm=false | 1,000 | 1e+10 | 10 | 2.2500 | 2,000 |"
    assert lines[3].startswith("| baseline | (as configured) | 1,671,196 |")
    assert lines[4].startswith("| diverged | train.matrix_lr=10 |") and "| nan |" in lines[4]


def test_results_markdown_describes_the_sweep_and_links_the_plot():
    text = results_markdown(SWEEP)
    assert text.startswith("# Architecture sweep `demo`")
    assert "3 variants trained for 1e+10 FLOPs each" in text and f"![bits per byte against FLOPs]({PLOT})" in text


def test_the_result_line_sums_the_variants(local_storage):
    fields = summary(SWEEP, local_storage)
    assert fields["steps"] == 30 and fields["tokens"] == 30_000 and fields["tokens_per_second"] == 2000.0
    assert fields["metrics"]["best"] == "no-qk" and fields["metrics"]["results"].endswith("runs/r1/experiments/demo/")
    json.dumps(fields)


def test_the_report_shows_each_sweep_with_its_table_and_plot(local_storage, tmp_path):
    cfg = config("run=r1")
    write_results(local_storage, sweep_prefix("r1", "demo"), SWEEP)
    text = write_report(cfg, local_storage, out_dir=tmp_path).read_text()
    section = text[text.index("## Architecture experiments\n"):]
    assert "### demo" in section and results_table(SWEEP["variants"]) in section
    assert "![demo: bits per byte against FLOPs](report/experiment-demo.png)" in section
    assert (tmp_path / "report" / "experiment-demo.png").read_bytes().startswith(PNG_SIGNATURE)
    assert local_storage.read_bytes("runs/r1/report/experiment-demo.png").startswith(PNG_SIGNATURE)


def test_the_report_says_how_to_run_a_sweep_when_there_is_none(local_storage, tmp_path):
    text = write_report(config(), local_storage, out_dir=tmp_path).read_text()
    assert "No sweep in storage: run `nanochat experiment sweep --config configs/sweeps/arch-tiny.yaml`" in text


# ---------------------------------------------------------------------------
# a real sweep

# the tiny preset shrunk so a variant trains in seconds; what is tested is the machinery
SMALL = [
    "run=sweep", "model.depth=2", "model.head_dim=32", "tokenizer.vocab_size=512", "tokenizer.max_chars=400000",
    "train.seq_len=64", "train.device_batch_size=4", "train.total_batch_size=512", "train.max_steps=24",
    "train.eval_tokens=1024", "data.docs_per_shard=200", "experiment.name=tiny", "experiment.eval_points=3", THREE,
]


def uniform_bpb(cfg, storage) -> float:
    """Bits per byte of a uniform guess over the vocabulary, on the batches the sweep evaluates on."""
    t, tokenizer = cfg.train, load_tokenizer(storage)
    lengths = token_bytes(tokenizer)
    _, val = split_shards(list_shards(storage, cfg.data.corpus_name), cfg.data.val_shards)
    loader = DataLoader(storage, val, tokenizer, t.device_batch_size, t.seq_len, loop=False)
    counted = total_bytes = 0
    for _, (_, targets) in zip(range(t.eval_tokens // (t.device_batch_size * t.seq_len)), loader, strict=False):
        counted += int((lengths[targets] > 0).sum())
        total_bytes += int(lengths[targets].sum())
    return math.log2(tokenizer.vocab_size) * counted / total_bytes


@pytest.mark.system  # a Ray job
@pytest.mark.slow
def test_a_sweep_of_three_variants_trains_as_ray_tasks_and_is_reported(tmp_path, capsys, monkeypatch):
    storage_dir = tmp_path / "storage"
    argv = ["experiment", "sweep", "--preset", "tiny-cpu", "--storage", str(storage_dir)]
    for item in SMALL:
        argv += ["--set", item]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out.strip().splitlines()
    line = json.loads(out[-1])
    assert line["stage"] == "experiment" and line["run"] == "sweep" and line["tokens_per_second"] > 0
    assert "| variant | overrides | params | FLOPs | steps | val bpb | tokens/s |" in out

    storage, prefix = LocalStorage(storage_dir), sweep_prefix("sweep", "tiny")
    assert storage.read_bytes(prefix + PLOT).startswith(PNG_SIGNATURE)
    assert results_table(json.loads(storage.read_text(prefix + RESULTS))["variants"]) in storage.read_text(prefix + TABLE)
    sweep = json.loads(storage.read_text(prefix + RESULTS))
    assert [r["name"] for r in sweep["variants"]] == ["baseline", "swiglu", "mqa"] and sweep["failed"] == {}
    cfg = load_config(preset="tiny-cpu", overrides=SMALL)
    uniform = uniform_bpb(cfg, storage)
    for r in sweep["variants"]:
        step_flops = r["flops_per_token"] * cfg.train.total_batch_size
        assert abs(r["flops"] - sweep["flops_budget"]) <= step_flops / 2 + 1, r["name"]
        assert math.isfinite(r["val_bpb"]) and r["val_bpb"] < uniform, (r["name"], r["val_bpb"], uniform)
        assert [p["step"] for p in r["curve"]] == eval_steps(r["steps"], 3) and r["tokens_per_second"] > 0
        assert line["metrics"]["variants"][r["name"]]["val_bpb"] == r["val_bpb"]
    assert len({r["steps"] for r in sweep["variants"]}) > 1, "swiglu and mqa cost less per token: more steps"

    monkeypatch.chdir(tmp_path)
    assert main(["report", "--storage", str(storage_dir), "--run", "sweep"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Architecture experiments" in report and "### tiny" in report and "| swiglu | model.activation=swiglu |" in report
    assert (tmp_path / "report" / "experiment-tiny.png").read_bytes().startswith(PNG_SIGNATURE)
