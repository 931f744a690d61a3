"""The full-size random SDXL used for GPU benchmarks has SDXL base 1.0's exact shapes (counted on the meta
device: nothing is allocated), and its builder writes a directory diffusers loads."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTokenizer

from pipeline.models.random_sdxl import PARAMETER_COUNTS, UNET_CONFIG, random_sdxl_components
from pipeline.models.tokenizers import write_tiny_clip_tokenizer


@pytest.fixture(scope="module")
def meta_components(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizers")
    write_tiny_clip_tokenizer(folder / "t1")
    write_tiny_clip_tokenizer(folder / "t2", pad_token="!")
    tokenizers = CLIPTokenizer.from_pretrained(folder / "t1"), CLIPTokenizer.from_pretrained(folder / "t2")
    with torch.device("meta"):
        return random_sdxl_components(*tokenizers)


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_counts_match_sdxl_base(meta_components, name):
    count = sum(p.numel() for p in meta_components[name].parameters())
    assert count == PARAMETER_COUNTS[name]


def test_unet_has_sdxl_attention_layout(meta_components):
    unet = meta_components["unet"]
    # Ten transformer blocks per attention at the deepest level, head width 64 everywhere (SDXL's layout).
    deepest = unet.down_blocks[2].attentions[0]
    assert len(deepest.transformer_blocks) == 10
    attn = deepest.transformer_blocks[0].attn1
    assert attn.heads * 64 == attn.inner_dim == UNET_CONFIG["block_out_channels"][2]
    assert attn.to_k.in_features == 1280 and deepest.transformer_blocks[0].attn2.to_k.in_features == 2048


def test_builder_writes_a_pipeline_diffusers_loads(tmp_path, monkeypatch):
    """The same builder with narrowed configs (the full one writes ~7 GB): a standard diffusers folder in the
    requested dtype, loadable with ``from_pretrained``, whose encoders accept the local tokenizers' ids."""
    from diffusers import StableDiffusionXLPipeline

    from pipeline.models import random_sdxl

    narrow_text = {"intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    monkeypatch.setattr(
        random_sdxl,
        "TEXT_ENCODER_CONFIG",
        {**random_sdxl.TEXT_ENCODER_CONFIG, **narrow_text, "hidden_size": 32, "projection_dim": 32},
    )
    monkeypatch.setattr(
        random_sdxl,
        "TEXT_ENCODER_2_CONFIG",
        {**random_sdxl.TEXT_ENCODER_2_CONFIG, **narrow_text, "hidden_size": 48, "projection_dim": 48},
    )
    monkeypatch.setattr(
        random_sdxl,
        "UNET_CONFIG",
        {
            **UNET_CONFIG,
            "block_out_channels": (32, 64, 64),
            "attention_head_dim": (2, 4, 4),
            "transformer_layers_per_block": (1, 1, 1),
            "cross_attention_dim": 80,
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 48 + 6 * 8,
        },
    )
    monkeypatch.setattr(
        random_sdxl, "VAE_CONFIG", {**random_sdxl.VAE_CONFIG, "block_out_channels": (8, 8, 8, 8), "norm_num_groups": 4}
    )
    random_sdxl.build_random_sdxl(tmp_path / "sdxl", dtype=torch.float16)

    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl", dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
    assert pipe.text_encoder.config.vocab_size == 49408
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        "a photo of olis dog", device="cpu", do_classifier_free_guidance=False
    )
    assert prompt_embeds.shape == (1, 77, 80) and pooled.shape == (1, 48)
