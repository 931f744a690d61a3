"""Starting a run from an exported LoRA (``init_lora``): its U-Net part and, for a text-encoder LoRA, the parts
of both text encoders, each loaded into a named adapter (the trained one, or the frozen reference).

``init_lora`` is one flat state dict in the diffusers file's naming: ``unet.…`` keys (``unet_lora_state_dict``)
and, when the LoRA trains text encoders, ``text_encoder.…`` / ``text_encoder_2.…`` keys
(``text_encoder_lora_state_dict`` with the component prefix), as ``pytorch_lora_weights.safetensors`` holds them.
"""

from __future__ import annotations

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from pipeline.lora.adapters import LoraError, activate_adapter, text_encoder_lora_state_dict

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def split_init_lora(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(the ``unet.`` part as is, ``{encoder: its part without the prefix}`` for the encoders present)."""
    unet = {k: v for k, v in state.items() if k.startswith("unet.")}
    text = {
        name: {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")} for name in TEXT_ENCODERS
    }
    unknown = sorted(k for k in state if not k.startswith(("unet.", *(f"{name}." for name in TEXT_ENCODERS))))
    if unknown:
        raise LoraError(f"init_lora has keys of no SDXL component (e.g. {unknown[:2]}): pass a diffusers LoRA state.")
    return unet, {name: part for name, part in text.items() if part}


def check_init_lora_matches(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], part: str) -> None:
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


def load_text_encoder_lora(encoder: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Copy ``state`` (``text_encoder_lora_state_dict`` naming) into the encoder's adapter ``adapter_name``.

    The names are matched through PEFT's own state dict of that adapter (the export renames each of its keys in
    order), so this works however the adapter was attached; a different rank or target set is refused.
    """
    peft_state = get_peft_model_state_dict(encoder, adapter_name=adapter_name)
    exported = text_encoder_lora_state_dict(encoder, adapter_name)
    if len(exported) != len(peft_state):
        raise LoraError(f"Internal error: {len(exported)} exported names for {len(peft_state)} LoRA tensors.")
    peft_key = dict(zip(exported, peft_state, strict=True))
    check_init_lora_matches({k: tuple(v.shape) for k, v in exported.items()}, state, "text-encoder LoRA")
    with torch.no_grad():
        converted = {peft_key[k]: v.to(peft_state[peft_key[k]].dtype) for k, v in state.items()}
        result = set_peft_model_state_dict(encoder, converted, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise LoraError(f"Loading init_lora into the text encoder left unexpected keys {unexpected[:2]}.")


def activate_or_disable(model: torch.nn.Module, adapter_name: str | None) -> None:
    """``activate_adapter`` (the named adapter active and the only trainable one), or with None every LoRA layer
    of ``model`` switched off (the model without LoRA)."""
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(adapter_name is not None)
    if adapter_name is not None:
        activate_adapter(model, adapter_name)
