"""LoRA export: the diffusers and the kohya/SGM file load back with diffusers' ``load_lora_weights`` and give
the same U-Net (and text-encoder) output as the in-memory PEFT model, alpha included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

import pipeline.lora.export as export_module
from pipeline.errors import CastloraError
from pipeline.lora import (
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    LoraError,
    LoraSpec,
    activate_adapter,
    add_text_encoder_lora,
    add_unet_lora,
    export_lora,
    lora_parameters,
    remove_adapter,
    save_kohya_lora,
    text_encoder_lora_state_dict,
    to_kohya_sgm,
    unet_lora_state_dict,
)
from pipeline.lora.export import diffusers_to_sgm_path, sgm_block_map
from pipeline.models.tiny_sdxl import TEXT_HIDDEN_1, TEXT_HIDDEN_2, build_tiny_sdxl
from pipeline.storage.tensor_files import canonicalize_safetensors

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sdxl")
    build_tiny_sdxl(directory)
    return directory


@pytest.fixture(scope="module")
def unet_inputs() -> dict:
    generator = torch.Generator().manual_seed(1234)
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([499]),
        "encoder_hidden_states": torch.randn(1, 8, TEXT_HIDDEN_1 + TEXT_HIDDEN_2, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, TEXT_HIDDEN_2, generator=generator),
            "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]),
        },
    }


@pytest.fixture(scope="module")
def base_output(tiny_dir: Path, unet_inputs: dict) -> torch.Tensor:
    return _unet_output(_fresh_pipe(tiny_dir), unet_inputs)


def _fresh_pipe(tiny_dir: Path) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(tiny_dir)


@torch.no_grad()
def _unet_output(pipe: StableDiffusionXLPipeline, inputs: dict) -> torch.Tensor:
    return pipe.unet(**inputs).sample


@torch.no_grad()
def _prompt_embeddings(pipe: StableDiffusionXLPipeline) -> torch.Tensor:
    embeds, _, pooled, _ = pipe.encode_prompt("a photo of olis dog", device="cpu", do_classifier_free_guidance=False)
    return torch.cat([embeds.flatten(), pooled.flatten()])


def _randomize_lora(module: torch.nn.Module, seed: int) -> None:
    """'gaussian' init leaves lora_B at zero (a no-op LoRA); make A and B random so the LoRA changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lora_parameters(module):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def _trained_pipe(tiny_dir: Path, spec: LoraSpec, text_encoders: bool = False) -> StableDiffusionXLPipeline:
    pipe = _fresh_pipe(tiny_dir)
    add_unet_lora(pipe.unet, spec)
    _randomize_lora(pipe.unet, seed=7)
    if text_encoders:
        for seed, encoder in enumerate((pipe.text_encoder, pipe.text_encoder_2), start=11):
            add_text_encoder_lora(encoder, spec)
            _randomize_lora(encoder, seed=seed)
    return pipe


def _loaded(tiny_dir: Path, source: Path) -> StableDiffusionXLPipeline:
    pipe = _fresh_pipe(tiny_dir)
    pipe.load_lora_weights(str(source))
    return pipe


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------------------------ adapters
def test_gaussian_init_starts_as_a_no_op_and_lora_params_are_the_only_trainable_ones(
    tiny_dir: Path, unet_inputs: dict, base_output: torch.Tensor
) -> None:
    pipe = _fresh_pipe(tiny_dir)
    add_unet_lora(pipe.unet, LoraSpec(rank=4, alpha=4.0))
    assert _max_diff(_unet_output(pipe, unet_inputs), base_output) < ATOL  # lora_B starts at zero
    trainable = [name for name, p in pipe.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert len(lora_parameters(pipe.unet)) == len(trainable)
    # (A, B) for each of the 4 targets in each attention (attn1 + attn2) of every transformer block
    attentions = [name for name, _ in pipe.unet.named_modules() if name.endswith((".attn1", ".attn2"))]
    assert len(trainable) == len(attentions) * 4 * 2


def test_lora_params_stay_fp32_on_a_half_precision_base(tiny_dir: Path) -> None:
    pipe = _fresh_pipe(tiny_dir)
    pipe.unet.to(torch.bfloat16)
    add_unet_lora(pipe.unet, LoraSpec(rank=4))
    lora = lora_parameters(pipe.unet)
    assert lora and all(p.dtype == torch.float32 for p in lora)
    frozen = [p for p in pipe.unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)


def test_state_dict_uses_diffusers_names_with_unet_prefix(tiny_dir: Path) -> None:
    pipe = _trained_pipe(tiny_dir, LoraSpec(rank=4))
    state = unet_lora_state_dict(pipe.unet)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight" in state
    assert "unet.up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_out.0.lora.up.weight" in state
    assert state["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"].shape[0] == 4


def test_bad_specs_and_double_adapters_are_refused(tiny_dir: Path) -> None:
    for bad in ({"rank": 0}, {"alpha": 0.0}, {"target_modules": ()}, {"dropout": 1.0}):
        with pytest.raises(LoraError):
            LoraSpec(**bad)
    pipe = _fresh_pipe(tiny_dir)
    with pytest.raises(LoraError, match="no_such_layer"):
        add_unet_lora(pipe.unet, LoraSpec(target_modules=("no_such_layer",)))
    pipe = _fresh_pipe(tiny_dir)
    add_unet_lora(pipe.unet, LoraSpec(rank=4))
    with pytest.raises(LoraError, match="already has"):
        add_unet_lora(pipe.unet, LoraSpec(rank=4))
    assert issubclass(LoraError, CastloraError)


def test_adapters_never_go_through_the_version_gated_library_wrappers(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers >= 5.24 refuses its adapter methods unless peft >= 0.22 (unreleased); diffusers gates its own on
    a minimum peft too. castlora's attach / switch / remove / read must work whatever those gates say."""
    import diffusers.loaders.peft
    import transformers.integrations.peft

    def refuse(min_version: str) -> None:
        raise ValueError(f"The version of PEFT you are using is not compatible, please use a version >= {min_version}")

    monkeypatch.setattr(transformers.integrations.peft, "check_peft_version", refuse)
    monkeypatch.setattr(diffusers.loaders.peft, "check_peft_version", refuse)
    pipe = _fresh_pipe(tiny_dir)
    spec = LoraSpec(rank=4, train_text_encoders=True)
    for module, add in ((pipe.unet, add_unet_lora), (pipe.text_encoder, add_text_encoder_lora)):
        add(module, spec)
        add(module, spec, adapter_name="reference")
        assert set(module.peft_config) == {"castlora", "reference"}
        activate_adapter(module, "castlora")
        trainable = {name for name, p in module.named_parameters() if p.requires_grad}
        assert trainable and all(".castlora." in name for name in trainable)
        remove_adapter(module, "reference")
        assert set(module.peft_config) == {"castlora"}
        assert not any(".reference." in name for name, _ in module.named_parameters())
        remove_adapter(module, "reference")  # removing an absent adapter is a no-op
    assert text_encoder_lora_state_dict(pipe.text_encoder) and unet_lora_state_dict(pipe.unet)
    with pytest.raises(LoraError, match="no adapter 'missing'"):
        activate_adapter(pipe.text_encoder, "missing")


# ------------------------------------------------------------------------------------------- load parity
@pytest.mark.parametrize("rank, alpha", [(4, 8.0), (8, 4.0)])
def test_both_files_load_and_match_the_in_memory_lora(
    tiny_dir: Path, unet_inputs: dict, base_output: torch.Tensor, tmp_path: Path, rank: int, alpha: float
) -> None:
    spec = LoraSpec(rank=rank, alpha=alpha)
    trained = _trained_pipe(tiny_dir, spec)
    expected = _unet_output(trained, unet_inputs)
    paths = export_lora(tmp_path, trained.unet, spec, metadata={"castlora.pair": "a__b"})

    from_diffusers = _unet_output(_loaded(tiny_dir, tmp_path), unet_inputs)  # directory: picks the diffusers file
    from_kohya = _unet_output(_loaded(tiny_dir, paths["kohya"]), unet_inputs)

    assert _max_diff(expected, base_output) > 1e-3  # the LoRA really changes the U-Net
    assert _max_diff(from_diffusers, base_output) > 1e-3
    assert _max_diff(from_diffusers, expected) < ATOL
    assert _max_diff(from_kohya, expected) < ATOL
    assert _max_diff(from_diffusers, from_kohya) < ATOL

    # What a loader that ignored alpha (assumed alpha = rank, scale 1) would produce: clearly different, so the
    # matches above prove both files carry alpha / rank through to the loaded model.
    with torch.no_grad():
        for name, param in trained.unet.named_parameters():
            if "lora_B" in name:
                param.mul_(rank / alpha)
    assert _max_diff(_unet_output(trained, unet_inputs), expected) > 1e-3


def test_wider_targets_map_resnet_and_transformer_internals(
    tiny_dir: Path, unet_inputs: dict, base_output: torch.Tensor, tmp_path: Path
) -> None:
    """Conv and feed-forward targets exercise the resnet renames (conv1 -> in_layers_2, ...) and the samplers."""
    spec = LoraSpec(
        rank=4, alpha=2.0, target_modules=("to_q", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv2", "time_emb_proj")
    )
    trained = _trained_pipe(tiny_dir, spec)
    expected = _unet_output(trained, unet_inputs)
    paths = export_lora(tmp_path, trained.unet, spec)
    kohya = load_file(str(paths["kohya"]))
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in kohya  # down_blocks.0.resnets.0.conv1
    assert "lora_unet_output_blocks_8_0_out_layers_3.lora_up.weight" in kohya  # up_blocks.2.resnets.2.conv2
    assert "lora_unet_middle_block_2_emb_layers_1.alpha" in kohya  # mid_block.resnets.1.time_emb_proj
    assert "lora_unet_input_blocks_7_1_transformer_blocks_1_ff_net_2.lora_down.weight" in kohya

    from_diffusers = _unet_output(_loaded(tiny_dir, paths["diffusers"]), unet_inputs)
    from_kohya = _unet_output(_loaded(tiny_dir, paths["kohya"]), unet_inputs)
    assert _max_diff(expected, base_output) > 1e-3
    assert _max_diff(from_diffusers, expected) < ATOL
    assert _max_diff(from_kohya, expected) < ATOL


def test_text_encoder_loras_export_and_load(
    tiny_dir: Path, unet_inputs: dict, base_output: torch.Tensor, tmp_path: Path
) -> None:
    spec = LoraSpec(rank=4, alpha=8.0, train_text_encoders=True)
    trained = _trained_pipe(tiny_dir, spec, text_encoders=True)
    expected_text = _prompt_embeddings(trained)
    expected_unet = _unet_output(trained, unet_inputs)
    base_text = _prompt_embeddings(_fresh_pipe(tiny_dir))
    paths = export_lora(tmp_path, trained.unet, spec, text_encoders=(trained.text_encoder, trained.text_encoder_2))

    kohya = load_file(str(paths["kohya"]))
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in kohya
    assert float(kohya["lora_te2_text_model_encoder_layers_1_self_attn_out_proj.alpha"]) == 8.0
    with safe_open(str(paths["diffusers"]), framework="pt") as handle:
        keys = set(handle.keys())
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight" in keys
    assert any(key.startswith("text_encoder_2.text_model.") for key in keys)

    assert _max_diff(expected_text, base_text) > 1e-3
    for source in (paths["diffusers"], paths["kohya"]):
        loaded = _loaded(tiny_dir, source)
        assert _max_diff(_prompt_embeddings(loaded), expected_text) < ATOL, source.name
        assert _max_diff(_unet_output(loaded, unet_inputs), expected_unet) < ATOL, source.name


# ------------------------------------------------------------------------------------------- file contents
def test_kohya_keys_follow_the_sgm_layout(tiny_dir: Path, tmp_path: Path) -> None:
    spec = LoraSpec(rank=4, alpha=8.0)
    trained = _trained_pipe(tiny_dir, spec)
    unet_state = unet_lora_state_dict(trained.unet)
    kohya = to_kohya_sgm(unet_state, trained.unet.config, spec)

    for key in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",  # down_blocks.1.attentions.0
        "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k.lora_up.weight",  # down_blocks.2.attentions.1
        "lora_unet_middle_block_1_transformer_blocks_1_attn1_to_out_0.alpha",  # mid_block.attentions.0
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_v.lora_down.weight",  # up_blocks.0.attentions.0
        "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_q.lora_up.weight",  # up_blocks.1.attentions.2
    ):
        assert key in kohya, key
    assert torch.equal(
        kohya["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"],
        unet_state["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"],
    )
    assert not any(part in key for key in kohya for part in ("down_blocks", "mid_block", "up_blocks", "lora_A"))

    modules = {key.rsplit(".", 2)[0] for key in kohya if key.endswith(".weight")}
    assert len(modules) * 2 == len(unet_state)  # one (down, up) pair per LoRA'd module, nothing lost
    for module in modules:
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= set(kohya)
        alpha = kohya[f"{module}.alpha"]
        assert alpha.dim() == 0 and float(alpha) == 8.0
    assert len(kohya) == 3 * len(modules)

    path = save_kohya_lora(tmp_path / "x.safetensors", kohya, {"castlora.version": "v1"})
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "8"
    assert header["castlora.version"] == "v1"


def test_sgm_map_is_derived_from_the_config_not_one_shape() -> None:
    """An SD1.5-shaped U-Net (4 levels, attention first, plain last) against its known original block names."""
    sd15 = {
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "layers_per_block": 2,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
    }
    block_map = sgm_block_map(sd15)
    expected = {
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2": "input_blocks.2.1.transformer_blocks.0.attn2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
        "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
        "mid_block.resnets.1.conv_shortcut": "middle_block.2.skip_connection",
        "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",  # no attention in this level: slot 1
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.attentions.2.proj_out": "output_blocks.11.1.proj_out",
        "conv_in": "input_blocks.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    for diffusers_path, sgm_path in expected.items():
        assert diffusers_to_sgm_path(diffusers_path, block_map) == sgm_path
    assert "down_blocks.3.downsamplers.0.conv" not in block_map  # the deepest level does not downsample
    with pytest.raises(LoraError, match=r"down_blocks\.4"):
        diffusers_to_sgm_path("down_blocks.4.attentions.0.proj_in", block_map)


def test_diffusers_file_header_carries_adapter_metadata(tiny_dir: Path, tmp_path: Path) -> None:
    spec = LoraSpec(rank=4, alpha=8.0)
    trained = _trained_pipe(tiny_dir, spec)
    paths = export_lora(tmp_path, trained.unet, spec, metadata={"castlora.pair": "a__b"})
    assert paths["diffusers"] == tmp_path / DIFFUSERS_WEIGHT_NAME
    with safe_open(str(paths["diffusers"]), framework="pt") as handle:
        header = handle.metadata()
        keys = list(handle.keys())
    adapter = json.loads(header["lora_adapter_metadata"])
    assert adapter["unet.r"] == 4 and adapter["unet.lora_alpha"] == 8.0
    assert sorted(adapter["unet.target_modules"]) == sorted(spec.target_modules)
    assert header["castlora.pair"] == "a__b" and header["format"] == "pt"
    assert all(key.startswith("unet.") for key in keys)
    written = paths["diffusers"].read_bytes()
    canonicalize_safetensors(paths["diffusers"])
    assert paths["diffusers"].read_bytes() == written, "exports must be canonical (the same bytes in every process)"


def test_export_leaves_no_temporary_files_and_a_failed_write_keeps_the_old_file(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = LoraSpec(rank=4)
    trained = _trained_pipe(tiny_dir, spec)
    export_lora(tmp_path, trained.unet, spec, metadata={"round": "1"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_add_header_metadata", crash)  # after the diffusers file was written
    with pytest.raises(OSError):
        export_lora(tmp_path, trained.unet, spec, metadata={"round": "2"})
    monkeypatch.undo()
    monkeypatch.setattr(export_module, "save_file", crash)  # while writing the kohya file
    with pytest.raises(OSError):
        save_kohya_lora(tmp_path / KOHYA_WEIGHT_NAME, load_file(str(tmp_path / KOHYA_WEIGHT_NAME)), {"round": "2"})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old files intact, no leftovers


def test_exports_refuse_states_the_spec_does_not_describe(tiny_dir: Path, tmp_path: Path) -> None:
    trained = _trained_pipe(tiny_dir, LoraSpec(rank=4))
    state = unet_lora_state_dict(trained.unet)
    with pytest.raises(LoraError, match="rank 4"):
        to_kohya_sgm(state, trained.unet.config, LoraSpec(rank=8))
    with pytest.raises(LoraError, match="target modules"):
        export_module.save_diffusers_lora(tmp_path, state, LoraSpec(rank=4, target_modules=("to_q",)))
    broken = dict(state)
    broken.pop(next(key for key in broken if key.endswith("lora.up.weight")))
    with pytest.raises(LoraError, match="incomplete"):
        to_kohya_sgm(broken, trained.unet.config, LoraSpec(rank=4))
    with pytest.raises(LoraError, match="reserved"):
        export_module.save_diffusers_lora(tmp_path, state, LoraSpec(rank=4), extra_metadata={"format": "x"})
    assert not list(tmp_path.iterdir())


def test_raw_peft_states_convert_like_the_diffusers_named_ones(tiny_dir: Path) -> None:
    """The trainer may hand over PEFT-named states (``...to_q.lora_A.weight``, no prefix, flattened CLIP paths)."""
    spec = LoraSpec(rank=4, alpha=8.0)
    trained = _trained_pipe(tiny_dir, spec, text_encoders=True)
    raw_unet = get_peft_model_state_dict(trained.unet, adapter_name="castlora")
    raw_te = get_peft_model_state_dict(trained.text_encoder, adapter_name="castlora")
    assert any(".lora_A." in key for key in raw_unet) and not any(key.startswith("unet.") for key in raw_unet)

    from_raw = to_kohya_sgm(raw_unet, trained.unet.config, spec, te_state=raw_te)
    canonical = to_kohya_sgm(
        unet_lora_state_dict(trained.unet),
        trained.unet.config,
        spec,
        te_state=text_encoder_lora_state_dict(trained.text_encoder),
    )
    assert sorted(from_raw) == sorted(canonical)
    assert all(torch.equal(from_raw[key], canonical[key]) for key in canonical)
    assert any(key.startswith("lora_te1_text_model_encoder_layers_") for key in from_raw)
