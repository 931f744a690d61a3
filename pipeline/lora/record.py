"""The record of an exported LoRA (``current.json``): version, steps done, both files, their hashes, settings.

A stage that trains a LoRA writes one next to its versions (``<root>/current.json``, paths relative to it where
they can be, so the data home can move); later stages read it to load the LoRA, to fine-tune it further and to
rebuild the exact ``TrainConfig`` it was trained with. The iteration's record also says which round it picked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import CastloraError
from pipeline.storage.atomic import write_json_atomic
from pipeline.storage.stored_paths import load_paths, store_paths
from pipeline.train import TrainConfig

CURRENT_FILE = "current.json"
LORA_FILE_KINDS = ("diffusers", "kohya")
"""The exported formats; each is a file path in the record (and a key of its ``sha256``)."""


@dataclass(frozen=True)
class IterationPick:
    """Which round of an iteration run a LoRA record is (the iteration's ``current.json`` names the best one)."""

    round: int
    run: str
    stop_reason: str | None
    convergence: str
    """The rule that judged convergence (its stop reason, if it stopped)."""
    base_lora: str
    """The version of the LoRA the run started from (round 0's model)."""


@dataclass(frozen=True)
class LoraRecord:
    version: str
    files: dict[str, Path]
    """Format (``LORA_FILE_KINDS``) -> exported file."""
    sha256: dict[str, str]
    """Format -> SHA-256 of its file."""
    steps: int | None = None
    """Optimizer steps done; None in records that did not say (then the configured count)."""
    train_record: dict[str, Any] | None = None
    """``TrainConfig.as_record()`` of its training; None when a record (of an older castlora) lacks it."""
    picked: IterationPick | None = None

    @property
    def diffusers(self) -> Path:
        return self.files["diffusers"]

    @property
    def diffusers_sha256(self) -> str:
        return self.sha256["diffusers"]

    def train_config(self) -> TrainConfig:
        """The exact settings it was trained with: every field, no defaults (``CastloraError`` if not recorded)."""
        return TrainConfig.from_record(self.train_record, f"LoRA {self.version}")

    def to_json(self, folder: Path | None = None) -> dict[str, Any]:
        """The JSON object of ``current.json``; with ``folder`` (where the file lives), paths inside the pair
        folder are written relative to it."""
        data: dict[str, Any] = {"version": self.version}
        if self.steps is not None:
            data["steps"] = self.steps
        data |= {kind: str(path) for kind, path in self.files.items()}
        data["sha256"] = dict(self.sha256)
        if self.train_record is not None:
            data["train_config"] = self.train_record
        if self.picked is not None:
            data |= {
                "round": self.picked.round,
                "run": self.picked.run,
                "stop_reason": self.picked.stop_reason,
                "convergence": self.picked.convergence,
                "base_lora": self.picked.base_lora,
            }
        return store_paths(data, folder, LORA_FILE_KINDS) if folder is not None else data

    @classmethod
    def from_json(cls, data: Any, folder: Path, source: str) -> LoraRecord:
        """The record in ``data`` (read from a file in ``folder``; relative paths are relative to it). A missing
        or mistyped field is a ``CastloraError`` naming ``source`` (the file) and the field."""

        def field(name: str, kind: type | tuple[type, ...], value: Any = None) -> Any:
            found = data.get(name) if value is None else value
            if not isinstance(found, kind) or (isinstance(found, bool) and kind is int):
                expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                raise CastloraError(
                    f"{source} is not a valid LoRA record: field {name!r} must be {expected}, got {found!r}. "
                    "Re-materialize the asset that wrote it."
                )
            return found

        if not isinstance(data, dict):
            raise CastloraError(f"{source} is not a valid LoRA record: expected a JSON object, got {type(data)}.")
        data = load_paths(data, folder, LORA_FILE_KINDS)
        hashes = field("sha256", dict)
        for kind in LORA_FILE_KINDS:
            field(kind, str)
            field(f"sha256.{kind}", str, hashes.get(kind))
        steps = data.get("steps")
        if steps is not None:
            field("steps", int)
        train_record = data.get("train_config")
        if train_record is not None:
            field("train_config", dict)
        picked = None
        if "round" in data:
            picked = IterationPick(
                round=field("round", int),
                run=field("run", str),
                stop_reason=field("stop_reason", (str, type(None))),
                convergence=field("convergence", str),
                base_lora=field("base_lora", str),
            )
        return cls(
            version=field("version", str),
            files={kind: Path(data[kind]) for kind in LORA_FILE_KINDS},
            sha256=dict(hashes),
            steps=steps,
            train_record=train_record,
            picked=picked,
        )


def write_current(record: LoraRecord, root: Path) -> Path:
    """Point ``root/current.json`` at ``record`` (written atomically: a reader never sees half a record)."""
    return write_json_atomic(record.to_json(root), Path(root) / CURRENT_FILE)


def read_current(root: Path, stage: str) -> LoraRecord:
    """The record ``root/current.json`` holds, written by the ``stage`` asset (named in the error if missing)."""
    path = Path(root) / CURRENT_FILE
    if not path.is_file():
        raise CastloraError(f"{path} does not exist: materialize the '{stage}' asset for this pair first.")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CastloraError(f"{path} is not valid JSON ({exc}); re-materialize the '{stage}' asset.") from exc
    return LoraRecord.from_json(data, path.parent, str(path))
