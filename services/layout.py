"""
The storage layout: every key the pipeline reads or writes, relative to the storage root (a local folder or
an s3://bucket/prefix). Training writes these keys and serving reads them, so this file is the contract
between the two; nothing else spells a key.

    data/<corpus>/shard_XXXXX.parquet, data/<corpus>/_SUCCESS.json      the corpus
    tokenizer/tokenizer.json, meta.json, eval.json                      the tokenizer
    evals/eval_bundle.zip                                               the CORE task bundle
    runs/<run>/<stage>/step_XXXXXX/, latest, DONE.json                  a stage's checkpoints
    runs/<run>/evals/<stage>_<kind>.json                                evaluation results
    runs/<run>/speedrun.json, report.md, report/*.png                   the speedrun record and report
    runs/<run>/experiments/<name>/                                      an architecture sweep's results
    runs/<run>/tensorboard/<stage>/                                     event files (local storage only)
"""

from __future__ import annotations

# the corpus
CORPUS_SUCCESS = "_SUCCESS.json"

# the tokenizer
TOKENIZER_KEY = "tokenizer/tokenizer.json"
TOKENIZER_META_KEY = "tokenizer/meta.json"
TOKENIZER_EVAL_KEY = "tokenizer/eval.json"

# the CORE evaluation's task bundle, kept in storage once downloaded
EVAL_BUNDLE_KEY = "evals/eval_bundle.zip"

# inside a stage's folder
LATEST = "latest"
DONE = "DONE.json"

# inside a run's folder
SPEEDRUN_RECORD = "speedrun.json"
REPORT_NAME = "report.md"
REPORT_PLOTS = "report"  # report/*.png, beside report.md


def corpus_prefix(corpus: str) -> str:
    return f"data/{corpus}/"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def run_prefix(run: str) -> str:
    """A run's folder: its stages, evaluations, speedrun record, report and sweeps."""
    return f"runs/{run}/"


def stage_prefix(run: str, stage: str) -> str:
    """A stage's folder: its step folders, `latest` and DONE.json."""
    return f"{run_prefix(run)}{stage}/"


def step_dir_name(step: int) -> str:
    """The folder name of a step; Ray Train's checkpoint_dir_name must be exactly this."""
    return f"step_{step:06d}"


def eval_result_key(run: str, stage: str, kind: str) -> str:
    return f"{run_prefix(run)}evals/{stage}_{kind}.json"


def speedrun_record_key(run: str) -> str:
    return run_prefix(run) + SPEEDRUN_RECORD


def experiments_prefix(run: str) -> str:
    return f"{run_prefix(run)}experiments/"


def sweep_prefix(run: str, name: str) -> str:
    return f"{experiments_prefix(run)}{name}/"


def tensorboard_path(run: str, stage: str) -> str:
    """Event files of a stage, relative to a local storage root."""
    return f"{run_prefix(run)}tensorboard/{stage}"
