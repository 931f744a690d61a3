"""Fixtures shared by the family tests: two small training samples."""

from __future__ import annotations

import pytest

from pipeline.train import TrainingSample
from pipeline.train.data import INSTANCE, SEGMIX
from tests.pipeline.train.conftest import write_image, write_mask


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[TrainingSample]:
    """A striped instance photo and a Seg-Mix composite with its mask."""
    folder = tmp_path_factory.mktemp("family_images")
    found = []
    for index, (kind, colour, prompt) in enumerate(
        [(INSTANCE, (200, 40, 40), "a photo of olis dog"), (SEGMIX, (40, 40, 200), "olis dog and vrin dog")]
    ):
        path = folder / f"{index}.png"
        sha = write_image(path, colour, stripes=True)
        mask = write_mask(folder / f"{index}_mask.png") if kind == SEGMIX else None
        found.append(TrainingSample(sha, str(path), prompt, kind, mask))
    return found
