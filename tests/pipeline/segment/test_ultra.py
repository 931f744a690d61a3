"""YOLO-World + ultralytics SAM on tiny random-init models built locally: real loading, real letterboxing."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.errors import ModelLoadError
from pipeline.models.tiny_ultralytics import build_tiny_ultralytics_sam, build_tiny_yolo_world
from pipeline.segment import SegmentConfig, create_segmenter
from pipeline.segment.ultra import LABEL, UltralyticsSegmenter, sam_checkpoint_name

# Not importorskip: importing ultralytics here, before the backend sets its offline switches, would let it
# probe DNS and patch PIL for the whole test session.
if importlib.util.find_spec("ultralytics") is None:
    pytest.skip("the optional ultralytics extra is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("tiny-ultralytics")
    started = time.perf_counter()
    build_tiny_yolo_world(root / "yolo-world")
    build_tiny_ultralytics_sam(root / "sam")
    return SimpleNamespace(detector=root / "yolo-world", sam=root / "sam", build_s=time.perf_counter() - started)


@pytest.fixture(scope="module")
def segmenter(tiny_models) -> UltralyticsSegmenter:
    # Threshold 0: the random detector's scores are meaningless, but every box must then count as found.
    return UltralyticsSegmenter(
        str(tiny_models.detector), str(tiny_models.sam), config=SegmentConfig(detection_threshold=0.0)
    )


def _photos() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    wide = Image.fromarray(rng.integers(0, 255, (50, 120, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 255, (96, 64, 3), dtype=np.uint8)).convert("RGBA")
    return [wide, tall]


def test_tiny_models_build_fast_into_loadable_folders(tiny_models):
    assert tiny_models.build_s < 30
    assert (tiny_models.detector / "weights.pt").is_file()
    assert (tiny_models.detector / "text_encoder" / "config.json").is_file()
    sam_settings = json.loads((tiny_models.sam / "ultralytics.json").read_text())
    assert sam_settings["sam_checkpoint_name"] == "mobile_sam.pt"


def test_end_to_end_on_two_non_square_photos(segmenter, tiny_models):
    photos = _photos()
    results = segmenter.segment(photos, "dog")
    assert len(results) == 2
    for photo, result in zip(photos, results, strict=True):
        assert result.segmenter == LABEL == "yolo-world+sam (ultralytics)"
        assert result.status in {"ok", "tiny_mask"}
        assert result.mask is not None and result.mask.dtype == bool
        assert result.mask.shape == (photo.height, photo.width)
        assert result.n_boxes >= 1
        x0, y0, x1, y1 = result.box
        assert 0 <= x0 < x1 <= photo.width and 0 <= y0 < y1 <= photo.height
        assert 0.0 <= result.detection_score <= 1.0
        assert result.mask_score is not None
    assert segmenter.model_ids == (str(tiny_models.detector), str(tiny_models.sam))


def test_threshold_above_one_is_the_no_detection_path(tiny_models):
    strict = UltralyticsSegmenter(
        str(tiny_models.detector), str(tiny_models.sam), config=SegmentConfig(detection_threshold=1.5)
    )
    results = strict.segment(_photos(), "dog")
    assert [result.status for result in results] == ["no_detection", "no_detection"]
    assert all(result.mask is None and result.box is None for result in results)


def test_class_noun_becomes_the_models_only_class_via_the_local_text_encoder(segmenter):
    segmenter.segment(_photos()[:1], "cat")
    world = segmenter.detector.model
    expected = segmenter.text_encoder.encode(["cat"]).reshape(1, 1, -1)
    assert world.names == ["cat"] and world.model[-1].nc == 1
    torch.testing.assert_close(world.txt_feats.float().cpu(), expected.cpu())
    segmenter.set_vocabulary("teddy bear")
    assert not torch.allclose(world.txt_feats.float().cpu(), expected.cpu())


def _letterboxed(box: tuple[float, ...], source_hw: tuple[int, int], input_hw: tuple[int, int]) -> list[float]:
    """Where an original-image box lands in a centre-padded, aspect-preserving resize (worked out here)."""
    (h0, w0), (h, w) = source_hw, input_hw
    gain = min(h / h0, w / w0)
    pad_x, pad_y = (w - round(w0 * gain)) / 2, (h - round(h0 * gain)) / 2
    x0, y0, x1, y1 = box
    return [x0 * gain + pad_x, y0 * gain + pad_y, x1 * gain + pad_x, y1 * gain + pad_y]


@pytest.mark.parametrize(("size", "box"), [((120, 50), (30.0, 8.0, 90.0, 44.0)), ((64, 96), (6.0, 20.0, 40.0, 90.0))])
def test_detector_boxes_come_back_in_original_pixels_on_non_square_photos(segmenter, monkeypatch, size, box):
    """The network sees a letterboxed tensor; a box planted there must map back to the same photo pixels."""
    photo = Image.new("RGB", size, (120, 130, 140))
    seen_inputs: list[tuple[int, int]] = []

    def planted_prediction(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        input_hw = (x.shape[2], x.shape[3])
        seen_inputs.append(input_hw)
        bx0, by0, bx1, by1 = _letterboxed(box, (photo.height, photo.width), input_hw)
        raw = torch.zeros(x.shape[0], 5, 2)  # (batch, xywh + one class score, anchors), input pixels
        raw[:, :, 0] = torch.tensor([(bx0 + bx1) / 2, (by0 + by1) / 2, bx1 - bx0, by1 - by0, 0.9])
        raw[:, :, 1] = torch.tensor([4.0, 4.0, 4.0, 4.0, 0.05])  # a weak box in the padding corner
        return raw

    segmenter.set_vocabulary("dog")
    monkeypatch.setattr(segmenter.detector.model, "predict", planted_prediction)
    # ultralytics' predictor runs a deep copy of the model made at its set-up: start a fresh one (undone after).
    monkeypatch.setattr(segmenter.detector, "predictor", None)
    monkeypatch.setattr(segmenter, "config", SegmentConfig(detection_threshold=0.1))
    [detection] = segmenter.detect([photo], "dog")

    assert detection is not None
    assert seen_inputs, "the planted prediction was not used"
    assert any(hw != (max(hw), max(hw)) or size[0] == size[1] for hw in seen_inputs)  # really non-square
    np.testing.assert_allclose(detection.box, box, atol=1.0)
    assert detection.score == pytest.approx(0.9, abs=1e-4)
    assert detection.n_boxes == 1  # the 0.05 box is below our threshold


def test_sam_box_prompt_maps_original_pixels_into_its_top_left_letterbox(segmenter):
    """We prompt SAM in photo pixels; its predictor resizes (long side -> imgsz) and pads bottom/right."""
    predictor = segmenter.sam_predictor
    side = segmenter.sam_imgsz
    box = [8.0, 12.0, 40.0, 90.0]
    bboxes, _, _, _ = predictor._prepare_prompts((side, side), (96, 64), bboxes=[box])
    expected = torch.tensor([box]) * (side / 96)
    torch.testing.assert_close(bboxes.cpu().reshape(1, 4), expected)


def test_missing_weight_files_raise_model_load_error_naming_the_path(tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a bare name must not be looked up (or downloaded) anywhere
    with pytest.raises(ModelLoadError, match=re.escape("yolov8s-worldv2.pt")):
        UltralyticsSegmenter("yolov8s-worldv2.pt", str(tiny_models.sam))
    assert not (tmp_path / "yolov8s-worldv2.pt").exists()
    empty = tmp_path / "empty-model-dir"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=re.escape(str(empty / "weights.pt"))):
        UltralyticsSegmenter(str(tiny_models.detector), str(empty))


def test_swapped_weights_and_unknown_sam_names_are_explained(tiny_models, tmp_path):
    with pytest.raises(ModelLoadError, match="YOLO-World"):
        UltralyticsSegmenter(str(tiny_models.sam), str(tiny_models.detector))
    with pytest.raises(ModelLoadError, match=re.escape("mobile_sam.pt")):
        sam_checkpoint_name(tmp_path / "my_segmenter.pt", {})
    assert sam_checkpoint_name(tmp_path / "sam2.1_b.pt", {}) == "sam2.1_b.pt"


def test_missing_text_encoder_says_what_to_provide(tiny_models, tmp_path):
    with pytest.raises(ModelLoadError, match=re.escape("openai/clip-vit-base-patch32")):
        UltralyticsSegmenter(
            str(tiny_models.detector), str(tiny_models.sam), text_encoder=str(tmp_path / "no-clip-here")
        )


def test_importing_ultralytics_leaves_pil_open_alone(segmenter, tmp_path):
    """ultralytics patches Image.open to pip-install pi-heif on unreadable files; castlora relies on PIL's error."""
    junk = tmp_path / "broken_mask.png"
    junk.write_bytes(b"definitely not a png")
    with pytest.raises(UnidentifiedImageError):
        Image.open(junk)


def test_load_and_predict_never_touch_the_network_or_pip(tiny_models, monkeypatch, tmp_path):
    attempts: list[str] = []

    def refuse(name: str):
        def blocked(*args, **kwargs):
            attempts.append(f"{name}{args[:2]!r}")
            raise OSError(f"test: {name} is blocked")

        return blocked

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse("urlopen"))
    monkeypatch.setattr(subprocess, "Popen", refuse("subprocess"))  # run/check_output/pip all go through it
    monkeypatch.setattr(os, "system", refuse("os.system"))

    segmenter = create_segmenter(
        "ultralytics",
        detector_source=str(tiny_models.detector),
        sam_source=str(tiny_models.sam),
        config=SegmentConfig(detection_threshold=0.0),
    )
    results = segmenter.segment(_photos(), "plush toy")

    assert isinstance(segmenter, UltralyticsSegmenter)
    assert [result.mask.shape for result in results] == [(50, 120), (96, 64)]
    assert attempts == []
    assert os.environ["YOLO_OFFLINE"] == "1"

    # Control: the guard does see ultralytics' own habit of fetching a weight file it cannot find.
    from ultralytics import YOLOWorld

    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - whatever ultralytics raises once the download is refused
        YOLOWorld("yolov8s-worldv2.pt")
    assert attempts
