"""A random-init SDXL-shaped pipeline small enough to run on CPU in well under a second per image.

Every component has SDXL's *layout*, only narrower: two CLIP text encoders whose hidden states are
concatenated for cross-attention, the second one projected and pooled for the ``text_time`` added
condition, a three-level U-Net (plain, cross-attention, cross-attention) with two layers per block and a
cross-attention mid block, and a four-level VAE (8x downsampling, SDXL's scaling factor). Keeping the block
structure identical matters downstream: LoRA target modules and kohya/SGM key names
(``input_blocks_4_1_transformer_blocks_0_...``) are derived from it, so the tiny model exercises the same
code paths as the real one. The two text encoders deliberately have different widths so that mixing them
up fails loudly instead of silently working.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipeline.models.tokenizers import write_tiny_clip_tokenizer

SEED = 0
MAX_TOKENS = 77
TEXT_HIDDEN_1 = 32
"""Width of text encoder 1 (CLIP ViT-L in SDXL: 768)."""
TEXT_HIDDEN_2 = 48
"""Width and projection size of text encoder 2 (OpenCLIP bigG in SDXL: 1280)."""
TIME_EMBED_DIM = 8
"""Per-number Fourier size of the six size/crop conditions (SDXL: 256)."""
VAE_SCALE_FACTOR = 8
SAMPLE_SIZE = 32
"""Latent side; the pipeline's default image side is SAMPLE_SIZE * VAE_SCALE_FACTOR = 256 px."""


def _text_config(vocab_size: int, hidden: int, hidden_act: str, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        projection_dim=hidden,
        num_hidden_layers=2,  # SDXL reads hidden_states[-2], so at least two layers are needed
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        # Number of attention heads per level (diffusers' historical name); head width 16.
        attention_head_dim=(2, 4, 4),
        # SDXL uses (1, 2, 10); two transformer blocks at the deepest level keep multi-block key names.
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        cross_attention_dim=TEXT_HIDDEN_1 + TEXT_HIDDEN_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        # Pooled embedding of encoder 2 + six Fourier-embedded numbers (original size, crop, target size).
        projection_class_embeddings_input_dim=TEXT_HIDDEN_2 + 6 * TIME_EMBED_DIM,
        norm_num_groups=32,
    )


def _vae() -> AutoencoderKL:
    channels = (16, 32, 32, 32)  # four levels -> three downsamples -> VAE_SCALE_FACTOR 8, as in SDXL
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SAMPLE_SIZE * VAE_SCALE_FACTOR,
        scaling_factor=0.13025,  # SDXL's value
        force_upcast=True,
    )


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base's scheduler configuration."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def write_sdxl_tokenizers(target_dir: Path) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """Local CLIP tokenizers in ``tokenizer/`` and ``tokenizer_2/`` (the second pads with "!", as SDXL's)."""
    write_tiny_clip_tokenizer(target_dir / "tokenizer", model_max_length=MAX_TOKENS)
    write_tiny_clip_tokenizer(target_dir / "tokenizer_2", model_max_length=MAX_TOKENS, pad_token="!")
    first, second = (CLIPTokenizer.from_pretrained(target_dir / name) for name in ("tokenizer", "tokenizer_2"))
    return first, second


def save_sdxl_pipeline(
    target_dir: Path, components: dict[str, torch.nn.Module], tokenizers: tuple[CLIPTokenizer, CLIPTokenizer]
) -> None:
    """Save ``unet``/``vae``/``text_encoder``/``text_encoder_2`` with the tokenizers and SDXL base's scheduler as a
    standard diffusers directory (safetensors)."""
    pipe = StableDiffusionXLPipeline(
        **components,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        scheduler=sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(target_dir, safe_serialization=True)


def build_tiny_sdxl(target_dir: Path) -> None:
    """Build the tiny SDXL pipeline and save it as a standard diffusers directory (safetensors)."""
    target_dir = Path(target_dir)
    tokenizer, tokenizer_2 = write_sdxl_tokenizers(target_dir)
    # A private RNG stream: the same weights every build, without disturbing the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        components = {
            "text_encoder": CLIPTextModel(_text_config(len(tokenizer), TEXT_HIDDEN_1, "quick_gelu", tokenizer)),
            "text_encoder_2": CLIPTextModelWithProjection(
                _text_config(len(tokenizer_2), TEXT_HIDDEN_2, "gelu", tokenizer_2)
            ),
            "unet": _unet(),
            "vae": _vae(),
        }
    save_sdxl_pipeline(target_dir, components, (tokenizer, tokenizer_2))
