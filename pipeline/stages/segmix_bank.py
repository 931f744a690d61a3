"""Stage 5: a finite, seeded bank of Seg-Mix composites per pair (instance and prior), with masks and prompts.

Instance composites mix the characters' own cut-outs under their token phrases; prior composites mix
class-image cut-outs under their class nouns, as MuDI does when prior preservation is on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from pipeline.buckets import canvas_sizes, parse_aspects
from pipeline.segmix.bank import plan_bank, render_bank, write_bank_entry
from pipeline.segmix.compose import SegMixConfig, SegMixSubject
from pipeline.segmix.subjects import instance_subjects, prior_subjects
from pipeline.storage.lineage import LineageRecorder
from pipeline.storage.manifest import prune_unlisted, write_manifest


@dataclass(frozen=True)
class BankConfig:
    n_instance: int = 64
    """Composites of the characters' own cut-outs (token phrases)."""
    n_prior: int = 32
    """Composites of class-image cut-outs (class nouns); 0 disables them."""
    seed: int = 0
    """Seeds the bank's plan: which cut-outs, scales and places each composite gets."""
    canvas_aspects: str = "square"
    """Canvas aspect ratios: ``square`` (every composite on the canvas_width x canvas_height canvas); ``aspect``
    (1:1, 4:3, 3:4, 3:2, 2:3, 16:9, 9:16) or a comma list of width:height ratios (``1:1,3:4,4:3``): composites
    take the ratios in turn, each canvas of about canvas_width x canvas_height pixels (sides multiples of 16).
    Use the training's ``buckets`` value, so the composites fill the same aspect-ratio buckets as the photos."""
    segmix: SegMixConfig = field(default_factory=SegMixConfig)

    def __post_init__(self) -> None:
        parse_aspects(self.canvas_aspects, "canvas_aspects")  # refuses a bad value, naming the setting


@dataclass
class BankOutput:
    manifest: pd.DataFrame
    notes: list[str]


def _render(
    kind: str,
    subjects: dict[str, list[SegMixSubject]],
    n: int,
    seed: int,
    config: SegMixConfig,
    out_dir: Path,
    recorder: LineageRecorder,
    aspects: str = "square",
) -> list[dict]:
    folder = out_dir / kind
    rows = []
    params = {"kind": kind, "bank_seed": seed, **asdict(config)}
    canvases = canvas_sizes(aspects, *config.canvas) if parse_aspects(aspects, "canvas_aspects") else ()
    for entry, composite in render_bank(plan_bank(subjects, n, config, seed, canvases), config):
        row = write_bank_entry(entry, composite, folder, config)
        row["image_path"] = str(folder / row["image_path"])
        row["union_mask_path"] = str(folder / row["union_mask_path"])
        row["mask_paths"] = [str(folder / p) for p in row["mask_paths"]]
        parents = row["parent_sha256s"]
        recorder.record(
            row["image_path"],
            row["image_sha256"],
            parents,
            {**params, "canvas": list(composite.image.size), "index": entry.index, "seed": entry.seed},
        )
        recorder.record(row["union_mask_path"], row["union_mask_sha256"], parents, {"kind": kind, "role": "union_mask"})
        for j, (path, sha) in enumerate(zip(row["mask_paths"], row["mask_sha256s"], strict=True)):
            recorder.record(path, sha, parents, {"kind": kind, "role": f"visible_mask_{j}"})
        rows.append({"kind": kind, **row})
    return rows


def run_segmix_bank(
    *,
    segments: pd.DataFrame,
    class_images: pd.DataFrame | None,
    character_nouns: dict[str, str],
    out_dir: Path,
    config: BankConfig,
    recorder: LineageRecorder,
    relative_sizes: Mapping[str, float] | None = None,
) -> BankOutput:
    """Render the bank. ``relative_sizes`` (the pair spec's ``relative_size`` per character id) becomes Seg-Mix's
    ``relative_scale`` unless the run config sets one itself, so "the dog twice the toy's height" holds in every
    composite (docs/design.md#layout-control)."""
    notes: list[str] = []
    if relative_sizes:
        if config.segmix.relative_scale is None:
            config = replace(config, segmix=replace(config.segmix, relative_scale=dict(relative_sizes)))
        else:
            notes.append(
                f"The run's relative_scale {config.segmix.relative_scale} overrides the pair spec's relative sizes "
                f"{dict(relative_sizes)}."
            )
    rows = _render(
        "instance",
        instance_subjects(segments),
        config.n_instance,
        config.seed,
        config.segmix,
        out_dir,
        recorder,
        config.canvas_aspects,
    )
    if config.n_prior > 0:
        prior = prior_subjects(class_images, character_nouns) if class_images is not None else {}
        lacking = sorted(cid for cid, items in prior.items() if not items) if prior else sorted(character_nouns)
        if lacking:
            notes.append(
                f"No prior composites: no usable class-image cut-outs for {lacking} "
                "(materialize class_images, import real class photos, or use a real segmenter)."
            )
        else:
            rows += _render(
                "prior", prior, config.n_prior, config.seed + 1, config.segmix, out_dir, recorder, config.canvas_aspects
            )
    manifest = pd.DataFrame(rows)
    write_manifest(manifest, out_dir)
    keep = {Path(p) for r in rows for p in [r["image_path"], r["union_mask_path"], *r["mask_paths"]]}
    prune_unlisted(out_dir, keep, suffixes=(".png",))
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    return BankOutput(manifest=manifest, notes=notes)
