"""Classical GrabCut segmentation: a labelled fallback for the offline demo, never a silent substitute."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from pipeline.images import to_rgb
from pipeline.segment.base import SegmentConfig, SegmentResult, mask_status, no_detection
from pipeline.segment.masks import clean_mask, mask_bbox

LABEL = "grabcut (classical fallback)"


class GrabCutSegmenter:
    """OpenCV GrabCut initialised from a centred rectangle; assumes the subject sits mid-frame.

    It ignores the class noun. Photos are downscaled to ``work_side`` first because GrabCut's cost grows with
    pixel count and a fallback mask does not need full resolution; the mask is scaled back to the photo.
    """

    label = LABEL
    model_ids: tuple[str, ...] = ()

    def __init__(
        self,
        config: SegmentConfig | None = None,
        margin: float = 0.08,
        iterations: int = 5,
        work_side: int = 320,
    ) -> None:
        if not 0 <= margin < 0.5:
            raise ValueError(f"GrabCutSegmenter: margin must be in [0, 0.5), got {margin}")
        self.config = config or SegmentConfig()
        self.margin = margin
        self.iterations = iterations
        self.work_side = work_side

    def segment(self, images: Sequence[Image.Image], class_noun: str = "") -> list[SegmentResult]:
        return [self.segment_one(image) for image in images]

    def segment_one(self, image: Image.Image) -> SegmentResult:
        rgb = to_rgb(image)
        small = rgb.copy()
        small.thumbnail((self.work_side, self.work_side), Image.Resampling.BILINEAR)
        small_mask = self._grabcut(np.asarray(small))
        mask = _resize_mask(small_mask, rgb.width, rgb.height)
        mask = clean_mask(mask, self.config.fill_holes, self.config.keep_largest_component)
        bbox = mask_bbox(mask)
        if bbox is None:
            return no_detection(self.label)
        return SegmentResult(
            mask=mask,
            box=(float(bbox[0]), float(bbox[1]), float(bbox[2]), float(bbox[3])),
            detection_score=None,
            mask_score=None,
            n_boxes=1,  # the centred prior rectangle
            segmenter=self.label,
            status=mask_status(mask, self.config),
        )

    def _grabcut(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        x_margin, y_margin = round(width * self.margin), round(height * self.margin)
        rect = (x_margin, y_margin, max(1, width - 2 * x_margin), max(1, height - 2 * y_margin))
        labels = np.zeros((height, width), dtype=np.uint8)
        background_model = np.zeros((1, 65), dtype=np.float64)
        foreground_model = np.zeros((1, 65), dtype=np.float64)
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        cv2.setRNGSeed(0)  # GrabCut's GMM init uses OpenCV's RNG: fix it for reproducible masks
        try:
            cv2.grabCut(bgr, labels, rect, background_model, foreground_model, self.iterations, cv2.GC_INIT_WITH_RECT)
        except cv2.error:
            # Degenerate inputs (e.g. a single flat colour) leave GrabCut without two GMMs: no subject found.
            return np.zeros((height, width), dtype=bool)
        return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


def _resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Upscale a bool mask smoothly (bilinear on 0/1, threshold at 0.5) rather than in NEAREST blocks."""
    if mask.shape == (height, width):
        return mask
    resized = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return resized >= 0.5
