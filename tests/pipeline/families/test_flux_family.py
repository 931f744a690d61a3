"""FLUX.1 on the model-family seam (docs/design.md#flux1), on the tiny-flux preset: the folder is a standard
FluxPipeline directory, the flow-matching objective has the reference script's formulas, training lowers the
error and writes a LoRA file FluxPipeline loads, and MuDI's init reaches the right packed tokens."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import load_file

from pipeline.families import family_for, load_base_pipeline
from pipeline.families.base import ImageGeometry, RenderRequest
from pipeline.families.flow_matching import FlowMatchingObjective
from pipeline.families.flux import (
    FLUX,
    FLUX_TARGETS,
    FluxFamily,
    flux_lora_targets,
    image_ids,
    pack_latents,
    unpack_latents,
)
from pipeline.infer import SampleRequest, encode_layout, generate, layout_from_boxes, mudi_initial_latents
from pipeline.lora.adapters import UNET_TARGETS, LoraSpec
from pipeline.lora.verify import verify_lora_file
from pipeline.models.base_model import BaseModelSpec
from pipeline.models.loading import ensure_tiny
from pipeline.models.presets import get_preset
from pipeline.train import TrainConfig, TrainingSample, train_lora, train_preference
from pipeline.train.caches import build_latent_cache
from pipeline.train.data import INSTANCE
from tests.pipeline.train.conftest import write_image

RES = 64
SIDE = RES // 8  # latent cells per side; packed tokens are SIDE/2 per side


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("flux_models")


@pytest.fixture
def pipe(cache_root, one_thread):
    preset = get_preset("tiny-flux")
    return load_base_pipeline(BaseModelSpec(source=preset.base_model, family=preset.family), cache_root)


def test_tiny_flux_is_a_standard_flux_folder(cache_root, one_thread):
    preset = get_preset("tiny-flux")
    assert (preset.family, preset.base_model) == ("flux", "tiny:flux")
    assert (get_preset("flux").family, get_preset("flux").base_model) == ("flux", "black-forest-labs/FLUX.1-dev")
    folder = ensure_tiny("flux", cache_root)
    pipe = FluxPipeline.from_pretrained(folder)  # HF_HUB_OFFLINE=1 (tests/conftest.py): nothing downloads
    assert family_for(pipe) is FLUX
    config = pipe.transformer.config
    assert (
        config.in_channels == 64 and config.guidance_embeds and sum(config.axes_dims_rope) == config.attention_head_dim
    )
    assert (pipe.vae.config.latent_channels, pipe.vae.config.shift_factor) == (16, 0.1159)
    assert pipe.tokenizer.model_max_length == 77 and pipe.scheduler.config.use_dynamic_shifting
    embeds, pooled = FLUX.encode_prompts(pipe, ["a photo of olis dog"], torch.device("cpu"))
    assert tuple(embeds.shape) == (1, FLUX.max_sequence_length(pipe), config.joint_attention_dim)
    assert tuple(pooled.shape) == (1, config.pooled_projection_dim)


def test_flow_matching_formulas_on_known_tensors():
    objective = FlowMatchingObjective({"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True})
    latents = torch.full((2, 1, 1, 1), 2.0)
    noise = torch.full((2, 1, 1, 1), -1.0)
    noisy, target = objective.noisy_and_target(latents, noise, torch.tensor([250.0, 1000.0]))
    torch.testing.assert_close(noisy.flatten(), torch.tensor([0.75 * 2 + 0.25 * -1, -1.0]))
    torch.testing.assert_close(target.flatten(), torch.tensor([-3.0, -3.0]))
    # Uniform σ on the unshifted grid (dynamic shifting applies at inference only), seeded by the generator alone.
    drawn = objective.draw_timesteps(500, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, objective.draw_timesteps(500, torch.Generator().manual_seed(0)))
    assert drawn.min() >= 1 and drawn.max() <= 1000 and torch.allclose(drawn, drawn.round(), atol=1e-3)
    assert abs(float(objective.sigmas(drawn).mean()) - 0.5) < 0.05
    # A static shift (no dynamic shifting) moves σ up, as the scheduler's own training grid does.
    shifted = FlowMatchingObjective({"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False})
    assert float(shifted.sigmas(shifted.draw_timesteps(500, torch.Generator().manual_seed(0))).mean()) > 0.6
    for weighting in ("logit_normal", "mode"):
        sigmas = FlowMatchingObjective({}, weighting=weighting).draw_timesteps(100, torch.Generator().manual_seed(1))
        assert sigmas.min() >= 1 and sigmas.max() <= 1000


def test_packing_matches_flux_pipeline_and_round_trips():
    latents = torch.randn(2, 16, 6, 4, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 4))
    assert torch.equal(unpack_latents(packed, 6, 4), latents)
    assert torch.equal(
        image_ids(6, 4, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32)
    )
    assert set(flux_lora_targets(UNET_TARGETS)) == set(FLUX_TARGETS)


def fixed_error(pipe, latents: torch.Tensor, prompt: str) -> float:
    """The transformer's mean squared error on ``latents`` at 16 fixed (noise, σ) draws."""
    objective, generator = FLUX.objective(pipe), torch.Generator().manual_seed(1234)
    batch = latents.repeat(16, 1, 1, 1)
    noise = torch.randn(batch.shape, generator=generator)
    timesteps = objective.draw_timesteps(batch.shape[0], generator)
    noisy, target = objective.noisy_and_target(batch, noise, timesteps)
    conditioning = FLUX.conditioning([ImageGeometry((RES, RES), (0, 0))] * batch.shape[0], RES)
    with torch.no_grad():
        embeds, pooled = FLUX.encode_prompts(pipe, [prompt] * batch.shape[0], torch.device("cpu"))
        pred = FLUX.predict(pipe.transformer, noisy, timesteps, embeds, pooled, conditioning)
    return float(torch.nn.functional.mse_loss(pred, target))


def test_train_lora_lowers_the_error_and_writes_a_file_flux_pipeline_loads(pipe, samples, cache_root, tmp_path):
    instance = samples[0]
    encode = partial(FLUX.encode_pixels, pipe)
    cached, _ = build_latent_cache(pipe.vae, [instance], RES, tmp_path / "probe", encode)
    latent = cached[instance.sample_id].latent[None]
    assert tuple(latent.shape) == (1, 16, SIDE, SIDE)
    before = fixed_error(pipe, latent, instance.prompt)

    config = TrainConfig(
        steps=25, resolution=RES, rank=4, alpha=8, lr=1e-2, prior_weight=0, segmix_p=0.5, masked_loss=True,
        mixed_precision="no",
    )  # fmt: skip
    result = train_lora(pipe, samples, config, tmp_path / "out", tmp_path / "cache")
    assert result.steps_done == 25 and all(np.isfinite(loss) for _, loss, _ in result.losses)
    after = fixed_error(pipe, latent, instance.prompt)
    assert after < 0.9 * before
    assert result.lora_state and all(key.startswith("transformer.") for key in result.lora_state)
    assert any(".add_q_proj." in key for key in result.lora_state)

    files = FLUX.export_lora(tmp_path / "lora", pipe, LoraSpec(rank=4, alpha=8), {"castlora_version": "v1"})
    for file_format, path in files.items():  # what the lora_file_loads check runs
        assert verify_lora_file(path, file_format).metadata["castlora_version"] == "v1"
    fresh = load_base_pipeline(BaseModelSpec(source="tiny:flux", family="flux"), cache_root)
    fresh.load_lora_weights(str(files["diffusers"].parent), weight_name=files["diffusers"].name)
    # The loaded LoRA (alpha/rank from the header) gives the trained transformer's output.
    generator = torch.Generator().manual_seed(5)
    noisy = torch.randn(1, 16, SIDE, SIDE, generator=generator)
    embeds, pooled = FLUX.encode_prompts(pipe, [instance.prompt], torch.device("cpu"))
    conditioning = FLUX.conditioning([ImageGeometry((RES, RES), (0, 0))], RES)
    step = torch.tensor([500.0])
    with torch.no_grad():
        trained = FLUX.predict(pipe.transformer, noisy, step, embeds, pooled, conditioning)
        loaded = FLUX.predict(fresh.transformer, noisy, step, embeds, pooled, conditioning)
        fresh.transformer.disable_lora()
        base = FLUX.predict(fresh.transformer, noisy, step, embeds, pooled, conditioning)
    torch.testing.assert_close(loaded, trained)
    assert not torch.allclose(base, trained)
    # The kohya file: q/k/v fused per stream (and into linear1), alpha scaled by the fused count (its parity with
    # diffusers' kohya loader is tested in tests/pipeline/lora/test_kohya_flux.py; that loader splits linear1 at
    # FLUX.1's full widths only, so it cannot load the tiny model's single blocks).
    kohya = load_file(str(files["kohya"]))
    assert {key.rsplit(".", 2)[0] for key in kohya if key.endswith(".alpha")} >= {
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_0_txt_attn_qkv",
        "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_double_blocks_0_txt_attn_proj",
        "lora_unet_single_blocks_0_linear1",
    }
    assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3 * 8


def test_gamma_zero_is_plain_noise_and_a_box_changes_only_its_tokens(pipe):
    # One opaque subject in the left half of a 64x64 canvas: latent columns 0-3 of 8, packed token columns 0-1 of 4.
    cutout = Image.new("RGBA", (RES // 2, RES), (200, 30, 30, 255))
    layout = layout_from_boxes([cutout], [(0, 0, RES // 2, RES)], (RES, RES))
    z, mask = encode_layout(pipe, layout.image, layout.union_mask, RES, RES)
    assert tuple(z.shape) == (1, 16, SIDE, SIDE)

    shifted = pack_latents(mudi_initial_latents(pipe, z, mask, 1.0, torch.Generator().manual_seed(3)))
    noise = pack_latents(mudi_initial_latents(pipe, z, mask, 0.0, torch.Generator().manual_seed(3)))
    changed = (shifted != noise).any(dim=-1).view(SIDE // 2, SIDE // 2)  # token grid (rows, columns)
    expected = torch.zeros(SIDE // 2, SIDE // 2, dtype=torch.bool)
    expected[:, : SIDE // 4] = True
    assert torch.equal(changed, expected)

    requests = [
        SampleRequest("olis dog", 3),
        SampleRequest("olis dog", 3, gamma=0.0),
        SampleRequest("olis dog", 3, gamma=1.0),
        SampleRequest("olis dog", 3, negative_prompt="sticker, collage"),
    ]
    images = [np.asarray(image) for _, image in generate(pipe, requests, layout, RES, RES, 2, 3.5)]
    assert all(image.shape == (RES, RES, 3) for image in images)
    assert np.array_equal(images[0], images[1])  # γ = 0 is the pipeline's own noise, bit for bit
    assert not np.array_equal(images[0], images[2])
    assert np.array_equal(images[0], images[3])  # no true CFG asked for: the negative prompt is not used


def test_a_negative_prompt_needs_true_cfg_when_asked(pipe):
    def render(family, negative):
        request = RenderRequest("olis dog", negative, RES, RES, 2, 3.5, torch.Generator().manual_seed(3), 1.0, None)
        return np.asarray(family.render(pipe, request))

    true_cfg = FluxFamily(true_cfg_scale=2.0)
    assert np.array_equal(render(true_cfg, None), render(FLUX, "sticker, collage"))
    assert not np.array_equal(render(true_cfg, "sticker, collage"), render(true_cfg, None))


def test_clip_lora_trains_exports_and_loads_back(pipe, samples, cache_root, tmp_path):
    config = TrainConfig(
        steps=3, resolution=RES, rank=4, alpha=4, lr=1e-2, prior_weight=0, segmix_p=0, train_text_encoder=True,
        mixed_precision="no",
    )  # fmt: skip
    result = train_lora(pipe, samples[:1], config, tmp_path / "out", tmp_path / "cache")
    assert set(result.text_encoder_lora_states) == {"text_encoder"}  # CLIP only; T5 stays frozen
    files = FLUX.export_lora(tmp_path / "lora", pipe, LoraSpec(rank=4, alpha=4, train_text_encoders=True))
    written = load_file(str(files["diffusers"]))
    clip_part = {k.removeprefix("text_encoder."): v for k, v in written.items() if k.startswith("text_encoder.")}
    assert clip_part.keys() == result.text_encoder_lora_states["text_encoder"].keys()

    fresh = load_base_pipeline(BaseModelSpec(source="tiny:flux", family="flux"), cache_root)
    base_pooled = FLUX.encode_prompts(fresh, ["olis dog"], torch.device("cpu"))[1]
    fresh.load_lora_weights(str(files["diffusers"].parent), weight_name=files["diffusers"].name)
    with torch.no_grad():
        trained, loaded = (FLUX.encode_prompts(p, ["olis dog"], torch.device("cpu"))[1] for p in (pipe, fresh))
    torch.testing.assert_close(loaded, trained)
    assert not torch.allclose(base_pooled, trained)
    # The file's naming is what load_lora takes back (init_lora of a next round).
    FLUX.load_lora("text_encoder", pipe.text_encoder, clip_part, "castlora")


def test_kl_towards_a_previous_round_and_dco_run_on_flux(pipe, samples, tmp_path):
    """A second round starts from the first round's transformer LoRA (init_lora in the file's naming) with the KL
    term towards it (reference adapter) and DCO's LoRA-off reference: both switch adapters on the transformer."""
    base = dict(resolution=RES, rank=4, alpha=4, lr=1e-3, prior_weight=0, segmix_p=0, mixed_precision="no")
    first = train_lora(pipe, samples[:1], TrainConfig(steps=2, **base), tmp_path / "a", tmp_path / "cache")
    config = TrainConfig(steps=2, kl_weight=1.0, dco_beta=1000.0, **base)
    second = train_lora(pipe, samples[:1], config, tmp_path / "b", tmp_path / "cache", init_lora=first.lora_state)
    assert second.steps_done == 2 and all(np.isfinite(loss) for _, loss, _ in second.losses)
    assert second.lora_state.keys() == first.lora_state.keys()
    assert list(pipe.transformer.peft_config) == ["castlora"]  # the reference adapter is gone again


def test_kl_with_a_clip_lora_switches_only_the_encoders_that_carry_lora(pipe, samples, tmp_path):
    """Round k+1 with a text-encoder LoRA: the KL reference re-encodes prompts with the reference adapter on CLIP,
    while T5 (no LoRA on FLUX) is left alone."""
    base = dict(resolution=RES, rank=4, alpha=4, lr=1e-3, prior_weight=0, segmix_p=0, mixed_precision="no")
    first = TrainConfig(steps=2, train_text_encoder=True, **base)
    round_k = train_lora(pipe, samples[:1], first, tmp_path / "a", tmp_path / "cache")
    clip = round_k.text_encoder_lora_states["text_encoder"]
    init = {**round_k.lora_state, **{f"text_encoder.{key}": value for key, value in clip.items()}}  # file naming
    config = TrainConfig(steps=2, kl_weight=1.0, train_text_encoder=True, **base)
    second = train_lora(pipe, samples[:1], config, tmp_path / "b", tmp_path / "cache", init_lora=init)
    assert second.steps_done == 2 and all(np.isfinite(loss) for _, loss, _ in second.losses)
    assert not hasattr(pipe.text_encoder_2, "peft_config") or not pipe.text_encoder_2.peft_config


def test_diffusion_dpo_runs_on_the_velocity_target(pipe, tmp_path):
    """Diffusion-DPO compares the velocity errors of winner and loser against the reference: log 2 while the model
    equals its reference, finite and learning afterwards."""
    winner_path, loser_path = tmp_path / "w.png", tmp_path / "l.png"
    winner = TrainingSample(
        write_image(winner_path, (220, 60, 60), stripes=True), str(winner_path), "olis dog", INSTANCE
    )
    loser = TrainingSample(write_image(loser_path, (60, 60, 220)), str(loser_path), "olis dog", INSTANCE)
    config = TrainConfig(
        steps=4, resolution=RES, rank=4, alpha=4, lr=1e-2, prior_weight=0, segmix_p=0, dpo_beta=5000.0, log_every=1,
        mixed_precision="no",
    )  # fmt: skip
    logs: dict[int, dict] = {}
    result = train_preference(
        pipe,
        [(winner, loser)],
        config,
        tmp_path / "out",
        tmp_path / "cache",
        None,
        on_log=lambda s, m: logs.update({s: m}),
    )
    assert logs[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.steps_done == 4 and np.isfinite(result.metrics["dpo_eval_loss"])
    assert result.metrics["dpo_eval_loss"] < math.log(2)


def test_lora_scale_reaches_the_transformer(pipe, samples, tmp_path):
    def render(scale: float) -> np.ndarray:
        request = RenderRequest("olis dog", None, RES, RES, 2, 3.5, torch.Generator().manual_seed(4), scale, None)
        return np.asarray(FLUX.render(pipe, request))

    base = render(1.0)
    config = TrainConfig(
        steps=3, resolution=RES, rank=4, alpha=4, lr=1e-2, prior_weight=0, segmix_p=0, mixed_precision="no"
    )
    train_lora(pipe, samples[:1], config, tmp_path / "out", tmp_path / "cache")
    assert np.array_equal(render(0.0), base)  # scale 0: the base transformer
    assert not np.array_equal(render(1.0), base)
