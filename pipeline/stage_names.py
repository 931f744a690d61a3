"""The pipeline's stages by name: one folder per stage under ``pairs/<pair>/`` and one Dagster asset each.

The values are the on-disk folder names and asset keys, so they never change; code names a stage through
``Stage`` instead of repeating the string.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    """A pipeline stage; its value is the stage folder's name and the asset's key."""

    CHARACTER_IMAGES = "character_images"
    REFERENCES = "references"
    SEGMENTS = "segments"
    CAPTIONS = "captions"
    CLASS_IMAGES = "class_images"
    SEGMIX_BANK = "segmix_bank"
    LORA = "lora"
    SAMPLES = "samples"
    ITERATION = "iteration"
    EVALUATION = "evaluation"
