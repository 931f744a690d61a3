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
    resolution = config.resolution
    requests = [SampleRequest(prompt=p, seed=validation.seed) for p in validation.prompts]
    output.validation = [
        (request.prompt, image)
        for request, image in generate(
            pipe, requests, None, resolution, resolution, validation.steps, validation.guidance_scale
        )
    ]
    return output


def current_lora(lora_root: Path) -> LoraRecord:
    """What the last successful ``run_lora`` exported (version, file paths, hashes, settings)."""
    return read_current(lora_root, Stage.LORA)
