"""A test-only model family that differs from SDXL wherever the seam should matter (docs/design.md#model-families).

It is an SD-1-style pipeline (``StableDiffusionPipeline``) built in memory from tiny random modules:
6 latent channels instead of 4, a 4x VAE instead of 8x, one CLIP text encoder with no pooled embedding and no
size/crop conditioning, and a v-prediction scheduler. If anything in the trainer, the caches or MuDI's initial
latent still assumed SDXL, training or sampling with this family would fail or put the mask in the wrong place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipeline.families import ModelFamily, RenderRequest
from pipeline.families.ddpm import DDPMObjective
from pipeline.lora.adapters import (
    LoraSpec,
    add_text_encoder_lora,
    add_unet_lora,
    load_text_encoder_lora,
    load_unet_lora,
    text_encoder_lora_state_dict,
    unet_lora_state_dict,
)
from pipeline.lora.export import save_diffusers_lora
from pipeline.models.base_model import BaseModelSpec, torch_dtype
from pipeline.models.identity import module_identity
from pipeline.models.tokenizers import write_tiny_clip_tokenizer
from pipeline.storage.hashing import sha256_json

LATENT_CHANNELS = 6
DOWNSAMPLING = 4
TEXT_HIDDEN = 24


def build_tiny_sd(tokenizer_dir: Path, seed: int = 0) -> StableDiffusionPipeline:
    """The tiny SD-1-style pipeline (random weights from ``seed``), progress bars off."""
    write_tiny_clip_tokenizer(tokenizer_dir, model_max_length=16)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_HIDDEN,
                intermediate_size=2 * TEXT_HIDDEN,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=16,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            attention_head_dim=2,
            cross_attention_dim=TEXT_HIDDEN,
            norm_num_groups=8,
        )
        channels = (8, 16, 16)  # three levels -> two downsamples -> 4x
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=channels,
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=4,
            scaling_factor=0.5,
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TinySDFamily(ModelFamily):
    name = "tiny-sd"
    denoiser = "unet"
    text_encoders = ("text_encoder",)

    def handles(self, pipe: Any) -> bool:
        return isinstance(pipe, StableDiffusionPipeline)

    def load(self, spec: BaseModelSpec, cache_root: Path) -> StableDiffusionPipeline:
        pipe = build_tiny_sd(Path(cache_root) / "tiny-sd-tokenizer")
        return pipe.to(spec.device, torch_dtype(spec.dtype))

    def encode_prompts(
        self, pipe: Any, prompts: Sequence[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _ = pipe.encode_prompt(list(prompts), device, 1, False)
        return embeds, embeds.new_zeros((len(prompts), 0))  # SD-1 U-Nets take no pooled embedding

    def prompt_encoder_identity(self, pipe: Any) -> str:
        vocab = sha256_json(sorted(pipe.tokenizer.get_vocab().items()))
        return sha256_json({"modules": module_identity(pipe.text_encoder), "tokenizer": vocab})

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.unet.config.in_channels)

    def downsampling_factor(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor)

    def latent_dtype(self, pipe: Any) -> torch.dtype:
        return pipe.text_encoder.dtype

    def objective(self, pipe: Any) -> DDPMObjective:
        return DDPMObjective(pipe.scheduler.config)

    def predict(
        self,
        denoiser: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        conditioning: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        assert not conditioning and pooled.shape[-1] == 0, "the tiny family has no extra conditioning"
        return denoiser(noisy, timesteps, embeds).sample

    def add_lora(self, component: str, model: torch.nn.Module, spec: LoraSpec, adapter_name: str) -> None:
        add = add_unet_lora if component == self.denoiser else add_text_encoder_lora
        add(model, spec, adapter_name=adapter_name)

    def lora_state_dict(self, component: str, model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        read = unet_lora_state_dict if component == self.denoiser else text_encoder_lora_state_dict
        return read(model, adapter_name)

    def load_lora(
        self, component: str, model: torch.nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str
    ) -> None:
        load = load_unet_lora if component == self.denoiser else load_text_encoder_lora
        load(model, state, adapter_name)

    def export_lora(
        self, out_dir: Path, pipe: Any, spec: LoraSpec, metadata: Mapping[str, str] | None = None
    ) -> dict[str, Path]:
        state = unet_lora_state_dict(pipe.unet)
        return {"diffusers": save_diffusers_lora(out_dir, state, spec, extra_metadata=metadata)}

    def render(self, pipe: Any, request: RenderRequest) -> Image.Image:
        output = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            generator=request.generator,
            latents=request.initial_latents,
            cross_attention_kwargs={"scale": request.lora_scale},
            output_type="pil",
        )
        return output.images[0]


TINY_SD = TinySDFamily()
