"""A segmented photo on disk: its mask and RGBA cut-out next to it, recorded in lineage.

Shared by the stages that segment photos (reference photos and class images), so both write the same files and
manifest columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from pipeline.images import mask_to_image, save_png
from pipeline.segment.base import SegmentResult
from pipeline.segment.masks import cutout_rgba
from pipeline.storage.lineage import LineageRecorder


def write_segment(
    result: SegmentResult,
    image: Image.Image,
    stem: Path,
    parent_sha256: str,
    recorder: LineageRecorder,
    params: dict,
    model_ids: Sequence[str],
) -> dict:
    """Save mask + cut-out for one photo (when a mask exists) and return its manifest columns."""
    row: dict = {
        "status": result.status,
        "segmenter": result.segmenter,
        "n_boxes": result.n_boxes,
        "detection_score": result.detection_score,
        "mask_score": result.mask_score,
        "mask_fraction": result.mask_fraction,
        "bbox": list(result.box) if result.box is not None else None,
        "mask_path": None,
        "mask_sha256": None,
        "cutout_path": None,
        "cutout_sha256": None,
    }
    if result.mask is None:
        return row
    mask_path = stem.with_name(stem.name + "_mask.png")
    cutout_path = stem.with_name(stem.name + "_cutout.png")
    mask_sha = save_png(mask_to_image(result.mask), mask_path)
    cutout_sha = save_png(cutout_rgba(image, result.mask), cutout_path)
    lineage_params = {**params, "segmenter": result.segmenter, "status": result.status}
    recorder.record(mask_path, mask_sha, [parent_sha256], lineage_params, model_ids)
    recorder.record(cutout_path, cutout_sha, [parent_sha256, mask_sha], lineage_params, model_ids)
    row.update(mask_path=str(mask_path), mask_sha256=mask_sha, cutout_path=str(cutout_path), cutout_sha256=cutout_sha)
    return row
