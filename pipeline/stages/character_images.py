"""Stage: reference images of each character rendered with its own LoRA (modular customization, MuDI §5.4,
docs/design.md#modular-customization).

For every character whose spec names a ``lora`` file, the file is checked against the base model (the first
stage that loads it: a mismatched LoRA fails here with the file and the first mismatching key), put on the
denoiser alone, and ``images_per_character`` images are rendered from plain prompts with the token phrase. The
``references`` stage takes them in like photos (marked ``generated``), so segmentation, captions and the Seg-Mix
bank treat them alike. Characters without a LoRA get no images, and a pair without any LoRA loads no model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import CastloraError
from pipeline.families import family_for
from pipeline.images import save_png
from pipeline.infer import SampleRequest, generate
from pipeline.lora.adapters import remove_adapter
from pipeline.lora.character_lora import attach_lora_modules, load_character_lora
from pipeline.lora.modular import character_prompts
from pipeline.settings import from_preset
from pipeline.spec import PairSpec
from pipeline.storage.lineage import LineageRecorder
from pipeline.storage.manifest import prune_unlisted, write_manifest

CHARACTER_ADAPTER = "castlora_character"
COLUMNS = ["character_id", "path", "sha256", "prompt", "seed", "lora", "lora_sha256", "lora_format", "rank", "alpha"]


@dataclass(frozen=True)
class CharacterImagesConfig:
    """How the images of a character given as a LoRA are rendered."""

    images_per_character: int = 5
    """Images rendered per character LoRA (MuDI: 5)."""
    steps: int | None = from_preset("inference_steps")
    """Denoising steps. Not set: the model preset's ``inference_steps``."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale."""
    resolution: int | None = from_preset("resolution")
    """Square image side in pixels. Not set: the model preset's resolution."""
    seed: int = 0
    """Image k of a character uses seed + k."""

    def __post_init__(self) -> None:
        if self.images_per_character < 1:
            raise CastloraError(f"images_per_character={self.images_per_character} must be >= 1.")


def run_character_images(
    *,
    spec: PairSpec,
    load_pipeline: Callable[[], Any],
    config: CharacterImagesConfig,
    out_dir: Path,
    recorder: LineageRecorder,
    base_model_id: str,
) -> pd.DataFrame:
    """Render every LoRA character's images into ``out_dir/<character>/``; returns the manifest (empty when no
    character has a LoRA). ``config`` must be resolved (steps, resolution set)."""
    if config.steps is None or config.resolution is None:
        raise CastloraError("run_character_images needs resolved settings (steps and resolution).")
    with_lora = [c for c in spec.characters if c.lora]
    rows: list[dict[str, Any]] = []
    written: set[Path] = set()
    if with_lora:
        pipe = load_pipeline()
        family = family_for(pipe)
        denoiser = family.component(pipe, family.denoiser)
        # Check every file before rendering any image: one bad LoRA fails the stage at once.
        loras = {c.id: load_character_lora(pipe, c.lora, c.lora_scale) for c in with_lora}
        for character in with_lora:
            lora = loras[character.id]
            attach_lora_modules(denoiser, lora.modules, CHARACTER_ADAPTER, lora.scale)
            prompts = character_prompts(character.token_phrase, config.images_per_character)
            requests = [SampleRequest(prompt=p, seed=config.seed + k) for k, p in enumerate(prompts)]
            try:
                images = list(
                    generate(
                        pipe, requests, None, config.resolution, config.resolution, config.steps, config.guidance_scale
                    )
                )
            finally:
                remove_adapter(denoiser, CHARACTER_ADAPTER)
            for request, image in images:
                path = out_dir / character.id / f"{character.id}_{request.seed:04d}.png"
                sha = save_png(image, path)
                written.add(path)
                row = {
                    "character_id": character.id,
                    "path": str(path),
                    "sha256": sha,
                    "prompt": request.prompt,
                    "seed": request.seed,
                    "lora": lora.path,
                    "lora_sha256": lora.sha256,
                    "lora_format": lora.file_format,
                    "rank": lora.rank,
                    "alpha": lora.alpha,
                }
                rows.append(row)
                params = {
                    "generated": True,
                    "prompt": request.prompt,
                    "seed": request.seed,
                    "lora": lora.path,
                    "lora_scale": lora.scale,
                    "steps": config.steps,
                    "guidance_scale": config.guidance_scale,
                    "resolution": config.resolution,
                }
                recorder.record(path, sha, [lora.sha256], params, [base_model_id])
    manifest = pd.DataFrame(rows, columns=COLUMNS)
    write_manifest(manifest, out_dir)
    prune_unlisted(out_dir, written)
    return manifest
