"""Checkpoints put into storage as a training run leaves them, for tests that need a stage's checkpoint without
training one (in a run, Ray Train uploads the step folder and rank 0 marks it latest)."""

from pathlib import Path

import torch

from nanochat.checkpoint import MANIFEST, verify_checkpoint, write_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from services.checkpoints import CheckpointManager
from services.layout import step_dir_name
from services.storage import Storage, open_storage


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


def publish_sft_checkpoint(root: Path) -> None:
    """A tokenizer and a small random-weight SFT checkpoint, laid out in storage as training leaves them."""
    storage = open_storage(str(root))
    texts = [Path(torch.__file__).read_text()] * 2 + ["Hello there. How are you today? I am fine."] * 50
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=400)
    storage.write_text("tokenizer/tokenizer.json", tokenizer.to_json())
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    model.init_weights()
    folder = root.parent / "ckpt"
    write_checkpoint(folder, model_state=model.state_dict(), optimizer_state=None, cursor=None, config={}, rng=None,
                     meta={"stage": "sft", "world_size": 1, "model_config": vars(model.config)})
    upload_checkpoint(storage, "default", "sft", 5, folder)
