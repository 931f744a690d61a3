"""Stage 6: train the pair's LoRA (resuming from its checkpoints), export it in both formats, render checks.

Training, versioning and export live in ``pipeline.lora.versions`` (the iteration and the evaluation's baseline
train the same way); this stage adds the validation renders a person looks at after training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.infer import SampleRequest, generate
from pipeline.lora.modular import ModularConfig, ModularOutput, run_modular_lora
from pipeline.lora.record import LoraRecord, read_current
from pipeline.lora.versions import LoraOutput, TrainingRun, train_version
from pipeline.stage_names import Stage
from pipeline.train import TrainConfig, TrainingSample, TrainResult, train_lora


@dataclass(frozen=True)
class ValidationRenders:
    """Images rendered with the new LoRA right after training (plain noise, one per prompt)."""

    prompts: Sequence[str] = ()
    steps: int = 20
    seed: int = 0
    guidance_scale: float = 5.0


def run_lora(
    *,
    pipe: Any,
    samples: Sequence[TrainingSample],
    config: TrainConfig,
    run: TrainingRun,
    validation: ValidationRenders = ValidationRenders(),
    trainer: Callable[..., TrainResult] = train_lora,
) -> LoraOutput:
    """Train (resuming if possible), export both formats, point ``current.json`` at them, render checks.

    ``trainer`` has ``train_lora``'s signature (e.g. ``pipeline.train.launch``'s ``distributed_trainer``)."""
    output = train_version(pipe=pipe, samples=samples, config=config, run=run, trainer=trainer)
    output.validation = _validation_renders(pipe, config.resolution, validation)
    return output


def run_modular(
    *,
    pipe_factory: Callable[[], Any],
    characters: Sequence[Any],
    samples: Sequence[TrainingSample],
    config: TrainConfig,
    modular: ModularConfig,
    run: TrainingRun,
    validation: ValidationRenders = ValidationRenders(),
    trainer: Callable[..., TrainResult] = train_lora,
) -> ModularOutput:
    """The pair's LoRA from the characters' own LoRAs (every character has one): merge them by
    ``modular.merge_method``, export the merge and the naive merge, fine-tune the merge with Seg-Mix on
    ``samples`` and KL towards it (``pipeline.lora.modular.run_modular_lora``), then render the checks."""
    out = run_modular_lora(
        pipe_factory=pipe_factory,
        characters=characters,
        samples=samples,
        train_config=config,
        config=modular,
        run=run,
        trainer=trainer,
    )
    if validation.prompts:
        pipe = pipe_factory()
        pipe.load_lora_weights(str(out.finetuned.files["diffusers"]))
        out.finetuned.validation = _validation_renders(pipe, config.resolution, validation)
    return out


def is_modular(characters: Sequence[Any]) -> bool:
    """True when every character is given as its own LoRA file: the pair's LoRA is then merged and fine-tuned
    instead of trained from scratch (docs/design.md#modular-customization)."""
    return all(getattr(c, "lora", None) for c in characters)


def _validation_renders(pipe: Any, resolution: int | None, validation: ValidationRenders) -> list[tuple[str, Any]]:
    requests = [SampleRequest(prompt=p, seed=validation.seed) for p in validation.prompts]
    return [
        (request.prompt, image)
        for request, image in generate(
            pipe, requests, None, resolution, resolution, validation.steps, validation.guidance_scale
        )
    ]


def current_lora(lora_root: Path) -> LoraRecord:
    """What the last successful ``run_lora`` exported (version, file paths, hashes, settings)."""
    return read_current(lora_root, Stage.LORA)
