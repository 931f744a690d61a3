"""Attach PEFT LoRA adapters to the SDXL U-Net and CLIP text encoders, switch and remove them, and read their
weights back and load them in (the SDXL family's LoRA handling, docs/design.md#model-families).

Adapters are attached with PEFT's own ``inject_adapter_in_model`` for every model, never through the
``add_adapter``/``set_adapter`` methods that diffusers and transformers wrap around it: transformers gates its
wrappers on a minimum PEFT version (5.25 asks for a PEFT that was not released yet), and the wrappers add nothing
castlora needs. The bookkeeping both libraries read (``peft_config``, ``_hf_peft_config_loaded``) is kept the same.

The frozen base may be fp16/bf16 on GPU while the LoRA weights stay fp32: low-precision LoRA updates lose
most of a small learning rate to rounding (docs/design.md#lora-precision). State dicts use diffusers' naming, which is
what ``save_lora_weights`` writes and what the kohya/SGM converter in ``export.py`` reads.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.peft_utils import delete_adapter_layers
from diffusers.utils.state_dict_utils import StateDictType
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from pipeline.errors import CastloraError

DEFAULT_ADAPTER = "castlora"
UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
"""SDXL U-Net attention projections (the paper's setting: LoRA on self- and cross-attention)."""
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
"""CLIP attention projections, as diffusers' DreamBooth-LoRA script and kohya target them."""


class LoraError(CastloraError, ValueError):
    """A LoRA setting or adapter is invalid, or a LoRA state dict cannot be converted."""


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 32
    alpha: float = 32.0
    """Scale is alpha / rank; recorded in both exported files so every loader applies the same scale."""
    target_modules: tuple[str, ...] = UNET_TARGETS
    dropout: float = 0.0
    train_text_encoders: bool = False

    def __post_init__(self) -> None:
        if int(self.rank) != self.rank or self.rank < 1:
            raise LoraError(f"LoRA rank must be a positive integer, got {self.rank!r}; set lora.rank (paper: 32).")
        if not self.alpha > 0:
            raise LoraError(f"LoRA alpha must be > 0, got {self.alpha!r}; set lora.alpha (alpha = rank means scale 1).")
        if not self.target_modules:
            raise LoraError("LoRA target_modules is empty; name at least one module, e.g. to_q.")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}.")

    def as_metadata(self) -> dict[str, str]:
        """Flat string form for file headers and lineage."""
        return {
            "rank": str(self.rank),
            "alpha": repr(float(self.alpha)),
            "target_modules": ",".join(self.target_modules),
            "dropout": repr(float(self.dropout)),
            "train_text_encoders": str(self.train_text_encoders).lower(),
        }


def lora_config(spec: LoraSpec, target_modules: tuple[str, ...] | None = None) -> LoraConfig:
    """The PEFT config for ``spec``; also serialised as the diffusers file's adapter metadata."""
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(target_modules or spec.target_modules),
        lora_dropout=spec.dropout,
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: the adapted model starts equal to the base
    )


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Trainable LoRA parameters only (what the optimizer gets)."""
    return [p for name, p in module.named_parameters() if p.requires_grad and "lora_" in name]


def _attach(module: torch.nn.Module, config: LoraConfig, adapter_name: str) -> None:
    existing = getattr(module, "peft_config", None) or {}
    if adapter_name in existing:
        raise LoraError(
            f"{type(module).__name__} already has a LoRA adapter named {adapter_name!r}; "
            "load a fresh model or pick another adapter_name."
        )
    module.requires_grad_(False)  # only the adapter trains, whatever the caller did before
    try:
        with warnings.catch_warnings():
            # PEFT warns whenever a model already holds an adapter; castlora keeps a second one on purpose
            # (the frozen KL reference beside the trained adapter).
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, module, adapter_name=adapter_name)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise LoraError(
            f"Cannot add LoRA to {type(module).__name__} with target_modules {sorted(config.target_modules)}: {exc}"
        ) from exc
    module._hf_peft_config_loaded = True  # what diffusers' and transformers' adapter code checks
    activate_adapter(module, adapter_name)
    for param in lora_parameters(module):
        param.data = param.data.float()


def activate_adapter(module: torch.nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the one active (and trainable) adapter of every LoRA layer in ``module``."""
    if adapter_name not in (getattr(module, "peft_config", None) or {}):
        raise LoraError(f"{type(module).__name__} has no adapter {adapter_name!r}.")
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.set_adapter(adapter_name)


def remove_adapter(module: torch.nn.Module, adapter_name: str) -> None:
    """Delete ``adapter_name``'s weights and config from ``module``; a no-op when it has no such adapter."""
    configs = getattr(module, "peft_config", None) or {}
    if adapter_name not in configs:
        return
    delete_adapter_layers(module, adapter_name)
    remaining = getattr(module, "peft_config", None)
    if remaining is not None:
        remaining.pop(adapter_name, None)


def add_unet_lora(unet: torch.nn.Module, spec: LoraSpec, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Add a trainable fp32 LoRA on ``spec.target_modules`` of the U-Net; the base is frozen."""
    _attach(unet, lora_config(spec), adapter_name)


def add_text_encoder_lora(text_encoder: torch.nn.Module, spec: LoraSpec, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Add a trainable fp32 LoRA on the CLIP attention projections (rank/alpha/dropout from ``spec``)."""
    _attach(text_encoder, lora_config(spec, TEXT_ENCODER_TARGETS), adapter_name)


def _single_adapter(module: torch.nn.Module, adapter_name: str | None) -> str:
    adapters = list(getattr(module, "peft_config", None) or {})
    if not adapters:
        raise LoraError(f"{type(module).__name__} has no LoRA adapter; call add_unet_lora/add_text_encoder_lora first.")
    if adapter_name is None:
        if len(adapters) > 1:
            raise LoraError(f"{type(module).__name__} has several adapters {adapters}; pass adapter_name.")
        return adapters[0]
    if adapter_name not in adapters:
        raise LoraError(f"{type(module).__name__} has no adapter {adapter_name!r} (it has {adapters}).")
    return adapter_name


def _diffusers_state(module: torch.nn.Module, adapter_name: str | None, halves: str) -> dict[str, torch.Tensor]:
    """PEFT state in diffusers naming. ``convert_state_dict_to_diffusers`` only renames the modules it knows
    (attention projections) and leaves e.g. ``conv1.lora_A`` as is; diffusers' loader picks one naming scheme
    from the first key, so a mixed file loads half its weights. Rename the leftovers to ``<halves>.down/up``."""
    name = _single_adapter(module, adapter_name)
    converted = convert_state_dict_to_diffusers(get_peft_model_state_dict(module, adapter_name=name))
    uniform = {}
    for key, value in converted.items():
        key = key.replace(".lora_A.weight", f".{halves}.down.weight").replace(".lora_B.weight", f".{halves}.up.weight")
        uniform[key] = value.detach().contiguous()
    return uniform


def unet_lora_state_dict(unet: torch.nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The U-Net's LoRA weights in diffusers naming, keys prefixed ``unet.``
    (e.g. ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight``)."""
    return {f"unet.{key}": value for key, value in _diffusers_state(unet, adapter_name, "lora").items()}


def canonical_clip_key(key: str) -> str:
    # transformers 5 flattened CLIPTextModel (no ``text_model`` wrapper; CLIPTextModelWithProjection keeps it).
    # Files keep the classic ``text_model.`` paths that kohya, ComfyUI and older diffusers expect; diffusers
    # strips the prefix again when loading into a flattened encoder.
    return key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"


def text_encoder_lora_state_dict(
    text_encoder: torch.nn.Module, adapter_name: str | None = None
) -> dict[str, torch.Tensor]:
    """A text encoder's LoRA weights in diffusers naming with classic CLIP paths, without a component prefix
    (e.g. ``text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight``); the exporters add
    ``text_encoder.`` / ``text_encoder_2.`` themselves because only they know which encoder it is."""
    return {
        canonical_clip_key(key): value
        for key, value in _diffusers_state(text_encoder, adapter_name, "lora_linear_layer").items()
    }


def check_lora_state_matches(
    expected: dict[str, tuple[int, ...]], state: Mapping[str, torch.Tensor], part: str
) -> None:
    """``state`` has exactly the tensor names and shapes of the adapter it is loaded into (``expected``); a
    different target set (names) or rank (shapes) is refused, naming the first difference."""
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise LoraError(
            f"init_lora does not match this training config's {part} ({len(missing)} tensors missing, e.g. "
            f"{missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]}): train with the targets of the run that "
            "produced init_lora."
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise LoraError(
                f"init_lora tensor {key} has shape {tuple(state[key].shape)} but this config's {part} needs {shape}: "
                "set rank (and alpha) to those of the run that produced init_lora."
            )


def _unet_file_key(peft_key: str) -> str:
    """``unet_lora_state_dict``'s name for a PEFT key without adapter name (``….to_q.lora_A.weight``)."""
    (key,) = convert_state_dict_to_diffusers({peft_key: None}, original_type=StateDictType.PEFT)
    key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
    return f"unet.{key}"


def load_unet_lora(unet: torch.nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str) -> None:
    """Copy ``state`` (``unet_lora_state_dict`` format) into the U-Net adapter ``adapter_name``.

    The adapter was built from the training config, so a different rank (tensor shapes) or target set (names)
    is refused here. Alpha is not stored in the state dict: the caller must pass the round's own alpha.
    """
    suffix = f".{adapter_name}.weight"
    params = {
        _unet_file_key(name[: -len(suffix)] + ".weight"): param
        for name, param in unet.named_parameters()
        if name.endswith(suffix) and (".lora_A." in name or ".lora_B." in name)
    }
    check_lora_state_matches({k: tuple(p.shape) for k, p in params.items()}, state, "U-Net LoRA")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key].to(param.device, param.dtype))


def load_text_encoder_lora(encoder: torch.nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str) -> None:
    """Copy ``state`` (``text_encoder_lora_state_dict`` naming) into the encoder's adapter ``adapter_name``.

    The names are matched through PEFT's own state dict of that adapter (the export renames each of its keys in
    order), so this works however the adapter was attached; a different rank or target set is refused.
    """
    peft_state = get_peft_model_state_dict(encoder, adapter_name=adapter_name)
    exported = text_encoder_lora_state_dict(encoder, adapter_name)
    if len(exported) != len(peft_state):
        raise LoraError(f"Internal error: {len(exported)} exported names for {len(peft_state)} LoRA tensors.")
    peft_key = dict(zip(exported, peft_state, strict=True))
    check_lora_state_matches({k: tuple(v.shape) for k, v in exported.items()}, state, "text-encoder LoRA")
    with torch.no_grad():
        converted = {peft_key[k]: v.to(peft_state[peft_key[k]].dtype) for k, v in state.items()}
        result = set_peft_model_state_dict(encoder, converted, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise LoraError(f"Loading init_lora into the text encoder left unexpected keys {unexpected[:2]}.")
