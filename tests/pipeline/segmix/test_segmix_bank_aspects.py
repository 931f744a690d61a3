"""The segmix_bank stage renders composites in several aspect ratios when asked (docs/design.md#aspect-ratio-buckets),
and keeps its one canvas by default."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
from PIL import Image

from pipeline.errors import CastloraError
from pipeline.segment import STATUS_OK
from pipeline.segmix.compose import SegMixConfig
from pipeline.stages.segmix_bank import BankConfig, run_segmix_bank
from pipeline.storage.lineage import LineageRecorder
from tests.pipeline.segmix.test_segmix_bank import cutout


@pytest.fixture
def segments(tmp_path) -> pd.DataFrame:
    rows = []
    for character, colour in [("dog6", (200, 40, 40)), ("dog2", (40, 40, 200))]:
        for index in range(2):
            path = tmp_path / f"{character}_{index}.png"
            cutout(80 + 10 * index, 100, colour).save(path)
            rows.append(
                {
                    "status": STATUS_OK,
                    "character_id": character,
                    "cutout_path": str(path),
                    "token_phrase": f"{character} thing",
                    "cutout_sha256": f"{character}-{index}",
                }
            )
    return pd.DataFrame(rows)


def run(segments, tmp_path, config: BankConfig) -> pd.DataFrame:
    recorder = LineageRecorder(tmp_path / "lineage", "run", "segmix_bank", "a__b", "test")
    out = run_segmix_bank(
        segments=segments, class_images=None, character_nouns={"dog6": "dog", "dog2": "dog"},
        out_dir=tmp_path / "bank", config=config, recorder=recorder,
    )  # fmt: skip
    return out.manifest


def test_bank_canvases_by_aspect(segments, tmp_path):
    base = BankConfig(n_instance=4, n_prior=0, segmix=SegMixConfig(canvas=(192, 192)))
    square = run(segments, tmp_path / "square", base)
    assert set(zip(square["canvas_width"], square["canvas_height"], strict=True)) == {(192, 192)}

    manifest = run(segments, tmp_path / "aspect", replace(base, canvas_aspects="1:1,4:3,3:4"))
    sizes = list(zip(manifest["canvas_width"], manifest["canvas_height"], strict=True))
    assert sizes[0] == (192, 192) and sizes[1][0] > sizes[1][1] and sizes[2][0] < sizes[2][1] and sizes[3] == sizes[0]
    for path, size in zip(manifest["image_path"], sizes, strict=True):
        assert Image.open(path).size == size
    assert manifest["prompt"].tolist() == square["prompt"].tolist()  # the same plan, on other canvases

    with pytest.raises(CastloraError, match="canvas_aspects"):
        BankConfig(canvas_aspects="portrait")
