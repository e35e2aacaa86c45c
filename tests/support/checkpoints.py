"""Checkpoints put into storage as a training run leaves them, for tests that need a stage's checkpoint without
training one (in a run, Ray Train uploads the step folder and rank 0 marks it latest)."""

from pathlib import Path

from nanochat.checkpoint import MANIFEST, verify_checkpoint
from services.checkpoints import CheckpointManager
from services.layout import step_dir_name
from services.storage import Storage


def upload_checkpoint(storage: Storage, run: str, stage: str, step: int, folder: str | Path) -> None:
    """Upload a folder written by write_checkpoint as runs/<run>/<stage>/step_XXXXXX/ in Ray Train's order:
    the files, then manifest.json, then `latest`; a step folder already there is replaced."""
    folder = Path(folder)
    assert not verify_checkpoint(folder), f"{folder} is not a complete checkpoint"
    manager = CheckpointManager(storage, run, stage)
    prefix = f"{manager.stage_prefix}{step_dir_name(step)}/"
    storage.delete(prefix + MANIFEST)  # first: a replaced step reads as incomplete until its new manifest lands
    storage.delete_prefix(prefix)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        storage.upload_file(path, prefix + path.relative_to(folder).as_posix())
    storage.upload_file(folder / MANIFEST, prefix + MANIFEST)
    manager.mark_latest(step)
