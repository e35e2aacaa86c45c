"""
The checkpoint format: one local folder per training step, self-describing and self-verifying.

Notable:
- files: model.safetensors (weights), optimizer.pt and rng.pt (torch.save), cursor.json, config.json,
  meta.json, and manifest.json (size and sha256 of every other file) written last, atomically: a folder
  without a manifest is an unfinished write, never a checkpoint
- verification is against the manifest only: files it does not list are ignored (Ray Train may add its own)
- weights: safetensors cannot hold two names for one memory, so tied weights (identical views) are stored
  once and re-tied on load from a list of aliases in the file's metadata; other overlapping or
  non-contiguous tensors are saved as independent copies
- torch.load runs with weights_only=True: a checkpoint from elsewhere cannot execute code. The numpy RNG
  state is therefore kept as a tensor, not an ndarray
- local folders only: putting checkpoints into object storage is services/checkpoints.py's job
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanochat.gpt import GPT, GPTConfig

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
CURSOR = "cursor.json"
CONFIG = "config.json"
META = "meta.json"
REQUIRED = (MODEL, CONFIG, META)  # a manifest without these does not describe a checkpoint

_ALIASES_KEY = "nanochat.aliases"  # safetensors metadata: {"alias name": "stored name"}
_HASH_CHUNK = 8 << 20


class CorruptCheckpoint(Exception):
    """A checkpoint folder that fails verification; .problems lists what is wrong, file by file."""

    def __init__(self, path: str | os.PathLike, problems: list[str]):
        self.path = Path(path)
        self.problems = problems
        super().__init__(f"corrupt checkpoint {self.path}: " + "; ".join(problems))


@dataclass
class Checkpoint:
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None
    cursor: dict | list | None
    config: dict
    rng: dict | None
    meta: dict


# -----------------------------------------------------------------------------
# writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _storable_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors safetensors accepts, aliases): tied weights once, everything else contiguous and unshared."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}  # identical view of identical memory -> first name seen
    storages: set[tuple] = set()  # memory already used by a stored tensor
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.numel() == 0:  # empty tensors have no memory to share
            tensors[name] = t.cpu().contiguous()
            continue
        memory = (t.device, t.untyped_storage().data_ptr())
        view = (*memory, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in by_view:
            aliases[name] = by_view[view]
            continue
        by_view[view] = name
        shared = memory in storages
        storages.add(memory)
        t = t.cpu()
        # a partial view of shared memory (or a strided one) becomes its own copy
        tensors[name] = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()
    return tensors, aliases


def _save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    tensors, aliases = _storable_tensors(state)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={_ALIASES_KEY: json.dumps(aliases, sort_keys=True)})
    os.replace(tmp, path)


def _torch_save(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_checkpoint(
    dir: str | os.PathLike,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    cursor: dict | list | None,
    config: dict,
    rng: dict | None,
    meta: dict,
) -> None:
    """Write a checkpoint into dir (created if needed); manifest.json last, so its presence means complete."""
    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    # a manifest from an earlier write into the same folder must not vouch for half-written new files
    (root / MANIFEST).unlink(missing_ok=True)
    written = [MODEL]
    _save_weights(root / MODEL, model_state)
    if optimizer_state is not None:
        _torch_save(root / OPTIMIZER, optimizer_state)
        written.append(OPTIMIZER)
    if rng is not None:
        _torch_save(root / RNG, rng)
        written.append(RNG)
    if cursor is not None:
        _write_json(root / CURSOR, cursor)
        written.append(CURSOR)
    _write_json(root / CONFIG, config)
    _write_json(root / META, meta)
    written += [CONFIG, META]
    files = {name: {"size": (root / name).stat().st_size, "sha256": _sha256(root / name)} for name in written}
    _write_json(root / MANIFEST, {"format": FORMAT_VERSION, "files": files})
    logger.debug("wrote checkpoint %s (%d files)", root, len(files))


# -----------------------------------------------------------------------------
# verifying and reading


def read_manifest(dir: str | os.PathLike) -> dict[str, dict]:
    """{file name: {"size", "sha256"}}; ValueError if the manifest is unreadable or malformed."""
    data = json.loads((Path(dir) / MANIFEST).read_text())
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise ValueError("no 'files' table")
    for name, entry in files.items():
        bad_name = not isinstance(name, str) or name in ("", MANIFEST) or name.startswith("/")
        if bad_name or ".." in name.split("/"):
            raise ValueError(f"invalid file name {name!r}")
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not entry.get("sha256"):
            raise ValueError(f"{name}: entry needs an integer size and a sha256")
    return files


def verify_checkpoint(dir: str | os.PathLike, *, skip: Collection[str] = ()) -> list[str]:
    """Problems found, one string per file; empty if every file the manifest lists (but skip) is intact."""
    root = Path(dir)
    if not (root / MANIFEST).is_file():
        return [f"{MANIFEST}: missing (unfinished write?)"]
    try:
        files = read_manifest(root)
    except (ValueError, OSError) as e:  # json.JSONDecodeError is a ValueError
        return [f"{MANIFEST}: unreadable: {e}"]
    problems = [f"{name}: not listed in {MANIFEST}" for name in REQUIRED if name not in files]
    for name, entry in sorted(files.items()):
        if name in skip:
            continue
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size  # cheap check first: truncation shows up here without hashing
        if size != entry["size"]:
            problems.append(f"{name}: size {size}, manifest says {entry['size']}")
        elif _sha256(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems


def _load_weights(path: Path, device: str) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt", device=device) as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
        aliases = json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
    for alias, name in aliases.items():
        state[alias] = state[name]  # the same tensor object: tied weights stay tied
    return state


def read_checkpoint(
    dir: str | os.PathLike, *, map_location: str | torch.device = "cpu", load_optimizer: bool = True
) -> Checkpoint:
    """Verify, then load; CorruptCheckpoint naming the damaged files if verification fails.

    Without the optimizer state, optimizer.pt (twice the weights' size with Adam) is neither hashed nor read.
    """
    root = Path(dir)
    problems = verify_checkpoint(root, skip=() if load_optimizer else (OPTIMIZER,))
    if problems:
        raise CorruptCheckpoint(root, problems)
    files = read_manifest(root)

    def load_json(name: str) -> Any:
        return json.loads((root / name).read_text()) if name in files else None

    optimizer_state = None
    if load_optimizer and OPTIMIZER in files:
        optimizer_state = torch.load(root / OPTIMIZER, map_location=map_location, weights_only=True)
    rng = torch.load(root / RNG, map_location="cpu", weights_only=True) if RNG in files else None
    return Checkpoint(
        model_state=_load_weights(root / MODEL, str(map_location)),
        optimizer_state=optimizer_state,
        cursor=load_json(CURSOR),
        config=load_json(CONFIG),
        rng=rng,  # RNG states are CPU byte tensors whatever the device
        meta=load_json(META),
    )


# -----------------------------------------------------------------------------
# random number generators


def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and (if present) every CUDA device's generator state."""
    _, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        # as a tensor, because torch.load(weights_only=True) refuses ndarrays
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning(
                "CUDA RNG state saved for %d devices, %d visible now: CUDA generators not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


# -----------------------------------------------------------------------------
# models


def model_from_checkpoint(ckpt: Checkpoint, device: str | torch.device = "cpu") -> GPT:
    """The GPT a checkpoint describes (meta["model_config"]), with its weights, in eval mode."""
    return model_from_state(ckpt.meta["model_config"], ckpt.model_state, device)


def model_from_state(model_config: dict, model_state: dict[str, torch.Tensor],
                     device: str | torch.device = "cpu") -> GPT:
    """A GPT of this config (GPTConfig's fields) with these weights, built on device, in eval mode."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**model_config))
    model.to_empty(device=device)
    model.init_weights()  # buffers that are not saved (rotary tables); the weights are overwritten below
    model.load_state_dict(model_state)
    return model.eval()
