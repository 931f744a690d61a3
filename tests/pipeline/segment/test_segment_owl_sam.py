"""OWLv2 + SAM on tiny random-init models built locally: real processors, real loading, real box maths."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from pipeline.errors import ModelLoadError
from pipeline.models.tiny_vision import build_tiny_owlv2, build_tiny_sam
from pipeline.segment import OwlSamSegmenter, SegmentConfig, create_segmenter
from pipeline.segment.boxes import clip_boxes, owlv2_target_size, scale_normalized_boxes


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("tiny-vision")
    started = time.perf_counter()
    build_tiny_owlv2(root / "owlv2")
    build_tiny_sam(root / "sam")
    return SimpleNamespace(owlv2=root / "owlv2", sam=root / "sam", build_s=time.perf_counter() - started)


@pytest.fixture(scope="module")
def segmenter(tiny_models) -> OwlSamSegmenter:
    # Threshold 0: the random detector's scores are meaningless, but every box must then count as found.
    return OwlSamSegmenter(str(tiny_models.owlv2), str(tiny_models.sam), config=SegmentConfig(detection_threshold=0.0))


def _photos() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    wide = Image.fromarray(rng.integers(0, 255, (72, 120, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 255, (96, 64, 3), dtype=np.uint8)).convert("RGBA")
    return [wide, tall]


def test_tiny_models_build_fast_and_save_loadable_folders(tiny_models):
    assert tiny_models.build_s < 20
    for folder in (tiny_models.owlv2, tiny_models.sam):
        assert json.loads((folder / "config.json").read_text())["model_type"] in {"owlv2", "sam"}
        assert (folder / "model.safetensors").exists()


def test_tiny_owlv2_tokenizer_wraps_queries_and_ends_on_the_highest_id(tiny_models):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_models.owlv2)
    ids = tokenizer("a photo of a dog")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id == max(tokenizer.get_vocab().values())
    assert "dog" in tokenizer.decode(ids, skip_special_tokens=True)
    long_ids = tokenizer("a photo of a " + "very " * 20 + "fluffy dog", truncation=True)["input_ids"]
    assert len(long_ids) == 16 and long_ids[-1] == tokenizer.eos_token_id


def test_owl_sam_end_to_end_on_two_non_square_photos(segmenter, tiny_models):
    photos = _photos()
    results = segmenter.segment(photos, "dog")
    assert len(results) == 2
    for photo, result in zip(photos, results, strict=True):
        assert result.segmenter == "owlv2+sam"
        assert result.status in {"ok", "tiny_mask"}
        assert result.mask is not None and result.mask.dtype == bool
        assert result.mask.shape == (photo.height, photo.width)
        assert result.n_boxes >= 1
        x0, y0, x1, y1 = result.box
        assert 0 <= x0 < x1 <= photo.width and 0 <= y0 < y1 <= photo.height
        assert 0.0 <= result.detection_score <= 1.0
        assert result.mask_score is not None
    assert segmenter.model_ids == (str(tiny_models.owlv2), str(tiny_models.sam))


def test_batched_and_single_photo_calls_agree(segmenter):
    photos = _photos()
    batched = segmenter.segment(photos, "dog")
    singles = [segmenter.segment([photo], "dog")[0] for photo in photos]
    for together, alone in zip(batched, singles, strict=True):
        assert together.box == pytest.approx(alone.box, abs=1e-3)
        assert together.n_boxes == alone.n_boxes
        assert np.mean(together.mask == alone.mask) > 0.99


def test_detector_boxes_are_scaled_by_the_padded_square(segmenter, monkeypatch):
    """A known normalised box must land at known pixels of a 300x150 photo (the MuDI notebook bug)."""
    # cx, cy, w, h relative to the 300x300 padded square; logits decide the ranking.
    queries = torch.tensor(
        [
            [0.50, 0.25, 0.2, 0.1],  # the subject: pixels (120, 60, 180, 90)
            [0.51, 0.25, 0.2, 0.1],  # near-duplicate, lower score: removed by NMS
            [0.10, 0.10, 0.1, 0.1],  # a second, weaker detection: kept
            [0.50, 0.90, 0.2, 0.1],  # the highest score but wholly inside the padding: dropped
        ]
    )
    logits = torch.tensor([4.0, 3.0, 0.0, 9.0]).reshape(1, 4, 1)

    def fake_detector(**inputs):
        assert inputs["pixel_values"].shape[-2:] == (64, 64)
        batch = inputs["pixel_values"].shape[0]
        return SimpleNamespace(logits=logits.expand(batch, -1, -1), pred_boxes=queries.expand(batch, -1, -1))

    monkeypatch.setattr(segmenter, "detector", fake_detector)
    photo = Image.new("RGB", (300, 150), (120, 130, 140))
    [result] = segmenter.segment([photo], "dog")
    assert result.box == pytest.approx((120.0, 60.0, 180.0, 90.0), abs=1e-3)
    assert result.detection_score == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item(), abs=1e-6)
    assert result.n_boxes == 2
    assert result.mask.shape == (150, 300)


def test_box_decoding_agrees_with_transformers_post_processing(segmenter):
    photo = Image.new("RGB", (300, 150), (90, 160, 30))
    inputs = segmenter.detector_processor(text=[["a photo of a dog"]], images=[photo], return_tensors="pt")
    with torch.inference_mode():
        outputs = segmenter.detector(**inputs)
    [library] = segmenter.detector_processor.image_processor.post_process_object_detection(
        outputs, threshold=0.0, target_sizes=[owlv2_target_size(300, 150)]
    )
    ours = scale_normalized_boxes(outputs.pred_boxes[0].numpy(), 300, 150)
    np.testing.assert_allclose(ours, clip_boxes(library["boxes"].numpy(), 300, 150), atol=1e-3)


def test_threshold_above_one_reports_no_detection_without_running_sam(tiny_models, monkeypatch):
    strict = create_segmenter(
        "owlv2_sam",
        detector_source=str(tiny_models.owlv2),
        sam_source=str(tiny_models.sam),
        config=SegmentConfig(detection_threshold=1.01),
    )

    def sam_must_not_run(*args, **kwargs):
        raise AssertionError("SAM ran for a photo without a detection")

    monkeypatch.setattr(strict, "sam", sam_must_not_run)
    results = strict.segment(_photos(), "dog")
    assert [r.status for r in results] == ["no_detection", "no_detection"]
    assert all(r.mask is None and r.box is None and r.n_boxes == 0 for r in results)
    assert all(r.segmenter == "owlv2+sam" for r in results)


def test_missing_model_directory_is_a_model_load_error_naming_it(tiny_models, tmp_path):
    missing = tmp_path / "no-such-owlv2"
    with pytest.raises(ModelLoadError, match="no-such-owlv2"):
        OwlSamSegmenter(str(missing), str(tiny_models.sam))


def test_folder_without_config_is_a_model_load_error(tiny_models, tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path.name)):
        OwlSamSegmenter(str(tiny_models.owlv2), str(tmp_path))


def test_swapped_model_folders_are_rejected_before_loading(tiny_models):
    with pytest.raises(ModelLoadError, match=r"'sam' model, expected 'owlv2'"):
        OwlSamSegmenter(str(tiny_models.sam), str(tiny_models.owlv2))
