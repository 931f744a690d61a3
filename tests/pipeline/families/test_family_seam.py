"""The model-family seam holds: a family with another latent shape (6 channels, 4x VAE, no pooled embedding or
time ids, v-prediction) trains through ``train_lora`` and renders through ``generate``, MuDI's init included,
without a line of family-specific code outside its module."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.errors import CastloraError
from pipeline.families import FAMILIES, family_for, load_base_pipeline, register_family
from pipeline.infer import SampleRequest, encode_layout, generate, layout_from_boxes, mudi_initial_latents
from pipeline.lora.adapters import LoraSpec
from pipeline.models.base_model import BaseModelSpec
from pipeline.train import TrainConfig, train_lora
from pipeline.train.caches import build_latent_cache, load_masks
from tests.pipeline.families.tiny_family import DOWNSAMPLING, LATENT_CHANNELS, TINY_SD, build_tiny_sd

RES = 32
LATENT_SIDE = RES // DOWNSAMPLING


@pytest.fixture(scope="module")
def registered():
    register_family(TINY_SD)
    yield TINY_SD
    FAMILIES.pop(TINY_SD.name, None)


@pytest.fixture
def pipe(registered, one_thread, tmp_path):
    return build_tiny_sd(tmp_path / "tokenizer")


def fixed_error(pipe, latents: torch.Tensor, prompt: str) -> float:
    """The denoiser's mean squared error on ``latents`` at 32 fixed (noise, timestep) draws."""
    objective, generator = TINY_SD.objective(pipe), torch.Generator().manual_seed(1234)
    batch = latents.repeat(32, 1, 1, 1)
    noise = torch.randn(batch.shape, generator=generator)
    timesteps = objective.draw_timesteps(batch.shape[0], generator)
    noisy, target = objective.noisy_and_target(batch, noise, timesteps)
    with torch.no_grad():
        embeds, pooled = TINY_SD.encode_prompts(pipe, [prompt] * batch.shape[0], torch.device("cpu"))
        pred = TINY_SD.predict(pipe.unet, noisy, timesteps, embeds, pooled, {})
    return float(torch.nn.functional.mse_loss(pred, target))


def test_the_registry_names_loads_and_recognises_the_family(registered, pipe, tmp_path):
    assert family_for(pipe) is TINY_SD
    loaded = load_base_pipeline(BaseModelSpec(source="tiny", family=TINY_SD.name), tmp_path)
    assert family_for(loaded) is TINY_SD and loaded.unet.config.in_channels == LATENT_CHANNELS
    with pytest.raises(CastloraError, match="No model family handles a object"):
        family_for(object())


def test_caches_hold_the_familys_latent_shape(pipe, samples, tmp_path):
    latents, _ = build_latent_cache(pipe.vae, samples, RES, tmp_path, partial(TINY_SD.encode_pixels, pipe))
    assert {tuple(entry.latent.shape) for entry in latents.values()} == {(LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE)}
    masks = load_masks(samples, RES, LATENT_SIDE)
    assert [tuple(mask.shape) for mask in masks.values()] == [(1, LATENT_SIDE, LATENT_SIDE)]


def test_train_lora_lowers_the_familys_error_and_writes_its_lora(pipe, samples, tmp_path):
    instance = samples[0]
    cached, _ = build_latent_cache(pipe.vae, [instance], RES, tmp_path / "probe", partial(TINY_SD.encode_pixels, pipe))
    latent = cached[instance.sample_id].latent[None]
    before = fixed_error(pipe, latent, instance.prompt)

    config = TrainConfig(
        steps=25,
        resolution=RES,
        rank=4,
        alpha=4,
        lr=1e-2,
        prior_weight=0,
        segmix_p=0.5,
        masked_loss=True,
        mixed_precision="no",
    )
    result = train_lora(pipe, samples, config, tmp_path / "out", tmp_path / "cache")

    assert result.steps_done == 25 and all(np.isfinite(loss) for _, loss, _ in result.losses)
    after = fixed_error(pipe, latent, instance.prompt)
    assert after < 0.9 * before  # seeded: 0.44 -> 0.36 here
    assert result.lora_state and all(key.startswith("unet.") for key in result.lora_state)
    files = TINY_SD.export_lora(tmp_path / "lora", pipe, LoraSpec(rank=4, alpha=4))
    written = load_file(str(files["diffusers"]))
    assert set(written) == set(result.lora_state)
    key = next(iter(written))
    torch.testing.assert_close(written[key], result.lora_state[key])


def test_text_encoder_lora_trains_the_familys_one_encoder(pipe, samples, tmp_path):
    config = TrainConfig(
        steps=2,
        resolution=RES,
        rank=4,
        alpha=4,
        lr=1e-3,
        prior_weight=0,
        segmix_p=0,
        train_text_encoder=True,
        mixed_precision="no",
    )
    result = train_lora(pipe, samples[:1], config, tmp_path / "out", tmp_path / "cache")
    assert set(result.text_encoder_lora_states) == {"text_encoder"}
    assert all(".lora_linear_layer." in key for key in result.text_encoder_lora_states["text_encoder"])


def test_mudi_init_puts_the_layout_at_the_familys_latent_cells(pipe):
    # One opaque 16x32 subject in the left half of a 32x32 canvas: latent columns 0-3 of 8 (4x VAE).
    cutout = Image.new("RGBA", (16, 32), (200, 30, 30, 255))
    layout = layout_from_boxes([cutout], [(0, 0, 16, 32)], (RES, RES))
    z, mask = encode_layout(pipe, layout.image, layout.union_mask, RES, RES)
    assert tuple(z.shape) == (1, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE)
    expected = torch.zeros(1, 1, LATENT_SIDE, LATENT_SIDE)
    expected[..., : LATENT_SIDE // 2] = 1.0
    assert torch.equal(mask, expected)

    shifted = mudi_initial_latents(pipe, z, mask, 1.0, torch.Generator().manual_seed(3))
    noise = mudi_initial_latents(pipe, z, mask, 0.0, torch.Generator().manual_seed(3))
    difference = shifted - noise
    assert torch.equal(difference[..., LATENT_SIDE // 2 :], torch.zeros_like(difference[..., LATENT_SIDE // 2 :]))
    torch.testing.assert_close(difference[..., : LATENT_SIDE // 2], z[..., : LATENT_SIDE // 2])

    requests = [
        SampleRequest("olis dog", 3),
        SampleRequest("olis dog", 3, gamma=0.0),
        SampleRequest("olis dog", 3, gamma=1.0),
    ]
    images = [np.asarray(image) for _, image in generate(pipe, requests, layout, RES, RES, 2, 3.0)]
    assert all(image.shape == (RES, RES, 3) for image in images)
    assert np.array_equal(images[0], images[1])  # γ = 0 is the pipeline's own noise, bit for bit
    assert not np.array_equal(images[0], images[2])  # the layout reached the pipeline
