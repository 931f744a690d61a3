"""SDXL base 1.0 at full size with random weights: for GPU step-time and memory benchmarks without a model hub.

Step time and memory depend on shapes, not weight values, so a pipeline built from SDXL base's published
configs (``stabilityai/stable-diffusion-xl-base-1.0``: ``unet/``, ``vae/``, ``text_encoder/``,
``text_encoder_2/`` ``config.json``) trains exactly as fast and as large as the real one. It is saved as a
standard diffusers directory, so castlora and diffusers' own training script load it the same way. Only the
tokenizers are small local ones (the real CLIP BPE vocabulary cannot be downloaded here); the text encoders
keep the real 49408-entry embedding tables, and token ids are in range.

    python -m pipeline.models.random_sdxl /scratch/sdxl-random [--dtype fp16] [--device cuda]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipeline.models.random_cli import run_builder
from pipeline.models.tiny_sdxl import MAX_TOKENS, SEED, save_sdxl_pipeline, write_sdxl_tokenizers

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
TEXT_ENCODER_CONFIG: dict[str, Any] = {  # CLIP ViT-L/14 text tower
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": MAX_TOKENS,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
TEXT_ENCODER_2_CONFIG: dict[str, Any] = {  # OpenCLIP ViT-bigG/14 text tower, with projection
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": MAX_TOKENS,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
PARAMETER_COUNTS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}
"""Parameters of SDXL base 1.0's components: what the configs above must reproduce."""


def _text_config(config: dict[str, Any], tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        **config,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def random_sdxl_components(tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer) -> dict[str, torch.nn.Module]:
    """The four SDXL networks at full size, randomly initialised on the current default device
    (use ``with torch.device("meta")`` to count parameters without allocating ~14 GB)."""
    return {
        "unet": UNet2DConditionModel(**UNET_CONFIG),
        "vae": AutoencoderKL(**VAE_CONFIG),
        "text_encoder": CLIPTextModel(_text_config(TEXT_ENCODER_CONFIG, tokenizer)),
        "text_encoder_2": CLIPTextModelWithProjection(_text_config(TEXT_ENCODER_2_CONFIG, tokenizer_2)),
    }


def build_random_sdxl(target_dir: Path, dtype: torch.dtype = torch.float16, device: str = "cpu") -> None:
    """Save a random-weight, full-size SDXL base pipeline to ``target_dir`` (~7 GB in fp16).

    ``device="cuda"`` initialises on the GPU (seconds instead of minutes); the saved files are the same kind.
    """
    target_dir = Path(target_dir)
    tokenizers = write_sdxl_tokenizers(target_dir)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(SEED)
        components = random_sdxl_components(*tokenizers)
    save_sdxl_pipeline(target_dir, {name: module.to(dtype=dtype) for name, module in components.items()}, tokenizers)


def main(argv: list[str] | None = None) -> None:
    run_builder(argv, __doc__, build_random_sdxl, "fp16", "SDXL base")


if __name__ == "__main__":
    main()
