"""An example pair made only of two character LoRA files for the tiny SDXL, so a user without LoRAs of their own can
try modular customization end to end (``castlora example-lora-pair``; docs/design.md#modular-customization).

The LoRAs are random (seeded) deltas on the tiny SDXL U-Net: their renders are noise, like every tiny model's
output. One is written in the diffusers/PEFT format and one in kohya's, so both readers run. Each character also
gets user masks named like the images ``character_images`` renders (``<id>_<seed:04d>``), because no segmenter
finds a subject in noise; a real pair of LoRAs needs none.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import CastloraError
from pipeline.images import mask_to_image

EXAMPLE_PAIR = "zorp__quix"
EXAMPLE_CHARACTERS = ("zorp", "quix")


def write_example_lora_pair(
    destination: Path, tiny_sdxl_dir: Path, images_per_character: int = 5, rank: int = 4
) -> Path:
    """Write ``destination``/pair.yaml, ``zorp.safetensors`` (diffusers), ``quix.safetensors`` (kohya) and the
    masks ``<id>_masks/<id>_0000.png``…; ``tiny_sdxl_dir`` is the tiny SDXL folder the LoRAs are shaped for.
    ``images_per_character`` must match the ``character_images`` setting of the run (its default is 5).
    Returns the spec file."""
    from diffusers import UNet2DConditionModel

    from pipeline.lora import LoraSpec, add_unet_lora, export_lora, lora_parameters

    if destination.exists() and any(destination.iterdir()):
        raise CastloraError(f"{destination} is not empty: give a new folder for the example pair.")
    destination.mkdir(parents=True, exist_ok=True)
    spec = LoraSpec(rank=rank, alpha=float(rank))
    lines = [f"pair: {EXAMPLE_PAIR}", "characters:"]
    for seed, cid in enumerate(EXAMPLE_CHARACTERS, start=1):
        unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
        add_unet_lora(unet, spec)
        generator = torch.Generator().manual_seed(seed)
        for param in lora_parameters(unet):  # PEFT starts B at zero: a random delta makes the LoRA do something
            param.data = torch.randn(param.shape, generator=generator) * 0.05
        with tempfile.TemporaryDirectory() as exported:
            files = export_lora(Path(exported), unet, spec)
            file_format = "diffusers" if seed == 1 else "kohya"
            (destination / f"{cid}.safetensors").write_bytes(files[file_format].read_bytes())
        masks = destination / f"{cid}_masks"
        masks.mkdir()
        mask = np.zeros((64, 64), bool)
        mask[8:56, 12:52] = True  # any size: a user mask is resized to its image
        for k in range(images_per_character):
            mask_to_image(mask).save(masks / f"{cid}_{k:04d}.png")
        fields = f"id: {cid}, class_noun: ball, token_phrase: {cid} ball, lora: {cid}.safetensors, masks: {cid}_masks"
        lines.append(f"  - {{{fields}}}")
    spec_file = destination / "pair.yaml"
    spec_file.write_text("\n".join(lines) + "\n")
    return spec_file
