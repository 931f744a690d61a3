"""Pure box and mask maths: NMS, OWLv2's square frame, mask clean-up, cut-outs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.segment.boxes import nms, owlv2_target_size, scale_normalized_boxes
from pipeline.segment.masks import clean_mask, cutout_rgba, mask_bbox


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


def greedy_nms_reference(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """The textbook algorithm, slow and obvious: the oracle for the fast kernel."""
    overlaps = box_iou_matrix(boxes, boxes)
    suppressed = np.zeros(len(boxes), dtype=bool)
    kept = []
    for index in np.argsort(-scores, kind="stable"):
        if not suppressed[index]:
            kept.append(int(index))
            suppressed |= overlaps[index] > iou
    return kept


def test_nms_suppresses_overlaps_and_keeps_disjoint_boxes_in_score_order():
    boxes = np.array(
        [
            [0, 0, 10, 10],  # 0: overlaps box 1 (IoU 0.9) -> suppressed by it
            [0, 0, 10, 9],  # 1: best
            [20, 20, 30, 30],  # 2: disjoint, kept
            [0, 0, 10, 5],  # 3: IoU with box 1 = 50/90 = 0.56 -> suppressed at 0.5, kept at 0.6
        ],
        dtype=float,
    )
    scores = np.array([0.6, 0.9, 0.3, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.6).tolist() == [1, 3, 2]


@pytest.mark.parametrize("count", [60, 2000])
def test_nms_matches_the_greedy_reference_on_random_boxes(count):
    rng = np.random.default_rng(3)
    corners = rng.uniform(0, 500, (count, 2))
    sizes = rng.uniform(5, 150, (count, 2))
    boxes = np.concatenate([corners, corners + sizes], axis=1)
    scores = rng.uniform(0, 1, count)
    assert nms(boxes, scores, 0.4).tolist() == greedy_nms_reference(boxes, scores, 0.4)


def test_nms_handles_no_boxes():
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def test_box_iou_matrix_known_value():
    iou = box_iou_matrix(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3], [5, 5, 6, 6]]))
    assert iou == pytest.approx(np.array([[1 / 7, 0.0]]))


def test_owlv2_target_size_is_the_padded_square():
    assert owlv2_target_size(300, 150) == (300, 300)
    assert owlv2_target_size(150, 300) == (300, 300)
    assert owlv2_target_size(64, 64) == (64, 64)


def test_normalised_boxes_scale_by_the_square_side_on_a_wide_image():
    # OWLv2 sees the 300x150 photo padded to 300x300, so y=0.25 of the square is pixel 75, not 37.5.
    boxes = scale_normalized_boxes(np.array([[0.5, 0.25, 0.2, 0.1]]), width=300, height=150)
    assert boxes[0] == pytest.approx([120.0, 60.0, 180.0, 90.0])


def test_normalised_boxes_are_clipped_to_the_real_image():
    # A box reaching into the grey padding below a 300x150 photo ends at the photo's bottom edge.
    boxes = scale_normalized_boxes(np.array([[0.5, 0.5, 0.2, 0.2], [0.05, 0.9, 0.2, 0.1]]), 300, 150)
    assert boxes[0] == pytest.approx([120.0, 120.0, 180.0, 150.0])
    assert boxes[1] == pytest.approx([0.0, 150.0, 45.0, 150.0])  # wholly in padding: zero height


def test_clean_mask_fills_holes_and_drops_small_components():
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:25, 5:25] = True
    mask[12:16, 12:16] = False  # hole inside the subject
    mask[32:35, 32:35] = True  # stray speck
    cleaned = clean_mask(mask)
    assert cleaned.dtype == bool
    assert cleaned[12:16, 12:16].all()
    assert not cleaned[32:35, 32:35].any()
    assert cleaned.sum() == 20 * 20


def test_clean_mask_options_can_keep_holes_and_components():
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:25, 5:25] = True
    mask[12:16, 12:16] = False
    mask[32:35, 32:35] = True
    untouched = clean_mask(mask, fill_holes=False, keep_largest=False)
    assert np.array_equal(untouched, mask)


def test_clean_mask_keeps_an_empty_mask_empty():
    assert not clean_mask(np.zeros((5, 5), dtype=bool)).any()


def test_mask_bbox_is_exclusive_and_none_when_empty():
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:5, 7:11] = True
    assert mask_bbox(mask) == (7, 2, 11, 5)
    assert mask_bbox(np.zeros((3, 3), dtype=bool)) is None


def test_cutout_rgba_crops_to_mask_and_zeroes_outside():
    rng = np.random.default_rng(0)
    pixels = rng.integers(1, 255, (30, 40, 3), dtype=np.uint8)  # no zeros, so zeroing is detectable
    image = Image.fromarray(pixels)
    mask = np.zeros((30, 40), dtype=bool)
    yy, xx = np.mgrid[:30, :40]
    mask[(xx - 20) ** 2 + (yy - 15) ** 2 <= 36] = True  # disc of radius 6 -> bbox 14..27 x 9..22

    cutout = cutout_rgba(image, mask)
    assert cutout.mode == "RGBA"
    assert cutout.size == (13, 13)
    rgba = np.asarray(cutout)
    inside = mask[9:22, 14:27]
    assert np.array_equal(rgba[..., 3], np.where(inside, 255, 0))
    assert np.array_equal(rgba[..., :3][inside], pixels[9:22, 14:27][inside])
    assert not rgba[..., :3][~inside].any()


def test_cutout_rgba_rejects_wrong_size_or_empty_mask():
    image = Image.new("RGB", (8, 6))
    with pytest.raises(ValueError, match="mask"):
        cutout_rgba(image, np.ones((8, 6), dtype=bool))
    with pytest.raises(ValueError, match="empty"):
        cutout_rgba(image, np.zeros((6, 8), dtype=bool))
