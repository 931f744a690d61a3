"""A random-init FLUX.1-shaped pipeline small enough to train and render on CPU in seconds
(docs/design.md#flux1).

Every component has FLUX.1-dev's *layout*, only narrower: a ``FluxTransformer2DModel`` with one double-stream and
one single-stream block, guidance embedding on (FLUX.1-dev is guidance-distilled), 64 input channels (16 latent
channels packed 2x2) and rotary axes that sum to the head width; a CLIP-L-shaped ``CLIPTextModel`` whose pooled
output feeds the transformer's pooled projection; a T5-shaped ``T5EncoderModel`` whose token states are the
joint-attention context; a 16-channel ``AutoencoderKL`` with FLUX's ``shift_factor``/``scaling_factor`` and no
quant convs; FLUX.1-dev's ``FlowMatchEulerDiscreteScheduler`` configuration. The CLIP and T5 widths differ so that
mixing them up fails loudly. Tokenizers are built locally: the byte-level CLIP one of ``tokenizers.py`` and a
Unigram T5 tokenizer made from a small vocabulary through the ``tokenizers`` library.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from pipeline.errors import CastloraError
from pipeline.models.tokenizers import write_tiny_clip_tokenizer

SEED = 0
CLIP_MAX_TOKENS = 77
T5_MAX_TOKENS = 32
"""The tiny T5 tokenizer's ``model_max_length``: the FLUX family encodes ``min(512, model_max_length)`` tokens, so
the tiny model's text sequence stays short (FLUX.1-dev: 512)."""
CLIP_HIDDEN = 32
"""CLIP width = the transformer's ``pooled_projection_dim`` (CLIP ViT-L: 768)."""
T5_HIDDEN = 48
"""T5 width = the transformer's ``joint_attention_dim`` (T5-XXL: 4096)."""
LATENT_CHANNELS = 16
VAE_SCALE_FACTOR = 8

FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""FLUX.1-dev's published ``scheduler/scheduler_config.json``."""
FLUX_SCHNELL_SCHEDULER_CONFIG: dict[str, Any] = {**FLUX_SCHEDULER_CONFIG, "shift": 1.0, "use_dynamic_shifting": False}
"""FLUX.1-schnell's published scheduler config: no shift at all, static or dynamic."""
FLUX_VAE_NORMALISATION: dict[str, float] = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
"""FLUX.1's VAE: model latents are ``(z − shift_factor) · scaling_factor``."""

_T5_WORDS = ("a", "photo", "of", "the", "and", "dog", "cat", "toy", "person", "with", "in", "sticker", "collage")


def flux_scheduler(schnell: bool = False) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**(FLUX_SCHNELL_SCHEDULER_CONFIG if schnell else FLUX_SCHEDULER_CONFIG))


def tiny_t5_vocab() -> list[tuple[str, float]]:
    """A T5-ordered Unigram vocabulary: ``<pad>``, ``</s>``, ``<unk>``, the word-start marker, printable characters
    with and without it, then a few whole prompt words (higher scores, so they win over spelling)."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    characters = [c for c in string.printable if not c.isspace()]
    pieces += [(c, -8.0) for c in characters] + [("▁" + c, -7.0) for c in characters]
    pieces += [("▁" + word, -1.0) for word in _T5_WORDS]
    return list(dict(pieces).items())


def write_tiny_t5_tokenizer(target_dir: Path, model_max_length: int = T5_MAX_TOKENS) -> T5Tokenizer:
    """A loadable T5 tokenizer (Unigram model built with ``tokenizers``) saved to ``target_dir``."""
    tokenizer = T5Tokenizer(vocab=tiny_t5_vocab(), extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(target_dir)
    return T5Tokenizer.from_pretrained(target_dir)


def write_flux_tokenizers(target_dir: Path, t5_max_tokens: int = T5_MAX_TOKENS) -> tuple[CLIPTokenizer, T5Tokenizer]:
    """Local tokenizers in ``tokenizer/`` (CLIP, 77 tokens) and ``tokenizer_2/`` (T5)."""
    write_tiny_clip_tokenizer(target_dir / "tokenizer", model_max_length=CLIP_MAX_TOKENS)
    clip = CLIPTokenizer.from_pretrained(target_dir / "tokenizer")
    return clip, write_tiny_t5_tokenizer(target_dir / "tokenizer_2", t5_max_tokens)


def clip_text_config(config: dict[str, Any], tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        **config,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def t5_config(config: dict[str, Any], tokenizer: T5Tokenizer) -> T5Config:
    return T5Config(
        **config,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary axes (index, row, column) that sum to ``head_dim``, each even as rotary embeddings need: 3/8 of the
    width to each spatial axis, the rest to the index axis ((4, 6, 6) for 16; FLUX.1 splits 128 as (16, 56, 56))."""
    if head_dim < 16 or head_dim % 16:
        raise CastloraError(f"attention_head_dim={head_dim}: the tiny FLUX transformer needs a multiple of 16.")
    side = 6 * (head_dim // 16)
    return (head_dim - 2 * side, side, side)


def tiny_transformer_config(
    *, double_blocks: int = 1, single_blocks: int = 1, heads: int = 2, head_dim: int = 16
) -> dict[str, Any]:
    """The tiny transformer's config with another depth or width (width = ``heads`` x ``head_dim``): the defaults are
    the ``tiny-flux`` preset's; a wider one makes a compute-bound model that loads with the same text encoders, VAE
    and tokenizers (the training benchmark's ``wide-flux``: docs/design.md#flux1-training-benchmark)."""
    if min(double_blocks, single_blocks, heads) < 1:
        raise CastloraError(
            f"double_blocks={double_blocks}, single_blocks={single_blocks}, heads={heads}: each must be >= 1."
        )
    return {
        "patch_size": 1,
        "in_channels": LATENT_CHANNELS * 4,
        "num_layers": double_blocks,
        "num_single_layers": single_blocks,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": T5_HIDDEN,
        "pooled_projection_dim": CLIP_HIDDEN,
        "guidance_embeds": True,
        "axes_dims_rope": rope_axes(head_dim),
    }


TRANSFORMER_CONFIG: dict[str, Any] = tiny_transformer_config()
CLIP_CONFIG: dict[str, Any] = {
    "hidden_size": CLIP_HIDDEN,
    "intermediate_size": 2 * CLIP_HIDDEN,
    "projection_dim": CLIP_HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": CLIP_MAX_TOKENS,
    "hidden_act": "quick_gelu",
}
T5_CONFIG: dict[str, Any] = {
    "d_model": T5_HIDDEN,
    "d_kv": 12,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "feed_forward_proj": "gated-gelu",  # T5 v1.1, as T5-XXL
    "is_encoder_decoder": False,
    "use_cache": False,
    "tie_word_embeddings": False,
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (16, 32, 32, 32),  # four levels -> 8x, as FLUX's VAE
    "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 8,
    "sample_size": 256,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
    **FLUX_VAE_NORMALISATION,
}


def save_flux_pipeline(
    target_dir: Path,
    components: dict[str, torch.nn.Module],
    tokenizers: tuple[CLIPTokenizer, T5Tokenizer],
    schnell: bool = False,
) -> None:
    """Save ``transformer``/``vae``/``text_encoder``/``text_encoder_2`` with the tokenizers and FLUX.1-dev's (or
    ``schnell``: FLUX.1-schnell's) scheduler as a standard diffusers directory (safetensors)."""
    scheduler = flux_scheduler(schnell)
    pipe = FluxPipeline(**components, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], scheduler=scheduler)
    pipe.save_pretrained(target_dir, safe_serialization=True)


def build_tiny_flux_schnell(target_dir: Path) -> None:
    """The tiny FLUX.1 pipeline shaped like FLUX.1-schnell: no guidance embedding, schnell's unshifted scheduler."""
    build_tiny_flux(target_dir, schnell=True)


def build_tiny_flux(
    target_dir: Path, schnell: bool = False, transformer_config: Mapping[str, Any] | None = None
) -> None:
    """Build the tiny FLUX.1 pipeline (FLUX.1-dev-shaped; ``schnell``: FLUX.1-schnell-shaped) and save it as a
    standard diffusers directory (safetensors); ``transformer_config`` (from ``tiny_transformer_config``) replaces
    the preset's transformer shape."""
    target_dir = Path(target_dir)
    clip, t5 = write_flux_tokenizers(target_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        components = {
            "text_encoder": CLIPTextModel(clip_text_config({**CLIP_CONFIG, "vocab_size": len(clip)}, clip)),
            "text_encoder_2": T5EncoderModel(t5_config({**T5_CONFIG, "vocab_size": len(t5)}, t5)),
            "transformer": FluxTransformer2DModel(
                **{**(transformer_config or TRANSFORMER_CONFIG), "guidance_embeds": not schnell}
            ),
            "vae": AutoencoderKL(**VAE_CONFIG),
        }
    save_flux_pipeline(target_dir, components, (clip, t5), schnell)
