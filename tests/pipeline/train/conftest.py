"""Fixtures for the training tests: one tiny SDXL per session, small distinct images, one CPU thread.

Tiny models are slower with several threads than with one (the ops are too small to split), and on a
shared 2-core machine the extra threads only fight each other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.images import mask_to_image
from pipeline.storage.hashing import sha256_file
from pipeline.train.data import TrainingSample


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    from pipeline.models.tiny_sdxl import build_tiny_sdxl

    target = tmp_path_factory.mktemp("train_sdxl")
    build_tiny_sdxl(target)
    return target


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sdxl_dir, one_thread):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_image(path: Path, colour: tuple[int, int, int], size=(80, 64), stripes: bool = False) -> str:
    """A flat (or striped) colour image; returns its sha256, the sample id."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:] = colour
    if stripes:
        pixels[::8] = 255 - np.array(colour, np.uint8)
    Image.fromarray(pixels).save(path)
    return sha256_file(path)


def write_mask(path: Path, size=(80, 64)) -> str:
    mask = np.zeros((size[1], size[0]), bool)
    mask[:, : size[0] // 4] = True  # left quarter: asymmetric, so a wrong crop shows
    mask_to_image(mask).save(path)
    return str(path)


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory) -> list[TrainingSample]:
    """Two references, one Seg-Mix composite, one class image and one prior composite, all different."""
    folder = tmp_path_factory.mktemp("train_images")
    specs = [
        ("instance", (200, 40, 40), "a photo of olis dog", False),
        ("instance", (40, 200, 40), "a photo of vrin dog on grass", True),
        ("segmix", (40, 40, 200), "olis dog and vrin dog", False),
        ("prior", (120, 120, 120), "a photo of a dog", False),
        ("prior_segmix", (200, 200, 40), "a dog and a dog", True),
    ]
    samples = []
    for index, (kind, colour, prompt, stripes) in enumerate(specs):
        path = folder / f"{index}.png"
        sha = write_image(path, colour, stripes=stripes)
        mask = write_mask(folder / f"{index}_mask.png") if kind != "instance" else None
        samples.append(TrainingSample(sha, str(path), prompt, kind, mask))
    return samples
