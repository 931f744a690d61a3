"""Caches are keyed by content (image sha256 / prompt text), so sample order can never misalign them."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from pipeline.errors import CastloraError
from pipeline.train.caches import (
    LatentCache,
    build_latent_cache,
    build_text_cache,
    encode_images,
    load_training_image,
    load_training_mask,
    module_identity,
)
from pipeline.train.data import TrainingSample

RES = 64


def own_latent(vae, sample: TrainingSample) -> torch.Tensor:
    pixels, _ = load_training_image(sample.image_path, RES)
    return encode_images(vae, pixels[None])[0]


def test_latents_follow_their_image_under_shuffle(tiny_pipe, sample_set, tmp_path):
    vae = tiny_pipe.vae
    first, stats = build_latent_cache(vae, sample_set, RES, tmp_path)
    assert (stats.hits, stats.misses) == (0, len(sample_set))
    shuffled = sample_set[:]
    random.Random(3).shuffle(shuffled)
    assert [s.sample_id for s in shuffled] != [s.sample_id for s in sample_set]
    second, stats = build_latent_cache(vae, shuffled, RES, tmp_path)
    assert (stats.hits, stats.misses) == (len(sample_set), 0)
    for sample in sample_set:
        expected = own_latent(vae, sample)
        assert torch.allclose(second[sample.sample_id].latent, expected, atol=1e-5)
        assert torch.equal(first[sample.sample_id].latent, second[sample.sample_id].latent)
        assert second[sample.sample_id].original_size == (64, 80)  # (height, width) of the source image
    red, green = (first[s.sample_id].latent for s in sample_set[:2])
    assert (red - green).abs().mean() > 1e-3  # the images really are different, so a swap would be seen


def test_new_sample_in_an_old_position_is_not_served_an_old_latent(tiny_pipe, sample_set, tmp_path):
    """Under index keying, position 0 of the second list would be given the first list's latent 0."""
    vae = tiny_pipe.vae
    a, b, c = sample_set[:3]
    build_latent_cache(vae, [a, b], RES, tmp_path)
    result, stats = build_latent_cache(vae, [c, a], RES, tmp_path)
    assert (stats.hits, stats.misses) == (1, 1)
    assert torch.allclose(result[c.sample_id].latent, own_latent(vae, c), atol=1e-5)
    assert not torch.allclose(result[c.sample_id].latent, result[a.sample_id].latent, atol=1e-3)


def test_a_misplaced_cache_file_is_recomputed_not_trusted(tiny_pipe, sample_set, tmp_path):
    vae = tiny_pipe.vae
    a, b = sample_set[:2]
    build_latent_cache(vae, [a, b], RES, tmp_path)
    cache = LatentCache(tmp_path, module_identity(vae), RES)
    shutil.copyfile(cache.path(a.sample_id), cache.path(b.sample_id))  # b's file now holds a's latent
    assert cache.get(b.sample_id, (0, 8)) is None  # (top, left) of the 80x64 image's centre crop
    result, stats = build_latent_cache(vae, [a, b], RES, tmp_path)
    assert stats.misses == 1
    assert torch.allclose(result[b.sample_id].latent, own_latent(vae, b), atol=1e-5)


def test_cache_depends_on_resolution(tiny_pipe, sample_set, tmp_path):
    build_latent_cache(tiny_pipe.vae, sample_set[:1], RES, tmp_path)
    result, stats = build_latent_cache(tiny_pipe.vae, sample_set[:1], 2 * RES, tmp_path)
    assert stats.misses == 1
    assert result[sample_set[0].sample_id].latent.shape[-1] == 2 * RES // 8


def test_image_changed_since_manifest_is_refused(tiny_pipe, sample_set, tmp_path):
    copy = tmp_path / "changed.png"
    shutil.copyfile(sample_set[1].image_path, copy)
    stale = TrainingSample(sample_set[0].sample_id, str(copy), "x", "instance")
    with pytest.raises(CastloraError, match="changed since its manifest"):
        build_latent_cache(tiny_pipe.vae, [stale], RES, tmp_path / "cache")


def test_text_embeddings_match_encode_prompt_per_prompt(tiny_pipe, sample_set, tmp_path):
    prompts = [s.prompt for s in sample_set]
    cached, stats = build_text_cache(tiny_pipe, prompts, tmp_path)
    assert stats.misses == len(set(prompts))
    again, stats = build_text_cache(tiny_pipe, list(reversed(prompts)), tmp_path)
    assert stats.hits == len(set(prompts))
    for prompt in prompts:
        with torch.no_grad():
            embeds, _, pooled, _ = tiny_pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        assert again[prompt].prompt_embeds.shape == embeds[0].shape  # (77, 32 + 48): both encoders concatenated
        assert torch.allclose(again[prompt].prompt_embeds, embeds[0], atol=1e-5)
        assert torch.allclose(again[prompt].pooled, pooled[0], atol=1e-5)
    assert not torch.allclose(cached[prompts[0]].pooled, cached[prompts[1]].pooled)


def test_mask_is_cropped_like_its_image(sample_set):
    mask = load_training_mask(sample_set[2].mask_path, RES, RES // 8)
    assert mask.shape == (1, 8, 8)
    # Left quarter (20 px) of an 80x64 image, centre-cropped to 64x64 (8 px cut each side): 12 of 64 columns;
    # squashing instead of cropping would give 16 of 64.
    assert mask.mean().item() == pytest.approx(12 / 64, abs=0.02)
