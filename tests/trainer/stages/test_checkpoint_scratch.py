"""Rank 0's scratch folder for a checkpoint (trainer/stages/loop.py, checkpoint_scratch): a process killed while
it saves leaves its folder behind, and the next save on that node removes it, never a running process's."""

import subprocess
import sys
from pathlib import Path

from trainer.stages.loop import SCRATCH_PREFIX, checkpoint_scratch

KILLED_MID_SAVE = """
import os, signal, sys
from pathlib import Path
from trainer.stages.loop import checkpoint_scratch
with checkpoint_scratch(Path(sys.argv[1])) as folder:
    (Path(folder) / "model.safetensors").write_bytes(b"x" * 4096)
    os.kill(os.getpid(), signal.SIGKILL)  # as Ray kills a worker: no cleanup runs
"""


def scratch_folders(root: Path) -> list[Path]:
    return sorted(root.glob(f"{SCRATCH_PREFIX}*"))


def test_a_save_removes_what_a_killed_save_left_and_keeps_a_running_ones(tmp_path):
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(tmp_path)], check=False)
    assert killed.returncode == -9
    [left] = scratch_folders(tmp_path)
    assert (left / "model.safetensors").stat().st_size == 4096
    unrelated = tmp_path / f"{SCRATCH_PREFIX}notapid"  # not named by a pid: not ours to judge
    unrelated.mkdir()

    with checkpoint_scratch(tmp_path) as running:
        assert not left.exists() and unrelated.exists()
        with checkpoint_scratch(tmp_path) as second:  # this process still runs: its folder stays
            assert Path(running).exists() and Path(second).exists()
        assert Path(running).exists() and not Path(second).exists()
    assert scratch_folders(tmp_path) == [unrelated]
