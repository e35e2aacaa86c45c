"""
Checkpoints in object storage: runs/<run>/<stage>/step_XXXXXX/ folders, a `latest` pointer, a DONE marker.

Notable:
- the commit order is files, then manifest.json, then `latest`: a save that dies anywhere leaves the
  previous checkpoint and `latest` as they were, and the half-written step has no manifest
- under Ray Train, Ray uploads the step folder (RunConfig(storage_path=.../runs/<run>, name=<stage>),
  checkpoint_dir_name="step_XXXXXX", see ray_run_location) and prunes it (CheckpointConfig.num_to_keep);
  rank 0 then calls mark_latest
- loading trusts nothing: latest_valid downloads the step `latest` names, verifies every file against the
  manifest, and on damage logs a WARNING naming the step and the problem and falls back to older steps.
  Steps newer than `latest` are uncommitted (their save never finished) and are not used
- DONE.json says a stage finished and which step it ended on; it only counts while that step is complete
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nanochat.checkpoint import (
    MANIFEST,
    META,
    Checkpoint,
    CorruptCheckpoint,
    model_from_checkpoint,
    read_checkpoint,
    read_manifest,
    verify_checkpoint,
)
from nanochat.gpt import GPT
from services.layout import DONE, LATEST, run_prefix, stage_prefix, step_dir_name
from services.storage import KeyNotFound, Storage

if TYPE_CHECKING:
    import pyarrow.fs

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"step_(\d+)$")


class CheckpointManager:
    def __init__(self, storage: Storage, run: str, stage: str):
        self.storage = storage
        self.run = run
        self.stage = stage
        self.stage_prefix = stage_prefix(run, stage)

    def __repr__(self) -> str:
        return f"CheckpointManager({self.storage.uri}/{self.stage_prefix})"

    def _step_prefix(self, step: int) -> str:
        return f"{self.stage_prefix}{step_dir_name(step)}/"

    def _where(self, step: int) -> str:
        return f"{self.storage.uri}/{self._step_prefix(step)}"

    def ray_run_location(self) -> tuple[pyarrow.fs.FileSystem, str, str]:
        """(storage_filesystem, storage_path, name) for Ray's RunConfig, so Ray uploads into our layout."""
        fs, base = self.storage.arrow_filesystem()
        return fs, f"{base}/{run_prefix(self.run).rstrip('/')}", self.stage

    # -- listing

    def list_steps(self) -> list[int]:
        """Steps that have a folder (complete or not), ascending."""
        steps = set()
        for key in self.storage.list(self.stage_prefix + "step_"):
            folder = key[len(self.stage_prefix) :].split("/", 1)[0]
            if m := _STEP_DIR.match(folder):
                steps.add(int(m.group(1)))
        return sorted(steps)

    def _remote_problem(self, step: int) -> str | None:
        """Why the step is not complete in storage (no manifest, a listed file absent); None if it is.

        A cheap check (no download): only latest_valid verifies sizes and hashes.
        """
        prefix = self._step_prefix(step)
        try:
            manifest = json.loads(self.storage.read_text(prefix + MANIFEST))
        except KeyNotFound:
            return f"incomplete (no {MANIFEST})"
        except ValueError as e:
            return f"damaged ({MANIFEST} unreadable: {e})"
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            return f"damaged ({MANIFEST} has no 'files' table)"
        present = {key[len(prefix) :] for key in self.storage.list(prefix)}
        missing = sorted(set(files) - present)
        return f"damaged (missing {', '.join(missing)})" if missing else None

    def latest_step(self) -> int | None:
        """The step `latest` names, or None if it is missing or unreadable."""
        try:
            name = self.storage.read_text(self.stage_prefix + LATEST).strip()
        except KeyNotFound:
            return None
        if m := _STEP_DIR.match(name):
            return int(m.group(1))
        logger.warning(
            "%s/%s%s holds %r, not a step folder name; ignoring it",
            self.storage.uri,
            self.stage_prefix,
            LATEST,
            name,
        )
        return None

    # -- saving

    def mark_latest(self, step: int) -> None:
        """Point `latest` at step; it must already be in storage with its manifest."""
        problem = self._remote_problem(step)
        if problem:
            raise ValueError(f"cannot mark {self._where(step)} latest: it is {problem}")
        self.storage.write_text(self.stage_prefix + LATEST, step_dir_name(step) + "\n")

    # -- loading

    def _candidates(self) -> list[int]:
        steps = self.list_steps()
        latest = self.latest_step()
        if latest is None:
            return steps[::-1]
        newer = [s for s in steps if s > latest]
        if newer:
            logger.info("ignoring uncommitted steps newer than latest (%s): %s", step_dir_name(latest), newer)
        if latest not in steps:
            logger.warning("latest names %s, which is not in storage", self._where(latest))
        return [s for s in reversed(steps) if s <= latest]

    def _download(self, step: int, dest: Path) -> list[str]:
        """Download the step's manifest and the files it lists into dest; the problems found."""
        prefix = self._step_prefix(step)
        try:
            self.storage.download_file(prefix + MANIFEST, dest / MANIFEST)
        except KeyNotFound:
            return [f"{MANIFEST}: missing (unfinished save?)"]
        try:
            names = read_manifest(dest)
        except (ValueError, OSError) as e:
            return [f"{MANIFEST}: unreadable: {e}"]
        missing = []
        for name in names:
            try:
                self.storage.download_file(prefix + name, dest / name)
            except KeyNotFound:
                missing.append(f"{name}: missing")
        return missing or verify_checkpoint(dest)

    def latest_valid(self, download_to: str | Path) -> tuple[int, Path] | None:
        """(step, local folder) of the newest intact committed checkpoint, downloaded under download_to.

        download_to must be private to the calling process (one per rank): its step folders are replaced.
        """
        download_to = Path(download_to)
        for step in self._candidates():
            dest = download_to / step_dir_name(step)
            shutil.rmtree(dest, ignore_errors=True)  # stale files from an earlier download must not mix in
            dest.mkdir(parents=True)
            problems = self._download(step, dest)
            if not problems:
                logger.info("using checkpoint %s", self._where(step))
                return step, dest
            logger.warning(
                "checkpoint %s is damaged, falling back to an older one: %s",
                self._where(step),
                "; ".join(problems),
            )
            shutil.rmtree(dest, ignore_errors=True)
        return None

    def newest_meta(self) -> tuple[int, dict] | None:
        """(step, meta.json) of the newest committed step that is complete in storage, without downloading
        its weights: enough for the driver to check a resume before it starts workers (they verify every file)."""
        for step in self._candidates():
            if self._remote_problem(step) is None:
                try:
                    return step, json.loads(self.storage.read_text(self._step_prefix(step) + META))
                except (KeyNotFound, ValueError):
                    continue
        return None

    def fetch(self, step: int, download_to: str | Path) -> Path:
        """Download one given step and verify it; CorruptCheckpoint naming the damaged files otherwise."""
        dest = Path(download_to) / step_dir_name(step)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        problems = self._download(step, dest)
        if problems:
            raise CorruptCheckpoint(self._where(step), problems)
        return dest

    def load_checkpoint(self, step: int | None = None, load_optimizer: bool = False) -> tuple[Checkpoint, int]:
        """The stage's newest valid checkpoint (or the given step), read on the CPU (its optimizer state
        only when asked), and its step."""
        with tempfile.TemporaryDirectory(prefix="nanochat-model-") as tmp:
            if step is None:
                found = self.latest_valid(tmp)
                if found is None:
                    raise FileNotFoundError(f"no valid checkpoint in {self.storage.uri}/{self.stage_prefix}: "
                                            f"run `nanochat train {self.stage}` first")
                step, folder = found
            else:
                folder = self.fetch(step, tmp)
            return read_checkpoint(folder, load_optimizer=load_optimizer), step

    def load_model(self, device: str | torch.device = "cpu", step: int | None = None) -> tuple[GPT, int]:
        """The stage's newest valid checkpoint (or the given step) as a model in eval mode, and its step."""
        ckpt, step = self.load_checkpoint(step)
        return model_from_checkpoint(ckpt, device), step

    # -- stage completion

    def mark_done(self, summary: dict, step: int | None = None) -> None:
        """Record that the stage finished at step (default: the one `latest` names), with its summary."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(
                f"cannot mark {self.storage.uri}/{self.stage_prefix} done: nothing is marked latest"
            )
        problem = self._remote_problem(step)
        if problem:
            raise ValueError(f"cannot mark {self.stage} done at {self._where(step)}: {problem}")
        record = {"checkpoint": step_dir_name(step), "summary": summary}
        self.storage.write_text(self.stage_prefix + DONE, json.dumps(record, indent=2, sort_keys=True) + "\n")

    def _done_record(self) -> tuple[int, dict] | None:
        """(step, summary) from DONE.json, None if it is missing or malformed."""
        try:
            record = json.loads(self.storage.read_text(self.stage_prefix + DONE))
            m = _STEP_DIR.match(record["checkpoint"])
            if not m or not isinstance(record["summary"], dict):
                raise ValueError(f"checkpoint {record['checkpoint']!r}, summary {record['summary']!r}")
        except KeyNotFound:
            return None
        except (ValueError, KeyError, TypeError) as e:
            logger.warning(
                "%s/%s%s is malformed (%s): stage not done", self.storage.uri, self.stage_prefix, DONE, e
            )
            return None
        return int(m.group(1)), record["summary"]

    def done_summary(self) -> dict | None:
        """The summary given to mark_done; None if the stage is not done or the step it names is incomplete."""
        record = self._done_record()
        if record is None:
            return None
        step, summary = record
        problem = self._remote_problem(step)
        if problem:
            logger.warning("%s names %s, which is %s: stage not done", DONE, self._where(step), problem)
            return None
        return summary

    def is_complete(self) -> bool:
        return self.done_summary() is not None
