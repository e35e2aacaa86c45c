"""The report (trainer/pipeline/report.py, `nanochat report`): report.md and its plots from what storage holds.

Storage is filled the way the stages fill it: a real corpus and tokenizer (their own stage functions), real
checkpoints of a tiny GPT trained for a few steps (write_checkpoint, CheckpointManager.save/mark_done), and
eval results in the shapes the eval stages write.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.image
import pytest
import torch

from nanochat.checkpoint import write_checkpoint
from nanochat.config import load_config
from nanochat.gpt import GPT
from services.checkpoints import CheckpointManager
from services.layout import eval_result_key
from services.storage import open_storage
from tests.support.checkpoints import upload_checkpoint
from tests.support.s3 import create_bucket, set_s3_env
from trainer.data.corpus import prepare_corpus
from trainer.data.tokenizer import evaluate_tokenizer, format_table, load_tokenizer, train_tokenizer
from trainer.pipeline.report import write_report
from trainer.stages.base import model_config
from trainer.stages.loop import TrainState, summary

RUN = "r1"
SMALL = [
    f"run={RUN}", "model.depth=1", "model.aspect_ratio=32", "model.head_dim=16", "model.n_kv_head=1",
    "tokenizer.vocab_size=300", "tokenizer.max_chars=50000", "data.docs_per_shard=20", "data.row_group_size=8",
    "train.seq_len=16", "train.device_batch_size=2", "train.total_batch_size=32", "train.max_steps=6",
    "sft.lr_frac=0.03",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ["loss", "evals", "throughput"]
NANOCHAT = str(Path(sys.executable).parent / "nanochat")

BASE_LOSS = {"stage": "base", "step": 6, "kind": "loss", "train_bpb": 2.8125, "val_bpb": 2.9375}
BASE_CORE = {"stage": "base", "step": 6, "kind": "core", "results": {"hellaswag": 0.3, "arc_easy": 0.4},
             "centered_results": {"hellaswag": 0.0674, "arc_easy": 0.2}, "core_metric": 0.1337,
             "num_items": {"hellaswag": 10, "arc_easy": 10}, "missing": []}
SFT_CHAT = {"stage": "sft", "step": 4, "results": {"arc-easy": 0.3125, "arc-challenge": 0.25, "mmlu": 0.2656,
                                                   "gsm8k": 0.0156, "spelling": 0.5},
            "skipped": {"humaneval": "no local file for humaneval and data.offline is set"}, "chatcore": 0.0421}
SPEEDRUN = {"stages": {"data": {"outcome": "done", "seconds": 0.4}, "tokenizer": {"outcome": "done", "seconds": 0.1},
                       "base": {"outcome": "done", "seconds": 31.5},
                       "eval core": {"outcome": "skipped: CORE eval bundle unavailable (offline)", "seconds": 0.2},
                       "sft": {"outcome": "done", "seconds": 22.0}}}


def train_stage(storage, cfg, stage: str, vocab_size: int, steps: int, done: bool):
    """A few real optimizer steps of a tiny GPT, checkpointed and (if done) marked done as the stages do it."""
    torch.manual_seed(len(stage))
    model = GPT(model_config(cfg, vocab_size))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    progress, t = TrainState(), cfg.train
    for _ in range(steps):
        tokens = torch.randint(0, 32, (t.device_batch_size, t.seq_len + 1))  # a small alphabet: learnable
        loss = model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        loss.backward()
        opt.step()
        opt.zero_grad()
        progress.step += 1
        progress.tokens += t.total_batch_size
        progress.train_seconds += 0.25
        progress.train_tokens_timed += t.total_batch_size
        progress.history.append({"step": progress.step, "loss": loss.item(), "lr_multiplier": 1.0})
    progress.evals.append({"step": progress.step, "val_bpb": 3.0 + len(stage) / 8})
    manager = CheckpointManager(storage, cfg.run, stage)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, model_state=model.state_dict(), optimizer_state=None, cursor=None,
                         config=cfg.model_dump(), rng=None,
                         meta={"stage": stage, "world_size": 2, "model_config": vars(model.config), **progress.__dict__})
        upload_checkpoint(storage, manager.run, manager.stage, progress.step, tmp)
    if done:
        manager.mark_done(summary(stage, progress, model, cfg, horizon=steps))
    return model.num_params(), progress.history


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Storage after data, tokenizer, base (+ loss and CORE evals), a mid stage cut short, SFT (+ chat eval)."""
    root = tmp_path_factory.mktemp("report")
    storage = open_storage(str(root / "storage"))
    cfg = load_config("tiny-cpu", overrides=SMALL)
    prepare_corpus(cfg.data, storage, limit=40)
    train_tokenizer(cfg, storage)
    evaluate_tokenizer(cfg, storage)
    vocab_size = load_tokenizer(storage).vocab_size
    params, base_history = train_stage(storage, cfg, "base", vocab_size, 6, done=True)
    train_stage(storage, cfg, "mid", vocab_size, 3, done=False)
    _, sft_history = train_stage(storage, cfg, "sft", vocab_size, 4, done=True)
    for stage, kind, result in [("base", "loss", BASE_LOSS), ("base", "core", BASE_CORE), ("sft", "chat", SFT_CHAT)]:
        storage.write_text(eval_result_key(RUN, stage, kind), json.dumps(result))
    storage.write_text(f"runs/{RUN}/speedrun.json", json.dumps(SPEEDRUN))
    out = root / "out"
    path = write_report(cfg, storage, out_dir=out)
    return {"cfg": cfg, "storage": storage, "out": out, "path": path, "text": path.read_text(), "params": params,
            "base_history": base_history, "sft_history": sft_history}


def section(text: str, heading: str) -> str:
    """The body of a '## heading' section (up to the next '## ')."""
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def table_row(text: str, metric: str) -> list[str]:
    line = next(line for line in section(text, "Summary").splitlines() if line.startswith(f"| {metric} "))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


SECTIONS = ["Environment", "Missing from storage", "Speedrun", "Corpus", "Tokenizer", "Base training (base)",
            "Midtraining (mid)", "Supervised fine-tuning (sft)", "Reinforcement learning (rl)", "Summary", "Plots",
            "Architecture experiments"]


def test_report_has_every_section_in_order(full):
    text = full["text"]
    assert text.startswith("# nanochat training report\n\nGenerated: ")
    positions = [text.index(f"\n## {name}\n") for name in SECTIONS]
    assert positions == sorted(positions)


def test_report_is_in_storage_and_in_the_local_folder(full):
    assert full["path"] == full["out"] / "report.md"
    assert full["storage"].read_text(f"runs/{RUN}/report.md") == full["text"]
    assert not full["storage"].exists("report.md"), "the report is kept per run, not at the storage root"


def test_each_run_keeps_its_own_report(full, tmp_path):
    """A second run's report lands beside its own stages; the first run's stays as it was."""
    storage, first = full["storage"], full["text"]
    other = load_config("tiny-cpu", overrides=[*SMALL, "run=r2"])
    text = write_report(other, storage, out_dir=tmp_path).read_text()
    assert "Run: `r2`" in text and storage.read_text("runs/r2/report.md") == text
    assert storage.read_text(f"runs/{RUN}/report.md") == first
    assert all(storage.read_bytes(f"runs/{RUN}/report/{name}.png").startswith(PNG_SIGNATURE) for name in PLOTS)
    assert (tmp_path / "report.md").read_text() == text  # the newest is the local copy


def test_environment_names_code_and_software_versions(full):
    env = section(full["text"], "Environment")
    for line in [f"- PyTorch: {torch.__version__}", f"- Python: {sys.version.split()[0]}", "- Ray: 2.", "- CPUs: ",
                 "- Memory: ", "- GPUs: ", "- Hostname: "]:
        assert line in env, line
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                            text=True)
    if commit.returncode == 0:
        assert f"- Git commit: {commit.stdout.strip()} on " in env


def test_speedrun_table_lists_outcomes_and_seconds(full):
    speedrun = section(full["text"], "Speedrun")
    assert "| base | done | 31.5 |" in speedrun
    assert "| eval core | skipped: CORE eval bundle unavailable (offline) | 0.2 |" in speedrun
    assert "Total wall clock time: 54.2 s" in speedrun


def test_corpus_and_tokenizer_sections_come_from_their_stages(full):
    storage = full["storage"]
    corpus = json.loads(storage.read_text("data/stdlib/_SUCCESS.json"))
    assert f"- Documents: {corpus['documents']}" in section(full["text"], "Corpus")
    tokenizer = section(full["text"], "Tokenizer")
    assert "- Vocabulary: 300" in tokenizer
    assert format_table(json.loads(storage.read_text("tokenizer/eval.json"))) in tokenizer


def test_stage_sections_give_config_time_tokens_and_losses(full):
    base = section(full["text"], "Base training (base)")
    assert "Status: complete, checkpoint step_000006" in base
    assert "1 layers, width 32, 2 heads (1 key/value)" in base
    assert f"- Parameters: {full['params']:,}" in base
    assert "- Batch: 32 tokens per step (2 rows of 16 tokens" in base and "- Horizon: 6 steps" in base
    assert "- Learning rates: embedding 0.3, unembedding 0.008, matrix 0.02, scalar 0.5" in base
    assert "- Tokens: 192" in base and "- Training time (steady state): 1.5 s" in base
    assert "- Tokens per second: 128" in base and "- Wall clock (speedrun): 31.5 s" in base
    assert f"- Final training loss: {full['base_history'][-1]['loss']:.4f}" in base
    assert "- Validation bits per byte: 3.5000" in base
    assert "CORE: 0.1337" in base and "| arc_easy | 0.4000 | 0.2000 |" in base

    sft = section(full["text"], "Supervised fine-tuning (sft)")
    assert f"- Parameters: {full['params']:,}" in sft
    assert "- tasks: identity x1.0, spelling x0.5, stdlib-docs x1.0" in sft and "- learning rates: 0.03 x base (embedding 0.3" in sft
    assert f"- Final training loss: {full['sft_history'][-1]['loss']:.4f}" in sft
    assert "- HumanEval: skipped (no local file for humaneval" in sft

    mid = section(full["text"], "Midtraining (mid)")
    assert "Status: not finished, checkpoint step_000003" in mid
    assert f"- Parameters: {full['params']:,}" in mid  # no DONE summary: counted from the checkpoint's model config
    assert "- Tokens: 96" in mid
    assert "Not in storage: optional: run `nanochat train rl`" in section(full["text"], "Reinforcement learning (rl)")


def test_summary_table_holds_every_metric_by_stage(full):
    text = full["text"]
    assert table_row(text, "Metric") == ["BASE", "MID", "SFT", "RL"]
    assert table_row(text, "CORE") == ["0.1337", "-", "-", "-"]
    assert table_row(text, "ARC-Easy") == ["-", "-", "0.3125", "-"]
    assert table_row(text, "ARC-Challenge") == ["-", "-", "0.2500", "-"]
    assert table_row(text, "MMLU") == ["-", "-", "0.2656", "-"]
    assert table_row(text, "GSM8K") == ["-", "-", "0.0156", "-"]
    assert table_row(text, "HumanEval") == ["-", "-", "-", "-"]
    assert table_row(text, "spelling") == ["-", "-", "0.5000", "-"]  # a task outside nanochat's rows gets its own
    assert table_row(text, "ChatCORE") == ["-", "-", "0.0421", "-"]
    # base from `eval loss`; mid and sft from their own last validation, marked as such
    assert table_row(text, "bits per byte") == ["2.9375", "3.3750*", "3.3750*", "-"]
    rows = [line.split("|")[1].strip() for line in section(text, "Summary").splitlines() if line.startswith("| ")]
    assert rows == ["Metric", "CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "spelling",
                    "ChatCORE", "bits per byte"]


def test_skipped_evals_are_listed_with_their_reason_below_the_table(full):
    summary = section(full["text"], "Summary")
    skipped = summary[summary.index("Skipped evaluations:") :]
    assert "- SFT HumanEval: no local file for humaneval and data.offline is set" in skipped
    assert "- speedrun `eval core`: CORE eval bundle unavailable (offline)" in skipped


def test_missing_lists_what_storage_lacks(full):
    missing = section(full["text"], "Missing from storage")
    assert "- mid: not finished, newest checkpoint step_000003: run `nanochat train mid` to resume" in missing
    assert "- rl: not trained" in missing
    assert "base" not in missing and "sft" not in missing and "tokenizer" not in missing


def test_plots_are_valid_pngs_embedded_with_relative_links(full):
    for name in PLOTS:
        assert f"![{name}](report/{name}.png)" in section(full["text"], "Plots")
        data = full["storage"].read_bytes(f"runs/{RUN}/report/{name}.png")
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        local = full["out"] / "report" / f"{name}.png"
        assert local.read_bytes() == data
        image = matplotlib.image.imread(local)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0  # something is drawn, not a blank canvas


def test_report_from_almost_empty_storage_lists_what_is_missing(tmp_path):
    storage = open_storage(str(tmp_path / "storage"))
    cfg = load_config("tiny-cpu", overrides=SMALL)
    out = tmp_path / "out"
    # plots from an earlier report must not survive into one that has nothing to draw
    for name in PLOTS:
        storage.write_bytes(f"runs/{RUN}/report/{name}.png", PNG_SIGNATURE)
        (out / "report").mkdir(parents=True, exist_ok=True)
        (out / "report" / f"{name}.png").write_bytes(PNG_SIGNATURE)
    storage.write_text(eval_result_key(RUN, "sft", "chat"), json.dumps(SFT_CHAT))  # an eval without its stage is ignored

    text = write_report(cfg, storage, out_dir=out).read_text()
    positions = [text.index(f"\n## {name}\n") for name in SECTIONS]
    assert positions == sorted(positions)
    missing = section(text, "Missing from storage")
    for expected in ["corpus stdlib (`data/stdlib/_SUCCESS.json`): run `nanochat data prepare`",
                     "tokenizer (`tokenizer/meta.json`): run `nanochat tok train`",
                     "base: not trained (`runs/r1/base/`): run `nanochat train base`",
                     "sft: not trained", "speedrun record (`runs/r1/speedrun.json`): run `nanochat speedrun`"]:
        assert f"- {expected}" in missing
    assert set(table_row(text, "ARC-Easy") + table_row(text, "CORE")) == {"-"}
    assert "No training loss plot" in section(text, "Plots") and "![" not in text
    assert not list((out / "report").iterdir()) and not storage.list(f"runs/{RUN}/report/")


def test_unreadable_result_is_reported_not_fatal(tmp_path):
    storage = open_storage(str(tmp_path / "storage"))
    storage.write_text("tokenizer/meta.json", "{not json")
    text = write_report(load_config("tiny-cpu", overrides=SMALL), storage, out_dir=tmp_path).read_text()
    assert "- tokenizer (`tokenizer/meta.json`): unreadable (" in section(text, "Missing from storage")


def test_report_works_on_s3_storage(full, s3_server, monkeypatch, tmp_path):
    set_s3_env(monkeypatch, s3_server)
    s3 = open_storage(f"s3://{create_bucket(s3_server)}/nanochat")
    local = full["storage"]
    for key in local.list():
        if not key.startswith(f"runs/{RUN}/report"):
            s3.write_bytes(key, local.read_bytes(key))
    text = write_report(full["cfg"], s3, out_dir=tmp_path).read_text()
    assert section(text, "Summary") == section(full["text"], "Summary")
    assert s3.read_text(f"runs/{RUN}/report.md") == text
    assert all(s3.read_bytes(f"runs/{RUN}/report/{name}.png").startswith(PNG_SIGNATURE) for name in PLOTS)


def test_cli_report_prints_the_path_and_ends_with_the_result_line(full, tmp_path):
    out = subprocess.run([NANOCHAT, "--storage", str(full["storage"].uri), "--run", RUN, "report"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["stage"] == "report" and result["run"] == RUN
    path = Path(result["metrics"]["path"])
    assert path == tmp_path / "report.md" and str(path) in out.stdout.splitlines()[0]
    assert table_row(path.read_text(), "CORE") == ["0.1337", "-", "-", "-"]
    assert (tmp_path / "report" / "loss.png").read_bytes().startswith(PNG_SIGNATURE)
