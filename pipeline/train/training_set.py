"""Training samples of a pair from its stage manifests (references, captions, segments, bank, class images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import CastloraError
from pipeline.segment import STATUS_OK
from pipeline.stage_names import Stage
from pipeline.storage.manifest import read_manifest
from pipeline.train.data import INSTANCE, PRIOR, PRIOR_SEGMIX, SEGMIX, TrainingSample


def _optional(value: object) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def build_samples(
    references: pd.DataFrame,
    captions: pd.DataFrame,
    segmix_bank: pd.DataFrame | None = None,
    class_images: pd.DataFrame | None = None,
    segments: pd.DataFrame | None = None,
) -> list[TrainingSample]:
    """One sample per reference photo (with its caption), bank composite and class image (with the prompt it
    was generated from, recorded in the class_images manifest).

    ``segments`` (optional) supplies the reference masks for the masked loss; class images carry their own.
    """
    caption_of = dict(zip(captions["reference_sha256"], captions["caption"], strict=True))
    mask_of: dict[str, str | None] = {}
    if segments is not None and len(segments):
        usable = segments[segments["status"] == STATUS_OK]
        mask_of = {str(p): _optional(m) for p, m in zip(usable["reference_path"], usable["mask_path"], strict=True)}
    samples = []
    for row in references.to_dict("records"):
        if row["sha256"] not in caption_of:
            raise CastloraError(
                f"Reference {row['path']} has no caption in the captions manifest: re-materialize 'captions'."
            )
        samples.append(
            TrainingSample(row["sha256"], row["path"], caption_of[row["sha256"]], INSTANCE, mask_of.get(row["path"]))
        )
    if segmix_bank is not None:
        for row in segmix_bank.to_dict("records"):
            kind = SEGMIX if row["kind"] == "instance" else PRIOR_SEGMIX
            samples.append(
                TrainingSample(row["image_sha256"], row["image_path"], row["prompt"], kind, row["union_mask_path"])
            )
    if class_images is not None:
        if "prompt" not in class_images.columns:
            raise CastloraError(
                "The class_images manifest records no prompt per image (written by an older castlora): "
                "re-materialize 'class_images' (generated images are reused, not regenerated)."
            )
        for row in class_images.to_dict("records"):
            mask = _optional(row.get("mask_path")) if row.get("status") == STATUS_OK else None
            # The image's own generation prompt: a custom prompt_template is what prior preservation trains on.
            samples.append(TrainingSample(row["sha256"], row["path"], str(row["prompt"]), PRIOR, mask))
    return samples


def load_samples(pair_dir: Path, with_prior: bool = True) -> list[TrainingSample]:
    """Samples of a pair from its stage folders (``references``, ``captions``, ``segments``, ``segmix_bank``,
    ``class_images``); the bank and class images are optional, references and captions are required."""
    pair_dir = Path(pair_dir)

    def optional(stage: Stage) -> pd.DataFrame | None:
        path = pair_dir / stage
        return read_manifest(path, stage) if (path / "manifest.parquet").is_file() else None

    samples = build_samples(
        read_manifest(pair_dir / Stage.REFERENCES, Stage.REFERENCES),
        read_manifest(pair_dir / Stage.CAPTIONS, Stage.CAPTIONS),
        optional(Stage.SEGMIX_BANK),
        optional(Stage.CLASS_IMAGES) if with_prior else None,
        optional(Stage.SEGMENTS),
    )
    return samples if with_prior else [s for s in samples if not s.is_prior]
