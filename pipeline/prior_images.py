"""Class images for DreamBooth prior preservation: generic pictures of each class noun from the base model.

Images are rendered through the base model's family (``ModelFamily.render_batch``, docs/design.md#model-families).
Image ``i`` is generated from its own generator seeded with ``seed + i``, so its content depends only on
``seed + i``, not on the batch size or on which other images share its batch. Batched float arithmetic
still rounds slightly differently for different batch compositions (on CPU: at most one grey level on a
few pixels), so batches are aligned to fixed chunks ``[k*batch_size, (k+1)*batch_size)``: a resumed run
recomputes exactly the chunks an uninterrupted run would have, and its images are bit-identical.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.errors import CastloraError
from pipeline.families import find_family
from pipeline.families.base import RenderRequest, text_to_image_batch
from pipeline.images import IMAGE_SUFFIXES
from pipeline.settings import family_option, from_preset, unresolved
from pipeline.storage.paths import confined_path

CLASS_NOUN_FIELD = "{class_noun}"


@dataclass(frozen=True)
class ClassImageConfig:
    count: int | None = from_preset("class_images_per_noun")
    """Images per class noun (MuDI/DreamBooth: about 100). Not set: the model preset's ``class_images_per_noun``."""
    resolution: int | None = from_preset("resolution")
    """Square side in pixels, a multiple of 8 (the VAE's downsampling). Not set: the model preset's resolution."""
    steps: int | None = from_preset("class_image_steps")
    """Denoising steps per image. Not set: the model preset's ``class_image_steps``."""
    guidance_scale: float | None = from_preset("guidance_scale", zero_is_a_value=True)
    """Guidance scale: classifier-free guidance for SDXL, the distilled guidance for FLUX.1-dev (FLUX.1-schnell
    ignores it). Not set: the model preset's ``guidance_scale``."""
    seed: int = 0
    """Image i of a class noun is generated with seed ``seed + i``."""
    prompt_template: str = "a photo of a {class_noun}"
    """The generation prompt; recorded per image and trained with (imported images get it too)."""
    negative_prompt: str = ""
    """Empty means none: SDXL then uses zero embeddings for the unconditional branch, as it was trained. FLUX.1
    ignores it unless ``true_cfg_scale`` > 1."""
    true_cfg_scale: float = family_option(1.0)
    """FLUX.1 only: > 1 renders ``negative_prompt`` with true classifier-free guidance at this scale (two transformer
    passes per step); 1: off (docs/design.md#flux1-run-settings)."""
    batch_size: int = 4
    """Images generated per pipeline call (``ModelFamily.render_batch``; a family that does not batch renders them
    one by one)."""

    def __post_init__(self) -> None:
        problems = []
        if self.count is not None and self.count < 0:
            problems.append(f"count must be >= 0 (got {self.count})")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            problems.append(f"resolution must be a positive multiple of 8 (got {self.resolution})")
        if self.steps is not None and self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if CLASS_NOUN_FIELD not in self.prompt_template:
            problems.append(f"prompt_template must contain {CLASS_NOUN_FIELD} (got {self.prompt_template!r})")
        if problems:
            raise CastloraError("Invalid class image settings: " + "; ".join(problems) + ".")

    def prompt_for(self, class_noun: str) -> str:
        # str.replace, not str.format: a template may legitimately contain other braces.
        return self.prompt_template.replace(CLASS_NOUN_FIELD, class_noun)


def image_seed(config: ClassImageConfig, index: int) -> int:
    """The seed that alone determines class image ``index``."""
    return config.seed + index


def _pipeline_device(pipe: Any) -> torch.device:
    return torch.device(getattr(pipe, "device", "cpu"))


def generate_class_images(
    pipe: Any,
    class_noun: str,
    config: ClassImageConfig,
    skip_indices: Collection[int] = (),
) -> Iterator[tuple[int, int, Image.Image]]:
    """Yield ``(index, seed, image)`` for indices ``0..count-1`` not in ``skip_indices``, in index order.

    Pass the indices already saved as ``skip_indices`` to resume an interrupted run. A chunk with some
    indices done and some missing is recomputed whole (only the missing ones are yielded), which costs at
    most ``batch_size - 1`` extra images and keeps the missing ones bit-identical to a full run.
    """
    if not class_noun.strip():
        raise CastloraError("Class images need a class noun (e.g. 'dog'); got an empty string.")
    if unresolved(config):
        raise CastloraError(f"Class image settings {unresolved(config)} are not set: resolve them against a preset.")
    prompt = config.prompt_for(class_noun)
    negative_prompt = config.negative_prompt or None
    family = find_family(pipe)
    if family is not None:
        family = family.with_options(config)  # FLUX: true_cfg_scale
    device = _pipeline_device(pipe)
    skipped = set(skip_indices)
    for start in range(0, config.count, config.batch_size):
        batch = list(range(start, min(start + config.batch_size, config.count)))
        if skipped.issuperset(batch):
            continue
        seeds = [image_seed(config, index) for index in batch]
        requests = [
            RenderRequest(
                prompt=prompt,
                negative_prompt=negative_prompt,
                height=config.resolution,
                width=config.resolution,
                steps=config.steps,
                guidance_scale=config.guidance_scale,
                generator=torch.Generator(device=device).manual_seed(seed),
                lora_scale=1.0,
                initial_latents=None,
            )
            for seed in seeds
        ]
        # A pipeline no registered family claims (a test's stand-in) gets the plain diffusers text-to-image call.
        images = family.render_batch(pipe, requests) if family is not None else text_to_image_batch(pipe, requests)
        if images is None:
            raise CastloraError(f"{type(pipe).__name__} is no registered model family's pipeline.")
        for index, seed, image in zip(batch, seeds, images, strict=True):
            if index not in skipped:
                yield index, seed, image


def list_class_image_files(folder: Path, confine_to: Path | None = None) -> list[Path]:
    """Image files directly in ``folder`` (hidden files excluded), sorted by name; error if there are none.
    With ``confine_to`` (an inbox pair folder) each one is checked to lie inside it, right before it is read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CastloraError(
            f"Class image folder {folder} does not exist; generate class images first or point at a folder "
            f"of images ({', '.join(sorted(IMAGE_SUFFIXES))})."
        )
    files = sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
    )
    if confine_to is not None:
        for path in files:
            confined_path(path, Path(confine_to), f"Class image in {folder}")
    if not files:
        raise CastloraError(
            f"Class image folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "generate class images first or add some."
        )
    return files
