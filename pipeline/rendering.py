"""Rendering prompts × seeds with a loaded LoRA, optionally from MuDI's mean-shifted init, into a folder.

Every prompt is rendered with the same fixed seeds, so prompts (and LoRA versions) can be compared image for
image. The layout of a MuDI-initialised image is made from its seed (``layout_factory(seed)``), so an image
depends only on (prompt, seed, settings) and the same seed shows the same arrangement under every prompt.
Each image is stored with its prompt, seed, γ, layout (source, boxes, composite file), LoRA version and negative
prompt in ``manifest.parquet`` and in lineage, with the layout composite and the LoRA file as parents. The
samples stage, the iteration's rounds and the evaluation's grid all render through here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import CastloraError
from pipeline.images import mask_to_image, save_png
from pipeline.infer import Layout, SampleRequest, check_gamma, generate, layout_from_composite
from pipeline.segmix.compose import SegMixConfig, compose
from pipeline.segmix.subjects import instance_subjects
from pipeline.settings import changed_family_options, family_option
from pipeline.storage.lineage import LineageRecorder
from pipeline.storage.manifest import prune_unlisted, write_manifest


@dataclass(frozen=True)
class RenderSettings:
    """How every image of a render is made (the same for each prompt and seed)."""

    height: int
    width: int
    steps: int
    guidance_scale: float
    negative_prompt: str | None = None
    lora_scale: float = 1.0
    true_cfg_scale: float = family_option(1.0)
    """FLUX.1 only: > 1 renders the negative prompt with true classifier-free guidance
    (docs/design.md#flux1-run-settings)."""


@dataclass(frozen=True)
class GenerationSettings:
    """What the iteration and the evaluation render: their prompts, square resolution and sampler settings.

    Its fields are part of the iteration run's identity (``pipeline.settings.identity_record``: family options only
    when set): keep them as they are."""

    prompts: tuple[str, ...]
    resolution: int
    steps: int
    guidance_scale: float
    negative_prompt: str | None
    seed: int = 0
    true_cfg_scale: float = family_option(1.0)
    """FLUX.1 only: > 1 renders the negative prompt with true classifier-free guidance."""

    def render_settings(self) -> RenderSettings:
        return RenderSettings(
            height=self.resolution,
            width=self.resolution,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            negative_prompt=self.negative_prompt,
            true_cfg_scale=self.true_cfg_scale,
        )


def _seeds_for(seeds: Sequence[int], images_per_prompt: int) -> list[int]:
    if images_per_prompt < 1:
        raise CastloraError(f"images_per_prompt must be >= 1; got {images_per_prompt}.")
    if len(seeds) < images_per_prompt:
        raise CastloraError(
            f"images_per_prompt is {images_per_prompt} but only {len(seeds)} seed(s) were given ({list(seeds)}): "
            "give at least one seed per image (image k of every prompt uses seeds[k])."
        )
    chosen = [int(s) for s in seeds[:images_per_prompt]]
    if len(set(chosen)) != len(chosen):
        raise CastloraError(f"Seeds must be distinct, otherwise images repeat; got {chosen}.")
    return chosen


def _write_layout(layout: Layout, seed: int, folder: Path, recorder: LineageRecorder) -> dict[str, Any]:
    """Save the layout composite and its union mask once per seed; the composite is each image's parent."""
    image_path = folder / f"layout_s{seed}.png"
    mask_path = folder / f"layout_s{seed}_mask.png"
    image_sha = save_png(layout.image, image_path)
    mask_sha = save_png(mask_to_image(layout.union_mask), mask_path)
    boxes_json = json.dumps([[int(v) for v in box] for box in layout.boxes])
    params = {"source": layout.source, "boxes": boxes_json, "seed": seed}
    recorder.record(image_path, image_sha, [], params)
    recorder.record(mask_path, mask_sha, [image_sha], {**params, "kind": "union_mask"})
    return {
        "layout_source": layout.source,
        "layout_boxes_json": boxes_json,
        "layout_path": str(image_path),
        "layout_sha256": image_sha,
        "layout_mask_path": str(mask_path),
    }


NO_LAYOUT: dict[str, Any] = {
    "layout_source": None,
    "layout_boxes_json": None,
    "layout_path": None,
    "layout_sha256": None,
    "layout_mask_path": None,
}


def render_samples(
    *,
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    images_per_prompt: int | Sequence[int],
    layout_factory: Callable[[int], Layout] | None,
    gamma: float | None,
    settings: RenderSettings,
    lora_version: str,
    lora_sha256: str | None,
    out_dir: Path,
    recorder: LineageRecorder,
    model_ids: Sequence[str] = (),
) -> pd.DataFrame:
    """Render ``images_per_prompt`` images per prompt (image k uses ``seeds[k]``) into ``out_dir``; a sequence
    gives each prompt its own count (prompt i renders images 0 .. count_i - 1). ``pipe`` holds the LoRA
    ``lora_version`` (file hash ``lora_sha256``, a lineage parent of every image) already.

    ``gamma=None`` renders from plain noise and needs no layout; otherwise ``layout_factory(seed)`` gives the
    layout of every image with that seed (e.g. ``lambda s: layout_from_composite(compose(subjects, config, s))``).
    Returns the manifest (also written as ``out_dir/manifest.parquet``); files of earlier runs that it no longer
    lists are removed.
    """
    if not prompts:
        raise CastloraError("render_samples got no prompts: configure prompts or use DEFAULT_SCENE_PROMPTS.")
    if gamma is not None:
        check_gamma(gamma, "samples gamma")
        if layout_factory is None:
            raise CastloraError(
                f"gamma is {gamma} (MuDI init) but no layout_factory was given: pass one (Seg-Mix or user boxes) "
                "or set gamma to None for plain noise."
            )
    if isinstance(images_per_prompt, int):
        counts = [images_per_prompt] * len(prompts)
    else:
        counts = [int(n) for n in images_per_prompt]
        if len(counts) != len(prompts) or min(counts) < 1:
            raise CastloraError(
                f"images_per_prompt {counts} must give one count >= 1 per prompt ({len(prompts)} prompts)."
            )
    chosen_seeds = _seeds_for(seeds, max(counts))
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    layout_dir = out_dir / "layouts"
    written: set[Path] = set()
    rows: list[dict[str, Any]] = []
    recorded = {
        "height": settings.height,
        "width": settings.width,
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        **({"true_cfg_scale": settings.true_cfg_scale} if changed_family_options(settings) else {}),
        "lora_scale": settings.lora_scale,
        "lora_version": lora_version,
        "lora_sha256": lora_sha256,
    }
    # One seed at a time: its layout is made and encoded once and shared by all prompts.
    for image_index, seed in enumerate(chosen_seeds):
        layout = layout_factory(seed) if gamma is not None else None
        layout_row = _write_layout(layout, seed, layout_dir, recorder) if layout is not None else NO_LAYOUT
        if layout is not None:
            written.update(Path(layout_row[k]) for k in ("layout_path", "layout_mask_path"))
        indices = [i for i, count in enumerate(counts) if image_index < count]
        requests = [
            SampleRequest(prompts[i], seed, settings.negative_prompt or None, settings.lora_scale, gamma)
            for i in indices
        ]
        outputs = generate(
            pipe,
            requests,
            layout,
            settings.height,
            settings.width,
            settings.steps,
            settings.guidance_scale,
            options=settings,
        )
        for prompt_index, (request, image) in zip(indices, outputs, strict=True):
            path = image_dir / f"p{prompt_index:03d}_s{seed}.png"
            sha = save_png(image, path)
            written.add(path)
            row = {
                "path": str(path),
                "sha256": sha,
                "prompt_index": prompt_index,
                "image_index": image_index,
                "prompt": request.prompt,
                "seed": seed,
                "gamma": gamma,
                "negative_prompt": request.negative_prompt,
                **layout_row,
                **recorded,
            }
            parents = [p for p in (layout_row["layout_sha256"], lora_sha256) if p]
            params = {k: v for k, v in row.items() if k not in ("path", "sha256")}
            recorder.record(path, sha, parents, params, model_ids)
            rows.append(row)
    manifest = pd.DataFrame(rows).sort_values(["prompt_index", "image_index"], kind="stable").reset_index(drop=True)
    write_manifest(manifest, out_dir)
    prune_unlisted(out_dir, written, suffixes=(".png",))
    return manifest


def segmix_layout_factory(segments: pd.DataFrame, resolution: int, seed_offset: int = 0) -> Callable[[int], Layout]:
    """Layouts made from the pair's cut-outs: seed s composes the (s + offset)-th cut-out of each character
    (cycling) with Seg-Mix seed s + offset, so a seed always shows the same arrangement."""
    subjects = list(instance_subjects(segments).values())
    if not subjects:
        raise CastloraError("No usable cut-outs in the segments manifest: MuDI init needs a layout of the characters.")
    config = SegMixConfig(canvas=(resolution, resolution), k=len(subjects))

    def layout_for(seed: int) -> Layout:
        chosen = [group[(seed + seed_offset) % len(group)] for group in subjects]
        return layout_from_composite(compose(chosen, config, seed + seed_offset))

    return layout_for
