"""Image-level D&C: detect → crop → embed → score, batched and one by one, records to Parquet."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.dnc.detect import LAYOUT_LABEL, LayoutDetector, OwlDetector
from pipeline.dnc.embed import ClipImageEmbedder, Dinov2Embedder, EnsembleEmbedder
from pipeline.dnc.image_scores import (
    DncRecord,
    SubjectReferences,
    embed_all_references,
    embed_references,
    records_to_frame,
    score_images,
    score_images_one_by_one,
)
from pipeline.dnc.metric import COUNT_MISMATCH, PHOTO_QUERY, get_mode, reference_gram

RED, BLUE = (200, 40, 40), (40, 40, 200)


class MeanColourEmbedder:
    """A hand-made embedder whose similarity means something: the image's mean colour, centred on grey."""

    name = "mean_colour"
    model_id = "test:mean-colour"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.calls.append(len(images))
        rows = np.asarray([np.asarray(image.convert("RGB"), np.float64).mean(axis=(0, 1)) for image in images])
        rows = rows.reshape(-1, 3) - 110.0
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


class CountingDetector(LayoutDetector):
    def __init__(self) -> None:
        super().__init__()
        self.images_seen = 0

    def detect(self, images, class_nouns, nms=False, layout_boxes=None, query_template=PHOTO_QUERY):
        self.images_seen += len(images)
        return super().detect(images, class_nouns, nms, layout_boxes, query_template)


@pytest.fixture
def subjects(colour_photo) -> list[SubjectReferences]:
    return [
        SubjectReferences("red", "dog", [colour_photo(RED, (48, 40), seed) for seed in range(3)]),
        SubjectReferences("blue", "cat", [colour_photo(BLUE, (40, 48), seed) for seed in range(3, 6)]),
    ]


@pytest.fixture(scope="module")
def tiny_embedders(tiny_dirs) -> dict:
    dino = Dinov2Embedder(str(tiny_dirs.dinov2), batch_size=4)
    clip = ClipImageEmbedder(str(tiny_dirs.clip), batch_size=4)
    return {"dinov2": dino, "clip": clip, "dreamsim_style": EnsembleEmbedder("dreamsim_style", [dino, clip])}


def _scenes(colour_photo, compose_side_by_side) -> tuple[list[Image.Image], list[list[tuple]]]:
    images, layouts = [], []
    for seed, (left, right) in enumerate([(RED, BLUE), (BLUE, RED), (RED, RED), (BLUE, BLUE), (RED, BLUE)]):
        image, boxes = compose_side_by_side(
            colour_photo(left, (40, 40), 10 + seed), colour_photo(right, (40, 40), 20 + seed)
        )
        images.append(image)
        layouts.append(boxes)
    layouts[4] = layouts[4][:1]  # a layout with one box for two subjects: the count gate must fail it
    return images, layouts


def test_end_to_end_with_tiny_models_records_and_count_gate(
    tiny_embedders, subjects, colour_photo, compose_side_by_side
):
    images, layouts = _scenes(colour_photo, compose_side_by_side)
    detector = CountingDetector()
    records = score_images(images, subjects, detector, tiny_embedders, batch_size=2, layout_boxes=layouts)
    assert len(records) == len(images) * len(tiny_embedders) * 2
    assert detector.images_seen == len(images)  # one detection per image, both modes (the layout sends no query)
    keys = [(r.image_index, r.embedder, r.mode) for r in records]
    assert keys == [(i, e, m) for i in range(5) for e in tiny_embedders for m in ("default", "mudi")]
    for record in records:
        assert record.detector == LAYOUT_LABEL
        assert np.asarray(record.G).shape == (2, 2)
        assert len(record.box_ref_sims) == record.n_boxes == len(record.boxes) == len(record.labels)
        assert all(len(per_subject) == 2 and len(per_subject[0]) == 3 for per_subject in record.box_ref_sims)
        if record.image_index == 4:
            assert record.score == 0.0 and record.reason == COUNT_MISMATCH and record.assignment is None
            assert np.asarray(record.S).shape == (1, 2)
        else:
            assert record.reason is None and sorted(record.assignment) == [0, 1]
            assert np.isfinite(record.score) and record.score != 0.0
            assert record.labels == ["dog", "cat"]
        assert record.queries == []  # the layout detector sends no text


def test_modes_use_their_own_gram_matrix(tiny_embedders, subjects, colour_photo, compose_side_by_side):
    images, layouts = _scenes(colour_photo, compose_side_by_side)
    records = score_images(images[:1], subjects, LayoutDetector(), tiny_embedders, layout_boxes=layouts[:1])
    refs = embed_references(tiny_embedders["clip"], subjects)
    by_mode = {r.mode: r for r in records if r.embedder == "clip"}
    for name, record in by_mode.items():
        expected = reference_gram(refs, include_self=get_mode(name).include_self)
        np.testing.assert_allclose(record.G, expected, atol=1e-6)
    assert by_mode["mudi"].G[0][0] > by_mode["default"].G[0][0]  # the 1.0 self-pairs inflate MuDI's diagonal


def test_batched_and_one_by_one_scores_agree(tiny_embedders, subjects, colour_photo, compose_side_by_side):
    images, layouts = _scenes(colour_photo, compose_side_by_side)
    references = embed_all_references(tiny_embedders, subjects)
    batched = score_images(
        images,
        subjects,
        LayoutDetector(),
        tiny_embedders,
        batch_size=4,
        layout_boxes=layouts,
        reference_embeddings=references,
    )
    singles = score_images_one_by_one(
        images, subjects, LayoutDetector(), tiny_embedders, layout_boxes=layouts, reference_embeddings=references
    )
    assert [(r.image_index, r.embedder, r.mode) for r in batched] == [
        (r.image_index, r.embedder, r.mode) for r in singles
    ]
    np.testing.assert_allclose([r.score for r in batched], [r.score for r in singles], atol=1e-5)
    np.testing.assert_allclose(
        [np.ravel(r.S) for r in batched if r.reason is None],
        [np.ravel(r.S) for r in singles if r.reason is None],
        atol=1e-5,
    )


def test_all_crops_of_a_batch_go_through_the_embedder_in_one_call(subjects, colour_photo, compose_side_by_side):
    images, layouts = _scenes(colour_photo, compose_side_by_side)
    embedder = MeanColourEmbedder()
    score_images(images, subjects, LayoutDetector(), {"mean_colour": embedder}, batch_size=3, layout_boxes=layouts)
    # references once (6 photos), then batches of 3 images (6 crops) and 2 images (2 + 1 crops)
    assert embedder.calls == [6, 6, 3]
    embedder.calls.clear()
    score_images_one_by_one(images, subjects, LayoutDetector(), {"mean_colour": embedder}, layout_boxes=layouts)
    assert embedder.calls == [6, 2, 2, 2, 2, 1]


def test_each_subject_in_its_own_box_scores_higher_than_a_duplicated_subject(
    subjects, colour_photo, compose_side_by_side
):
    images, layouts = _scenes(colour_photo, compose_side_by_side)
    records = score_images(
        images[:4], subjects, LayoutDetector(), {"c": MeanColourEmbedder()}, layout_boxes=layouts[:4]
    )
    score = {(r.image_index, r.mode): r.score for r in records}
    for mode in ("default", "mudi"):
        distinct = min(score[(0, mode)], score[(1, mode)])  # red|blue and blue|red
        duplicated = max(score[(2, mode)], score[(3, mode)])  # red|red and blue|blue
        assert distinct > 0.8 > duplicated + 0.3
    assignment = {(r.image_index, r.mode): r.assignment for r in records}
    assert assignment[(0, "default")] == [0, 1] and assignment[(1, "default")] == [1, 0]  # the red box is box 1


class QueryRecordingProcessor:
    """Wraps OWLv2's processor to record the text queries each detection call sends."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.texts: list[list[str]] = []

    def __call__(self, text, images, **kwargs):
        self.texts.extend(text)
        return self.processor(text=text, images=images, **kwargs)


def test_owlv2_sends_mudis_bare_class_names_in_mudi_mode_and_records_every_query(
    tiny_dirs, subjects, colour_photo, compose_side_by_side
):
    images, _ = _scenes(colour_photo, compose_side_by_side)
    detector = OwlDetector(str(tiny_dirs.owlv2), threshold=0.0, nms_iou=0.3, batch_size=4)
    detector.processor = recorder = QueryRecordingProcessor(detector.processor)
    records = score_images(images[:2], subjects, detector, {"c": MeanColourEmbedder()}, batch_size=2)
    assert len(records) == 4
    # One detection per image and query set: the default mode's queries, then MuDI's bare names.
    assert recorder.texts == [["a photo of a dog", "a photo of a cat"]] * 2 + [["dog", "cat"]] * 2
    by_key = {(r.image_index, r.mode): r for r in records}
    for index, image in enumerate(images[:2]):
        mudi, default = by_key[(index, "mudi")], by_key[(index, "default")]
        assert mudi.queries == ["dog", "cat"] and default.queries == ["a photo of a dog", "a photo of a cat"]
        assert mudi.detector == default.detector == "owlv2"
        assert mudi.n_boxes > 2 and default.n_boxes > 2  # threshold 0 on a random model: count gate fails
        assert mudi.reason == default.reason == COUNT_MISMATCH and mudi.score == 0.0
        for x0, y0, x1, y1 in mudi.boxes + default.boxes:
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
        assert set(mudi.labels) <= {"dog", "cat"}
    frame = records_to_frame(records)
    assert [json.loads(q) for q in frame["queries_json"]] == [r.queries for r in records]


def test_mode_query_templates_are_mudis_bare_noun_and_todays_photo_prompt():
    assert get_mode("mudi").query("dog") == "dog"
    assert get_mode("default").query(" toy robot ") == "a photo of a toy robot"


def test_records_to_frame_round_trips_through_parquet(tmp_path, subjects, colour_photo, compose_side_by_side):
    images, layouts = _scenes(colour_photo, compose_side_by_side)
    records = score_images(images, subjects, LayoutDetector(), {"c": MeanColourEmbedder()}, layout_boxes=layouts)
    frame = records_to_frame(records)
    path = tmp_path / "dnc.parquet"
    frame.to_parquet(path, index=False)
    back = pd.read_parquet(path)
    assert list(back.columns) == list(frame.columns)
    assert len(back) == len(records)
    for row, record in zip(back.itertuples(index=False), records, strict=True):
        assert isinstance(record, DncRecord)
        assert row.image_index == record.image_index and row.mode == record.mode and row.n_boxes == record.n_boxes
        assert row.score == pytest.approx(record.score)
        assert (row.reason if isinstance(row.reason, str) else None) == record.reason
        for column in ("boxes", "labels", "box_scores", "box_ref_sims", "S", "G", "assignment", "queries"):
            assert json.loads(getattr(row, f"{column}_json")) == getattr(record, column)
