"""Box maths: class-agnostic NMS and OWLv2's square-padding coordinate frame."""

from __future__ import annotations

import numpy as np

from pipeline.segment.base import Detection, SegmentConfig


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy class-agnostic NMS; indices of kept boxes, highest score first.

    A box is suppressed when its IoU with an already kept, higher-scored box is strictly above ``iou``.
    Runs torchvision's C++ kernel: a low threshold on OWLv2 leaves thousands of boxes (3600 patches at
    960 px), where a pure-numpy IoU matrix took ~2 s per image.
    """
    import torch
    from torchvision.ops import nms as torchvision_nms

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"nms: {len(boxes)} boxes but {len(scores)} scores")
    kept = torchvision_nms(torch.from_numpy(boxes), torch.from_numpy(scores), float(iou))
    return kept.numpy().astype(np.int64)


def owlv2_target_size(width: int, height: int) -> tuple[int, int]:
    """Post-processing size for OWLv2: the padded square (max side), never (height, width).

    OWLv2's processor pads each image bottom/right to a square before resizing, so its normalised boxes are
    relative to that square; scaling by (h, w) squashes boxes on non-square photos (the MuDI notebook bug).
    Also the right ``target_sizes`` entry for transformers' ``post_process_object_detection``.
    """
    side = max(int(width), int(height))
    return side, side


def scale_normalized_boxes(boxes_cxcywh: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised OWLv2 (cx, cy, w, h) boxes -> xyxy pixels of the real image, clipped to it."""
    boxes = np.asarray(boxes_cxcywh, dtype=np.float64).reshape(-1, 4)
    side, _ = owlv2_target_size(width, height)
    cx, cy, w, h = (boxes[:, i] for i in range(4))
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * side
    return clip_boxes(xyxy, width, height)


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip xyxy boxes to the image: detections can reach into OWLv2's grey padding."""
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    return boxes


def best_detection(
    boxes: np.ndarray, scores: np.ndarray, width: int, height: int, config: SegmentConfig
) -> Detection | None:
    """Clip thresholded boxes to the image, run class-agnostic NMS, keep the highest-scored survivor."""
    boxes = clip_boxes(boxes, width, height)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores = boxes[has_area], scores[has_area]
    if len(boxes) == 0:
        return None
    kept = nms(boxes, scores, config.nms_iou)
    best = kept[0]
    x0, y0, x1, y1 = (float(v) for v in boxes[best])
    return Detection(box=(x0, y0, x1, y1), score=float(scores[best]), n_boxes=len(kept))
