"""The tiny FLUX.1 builder's shape options (docs/design.md#flux1): the defaults are the ``tiny-flux`` preset's
transformer, a wider shape builds a transformer whose rotary axes fit its heads, bad shapes are refused by name,
and the benchmark's FLUX.1 settings give the diffusers script castlora's LoRA targets."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from pipeline.errors import CastloraError
from pipeline.families.flux import flux_lora_targets
from pipeline.lora.adapters import UNET_TARGETS
from pipeline.models.tiny_flux import TRANSFORMER_CONFIG, build_tiny_flux, rope_axes, tiny_transformer_config


def test_defaults_are_the_tiny_flux_preset_shape():
    config = tiny_transformer_config()
    assert config == TRANSFORMER_CONFIG
    assert (config["num_layers"], config["num_single_layers"]) == (1, 1)
    assert (config["num_attention_heads"], config["attention_head_dim"]) == (2, 16)
    assert config["axes_dims_rope"] == (4, 6, 6)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_rope_axes_sum_to_the_head_width_and_are_even(head_dim):
    axes = rope_axes(head_dim)
    assert sum(axes) == head_dim and all(axis % 2 == 0 and axis > 0 for axis in axes)


@pytest.mark.parametrize(
    ("options", "named"),
    [({"head_dim": 24}, "attention_head_dim=24"), ({"heads": 0}, "heads=0"), ({"single_blocks": 0}, "single_blocks=0")],
)
def test_bad_shapes_are_refused_by_name(options, named):
    with pytest.raises(CastloraError, match=named):
        tiny_transformer_config(**options)


def test_a_wider_transformer_runs_with_its_rotary_axes():
    """Rotary embeddings of the wrong total width fail inside attention: a forward pass is the real check."""
    config = tiny_transformer_config(double_blocks=2, single_blocks=1, heads=3, head_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**config)
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (2, 1)
    assert model.inner_dim == 3 * 32
    tokens, text = 4, 3
    out = model(
        hidden_states=torch.randn(1, tokens, config["in_channels"]),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([1.0]),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"]),
        encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"]),
        txt_ids=torch.zeros(text, 3),
        img_ids=torch.stack([torch.zeros(tokens), torch.arange(tokens) // 2, torch.arange(tokens) % 2], dim=1).float(),
        return_dict=False,
    )[0]
    assert out.shape == (1, tokens, config["in_channels"]) and torch.isfinite(out).all()


def test_builder_saves_the_requested_transformer_shape(tmp_path):
    config = tiny_transformer_config(double_blocks=2, single_blocks=3, heads=4, head_dim=32)
    build_tiny_flux(tmp_path / "wide", transformer_config=config)
    saved = FluxTransformer2DModel.load_config(tmp_path / "wide" / "transformer")
    assert (saved["num_layers"], saved["num_single_layers"]) == (2, 3)
    assert (saved["num_attention_heads"], saved["attention_head_dim"]) == (4, 32)
    assert tuple(saved["axes_dims_rope"]) == rope_axes(32)


def test_benchmark_gives_the_diffusers_script_castlora_flux_targets():
    """bench_train's ``--lora_layers`` for the FLUX script must name exactly the modules castlora trains by default,
    or the two sides would train different adapters."""
    from benchmarks.bench_train import FLUX_ATTENTION_TARGETS

    theirs = {name.removeprefix("attn.") for name in FLUX_ATTENTION_TARGETS.split(",")}
    assert theirs == set(flux_lora_targets(UNET_TARGETS))
