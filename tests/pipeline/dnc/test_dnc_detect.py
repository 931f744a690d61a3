"""D&C detection: tiny OWLv2 with class-noun queries, NMS, box scaling on non-square images; layout fallback; crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from pipeline.dnc.detect import (
    LAYOUT_LABEL,
    BoxDetection,
    LayoutDetector,
    OwlDetector,
    crop_to_square,
    suppress_overlaps,
)
from pipeline.errors import CastloraError, ModelLoadError


@pytest.fixture(scope="module")
def owl(tiny_dirs) -> OwlDetector:
    # The random detector's scores hover around sigmoid(small) ~ 0.5: threshold 0 keeps every patch's box.
    return OwlDetector(str(tiny_dirs.owlv2), threshold=0.0, nms_iou=0.3, batch_size=2)


def _wide_and_tall() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    wide = Image.fromarray(rng.integers(0, 255, (60, 150, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 255, (130, 70, 3), dtype=np.uint8))
    square = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return [wide, tall, square]


def test_owl_boxes_lie_inside_non_square_images_and_carry_a_query_noun(owl):
    images = _wide_and_tall()
    found = owl.detect(images, ["dog", "cat", "dog"], nms=False)
    assert len(found) == 3
    for image, detections in zip(images, found, strict=True):
        assert len(detections) > 4
        for det in detections:
            x0, y0, x1, y1 = det.box
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            assert 0.0 <= det.score <= 1.0
            assert det.label in {"dog", "cat"}


def test_owl_boxes_are_scaled_by_the_padded_square_not_by_width_and_height(owl):
    # The tiny OWLv2's zeroed box head predicts each patch's own grid cell: 1/8 of the padded square's side
    # in both directions. Scaling by (w, h) instead would squash cells on the short side.
    images = _wide_and_tall()
    for image, detections in zip(images, owl.detect(images, ["dog"]), strict=True):
        cell = max(image.size) / 8
        unclipped = [d.box for d in detections if d.box[2] < image.width and d.box[3] < image.height]
        assert unclipped
        sizes = np.asarray([(x1 - x0, y1 - y0) for x0, y0, x1, y1 in unclipped])
        np.testing.assert_allclose(sizes, cell, rtol=0.02)


@pytest.fixture(scope="module")
def overlapping_owl(tiny_dirs) -> OwlDetector:
    """Tiny OWLv2 whose boxes are ~3 cells wide, so neighbouring patches' boxes overlap and NMS has work."""
    detector = OwlDetector(str(tiny_dirs.owlv2), threshold=0.0, nms_iou=0.3, batch_size=2)
    with torch.no_grad():
        detector.model.box_head.dense2.bias[2:] += 1.5  # width/height logits
    return detector


def test_owl_nms_reduces_the_boxes_to_a_non_overlapping_subset(overlapping_owl):
    images = _wide_and_tall()
    raw = overlapping_owl.detect(images, ["dog"], nms=False)
    kept = overlapping_owl.detect(images, ["dog"], nms=True)
    for raw_dets, kept_dets in zip(raw, kept, strict=True):
        assert 0 < len(kept_dets) < len(raw_dets)
        assert set(kept_dets) <= set(raw_dets)
        assert [d.score for d in kept_dets] == sorted((d.score for d in kept_dets), reverse=True)
        boxes = torch.tensor([d.box for d in kept_dets])
        iou = box_iou(boxes, boxes).fill_diagonal_(0)
        assert float(iou.max()) <= 0.3 + 1e-6


def test_owl_threshold_filters_and_batching_does_not_change_results(tiny_dirs, owl):
    images = _wide_and_tall()
    batched = owl.detect(images, ["dog"])
    singles = [owl.detect([image], ["dog"])[0] for image in images]
    for a, b in zip(batched, singles, strict=True):
        assert len(a) == len(b)
        np.testing.assert_allclose([d.box for d in a], [d.box for d in b], atol=1e-3)
        np.testing.assert_allclose([d.score for d in a], [d.score for d in b], atol=1e-5)
    median = float(np.median([d.score for d in batched[0]]))
    strict = OwlDetector(str(tiny_dirs.owlv2), threshold=median, batch_size=4)
    fewer = strict.detect(images[:1], ["dog"])[0]
    assert 0 < len(fewer) < len(batched[0]) and all(d.score > median for d in fewer)


def test_owl_wrong_model_type_is_a_model_load_error(tiny_dirs):
    with pytest.raises(ModelLoadError, match="expected 'owlv2'"):
        OwlDetector(str(tiny_dirs.clip))


def test_owl_needs_a_class_noun(owl):
    with pytest.raises(CastloraError, match="class noun"):
        owl.detect(_wide_and_tall()[:1], ["  "])


def test_layout_detector_returns_the_given_boxes_clipped_with_score_one():
    images = [Image.new("RGB", (100, 50)), Image.new("RGB", (80, 80))]
    layout = [[(0, 0, 40, 50), (50, 0, 120, 50)], [(10, 10, 30, 30)]]
    found = LayoutDetector().detect(images, ["dog", "cat"], layout_boxes=layout)
    assert [d.box for d in found[0]] == [(0.0, 0.0, 40.0, 50.0), (50.0, 0.0, 100.0, 50.0)]
    assert [d.label for d in found[0]] == ["dog", "cat"]
    assert [d.label for d in found[1]] == ["layout"]  # one box for two subjects: no noun to claim
    assert all(d.score == 1.0 for dets in found for d in dets)
    assert LayoutDetector.label == LAYOUT_LABEL == "layout (no detector)"
    with pytest.raises(CastloraError, match="layout"):
        LayoutDetector().detect(images, ["dog"], layout_boxes=None)


def test_suppress_overlaps_keeps_the_best_of_overlapping_boxes():
    dets = [
        BoxDetection((0, 0, 10, 10), 0.5, "dog"),
        BoxDetection((1, 1, 10, 10), 0.9, "cat"),
        BoxDetection((20, 20, 30, 30), 0.7, "dog"),
    ]
    assert suppress_overlaps(dets, 0.5) == [dets[1], dets[2]]
    assert suppress_overlaps([], 0.5) == []


def test_crop_to_square_pads_with_white_and_keeps_the_box_pixels():
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[10:20, 5:35] = (200, 10, 10)
    image = Image.fromarray(pixels)
    crop = crop_to_square(image, (5.0, 10.0, 35.0, 20.0))
    assert crop.size == (30, 30)
    array = np.asarray(crop)
    assert (array[10:20] == (200, 10, 10)).all()  # the 30x10 box, centred vertically
    assert (array[:10] == 255).all() and (array[20:] == 255).all()
    # Fractional and out-of-image boxes round outwards and stay inside the image.
    assert crop_to_square(image, (-5.2, 30.5, 70.0, 39.2)).size == (60, 60)
    assert crop_to_square(image, (10.0, 10.0, 10.0, 10.0)).size == (1, 1)
