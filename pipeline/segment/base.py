"""Segmentation data types shared by every backend (docs/design.md#segmentation)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

STATUS_OK = "ok"
STATUS_NO_DETECTION = "no_detection"
STATUS_TINY_MASK = "tiny_mask"


@dataclass
class SegmentConfig:
    detection_threshold: float = 0.1
    """OWLv2 score threshold, low on purpose: reference photos contain the subject; we want its best box."""
    nms_iou: float = 0.5
    """IoU above which a lower-scored box is suppressed (class-agnostic NMS)."""
    min_mask_fraction: float = 0.01
    """Masks covering less than this fraction of the image are flagged ``tiny_mask``."""
    fill_holes: bool = True
    """Fill holes inside a mask (a subject has no see-through gaps)."""
    keep_largest_component: bool = True
    """Keep only the mask's largest connected region (drops stray specks)."""


@dataclass
class SegmentResult:
    mask: np.ndarray | None
    """Bool HxW in the input image's size; None when nothing was found."""
    box: tuple[float, float, float, float] | None
    """x0, y0, x1, y1 in input-image pixels."""
    detection_score: float | None
    mask_score: float | None
    """SAM's predicted IoU for the chosen mask, when the backend has one."""
    n_boxes: int
    """Detections kept after threshold and NMS."""
    segmenter: str
    status: str
    """``ok`` | ``no_detection`` | ``tiny_mask``."""

    @property
    def mask_fraction(self) -> float:
        if self.mask is None or self.mask.size == 0:
            return 0.0
        return float(np.count_nonzero(self.mask)) / float(self.mask.size)


@runtime_checkable
class Segmenter(Protocol):
    label: str
    model_ids: tuple[str, ...]
    """HF ids or local directories, recorded in lineage; () for classical backends."""

    def segment(self, images: Sequence[Image.Image], class_noun: str) -> list[SegmentResult]: ...


def mask_status(mask: np.ndarray | None, config: SegmentConfig) -> str:
    """Status for a finished mask: a missing mask is ``no_detection``; a small or empty one ``tiny_mask``.

    An empty mask after a successful detection stays ``tiny_mask`` (fraction 0) so reports can tell "the
    detector found nothing" apart from "the mask model failed on the box it was given".
    """
    if mask is None:
        return STATUS_NO_DETECTION
    if np.count_nonzero(mask) / mask.size < config.min_mask_fraction:
        return STATUS_TINY_MASK
    return STATUS_OK


def no_detection(segmenter: str, n_boxes: int = 0) -> SegmentResult:
    return SegmentResult(
        mask=None,
        box=None,
        detection_score=None,
        mask_score=None,
        n_boxes=n_boxes,
        segmenter=segmenter,
        status=STATUS_NO_DETECTION,
    )


@dataclass(frozen=True)
class Detection:
    """The detector's best box for one photo (pixels of that photo) and how many boxes survived NMS."""

    box: tuple[float, float, float, float]
    score: float
    n_boxes: int


def detected(
    detection: Detection, mask: np.ndarray, mask_score: float | None, segmenter: str, config: SegmentConfig
) -> SegmentResult:
    """The result for a photo whose box was found and segmented."""
    return SegmentResult(
        mask=mask,
        box=detection.box,
        detection_score=detection.score,
        mask_score=mask_score,
        n_boxes=detection.n_boxes,
        segmenter=segmenter,
        status=mask_status(mask, config),
    )
