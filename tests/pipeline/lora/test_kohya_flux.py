"""The kohya-format FLUX.1 LoRA: fused q/k/v and linear1 hold the per-projection LoRAs exactly, with the trained
alpha / rank scale; diffusers' kohya conversion (what ``FluxPipeline.load_lora_weights`` runs on kohya keys) loads
the file back to the same transformer output, and a ComfyUI-style merge into the fused BFL weights does too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

import pipeline.lora.kohya_flux as kohya_flux_module
from pipeline.lora.adapters import LoraError
from pipeline.lora.kohya_flux import KOHYA_FLUX_WEIGHT_NAME, save_kohya_flux_lora, to_kohya_flux
from pipeline.storage.tensor_files import canonicalize_safetensors

ATOL = 1e-5
WIDTH = 32  # heads × head dim of the tiny transformer
CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "pooled_projection_dim": 16,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}
# The reference script's targets (diffusers' train_dreambooth_lora_flux.py): suffix matches, so the attention
# projections of the single-stream blocks are adapted too (fused into linear1 without proj_mlp).
REFERENCE_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]
# Every block layer that has a kohya name; the single blocks' q/k/v/proj_mlp are left out because diffusers'
# conversion splits linear1 at FLUX.1's full widths (3072, 3072, 3072, 12288) only.
DIFFUSERS_LOADABLE = (
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)"
    r"|single_transformer_blocks\.\d+\.(proj_out|norm\.linear)"
)
# Every block layer with a kohya name (a regex: a bare "proj_out" would also match the top-level one).
EVERY_BLOCK_LAYER = (
    r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear"
    r"|proj_mlp|proj_out|norm\.linear)"
)


@pytest.fixture(scope="module")
def base_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**CONFIG).state_dict()


@pytest.fixture(scope="module")
def inputs() -> dict:
    generator = torch.Generator().manual_seed(1234)
    rows, cols, text = 4, 4, 6
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    return {
        "hidden_states": torch.randn(1, rows * cols, CONFIG["in_channels"], generator=generator),
        "encoder_hidden_states": torch.randn(1, text, CONFIG["joint_attention_dim"], generator=generator),
        "pooled_projections": torch.randn(1, CONFIG["pooled_projection_dim"], generator=generator),
        "timestep": torch.tensor([0.6]),
        "guidance": torch.tensor([1.0]),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }


def _fresh(base_weights: dict[str, torch.Tensor]) -> FluxTransformer2DModel:
    model = FluxTransformer2DModel(**CONFIG)
    model.load_state_dict(base_weights)
    return model.eval()


@torch.no_grad()
def _output(model: FluxTransformer2DModel, inputs: dict) -> torch.Tensor:
    return model(**inputs)[0]


def _with_lora(
    base_weights: dict[str, torch.Tensor], targets: list[str] | str, rank: int, alpha: float
) -> tuple[FluxTransformer2DModel, dict[str, torch.Tensor]]:
    """The tiny transformer with a random non-zero LoRA (A and B), and its PEFT state with ``transformer.`` keys."""
    model = _fresh(base_weights)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    state = {f"transformer.{key}": value for key, value in get_peft_model_state_dict(model).items()}
    return model, state


def _load_with_diffusers(base_weights: dict[str, torch.Tensor], source: Path | dict) -> FluxTransformer2DModel:
    """What ``FluxPipeline.load_lora_weights`` does with a kohya file: ``lora_state_dict`` converts it (diffusers'
    ``_convert_kohya_flux_lora_to_diffusers``), then the ``transformer.`` keys go into the transformer."""
    converted = FluxPipeline.lora_state_dict(str(source) if isinstance(source, Path) else dict(source))
    assert converted and all(key.startswith("transformer.") for key in converted)
    model = _fresh(base_weights)
    model.load_lora_adapter(converted, prefix="transformer", adapter_name="loaded")
    return model.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------------------- load parity
@pytest.mark.parametrize("rank, alpha", [(4, 8.0), (4, 1.0), (3, 3.0)])
def test_diffusers_kohya_loader_gives_the_same_transformer_output(
    base_weights: dict, inputs: dict, tmp_path: Path, rank: int, alpha: float
) -> None:
    trained, state = _with_lora(base_weights, DIFFUSERS_LOADABLE, rank, alpha)
    expected = _output(trained, inputs)
    base = _output(_fresh(base_weights), inputs)
    path = save_kohya_flux_lora(tmp_path / KOHYA_FLUX_WEIGHT_NAME, state, alpha)
    loaded_model = _load_with_diffusers(base_weights, path)
    loaded = _output(loaded_model, inputs)
    assert {f"transformer.{key}" for key in get_peft_model_state_dict(loaded_model, adapter_name="loaded")} == set(
        state
    )  # none dropped

    assert _max_diff(expected, base) > 1e-3  # the LoRA really changes the transformer
    assert _max_diff(loaded, expected) < ATOL
    # A loader that ignored the written alpha (scale 1 instead of alpha / rank) would be clearly off.
    if alpha != rank:
        with torch.no_grad():
            for name, param in trained.named_parameters():
                if "lora_B" in name:
                    param.mul_(rank / alpha)
        assert _max_diff(_output(trained, inputs), expected) > 1e-3


def _bfl_rows(kohya_name: str) -> list[tuple[str, int]]:
    """Diffusers modules in a BFL layer's row order, written out independently of the converter's table."""
    parts = kohya_name.removeprefix("lora_unet_").split("_")
    block = f"transformer_blocks.{parts[2]}" if parts[0] == "double" else f"single_transformer_blocks.{parts[2]}"
    layer = "_".join(parts[3:])
    qkv = {"img_attn_qkv": ("to_q", "to_k", "to_v"), "txt_attn_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
    plain = {
        "img_attn_proj": "attn.to_out.0",
        "txt_attn_proj": "attn.to_add_out",
        "img_mlp_0": "ff.net.0.proj",
        "img_mlp_2": "ff.net.2",
        "txt_mlp_0": "ff_context.net.0.proj",
        "txt_mlp_2": "ff_context.net.2",
        "img_mod_lin": "norm1.linear",
        "txt_mod_lin": "norm1_context.linear",
        "linear2": "proj_out",
        "modulation_lin": "norm.linear",
    }
    if layer in qkv:
        return [(f"{block}.attn.{name}", WIDTH) for name in qkv[layer]]
    if layer == "linear1":
        return [(f"{block}.attn.{name}", WIDTH) for name in ("to_q", "to_k", "to_v")] + [
            (f"{block}.proj_mlp", 4 * WIDTH)
        ]
    return [(f"{block}.{plain[layer]}", -1)]


@pytest.mark.parametrize("targets", [REFERENCE_TARGETS, EVERY_BLOCK_LAYER], ids=["reference", "every-layer"])
def test_comfyui_style_merge_into_the_fused_layers_gives_the_same_output(
    base_weights: dict, inputs: dict, targets: list[str] | str
) -> None:
    """ComfyUI adds ``up @ down · alpha / rank`` to the fused BFL weight (``img_attn.qkv``, ``linear1``, ...);
    splitting that fused delta back by rows must give the trained model, single-stream linear1 included."""
    rank, alpha = 4, 2.0
    trained, state = _with_lora(base_weights, targets, rank, alpha)
    kohya = to_kohya_flux(state, alpha)
    merged = dict(base_weights)
    for key in kohya:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        delta = up @ down * (float(kohya[f"{name}.alpha"]) / down.shape[0])
        start = 0
        for module, rows in _bfl_rows(name):
            rows = delta.shape[0] if rows < 0 else rows
            merged[f"{module}.weight"] = merged[f"{module}.weight"] + delta[start : start + rows]
            start += rows
        assert start == delta.shape[0], name
    model = FluxTransformer2DModel(**CONFIG)
    model.load_state_dict(merged)
    assert _max_diff(_output(trained, inputs), _output(_fresh(base_weights), inputs)) > 1e-3
    assert _max_diff(_output(model.eval(), inputs), _output(trained, inputs)) < ATOL


def _full_size_state(rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A LoRA on FLUX.1-dev's real widths, without the 12-billion-parameter model: double block 0's q/k/v and
    add_q/k/v, single block 0's q/k/v + proj_mlp, and single block 1's q/k/v only."""
    width, state = 3072, {}

    def add(module: str, rows: int) -> None:
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, width, generator=generator)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(rows, rank, generator=generator)

    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        add(f"transformer_blocks.0.attn.{name}", width)
    for block in (0, 1):
        for name in ("to_q", "to_k", "to_v"):
            add(f"single_transformer_blocks.{block}.attn.{name}", width)
    add("single_transformer_blocks.0.proj_mlp", 4 * width)
    return state


@pytest.mark.parametrize("rank, alpha", [(4, 16.0), (4, 1.0)])
def test_diffusers_splits_the_fused_layers_back_into_the_trained_loras_at_full_flux_widths(
    rank: int, alpha: float
) -> None:
    """At FLUX.1's widths diffusers' conversion takes its exact ('sparse') branch: every projection gets its own A
    and B back with rank r, and B·A equals the trained B·A · alpha / r (diffusers bakes the scale in)."""
    state = _full_size_state(rank, torch.Generator().manual_seed(3))
    converted = FluxPipeline.lora_state_dict(to_kohya_flux(state, alpha))
    expected_keys = set(state) | {
        "transformer.single_transformer_blocks.1.proj_mlp.lora_A.weight",
        "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight",
    }
    assert set(converted) == expected_keys
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        up_key = key.replace(".lora_A.", ".lora_B.")
        assert converted[key].shape[0] == rank
        trained = state[up_key] @ state[key] * (alpha / rank)
        loaded = converted[up_key] @ converted[key]
        assert torch.allclose(loaded, trained, rtol=1e-6, atol=1e-5), key
    absent = "transformer.single_transformer_blocks.1.proj_mlp"  # not trained: a zero LoRA
    assert not converted[f"{absent}.lora_B.weight"].any()


# ------------------------------------------------------------------------------------------- file contents
def test_block_keys_are_exactly_the_kohya_names_with_fused_shapes_and_scaled_alphas(base_weights: dict) -> None:
    rank, alpha = 4, 8.0
    _, state = _with_lora(base_weights, EVERY_BLOCK_LAYER, rank, alpha)
    kohya = to_kohya_flux(state, alpha)

    double = [
        "img_attn_qkv",
        "img_attn_proj",
        "txt_attn_qkv",
        "txt_attn_proj",
        "img_mlp_0",
        "img_mlp_2",
        "txt_mlp_0",
        "txt_mlp_2",
        "img_mod_lin",
        "txt_mod_lin",
    ]
    single = ["linear1", "linear2", "modulation_lin"]
    names = [f"lora_unet_double_blocks_{i}_{layer}" for i in range(2) for layer in double]
    names += [f"lora_unet_single_blocks_{i}_{layer}" for i in range(2) for layer in single]
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha")
    assert list(kohya) == [name + suffix for name in names for suffix in suffixes]  # and in this order

    assert kohya["lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight"].shape == (3 * rank, WIDTH)
    assert kohya["lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight"].shape == (3 * WIDTH, 3 * rank)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (4 * rank, WIDTH)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * WIDTH + 4 * WIDTH, 4 * rank)
    assert kohya["lora_unet_single_blocks_1_linear2.lora_down.weight"].shape == (rank, WIDTH + 4 * WIDTH)
    for key, value in kohya.items():
        if key.endswith(".alpha"):
            assert value.dim() == 0 and value.dtype == torch.float32
    assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3 * alpha
    assert float(kohya["lora_unet_double_blocks_0_txt_attn_qkv.alpha"]) == 3 * alpha
    assert float(kohya["lora_unet_single_blocks_1_linear1.alpha"]) == 4 * alpha
    assert float(kohya["lora_unet_double_blocks_1_img_mlp_2.alpha"]) == alpha
    assert float(kohya["lora_unet_single_blocks_0_modulation_lin.alpha"]) == alpha

    # Fused layout: downs stacked in q, k, v order; ups on the block diagonal, zero elsewhere.
    prefix = "transformer.transformer_blocks.0.attn."
    down = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    up = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    for slot, name in enumerate(("to_q", "to_k", "to_v")):
        assert torch.equal(down[slot * rank : (slot + 1) * rank], state[f"{prefix}{name}.lora_A.weight"])
        block = up[slot * WIDTH : (slot + 1) * WIDTH]
        assert torch.equal(block[:, slot * rank : (slot + 1) * rank], state[f"{prefix}{name}.lora_B.weight"])
        off_diagonal = torch.cat([block[:, : slot * rank], block[:, (slot + 1) * rank :]], dim=1)
        assert not off_diagonal.any()
    assert torch.equal(
        kohya["lora_unet_double_blocks_0_txt_attn_proj.lora_up.weight"], state[f"{prefix}to_add_out.lora_B.weight"]
    )


def test_untargeted_projections_get_zero_blocks_and_other_namings_convert_alike(base_weights: dict) -> None:
    rank, alpha = 2, 2.0
    _, state = _with_lora(base_weights, ["attn.to_q", "attn.to_v"], rank, alpha)
    kohya = to_kohya_flux(state, alpha)
    raw = to_kohya_flux({key.removeprefix("transformer."): value for key, value in state.items()}, alpha)
    diffusers_named = {
        key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): value for key, value in state.items()
    }
    for other in (raw, to_kohya_flux(diffusers_named, alpha)):
        assert list(other) == list(kohya) and all(torch.equal(other[key], kohya[key]) for key in kohya)

    assert not any("txt_attn_qkv" in key for key in kohya)  # add_* projections were not targeted
    down = kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    up = kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert down.shape == (4 * rank, WIDTH) and float(kohya["lora_unet_single_blocks_0_linear1.alpha"]) == 4 * alpha
    assert down[rank : 2 * rank].abs().sum() == 0 and down[3 * rank :].abs().sum() == 0  # to_k and proj_mlp
    assert up[WIDTH : 2 * WIDTH].abs().sum() == 0 and up[3 * WIDTH :].abs().sum() == 0
    assert down[:rank].abs().sum() > 0 and up[2 * WIDTH : 3 * WIDTH].abs().sum() > 0  # to_q and to_v


def test_unknown_and_malformed_states_are_refused(base_weights: dict) -> None:
    _, state = _with_lora(base_weights, REFERENCE_TARGETS, 4, 4.0)
    first = "transformer.x_embedder.lora_A.weight"
    unknown = {first: torch.zeros(4, 64), "transformer.proj_out.lora_A.weight": torch.zeros(4, 32), **state}
    with pytest.raises(LoraError, match=r"'transformer\.x_embedder\.lora_A\.weight'") as refused:
        to_kohya_flux(unknown, 4.0)
    assert "transformer.proj_out" not in str(refused.value)  # the first unknown key is named, not a later one

    for key in (
        "transformer.transformer_blocks.0.attn.to_q.lora_B.bias",  # LoRA bias
        "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector",  # DoRA
        "transformer.transformer_blocks.0.attn.norm_q.lora_A.weight",  # a layer kohya has no name for
        "transformer.single_transformer_blocks.0.attn.add_q_proj.lora_A.weight",  # not in a single block
        "transformer.transformer_blocks.0.attn.to_q.lora_A.castlora.weight",  # adapter name left in
    ):
        with pytest.raises(LoraError, match=key.replace(".", r"\.")):
            to_kohya_flux({**state, key: torch.zeros(4, 32)}, 4.0)

    broken = dict(state)
    broken.pop("transformer.transformer_blocks.1.attn.to_k.lora_B.weight")
    with pytest.raises(LoraError, match=r"transformer_blocks\.1\.attn\.to_k.*only its down"):
        to_kohya_flux(broken, 4.0)
    mixed = dict(state)
    mixed["transformer.transformer_blocks.0.attn.to_v.lora_A.weight"] = torch.zeros(2, WIDTH)
    mixed["transformer.transformer_blocks.0.attn.to_v.lora_B.weight"] = torch.zeros(WIDTH, 2)
    with pytest.raises(LoraError, match="one rank and width"):
        to_kohya_flux(mixed, 4.0)
    with pytest.raises(LoraError, match="empty"):
        to_kohya_flux({}, 4.0)
    for bad_alpha in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(LoraError, match="alpha"):
            to_kohya_flux(state, bad_alpha)


def test_saved_file_has_the_kohya_header_and_writes_atomically(
    base_weights: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rank, alpha = 4, 8.0
    _, state = _with_lora(base_weights, REFERENCE_TARGETS, rank, alpha)
    target = tmp_path / KOHYA_FLUX_WEIGHT_NAME
    assert save_kohya_flux_lora(target, state, alpha, {"castlora.pair": "a__b"}) == target
    with safe_open(str(target), framework="pt") as handle:
        header = handle.metadata()
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "8"  # the trained rank and alpha
    assert header["ss_network_module"] == "networks.lora_flux" and header["ss_base_model_version"] == "flux1"
    assert header["castlora.pair"] == "a__b" and header["format"] == "pt"
    written = load_file(str(target))
    assert written.keys() == to_kohya_flux(state, alpha).keys()
    assert [p.name for p in tmp_path.iterdir()] == [KOHYA_FLUX_WEIGHT_NAME]

    before = target.read_bytes()
    canonicalize_safetensors(target)
    assert target.read_bytes() == before, "exports must be canonical (the same bytes in every process)"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(kohya_flux_module, "save_file", crash)
    with pytest.raises(OSError):
        save_kohya_flux_lora(target, state, 2.0)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [KOHYA_FLUX_WEIGHT_NAME]
    with pytest.raises(LoraError, match="str to str"):
        save_kohya_flux_lora(tmp_path / "other.safetensors", state, alpha, {"rank": 4})  # type: ignore[dict-item]
