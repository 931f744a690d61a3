"""The trained LoRA state is what ``pipeline.lora.export`` writes: reloaded into a fresh pipe it reproduces
the trained U-Net's output."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from pipeline.lora.adapters import LoraSpec
from pipeline.lora.export import save_diffusers_lora
from pipeline.train import TrainConfig, train_lora


def unet_output(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    embeds = torch.randn(1, 77, 80, generator=generator)
    cond = {
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        "text_embeds": torch.randn(1, 48, generator=generator),
    }
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), embeds, added_cond_kwargs=cond).sample


def test_trained_lora_round_trips_through_the_diffusers_file(tiny_pipe, tiny_sdxl_dir, sample_set, tmp_path):
    config = TrainConfig(steps=3, lr=1e-2, resolution=64, mixed_precision="no", rank=4, alpha=8, prior_weight=0)
    result = train_lora(tiny_pipe, sample_set, config, tmp_path / "out", tmp_path / "cache")
    trained = unet_output(tiny_pipe)
    path = save_diffusers_lora(tmp_path / "lora", result.lora_state, LoraSpec(rank=4, alpha=8))

    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    base = unet_output(fresh)
    fresh.load_lora_weights(str(path.parent), weight_name=path.name)
    assert not torch.allclose(trained, base, atol=1e-4)  # training changed the U-Net
    assert torch.allclose(unet_output(fresh), trained, atol=1e-5)
