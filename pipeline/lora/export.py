"""Write a trained LoRA in the two formats the SDXL tool world reads (docs/design.md#lora-formats).

* diffusers/PEFT ``pytorch_lora_weights.safetensors``, written by diffusers' own
  ``StableDiffusionXLPipeline.save_lora_weights`` with the adapter metadata (rank, alpha, targets) in the
  header: without it loaders assume alpha = rank and silently rescale the LoRA.
* kohya/SGM (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight`` + ``.alpha``),
  which ComfyUI, A1111/Forge and kohya read; diffusers-named SDXL files do not load in ComfyUI.

The SGM names follow the original Stable Diffusion U-Net, whose blocks are numbered sequentially: conv_in is
``input_blocks.0``, then every (resnet [+ attention]) layer and every downsampler of each level takes the next
``input_blocks`` index; the decoder numbers its levels the same way in ``output_blocks``, with the upsampler
appended to a level's last block. The map is derived from the U-Net config, not hard-coded for one shape.
Both files are written atomically (temporary name in the target directory, then rename).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.lora.adapters import (
    TEXT_ENCODER_TARGETS,
    LoraError,
    LoraSpec,
    canonical_clip_key,
    lora_config,
    text_encoder_lora_state_dict,
    unet_lora_state_dict,
)
from pipeline.storage.atomic import atomic_path
from pipeline.storage.tensor_files import canonicalize_safetensors

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya_sgm.safetensors"
RESERVED_HEADER_KEYS = ("format", "lora_adapter_metadata")

# A LoRA key in diffusers or PEFT naming: <module path>.<which half>.weight
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<half>lora\.down|lora\.up|lora_A|lora_B|lora_linear_layer\.down|lora_linear_layer\.up)"
    r"\.weight$"
)
_DOWN_HALVES = ("lora.down", "lora_A", "lora_linear_layer.down")

# Inside a resnet, the original U-Net's ResBlock names its layers differently from diffusers' ResnetBlock2D.
_RESNET_TO_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Modules outside the block structure.
_TOP_LEVEL_TO_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


# ---------------------------------------------------------------------------------------------- state dicts
@dataclass(frozen=True)
class _LoraPair:
    down: torch.Tensor
    up: torch.Tensor


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Accept keys with or without the pipeline-component prefix (``unet.``, ``text_encoder.``), in diffusers or
    raw PEFT naming; text-encoder paths get their classic ``text_model.`` prefix (see ``canonical_clip_key``)."""
    stripped = {key.removeprefix(f"{prefix}."): value for key, value in state.items()}
    if prefix.startswith("text_encoder"):
        return {canonical_clip_key(key): value for key, value in stripped.items()}
    return stripped


def _pairs_by_module(state: Mapping[str, torch.Tensor], what: str) -> dict[str, _LoraPair]:
    """Group a diffusers/PEFT LoRA state dict into (down, up) per module path."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise LoraError(
                f"{what} LoRA key {key!r} is not a plain LoRA weight (lora_A/lora_B or lora.down/lora.up); "
                "DoRA, LoRA biases and other adapter types cannot be exported."
            )
        side = "down" if match["half"] in _DOWN_HALVES else "up"
        halves.setdefault(match["module"], {})[side] = tensor
    pairs = {}
    for module, sides in halves.items():
        if set(sides) != {"down", "up"}:
            raise LoraError(
                f"{what} LoRA module {module!r} has only its {', '.join(sides)} weight; the state is incomplete."
            )
        pairs[module] = _LoraPair(down=sides["down"], up=sides["up"])
    return pairs


def _check_against_spec(pairs: Mapping[str, _LoraPair], rank: int, targets: Sequence[str], what: str) -> None:
    """The headers record ``spec``; refuse weights that it does not describe, or loaders would misread them."""
    for module, pair in pairs.items():
        if pair.down.shape[0] != rank or pair.up.shape[1] != rank:
            raise LoraError(
                f"{what} LoRA module {module!r} has rank {pair.down.shape[0]} but the LoraSpec says rank {rank}; "
                "export with the spec the LoRA was trained with."
            )
        if not any(module == t or module.endswith(f".{t}") for t in targets):
            raise LoraError(
                f"{what} LoRA module {module!r} is not one of the spec's target modules {list(targets)}; "
                "export with the spec the LoRA was trained with."
            )


# ---------------------------------------------------------------------------------------- diffusers format
def _adapter_metadata(spec: LoraSpec, targets: Sequence[str]) -> dict[str, Any]:
    # PEFT's own config dict, as diffusers' save_lora_adapter writes it: load_lora_weights rebuilds the
    # LoraConfig from exactly these fields.
    return lora_config(spec, tuple(targets)).to_dict()


def save_diffusers_lora(
    out_dir: Path,
    unet_state: Mapping[str, torch.Tensor],
    spec: LoraSpec,
    text_encoder_state: Mapping[str, torch.Tensor] | None = None,
    text_encoder_2_state: Mapping[str, torch.Tensor] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` with adapter metadata; returns its path."""
    out_dir = Path(out_dir)
    extra = _string_metadata(extra_metadata or {}, DIFFUSERS_WEIGHT_NAME)
    clashing = sorted(set(extra) & set(RESERVED_HEADER_KEYS))
    if clashing:
        raise LoraError(f"extra_metadata keys {clashing} are reserved by the diffusers LoRA format; rename them.")

    parts = {
        "unet": (_strip_prefix(unet_state, "unet"), spec.target_modules),
        "text_encoder": (_strip_prefix(text_encoder_state or {}, "text_encoder"), TEXT_ENCODER_TARGETS),
        "text_encoder_2": (_strip_prefix(text_encoder_2_state or {}, "text_encoder_2"), TEXT_ENCODER_TARGETS),
    }
    if not parts["unet"][0]:
        raise LoraError("The U-Net LoRA state is empty; nothing to export (was add_unet_lora called?).")
    layers: dict[str, Any] = {}
    for name, (state, targets) in parts.items():
        if state:
            _check_against_spec(_pairs_by_module(state, name), spec.rank, targets, name)
            layers[f"{name}_lora_layers"] = {key: value.detach().contiguous() for key, value in state.items()}
            layers[f"{name}_lora_adapter_metadata"] = _adapter_metadata(spec, targets)

    target = out_dir / DIFFUSERS_WEIGHT_NAME
    with atomic_path(target) as temporary:
        StableDiffusionXLPipeline.save_lora_weights(temporary.parent, weight_name=temporary.name, **layers)
        if extra:
            _add_header_metadata(temporary, extra)
        canonicalize_safetensors(temporary)
    return target


def _add_header_metadata(path: Path, extra: Mapping[str, str]) -> None:
    """save_lora_weights only writes its own header keys; add the caller's next to them."""
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata() or {})
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={**header, **extra})


# -------------------------------------------------------------------------------------------- kohya / SGM
def _config_value(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config[key]
    return getattr(config, key)


def _has(config: Any, key: str) -> bool:
    return key in config if isinstance(config, Mapping) else hasattr(config, key)


def _per_level(value: int | Sequence[int], levels: int) -> list[int]:
    return [int(value)] * levels if isinstance(value, int) else [int(v) for v in value]


def sgm_block_map(unet_config: Any) -> dict[str, str]:
    """Diffusers U-Net container path -> SGM path, e.g. ``down_blocks.1.attentions.0`` -> ``input_blocks.4.1``.

    Keys are resnets (``...resnets.j``), attentions (``...attentions.j``), samplers' convs and the top-level
    modules; a module inside a container keeps its inner path (renamed for resnets)."""
    down_types = list(_config_value(unet_config, "down_block_types"))
    up_types = list(_config_value(unet_config, "up_block_types"))
    levels = len(down_types)
    layers = _per_level(_config_value(unet_config, "layers_per_block"), levels)

    mapping = dict(_TOP_LEVEL_TO_SGM)
    index = 1  # input_blocks.0 is conv_in
    for level, block_type in enumerate(down_types):
        for layer in range(layers[level]):
            mapping[f"down_blocks.{level}.resnets.{layer}"] = f"input_blocks.{index}.0"
            if "Attn" in block_type:
                mapping[f"down_blocks.{level}.attentions.{layer}"] = f"input_blocks.{index}.1"
            index += 1
        if level < levels - 1:  # every level but the deepest ends with a downsampler block of its own
            mapping[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    mid_type = _config_value(unet_config, "mid_block_type") if _has(unet_config, "mid_block_type") else None
    mid_has_attention = mid_type is None or "Attn" in str(mid_type)  # diffusers' default mid block is cross-attn
    mapping["mid_block.resnets.0"] = "middle_block.0"
    if mid_has_attention:
        mapping["mid_block.attentions.0"] = "middle_block.1"
        mapping["mid_block.resnets.1"] = "middle_block.2"
    else:
        mapping["mid_block.resnets.1"] = "middle_block.1"

    up_layers = [n + 1 for n in reversed(layers)]  # decoder levels have one extra layer (the skip from the sampler)
    index = 0
    for level, block_type in enumerate(up_types):
        has_attention = "Attn" in block_type
        for layer in range(up_layers[level]):
            mapping[f"up_blocks.{level}.resnets.{layer}"] = f"output_blocks.{index}.0"
            if has_attention:
                mapping[f"up_blocks.{level}.attentions.{layer}"] = f"output_blocks.{index}.1"
            if layer == up_layers[level] - 1 and level < levels - 1:
                slot = 2 if has_attention else 1  # the upsampler follows the block's last layer
                mapping[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
            index += 1
    return mapping


def diffusers_to_sgm_path(module: str, block_map: Mapping[str, str]) -> str:
    """SGM path of one diffusers U-Net module (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``
    -> ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``); attention internals keep their names."""
    for container in sorted(block_map, key=len, reverse=True):
        if module == container or module.startswith(f"{container}."):
            inner = module[len(container) + 1 :]
            if ".resnets." in f".{container}" and inner:
                head, _, rest = inner.partition(".")
                inner = ".".join(filter(None, (_RESNET_TO_SGM.get(head, head), rest)))
            return ".".join(filter(None, (block_map[container], inner)))
    raise LoraError(
        f"U-Net module {module!r} has no place in the SGM layout derived from this U-Net config; "
        "only SDXL-style (down/mid/up block) U-Nets can be exported to kohya format."
    )


def _kohya_entries(name: str, pair: _LoraPair, alpha: float) -> dict[str, torch.Tensor]:
    return {
        f"{name}.lora_down.weight": pair.down.detach().contiguous(),
        f"{name}.lora_up.weight": pair.up.detach().contiguous(),
        f"{name}.alpha": torch.tensor(float(alpha), dtype=torch.float32),  # 0-d, as kohya writes it
    }


def to_kohya_sgm(
    unet_state: Mapping[str, torch.Tensor],
    unet_config: Any,
    spec: LoraSpec,
    te_state: Mapping[str, torch.Tensor] | None = None,
    te2_state: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename a diffusers-named LoRA state (see ``adapters.unet_lora_state_dict``) to kohya/SGM keys with an
    ``.alpha`` per module, so kohya-style loaders apply the same alpha/rank scale as PEFT."""
    block_map = sgm_block_map(unet_config)
    unet_pairs = _pairs_by_module(_strip_prefix(unet_state, "unet"), "unet")
    if not unet_pairs:
        raise LoraError("The U-Net LoRA state is empty; nothing to export (was add_unet_lora called?).")
    _check_against_spec(unet_pairs, spec.rank, spec.target_modules, "unet")

    out: dict[str, torch.Tensor] = {}
    for module, pair in unet_pairs.items():
        sgm = diffusers_to_sgm_path(module, block_map)
        out.update(_kohya_entries("lora_unet_" + sgm.replace(".", "_"), pair, spec.alpha))
    for prefix, component, state in (
        ("lora_te1_", "text_encoder", te_state),
        ("lora_te2_", "text_encoder_2", te2_state),
    ):
        pairs = _pairs_by_module(_strip_prefix(state or {}, component), component)
        _check_against_spec(pairs, spec.rank, TEXT_ENCODER_TARGETS, component)
        for module, pair in pairs.items():
            out.update(_kohya_entries(prefix + module.replace(".", "_"), pair, spec.alpha))
    return out


def _string_metadata(metadata: Mapping[str, Any], where: str) -> dict[str, str]:
    bad = sorted(key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str))
    if bad:
        raise LoraError(f"Header metadata for {where} must map str to str; convert the values of {bad} to strings.")
    return dict(metadata)


def _kohya_network_header(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """ss_* fields kohya-compatible tools show and use, read from the weights themselves."""
    downs = [value for key, value in state.items() if key.endswith(".lora_down.weight")]
    alphas = {float(value) for key, value in state.items() if key.endswith(".alpha")}
    if not downs:
        raise LoraError("The kohya LoRA state has no .lora_down.weight tensors; nothing to save.")
    ranks = {int(t.shape[0]) for t in downs}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks)),
        "ss_network_alpha": _number(max(alphas)) if alphas else str(max(ranks)),
    }


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def save_kohya_lora(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a kohya/SGM LoRA safetensors file atomically, with ss_network_dim/ss_network_alpha in its header
    (taken from the weights unless ``metadata`` sets them)."""
    path = Path(path)
    header = {"format": "pt", **_kohya_network_header(state), **_string_metadata(metadata, path.name)}
    with atomic_path(path) as temporary:
        save_file({key: value.detach().contiguous() for key, value in state.items()}, str(temporary), metadata=header)
        canonicalize_safetensors(temporary)
    return path


# ---------------------------------------------------------------------------------------------------- both
def export_lora(
    out_dir: Path,
    unet: torch.nn.Module,
    spec: LoraSpec,
    text_encoders: Sequence[torch.nn.Module | None] = (),
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write the diffusers and the kohya file for a LoRA-adapted U-Net (and text encoders, in SDXL order:
    ``(text_encoder, text_encoder_2)``; ``None`` or an encoder without adapter is skipped)."""
    if len(text_encoders) > 2:
        raise LoraError(f"SDXL has two text encoders; export_lora got {len(text_encoders)}.")
    unet_state = unet_lora_state_dict(unet)
    te_states: list[dict[str, torch.Tensor] | None] = [None, None]
    for slot, encoder in enumerate(text_encoders):
        if encoder is not None and getattr(encoder, "peft_config", None):
            te_states[slot] = text_encoder_lora_state_dict(encoder)
    extra = dict(metadata or {})
    diffusers_path = save_diffusers_lora(out_dir, unet_state, spec, te_states[0], te_states[1], extra_metadata=extra)
    kohya_state = to_kohya_sgm(unet_state, unet.config, spec, te_states[0], te_states[1])
    kohya_path = save_kohya_lora(Path(out_dir) / KOHYA_WEIGHT_NAME, kohya_state, extra)
    return {"diffusers": diffusers_path, "kohya": kohya_path}
