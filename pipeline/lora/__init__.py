"""LoRA adapters on the SDXL U-Net / text encoders and their export (diffusers/PEFT and kohya/SGM files): the SDXL
family's LoRA handling (docs/design.md#model-families); ``training`` holds the family-free adapter bookkeeping of a
training run."""

from pipeline.lora.adapters import (
    DEFAULT_ADAPTER,
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    LoraError,
    LoraSpec,
    activate_adapter,
    add_text_encoder_lora,
    add_unet_lora,
    lora_config,
    lora_parameters,
    remove_adapter,
    text_encoder_lora_state_dict,
    unet_lora_state_dict,
)
from pipeline.lora.export import (
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    export_lora,
    save_diffusers_lora,
    save_kohya_lora,
    to_kohya_sgm,
)

__all__ = [
    "DEFAULT_ADAPTER",
    "DIFFUSERS_WEIGHT_NAME",
    "KOHYA_WEIGHT_NAME",
    "TEXT_ENCODER_TARGETS",
    "UNET_TARGETS",
    "LoraError",
    "LoraSpec",
    "activate_adapter",
    "add_text_encoder_lora",
    "add_unet_lora",
    "export_lora",
    "lora_config",
    "lora_parameters",
    "remove_adapter",
    "save_diffusers_lora",
    "save_kohya_lora",
    "text_encoder_lora_state_dict",
    "to_kohya_sgm",
    "unet_lora_state_dict",
]
