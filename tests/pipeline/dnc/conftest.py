"""Fixtures for the D&C tests: tiny DINOv2/CLIP/OWLv2 built once per session, one CPU thread, small images."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> SimpleNamespace:
    from pipeline.models.tiny_embedders import build_tiny_clip, build_tiny_dinov2
    from pipeline.models.tiny_vision import build_tiny_owlv2

    root = tmp_path_factory.mktemp("dnc-tiny")
    build_tiny_dinov2(root / "dinov2")
    build_tiny_clip(root / "clip")
    build_tiny_owlv2(root / "owlv2")
    return SimpleNamespace(root=root, dinov2=root / "dinov2", clip=root / "clip", owlv2=root / "owlv2")


@pytest.fixture(scope="module", autouse=True)
def _every_dnc_test_on_one_thread(one_thread):
    yield


def noisy_colour(colour: tuple[int, int, int], size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.asarray(colour, dtype=np.int16) + rng.integers(-12, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> tuple[Image.Image, list[tuple]]:
    """Two subjects on a white canvas; returns the image and their xyxy boxes (left first)."""
    width = left.width + right.width + 3 * gap
    height = max(left.height, right.height) + 2 * gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(left, (gap, gap))
    canvas.paste(right, (2 * gap + left.width, gap))
    boxes = [
        (gap, gap, gap + left.width, gap + left.height),
        (2 * gap + left.width, gap, 2 * gap + left.width + right.width, gap + right.height),
    ]
    return canvas, [tuple(float(v) for v in box) for box in boxes]


@pytest.fixture
def colour_photo():
    return noisy_colour


@pytest.fixture
def compose_side_by_side():
    return side_by_side
