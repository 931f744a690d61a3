"""FLUX.1's run settings (docs/design.md#flux1-run-settings): σ sampling, training guidance and true CFG are
settings a run sets; the SDXL family refuses them by name; FLUX.1-schnell (no guidance embedding, unshifted
scheduler) trains, renders and exports from a local folder."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from assets.launchpad import LoraTrainingConfig, SamplesConfig, SamplesSettings
from pipeline.errors import CastloraError
from pipeline.families import load_base_pipeline
from pipeline.families.base import ImageGeometry, RenderRequest
from pipeline.families.flow_matching import FlowMatchingObjective
from pipeline.families.flux import FLUX, FluxFamily
from pipeline.families.sdxl import SDXL
from pipeline.infer import SampleRequest, generate, layout_from_boxes
from pipeline.lora.adapters import LoraSpec
from pipeline.lora.verify import verify_lora_file
from pipeline.models.base_model import BaseModelSpec
from pipeline.models.presets import PRESETS, get_preset
from pipeline.models.tiny_flux import build_tiny_flux_schnell
from pipeline.prior_images import ClassImageConfig
from pipeline.rendering import GenerationSettings, RenderSettings
from pipeline.settings import identity_record, resolve
from pipeline.train import TrainConfig, train_lora
from pipeline.train.config import resolve_train_config

RES = 64
SIDE = RES // 8


def test_sdxl_refuses_each_flux_setting_by_name_and_flux_takes_them():
    for settings, field in [
        (TrainConfig(sigma_sampling="logit_normal", logit_mean=0.5), "TrainConfig.sigma_sampling='logit_normal'"),
        (TrainConfig(training_guidance=3.5), "TrainConfig.training_guidance=3.5"),
        (RenderSettings(64, 64, 2, 5.0, true_cfg_scale=2.0), "RenderSettings.true_cfg_scale=2.0"),
        (ClassImageConfig(true_cfg_scale=4.0), "ClassImageConfig.true_cfg_scale=4.0"),
    ]:
        with pytest.raises(
            CastloraError, match=rf"sdxl model family does not use: {re.escape(field)} is read only by .* flux"
        ):
            SDXL.with_options(settings)
    # Two settings SDXL does not read, both named; defaults pass.
    with pytest.raises(
        CastloraError, match=r"sigma_sampling='logit_normal' .*; TrainConfig\.logit_std=1\.5"
    ) as refused:
        SDXL.with_options(TrainConfig(logit_std=1.5, sigma_sampling="logit_normal"))
    assert "leave it at 1.0" in str(refused.value)
    assert SDXL.with_options(TrainConfig()) is SDXL and SDXL.with_options(None) is SDXL

    family = FLUX.with_options(TrainConfig(sigma_sampling="mode", mode_scale=0.8, training_guidance=2.5))
    assert isinstance(family, FluxFamily) and family is not FLUX
    assert (family.sigma_sampling, family.mode_scale, family.training_guidance) == ("mode", 0.8, 2.5)
    assert (FLUX.sigma_sampling, FLUX.training_guidance) == ("uniform", 1.0)  # the registered family is unchanged
    rendering = family.with_options(RenderSettings(64, 64, 2, 3.5, true_cfg_scale=3.0))
    assert (rendering.true_cfg_scale, rendering.sigma_sampling) == (3.0, "mode")
    geometry = [ImageGeometry((RES, RES), (0, 0))] * 2
    assert torch.equal(family.conditioning(geometry, RES)["guidance"], torch.full((2,), 2.5))


def test_the_launchpad_offers_the_flux_settings_and_resolve_refuses_them_for_sdxl():
    chosen = LoraTrainingConfig(sigma_sampling="logit_normal", logit_mean=-0.5, logit_std=1.5).settings(TrainConfig)
    resolved = resolve_train_config(chosen, PRESETS["tiny-flux"], "float32")
    assert (resolved.sigma_sampling, resolved.logit_mean, resolved.logit_std) == ("logit_normal", -0.5, 1.5)
    with pytest.raises(CastloraError, match=r"TrainConfig\.sigma_sampling='logit_normal' is read only by"):
        resolve_train_config(chosen, PRESETS["sdxl"], "float32")  # before any model loads
    samples = SamplesConfig(true_cfg_scale=2.5).settings(SamplesSettings)
    assert resolve(samples, PRESETS["flux"]).true_cfg_scale == 2.5
    with pytest.raises(CastloraError, match=r"SamplesSettings\.true_cfg_scale=2\.5 is read only by"):
        resolve(samples, PRESETS["tiny"])
    with pytest.raises(CastloraError, match=r"true_cfg_scale=0\.5 must be >= 1"):
        resolve(SamplesConfig(true_cfg_scale=0.5).settings(SamplesSettings), PRESETS["tiny-flux"])
    assert "FLUX.1 only" in LoraTrainingConfig.model_fields["sigma_sampling"].description
    with pytest.raises(CastloraError, match=r"mode_scale=2\.0 is read only with sigma_sampling='mode'"):
        TrainConfig(mode_scale=2.0)
    with pytest.raises(CastloraError, match=r"sigma_sampling='cosmap' must be one of"):
        TrainConfig(sigma_sampling="cosmap")


def test_defaults_leave_every_recorded_identity_as_it_was():
    """A run that sets no FLUX option hashes and fingerprints as before the options existed; one that sets one
    differs. A LoRA record written before they existed rebuilds its TrainConfig at their defaults."""
    plain = TrainConfig(steps=3, resolution=64, mixed_precision="no")
    assert not {"sigma_sampling", "training_guidance", "logit_std"} & set(plain.result_fields())
    changed = TrainConfig(steps=3, resolution=64, mixed_precision="no", sigma_sampling="logit_normal")
    assert changed.result_fields()["sigma_sampling"] == "logit_normal"
    old_record = {k: v for k, v in plain.as_record().items() if k not in {"sigma_sampling", "training_guidance"}}
    assert TrainConfig.from_record(old_record, "LoRA v1") == plain
    generation = GenerationSettings(("a",), 64, 2, 5.0, None)
    assert "true_cfg_scale" not in identity_record(generation)
    assert identity_record(GenerationSettings(("a",), 64, 2, 5.0, None, true_cfg_scale=2.0))["true_cfg_scale"] == 2.0
    assert generation.render_settings().true_cfg_scale == 1.0


def test_guidance_defaults_come_from_the_preset():
    assert {name: PRESETS[name].guidance_scale for name in ("tiny", "sdxl", "tiny-flux", "flux", "flux-schnell")} == {
        "tiny": 5.0,
        "sdxl": 5.0,
        "tiny-flux": 3.5,
        "flux": 3.5,
        "flux-schnell": 0.0,
    }
    assert resolve(ClassImageConfig(), PRESETS["flux"]).guidance_scale == 3.5
    assert resolve(ClassImageConfig(guidance_scale=7.0), PRESETS["flux"]).guidance_scale == 7.0
    assert resolve(SamplesConfig(guidance_scale=0.0).settings(SamplesSettings), PRESETS["sdxl"]).guidance_scale == 0.0


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    preset = get_preset("tiny-flux")
    cache = tmp_path_factory.mktemp("flux_settings_models")
    return load_base_pipeline(BaseModelSpec(source=preset.base_model, family=preset.family), cache)


def test_sigma_sampling_reaches_the_objective(flux_pipe):
    def draws(family: FluxFamily) -> torch.Tensor:
        return family.objective(flux_pipe).draw_timesteps(2000, torch.Generator().manual_seed(4))

    logit = FLUX.with_options(TrainConfig(sigma_sampling="logit_normal", logit_mean=1.0, logit_std=0.5))
    expected = FlowMatchingObjective(flux_pipe.scheduler.config, "logit_normal", 1.0, 0.5).draw_timesteps(
        2000, torch.Generator().manual_seed(4)
    )
    assert torch.equal(draws(logit), expected)
    # A narrow logit-normal (std 0.5) concentrates the draws: a much smaller spread than uniform's.
    assert draws(logit).std() < 0.6 * draws(FLUX).std()


def test_true_cfg_setting_reaches_the_render(flux_pipe, one_thread):
    requests = [SampleRequest("olis dog", 3, negative_prompt="sticker, collage")]

    def image(settings: RenderSettings | None) -> np.ndarray:
        ((_, picture),) = generate(flux_pipe, requests, None, RES, RES, 2, 3.5, options=settings)
        return np.asarray(picture)

    on = RenderSettings(RES, RES, 2, 3.5, true_cfg_scale=2.0)
    direct = FluxFamily(true_cfg_scale=2.0).render(
        flux_pipe,
        RenderRequest("olis dog", "sticker, collage", RES, RES, 2, 3.5, torch.Generator().manual_seed(3), 1.0, None),
    )
    with_true_cfg, plain = image(on), image(None)
    assert np.array_equal(with_true_cfg, np.asarray(direct)) and not np.array_equal(with_true_cfg, plain)
    assert np.array_equal(image(RenderSettings(RES, RES, 2, 3.5)), plain)


@pytest.fixture(scope="module")
def schnell_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("my-flux-schnell")
    build_tiny_flux_schnell(folder)
    return folder


def test_a_local_schnell_folder_loads_trains_renders_and_exports(schnell_folder, samples, tmp_path, one_thread):
    preset = get_preset("flux-schnell").with_overrides(base_model=str(schnell_folder))
    assert (preset.base_model, preset.inference_steps, preset.guidance_scale) == (str(schnell_folder), 4, 0.0)
    spec = BaseModelSpec(source=preset.base_model, family=preset.family)
    pipe = load_base_pipeline(spec, tmp_path / "models")
    assert not pipe.transformer.config.guidance_embeds and not pipe.scheduler.config.use_dynamic_shifting

    config = TrainConfig(steps=3, resolution=RES, rank=4, alpha=4, prior_weight=0, mixed_precision="no")
    result = train_lora(pipe, samples, config, tmp_path / "out", tmp_path / "cache")
    assert result.steps_done == 3 and all(np.isfinite(loss) for _, loss, _ in result.losses)
    with pytest.raises(CastloraError, match=r"training_guidance=3\.5: .*no guidance embedding"):
        train_lora(pipe, samples, replace(config, training_guidance=3.5), tmp_path / "o2", tmp_path / "c2")

    # Guidance is not an input of schnell: any value renders the same image (the preset's 0.0 included).
    requests = [SampleRequest("olis dog", 1), SampleRequest("olis dog", 1, gamma=1.0)]
    layout = layout_from_boxes([Image.new("RGBA", (32, 64), (200, 30, 30, 255))], [(0, 0, 32, 64)], (RES, RES))
    steps = preset.inference_steps
    zero = [np.asarray(i) for _, i in generate(pipe, requests, layout, RES, RES, steps, preset.guidance_scale)]
    other = [np.asarray(i) for _, i in generate(pipe, requests, layout, RES, RES, steps, 3.5)]
    assert zero[0].shape == (RES, RES, 3) and np.array_equal(zero[0], other[0]) and np.array_equal(zero[1], other[1])
    assert not np.array_equal(zero[0], zero[1])  # MuDI's init reaches schnell too

    files = FLUX.export_lora(tmp_path / "lora", pipe, LoraSpec(rank=4, alpha=4), {"castlora_version": "s1"})
    for file_format, path in files.items():
        assert verify_lora_file(path, file_format).metadata["castlora_version"] == "s1"
    fresh = load_base_pipeline(spec, tmp_path / "models")
    fresh.load_lora_weights(str(files["diffusers"].parent), weight_name=files["diffusers"].name)
    noisy = torch.randn(1, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    embeds, pooled = FLUX.encode_prompts(pipe, ["olis dog"], torch.device("cpu"))
    conditioning = FLUX.conditioning([ImageGeometry((RES, RES), (0, 0))], RES)
    with torch.no_grad():
        trained = FLUX.predict(pipe.transformer, noisy, torch.tensor([500.0]), embeds, pooled, conditioning)
        loaded = FLUX.predict(fresh.transformer, noisy, torch.tensor([500.0]), embeds, pooled, conditioning)
    torch.testing.assert_close(loaded, trained)
