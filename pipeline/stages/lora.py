"""Stage 6: train the pair's LoRA (resuming from its checkpoints), export it in both formats, render checks.

The version folder is named by a hash of everything that changes the weights (training fields, sample ids,
base model), so re-materializing after a kill lands in the same folder and resumes there, while a changed
setting or photo set starts a new version next to the old one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.errors import CastloraError
from pipeline.hashing import sha256_file, sha256_json
from pipeline.infer import SampleRequest, generate
from pipeline.lineage import LineageRecorder
from pipeline.lora import LoraSpec, export_lora
from pipeline.train import TrainConfig, TrainingSample, TrainResult, train_lora

CURRENT_FILE = "current.json"


@dataclass
class LoraOutput:
    version: str
    folder: Path
    files: dict[str, Path]
    sha256s: dict[str, str]
    result: TrainResult
    validation: list[tuple[str, Image.Image]]


def lora_version(config: TrainConfig, samples: Sequence[TrainingSample], base_model_id: str) -> str:
    sample_ids = sorted(s.sample_id for s in samples)
    return "lora-" + sha256_json([config.result_fields(), sample_ids, base_model_id])[:12]


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
) -> LoraOutput:
    version = lora_version(config, samples, base_model_id)
    folder = lora_root / version
    result = train_lora(pipe, samples, config, folder, cache_dir, on_log=on_log, base_model_id=base_model_id)
    spec = LoraSpec(
        rank=config.rank,
        alpha=config.alpha,
        target_modules=tuple(config.targets),
        train_text_encoders=config.train_text_encoder,
    )
    encoders = (pipe.text_encoder, pipe.text_encoder_2) if config.train_text_encoder else ()
    files = export_lora(
        folder,
        pipe.unet,
        spec,
        text_encoders=encoders,
        metadata={"castlora_version": version, "base_model": base_model_id},
    )
    sha256s = {kind: sha256_file(path) for kind, path in files.items()}
    parents = sorted({s.sample_id for s in samples})
    params = {
        "version": version,
        "steps": result.steps_done,
        "final_loss": result.final_loss,
        "resumed_from": result.resumed_from,
        **config.result_fields(),
        **{k: v for k, v in result.metrics.items() if isinstance(v, int | float | str)},
    }
    for kind, path in files.items():
        recorder.record(path, sha256s[kind], parents, {**params, "format": kind}, [base_model_id])
    current = {
        "version": version,
        "steps": result.steps_done,
        **{k: str(p) for k, p in files.items()},
        "sha256": sha256s,
    }
    (lora_root / CURRENT_FILE).write_text(json.dumps(current, indent=2))

    resolution = config.resolution
    requests = [SampleRequest(prompt=p, seed=validation_seed) for p in validation_prompts]
    validation = [
        (request.prompt, image)
        for request, image in generate(pipe, requests, None, resolution, resolution, validation_steps, 5.0)
    ]
    return LoraOutput(version, folder, files, sha256s, result, validation)


def current_lora(lora_root: Path) -> dict[str, Any]:
    """What the last successful ``run_lora`` exported (version, file paths, hashes)."""
    path = lora_root / CURRENT_FILE
    if not path.is_file():
        raise CastloraError(f"{path} does not exist: materialize the 'lora' asset for this pair first.")
    return json.loads(path.read_text())
