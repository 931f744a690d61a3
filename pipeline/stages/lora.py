"""Stage 6: train the pair's LoRA (resuming from its checkpoints), export it in both formats, render checks.

The version folder is named by a hash of everything that changes the weights (training fields, sample ids,
base model), so re-materializing after a kill lands in the same folder and resumes there, while a changed
setting or photo set starts a new version next to the old one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.errors import CastloraError
from pipeline.families import family_for
from pipeline.infer import SampleRequest, generate
from pipeline.lora import LoraSpec
from pipeline.lora.training import lora_state_hash
from pipeline.storage.atomic import write_json_atomic
from pipeline.storage.hashing import sha256_file, sha256_json
from pipeline.storage.lineage import LineageRecorder
from pipeline.storage.stored_paths import load_paths, store_paths
from pipeline.train import TrainConfig, TrainingSample, TrainResult, train_lora, train_preference

CURRENT_FILE = "current.json"
LORA_FILE_KINDS = ("diffusers", "kohya")  # the keys of a LoRA record (``as_current``) that are file paths


@dataclass
class LoraOutput:
    version: str
    folder: Path
    files: dict[str, Path]
    sha256s: dict[str, str]
    result: TrainResult
    config: TrainConfig
    validation: list[tuple[str, Image.Image]] = field(default_factory=list)

    def as_current(self) -> dict[str, Any]:
        """What ``current.json`` records: version, steps done, file path per format, their hashes, and every
        training setting (``TrainConfig.as_record``), so ``train_config_of`` rebuilds the config exactly."""
        return {
            "version": self.version,
            "steps": self.result.steps_done,
            **{kind: str(path) for kind, path in self.files.items()},
            "sha256": self.sha256s,
            "train_config": self.config.as_record(),
        }


def stored_lora(record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A LoRA record as a JSON file in ``folder`` keeps it (file paths relative where they can be)."""
    return store_paths(record, folder, LORA_FILE_KINDS)


def loaded_lora(record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A LoRA record read from a JSON file in ``folder``, file paths absolute."""
    return load_paths(record, folder, LORA_FILE_KINDS)


def train_config_of(current: dict[str, Any]) -> TrainConfig:
    """The exact settings a LoRA record (``LoraOutput.as_current``) was trained with: every field, no defaults."""
    return TrainConfig.from_record(current.get("train_config"), f"LoRA {current.get('version')}")


def lora_version(
    config: TrainConfig,
    samples: Sequence[TrainingSample],
    base_model_id: str,
    init_lora: dict[str, torch.Tensor] | None = None,
    preference: bool = False,
) -> str:
    """The folder name of a LoRA: a hash of what changes its weights (``dpo_beta`` only with ``preference``),
    its samples (ids and the prompts they train with), the base model and the starting LoRA."""
    # The prompt joins the id: a class image trained with another prompt is another model.
    sample_ids = sorted((s.sample_id, s.prompt) for s in samples)
    identity: list[Any] = [config.identity_fields(preference), sample_ids, base_model_id]
    if init_lora is not None:  # a fine-tune of another LoRA is another model
        identity.append(lora_state_hash(init_lora))
    return "lora-" + sha256_json(identity)[:12]


def _export(
    pipe: Any,
    config: TrainConfig,
    folder: Path,
    version: str,
    base_model_id: str,
    result: TrainResult,
    parents: Sequence[str],
    recorder: LineageRecorder,
) -> tuple[dict[str, Path], dict[str, str]]:
    """Write both LoRA formats from ``pipe``'s trained adapter and record them in lineage."""
    spec = LoraSpec(
        rank=config.rank,
        alpha=config.alpha,
        target_modules=tuple(config.targets),
        train_text_encoders=config.train_text_encoder,
    )
    metadata = {"castlora_version": version, "base_model": base_model_id}
    files = family_for(pipe).export_lora(folder, pipe, spec, metadata)
    sha256s = {kind: sha256_file(path) for kind, path in files.items()}
    params = {
        "version": version,
        "steps": result.steps_done,
        "final_loss": result.final_loss,
        "resumed_from": result.resumed_from,
        # Every training setting (``steps`` above is the steps done; the configured count is ``train_steps``).
        **{k: v for k, v in config.as_record().items() if k != "steps"},
        "train_steps": config.steps,
        **{k: v for k, v in result.metrics.items() if isinstance(v, int | float | str)},
    }
    for kind, path in files.items():
        recorder.record(path, sha256s[kind], sorted(set(parents)), {**params, "format": kind}, [base_model_id])
    return files, sha256s


def run_lora(
    pipe: Any,
    samples: Sequence[TrainingSample],
    config: TrainConfig,
    lora_root: Path,
    cache_dir: Path,
    recorder: LineageRecorder,
    base_model_id: str,
    on_log: Callable[[int, dict], None] | None = None,
    validation_prompts: Sequence[str] = (),
    validation_steps: int = 20,
    validation_seed: int = 0,
    init_lora: dict[str, torch.Tensor] | None = None,
    trainer: Callable[..., TrainResult] = train_lora,
) -> LoraOutput:
    """Train (resuming if possible), export both formats, point ``current.json`` at them, render checks.

    ``init_lora`` (a LoRA state: U-Net, plus text encoders for a text-encoder LoRA) starts from another LoRA,
    as the iterative rounds do; with ``config.kl_weight`` > 0 it is also the frozen reference of the KL term.
    ``trainer`` has ``train_lora``'s
    signature and must leave the trained adapter on ``pipe`` as it does (e.g. ``pipeline.train.launch``'s
    multi-process ``distributed_trainer``).
    """
    version = lora_version(config, samples, base_model_id, init_lora)
    folder = lora_root / version
    result = trainer(
        pipe, samples, config, folder, cache_dir, on_log=on_log, base_model_id=base_model_id, init_lora=init_lora
    )
    parents = [s.sample_id for s in samples]
    files, sha256s = _export(pipe, config, folder, version, base_model_id, result, parents, recorder)
    output = LoraOutput(version, folder, files, sha256s, result, config)
    write_json_atomic(stored_lora(output.as_current(), lora_root), lora_root / CURRENT_FILE)

    resolution = config.resolution
    requests = [SampleRequest(prompt=p, seed=validation_seed) for p in validation_prompts]
    output.validation = [
        (request.prompt, image)
        for request, image in generate(pipe, requests, None, resolution, resolution, validation_steps, 5.0)
    ]
    return output


def run_preference(
    pipe: Any,
    pairs: Sequence[tuple[TrainingSample, TrainingSample]],
    config: TrainConfig,
    lora_root: Path,
    cache_dir: Path,
    recorder: LineageRecorder,
    base_model_id: str,
    init_lora: dict[str, torch.Tensor],
    on_log: Callable[[int, dict], None] | None = None,
) -> LoraOutput:
    """Diffusion-DPO on (winner, loser) pairs, starting from and regularised towards ``init_lora``; exported
    and versioned like ``run_lora``."""
    samples = [sample for pair in pairs for sample in pair]
    version = "dpo-" + lora_version(config, samples, base_model_id, init_lora, preference=True).removeprefix("lora-")
    folder = lora_root / version
    result = train_preference(
        pipe, pairs, config, folder, cache_dir, init_lora=init_lora, on_log=on_log, base_model_id=base_model_id
    )
    files, sha256s = _export(pipe, config, folder, version, base_model_id, result, [s.sample_id for s in samples],
                             recorder)  # fmt: skip
    output = LoraOutput(version, folder, files, sha256s, result, config)
    write_json_atomic(stored_lora(output.as_current(), lora_root), lora_root / CURRENT_FILE)
    return output


def current_lora(lora_root: Path) -> dict[str, Any]:
    """What the last successful ``run_lora`` exported (version, file paths, hashes)."""
    path = lora_root / CURRENT_FILE
    if not path.is_file():
        raise CastloraError(f"{path} does not exist: materialize the 'lora' asset for this pair first.")
    return loaded_lora(json.loads(path.read_text()), lora_root)
