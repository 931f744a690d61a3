"""Atomic, verifiable training checkpoints under ``<out_dir>/checkpoints/step-XXXXXX/``.

A checkpoint holds everything needed to continue bit-for-bit: LoRA weights, optimizer, LR scheduler,
(optional) fp16 grad-scaler state, step, RNG states and the loss history. The data position is the step
itself (the data plan is a pure function of seed and step). ``meta.json`` records the SHA-256 of every file
and a fingerprint of what determines the result; a checkpoint that fails either check is refused with
:class:`CheckpointError`, never skipped silently.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import CheckpointError
from pipeline.storage.atomic import atomic_dir
from pipeline.storage.hashing import sha256_file, sha256_json

CHECKPOINTS_DIR = "checkpoints"
LORA_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer_state.pt"
META_FILE = "meta.json"
_PREFIX = "step-"
FORMAT_VERSION = 1


@dataclass
class TrainingState:
    step: int
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)
    losses: list[tuple[int, float, float]] = field(default_factory=list)
    scaler: dict[str, Any] | None = None


def capture_rng() -> dict[str, Any]:
    """Global RNG states, as tensors and plain values only (so they load with ``weights_only=True``)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints_root(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints (not temp folders), oldest first."""
    root = checkpoints_root(out_dir)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            suffix = path.name.removeprefix(_PREFIX)
            if path.is_dir() and path.name.startswith(_PREFIX) and suffix.isdigit():
                found.append((int(suffix), path))
    return sorted(found)


def save_checkpoint(out_dir: Path, state: TrainingState, fingerprint_fields: dict[str, Any], keep: int) -> Path:
    """Write ``state`` to a temp folder, then rename it into place; prune to the newest ``keep``."""
    root = checkpoints_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{state.step:06d}"
    # Re-saving the same step (a resumed run that ends where it started) replaces that checkpoint.
    with atomic_dir(final) as temp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.lora.items()}, str(temp / LORA_FILE))
        torch.save(state.optimizer, temp / OPTIMIZER_FILE)
        trainer = {
            "step": state.step,
            "scheduler": state.scheduler,
            "rng": state.rng,
            "losses": [list(x) for x in state.losses],
            "scaler": state.scaler,
        }
        torch.save(trainer, temp / TRAINER_FILE)
        files = {name: sha256_file(temp / name) for name in (LORA_FILE, OPTIMIZER_FILE, TRAINER_FILE)}
        meta = {
            "format_version": FORMAT_VERSION,
            "step": state.step,
            "fingerprint": sha256_json(fingerprint_fields),
            "fingerprint_fields": fingerprint_fields,
            "files": files,
        }
        (temp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str), encoding="utf-8")
    for _, old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    saved, current = json.loads(json.dumps(saved, default=str)), json.loads(json.dumps(current, default=str))
    return [
        f"{key}: checkpoint {saved.get(key, '<absent>')!r} vs now {current.get(key, '<absent>')!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def verify_checkpoint(folder: Path, fingerprint_fields: dict[str, Any]) -> dict[str, Any]:
    """Return the folder's meta after checking file hashes and the fingerprint; raise CheckpointError if not."""
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files: dict[str, str] = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"Checkpoint {folder}: {META_FILE} is missing or unreadable ({exc}). {_ADVICE}") from exc
    for name, expected in files.items():
        path = folder / name
        actual = sha256_file(path) if path.is_file() else "<missing>"
        if actual != expected:
            raise CheckpointError(
                f"Checkpoint {folder}: {name} is corrupt (sha256 {actual[:12]}…, expected {expected[:12]}…). {_ADVICE}"
            )
    if meta.get("fingerprint") != sha256_json(fingerprint_fields):
        diffs = _differences(meta.get("fingerprint_fields", {}), fingerprint_fields)
        raise CheckpointError(
            f"Checkpoint {folder} was written by a different training setup; differs: "
            f"{'; '.join(diffs) or 'fingerprint'}. Restore the original settings to resume, or train into a new "
            "output folder (or delete the checkpoints folder) to start over."
        )
    return meta


_ADVICE = "Delete this checkpoint folder to resume from an older one, or the whole checkpoints folder to start over."


def load_latest_checkpoint(out_dir: Path, fingerprint_fields: dict[str, Any]) -> tuple[TrainingState, Path] | None:
    """The newest checkpoint, verified; None when there is none. Never falls back past a bad one."""
    found = list_checkpoints(out_dir)
    if not found:
        return None
    step, folder = found[-1]
    verify_checkpoint(folder, fingerprint_fields)
    try:
        lora = load_file(str(folder / LORA_FILE))
        optimizer = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        trainer = torch.load(folder / TRAINER_FILE, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint {folder} cannot be read ({exc}). {_ADVICE}") from exc
    if trainer.get("step") != step:
        raise CheckpointError(f"Checkpoint {folder} records step {trainer.get('step')}, not {step}. {_ADVICE}")
    state = TrainingState(
        step=step,
        lora=lora,
        optimizer=optimizer,
        scheduler=trainer["scheduler"],
        rng=trainer["rng"],
        losses=[(int(s), float(loss), float(lr)) for s, loss, lr in trainer["losses"]],
        scaler=trainer.get("scaler"),
    )
    return state, folder
