"""LoRA adapters during training: the trained and the frozen reference adapter, a fresh adapter's seeded start,
``init_lora`` (a previous round's LoRA) split by component, and the trainable tensors a checkpoint holds.

Which modules get an adapter and how its weights are named belong to the model family
(docs/design.md#model-families); everything here works on whatever components the family names.

``init_lora`` is one flat state dict in the diffusers file's naming: the denoiser's keys with its component
prefix (``unet.…``) and, when the LoRA trains text encoders, each encoder's keys with its own prefix
(``text_encoder.…`` / ``text_encoder_2.…``), as ``pytorch_lora_weights.safetensors`` holds them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from pipeline.errors import CastloraError, CheckpointError
from pipeline.lora.adapters import (
    DEFAULT_ADAPTER,
    LoraError,
    LoraSpec,
    activate_adapter,
    lora_parameters,
    remove_adapter,
)

if TYPE_CHECKING:
    from pipeline.families.base import ModelFamily

ADAPTER_NAME = DEFAULT_ADAPTER
"""The adapter training updates."""
REFERENCE_ADAPTER = "reference"
"""Frozen copy of ``init_lora`` on the same model: the reference model of the KL term and of Diffusion-DPO."""


def add_fresh_lora(
    family: ModelFamily, component: str, model: torch.nn.Module, spec: LoraSpec, seed: int
) -> list[torch.nn.Parameter]:
    """A fresh fp32 LoRA adapter on ``model`` (replacing one left by an earlier run); returns its parameters.

    The RNG is forked so the initial A matrices depend only on ``seed``, not on what ran before.
    """
    remove_adapter(model, REFERENCE_ADAPTER)  # left behind by a run that died before cleaning up
    remove_adapter(model, ADAPTER_NAME)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        family.add_lora(component, model, spec, ADAPTER_NAME)
    return lora_parameters(model)


def start_from_lora(
    family: ModelFamily,
    component: str,
    model: torch.nn.Module,
    spec: LoraSpec,
    state: Mapping[str, torch.Tensor],
    keep_reference: bool,
) -> list[torch.nn.Parameter]:
    """Load ``state`` (``init_lora``'s part for ``component``) into the trained adapter and, with
    ``keep_reference``, into a frozen ``REFERENCE_ADAPTER`` beside it; returns the trainable parameters."""
    family.load_lora(component, model, state, ADAPTER_NAME)
    if keep_reference:
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten: keep the global RNG as is
            family.add_lora(component, model, spec, REFERENCE_ADAPTER)
        family.load_lora(component, model, state, REFERENCE_ADAPTER)
        activate_adapter(model, ADAPTER_NAME)  # attaching activated (and unfroze) the reference
    check_only_adapter_trains(model, ADAPTER_NAME)
    return lora_parameters(model)


def check_only_adapter_trains(model: torch.nn.Module, adapter_name: str) -> None:
    """PEFT's ``set_adapter`` flips ``requires_grad`` per adapter: after switching, exactly ours must train."""
    marker = f".{adapter_name}."
    wrong = [name for name, p in model.named_parameters() if p.requires_grad != ("lora_" in name and marker in name)]
    if wrong:
        raise CastloraError(f"Internal error: requires_grad is wrong after an adapter switch for {wrong[:3]}.")


def activate_or_disable(model: torch.nn.Module, adapter_name: str | None) -> None:
    """``activate_adapter`` (the named adapter active and the only trainable one), or with None every LoRA layer
    of ``model`` switched off (the model without LoRA)."""
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(adapter_name is not None)
    if adapter_name is not None:
        activate_adapter(model, adapter_name)


def remove_reference_lora(family: ModelFamily, pipe: Any) -> None:
    """Drop the reference adapter wherever ``pipe`` has one, leaving the trained adapter active."""
    for name in (family.denoiser, *family.text_encoders):
        model = family.component(pipe, name)
        if REFERENCE_ADAPTER in (getattr(model, "peft_config", None) or {}):
            remove_adapter(model, REFERENCE_ADAPTER)
            activate_adapter(model, ADAPTER_NAME)


def split_init_lora(
    state: Mapping[str, torch.Tensor], denoiser: str, text_encoders: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(the ``<denoiser>.`` part as is, ``{encoder: its part without the prefix}`` for the encoders present)."""
    denoiser_part = {k: v for k, v in state.items() if k.startswith(f"{denoiser}.")}
    text = {
        name: {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")} for name in text_encoders
    }
    known = tuple(f"{name}." for name in (denoiser, *text_encoders))
    unknown = sorted(k for k in state if not k.startswith(known))
    if unknown:
        raise LoraError(
            f"init_lora has keys of no component of this model (e.g. {unknown[:2]}; expected prefixes {list(known)}): "
            "pass a diffusers LoRA state."
        )
    return denoiser_part, {name: part for name, part in text.items() if part}


def lora_state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a LoRA state dict's names, shapes and fp32 values: ``init_lora``'s part of a fingerprint."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().float().cpu().contiguous()
        digest.update(f"{key}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def trainable_state(models: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every trainable tensor by ``<component>.<parameter name>``: what a checkpoint stores."""
    return {
        f"{component}.{name}": param.detach().cpu().clone()
        for component, model in models.items()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_trainable_state(
    models: Mapping[str, torch.nn.Module], state: Mapping[str, torch.Tensor], folder: Path
) -> None:
    """Copy a ``trainable_state`` back, refusing one whose tensor names differ (another setup's checkpoint)."""
    params = {
        f"{component}.{name}": param
        for component, model in models.items()
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise CheckpointError(
            f"Checkpoint {folder}: LoRA tensors do not match the model (missing {missing[:3]}, unexpected "
            f"{extra[:3]}). Train into a new output folder or delete the checkpoints folder."
        )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key].to(param.device, param.dtype))


def cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached fp32 CPU copies: the result must not change if the pipe trains again."""
    return {key: value.detach().float().cpu().clone() for key, value in state.items()}
