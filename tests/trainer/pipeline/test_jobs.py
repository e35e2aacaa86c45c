"""trainer/pipeline/jobs.py's checks in the driver, made before Ray starts: a resume that the workers would refuse
after their start-up (and again after every restart) is refused at once, with the same words."""

from pathlib import Path

import pytest

from nanochat.checkpoint import capture_rng_state, write_checkpoint
from nanochat.config import load_config
from tests.services.test_checkpoints import TinyLM
from tests.support.checkpoints import upload_checkpoint
from trainer.pipeline.jobs import StageFailed, configured_threads, run_stage
from trainer.stages.base import train_base
from trainer.worker import cpu_threads


def saved_by(storage, tmp_path: Path, step: int, **meta) -> None:
    folder = tmp_path / "out" / str(step)
    write_checkpoint(folder, model_state=TinyLM().state_dict(), optimizer_state=None, cursor=None,
                     config={}, rng=capture_rng_state(), meta={"stage": "base", **meta})
    upload_checkpoint(storage, "default", "base", step, folder)


def base(*overrides: str):
    return load_config(preset="tiny-cpu", overrides=list(overrides))


@pytest.mark.parametrize("meta, overrides, refusal", [
    ({"backend": "jax", "world_size": 1}, ["train.workers=1"],
     "base: checkpoint step 3 was written by the jax backend; resume with --backend jax or start a new run"),
    ({"backend": "torch", "world_size": 2}, ["train.workers=1"],
     "base: checkpoint step 3 was written by 2 workers; resume with --workers 2 or start a new run"),
    ({"backend": "torch", "world_size": 2}, ["train.backend=jax", "jax.cpu_devices=4"],
     "base: checkpoint step 3 was written by the torch backend; resume with --backend torch"),
])
def test_a_resume_the_workers_would_refuse_is_refused_before_ray(local_storage, tmp_path, meta, overrides, refusal):
    saved_by(local_storage, tmp_path, 3, **meta)
    with pytest.raises(StageFailed) as refused:
        run_stage("base", train_base, base(*overrides), local_storage, show_progress=False)
    assert str(refused.value).startswith(refusal)  # the driver's words, not "failed after N restarts"


def test_only_the_newest_complete_step_counts(local_storage, tmp_path):
    """A newest step that lost a file is not what the workers would load: the check looks past it too."""
    saved_by(local_storage, tmp_path, 3, backend="torch", world_size=2)
    saved_by(local_storage, tmp_path, 6, backend="jax", world_size=1)
    local_storage.delete("runs/default/base/step_000006/model.safetensors")  # `latest` still names step 6
    with pytest.raises(StageFailed, match="step 3 was written by 2 workers"):
        run_stage("base", train_base, base("train.workers=1"), local_storage, show_progress=False)


# ---------------------------------------------------------------------------------------------
# torch threads of CPU workers


@pytest.mark.parametrize("setting, omp, expected", [(3, "1", 3), (0, "2", 2), (0, None, 0), (0, "", 0)])
def test_threads_come_from_the_config_then_the_commands_omp_num_threads(monkeypatch, setting, omp, expected):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert configured_threads(base(f"train.threads_per_worker={setting}")) == expected


@pytest.mark.parametrize("configured, node_cpus, workers, expected", [
    (0, 2, 1, 2),  # one worker alone uses both cores
    (0, 2, 2, 1),  # two share them
    (0, 16, 3, 5),
    (0, 2, 4, 1),  # never below one
    (4, 2, 2, 4),  # the setting wins
])
def test_a_cpu_worker_takes_its_share_of_the_node(configured, node_cpus, workers, expected):
    assert cpu_threads(configured, node_cpus, workers) == expected
