"""FLUX.1-dev at full size with random weights: for GPU step-time and memory benchmarks without a model hub
(docs/design.md#flux1).

Step time and memory depend on shapes, not weight values, so a pipeline built from FLUX.1-dev's published configs
(``black-forest-labs/FLUX.1-dev``: ``transformer/``, ``vae/``, ``text_encoder/`` (CLIP ViT-L),
``text_encoder_2/`` (T5 v1.1 XXL encoder) ``config.json``, ``scheduler/``) trains exactly as fast and as large as the
real one. It is saved as a standard diffusers directory, so castlora and diffusers' own training script load it the
same way. Only the tokenizers are small local ones (the real vocabularies cannot be downloaded here); the text
encoders keep the real embedding tables (49408 and 32128 entries), and token ids are in range. The T5 tokenizer
keeps FLUX.1-dev's 512-token ``model_max_length``.

    python -m pipeline.models.random_flux /scratch/flux-random [--dtype bf16] [--device cuda]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from pipeline.models.random_cli import run_builder
from pipeline.models.tiny_flux import (
    CLIP_MAX_TOKENS,
    FLUX_VAE_NORMALISATION,
    SEED,
    clip_text_config,
    save_flux_pipeline,
    t5_config,
    write_flux_tokenizers,
)

T5_MAX_TOKENS = 512
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
    "mid_block_add_attention": True,
    **FLUX_VAE_NORMALISATION,
}
TEXT_ENCODER_CONFIG: dict[str, Any] = {  # CLIP ViT-L/14 text tower
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": CLIP_MAX_TOKENS,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
TEXT_ENCODER_2_CONFIG: dict[str, Any] = {  # google/t5-v1_1-xxl, encoder only
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "is_encoder_decoder": False,
    "use_cache": False,
    "tie_word_embeddings": False,
}
PARAMETER_COUNTS = {
    "transformer": 11_901_408_320,
    "vae": 83_819_683,
    "text_encoder": 123_060_480,
    "text_encoder_2": 4_762_310_656,
}
"""Parameters of FLUX.1-dev's components: what the configs above must reproduce."""


def random_flux_components(tokenizer: CLIPTokenizer, tokenizer_2: T5Tokenizer) -> dict[str, torch.nn.Module]:
    """The four FLUX.1-dev networks at full size, randomly initialised on the current default device
    (use ``with torch.device("meta")`` to count parameters without allocating ~17B parameters)."""
    return {
        "transformer": FluxTransformer2DModel(**TRANSFORMER_CONFIG),
        "vae": AutoencoderKL(**VAE_CONFIG),
        "text_encoder": CLIPTextModel(clip_text_config(TEXT_ENCODER_CONFIG, tokenizer)),
        "text_encoder_2": T5EncoderModel(t5_config(TEXT_ENCODER_2_CONFIG, tokenizer_2)),
    }


def build_random_flux(target_dir: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> None:
    """Save a random-weight, full-size FLUX.1-dev pipeline to ``target_dir`` (~34 GB in bf16).

    ``device="cuda"`` initialises on the GPU (much faster); the saved files are the same kind.
    """
    target_dir = Path(target_dir)
    tokenizers = write_flux_tokenizers(target_dir, t5_max_tokens=T5_MAX_TOKENS)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(SEED)
        components = random_flux_components(*tokenizers)
    save_flux_pipeline(target_dir, {name: module.to(dtype=dtype) for name, module in components.items()}, tokenizers)


def main(argv: list[str] | None = None) -> None:
    run_builder(argv, __doc__, build_random_flux, "bf16", "FLUX.1-dev")


if __name__ == "__main__":
    main()
