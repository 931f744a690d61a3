"""Versioned LoRAs: train (resuming from checkpoints) into a folder named by what changes the weights, export
both formats, record them in lineage and point ``current.json`` at them.

The version folder is named by a hash of everything that changes the weights (training fields, sample ids,
base model, the starting LoRA), so re-training after a kill lands in the same folder and resumes there, while a
changed setting or photo set starts a new version next to the old one. Every stage that trains a LoRA (the
pair's LoRA, the iteration's rounds, the evaluation's DreamBooth baseline) trains through here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.families import family_for
from pipeline.lora import LoraSpec
from pipeline.lora.record import LoraRecord, write_current
from pipeline.lora.training import lora_state_hash
from pipeline.storage.hashing import sha256_file, sha256_json
from pipeline.storage.lineage import LineageRecorder
from pipeline.train import TrainConfig, TrainingSample, TrainResult, train_lora, train_preference


@dataclass
class LoraOutput:
    version: str
    folder: Path
    files: dict[str, Path]
    sha256s: dict[str, str]
    result: TrainResult
    config: TrainConfig
    validation: list[tuple[str, Image.Image]] = field(default_factory=list)
    """(prompt, image) renders of the new LoRA, when its stage asked for them."""

    def as_current(self) -> LoraRecord:
        """What ``current.json`` records: version, steps done, file path per format, their hashes, and every
        training setting (``TrainConfig.as_record``), so ``LoraRecord.train_config`` rebuilds the config exactly."""
        return LoraRecord(
            version=self.version,
            files=dict(self.files),
            sha256=dict(self.sha256s),
            steps=self.result.steps_done,
            train_record=self.config.as_record(),
        )


@dataclass(frozen=True)
class TrainingRun:
    """Where and how a LoRA version is trained: the parts every training call shares."""

    lora_root: Path
    """Versions are folders in it; its ``current.json`` names the last one trained."""
    cache_dir: Path
    recorder: LineageRecorder
    base_model_id: str
    on_log: Callable[[int, dict], None] | None = None


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
    result: TrainResult,
    parents: Sequence[str],
    run: TrainingRun,
) -> LoraOutput:
    """Write both LoRA formats from ``pipe``'s trained adapter, record them in lineage and in ``current.json``."""
    spec = LoraSpec(
        rank=config.rank,
        alpha=config.alpha,
        target_modules=tuple(config.targets),
        train_text_encoders=config.train_text_encoder,
    )
    metadata = {"castlora_version": version, "base_model": run.base_model_id}
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
        run.recorder.record(path, sha256s[kind], sorted(set(parents)), {**params, "format": kind}, [run.base_model_id])
    output = LoraOutput(version, folder, files, sha256s, result, config)
    write_current(output.as_current(), run.lora_root)
    return output


def train_version(
    *,
    pipe: Any,
    samples: Sequence[TrainingSample],
    config: TrainConfig,
    run: TrainingRun,
    init_lora: dict[str, torch.Tensor] | None = None,
    trainer: Callable[..., TrainResult] = train_lora,
) -> LoraOutput:
    """Train (resuming if possible) the version of ``config`` × ``samples``, export both formats and point
    ``current.json`` at them.

    ``init_lora`` (a LoRA state: U-Net, plus text encoders for a text-encoder LoRA) starts from another LoRA,
    as the iterative rounds do; with ``config.kl_weight`` > 0 it is also the frozen reference of the KL term.
    ``trainer`` has ``train_lora``'s signature and must leave the trained adapter on ``pipe`` as it does (e.g.
    ``pipeline.train.launch``'s multi-process ``distributed_trainer``).
    """
    version = lora_version(config, samples, run.base_model_id, init_lora)
    folder = run.lora_root / version
    result = trainer(
        pipe,
        samples,
        config,
        folder,
        run.cache_dir,
        on_log=run.on_log,
        base_model_id=run.base_model_id,
        init_lora=init_lora,
    )
    return _export(pipe, config, folder, version, result, [s.sample_id for s in samples], run)


def train_preference_version(
    *,
    pipe: Any,
    pairs: Sequence[tuple[TrainingSample, TrainingSample]],
    config: TrainConfig,
    run: TrainingRun,
    init_lora: dict[str, torch.Tensor],
) -> LoraOutput:
    """Diffusion-DPO on (winner, loser) pairs, starting from and regularised towards ``init_lora``; exported
    and versioned like ``train_version``."""
    samples = [sample for pair in pairs for sample in pair]
    version = "dpo-" + lora_version(config, samples, run.base_model_id, init_lora, preference=True).removeprefix(
        "lora-"
    )
    folder = run.lora_root / version
    result = train_preference(
        pipe,
        pairs,
        config,
        folder,
        run.cache_dir,
        init_lora=init_lora,
        on_log=run.on_log,
        base_model_id=run.base_model_id,
    )
    return _export(pipe, config, folder, version, result, [s.sample_id for s in samples], run)
