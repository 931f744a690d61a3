"""Box maths: class-agnostic NMS and OWLv2's square-padding coordinate frame."""

from __future__ import annotations

import numpy as np


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes, shape (len(a), len(b)); degenerate boxes have IoU 0."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(bottom_right - top_left, 0, None)
    intersection = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy class-agnostic NMS; indices of kept boxes, highest score first.

    A box is suppressed when its IoU with an already kept, higher-scored box is strictly above ``iou``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"nms: {len(boxes)} boxes but {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    overlaps = box_iou_matrix(boxes, boxes)
    suppressed = np.zeros(len(boxes), dtype=bool)
    kept: list[int] = []
    for index in order:
        if suppressed[index]:
            continue
        kept.append(int(index))
        suppressed |= overlaps[index] > iou
    return np.asarray(kept, dtype=np.int64)


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
