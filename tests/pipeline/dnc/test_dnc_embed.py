"""DINOv2/CLIP embedders on tiny random-init models: real loading, real preprocessing, unit-length outputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPModel, Dinov2Model

from pipeline.dnc.embed import (
    DREAMSIM_STYLE_DESCRIPTION,
    ClipImageEmbedder,
    ClipTextImageScorer,
    Dinov2Embedder,
    Embedder,
    EnsembleEmbedder,
    load_clip_text_scorer,
    load_embedders,
)
from pipeline.errors import CastloraError, ModelLoadError
from pipeline.models.tiny_embedders import CLIP_PROJECTION_DIM


@pytest.fixture(scope="module")
def dino(tiny_dirs) -> Dinov2Embedder:
    return Dinov2Embedder(str(tiny_dirs.dinov2), batch_size=2)


@pytest.fixture(scope="module")
def clip(tiny_dirs) -> ClipImageEmbedder:
    return ClipImageEmbedder(str(tiny_dirs.clip), batch_size=2)


def _images(colour_photo) -> list[Image.Image]:
    return [
        colour_photo((200, 40, 40), (90, 60), 0),
        colour_photo((40, 200, 40), (48, 80), 1),
        colour_photo((40, 40, 200), (64, 64), 2).convert("RGBA"),
    ]


def test_tiny_builders_save_folders_that_from_pretrained_loads(tiny_dirs):
    assert json.loads((tiny_dirs.dinov2 / "config.json").read_text())["model_type"] == "dinov2"
    assert json.loads((tiny_dirs.clip / "config.json").read_text())["model_type"] == "clip"
    assert isinstance(Dinov2Model.from_pretrained(tiny_dirs.dinov2), Dinov2Model)
    clip_model = CLIPModel.from_pretrained(tiny_dirs.clip)
    assert clip_model.config.projection_dim == CLIP_PROJECTION_DIM


@pytest.mark.parametrize("which", ["dino", "clip"])
def test_embeddings_are_unit_float32_rows_and_deterministic(which, request, colour_photo):
    embedder: Embedder = request.getfixturevalue(which)
    assert isinstance(embedder, Embedder)
    images = _images(colour_photo)
    first = embedder.embed(images)  # batch_size 2: two forward passes, one of them partial
    assert first.shape == (3, embedder.dim) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(embedder.embed(images), first)
    # Batching must not leak between rows: one image alone gives its batched row.
    np.testing.assert_allclose(embedder.embed([images[2]])[0], first[2], atol=1e-5)
    assert embedder.embed([]).shape == (0, embedder.dim)


def test_identical_crops_embed_identically_and_different_ones_do_not(dino, colour_photo):
    red = colour_photo((200, 40, 40), (60, 60), 3)
    rows = dino.embed([red, red.copy(), colour_photo((20, 20, 220), (60, 60), 4)])
    np.testing.assert_allclose(rows[0], rows[1], atol=1e-6)
    assert not np.allclose(rows[0], rows[2], atol=1e-4)


def test_dreamsim_style_ensemble_is_the_mean_of_member_cosines(dino, clip, colour_photo):
    ensemble = EnsembleEmbedder("dreamsim_style", [dino, clip], DREAMSIM_STYLE_DESCRIPTION)
    images = _images(colour_photo)
    rows = ensemble.embed(images)
    assert rows.shape == (3, dino.dim + clip.dim)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    d, c = dino.embed(images), clip.embed(images)
    np.testing.assert_allclose(rows @ rows.T, (d @ d.T + c @ c.T) / 2, atol=1e-5)
    assert "not DreamSim" in ensemble.description
    assert str(dino.model_id) in ensemble.model_id and str(clip.model_id) in ensemble.model_id


def test_clip_text_image_similarity_is_a_cosine_matrix(clip, colour_photo):
    scorer = ClipTextImageScorer(clip)
    images = _images(colour_photo)[:2]
    texts = ["a photo of a dog", "a photo of a cat and a dog", "a toy"]
    matrix = scorer.text_image_similarity(images, texts)
    assert matrix.shape == (2, 3)
    assert np.all(np.abs(matrix) <= 1 + 1e-5)
    expected = clip.embed(images) @ clip.embed_texts(texts).T
    np.testing.assert_allclose(matrix, expected, atol=1e-6)
    np.testing.assert_allclose(scorer.paired_similarity(images, texts[:2]), np.diag(matrix[:, :2]), atol=1e-6)
    with pytest.raises(CastloraError, match="2 images, 3 texts"):
        scorer.paired_similarity(images, texts)


def test_missing_dir_and_wrong_model_type_raise_model_load_error_naming_the_path(tiny_dirs, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model"):
        Dinov2Embedder(str(missing))
    with pytest.raises(ModelLoadError, match=r"'clip'.*expected 'dinov2'") as info:
        Dinov2Embedder(str(tiny_dirs.clip))
    assert str(tiny_dirs.clip) in str(info.value)
    with pytest.raises(ModelLoadError, match="expected 'clip'"):
        ClipImageEmbedder(str(tiny_dirs.dinov2))
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="empty-dir"):
        ClipImageEmbedder(str(empty))


def test_load_embedders_reports_unavailable_metrics_without_substituting(tiny_dirs, tmp_path):
    sources = {"dinov2": str(tiny_dirs.dinov2), "clip": ""}
    available, unavailable = load_embedders(["dinov2", "clip", "dreamsim_style"], sources, tmp_path)
    assert set(available) == {"dinov2"}
    assert available["dinov2"].model_id == str(tiny_dirs.dinov2.resolve())
    assert "empty source" in unavailable["clip"]
    assert "clip" in unavailable["dreamsim_style"] and "empty source" in unavailable["dreamsim_style"]


def test_load_embedders_missing_dir_and_uncached_hub_id_are_unavailable(tiny_dirs, tmp_path):
    sources = {"dinov2": str(tmp_path / "gone"), "clip": "castlora-test/not-a-cached-model"}
    available, unavailable = load_embedders(["dinov2", "clip"], sources, tmp_path)
    assert available == {}
    assert "does not exist" in unavailable["dinov2"] and "gone" in unavailable["dinov2"]
    assert "not in the local Hugging Face cache" in unavailable["clip"]


def test_load_embedders_builds_tiny_refs_and_shares_base_models(tmp_path):
    sources = {"dinov2": "tiny:dinov2", "clip": "tiny:clip"}
    available, unavailable = load_embedders(["dreamsim_style", "clip", "dinov2"], sources, tmp_path)
    assert unavailable == {}
    assert list(available) == ["dreamsim_style", "clip", "dinov2"]
    assert available["dreamsim_style"].members == (available["dinov2"], available["clip"])
    assert (tmp_path / "tiny").is_dir()
    scorer, reason = load_clip_text_scorer("tiny:clip", tmp_path, shared=available["clip"])
    assert reason is None and scorer.clip is available["clip"]
    with pytest.raises(CastloraError, match="Unknown embedder"):
        load_embedders(["dreamsim"], sources, tmp_path)


def test_present_but_wrong_model_is_an_error_not_unavailable(tiny_dirs, tmp_path):
    # A swapped preset is a configuration error to fix, not a metric to silently drop.
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_dirs.clip, swapped)
    with pytest.raises(ModelLoadError, match="expected 'dinov2'"):
        load_embedders(["dinov2"], {"dinov2": str(swapped)}, tmp_path)


def test_clip_text_scorer_unavailable_without_source(tmp_path):
    scorer, reason = load_clip_text_scorer("", tmp_path)
    assert scorer is None and "empty source" in reason
