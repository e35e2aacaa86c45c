"""
Checkpoints: the local format (nanochat/checkpoint.py) and their life in storage (trainer/checkpoints.py).

The storage tests run on a local folder and on S3 (a real moto server). Damage is done to the objects in
storage the way it happens in practice: a truncated upload, a save that dies part-way, a deleted file.
"""

import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nanochat.checkpoint import (
    MANIFEST,
    CorruptCheckpoint,
    capture_rng_state,
    read_checkpoint,
    restore_rng_state,
    verify_checkpoint,
    write_checkpoint,
)
from services.checkpoints import CheckpointManager
from services.storage import open_storage
from tests.support.checkpoints import upload_checkpoint


class TinyLM(nn.Module):
    """Embedding tied to the output head, as in many small LMs: the shared-tensor case safetensors refuses."""

    def __init__(self, vocab: int = 32, dim: int = 8):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.mlp = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mlp(self.wte(idx))))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 32, (4, 6), generator=g)
    loss = nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()


def make_checkpoint(folder: Path, step: int) -> Path:
    """A small but real checkpoint whose weights depend on the step."""
    torch.manual_seed(step)
    model = TinyLM()
    write_checkpoint(
        folder,
        model_state=model.state_dict(),
        optimizer_state=torch.optim.AdamW(model.parameters()).state_dict(),
        cursor={"shard": step, "row_group": 0},
        config={"depth": 1},
        rng=capture_rng_state(),
        meta={"step": step},
    )
    return folder


# -----------------------------------------------------------------------------
# the local format


def test_round_trip_gives_identical_weights_and_an_optimizer_that_resumes_identically(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(3):
        train_step(model, opt, seed=i)
    cursor = {"shard": 3, "row_group": 7, "rank_offsets": [0, 5]}
    write_checkpoint(
        tmp_path / "ck",
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        cursor=cursor,
        config={"model": {"depth": 1}},
        rng=None,
        meta={"step": 3},
    )

    ck = read_checkpoint(tmp_path / "ck")
    for name, tensor in model.state_dict().items():
        assert ck.model_state[name].dtype == tensor.dtype
        assert torch.equal(ck.model_state[name], tensor), name
    assert (ck.cursor, ck.config, ck.meta, ck.rng) == (cursor, {"model": {"depth": 1}}, {"step": 3}, None)

    torch.manual_seed(123)  # the restored copy must not depend on how it was initialised
    resumed = TinyLM()
    resumed.load_state_dict(ck.model_state)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed_opt.load_state_dict(ck.optimizer_state)
    train_step(model, opt, seed=99)
    train_step(resumed, resumed_opt, seed=99)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path):
    model = TinyLM(vocab=1000, dim=64)
    write_checkpoint(
        tmp_path,
        model_state=model.state_dict(),
        optimizer_state=None,
        cursor=None,
        config={},
        rng=None,
        meta={},
    )
    embedding_bytes = 1000 * 64 * 4
    assert (tmp_path / "model.safetensors").stat().st_size < 1.5 * embedding_bytes
    state = read_checkpoint(tmp_path).model_state
    assert state["head.weight"] is state["wte.weight"]


def test_non_contiguous_and_overlapping_tensors_round_trip(tmp_path):
    buffer = torch.arange(24, dtype=torch.float32)
    state = {
        "transposed": torch.randn(3, 5).t(),
        "strided": buffer[::3],
        "window_a": buffer[0:10],
        "window_b": buffer[5:15],  # overlaps window_a in memory
        "bf16": torch.randn(4, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
    }
    write_checkpoint(
        tmp_path, model_state=state, optimizer_state=None, cursor=None, config={}, rng=None, meta={}
    )
    loaded = read_checkpoint(tmp_path).model_state
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_restored_rng_state_reproduces_the_same_random_numbers(tmp_path):
    def draw() -> tuple:
        return random.random(), np.random.rand(3).tolist(), float(np.random.randn()), torch.rand(3).tolist()

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    draw()  # move every generator away from its seed
    write_checkpoint(
        tmp_path,
        model_state={},
        optimizer_state=None,
        cursor=None,
        config={},
        rng=capture_rng_state(),
        meta={},
    )
    expected = draw()
    draw()  # and away from the saved point
    restore_rng_state(read_checkpoint(tmp_path).rng)
    assert draw() == expected


def test_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    make_checkpoint(tmp_path, step=1)
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    on_disk = {p.name for p in tmp_path.iterdir()} - {MANIFEST}
    assert (
        set(files)
        == on_disk
        == {"model.safetensors", "optimizer.pt", "rng.pt", "cursor.json", "config.json", "meta.json"}
    )
    for name, entry in files.items():
        data = (tmp_path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_a_write_that_fails_part_way_leaves_no_manifest(tmp_path):
    make_checkpoint(tmp_path, step=1)  # an earlier checkpoint in the same folder
    with pytest.raises(TypeError):  # config is written after the weights and the optimizer state
        write_checkpoint(
            tmp_path,
            model_state=TinyLM().state_dict(),
            optimizer_state={},
            cursor=None,
            config={"bad": object()},
            rng=None,
            meta={},
        )
    assert (tmp_path / "model.safetensors").exists()
    assert verify_checkpoint(tmp_path) == ["manifest.json: missing (unfinished write?)"]


def test_verify_names_each_damaged_file_and_ignores_extra_files(tmp_path):
    make_checkpoint(tmp_path, step=1)
    assert verify_checkpoint(tmp_path) == []
    (tmp_path / "ray_metadata.json").write_text("{}")  # files the manifest does not list do not matter
    assert verify_checkpoint(tmp_path) == []

    model = tmp_path / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])
    cursor = tmp_path / "cursor.json"
    cursor.write_text(cursor.read_text().replace("0", "1"))  # same size, other content
    (tmp_path / "rng.pt").unlink()
    problems = verify_checkpoint(tmp_path)
    assert len(problems) == 3
    assert any(p.startswith("model.safetensors: size") for p in problems)
    assert "cursor.json: sha256 differs from the manifest" in problems
    assert "rng.pt: missing" in problems


def test_read_checkpoint_refuses_a_damaged_checkpoint_naming_the_file(tmp_path):
    make_checkpoint(tmp_path, step=1)
    model = tmp_path / "model.safetensors"
    model.write_bytes(model.read_bytes()[:20])
    with pytest.raises(CorruptCheckpoint, match="model.safetensors: size 20, manifest says") as err:
        read_checkpoint(tmp_path)
    assert len(err.value.problems) == 1


def test_without_the_optimizer_a_damaged_optimizer_file_does_not_matter(tmp_path):
    make_checkpoint(tmp_path, step=1)
    assert read_checkpoint(tmp_path).optimizer_state["state"] == {}
    opt = tmp_path / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:20])
    ck = read_checkpoint(tmp_path, load_optimizer=False)  # e.g. serving: only the weights are needed
    assert ck.optimizer_state is None and ck.meta == {"step": 1}
    with pytest.raises(CorruptCheckpoint, match="optimizer.pt: size 20"):
        read_checkpoint(tmp_path)


# -----------------------------------------------------------------------------
# checkpoints in storage, on both backends (where the backend can matter)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return open_storage(str(tmp_path / "store"))
    return open_storage(request.getfixturevalue("s3_env"))


@pytest.fixture
def manager(storage) -> CheckpointManager:
    return CheckpointManager(storage, run="r1", stage="base")


def save_steps(manager: CheckpointManager, tmp_path: Path, *steps: int) -> None:
    for step in steps:
        upload_checkpoint(manager.storage, manager.run, manager.stage, step,
                          make_checkpoint(tmp_path / "out" / str(step), step))


def test_save_then_latest_valid_downloads_the_newest_checkpoint(manager, tmp_path):
    save_steps(manager, tmp_path, 1, 2)
    assert manager.list_steps() == [1, 2]
    assert manager.storage.read_text("runs/r1/base/latest").strip() == "step_000002"
    step, folder = manager.latest_valid(tmp_path / "dl")
    assert step == 2
    assert read_checkpoint(folder).meta == {"step": 2}
    original = read_checkpoint(tmp_path / "out" / "2").model_state
    for name, tensor in read_checkpoint(folder).model_state.items():
        assert torch.equal(tensor, original[name]), name


def test_no_checkpoint_gives_none(manager, tmp_path):
    assert manager.list_steps() == []
    assert manager.latest_valid(tmp_path / "dl") is None


def test_truncated_weights_in_the_newest_step_fall_back_to_the_previous_with_a_warning(
    manager, tmp_path, caplog
):
    save_steps(manager, tmp_path, 1, 2)
    key = "runs/r1/base/step_000002/model.safetensors"
    manager.storage.write_bytes(key, manager.storage.read_bytes(key)[:100])
    with caplog.at_level(logging.WARNING, logger="services.checkpoints"):
        step, folder = manager.latest_valid(tmp_path / "dl")
    assert step == 1 and read_checkpoint(folder).meta == {"step": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "step_000002" in warnings[0] and "model.safetensors: size 100" in warnings[0]
    assert not (tmp_path / "dl" / "step_000002").exists()  # the damaged download is not left behind


def test_a_save_that_dies_part_way_leaves_the_previous_checkpoint_and_latest(manager, tmp_path, monkeypatch):
    save_steps(manager, tmp_path, 1)
    real_upload = manager.storage.upload_file
    uploads = []

    def dies_after_two_files(local, key):
        if len(uploads) == 2:
            raise OSError("killed mid-save")
        uploads.append(key)
        real_upload(local, key)

    monkeypatch.setattr(manager.storage, "upload_file", dies_after_two_files)
    with pytest.raises(OSError, match="killed"):
        save_steps(manager, tmp_path, 2)
    monkeypatch.undo()

    assert manager.list_steps() == [1, 2]  # step 2 exists, without its manifest
    assert not manager.storage.exists("runs/r1/base/step_000002/manifest.json")
    assert manager.storage.read_text("runs/r1/base/latest").strip() == "step_000001"
    assert manager.latest_valid(tmp_path / "dl")[0] == 1


def test_without_latest_a_step_missing_its_manifest_is_skipped(manager, tmp_path, caplog):
    save_steps(manager, tmp_path, 1)
    manager.storage.delete("runs/r1/base/latest")
    local = make_checkpoint(tmp_path / "out" / "2", step=2)
    for name in ("model.safetensors", "optimizer.pt"):  # a crash before the manifest went up
        manager.storage.upload_file(local / name, f"runs/r1/base/step_000002/{name}")
    with caplog.at_level(logging.WARNING, logger="services.checkpoints"):
        assert manager.latest_valid(tmp_path / "dl")[0] == 1
    assert any(
        "step_000002" in r.getMessage() and "manifest.json: missing" in r.getMessage() for r in caplog.records
    )


def test_latest_pointing_to_a_damaged_step_falls_back_past_it(manager, tmp_path, caplog):
    save_steps(manager, tmp_path, 1, 2, 3)
    manager.storage.write_text("runs/r1/base/latest", "step_000002\n")  # step 3 saved, never committed
    manager.storage.delete("runs/r1/base/step_000002/optimizer.pt")
    with caplog.at_level(logging.WARNING, logger="services.checkpoints"):
        assert manager.latest_valid(tmp_path / "dl")[0] == 1
    assert any(
        "step_000002" in r.getMessage() and "optimizer.pt: missing" in r.getMessage() for r in caplog.records
    )


def test_every_step_damaged_gives_none(local_storage, tmp_path):
    manager = CheckpointManager(local_storage, run="r1", stage="base")
    save_steps(manager, tmp_path, 1, 2)
    for step in (1, 2):
        manager.storage.delete(f"runs/r1/base/step_{step:06d}/config.json")
    assert manager.latest_valid(tmp_path / "dl") is None


def test_mark_latest_refuses_a_step_without_manifest(local_storage, tmp_path):
    manager = CheckpointManager(local_storage, run="r1", stage="base")
    save_steps(manager, tmp_path, 1)
    manager.storage.write_text("runs/r1/base/step_000002/model.safetensors", "partial")
    with pytest.raises(ValueError, match="step_000002.*no manifest.json"):
        manager.mark_latest(2)
    assert manager.storage.read_text("runs/r1/base/latest").strip() == "step_000001"


def test_done_marker_round_trip(manager, tmp_path):
    assert manager.done_summary() is None and not manager.is_complete()
    with pytest.raises(ValueError, match="nothing is marked latest"):
        manager.mark_done({"steps": 0})
    save_steps(manager, tmp_path, 7)
    summary = {"stage": "base", "run": "r1", "steps": 7, "metrics": {"val_bpb": 1.25}}
    manager.mark_done(summary)
    assert json.loads(manager.storage.read_text("runs/r1/base/DONE.json"))["checkpoint"] == "step_000007"
    assert manager.done_summary() == summary and manager.is_complete()
    # the marker only counts while the checkpoint it names is complete
    manager.storage.delete("runs/r1/base/step_000007/manifest.json")
    assert manager.done_summary() is None and not manager.is_complete()


def test_stages_and_runs_do_not_see_each_other(storage, tmp_path):
    base = CheckpointManager(storage, run="r1", stage="base")
    save_steps(base, tmp_path, 1)
    assert CheckpointManager(storage, run="r1", stage="sft").list_steps() == []
    assert CheckpointManager(storage, run="r10", stage="base").latest_valid(tmp_path / "dl") is None


def test_ray_run_location_puts_step_folders_where_the_manager_finds_them(local_storage, tmp_path):
    manager = CheckpointManager(local_storage, run="r1", stage="base")
    fs, storage_path, name = manager.ray_run_location()
    fs.create_dir(f"{storage_path}/{name}/step_000042")
    with fs.open_output_stream(f"{storage_path}/{name}/step_000042/{MANIFEST}") as f:
        f.write(b"{}")
    assert manager.list_steps() == [42]
