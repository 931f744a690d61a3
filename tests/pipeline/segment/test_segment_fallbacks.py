"""GrabCut fallback, user-supplied masks and the backend factory."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import CastloraError, SegmentationError
from pipeline.segment import (
    GrabCutSegmenter,
    SegmentConfig,
    SegmentResult,
    create_segmenter,
    find_user_mask,
    segment_with_user_masks,
    user_mask_result,
)


def _disc_photo(width: int = 160, height: int = 120, centre=(86, 62), radius: int = 34):
    rng = np.random.default_rng(5)
    pixels = np.full((height, width, 3), 225, dtype=np.int16) + rng.integers(-10, 10, (height, width, 3))
    yy, xx = np.mgrid[:height, :width]
    disc = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius**2
    pixels[disc] = np.array([40, 35, 30]) + rng.integers(-10, 10, (int(disc.sum()), 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), disc


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_grabcut_finds_a_dark_disc_on_a_light_background():
    photo, disc = _disc_photo()
    [result] = GrabCutSegmenter().segment([photo], "ball")
    assert result.segmenter == "grabcut (classical fallback)"
    assert result.status == "ok"
    assert result.mask.shape == disc.shape and result.mask.dtype == bool
    assert _iou(result.mask, disc) > 0.8
    x0, y0, x1, y1 = result.box
    assert (x0, y0, x1, y1) == pytest.approx((52, 28, 121, 97), abs=4)


def test_grabcut_works_below_its_working_resolution_and_on_rgba():
    photo, disc = _disc_photo(width=400, height=300, centre=(200, 150), radius=80)
    segmenter = GrabCutSegmenter(work_side=160)
    [result] = segmenter.segment([photo.convert("RGBA")], "ball")
    assert result.mask.shape == (300, 400)
    assert _iou(result.mask, disc) > 0.8
    assert segmenter.model_ids == ()


def test_grabcut_on_a_flat_image_reports_no_detection():
    [result] = GrabCutSegmenter().segment([Image.new("RGB", (64, 48), (200, 200, 200))], "ball")
    assert result.status == "no_detection" and result.mask is None


def _touch_image(path: Path, size=(40, 30)) -> Path:
    Image.new("L", size, 255).save(path)
    return path


def test_find_user_mask_by_stem_and_accepted_name_forms(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    photo = tmp_path / "photos" / "dog_01.jpg"
    assert find_user_mask(masks, photo) is None
    prefixed = _touch_image(masks / "mask_dog_01.PNG")
    assert find_user_mask(masks, photo) == prefixed
    suffixed = _touch_image(masks / "dog_01_mask.webp")
    assert find_user_mask(masks, photo) == suffixed
    exact = _touch_image(masks / "dog_01.png")
    assert find_user_mask(masks, photo) == exact
    (masks / "dog_01.txt").write_text("not an image")
    assert find_user_mask(masks, tmp_path / "dog_02.jpg") is None
    assert find_user_mask(tmp_path / "missing", photo) is None


def test_find_user_mask_never_returns_the_photo_itself(tmp_path):
    photo = _touch_image(tmp_path / "cat.png")
    assert find_user_mask(tmp_path, photo) is None
    mask = _touch_image(tmp_path / "cat_mask.png")
    assert find_user_mask(tmp_path, photo) == mask


def test_user_mask_thresholds_at_128_and_resizes_nearest(tmp_path):
    values = np.zeros((30, 40), dtype=np.uint8)
    values[5:15, 10:30] = 129  # subject
    values[20:25, 0:40] = 128  # exactly 128 is background (MuDI: >128)
    path = tmp_path / "m.png"
    Image.fromarray(values).save(path)

    result = user_mask_result(path, (80, 60), SegmentConfig())
    assert result.segmenter == "user mask" and result.status == "ok"
    assert result.mask.shape == (60, 80) and result.mask.dtype == bool
    assert result.mask.sum() == 4 * 10 * 20  # NEAREST doubling keeps a crisp 20x40 block
    assert result.box == (20.0, 10.0, 60.0, 30.0)
    assert result.detection_score is None and result.mask_score is None


def test_user_mask_uses_transparency_of_an_rgba_cutout(tmp_path):
    rgba = np.zeros((30, 40, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere: the grey levels alone would mark it all subject
    rgba[10:20, 10:20, 3] = 255
    path = tmp_path / "cut.png"
    Image.fromarray(rgba).save(path)
    result = user_mask_result(path, (40, 30), SegmentConfig())
    assert result.mask.sum() == 100


def test_small_user_mask_is_flagged_tiny(tmp_path):
    values = np.zeros((100, 100), dtype=np.uint8)
    values[0:5, 0:5] = 255
    path = tmp_path / "small.png"
    Image.fromarray(values).save(path)
    assert user_mask_result(path, (100, 100), SegmentConfig(min_mask_fraction=0.01)).status == "tiny_mask"


def test_unreadable_user_mask_names_the_file(tmp_path):
    path = tmp_path / "broken_mask.png"
    path.write_bytes(b"definitely not a png")
    with pytest.raises(SegmentationError, match=r"broken_mask\.png"):
        user_mask_result(path, (40, 30), SegmentConfig())


def test_user_mask_with_another_aspect_ratio_names_the_file(tmp_path):
    path = _touch_image(tmp_path / "square_mask.png", size=(30, 30))
    with pytest.raises(SegmentationError, match=r"square_mask\.png"):
        user_mask_result(path, (40, 30), SegmentConfig())


class RecordingSegmenter:
    label = "recording"
    model_ids = ()

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def segment(self, images, class_noun):
        self.seen.extend(image.size for image in images)
        return [
            SegmentResult(np.ones((im.height, im.width), bool), None, None, None, 1, self.label, "ok") for im in images
        ]


def test_user_masks_override_the_segmenter(tmp_path):
    photos = [Image.new("RGB", (40, 30)), Image.new("RGB", (50, 30)), Image.new("RGB", (60, 30))]
    paths = [tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"]
    masks = tmp_path / "masks"
    masks.mkdir()
    values = np.zeros((30, 50), dtype=np.uint8)
    values[:, :10] = 255
    Image.fromarray(values).save(masks / "b_mask.png")

    segmenter = RecordingSegmenter()
    user_masks = [find_user_mask(masks, path) for path in paths]
    results = segment_with_user_masks(lambda: segmenter, photos, user_masks, "dog")
    assert [r.segmenter for r in results] == ["recording", "user mask", "recording"]
    assert segmenter.seen == [(40, 30), (60, 30)]  # photo b never reached the segmenter
    assert results[1].mask.sum() == 30 * 10
    assert [r.mask.shape for r in results] == [(30, 40), (30, 50), (30, 60)]


def test_without_user_masks_everything_is_segmented():
    segmenter = RecordingSegmenter()
    photos = [Image.new("RGB", (8, 8))]
    results = segment_with_user_masks(lambda: segmenter, photos, [None], "dog")
    assert [r.segmenter for r in results] == ["recording"]


def test_factory_builds_grabcut_with_its_label():
    segmenter = create_segmenter("grabcut", detector_source="unused", sam_source="unused")
    assert isinstance(segmenter, GrabCutSegmenter)
    assert segmenter.label == "grabcut (classical fallback)"


def test_factory_rejects_unknown_backends_listing_the_valid_ones():
    with pytest.raises(CastloraError, match="owlv2_sam, grabcut, ultralytics"):
        create_segmenter("mask-rcnn", detector_source="x", sam_source="y")


def test_factory_explains_a_missing_ultralytics_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # import now fails as if not installed
    with pytest.raises(CastloraError, match=r"needs the ultralytics package .*pip install 'ultralytics>=8.4'"):
        create_segmenter("ultralytics", detector_source=str(tmp_path), sam_source=str(tmp_path))
