"""The driver's progress bar over a real local Ray: it polls the board at its redraw interval and its last
line shows where the job ended."""

from __future__ import annotations

import ray

from trainer.pipeline.progress import ProgressBar


def test_the_bar_ends_on_the_step_the_job_reached(capsys) -> None:
    if ray.is_initialized():  # left by an earlier test in this worker
        ray.shutdown()
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        with ProgressBar("progress-test", "base") as bar:
            assert bar.interval_s == 10.0  # no terminal: poll only as often as a log line is written
            ray.get(bar.board.update.remote(7, 10, {"loss": 3.25}))
        err = capsys.readouterr().err
    finally:
        ray.shutdown()
    last = err.strip().splitlines()[-1].split("\r")[-1]
    assert "7/10" in last and "loss=3.25" in last
