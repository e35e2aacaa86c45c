"""
Where the served model comes from: a checkpoint in object storage, and the tokenizer beside it.

Notable:
- `--model` names a stage or one step of it: `s3://bucket/prefix/runs/<run>/<stage>[/step_XXXXXX]` or the
  same path in a local folder; without it, the newest valid checkpoint of `serve.stage` of the run is used
- the storage root is the part before `/runs/`: the tokenizer is read from `<root>/tokenizer/tokenizer.json`
- a plain, picklable description, so Ray Serve replicas load the model themselves (no weights pass through
  the driver)
- storage may hold nothing yet (no tokenizer, no checkpoint, not even the S3 prefix): checkpoints() and
  newest_step() let a server wait for the first checkpoint and notice newer ones
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer
from services.checkpoints import CheckpointManager
from services.layout import TOKENIZER_KEY, stage_prefix, step_dir_name
from services.storage import open_storage

_MODEL_URI = re.compile(r"^(?P<root>.*)/runs/(?P<run>[^/]+)/(?P<stage>[^/]+)(?:/step_(?P<step>\d+))?/?$")


@dataclass(frozen=True)
class ModelSource:
    storage: str  # storage root URI (local folder or s3://bucket/prefix)
    run: str
    stage: str
    step: int | None = None  # None: the newest valid checkpoint

    @classmethod
    def parse(cls, uri: str) -> ModelSource:
        match = _MODEL_URI.match(uri.rstrip("/"))
        if not match:
            raise ValueError(f"--model {uri!r}: expected <storage>/runs/<run>/<stage>[/step_XXXXXX]")
        step = match["step"]
        return cls(match["root"] or "/", match["run"], match["stage"], int(step) if step else None)

    def describe(self) -> str:
        stage = f"{self.storage}/{stage_prefix(self.run, self.stage)}"
        return stage + step_dir_name(self.step) if self.step is not None else f"{stage.rstrip('/')} (newest)"

    def checkpoints(self) -> CheckpointManager:
        """The stage's checkpoints (reuse it for polling: opening S3 storage makes a client)."""
        return CheckpointManager(open_storage(self.storage), self.run, self.stage)

    def train_hint(self) -> str:
        """Where a server of this source looks, and the command that puts a checkpoint there."""
        run = "" if self.run == "default" else f" --run {self.run}"
        return (f"there is no checkpoint in {self.storage}/{stage_prefix(self.run, self.stage)} yet. Train one with "
                f"`nanochat speedrun --storage {self.storage}{run}` (on Kubernetes: the speedrun RayJob, "
                f"`kubectl apply -f k8s/speedrun-job.yaml`)")

    def load(self, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, int]:
        storage = open_storage(self.storage)
        tokenizer = Tokenizer.from_json(storage.read_text(TOKENIZER_KEY))
        model, step = CheckpointManager(storage, self.run, self.stage).load_model(device, self.step)
        return model, tokenizer, step
