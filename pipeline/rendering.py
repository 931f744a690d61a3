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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from pipeline.errors import CastloraError
from pipeline.evaluation.draw import annotated_grid
from pipeline.images import mask_to_image, save_png
from pipeline.infer import Layout, SampleRequest, check_gamma, generate
from pipeline.layout_control import PairLayouts
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


def _write_layout(layout: Layout, name: str, seed: int, folder: Path, recorder: LineageRecorder) -> dict[str, Any]:
    """Save the layout composite and its union mask once per (layout, seed); the composite is each image's parent.
    Every image row records where its layout came from (origin user / llm / auto), its boxes with the character
    of each, and any warning (docs/design.md#layout-control)."""
    image_path = folder / f"{name}.png"
    mask_path = folder / f"{name}_mask.png"
    image_sha = save_png(layout.image, image_path)
    mask_sha = save_png(mask_to_image(layout.union_mask), mask_path)
    boxes_json = json.dumps([[int(v) for v in box] for box in layout.boxes])
    labels_json = json.dumps(list(layout.labels))
    params = {
        "source": layout.source,
        "origin": layout.origin,
        "boxes": boxes_json,
        "labels": labels_json,
        "warning": layout.warning,
        "seed": seed,
    }
    recorder.record(image_path, image_sha, [], params)
    recorder.record(mask_path, mask_sha, [image_sha], {**params, "kind": "union_mask"})
    return {
        "layout_source": layout.source,
        "layout_origin": layout.origin,
        "layout_boxes_json": boxes_json,
        "layout_labels_json": labels_json,
        "layout_warning": layout.warning,
        "layout_path": str(image_path),
        "layout_sha256": image_sha,
        "layout_mask_path": str(mask_path),
    }


NO_LAYOUT: dict[str, Any] = {
    "layout_source": None,
    "layout_origin": None,
    "layout_boxes_json": None,
    "layout_labels_json": None,
    "layout_warning": "",
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
    prompt_layouts: Sequence[Callable[[int], Layout] | None] | None = None,
) -> pd.DataFrame:
    """Render ``images_per_prompt`` images per prompt (image k uses ``seeds[k]``) into ``out_dir``; a sequence
    gives each prompt its own count (prompt i renders images 0 .. count_i - 1). ``pipe`` holds the LoRA
    ``lora_version`` (file hash ``lora_sha256``, a lineage parent of every image) already.

    ``gamma=None`` renders from plain noise and needs no layout; otherwise ``layout_factory(seed)`` gives the
    layout of every image with that seed (e.g. ``lambda s: layout_from_composite(compose(subjects, config, s))``).
    ``prompt_layouts[i]``, when given and not None, replaces it for prompt i (user boxes, relative sizes or an
    LLM's boxes: docs/design.md#layout-control); prompts without one share the default layout of each seed.
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
    if prompt_layouts is not None and len(prompt_layouts) != len(prompts):
        raise CastloraError(f"prompt_layouts has {len(prompt_layouts)} entries for {len(prompts)} prompts.")
    if gamma is None and prompt_layouts is not None and any(f is not None for f in prompt_layouts):
        raise CastloraError(
            "Some prompts ask for a layout (boxes, sizes or llm) but gamma is null (plain noise, no layout): set "
            "gamma (MuDI init, e.g. 1.0) or use layout auto."
        )
    factories = list(prompt_layouts) if prompt_layouts is not None else [None] * len(prompts)
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
    # One seed at a time: each of its layouts is made and encoded once and shared by the prompts that use it
    # (every prompt without its own layout shares the seed's default layout).
    for image_index, seed in enumerate(chosen_seeds):
        indices = [i for i, count in enumerate(counts) if image_index < count]
        groups: dict[int | None, list[int]] = {}
        for i in indices:
            groups.setdefault(None if factories[i] is None else i, []).append(i)
        for owner, members in groups.items():
            layout = None
            layout_row = NO_LAYOUT
            if gamma is not None:
                layout = (layout_factory if owner is None else factories[owner])(seed)
                name = f"layout_s{seed}" if owner is None else f"layout_p{owner:03d}_s{seed}"
                layout_row = _write_layout(layout, name, seed, layout_dir, recorder)
                written.update(Path(layout_row[k]) for k in ("layout_path", "layout_mask_path"))
            requests = [
                SampleRequest(prompts[i], seed, settings.negative_prompt or None, settings.lora_scale, gamma)
                for i in members
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
            for prompt_index, (request, image) in zip(members, outputs, strict=True):
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


def segmix_layout_factory(
    segments: pd.DataFrame,
    resolution: int,
    seed_offset: int = 0,
    relative_sizes: Mapping[str, float] | None = None,
) -> Callable[[int], Layout]:
    """Layouts made from the pair's cut-outs: seed s composes the (s + offset)-th cut-out of each character
    (cycling) with Seg-Mix seed s + offset, so a seed always shows the same arrangement. ``relative_sizes``
    (the pair spec's, by character id) keeps the characters' height ratio, as in the training composites."""
    return pair_layouts(segments, resolution, seed_offset, relative_sizes).segmix


def pair_layouts(
    segments: pd.DataFrame,
    resolution: int,
    seed_offset: int = 0,
    relative_sizes: Mapping[str, float] | None = None,
) -> PairLayouts:
    """The pair's cut-outs (segments manifest) on a square canvas, for every layout mode."""
    return PairLayouts(instance_subjects(segments), (resolution, resolution), seed_offset, relative_sizes)


def layout_grid(manifest: pd.DataFrame, columns: int = 4, limit: int = 16) -> Image.Image:
    """The rendered images with the boxes of the layout each started from (coloured per character) and a caption
    "p1 · seed 5 · user": the samples asset's metadata grid."""
    items = []
    for row in manifest.head(limit).to_dict("records"):
        with Image.open(row["path"]) as opened:
            image = opened.convert("RGB")
        boxes = json.loads(row["layout_boxes_json"]) if row.get("layout_boxes_json") else []
        labels = json.loads(row["layout_labels_json"]) if row.get("layout_labels_json") else []
        if boxes and row.get("layout_path"):
            # Boxes are in layout-canvas pixels; the image may be rendered at another size.
            with Image.open(row["layout_path"]) as layout_image:
                sx, sy = image.width / layout_image.width, image.height / layout_image.height
            boxes = [(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy) for b in boxes]
        origin = row.get("layout_origin") or "plain noise"
        warned = " · fell back" if row.get("layout_warning") else ""
        caption = f"p{int(row['prompt_index']) + 1} · seed {row['seed']} · {origin}{warned}"
        items.append((image, boxes, labels, caption))
    return annotated_grid(items, columns=columns)
