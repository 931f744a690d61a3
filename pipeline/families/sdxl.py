"""Stable Diffusion XL as a model family (docs/design.md#model-families): a U-Net with DDPM epsilon/v-prediction,
two CLIP text encoders (penultimate hidden states concatenated, encoder 2's pooled projection), size-and-crop
time ids, PEFT LoRA on the attention projections, and diffusers + kohya/SGM LoRA files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from pipeline.families.base import ImageGeometry, ModelFamily, RenderRequest, text_to_image_batch
from pipeline.families.ddpm import DDPMObjective
from pipeline.lora.adapters import (
    LoraError,
    LoraSpec,
    add_text_encoder_lora,
    add_unet_lora,
    load_text_encoder_lora,
    load_unet_lora,
    text_encoder_lora_state_dict,
    unet_lora_state_dict,
)
from pipeline.lora.export import diffusers_to_sgm_path, export_lora, sgm_block_map
from pipeline.models.base_model import BaseModelSpec, load_diffusers_pipeline
from pipeline.models.identity import module_identity
from pipeline.storage.hashing import sha256_json


class SDXLFamily(ModelFamily):
    name = "sdxl"
    denoiser = "unet"
    text_encoders = ("text_encoder", "text_encoder_2")

    def handles(self, pipe: Any) -> bool:
        return isinstance(pipe, StableDiffusionXLPipeline)

    def load(self, spec: BaseModelSpec, cache_root: Path) -> StableDiffusionXLPipeline:
        # No invisible watermark: it needs an optional package and would alter training images.
        what = "base model (SDXL)"
        return load_diffusers_pipeline(spec, cache_root, StableDiffusionXLPipeline, what, add_watermarker=False)

    # -- prompts
    def encode_prompts(
        self, pipe: Any, prompts: Sequence[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return prompt_embeds, pooled

    def prompt_encoder_identity(self, pipe: Any) -> str:
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        vocab = [sha256_json(sorted(t.get_vocab().items())) for t in tokenizers if t is not None]
        return sha256_json({"modules": module_identity(pipe.text_encoder, pipe.text_encoder_2), "tokenizers": vocab})

    # -- latents
    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.unet.config.in_channels)

    def downsampling_factor(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor)

    def latent_dtype(self, pipe: Any) -> torch.dtype:
        """The dtype SDXL's prepare_latents draws noise in: that of the prompt embeddings."""
        encoder = getattr(pipe, "text_encoder_2", None)
        return encoder.dtype if encoder is not None else pipe.unet.dtype

    # -- training
    def objective(self, pipe: Any) -> DDPMObjective:
        return DDPMObjective(pipe.scheduler.config)

    def conditioning(self, geometries: Sequence[ImageGeometry], resolution: int) -> dict[str, torch.Tensor]:
        """SDXL's micro-conditioning: original size, the crop's (top, left) and the target size (the image's bucket,
        docs/design.md#aspect-ratio-buckets), as in diffusers' train_dreambooth_lora_sdxl.py."""
        rows = [[*g.original_size, *g.crop_top_left, *(g.target_size or (resolution, resolution))] for g in geometries]
        return {"time_ids": torch.tensor(rows, dtype=torch.float32)}

    def predict(
        self,
        denoiser: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        conditioning: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        added = {"time_ids": conditioning["time_ids"], "text_embeds": pooled}
        return denoiser(noisy, timesteps, embeds, added_cond_kwargs=added).sample

    # -- LoRA
    def add_lora(self, component: str, model: torch.nn.Module, spec: LoraSpec, adapter_name: str) -> None:
        if component == self.denoiser:
            add_unet_lora(model, spec, adapter_name=adapter_name)
        else:
            add_text_encoder_lora(model, spec, adapter_name=adapter_name)

    def lora_state_dict(self, component: str, model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        if component == self.denoiser:
            return unet_lora_state_dict(model, adapter_name)
        return text_encoder_lora_state_dict(model, adapter_name)

    def load_lora(
        self, component: str, model: torch.nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str
    ) -> None:
        if component == self.denoiser:
            load_unet_lora(model, state, adapter_name)
        else:
            load_text_encoder_lora(model, state, adapter_name)

    def kohya_lora_modules(self, pipe: Any) -> dict[str, tuple[tuple[str, slice], ...]]:
        """The kohya/SGM name of every linear or conv layer of the U-Net, from the same SGM map the export uses."""
        block_map = sgm_block_map(pipe.unet.config)
        names: dict[str, tuple[tuple[str, slice], ...]] = {}
        for name, module in pipe.unet.named_modules():
            name = name.removesuffix(".base_layer")  # a layer already wrapped by a PEFT adapter
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and name:
                try:
                    names["lora_unet_" + diffusers_to_sgm_path(name, block_map).replace(".", "_")] = (
                        (name, slice(None)),
                    )
                    # Some trainers write kohya files with diffusers module paths (lora_unet_down_blocks_1_…).
                    names.setdefault("lora_unet_" + name.replace(".", "_"), ((name, slice(None)),))
                except LoraError:  # outside the SGM layout: no kohya name
                    continue
        return names

    def export_lora(
        self, out_dir: Path, pipe: Any, spec: LoraSpec, metadata: Mapping[str, str] | None = None
    ) -> dict[str, Path]:
        encoders = (pipe.text_encoder, pipe.text_encoder_2) if spec.train_text_encoders else ()
        return export_lora(out_dir, pipe.unet, spec, text_encoders=encoders, metadata=metadata)

    # -- generation
    def render(self, pipe: Any, request: RenderRequest) -> Image.Image:
        """diffusers multiplies ``latents=`` by ``scheduler.init_noise_sigma``, so they go in unscaled; the LoRA
        scale reaches the U-Net's and text encoders' PEFT layers through ``cross_attention_kwargs``."""
        output = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            generator=request.generator,
            latents=request.initial_latents,
            cross_attention_kwargs={"scale": float(request.lora_scale)},
            output_type="pil",
        )
        return output.images[0]

    def render_batch(self, pipe: Any, requests: Sequence[RenderRequest]) -> list[Image.Image]:
        """One pipeline call when the requests can share one (``text_to_image_batch``), else one by one."""
        images = text_to_image_batch(pipe, requests, cross_attention_kwargs={"scale": float(requests[0].lora_scale)})
        return images if images is not None else super().render_batch(pipe, requests)


SDXL = SDXLFamily()
