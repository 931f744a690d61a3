"""The full-size random FLUX.1-dev used for GPU benchmarks has FLUX.1-dev's exact shapes (counted on the meta
device: nothing is allocated), and its builder writes a directory FluxPipeline loads."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import random_flux
from pipeline.models.random_flux import PARAMETER_COUNTS, T5_MAX_TOKENS, random_flux_components
from pipeline.models.tiny_flux import write_flux_tokenizers


@pytest.fixture(scope="module")
def meta_components(tmp_path_factory):
    tokenizers = write_flux_tokenizers(tmp_path_factory.mktemp("flux_tokenizers"), T5_MAX_TOKENS)
    with torch.device("meta"):
        return random_flux_components(*tokenizers)


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_counts_match_flux_dev(meta_components, name):
    assert sum(p.numel() for p in meta_components[name].parameters()) == PARAMETER_COUNTS[name]


def test_transformer_has_flux_dev_layout(meta_components):
    transformer = meta_components["transformer"]
    assert (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)) == (19, 38)
    assert transformer.inner_dim == 24 * 128 and transformer.context_embedder.in_features == 4096


def test_builder_writes_a_pipeline_flux_loads(tmp_path, monkeypatch):
    """The same builder with narrowed configs (the full one writes ~34 GB): a standard diffusers folder in the
    requested dtype, loadable with ``from_pretrained``, whose encoders accept the local tokenizers' ids."""
    from diffusers import FluxPipeline

    narrow = {
        "TRANSFORMER_CONFIG": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                               "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 24,
                               "axes_dims_rope": (4, 6, 6)},
        "VAE_CONFIG": {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4},
        "TEXT_ENCODER_CONFIG": {"hidden_size": 24, "intermediate_size": 32, "projection_dim": 24,
                                "num_hidden_layers": 1, "num_attention_heads": 2},
        "TEXT_ENCODER_2_CONFIG": {"d_model": 32, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2},
    }  # fmt: skip
    for name, changes in narrow.items():
        monkeypatch.setattr(random_flux, name, {**getattr(random_flux, name), **changes})
    random_flux.main([str(tmp_path / "flux"), "--dtype", "bf16"])
    from safetensors import safe_open

    (weights,) = (tmp_path / "flux" / "transformer").glob("*.safetensors")
    with safe_open(str(weights), framework="pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.bfloat16
    pipe = FluxPipeline.from_pretrained(tmp_path / "flux")
    assert pipe.tokenizer_2.model_max_length == T5_MAX_TOKENS
    assert pipe.text_encoder_2.config.vocab_size == 32128 and pipe.text_encoder.config.vocab_size == 49408
    embeds, pooled, _ = pipe.encode_prompt("a photo of olis dog", max_sequence_length=16)
    assert tuple(embeds.shape) == (1, 16, 32) and tuple(pooled.shape) == (1, 24)
