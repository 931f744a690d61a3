"""Attach PEFT LoRA adapters to the SDXL U-Net and CLIP text encoders, switch and remove them, and read their
weights back.

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
from dataclasses import dataclass

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.peft_utils import delete_adapter_layers
from peft import LoraConfig, inject_adapter_in_model
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
